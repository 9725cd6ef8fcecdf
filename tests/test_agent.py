"""The unlock agent process and `secrets-manager agent start|status|forget|stop` (real processes)."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import secrets_manager.agent as agent_module
from agent_fixtures import AgentCli, agent_cli, alive, require_root, wait_until_gone
from secrets_manager.agent import AgentClient, check_socket, receive_message, send_message
from secrets_manager.agent import process as agent_process
from secrets_manager.errors import StorageError, UnsafeConfigurationError
from terminal import SCRIPT

KEY = bytes(range(32))  # a stand-in unlock key, easy to look for
STORE = "/home/someone/store.db"
HEADER = '{"salt":"c2FsdA=="}'


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[AgentCli]:
    yield from agent_cli(tmp_path)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory that `nobody` may enter (pytest's own are root's 0700): for tests where a
    process of another uid must reach a path. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="agent-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _forms(key: bytes) -> list[bytes]:
    """Ways a key could show up: raw, hex, base64."""
    return [key, key.hex().encode(), base64.b64encode(key)]


# ---- start, status, stop, forget --------------------------------------------------------------


def test_start_returns_once_it_listens_and_a_second_start_is_fine(cli: AgentCli) -> None:
    first = cli.ok("agent", "start")
    assert "agent started (pid" in first.stderr and "10m after their last use, at most 2h" in first.stderr
    pid = cli.agent_pid()  # answers at once: start returned once it listened
    cli.started.append(pid)
    again = cli.ok("agent", "start", "--ttl", "1m")
    assert f"agent already running (pid {pid})" in again.stderr
    assert cli.status()["ttl"] == 600.0 and cli.status()["max_ttl"] == 7200.0
    assert cli.status()["stores"] == []


def test_directory_socket_and_log_modes(cli: AgentCli) -> None:
    cli.start_agent()
    for path, mode, kind in (
        (cli.directory, 0o700, stat.S_ISDIR),
        (cli.socket, 0o600, stat.S_ISSOCK),
        (cli.log, 0o600, stat.S_ISREG),
    ):
        found = os.lstat(path)
        assert kind(found.st_mode), path
        assert stat.S_IMODE(found.st_mode) == mode, (path, oct(found.st_mode))
        assert found.st_uid == os.getuid()


def test_the_log_is_kept_under_1_mib_with_one_previous_file_at_the_start_and_while_it_runs(
    cli: AgentCli,
) -> None:
    """agent.log grew without limit in a runtime directory that is often a small tmpfs."""
    limit = 1024 * 1024  # the README's 1 MiB (agent_process.MAX_LOG_BYTES)
    cli.directory.mkdir(mode=0o700)
    full = b"2026-01-01T00:00:00+00:00 cached store=/old.db\n" * (limit // 47 + 1)
    assert len(full) > limit
    cli.log.write_bytes(full)
    cli.log.chmod(0o600)
    previous = cli.log.with_name("agent.log.1")
    previous.write_bytes(b"older still\n")
    previous.chmod(0o600)

    cli.start_agent()  # past the limit at the start: moved aside before the first line
    assert previous.read_bytes() == full  # the one before it is gone
    (started,) = cli.log.read_text().splitlines()
    assert " started pid=" in started

    cli.ok("agent", "stop")
    almost = b"x" * (limit - cli.log.stat().st_size - 10) + b"\n"
    with cli.log.open("ab") as log:
        log.write(almost)
    filled = cli.log.read_bytes()
    cli.start_agent()  # not past it at the start; its first line takes it past: moved aside then
    moved = previous.read_bytes()
    assert moved.startswith(filled) and len(moved) > limit and b" started pid=" in moved[len(filled) :]
    assert cli.log.read_bytes() == b""
    cli.ok("agent", "forget")  # the running agent writes to the new file
    (forgot,) = cli.log.read_text().splitlines()
    assert " forgot store=(all) keys=0" in forgot
    for path in (cli.log, previous):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path
    assert sorted(p.name for p in cli.directory.iterdir() if p.name.startswith("agent.log")) == [
        "agent.log",
        "agent.log.1",
    ]


def test_the_temporary_directory_is_used_without_xdg_runtime_dir(cli: AgentCli, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"XDG_RUNTIME_DIR": None, "TMPDIR": str(temp)}
    cli.start_agent(env=env)
    directory = temp / f"secrets-manager-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert stat.S_ISSOCK(os.lstat(directory / "agent.sock").st_mode)
    assert "agent stopped" in cli.ok("agent", "stop", env=env).stderr


def test_status_names_the_stores_and_the_time_left_and_never_the_key(cli: AgentCli) -> None:
    pid = cli.start_agent("--ttl", "5m", "--max-ttl", "1h")
    client = AgentClient(cli.socket)
    assert client.give(STORE, HEADER, KEY)
    assert client.find(STORE, HEADER) == KEY
    assert client.find(STORE, '{"salt":"b3RoZXI="}') is None  # another header (after a passwd)
    assert client.find("/elsewhere.db", HEADER) is None
    shown = cli.ok("agent", "status")
    assert f"agent running (pid {pid}) at {cli.socket}" in shown.out
    assert f"{STORE}: 5m left" in shown.out or f"{STORE}: 4m59s left" in shown.out, shown.out
    as_json = cli.ok("agent", "status", "--json").out
    assert cli.status()["stores"][0]["store"] == STORE  # type: ignore[index]
    seen = [
        shown.out.encode(),
        as_json.encode(),
        cli.log.read_bytes(),
        Path(f"/proc/{pid}/cmdline").read_bytes(),
        Path(f"/proc/{pid}/environ").read_bytes(),
    ]
    for form in _forms(KEY):
        assert not any(form in text for text in seen)
    assert Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:1] == [b"PATH=" + os.defpath.encode()]
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)} == {"/dev/null"}
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert next(line for line in limits.splitlines() if line.startswith("Max core")).split()[4] == "0"


def test_status_shows_a_store_name_with_control_characters_escaped(cli: AgentCli) -> None:
    """A store path with a newline or an escape sequence is one line of `status`, not raw
    terminal control (README: control characters are shown escaped, never raw)."""
    cli.start_agent()
    assert AgentClient(cli.socket).give("/tmp/a\x1b[2J\nb.db", HEADER, KEY)
    shown = cli.ok("agent", "status").out
    assert "\x1b" not in shown and "/tmp/a\\x1b[2J\\nb.db: " in shown, shown


def test_forget_drops_every_key_or_one_stores(cli: AgentCli) -> None:
    cli.start_agent()
    client = AgentClient(cli.socket)
    other = str(cli.tmp / "other.db")
    for store in (str(cli.store), other):
        assert client.give(store, HEADER, KEY)
    assert "forgot 1 key" in cli.ok("agent", "forget", "--store").stderr
    assert client.find(str(cli.store), HEADER) is None and client.find(other, HEADER) == KEY
    assert "forgot 1 key" in cli.ok("agent", "forget").stderr
    assert client.find(other, HEADER) is None
    assert "forgot" in cli.log.read_text()


def test_stop_wipes_and_ends_it_and_removes_its_socket(cli: AgentCli) -> None:
    pid = cli.start_agent()
    assert AgentClient(cli.socket).give(STORE, HEADER, KEY)
    assert f"agent stopped (pid {pid})" in cli.ok("agent", "stop").stderr
    assert wait_until_gone(pid)
    assert not cli.socket.exists()
    assert "no agent is running" in cli.ok("agent", "stop").stderr  # none: fine
    assert "no agent is running" in cli.ok("agent", "forget").stderr
    none = cli("agent", "status")
    assert none.code == 3 and "no agent is running" in none.stderr
    assert "stopped" in cli.log.read_text()
    restarted = cli.start_agent()  # and a new one starts where it was
    assert restarted != pid and AgentClient(cli.socket).find(STORE, HEADER) is None


def test_sigterm_ends_it_and_sighup_forgets_every_key(cli: AgentCli) -> None:
    pid = cli.start_agent()
    client = AgentClient(cli.socket)
    assert client.give(STORE, HEADER, KEY)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while client.find(STORE, HEADER) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.find(STORE, HEADER) is None and alive(pid)
    os.kill(pid, signal.SIGTERM)
    assert wait_until_gone(pid)
    assert not cli.socket.exists()


def test_a_socket_left_by_an_agent_that_was_killed_is_replaced(cli: AgentCli) -> None:
    pid = cli.start_agent()
    os.kill(pid, signal.SIGKILL)
    assert wait_until_gone(pid)
    assert cli.socket.exists()
    assert cli("agent", "status").code == 3
    assert cli.start_agent() != pid


@pytest.mark.parametrize("how", ["socket removed", "directory removed", "socket replaced"])
def test_an_agent_whose_socket_is_gone_wipes_its_keys_and_ends(cli: AgentCli, how: str) -> None:
    """No client can reach an agent whose socket was removed (its runtime directory went at logout,
    or `rm`) or replaced: it ends, its keys wiped, instead of holding them for nobody."""
    pid = cli.start_agent()
    assert AgentClient(cli.socket).give(STORE, HEADER, KEY)
    if how == "directory removed":
        shutil.rmtree(cli.directory)
    else:
        cli.socket.unlink()
        if how == "socket replaced":
            replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            replacement.bind(str(cli.socket))
    assert wait_until_gone(pid, 5.0)
    if how == "socket replaced":
        assert stat.S_ISSOCK(os.lstat(cli.socket).st_mode)  # the newer one is left in place
        replacement.close()
    if how == "socket removed":
        assert "socket gone" in cli.log.read_text()


def test_an_agent_whose_start_command_went_away_runs_on(cli: AgentCli) -> None:
    """`agent start` interrupted (Ctrl-C) before the new agent said it listens: the agent, in a
    session of its own, runs on instead of dying on the closed pipe and leaving a stale socket."""
    cli.directory.mkdir(mode=0o700)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the start command is gone
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "secrets_manager.agent",
            "--socket",
            str(cli.socket),
            "--log",
            str(cli.log),
            "--ttl",
            "60",
            "--max-ttl",
            "60",
            "--ready-fd",
            str(write_end),
        ],
        pass_fds=(write_end,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    cli.started.append(agent.pid)
    try:
        deadline = time.monotonic() + 10
        while not cli.socket.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert agent.poll() is None, agent.returncode
        assert AgentClient(cli.socket).give(STORE, HEADER, KEY)
    finally:
        agent.terminate()
        agent.wait(10)


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--ttl", "ten", "is not a duration"),
        ("--ttl", "0s", "more than 0"),
        ("--max-ttl", "200h", "at most 7 days"),
        ("--ttl", "3h", "must not be longer than --max-ttl"),
    ],
)
def test_a_bad_duration_is_invalid_input(cli: AgentCli, option: str, value: str, needle: str) -> None:
    result = cli("agent", "start", option, value)
    assert result.code == 2 and needle in result.stderr, result.stderr
    assert not cli.socket.exists()


# ---- clients that misbehave -------------------------------------------------------------------


def _connected(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: waits while the agent's backlog is full
    sock.settimeout(5)
    return sock


def _closed_by_the_agent(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with what we sent unread
        return True
    except TimeoutError:
        return False


def test_clients_that_send_nothing_or_a_byte_at_a_time_keep_no_one_waiting(cli: AgentCli) -> None:
    """The agent serves every connection at once: 80 idle clients (more than its listen backlog
    and its connection cap) and one sending a byte every half second delay no other request, and
    each is dropped at its deadline (2 s after it connected), not served on forever."""
    pid = cli.start_agent()
    idle = [_connected(cli.socket) for _ in range(80)]
    slow = _connected(cli.socket)
    slow.sendall(b"\0\0\0\x64")  # 100 bytes to come, one at a time
    client = AgentClient(cli.socket, timeout=1.0)
    began = time.monotonic()
    try:
        for _ in range(6):
            assert client.give(STORE, HEADER, KEY)
            assert client.find(STORE, HEADER) == KEY
            time.sleep(0.5)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                slow.sendall(b" ")
        assert time.monotonic() - began < 5
        assert _closed_by_the_agent(slow)
        assert all(_closed_by_the_agent(sock) for sock in idle[-10:])
    finally:
        for sock in (*idle, slow):
            sock.close()
    assert alive(pid) and client.find(STORE, HEADER) == KEY


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"\xff\xff\xff\xff", "too large"),
        (b"\0\0\0\x05hello", "JSONDecodeError"),
        (b"\0\0\0\x02[]", "bad request"),
        (b"\0\0\0\x03\xff\xfe\xfd", "UnicodeDecodeError"),
        (len(b"[" * 60000).to_bytes(4, "big") + b"[" * 60000, "RecursionError"),
        (b'\0\0\0\x0c{"op":"get"}', "KeyError"),
    ],
)
def test_garbage_gets_an_error_answer_and_the_agent_serves_on(cli: AgentCli, sent: bytes, error: str) -> None:
    pid = cli.start_agent()
    client = AgentClient(cli.socket)
    assert client.give(STORE, HEADER, KEY)
    with _connected(cli.socket) as sock:
        sock.sendall(sent)
        answer = receive_message(sock)
    assert answer["ok"] is False and error in answer["error"], answer
    with _connected(cli.socket) as sock:
        sock.sendall(b"\0\0")  # half a length, then gone
    for _ in range(5):
        with _connected(cli.socket) as sock:
            send_message(sock, {"op": "status"})  # then gone before the answer
    assert alive(pid) and client.find(STORE, HEADER) == KEY
    assert " error " not in cli.log.read_text()  # a client that went is nothing to log


def test_a_connection_in_the_agent_shows_no_key_in_its_repr() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sent = base64.b64encode(KEY)
        connection = agent_process._Connection(sock, 0.0, received=sent, answer=sent)
        assert sent.decode() not in repr(connection) and str(sent) not in repr(connection)


def test_a_store_name_cannot_forge_a_line_of_the_log(cli: AgentCli) -> None:
    cli.start_agent()
    forged = "/x.db\n2026-01-01T00:00:00+00:00 stopped pid=1"
    AgentClient(cli.socket).request({"op": "forget", "store": forged})
    lines = cli.log.read_text().splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines), lines
    assert any("forgot store=" in line and "\\n2026-01-01" in line for line in lines), lines


def test_a_max_ttl_shorter_than_the_default_ttl_shortens_it(cli: AgentCli) -> None:
    """`agent start --max-ttl 5m` (no --ttl): keys kept 5m at most, not refused for a --ttl that
    was never given."""
    cli.start_agent("--max-ttl", "5m")
    assert cli.status()["ttl"] == 300.0 and cli.status()["max_ttl"] == 300.0
    cli.ok("agent", "stop")
    result = cli("agent", "start", "--ttl", "6m", "--max-ttl", "5m")  # given: still refused
    assert result.code == 2 and "--ttl must not be longer than --max-ttl" in result.stderr


# ---- expiry (the cache itself, on a clock of the test's) ---------------------------------------


def test_a_key_expires_ttl_after_its_last_use_and_max_ttl_after_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(agent_process, "now", lambda: clock[0])
    cache = agent_process.KeyCache(ttl=10, max_ttl=25)
    cache.put(STORE, HEADER, KEY)
    for _ in range(2):  # used every 9 s: kept past the ttl...
        clock[0] += 9
        assert cache.get(STORE, HEADER) == KEY
    clock[0] += 6.9  # 24.9 s after it was given
    assert cache.get(STORE, HEADER) == KEY
    clock[0] += 0.2  # ...but not past max_ttl, used or not
    assert cache.get(STORE, HEADER) is None
    cache.put(STORE, HEADER, KEY)
    clock[0] += 9.9
    assert [entry["store"] for entry in cache.listing()] == [STORE]
    clock[0] += 0.1  # not used for ttl: gone from the listing (`status`) at once, swept or not
    assert cache.listing() == []
    cache.put(STORE, HEADER, KEY)
    clock[0] += 10
    assert cache.expired() == [STORE]
    assert cache.get(STORE, HEADER) is None
    assert bytes(cache._page) == bytes(len(cache._page))  # zeroed, not just dropped


def test_a_real_agent_forgets_a_key_after_its_ttl(cli: AgentCli) -> None:
    cli.start_agent("--ttl", "1s")
    client = AgentClient(cli.socket)
    assert client.give(STORE, HEADER, KEY)
    assert client.find(STORE, HEADER) == KEY
    # Expired after 1 s, the sweep (at least every 0.5 s) logs it: by 1.5 s, or later on a loaded
    # machine (it was looked for at 1.6 s). A find meanwhile would drop it unlogged, so none is made.
    deadline = time.monotonic() + 10
    while "expired store=" not in cli.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "expired store=" in cli.log.read_text()
    assert client.find(STORE, HEADER) is None


def test_a_new_header_for_a_store_replaces_its_old_key(cli: AgentCli) -> None:
    cli.start_agent()
    client = AgentClient(cli.socket)
    assert client.give(STORE, HEADER, KEY)
    assert client.give(STORE, "new header", bytes(32))
    assert client.find(STORE, HEADER) is None
    assert len(cli.status()["stores"]) == 1  # type: ignore[arg-type]


# ---- guard rails --------------------------------------------------------------------------------


def test_production_refuses_to_start_an_agent(cli: AgentCli) -> None:
    result = cli("agent", "start", env={"SHRIVENQUANT_ENV": "production"})
    assert result.code == 2 and "refused in production" in result.stderr
    assert not cli.directory.exists()


def test_a_directory_that_is_a_symlink_or_not_0700_is_refused(cli: AgentCli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cli.directory.symlink_to(elsewhere)
    result = cli("agent", "start")
    assert result.code == 2 and "is a symbolic link" in result.stderr, result.stderr
    assert list(elsewhere.iterdir()) == []
    cli.directory.unlink()
    cli.directory.mkdir(mode=0o755)
    cli.directory.chmod(0o755)
    result = cli("agent", "start")
    assert result.code == 2 and "has mode 0755, not 0700" in result.stderr, result.stderr
    assert not cli.socket.exists()
    cli.directory.chmod(0o700)
    cli.socket.write_text("not a socket")
    result = cli("agent", "start")
    assert result.code == 2 and "is not the agent's socket" in result.stderr, result.stderr


def test_a_directory_of_another_user_is_refused(cli: AgentCli) -> None:
    require_root("only root can give a directory to another user")
    cli.directory.mkdir(mode=0o700)
    os.chown(cli.directory, pwd.getpwnam("nobody").pw_uid, -1)
    result = cli("agent", "start")
    assert result.code == 2 and "belongs to nobody, not to you" in result.stderr, result.stderr
    assert not cli.socket.exists()


def _as_nobody(action: str, path: str) -> int:
    """In a child turned into `nobody`: 0 if `action` ("connect": a ping to the agent socket at
    `path` is answered; "mem": /proc/PID/mem at `path` opens), 1 if the file system refused it
    (EACCES), 3 if the connection was made and then closed unanswered, 2 for anything else."""
    nobody = pwd.getpwnam("nobody")
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        code = 2
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            if action == "connect":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(path)
                    send_message(sock, {"op": "ping"})
                    receive_message(sock)
            else:
                with open(path, "rb") as mem:
                    mem.read(1)
            code = 0
        except PermissionError:
            code = 1
        except (EOFError, ConnectionResetError, BrokenPipeError):
            code = 3
        except OSError as exc:
            code = 0 if action == "mem" and exc.errno == 5 else 2  # EIO: opened, address 0 unmapped
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_connection_from_another_user_is_refused_and_logged(open_tmp: Path) -> None:
    """The modes keep another user out; with them loosened, the agent's SO_PEERCRED check does."""
    require_root("a client of another uid needs setuid")
    for cli in agent_cli(open_tmp):
        _refused_and_logged(cli)


def _refused_and_logged(cli: AgentCli) -> None:
    cli.start_agent()
    assert _as_nobody("connect", str(cli.socket)) == 1  # 0700 directory, 0600 socket
    assert "refused" not in cli.log.read_text()
    Path(cli.env["XDG_RUNTIME_DIR"]).chmod(0o711)
    cli.directory.chmod(0o711)
    cli.socket.chmod(0o666)
    try:
        assert _as_nobody("connect", str(cli.socket)) == 3  # connected, and closed unanswered
    finally:
        cli.directory.chmod(0o700)
        cli.socket.chmod(0o600)
    assert f"refused uid={pwd.getpwnam('nobody').pw_uid}" in cli.log.read_text()
    assert AgentClient(cli.socket).give(STORE, HEADER, KEY)  # we still are served


def test_a_socket_another_user_owns_is_not_taken_for_the_agents(tmp_path: Path) -> None:
    """check_socket, before any connection: a socket at the agent's path is the agent's only if
    it is ours. With its owner check removed (mutant) every test passed, the client's SO_PEERCRED
    check refusing such a socket's listener later; this is the check before it, which says what
    the file is and never connects to it."""
    require_root("only root can give a socket to another user")
    directory = tmp_path / "agent"
    directory.mkdir(mode=0o700)
    path = directory / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        assert check_socket(path) is True
        os.chown(path, pwd.getpwnam("nobody").pw_uid, -1, follow_symlinks=False)
        with pytest.raises(UnsafeConfigurationError, match="is not the agent's socket"):
            check_socket(path)
    finally:
        listener.close()


def test_the_client_talks_only_to_an_agent_of_its_own_uid(cli: AgentCli, open_tmp: Path) -> None:
    """A socket file that looks ours (our directory, our owner) with a process of another uid
    behind it is not given a key: the client checks SO_PEERCRED too."""
    require_root("a listener of another uid needs setuid")
    nobody = pwd.getpwnam("nobody")
    theirs = open_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child: a one-connection listener as nobody)
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(theirs / "agent.sock"))
            listener.listen(1)
            os.write(ready_write, b"ok")
            listener.settimeout(30)
            connection, _ = listener.accept()
            receive_message(connection)
            send_message(connection, {"ok": True, "pid": os.getpid(), "key": None})
        finally:
            os._exit(0)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 2) == b"ok"
        cli.directory.mkdir(mode=0o700)
        os.rename(theirs / "agent.sock", cli.socket)
        os.chown(cli.socket, os.getuid(), os.getgid(), follow_symlinks=False)
        with pytest.raises(UnsafeConfigurationError, match="runs as nobody, not as you"):
            AgentClient(cli.socket).request({"op": "ping"})
        assert AgentClient(cli.socket).give(STORE, HEADER, KEY) is False
    finally:
        os.close(ready_read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _mem_opens(pid: int) -> bool:
    """Whether a process of our uid without any capability (as root: one that dropped them all,
    CAP_SYS_PTRACE among them) can open /proc/PID/mem."""
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        code = 2
        try:
            if os.geteuid() == 0:
                _drop_all_capabilities()
            with open(f"/proc/{pid}/mem", "rb"):
                code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), code
    return code == 0


def _drop_all_capabilities() -> None:
    """capset(2) with every set empty: this process stays uid 0 but is no longer privileged."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two of {effective, permitted, inheritable}, all zero
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _unprivileged_children() -> None:
    """preexec_fn: an empty capability bounding set, so what this child runs (as root too) and
    everything it starts have no capability at all."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for capability in range(64):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last one


def test_the_agents_memory_cannot_be_read_by_another_process_of_its_user(cli: AgentCli) -> None:
    """Not dumpable: /proc/PID/mem (and ptrace) is refused to other processes of the same uid,
    where the same reader opens a plain process's. Root may read any process's, so as root every
    process here runs without capabilities (an empty bounding set): the agent is refused to the
    reader by its dumpable flag alone, not because the reader has fewer capabilities than it."""
    unprivileged = _unprivileged_children if os.geteuid() == 0 else None
    started = subprocess.run(
        [str(SCRIPT), "agent", "start"],
        env=cli.full_env(),
        capture_output=True,
        timeout=60,
        preexec_fn=unprivileged,
    )
    assert started.returncode == 0, started.stderr
    pid = cli.agent_pid()
    cli.started.append(pid)
    control = subprocess.Popen(["sleep", "30"], preexec_fn=unprivileged)
    try:
        if os.geteuid() == 0:
            assert "CapPrm:\t0000000000000000" in Path(f"/proc/{pid}/status").read_text()
        assert _mem_opens(control.pid)
        assert not _mem_opens(pid)
    finally:
        control.kill()
        control.wait()


def test_each_agent_command_has_help(cli: AgentCli) -> None:
    shown = cli.ok("agent", "--help").out
    for needle in ("once per session", "never the password", "agent start", "production"):
        assert needle in shown, shown
    for command, needle in (
        ("start", "--max-ttl"),
        ("status", "never a key"),
        ("forget", "--store"),
        ("stop", "wiped"),
    ):
        assert needle in cli.ok("agent", command, "--help").out


def test_an_agent_that_does_not_answer_is_named_with_its_pid_and_how_to_end_it(cli: AgentCli) -> None:
    """`agent status`, `start` and `stop` on an agent that accepts and never answers (stopped,
    hung): one line saying so, with the pid to end it (the user has no other way to find it)."""
    cli.directory.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(cli.socket))
        listener.listen(8)
        for command in ("status", "start", "stop"):
            result = cli("agent", command)
            assert result.code == 1, (command, result.stderr)
            assert f"(pid {os.getpid()}) did not answer" in result.stderr, result.stderr
            assert f"end it with 'kill {os.getpid()}'" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1


def test_starts_at_once_over_a_stale_socket_make_one_agent(cli: AgentCli) -> None:
    """Four `agent start` at once, over the socket a SIGKILLed agent left: one agent starts (the
    lock in the directory), the others find it running; all say its pid."""
    dead = cli.start_agent()
    os.kill(dead, signal.SIGKILL)
    assert wait_until_gone(dead)
    starts = [
        subprocess.Popen([str(SCRIPT), "agent", "start"], env=cli.full_env(), stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    said = []
    for start in starts:
        _, err = start.communicate(timeout=60)
        assert start.returncode == 0, err
        said.append(err.decode())
    pid = cli.agent_pid()
    cli.started.append(pid)
    assert pid != dead
    assert sum("agent started" in text for text in said) == 1, said
    assert all(f"(pid {pid})" in text for text in said), said


def test_a_start_waits_for_a_stuck_start_a_limited_time(
    cli: AgentCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another `agent start` holding the start lock and never letting go (stopped with Ctrl-Z):
    this one gives up with a one-line error after LOCK_WAIT instead of waiting for ever."""
    monkeypatch.setattr(agent_module, "LOCK_WAIT", 0.5, raising=False)
    cli.directory.mkdir(mode=0o700)
    held = os.open(cli.directory / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    outcome: list[BaseException | tuple[int, bool]] = []

    def start() -> None:
        try:
            outcome.append(agent_module.start_agent(cli.full_env(), 600.0, 7200.0))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(5)
    gave_up = not thread.is_alive()
    os.close(held)  # (the old code then goes on to start an agent: stopped below)
    thread.join(30)
    for result in outcome:
        if isinstance(result, tuple):
            cli.started.append(result[0])
    assert gave_up
    assert isinstance(outcome[0], StorageError) and "(is it stopped?)" in str(outcome[0]), outcome
