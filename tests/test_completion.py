"""Secret names complete in the shell (`get auth/<TAB>`) where the store opens without asking:
a password source, the agent holding its key, or a service; never a prompt, never a message, and
no audited failed unlock on each TAB where it cannot."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_fixtures import PASSWORD, AgentCli, agent_cli
from service_fixtures import SCRIPT, make_pki, make_store, start_server
from test_cli import Result
from test_run_command import through_service

NAMES = ("auth/DB_PASSWORD", "auth/JWT_KEY", "market-connector/BINANCE_API_KEY")


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[AgentCli]:
    for made in agent_cli(tmp_path):
        made.with_password("init", "--kdf-profile", "test")
        for name in NAMES:
            made.with_password("store", name, input=b"value-SEEKRIT")
        yield made


def complete(cli: AgentCli, line: str, env: dict[str, str | None] | None = None) -> Result:
    """What bash's completion gets for `line` (its last word being completed)."""
    words = line.split(" ")
    return cli(
        env={
            "_SECRETS_MANAGER_COMPLETE": "bash_complete",
            "COMP_WORDS": line,
            "COMP_CWORD": str(len(words) - 1),
            **(env or {}),
        },
    )


def offered(result: Result) -> list[str]:
    assert result.code == 0 and result.stderr == "", result
    return [line.split(",", 1)[1] for line in result.out.splitlines() if line.startswith("plain,")]


def test_names_complete_with_a_password_source_and_each_completion_is_audited(cli: AgentCli) -> None:
    password = {"MASTER_PASSWORD": PASSWORD}
    assert offered(complete(cli, "secrets-manager get ", password)) == list(NAMES)
    assert offered(complete(cli, "secrets-manager history auth/", password)) == list(NAMES[:2])
    assert offered(complete(cli, "secrets-manager otp auth/J", password)) == ["auth/JWT_KEY"]
    assert offered(complete(cli, "secrets-manager mv mar", password)) == [NAMES[2]]
    completions = [(r["name"], r["decision"]) for r in cli.audit() if r["operation"] == "complete"]
    assert completions == [(None, "allow"), ("auth/", "allow"), ("auth/", "allow"), (None, "allow")]


def test_without_a_way_to_open_the_store_nothing_completes_and_nothing_is_audited(cli: AgentCli) -> None:
    records = len(cli.audit())
    assert offered(complete(cli, "secrets-manager get au")) == []
    cli.start_agent()  # an agent without this store's key: still nothing, nothing asked
    assert offered(complete(cli, "secrets-manager get au")) == []
    assert len(cli.audit()) == records, "a completion that could not open the store was audited"


def test_with_the_agent_holding_the_key_names_complete_without_a_password(cli: AgentCli) -> None:
    cli.start_agent()
    code, out = cli.typed(PASSWORD.encode() + b"\r", "get", "auth/JWT_KEY")  # the one prompt
    assert code == 0, out
    assert offered(complete(cli, "secrets-manager get auth/")) == list(NAMES[:2])


def test_the_store_on_the_command_line_is_the_one_listed(cli: AgentCli, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    password = {"MASTER_PASSWORD": PASSWORD}
    cli("--store", str(other), "init", "--kdf-profile", "test", env=password)
    cli("--store", str(other), "store", "elsewhere/ONLY", input=b"v", env=password)
    result = complete(cli, f"secrets-manager --store {other} get ", password)
    assert offered(result) == ["elsewhere/ONLY"]
    assert offered(complete(cli, "secrets-manager --store /nonexistent/x.db get ", password)) == []


@contextlib.contextmanager
def _a_service_and_a_hung_address(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real `serve` and an address that accepts connections and never answers (a hung host)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path)
    hung = socket.socket()
    try:
        hung.bind(("127.0.0.1", 0))
        hung.listen(5)
        yield server.address, f"127.0.0.1:{hung.getsockname()[1]}"
    finally:
        hung.close()
        server.stop()


def _completed_through(tmp_path: Path, addresses: str, words: str) -> tuple[list[str], float]:
    """What bash completion of `words` offers through --server `addresses` (it must end with
    exit 0 and nothing on stderr), and how long it took."""
    env = {
        **through_service(tmp_path, addresses),
        "_SECRETS_MANAGER_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": "2",
    }
    started = time.monotonic()
    done = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert (done.returncode, done.stderr) == (0, "")
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if line.startswith("plain,")], took


def test_a_server_that_does_not_answer_holds_the_tab_for_at_most_a_few_seconds(tmp_path: Path) -> None:
    """A --server address that accepts connections and never answers (a hung host): nothing
    completes within COMPLETION_SECONDS (3 s) and the process ends, instead of the shell waiting
    the client's 10 s deadline on each TAB; a service that answers still completes."""
    with _a_service_and_a_hung_address(tmp_path) as (served, silent):
        for address, names, limit in (
            (served, ["auth/DB_PASSWORD", "auth/JWT_KEY"], 30.0),
            (silent, [], 7.0),
        ):
            offered, took = _completed_through(tmp_path, address, "secrets-manager get ")
            assert offered == names
            assert took < limit, f"{address}: {took:.1f} s"


def test_with_several_addresses_a_hung_first_one_still_lets_names_complete(tmp_path: Path) -> None:
    """`--server A,B` with A hung (it accepts connections, never answers): A's health check took
    the whole 3 s a TAB may take (its own timeout is 3 s too), so nothing ever completed while B
    served. The health checks of a completion are shorter, so B is reached and lists in time."""
    with _a_service_and_a_hung_address(tmp_path) as (served, silent):
        offered, _ = _completed_through(tmp_path, f"{silent},{served}", "secrets-manager get auth/")
        assert offered == ["auth/DB_PASSWORD", "auth/JWT_KEY"]


def test_an_agent_key_that_no_longer_opens_the_store_audits_no_refused_unlock(
    cli: AgentCli, tmp_path: Path
) -> None:
    """The agent holds a key under this store's name that does not open it (the store file was
    replaced; its key expired between the check and the unlock): the completion gave up on it
    and went on to the password, which it may not ask for, and each TAB was audited as a refused
    unlock. Now nothing completes and nothing is audited."""
    cli.start_agent()
    code, out = cli.typed(PASSWORD.encode() + b"\r", "get", "auth/JWT_KEY")
    assert code == 0, out
    other = tmp_path / "other.db"
    password = {"MASTER_PASSWORD": PASSWORD}
    assert cli("--store", str(other), "init", "--kdf-profile", "test", env=password).code == 0
    other.replace(cli.store)  # another store, another header, under the name the agent knows
    records = len(cli.audit())
    assert offered(complete(cli, "secrets-manager get auth/")) == []
    assert offered(complete(cli, "secrets-manager get auth/")) == []
    assert cli.audit()[records:] == []


def test_a_password_file_that_cannot_be_read_audits_no_refused_unlock_per_tab(
    cli: AgentCli, tmp_path: Path
) -> None:
    """MASTER_PASSWORD_FILE naming a file that is not there, or is empty: no password was tried,
    yet each TAB was audited as a refused unlock. Now nothing completes and nothing is audited
    (the command itself still reports and audits it)."""
    empty = tmp_path / "empty-password"
    empty.write_text("")
    empty.chmod(0o600)
    records = len(cli.audit())
    for path in (tmp_path / "no-such-file", empty):
        assert offered(complete(cli, "secrets-manager get auth/", {"MASTER_PASSWORD_FILE": str(path)})) == []
    assert cli.audit()[records:] == []
