"""The CLI run by a user with no home directory: a container run as a user ID the password
database does not name (`docker run --user 12345`, OpenShift's random UIDs) with HOME unset. The
default store file and the default audit log of a PostgreSQL, Vault or AWS store live in the
home directory, so a command that needs one says to pass --store (or set HOME), exit 2; one given
--store works as anywhere.

The password database is made to lack the user as Python sees it: pwd.getpwuid raises KeyError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The console script's own entry point, run as a user the password database does not name.
NO_PASSWD_ENTRY = """
import pwd, sys

def no_entry(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")

pwd.getpwuid = no_entry
sys.argv = ["secrets-manager", *sys.argv[1:]]
from secrets_manager_entry import main
main()
"""


def run_homeless(*args: str, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "MASTER_PASSWORD": "demo-only"}  # no HOME, no XDG_DATA_HOME
    return subprocess.run(
        [sys.executable, "-c", NO_PASSWD_ENTRY, *args],
        input=stdin.decode(),
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_the_default_store_without_a_home_directory_says_to_pass_store(tmp_path: Path) -> None:
    for args in (["list"], ["init", "--kdf-profile", "test"]):
        done = run_homeless(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(
            "secrets-manager: error: no home directory for secrets-manager's default files"
        )
        assert f"user ID {os.getuid()}" in line and "pass --store" in line and "set HOME" in line
    assert list(tmp_path.iterdir()) == []  # no store made relative to the working directory


def test_a_store_given_by_path_works_without_a_home_directory(tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "secrets.db")]
    for args, stdin in (
        ([*store, "init", "--kdf-profile", "test"], b""),
        ([*store, "store", "BINANCE_API_KEY"], b"my-api-key\n"),
    ):
        done = run_homeless(*args, cwd=tmp_path, stdin=stdin)
        assert done.returncode == 0, done.stderr
    got = run_homeless(*store, "get", "BINANCE_API_KEY", cwd=tmp_path)
    assert (got.returncode, got.stdout) == (0, "my-api-key\n"), got.stderr
