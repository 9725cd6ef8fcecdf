"""The CLI asks the unlock agent before it would prompt for the master password (real processes:
an agent started with the console script, commands on a pty where they would prompt)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_fixtures import PASSWORD, AgentCli, agent_cli, wait_until_gone
from secrets_manager.agent import AgentClient
from secrets_manager.cli.session import Session
from secrets_manager.crypto.kdf import KdfParams, derive_unlock_key
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store.unlock import unlock_key_header

TYPED = PASSWORD.encode() + b"\r"
NEW_PASSWORD = "the new agent test password"
PROMPT = "Master password:"
NO_PASSWORD = "no master password"


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[AgentCli]:
    for made in agent_cli(tmp_path):
        made.with_password("init", "--kdf-profile", "test")
        made.with_password("store", "svc/API_KEY", input=b"sk-live-ONE")
        yield made


def _header(cli: AgentCli) -> dict[str, object]:
    """The store header's unlock section."""
    storage = SqliteStorage(cli.store)
    try:
        entry = storage.get("core/header")
    finally:
        storage.close()
    assert entry is not None
    return dict(json.loads(entry.value)["unlock"])


def _unlock_key(cli: AgentCli, password: str = PASSWORD) -> bytes:
    kdf = _header(cli)["kdf"]
    assert isinstance(kdf, dict)
    params = KdfParams(
        time_cost=kdf["time_cost"],
        memory_cost_kib=kdf["memory_cost_kib"],
        parallelism=kdf["parallelism"],
        salt=base64.b64decode(kdf["salt"]),
        version=kdf["version"],
    )
    return derive_unlock_key(password.encode(), params)


def _denied(cli: AgentCli) -> list[dict[str, object]]:
    return [r for r in cli.audit() if r["decision"] == "deny"]


def _prompted_get(cli: AgentCli, name: str = "svc/API_KEY", typed: bytes = TYPED) -> str:
    code, out = cli.typed(typed, "get", name)
    assert code == 0, out
    assert PROMPT in out, out
    return out


def test_one_prompt_then_commands_in_new_processes_need_no_password(cli: AgentCli) -> None:
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr  # no agent: nothing to unlock with
    cli.start_agent()
    before = len(cli.audit())
    assert "sk-live-ONE" in _prompted_get(cli)
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-ONE\n"  # no terminal, no password source
    assert cli.ok("list").out == "svc/API_KEY\n"
    cli.ok("store", "svc/DB", input=b"db-pass-TWO")
    assert cli.ok("get", "svc/DB").out == "db-pass-TWO\n"
    code, out = cli.typed(TYPED, "get", "svc/DB")  # on a terminal: not asked either
    assert code == 0 and PROMPT not in out and "db-pass-TWO" in out, out
    stores = cli.status()["stores"]
    assert isinstance(stores, list) and [s["store"] for s in stores] == [str(cli.store)]
    unlocks = [r for r in cli.audit()[before:] if r["operation"] == "unlock"]
    assert len(unlocks) == 6 and all(r["decision"] == "allow" for r in unlocks)  # audited as ever


def test_a_password_source_given_is_used_and_the_agent_is_not(cli: AgentCli, tmp_path: Path) -> None:
    cli.start_agent()
    _prompted_get(cli)
    wrong = {"MASTER_PASSWORD": "not the password"}
    result = cli("get", "svc/API_KEY", env=wrong)
    assert result.code == 4 and "wrong master password" in result.stderr
    (tmp_path / "pw").write_text("not the password either")
    result = cli("--password-file", str(tmp_path / "pw"), "get", "svc/API_KEY")
    assert result.code == 4 and "wrong master password" in result.stderr


def test_a_key_expires_ttl_after_its_last_use(cli: AgentCli) -> None:
    cli.start_agent("--ttl", "1s")
    _prompted_get(cli)
    time.sleep(1.6)
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr
    _prompted_get(cli)  # asked again, and kept again


def test_a_key_expires_max_ttl_after_it_was_given_even_when_used(cli: AgentCli) -> None:
    cli.start_agent("--ttl", "2s", "--max-ttl", "4s")
    _prompted_get(cli)
    given = time.monotonic()  # the agent was given the key before this
    # Used as the CLI uses it (find), from here: a CLI process can take over 2 s to start on a
    # loaded machine, which would let the 2 s ttl run out between uses.
    agent, header = AgentClient(cli.socket), unlock_key_header(_header(cli))
    key = agent.find(str(cli.store), header)
    assert key is not None
    uses = 0
    while time.monotonic() - given < 3.0:  # used well within the ttl each time
        kept = agent.find(str(cli.store), header) == key  # (not the key itself in a failure)
        assert kept
        uses += 1
        time.sleep(0.3)
    # Last used 2.7 s or more after it was given: the ttl alone would keep it past 4.7 s.
    time.sleep(max(0.0, 4.3 - (time.monotonic() - given)))
    assert uses >= 2
    kept = agent.find(str(cli.store), header) is not None
    assert not kept
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr


def test_after_passwd_the_old_key_is_not_used_and_the_new_password_is_asked_for(
    cli: AgentCli, tmp_path: Path
) -> None:
    cli.start_agent()
    _prompted_get(cli)
    (tmp_path / "new").write_text(NEW_PASSWORD)
    cli.with_password("passwd", "--new-password-file", str(tmp_path / "new"))
    denied = len(_denied(cli))
    code, out = cli.typed(PASSWORD.encode() + b"\r", "get", "svc/API_KEY")  # the old one: refused
    assert code == 4 and PROMPT in out and "wrong master password" in out, out
    assert len(_denied(cli)) == denied + 1  # the typed password's refusal, audited as ever
    assert "sk-live-ONE" in _prompted_get(cli, typed=NEW_PASSWORD.encode() + b"\r")
    assert len(_denied(cli)) == denied + 1
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-ONE\n"  # the new key is kept


def test_a_kept_key_that_no_longer_opens_the_store_falls_back_to_the_prompt_unaudited(
    cli: AgentCli,
) -> None:
    cli.start_agent()
    client = AgentClient(cli.socket)
    assert client.give(str(cli.store), unlock_key_header(_header(cli)), bytes(32))  # for this header
    before = cli.audit()
    assert "sk-live-ONE" in _prompted_get(cli)
    after = cli.audit()[len(before) :]
    assert [r["operation"] for r in after] == ["unlock", "get"]
    assert all(r["decision"] == "allow" for r in after)
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-ONE\n"  # replaced by the right key


@pytest.mark.parametrize(
    "args",
    [
        ["passwd", "--new-password-file", "NEW"],
        ["unlock-with", "password", "--new-password-file", "NEW"],
        ["keys", "status"],
        ["keys", "rotate", "--root"],
        ["recovery", "status"],
        ["backup", "BACKUP"],
    ],
)
def test_commands_that_need_the_password_itself_still_ask_for_it(
    cli: AgentCli, tmp_path: Path, args: list[str]
) -> None:
    (tmp_path / "new").write_text(NEW_PASSWORD)
    args = [{"NEW": str(tmp_path / "new"), "BACKUP": str(tmp_path / "b.smbackup")}.get(a, a) for a in args]
    cli.start_agent()
    _prompted_get(cli)
    result = cli(*args)
    assert result.code == 4 and NO_PASSWORD in result.stderr, result.stderr
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-ONE\n"  # the agent has the key all the same


def test_production_ignores_a_running_agent(cli: AgentCli) -> None:
    cli.start_agent()
    _prompted_get(cli)
    code, out = cli.typed(b"\x04", "get", "svc/API_KEY", env={"SHRIVENQUANT_ENV": "production"})
    assert code == 4 and PROMPT in out, out  # asked on the terminal although the agent has the key
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-ONE\n"


def test_forget_and_stop_make_the_next_command_ask_again(cli: AgentCli) -> None:
    pid = cli.start_agent()
    _prompted_get(cli)
    cli.ok("agent", "forget")
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr
    _prompted_get(cli)
    cli.ok("agent", "forget", "--store")
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr
    _prompted_get(cli)
    cli.ok("agent", "stop")
    assert wait_until_gone(pid)
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr
    _prompted_get(cli)  # no agent: the prompt, as without one


def test_the_key_never_shows_in_argv_environment_logs_or_status(cli: AgentCli) -> None:
    pid = cli.start_agent()
    out = _prompted_get(cli)
    outputs = [out, cli.ok("get", "svc/API_KEY").out, cli.ok("agent", "status").out]
    outputs.append(cli.ok("agent", "status", "--json").out)
    key = _unlock_key(cli)
    assert AgentClient(cli.socket).find(str(cli.store), unlock_key_header(_header(cli))) == key
    seen = [
        *(text.encode() for text in outputs),
        cli.log.read_bytes(),
        cli.store.with_name("store.audit.jsonl").read_bytes(),
        Path(f"/proc/{pid}/cmdline").read_bytes(),
        Path(f"/proc/{pid}/environ").read_bytes(),
        json.dumps(cli.env).encode(),
    ]
    for form in (key, key.hex().encode(), base64.b64encode(key), PASSWORD.encode()):
        assert not any(form in text for text in seen)


def test_an_agent_directory_that_is_not_safely_ours_is_said_and_not_used(cli: AgentCli) -> None:
    cli.start_agent()
    _prompted_get(cli)
    cli.directory.chmod(0o755)
    try:
        code, out = cli.typed(TYPED, "get", "svc/API_KEY")
    finally:
        cli.directory.chmod(0o700)
    assert code == 0 and PROMPT in out and "sk-live-ONE" in out, out
    assert "has mode 0755, not 0700" in out and "the agent was not asked" in out, out
    missing = cli("get", "svc/API_KEY", env={"XDG_RUNTIME_DIR": "/nonexistent/run"})
    assert missing.code == 4 and NO_PASSWORD in missing.stderr  # no such directory: no agent


def test_forget_store_finds_the_key_however_the_store_is_spelled(cli: AgentCli) -> None:
    """A store named by a relative-looking path with `..`, through a symbolic link or as a
    sqlite:/// URL is the one the key was kept for: one entry in `status`, and `forget --store`
    drops it whichever spelling it is given."""
    (cli.tmp / "link").symlink_to(cli.store.parent)
    spellings = [
        str(cli.store.parent / ".." / "vault" / "store.db"),
        str(cli.tmp / "link" / "store.db"),
        f"sqlite://{cli.store}",
    ]
    cli.start_agent()
    for spelling in spellings:
        env = {"SECRETS_MANAGER_STORE": spelling}
        _prompted_get(cli)  # kept under the plain path
        assert cli.ok("get", "svc/API_KEY", env=env).out == "sk-live-ONE\n"  # found under this one
        stores = cli.status()["stores"]
        assert isinstance(stores, list) and [s["store"] for s in stores] == [str(cli.store)]
        assert "forgot 1 key" in cli.ok("agent", "forget", "--store", env=env).stderr, spelling
        assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@DB.example:5432/secrets",
        "postgres://app@db.example/secrets",
        "postgresql://app:hunter2@db.example/secrets?max_connections=4",
        "postgresql://app@db.example/secrets?schema=secrets_manager&sslmode=require",
    ],
)
def test_a_postgresql_store_has_one_name_for_the_agent_whatever_its_url(url: str) -> None:
    session = Session(url, None, None, {})
    assert session.agent_store_name() == "postgresql://app@db.example/secrets"
    assert Session("postgresql://app@db.example:5433/secrets", None, None, {}).agent_store_name() != (
        session.agent_store_name()
    )


@pytest.mark.parametrize(
    "args",
    [
        ["passwd", "--new-password-file", "NEW"],
        ["unlock-with", "password", "--new-password-file", "NEW"],
        ["keys", "rotate", "--root"],
    ],
)
def test_a_new_password_wrapping_makes_the_agent_forget_the_old_key_at_once(
    cli: AgentCli, tmp_path: Path, args: list[str]
) -> None:
    """As with pass and gpg-agent: after `passwd` (or another command that rewraps the root key
    under the password) the agent holds no key of the store, not the old one until its ttl (which
    still opens old copies of the store); another store's key stays."""
    (tmp_path / "new").write_text(NEW_PASSWORD)
    args = [{"NEW": str(tmp_path / "new")}.get(a, a) for a in args]
    cli.start_agent()
    _prompted_get(cli)
    old_key = _unlock_key(cli)
    other = AgentClient(cli.socket)
    assert other.give("/elsewhere/store.db", "header", bytes(32))
    result = cli.with_password(*args)
    assert "the agent forgot this store's old unlock key" in result.stderr, result.stderr
    stores = cli.status()["stores"]
    assert isinstance(stores, list) and [s["store"] for s in stores] == ["/elsewhere/store.db"]
    assert f"forgot store={cli.store} keys=1" in cli.log.read_text()
    assert old_key not in cli.log.read_bytes() and base64.b64encode(old_key).decode() not in result.stderr
    new_password = NEW_PASSWORD if args[0] != "keys" else PASSWORD
    assert "sk-live-ONE" in _prompted_get(cli, typed=new_password.encode() + b"\r")


def test_passwd_without_an_agent_or_with_a_stale_socket_is_fine(cli: AgentCli, tmp_path: Path) -> None:
    (tmp_path / "new").write_text(NEW_PASSWORD)
    result = cli.with_password("passwd", "--new-password-file", str(tmp_path / "new"))
    assert "agent" not in result.stderr, result.stderr
    pid = cli.start_agent()
    os.kill(pid, signal.SIGKILL)
    assert wait_until_gone(pid)
    result = cli.ok(
        "passwd", "--new-password-file", str(tmp_path / "new"), env={"MASTER_PASSWORD": NEW_PASSWORD}
    )
    assert "agent" not in result.stderr, result.stderr


def test_an_agent_that_does_not_answer_means_the_prompt_after_one_wait(cli: AgentCli) -> None:
    """A listener at the agent's socket that accepts and never answers (an agent stopped with
    SIGSTOP, or hung): the command prompts after one request's timeout, and does not then wait
    again to give it the key."""
    cli.directory.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(cli.socket))
    listener.listen(8)
    try:
        assert "sk-live-ONE" in _prompted_get(cli)
        listener.setblocking(False)
        accepted = []
        with contextlib.suppress(BlockingIOError):
            while True:
                accepted.append(listener.accept()[0])
        assert len(accepted) == 1  # asked once (find), not given the key after the prompt
        for sock in accepted:
            sock.close()
    finally:
        listener.close()


def test_an_agent_killed_meanwhile_means_the_prompt(cli: AgentCli) -> None:
    """The agent SIGKILLed after it was given the key (its socket left behind): the next command
    prompts, says nothing about the agent, and exits 0; `agent start` then replaces the socket."""
    pid = cli.start_agent()
    _prompted_get(cli)
    os.kill(pid, signal.SIGKILL)
    assert wait_until_gone(pid)
    assert cli.socket.exists()
    out = _prompted_get(cli)
    assert "agent" not in out and "Traceback" not in out, out
    assert NO_PASSWORD in cli("get", "svc/API_KEY").stderr
    cli.start_agent()
    assert "sk-live-ONE" in _prompted_get(cli)
    assert cli.ok("get", "svc/API_KEY").out == "sk-live-ONE\n"


def test_recovery_unlock_with_password_makes_the_agent_forget_the_old_key(
    cli: AgentCli, tmp_path: Path
) -> None:
    (tmp_path / "new").write_text(NEW_PASSWORD)
    cli.with_password(
        "recovery", "init", "--shares", "1", "--threshold", "1", "--out-dir", str(tmp_path / "shares")
    )
    (share,) = (tmp_path / "shares").iterdir()
    cli.start_agent()
    _prompted_get(cli)
    result = cli.ok(
        "recovery",
        "unlock-with",
        "password",
        "--share-file",
        str(share),
        "--new-password-file",
        str(tmp_path / "new"),
    )
    assert "the agent forgot this store's old unlock key" in result.stderr, result.stderr
    assert cli.status()["stores"] == []
    assert "sk-live-ONE" in _prompted_get(cli, typed=NEW_PASSWORD.encode() + b"\r")


def test_start_quiet_says_nothing_for_a_shell_profile_but_still_starts_one_agent(cli: AgentCli) -> None:
    first = cli.ok("agent", "start", "--quiet")
    assert first.stderr == "" and first.out == ""
    pid = cli.agent_pid()
    cli.started.append(pid)
    again = cli.ok("agent", "start", "-q")  # the next shell: the same agent, still nothing said
    assert again.stderr == "" and cli.agent_pid() == pid
    refused = cli("agent", "start", "--quiet", env={"SHRIVENQUANT_ENV": "production"})
    assert refused.code == 2 and "refused in production" in refused.stderr  # a failure is still said
