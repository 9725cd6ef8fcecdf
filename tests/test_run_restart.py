"""`secrets-manager run --restart-on-change`: the program is started again with the new values when
one of its secrets changes, on a local store, through a service and on an AWS store. Real
processes throughout: the CLI, the program (tests/run_child.py's CHILD), `serve`, moto's server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest

from secrets_manager.cli.run_supervisor import RESYNC, Launch, Supervisor, WatchSource
from secrets_manager.errors import StorageError
from secrets_manager.store import Secret
from secrets_manager.values import SecretValue
from service_fixtures import PASSWORD as SERVICE_PASSWORD
from service_fixtures import SEED, make_pki, make_store, start_server, tls_files
from tcp_proxy import AnswersStop
from test_run_command import aws_variables, through_service
from test_serve_external_stores import (  # noqa: F401 (fixtures)
    Backend,
    make_backend,
    serve,
    service_dir,
)

if TYPE_CHECKING:
    from conftest import MadeOnce

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "run-restart-test-password"
# The program: logs each start (pid and its KEY/DB_PASSWORD/NEW variables) and each signal to the
# file in $CHILD_LOG, one JSON line each; exits 0 on SIGTERM (unless told to ignore it), 7 once the
# file $CHILD_LOG.exit exists.
CHILD = r"""
import json, os, signal, sys, time
log = os.environ["CHILD_LOG"]
def note(**fields):
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")
def on_signal(signum, frame):
    note(signal=signal.Signals(signum).name)
    if signum == signal.SIGTERM and "--ignore-term" not in sys.argv:
        sys.exit(0)
with open(log + ".sighup", "w") as f:  # how it found SIGHUP: "ignored" after nohup
    json.dump("ignored" if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else "default", f)
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, on_signal)
note(started={k: os.environ.get(k) for k in ("KEY", "DB_PASSWORD", "JWT_KEY", "NEW")})
while not os.path.exists(log + ".exit"):
    time.sleep(0.05)
sys.exit(7)
"""


def _dispositions(ignored: tuple[signal.Signals, ...]) -> None:
    """In the new run process: the signals it passes on at their defaults, as a shell at a terminal
    starts a command (a test suite started in the background, `cmd &` in a script, inherits SIGINT
    and SIGQUIT ignored, which run keeps ignored), less `ignored` (as nohup leaves SIGHUP)."""
    for signum in (
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGTERM,
        signal.SIGUSR1,
        signal.SIGUSR2,
    ):
        signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)


class OneChange:
    """A change source for a Supervisor: once `before()` returns, one RESYNC, then nothing."""

    def __init__(self, before: Callable[[], object]) -> None:
        self._before = before

    def follow(self, changed: Callable[[Any], None], stop: Any) -> None:
        self._before()
        changed(RESYNC)
        stop.wait()

    def cancel(self) -> None:
        pass


class Run:
    """One `run --restart-on-change … -- python CHILD` in the background, and what its program logged."""

    def __init__(
        self,
        home: Path,
        env: Mapping[str, str],
        *args: str,
        child_args: tuple[str, ...] = (),
        ignored: tuple[signal.Signals, ...] = (),
    ) -> None:
        self.log = home / f"child-{secrets.token_hex(3)}.jsonl"
        self.stderr_path = home / "run.stderr"
        (home / "child.py").write_text(CHILD)
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [
                str(SCRIPT),
                "run",
                "--restart-on-change",
                *args,
                "--",
                sys.executable,
                str(home / "child.py"),
                *child_args,
            ],
            env={**env, "CHILD_LOG": str(self.log)},
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
            preexec_fn=lambda: _dispositions(ignored),
        )

    def lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def starts(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if "started" in line]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"run ended ({self.proc.returncode}) waiting for {what}: {self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s: {self.lines()} {self.stderr()}")
            time.sleep(0.05)

    def wait_for_starts(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        self.wait_for(lambda: len(self.starts()) >= count, f"start number {count}", timeout)
        return self.starts()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def end(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self._stderr.close()
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Clean-up after a failed test: run and every program it started."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for line in self.starts():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(line["pid"], signal.SIGKILL)
        self._stderr.close()


def store_in_served_store(directory: Path, name: str, value: str) -> None:
    """A `store` by the CLI on the store file a test service serves (it reaches the service, and
    its watchers, by the store's change feed)."""
    local = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "MASTER_PASSWORD": SERVICE_PASSWORD,
    }
    stored = subprocess.run(
        [str(SCRIPT), "--store", str(directory / "store.db"), "store", name],
        input=value, capture_output=True, text=True, env=local, timeout=60,
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "SECRETS_MANAGER_STORE": str(home / "store.db"),
            "MASTER_PASSWORD": PASSWORD,
        }

    def __call__(self, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            input=input.decode(),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def store(self, name: str, value: str) -> None:
        result = self("store", name, input=value.encode())
        assert result.returncode == 0, result.stderr

    def start(
        self, *args: str, child_args: tuple[str, ...] = (), ignored: tuple[signal.Signals, ...] = ()
    ) -> Run:
        return Run(self.home, self.env, *args, child_args=child_args, ignored=ignored)

    def run_records(self) -> list[dict[str, Any]]:
        lines = (self.home / "store.audit.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["operation"] == "run"]


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A store holding app/KEY and other/KEY, made by the CLI (once per worker, then copied)."""

    def make(home: Path) -> None:
        cli = Cli(home)
        assert cli("init", "--kdf-profile", "test").returncode == 0
        cli.store("app/KEY", "first-SEEKRIT")
        cli.store("other/KEY", "unrelated-SEEKRIT")

    made_once("test_run_restart cli", make, tmp_path)
    return Cli(tmp_path)


def test_a_changed_value_restarts_the_program_with_it_and_the_old_one_is_stopped(cli: Cli) -> None:
    run = cli.start("--service", "app")
    try:
        first = run.wait_for_starts(1)[0]
        assert first["started"]["KEY"] == "first-SEEKRIT"
        cli.store("app/KEY", "second-SEEKRIT")
        second = run.wait_for_starts(2)[1]
        assert second["started"]["KEY"] == "second-SEEKRIT"
        assert second["pid"] != first["pid"]
        assert {"pid": first["pid"], "signal": "SIGTERM"} in run.lines()  # stopped, with the stop signal
        assert not alive(first["pid"])
        assert alive(second["pid"])
        said = run.stderr()
        assert "app/KEY changed (version 1 → 2): restarting" in said, said
        assert "SEEKRIT" not in said
        # Ending run ends the program (SIGTERM passed on), and run exits with its status.
        assert run.end() == 0
        assert {"pid": second["pid"], "signal": "SIGTERM"} in run.lines()
    finally:
        run.kill()
    reads = [(r["name"], r["version"]) for r in cli.run_records()]
    assert reads == [("app/KEY", 1), ("app/KEY", 2)]  # each reading of the values, audited
    assert all("SEEKRIT" not in json.dumps(r) for r in cli.run_records())


def test_changes_that_leave_the_programs_environment_as_it_is_do_not_restart_it(cli: Cli) -> None:
    run = cli.start("--secret", "app/KEY")
    try:
        run.wait_for_starts(1)
        cli.store("other/KEY", "changed-SEEKRIT")  # not one of its secrets
        cli.store("app/KEY", "first-SEEKRIT")  # a new version, the same value
        assert cli("metadata", "app/KEY", "--tag", "team=x").returncode == 0  # no new value at all
        time.sleep(2)  # each had time to be seen (a change is read about 0.3-0.5 s after it lands)
        cli.store("app/KEY", "third-SEEKRIT")
        starts = run.wait_for_starts(2)
        time.sleep(1)
        assert [s["started"]["KEY"] for s in run.starts()] == ["first-SEEKRIT", "third-SEEKRIT"], starts
        assert "app/KEY changed (version 2 → 3)" in run.stderr()
    finally:
        run.kill()


def test_references_are_followed_and_only_a_change_to_the_field_given_restarts(
    cli: Cli, tmp_path: Path
) -> None:
    """--env-file's sm://NAME#FIELD and a reference in run's own environment are secrets of the
    program like --secret's: a change to them restarts it, one to another field of the same
    secret does not (the program's environment would not differ)."""
    cli.store("app/DB", json.dumps({"password": "p1-SEEKRIT", "port": 5432}))
    (tmp_path / "app.env").write_text("DB_PASSWORD=sm://app/DB#password\n")
    cli.env["NEW"] = "sm://other/KEY"
    run = cli.start("--env-file", str(tmp_path / "app.env"))
    try:
        first = run.wait_for_starts(1)[0]["started"]
        assert (first["DB_PASSWORD"], first["NEW"]) == ("p1-SEEKRIT", "unrelated-SEEKRIT")
        cli.store("app/DB", json.dumps({"password": "p1-SEEKRIT", "port": 6432}))  # another field
        time.sleep(2)  # seen and read (a change is read about 0.3-0.5 s after it lands)
        assert len(run.starts()) == 1
        cli.store("app/DB", json.dumps({"password": "p2-SEEKRIT", "port": 6432}))
        assert run.wait_for_starts(2)[1]["started"]["DB_PASSWORD"] == "p2-SEEKRIT"
        assert "app/DB changed (version 2 → 3): restarting" in run.stderr()
        cli.store("other/KEY", "changed-SEEKRIT")
        assert run.wait_for_starts(3)[2]["started"]["NEW"] == "changed-SEEKRIT"
        assert "SEEKRIT" not in run.stderr()
    finally:
        run.kill()
    assert [(r["name"], r["version"]) for r in cli.run_records()].count(("app/DB", 2)) == 1


def test_a_secret_added_to_the_namespace_restarts_the_program_with_it(cli: Cli) -> None:
    run = cli.start("--service", "app")
    try:
        assert run.wait_for_starts(1)[0]["started"]["NEW"] is None
        cli.store("app/NEW", "added-SEEKRIT")
        second = run.wait_for_starts(2)[1]
        assert second["started"] == {
            "KEY": "first-SEEKRIT",
            "DB_PASSWORD": None,
            "JWT_KEY": None,
            "NEW": "added-SEEKRIT",
        }
        assert "app/NEW was added (version 1)" in run.stderr()
    finally:
        run.kill()


def test_signals_are_passed_on_and_the_program_ending_on_its_own_ends_run_with_its_status(cli: Cli) -> None:
    run = cli.start("--service", "app")
    try:
        pid = run.wait_for_starts(1)[0]["pid"]
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            run.proc.send_signal(signum)
            run.wait_for(
                lambda s=signum: {"pid": pid, "signal": s.name} in run.lines(), f"{signum.name} passed on"
            )
        assert run.proc.poll() is None and alive(pid)  # neither ends run or its program
        Path(f"{run.log}.exit").touch()  # the program exits 7 on its own
        assert run.proc.wait(timeout=15) == 7
        assert len(run.starts()) == 1  # and is not started again
    finally:
        run.kill()


def test_ctrl_c_reaches_the_program_once_and_no_restart_follows(cli: Cli) -> None:
    run = cli.start("--service", "app")
    try:
        pid = run.wait_for_starts(1)[0]["pid"]
        run.proc.send_signal(signal.SIGINT)
        run.wait_for(lambda: {"pid": pid, "signal": "SIGINT"} in run.lines(), "SIGINT passed on")
        cli.store("app/KEY", "after-SEEKRIT")  # a change while it ends: not started again
        time.sleep(1.5)
        Path(f"{run.log}.exit").touch()
        assert run.proc.wait(timeout=15) == 7
        assert [line for line in run.lines() if line.get("signal") == "SIGINT"] == [
            {"pid": pid, "signal": "SIGINT"}
        ]
        assert len(run.starts()) == 1
    finally:
        run.kill()


def test_a_program_that_ignores_the_stop_signal_is_killed_after_the_stop_timeout(cli: Cli) -> None:
    run = cli.start("--service", "app", "--stop-timeout", "1s", child_args=("--ignore-term",))
    try:
        first = run.wait_for_starts(1)[0]
        began = time.monotonic()
        cli.store("app/KEY", "second-SEEKRIT")
        second = run.wait_for_starts(2)[1]
        assert time.monotonic() - began < 10
        assert second["started"]["KEY"] == "second-SEEKRIT"
        assert not alive(first["pid"])
        assert "did not end within 1 s of SIGTERM: killed (SIGKILL)" in run.stderr()
    finally:
        run.kill()


def test_the_stop_signal_can_be_chosen(cli: Cli) -> None:
    run = cli.start("--service", "app", "--stop-signal", "usr1", "--stop-timeout", "2s")
    try:
        first = run.wait_for_starts(1)[0]
        cli.store("app/KEY", "second-SEEKRIT")
        run.wait_for_starts(2)
        assert {"pid": first["pid"], "signal": "SIGUSR1"} in run.lines()  # then killed at the timeout
        assert f"(pid {first['pid']}, SIGUSR1)" in run.stderr()
    finally:
        run.kill()


def test_a_secret_that_cannot_be_read_again_leaves_the_program_running_on_what_it_has(cli: Cli) -> None:
    run = cli.start("--secret", "app/KEY")
    try:
        pid = run.wait_for_starts(1)[0]["pid"]
        assert cli("delete", "app/KEY").returncode == 0
        run.wait_for(lambda: "reading the secrets again failed" in run.stderr(), "the warning")
        assert "keeps running on the values it has" in run.stderr()
        assert alive(pid) and len(run.starts()) == 1
        assert "read again at the next change" in run.stderr()
        time.sleep(1.5)  # a failure other than an unanswering store is not read again by a timer
        assert len([r for r in cli.run_records() if r["outcome"] != "ok"]) == 1
        assert cli("undelete", "app/KEY").returncode == 0
        run.wait_for(lambda: "read the secrets again" in run.stderr(), "the reading after the undelete")
        assert len(run.starts()) == 1  # the same value as it has: not restarted
        cli.store("app/KEY", "back-SEEKRIT")
        assert run.wait_for_starts(2, timeout=30)[1]["started"]["KEY"] == "back-SEEKRIT"
        assert "SEEKRIT" not in run.stderr()
    finally:
        run.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--stop-signal", "BOGUS"), "--stop-signal 'BOGUS' is not one of"),
        (("--stop-timeout", "0"), "--stop-timeout must be more than 0"),
        (("--stop-timeout", "soon"), "--stop-timeout 'soon' is not a duration"),
    ],
)
def test_bad_options_run_nothing(cli: Cli, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    marker = tmp_path / "ran"
    result = cli("run", "--restart-on-change", "--service", "app", *args, "--", "touch", str(marker))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_the_stop_options_need_restart_on_change(cli: Cli, tmp_path: Path) -> None:
    result = cli("run", "--service", "app", "--stop-timeout", "5s", "--", "touch", str(tmp_path / "ran"))
    assert result.returncode == 2 and "go with --restart-on-change" in result.stderr
    assert not (tmp_path / "ran").exists()


def test_a_command_that_is_not_found_is_127_before_anything_is_read(cli: Cli) -> None:
    result = cli("run", "--restart-on-change", "--service", "app", "--", "no-such-program-here")
    assert result.returncode == 127 and "no-such-program-here: command not found" in result.stderr
    assert cli.run_records() == []


def test_a_script_without_a_shebang_line_is_run_by_sh_and_a_binary_sh_cannot_run_is_126(
    cli: Cli, tmp_path: Path
) -> None:
    script = tmp_path / "no-shebang"  # as `run` without supervision runs it (test_run_command)
    script.write_text('printf "%s %s" "$1" "${KEY:+set}"; exit 5\n')
    script.chmod(0o755)
    result = cli("run", "--restart-on-change", "--service", "app", "--", str(script), "argument")
    assert (result.returncode, result.stdout) == (5, "argument set"), result.stderr
    binary = tmp_path / "not-a-program"  # neither a #! line nor a format exec knows
    binary.write_bytes(b"\x7fELF\x00garbage")
    binary.chmod(0o755)
    refused = cli("run", "--restart-on-change", "--service", "app", "--", str(binary))
    assert refused.returncode == 126 and f"cannot run {binary}" in refused.stderr


def test_through_a_service_a_change_reaches_the_program_by_its_watch_stream(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    env = through_service(tmp_path, server.address)
    run = Run(tmp_path, env, "--service", "auth")
    try:
        first = run.wait_for_starts(1)[0]
        assert first["started"]["DB_PASSWORD"] == SEED["auth/DB_PASSWORD"].decode()
        store_in_served_store(tmp_path, "auth/DB_PASSWORD", "rotated-SEEKRIT")
        second = run.wait_for_starts(2)[1]
        assert second["started"]["DB_PASSWORD"] == "rotated-SEEKRIT"
        assert second["started"]["JWT_KEY"] == SEED["auth/JWT_KEY"].decode()
        assert run.end() == 0
    finally:
        run.kill()
        server.stop()
    gets = [r["name"] for r in server.audit_records() if r["operation"] == "get" and r["outcome"] == "ok"]
    assert gets.count("auth/DB_PASSWORD") == 2  # the service audited both readings


def test_a_watch_stream_broken_by_a_service_restart_is_opened_again(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    port = int(server.address.rpartition(":")[2])
    env = through_service(tmp_path, server.address)
    run = Run(tmp_path, env, "--service", "auth")
    try:
        run.wait_for_starts(1)
        server.stop()
        run.wait_for(lambda: "watching again in" in run.stderr(), "the broken stream noticed")
        server = start_server(tmp_path, port=port)
        run.wait_for(lambda: f"watching {server.address} again" in run.stderr(), "the stream reopened", 40)
        store_in_served_store(tmp_path, "auth/JWT_KEY", "after-restart-SEEKRIT")
        assert run.wait_for_starts(2)[1]["started"]["JWT_KEY"] == "after-restart-SEEKRIT"
        assert "SEEKRIT" not in run.stderr()
    finally:
        run.kill()
        server.stop()


def test_on_an_aws_store_a_change_is_seen_at_its_poll(tmp_path: Path, moto_endpoint: str) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": f"aws-secretsmanager://us-east-1/restart-{secrets.token_hex(4)}",
        **aws_variables(moto_endpoint, tmp_path),
    }
    cli = Cli(tmp_path)
    cli.env = env
    cli.store("app/KEY", "first-SEEKRIT")
    run = cli.start("--service", "app")
    try:
        assert run.wait_for_starts(1)[0]["started"]["KEY"] == "first-SEEKRIT"
        cli.store("app/KEY", "second-SEEKRIT")
        # AWS is polled every 10 s (its watch_poll_seconds default), as serve polls it.
        assert run.wait_for_starts(2, timeout=30)[1]["started"]["KEY"] == "second-SEEKRIT"
    finally:
        run.kill()


def test_a_service_that_refuses_watch_is_an_error_before_the_program_starts(
    make_backend: Callable[[str], Backend],  # noqa: F811
    service_dir: Path,  # noqa: F811
) -> None:
    backend = make_backend("aws")
    backend.seed(SEED)
    server = serve(service_dir, backend, "watch_poll_seconds = 0\n")  # Watch off
    marker = service_dir / "ran"
    try:
        refused = server.cli(
            "auth", "run", "--restart-on-change", "--service", "auth", "--", "touch", str(marker)
        )
        said = refused.stderr.decode()
        assert refused.returncode == 2 and len(said.strip().splitlines()) == 1, said
        assert "--restart-on-change needs the service's Watch stream" in said and "nothing was run" in said
        assert not marker.exists()
        plain = server.cli("auth", "run", "--service", "auth", "--", "touch", str(marker))
    finally:
        server.stop()
    assert plain.returncode == 0 and marker.exists()  # without --restart-on-change it runs as before


def test_a_follower_that_fails_unexpectedly_says_so_in_one_line_and_the_program_runs_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Broken:
        def follow(self, changed: Callable[[Any], None], stop: Any) -> None:
            raise RuntimeError("value-SEEKRIT")

        def cancel(self) -> None:
            pass

    command = (sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(4)")
    launch = Launch(command, sys.executable, lambda variables: dict(os.environb), lambda exc, v: exc)
    supervisor = Supervisor(launch, {}, dict, lambda name: True, stop_signal=signal.SIGTERM, stop_timeout=5)
    assert supervisor.run(Broken()) == 4  # the program ran to its own end
    said = capsys.readouterr().err
    assert "stopped following the secrets' changes (internal error RuntimeError)" in said
    assert "SEEKRIT" not in said and "Traceback" not in said


class Silent:
    """A change source that tells of nothing."""

    def follow(self, changed: Callable[[Any], None], stop: Any) -> None:
        stop.wait()

    def cancel(self) -> None:
        pass


def test_a_sigterm_that_comes_while_the_program_is_first_starting_reaches_it() -> None:
    def environment(variables: Any) -> dict[bytes, bytes]:
        os.kill(os.getpid(), signal.SIGTERM)  # systemd's stop, right after run started
        return dict(os.environb)

    command = (sys.executable, "-c", "import time; time.sleep(20); raise SystemExit(4)")
    launch = Launch(command, sys.executable, environment, lambda exc, v: exc)
    supervisor = Supervisor(launch, {}, dict, lambda name: True, stop_signal=signal.SIGTERM, stop_timeout=5)
    began = time.monotonic()
    assert supervisor.run(Silent()) == 128 + signal.SIGTERM  # passed on: it ended the program
    assert time.monotonic() - began < 10


def test_a_ctrl_c_during_the_reading_after_a_change_is_not_followed_by_the_stop_signal(
    tmp_path: Path,
) -> None:
    log = tmp_path / "signals"
    program = (
        "import signal, sys, time\n"
        f"def note(s, f):\n    open({str(log)!r}, 'a').write(signal.Signals(s).name + '\\n')\n"
        "    if s == signal.SIGTERM: sys.exit(0)\n"
        "signal.signal(signal.SIGINT, note); signal.signal(signal.SIGTERM, note)\n"
        "print('ready', flush=True)\n"
        "time.sleep(2); sys.exit(3)\n"
    )

    one_change = OneChange(lambda: time.sleep(0.5))

    def read() -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the secrets are read again
        return {"KEY": Secret("app/KEY", 2, SecretValue(b"new-SEEKRIT"), datetime.now(UTC))}

    launch = Launch(
        (sys.executable, "-c", program), sys.executable, lambda v: dict(os.environb), lambda exc, v: exc
    )
    supervisor = Supervisor(launch, {}, read, lambda name: True, stop_signal=signal.SIGTERM, stop_timeout=5)
    # This process may have been started with SIGINT ignored (a suite run in the background), which
    # the supervisor would rightly keep ignored: caught here, as at a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert supervisor.run(one_change) == 3  # it ended on its own, after the one SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)
    assert log.read_text().splitlines() == ["SIGINT"]


# COMMAND that starts a helper in its own process group which ignores SIGTERM (the helper writes
# its pid to $HELPER_PID), then ends on SIGTERM, or on its own (5) after $LASTS seconds.
LEAVES_A_HELPER = (
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))\n"
    "subprocess.Popen(['sh', '-c', 'trap \"\" TERM; echo $$ > $HELPER_PID; while :; do sleep 0.1; done'])\n"
    "time.sleep(float(os.environ['LASTS'])); sys.exit(5)\n"
)


def helper_pid(path: Path) -> int:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, "the helper did not start"
        time.sleep(0.05)
    return int(path.read_text())


def leaves_a_helper(environment: Callable[[dict[str, Any]], dict[bytes, bytes]]) -> Launch:
    command = (sys.executable, "-c", LEAVES_A_HELPER)
    return Launch(command, sys.executable, environment, lambda exc, v: exc)


def test_what_the_program_leaves_in_its_group_does_not_outlive_run(tmp_path: Path) -> None:
    pid_file = tmp_path / "helper.pid"
    launch = leaves_a_helper(lambda v: {**os.environb, b"HELPER_PID": bytes(pid_file), b"LASTS": b"1"})
    supervisor = Supervisor(launch, {}, dict, lambda name: True, stop_signal=signal.SIGTERM, stop_timeout=1)
    try:
        assert supervisor.run(Silent()) == 5  # the program's own status
        assert not alive(helper_pid(pid_file))  # its helper, which ignores SIGTERM, was killed
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_restart_stops_the_whole_group_before_the_new_program_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid_files = [tmp_path / "first.pid", tmp_path / "second.pid"]

    one_change = OneChange(lambda: helper_pid(pid_files[0]))
    helper_at_restart: list[bool] = []

    def environment(variables: dict[str, Any]) -> dict[bytes, bytes]:
        if variables:  # the restart
            helper_at_restart.append(alive(helper_pid(pid_files[0])))
        return {
            **os.environb,
            b"HELPER_PID": bytes(pid_files[1 if variables else 0]),
            b"LASTS": b"1" if variables else b"60",
        }

    new = {"KEY": Secret("app/KEY", 2, SecretValue(b"new-SEEKRIT"), datetime.now(UTC))}
    supervisor = Supervisor(
        leaves_a_helper(environment),
        {},
        lambda: new,
        lambda name: True,
        stop_signal=signal.SIGTERM,
        stop_timeout=1,
    )
    try:
        assert supervisor.run(one_change) == 5  # the second program ends on its own
        assert helper_at_restart == [False]  # the first one's helper was gone before it started
        assert not alive(helper_pid(pid_files[1]))
        assert "left in its process group did not end within 1 s of SIGTERM" in capsys.readouterr().err
    finally:
        for path in pid_files:
            with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
                os.kill(int(path.read_text()), signal.SIGKILL)


def test_a_service_back_with_a_new_ca_and_certificates_is_watched_with_the_renewed_files(
    tmp_path: Path,
) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    port = int(server.address.rpartition(":")[2])
    env = through_service(tmp_path, server.address)
    run = Run(tmp_path, env, "--service", "auth")
    try:
        run.wait_for_starts(1)
        server.stop()
        renewed = tmp_path / "renewed"  # the CA rotated: new CA, server and client certificates
        renewed.mkdir()
        make_pki(renewed, ("auth",))
        for name in ("ca.pem", "server.pem", "server-key.pem", "auth.pem", "auth-key.pem"):
            os.replace(renewed / name, tmp_path / name)
        server = start_server(tmp_path, port=port)
        run.wait_for(lambda: f"watching {server.address} again" in run.stderr(), "the stream reopened", 40)
        store_in_served_store(tmp_path, "auth/JWT_KEY", "after-rotation-SEEKRIT")
        assert run.wait_for_starts(2)[1]["started"]["JWT_KEY"] == "after-rotation-SEEKRIT"
        assert "with the renewed certificate files" in run.stderr()
        assert "SEEKRIT" not in run.stderr()
    finally:
        run.kill()
        server.stop()


def test_a_watch_stream_that_cannot_be_opened_again_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    class Ended:
        revision, history, resumed = 5, "h", False

        def start(self) -> int:
            return 5

        def __iter__(self) -> Any:
            return iter(())

        def cancel(self) -> None:
            pass

    class Refusing:
        address = "127.0.0.1:1"
        opened = 0

        def watch(self, prefix: str = "", since_revision: Any = None, since_history: Any = None) -> Any:
            self.opened += 1
            if self.opened > 1:
                raise StorageError("TLS handshake with 127.0.0.1:1 failed: check the certificate files")
            return Ended()

        def renew_connection(self) -> bool:
            return False

        def fail_over(self, timeout: float) -> bool:
            return False

        def move_on(self, timeout: float) -> bool:
            return False

    remote = Refusing()
    source = WatchSource(remote, "app/")
    stop = threading.Event()
    follower = threading.Thread(target=source.follow, args=(lambda change: None, stop))
    with mock.patch("secrets_manager.cli.run_supervisor.RECONNECT_MAX_SECONDS", 0.1):
        follower.start()
        deadline = time.monotonic() + 10
        while remote.opened < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        follower.join(10)
    said = capsys.readouterr().err.splitlines()
    assert said[0].endswith("the service ended the watch stream; watching again in 1 s")
    assert "TLS handshake with 127.0.0.1:1 failed: check the certificate files; watching again in" in said[1]


def test_a_secret_added_that_would_set_a_refused_variable_warns_and_does_not_restart(cli: Cli) -> None:
    run = cli.start("--service", "app")
    try:
        pid = run.wait_for_starts(1)[0]["pid"]
        cli.store("app/LD_PRELOAD", "/tmp/evil-SEEKRIT.so")
        run.wait_for(lambda: "reading the secrets again failed" in run.stderr(), "the warning")
        said = run.stderr()
        assert "app/LD_PRELOAD would set $LD_PRELOAD, which can choose the code programs run" in said
        assert "keeps running on the values it has" in said
        assert "nothing was run" not in said  # it runs, on the values it had
        assert "SEEKRIT" not in said
        time.sleep(1)
        assert alive(pid) and len(run.starts()) == 1
        assert [r["outcome"] for r in cli.run_records()] == ["ok", "invalid_input"]  # the refusal, audited
    finally:
        run.kill()


# Run as a container's PID 1 would be (a subreaper: orphans are re-parented to it): the supervisor
# runs a program whose background process, in a session of its own, ends after the program's
# shell left it; prints the zombies this process had 2 s in (that process, not waited for).
AS_INIT = r"""
import ctypes, ctypes.util, json, os, signal, sys, threading, time
from secrets_manager.cli.run_supervisor import Launch, Supervisor
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
class Silent:
    def follow(self, changed, stop): stop.wait()
    def cancel(self): pass
zombies = []
def look():
    time.sleep(2)
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                zombies.append(int(stat))
threading.Thread(target=look, daemon=True).start()
command = ("/bin/sh", "-c", "(setsid sh -c 'sleep 0.3' &); sleep 3; exit 6")
launch = Launch(command, "/bin/sh", lambda v: dict(os.environb), lambda e, v: e)
supervisor = Supervisor(launch, {}, dict, lambda n: True, stop_signal=signal.SIGTERM, stop_timeout=5)
status = supervisor.run(Silent())
print(json.dumps({"status": status, "zombies": zombies}))
"""


def test_as_a_containers_init_run_waits_for_the_orphans_it_inherits() -> None:
    done = subprocess.run([sys.executable, "-c", AS_INIT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": 6, "zombies": []}


def test_a_watch_stream_on_a_service_that_hangs_is_noticed_and_opened_again(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    env = through_service(tmp_path, server.address)
    run = Run(tmp_path, env, "--service", "auth")
    try:
        run.wait_for_starts(1)
        server.process.send_signal(signal.SIGSTOP)  # hung: its connection open, nothing answers
        try:  # the SDK's keepalive: a ping unanswered for 5 s, sent after 11 s without data
            run.wait_for(lambda: "watching again in" in run.stderr(), "the hung stream noticed", 30)
        finally:
            server.process.send_signal(signal.SIGCONT)
        run.wait_for(lambda: f"watching {server.address} again" in run.stderr(), "the stream reopened", 40)
        store_in_served_store(tmp_path, "auth/JWT_KEY", "after-hang-SEEKRIT")
        assert run.wait_for_starts(2)[1]["started"]["JWT_KEY"] == "after-hang-SEEKRIT"
    finally:
        run.kill()
        server.stop()


def test_a_signal_ignored_by_whoever_started_run_stays_ignored_as_with_nohup(cli: Cli) -> None:
    run = cli.start("--service", "app", ignored=(signal.SIGHUP,))
    try:
        pid = run.wait_for_starts(1)[0]["pid"]
        run.proc.send_signal(signal.SIGHUP)  # the terminal hung up: nohup's program runs on
        run.proc.send_signal(signal.SIGUSR1)
        run.wait_for(lambda: {"pid": pid, "signal": "SIGUSR1"} in run.lines(), "SIGUSR1 passed on")
        assert {"pid": pid, "signal": "SIGHUP"} not in run.lines()
        assert run.proc.poll() is None and alive(pid)
        assert json.loads((Path(f"{run.log}.sighup")).read_text()) == "ignored"  # as exec would leave it
    finally:
        run.kill()


def test_a_stopped_program_is_continued_after_the_stop_signal_so_it_can_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one_change = OneChange(lambda: time.sleep(1))  # the first program stops itself meanwhile (SIGSTOP)
    starts: list[float] = []

    def environment(variables: dict[str, Any]) -> dict[bytes, bytes]:
        starts.append(time.monotonic())
        return dict(os.environb)

    command = ("/bin/sh", "-c", '[ -n "$RESTARTED" ] && exit 4; kill -STOP $$; sleep 60')

    def environment_of(variables: dict[str, Any]) -> dict[bytes, bytes]:
        made = environment(variables)
        made.update({k.encode(): s.value.reveal() for k, s in variables.items()})
        return made

    launch = Launch(command, "/bin/sh", environment_of, lambda exc, v: exc)
    new = {"RESTARTED": Secret("app/KEY", 2, SecretValue(b"yes-SEEKRIT"), datetime.now(UTC))}
    supervisor = Supervisor(
        launch, {}, lambda: new, lambda name: True, stop_signal=signal.SIGTERM, stop_timeout=20
    )
    assert supervisor.run(one_change) == 4  # the second program's own status
    assert starts[1] - starts[0] < 10  # the first ended at its SIGTERM, not killed 20 s later
    assert "killed (SIGKILL)" not in capsys.readouterr().err


def test_with_several_addresses_a_change_after_the_watched_service_died_restarts_through_another(
    tmp_path: Path,
) -> None:
    """`--server A,B`, two replicas on one store: A, whose Watch stream `run` holds, is killed
    (SIGKILL) and a change is stored at once. The stream moves to B, resuming where it stopped
    (the change, made while it moved, is not missed) and the secrets are read again through B:
    the program is restarted with the new value within 10 s. Before, run watched A alone, for
    good ("watching again in 1, 2, 4 … s"), and no change reached the program again."""
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    first = start_server(tmp_path, "first")
    second = start_server(tmp_path, "second")
    env = through_service(tmp_path, f"{first.address},{second.address}")
    run = Run(tmp_path, env, "--service", "auth")
    try:
        run.wait_for_starts(1)
        first.kill()
        store_in_served_store(tmp_path, "auth/JWT_KEY", "after-failover-SEEKRIT")
        stored = time.monotonic()
        assert run.wait_for_starts(2, timeout=10)[1]["started"]["JWT_KEY"] == "after-failover-SEEKRIT"
        took = time.monotonic() - stored
        said = run.stderr()
        assert f"{first.address} does not answer: moving to {second.address}" in said
        assert f"watching {second.address} again" in said
        store_in_served_store(tmp_path, "auth/DB_PASSWORD", "second-change-SEEKRIT")
        assert run.wait_for_starts(3, timeout=10)[2]["started"]["DB_PASSWORD"] == "second-change-SEEKRIT"
        assert "SEEKRIT" not in run.stderr()
        assert took < 10
        assert run.end() == 0
    finally:
        run.kill()
        first.kill()
        second.stop()


def test_with_several_addresses_a_reading_that_gets_no_answer_is_read_through_another(
    tmp_path: Path,
) -> None:
    """The reading after a change, through a replica that died after the change reached the
    stream (so the stream has not moved yet): read at once through one that answers, which
    serves the readings from then on, rather than failing and waiting RETRY_SECONDS (10 s)."""
    from secrets_manager.cli.run_command import _read_variables
    from secrets_manager.client import RemoteStore

    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    first = start_server(tmp_path, "first")
    second = start_server(tmp_path, "second")
    replicas = (first.address, second.address)
    store = RemoteStore(first.address, tls_files(tmp_path, "auth"), replicas=replicas)
    try:
        assert (
            _read_variables(store, ("auth",), [], [], first=False).variables["JWT_KEY"].name == "auth/JWT_KEY"
        )
        first.kill()
        variables = _read_variables(store, ("auth",), [("auth/DB_PASSWORD", "DB")], [], first=False).variables
        assert variables["JWT_KEY"].value.reveal() == SEED["auth/JWT_KEY"]
        assert variables["DB"].value.reveal() == SEED["auth/DB_PASSWORD"]
        assert store.address == second.address
        second.kill()  # none answers: the reading's own error
        with pytest.raises(StorageError, match=second.address):
            _read_variables(store, ("auth",), [], [], first=False)
    finally:
        store.close()
        first.kill()
        second.kill()


def test_with_several_addresses_a_read_on_a_replica_that_hangs_moves_once_its_health_check_fails(
    tmp_path: Path,
) -> None:
    """A read sent to a replica that then hangs (its answers stop, the connection open: a frozen
    host, a path gone dark) is sent to the other once the hung one's health check fails (1 s
    without an answer, then a check that gets none within 3 s), not after the read's 10 s
    deadline."""
    from secrets_manager.client import RemoteStore

    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    first = start_server(tmp_path, "first")
    second = start_server(tmp_path, "second")
    dark = AnswersStop("127.0.0.1", first.port)
    store = RemoteStore(dark.address, tls_files(tmp_path, "auth"), replicas=(dark.address, second.address))
    try:
        assert store.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]  # connected to A
        dark.stalled.set()
        started = time.monotonic()
        assert store.get("auth/DB_PASSWORD").value.reveal() == SEED["auth/DB_PASSWORD"]
        took = time.monotonic() - started
        assert store.address == second.address
        assert took < 7, f"the read waited {took:.1f} s for a replica that hangs"
    finally:
        store.close()
        dark.close()
        first.kill()
        second.kill()


def test_a_fail_over_that_another_thread_has_done_meanwhile_is_not_done_again(tmp_path: Path) -> None:
    """run's follower fails over from A (not serving) to B while a reading in the main thread,
    refused by A, waits to move the store itself: it then moved on from B, a replica just found
    serving, to C (its watch stream and reads with it). Now it stays on B, and reads there."""
    from secrets_manager.client import RemoteStore

    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    servers = [start_server(tmp_path, name) for name in ("a", "b", "c")]
    a, b, c = (server.address for server in servers)
    store = RemoteStore(a, tls_files(tmp_path, "auth"), replicas=(a, b, c))
    start_check = store.start_health_check
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(store.get("auth/JWT_KEY").value.reveal()))

    def checked_while_a_read_fails(timeout: float) -> Any:
        if not reader.is_alive() and not read:
            reader.start()  # refused by A, it waits for the follower's move to end
            time.sleep(0.5)
        return start_check(timeout)

    try:
        servers[0].kill()
        store.start_health_check = checked_while_a_read_fails  # type: ignore[method-assign]
        assert store.fail_over(3.0)  # moved off A: to B
        reader.join(10)
        assert read == [SEED["auth/JWT_KEY"]]
        assert store.address == b
    finally:
        store.close()
        for server in servers:
            server.kill()


def test_a_read_whose_connection_is_renewed_under_it_is_sent_again_on_the_new_one(tmp_path: Path) -> None:
    """run's follower renews the held store's connection (its TLS files changed) while the reading
    after a change waits for its answer: gRPC cancels the read ("Channel closed!"). It was an
    error run did not try again before the next change (so the program kept the old values);
    now the read is sent again at once, on the new connection."""
    from secrets_manager.client import RemoteStore

    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    slow = AnswersStop("127.0.0.1", server.port)
    store = RemoteStore(slow.address, tls_files(tmp_path, "auth"))
    try:
        assert store.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]
        slow.stalled.set()  # the read below waits; the new connection's answers pass again
        cert = tmp_path / "auth.pem"

        def renew() -> None:
            time.sleep(0.5)
            slow.stalled.clear()
            cert.write_bytes(cert.read_bytes())  # rewritten in place: a new mtime
            os.utime(cert, ns=(time.time_ns(), time.time_ns() + 10**9))
            assert store.renew_connection()

        renewer = threading.Thread(target=renew)
        renewer.start()
        assert store.get("auth/DB_PASSWORD").value.reveal() == SEED["auth/DB_PASSWORD"]
        renewer.join(10)
    finally:
        store.close()
        slow.close()
        server.kill()
