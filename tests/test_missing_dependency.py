"""A dependency missing from the Python environment (an image that installed the wheel with
`pip install --no-deps` and only some packages, or one removed since): the embedded store works
without the other stores' libraries, and a command that needs a missing one says which package
to install, in one line with exit 1, instead of "internal error (ModuleNotFoundError)" or a
traceback.

A module is made missing as Python itself treats one: None in sys.modules makes its import raise
ModuleNotFoundError, naming it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The console script's own entry point, with the modules named in argv[1] missing.
WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = ["secrets-manager", *sys.argv[2:]]
from secrets_manager_entry import main
main()
"""
STORE_LIBRARIES = "hvac,boto3,botocore,psycopg"


def run_without(modules: str, *args: str, home: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "MASTER_PASSWORD": "demo-only",
        "VAULT_TOKEN": "a-token",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, modules, *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_the_embedded_store_works_without_the_other_stores_libraries(tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "demo.db")]
    for args, stdin in (
        ([*store, "init", "--kdf-profile", "test"], b""),
        ([*store, "store", "BINANCE_API_KEY"], b"my-api-key\n"),
    ):
        done = run_without(STORE_LIBRARIES, *args, home=tmp_path, stdin=stdin)
        assert done.returncode == 0, done.stderr
    got = run_without(STORE_LIBRARIES, *store, "get", "BINANCE_API_KEY", home=tmp_path)
    assert (got.returncode, got.stdout) == (0, "my-api-key\n"), got.stderr


@pytest.mark.parametrize(
    ("url", "package"),
    [
        ("vault://127.0.0.1:1/secret", "'hvac'"),
        ("aws-secretsmanager://us-east-1/app/", "'boto3'"),
        ("postgresql://app@127.0.0.1:1/secrets", "'psycopg[binary]'"),
    ],
)
def test_a_store_whose_library_is_missing_names_the_package_to_install(
    tmp_path: Path, url: str, package: str
) -> None:
    done = run_without(STORE_LIBRARIES, "--store", url, "list", home=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"secrets-manager: error: the Python package {package}, which secrets-manager needs"
    )
    assert f"pip install {package}" in line and sys.prefix in line
    assert "internal error" not in line


def test_a_missing_dependency_of_the_cli_itself_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = run_without("click", "--version", home=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("secrets-manager: error: the Python package 'click', which secrets-manager needs")
    assert "pip install 'click'" in line
