"""The unlock agent in tests: real agent processes started with the console script, each in a
test's own XDG_RUNTIME_DIR and stopped when the test ends; the CLI on a new terminal (a pty) where
it would prompt."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from terminal import on_a_terminal, typing_once
from test_cli import Cli, Result

PASSWORD = "agent test password"


class AgentCli(Cli):
    """The console script against one store (test_cli's `Cli`), with its own XDG_RUNTIME_DIR and
    no master password source: a command that needs one finds it in the agent or fails (no
    terminal), unless the call gives one."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp / "vault" / "store.db", tmp)
        self.tmp = tmp
        self.started: list[int] = []  # agents this test started: killed at its end
        runtime = tmp / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        del self.env["MASTER_PASSWORD"]
        self.env["XDG_RUNTIME_DIR"] = str(runtime)

    @property
    def directory(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"]) / "secrets-manager"

    @property
    def socket(self) -> Path:
        return self.directory / "agent.sock"

    @property
    def log(self) -> Path:
        return self.directory / "agent.log"

    def full_env(self, env: Mapping[str, str | None] | None = None) -> dict[str, str]:
        merged = {**self.env, **(env or {})}
        return {key: value for key, value in merged.items() if value is not None}

    def ok(self, *args: str, input: bytes = b"", env: Mapping[str, str | None] | None = None) -> Result:
        result = self(*args, input=input, env=env)
        assert result.code == 0, (args, result.code, result.stderr)
        return result

    def with_password(self, *args: str, input: bytes = b"") -> Result:
        return self.ok(*args, input=input, env={"MASTER_PASSWORD": PASSWORD})

    def start_agent(self, *options: str, env: Mapping[str, str | None] | None = None) -> int:
        said = self.ok("agent", "start", *options, env=env).stderr
        pid = int(said.split("(pid ", 1)[1].split(")", 1)[0])
        self.started.append(pid)  # killed at the end of the test, whatever happens to it
        assert self.agent_pid(env) == pid
        return pid

    def agent_pid(self, env: Mapping[str, str | None] | None = None) -> int:
        return int(json.loads(self.ok("agent", "status", "--json", env=env).out)["pid"])

    def status(self) -> dict[str, object]:
        return dict(json.loads(self.ok("agent", "status", "--json").out))

    def typed(self, keys: bytes, *args: str, env: Mapping[str, str | None] | None = None) -> tuple[int, str]:
        """The command on a new terminal, `keys` typed at its first prompt (if it prompts): its
        exit code and all it wrote to the terminal."""
        return on_a_terminal(args, self.full_env(env), typing_once(keys, after=b"password: "))

    def stop_agents(self) -> None:
        """`agent stop`, then SIGKILL for any agent this test started that is still there."""
        with contextlib.suppress(Exception):
            self("agent", "stop")
        for pid in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def audit(self) -> list[dict[str, object]]:
        log = self.store.with_name("store.audit.jsonl")
        return [json.loads(line) for line in log.read_text().splitlines()]


def agent_cli(tmp: Path) -> Iterator[AgentCli]:
    cli = AgentCli(tmp)
    try:
        yield cli
    finally:
        cli.stop_agents()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def wait_until_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def require_root(why: str) -> None:
    """Skip unless root (fail under CI, where the test must run)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"needs root under CI: {why}")
        pytest.skip(f"needs root: {why}")
