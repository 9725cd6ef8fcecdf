"""A cryptographer's review of the format (docs/format.md), as an attacker who can read and write
the storage but does not know the master password: what such a person can and cannot do to
records, the header's KDF parameters, and the keys, against real store files."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
from pathlib import Path

from service_fixtures import SCRIPT

PASSWORD = "the master password"
VALUE = b"review-SEEKRIT-value"


def _cli_env(directory: Path, store: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "SECRETS_MANAGER_STORE": str(store),
        "MASTER_PASSWORD": PASSWORD,
    }


def _run(
    env: dict[str, str], *args: str, input: bytes = b"", address_space: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    def limit() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    proc = subprocess.run(
        [str(SCRIPT), *args], input=input, capture_output=True, env=env, preexec_fn=limit, timeout=120
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc


def _entries(path: Path) -> dict[str, bytes]:
    with sqlite3.connect(path) as db:
        return {key: bytes(value) for key, value in db.execute("SELECT key, value FROM entries")}


def _edit_header_kdf(path: Path, **kdf: int) -> None:
    """What someone who may write the store file does to the header's (unencrypted) KDF object."""
    header = json.loads(_entries(path)["core/header"])
    header["unlock"]["kdf"].update(kdf)
    doc = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET value = ? WHERE key = 'core/header'", (doc,))


def test_a_header_asking_argon2id_for_more_memory_than_the_process_has_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    """Within the bounds a reader accepts (1 GiB), a doctored header can still ask for more memory
    than a process may take (a container's limit): argon2 then raises HashingError, which the old
    code let through as "internal error (HashingError) ... report it". Now: exit 1, one line
    naming the parameters and what to do, the store untouched."""
    store = tmp_path / "store.db"
    env = _cli_env(tmp_path, store)
    assert _run(env, "init", "--kdf-profile", "test").returncode == 0
    assert _run(env, "store", "svc/a", input=VALUE).returncode == 0
    _edit_header_kdf(store, memory_cost_kib=1024 * 1024, time_cost=1, parallelism=1)
    before = _entries(store)
    proc = _run(env, "get", "svc/a", address_space=768 * 1024 * 1024)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "internal error" not in err
    assert "Argon2id could not run with the parameters it was given (t=1, m=1048576 KiB, p=1)" in err
    assert "restore it from a backup" in err
    assert len(err.strip().splitlines()) == 1, err
    assert VALUE.decode() not in err and PASSWORD not in err
    assert _entries(store) == before
