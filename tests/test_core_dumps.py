"""The CLI and `serve` keep the master password and decrypted values out of core dumps.

A review found `kill -SEGV` of a production `serve` (with `ulimit -c unlimited`) wrote a core file
holding the master password in the clear."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_fixtures import PASSWORD, make_pki, make_store, start_server

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_CORE and PR_SET_DUMPABLE are Linux's")


@pytest.fixture(autouse=True)
def _core_dumps_allowed() -> Iterator[None]:
    """As after `ulimit -c unlimited` (up to the hard limit): the processes started inherit it, so
    a limit of 0 in them is their own doing, whatever the machine's default."""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    if before[1] == 0:
        why = "the hard core-file limit is 0 here: no process can dump core, so nothing shows ours off"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    resource.setrlimit(resource.RLIMIT_CORE, (before[1], before[1]))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, before)


def core_limits(pid: int) -> tuple[str, str]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max core"))
    soft, hard = line.split()[4:6]
    return soft, hard


def test_serve_runs_with_core_dumps_off(tmp_path: Path) -> None:
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path)
    try:
        assert core_limits(server.process.pid)[0] == "0"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("environment", "dumpable"), [("production", False), ("staging", False), ("development", True)]
)
def test_the_cli_is_not_dumpable_outside_development(environment: str, dumpable: bool) -> None:
    """PR_SET_DUMPABLE 0 also stops a dump through a core_pattern pipe (systemd-coredump), which
    RLIMIT_CORE does not; development keeps it, so a developer's profiler can attach."""
    probe = (
        "import sys\n"
        "from secrets_manager.cli import main\n"
        "from secrets_manager.core_dumps import dumpable\n"
        "import resource\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(dumpable(), resource.getrlimit(resource.RLIMIT_CORE)[0], file=sys.stderr)\n"
    )
    env = {**os.environ, "SHRIVENQUANT_ENV": environment}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.stderr.split()[-2:] == [str(dumpable), "0"], done.stderr


def test_a_program_run_with_secrets_inherits_no_core_dumps(tmp_path: Path) -> None:
    """`run`'s program holds the secrets in its environment: it starts with the soft limit 0 too
    (the hard limit is left, so it may raise it again)."""
    store = make_store(tmp_path)
    script = Path(sys.executable).with_name("secrets-manager")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": PASSWORD,
        "SECRETS_MANAGER_STORE": str(store),
    }
    done = subprocess.run(
        [str(script), "run", "--service", "auth", "--", "sh", "-c", "grep 'Max core' /proc/self/limits"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[4] == "0"
