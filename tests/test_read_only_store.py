"""A store this process can only read: its file's mode, a read-only directory, a read-only mount.

Reads work and are audited (the record written and fsynced; the anchor, a row in the store, cannot
move and is owed until a writable handle anchors past it); writes are refused in one line saying
why, with nothing changed; a store and log that are both read-only fail closed.

Root ignores file modes, and the interpreter lives where other users cannot run it, so the CLI
runs as root without the capabilities that override them (`setpriv --bounding-set
-dac_override,…`): its file modes then bind it as they bind any user's process."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from mounts import remount_read_only, tmpfs
from secrets_manager.environment import Environment
from secrets_manager.store.url import open_store

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "read-only test password"
VALUE = "sk-live-READ-ONLY-VALUE-51c7"
# Root without the capabilities that let it read and write past file modes.
BOUND = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def _require_setpriv() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root to drop its own file-mode overrides (setpriv --bounding-set)"
    elif shutil.which("setpriv") is None:
        why = "needs setpriv (util-linux) to run the CLI without root's file-mode overrides"
    elif subprocess.run([*BOUND, "true"], capture_output=True).returncode != 0:
        why = "setpriv cannot drop capabilities here (no CAP_SETPCAP?)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this: {why}")
        pytest.skip(why)


class Cli:
    def __init__(self, root: Path) -> None:
        self.store = root / "vault" / "store.db"
        self.audit = root / "vault" / "store.audit.jsonl"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "SECRETS_MANAGER_STORE": str(self.store),
            "MASTER_PASSWORD": PASSWORD,
        }

    def __call__(
        self, *args: str, input: bytes = b"", bound: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [*(BOUND if bound else []), str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env={**self.env, **(env or {})},
            start_new_session=True,
            timeout=60,
        )
        assert b"Traceback" not in proc.stderr, proc.stderr
        assert VALUE.encode() not in proc.stderr
        return proc

    def files(self) -> dict[str, bytes]:
        """The store's files (the database, and any -wal, -shm, -journal), by name."""
        return {p.name: p.read_bytes() for p in self.store.parent.glob(self.store.name + "*")}

    def records(self, log: Path | None = None) -> list[dict[str, object]]:
        return [json.loads(line) for line in (log or self.audit).read_text().splitlines()]

    def anchor_seq(self) -> int:
        store = open_store(str(self.store), PASSWORD.encode(), environment=Environment.DEVELOPMENT, actor="t")
        try:
            anchor = store.audit_anchor()
            assert anchor is not None
            return anchor.seq
        finally:
            store.close()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    _require_setpriv()
    c = Cli(tmp_path)
    assert c("init", "--kdf-profile", "test", bound=False).returncode == 0
    assert c("store", "app/API_KEY", input=VALUE.encode(), bound=False).returncode == 0
    return c


def _reads_work_and_writes_are_refused(cli: Cli, why: str, *, env: Mapping[str, str] | None = None) -> None:
    """The reads of a read-only store answer and are recorded; a write is refused in one line
    naming `why`; the store's files are byte for byte as they were, and no -wal or -shm appeared."""
    before = cli.files()
    log = Path((env or {}).get("SECRETS_MANAGER_AUDIT_FILE", cli.audit))
    records = len(cli.records(log))
    got = cli("get", "app/API_KEY", env=env)
    assert got.returncode == 0, got.stderr
    assert got.stdout == VALUE.encode() + b"\n"
    listed = cli("list", env=env)
    assert listed.returncode == 0 and listed.stdout == b"app/API_KEY\n", listed.stderr
    assert cli("history", "app/API_KEY", env=env).returncode == 0
    assert cli("metadata", "app/API_KEY", env=env).returncode == 0
    ran = cli(
        "run", "--secret", "app/API_KEY=API_KEY", "--", "sh", "-c", 'test "$API_KEY" = ' + VALUE, env=env
    )
    assert ran.returncode == 0, ran.stderr
    stored = cli("store", "app/API_KEY", input=b"never stored", env=env)
    assert stored.returncode == 1
    lines = stored.stderr.decode().splitlines()
    assert len(lines) == 1 and "is read-only (" in lines[0] and why in lines[0], lines
    assert "nothing was changed" in lines[0]
    assert cli.files() == before  # no byte changed, and no -wal or -shm made beside it
    new = cli.records(log)[records:]
    operations = [(r["operation"], r["outcome"]) for r in new if r["operation"] != "unlock"]
    assert operations == [
        ("get", "ok"),
        ("list", "ok"),
        ("history", "ok"),
        ("history", "ok"),
        ("run", "ok"),
        ("store", "storage_error"),
    ]
    assert all(r["mac"] for r in new)  # signed with the audit key, as every authenticated record


def _writable_again_catches_up(cli: Cli, *, env: Mapping[str, str] | None = None) -> None:
    """The store writable again: the next command anchors past the records the read-only ones
    owed, and the whole log verifies."""
    log = Path((env or {}).get("SECRETS_MANAGER_AUDIT_FILE", cli.audit))
    owed = cli.records(log)[-1]["seq"]
    assert isinstance(owed, int) and cli.anchor_seq() < owed
    stored = cli("store", "app/API_KEY", input=b"second", env=env)
    assert stored.returncode == 0, stored.stderr
    assert cli.anchor_seq() == cli.records(log)[-1]["seq"]
    verified = cli("audit", "verify", env=env)
    assert verified.returncode == 0, verified.stderr


def test_a_store_file_of_mode_0400_is_read_and_audited_and_writes_are_refused(cli: Cli) -> None:
    """Every command used to fail on it (the audit anchor could not move), after writing its
    record, and left -wal and -shm files of mode 0400 that kept the store read-only once it was
    made writable again."""
    cli.store.chmod(0o400)
    _reads_work_and_writes_are_refused(cli, "its mode 0400 does not let this user (root) write it")
    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["read_only"] is True
    cli.store.chmod(0o600)
    _writable_again_catches_up(cli)


def test_another_users_store_readable_by_group_is_read(cli: Cli) -> None:
    """A store of another user, 0440 with a group this user is in: read, never written (SQLite
    made its -shm beside it owned by the reader, which then kept the owner from writing)."""
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(cli.store, nobody, 0)
    cli.store.chmod(0o440)
    _reads_work_and_writes_are_refused(cli, "owner nobody")
    os.chown(cli.store, 0, 0)
    cli.store.chmod(0o600)
    _writable_again_catches_up(cli)


def test_a_store_in_a_read_only_directory_is_read(cli: Cli, tmp_path: Path) -> None:
    """A directory that cannot take SQLite's -wal and -shm: reads work; the log elsewhere."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    moved = logs / "store.audit.jsonl"
    cli.audit.rename(moved)
    Path(f"{cli.audit}.lock").unlink()
    env = {"SECRETS_MANAGER_AUDIT_FILE": str(moved)}
    cli.store.parent.chmod(0o500)
    try:
        _reads_work_and_writes_are_refused(cli, f"its directory {cli.store.parent} is not writable", env=env)
    finally:
        cli.store.parent.chmod(0o700)
    _writable_again_catches_up(cli, env=env)


@pytest.fixture
def read_only_mount(cli: Cli, tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding a copy of the store and its log, remounted read-only."""
    with tmpfs(tmp_path / "mounted", "4m") as mount_point:
        for name in ("store.db", "store.audit.jsonl"):
            shutil.copy2(cli.store.parent / name, mount_point / name)
        remount_read_only(mount_point)
        yield mount_point


def test_a_store_and_log_on_a_read_only_mount(cli: Cli, read_only_mount: Path, tmp_path: Path) -> None:
    """Both read-only: every command fails closed, saying to copy the log somewhere writable;
    with that copy as --audit-file, reads (and a backup to a writable place) work and are
    recorded there, and writes are refused as the store is on a read-only file system. Even root
    with every capability cannot write there."""
    store = read_only_mount / "store.db"
    env = {"SECRETS_MANAGER_STORE": str(store)}
    for bound in (True, False):
        got = cli("get", "app/API_KEY", env=env, bound=bound)
        assert got.returncode == 1 and got.stdout == b""
        message = got.stderr.decode()
        assert "cannot write audit log" in message and "Read-only file system" in message, message
        assert "copy the log (with its rotated files) to a directory this user can write" in message
    copy = tmp_path / "copy" / "audit.jsonl"
    copy.parent.mkdir(mode=0o700)
    shutil.copy2(read_only_mount / "store.audit.jsonl", copy)
    env["SECRETS_MANAGER_AUDIT_FILE"] = str(copy)
    for bound in (True, False):
        got = cli("get", "app/API_KEY", env=env, bound=bound)
        assert got.returncode == 0 and got.stdout == VALUE.encode() + b"\n", got.stderr
        stored = cli("store", "app/API_KEY", input=b"never stored", env=env, bound=bound)
        assert stored.returncode == 1
        assert f"it is on a read-only file system ({read_only_mount})" in stored.stderr.decode()
    backup = tmp_path / "backup.smb"
    made = cli("backup", str(backup), env=env)
    assert made.returncode == 0, made.stderr
    assert cli("backup", "verify", str(backup), env=env).returncode == 0
    assert [r["operation"] for r in cli.records(copy)[-2:]] == ["backup", "backup"]
    # The same store, writable, with the copy as its log: the copy's records are anchored.
    del env["SECRETS_MANAGER_STORE"]
    _writable_again_catches_up(cli, env=env)


def test_the_sdk_reads_a_store_on_a_read_only_mount(cli: Cli, read_only_mount: Path) -> None:
    """The SDK's local mode (no service, development) reads the store where it is mounted."""
    program = (
        "import secrets_manager as sm\n"
        "creds = sm.get_credentials_sync('app')\n"
        f"assert creds['API_KEY'].reveal_text() == {VALUE!r}\n"
        "print(sorted(creds))\n"
    )
    env = {**cli.env, "SECRETS_MANAGER_STORE": str(read_only_mount / "store.db")}
    ran = subprocess.run(
        [*BOUND, sys.executable, "-c", program],
        capture_output=True,
        env=env,
        timeout=60,
        start_new_session=True,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == b"['API_KEY']\n"


def test_serve_reads_a_store_on_a_read_only_mount(tmp_path: Path) -> None:
    """`serve` over a store mounted read-only, its log in a writable place: reads answer and are
    recorded, a write is refused saying the store is read-only (nothing changed), and at
    shutdown the records it could not anchor are said to wait for a command that can write it."""
    from service_fixtures import PASSWORD as SERVICE_PASSWORD
    from service_fixtures import SEED, make_pki, make_store, start_server

    make_pki(tmp_path)
    make_store(tmp_path)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": SERVICE_PASSWORD,
        "SECRETS_MANAGER_STORE": str(tmp_path / "store.db"),
    }
    listed = subprocess.run([str(SCRIPT), "list"], env=environment, capture_output=True, timeout=60)
    assert listed.returncode == 0, listed.stderr  # the log begun, and the store anchored
    with tmpfs(tmp_path / "mounted", "4m") as mount_point:
        shutil.copy2(tmp_path / "store.db", mount_point / "store.db")
        remount_read_only(mount_point)
        log = tmp_path / "store.audit.jsonl"
        server = start_server(
            tmp_path, store=str(mount_point / "store.db"), settings=f'audit_file = "{log}"\n'
        )
        try:
            got = server.cli("auth", "get", "auth/DB_PASSWORD")
            assert got.returncode == 0 and got.stdout == SEED["auth/DB_PASSWORD"] + b"\n", got.stderr
            refused = server.cli("writer", "store", "auth/NEW", input=b"never stored")
            assert refused.returncode == 1
            assert "is read-only (it is on a read-only file system" in refused.stderr.decode(), refused.stderr
        finally:
            server.stop()
        said = "".join(server.log_lines)
        assert '"event": "service.store_read_only"' in said, said
        assert "they are anchored by the first command that can write the store" in said, said
        outcomes = [(r["operation"], r["outcome"]) for r in server.audit_records()]
        assert outcomes[-6:] == [
            ("serve", "pending"),
            ("serve", "ok"),
            ("get", "ok"),
            ("store", "pending"),
            ("store", "storage_error"),
            ("serve.stop", "ok"),  # appended and fsynced; its anchor owed, as the others'
        ]
    # The writable original, with the same log: the records serve wrote are anchored now.
    assert subprocess.run([str(SCRIPT), "list"], env=environment, capture_output=True).returncode == 0
    verified = subprocess.run([str(SCRIPT), "audit", "verify"], env=environment, capture_output=True)
    assert verified.returncode == 0, verified.stderr


def _log_files(cli: Cli) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cli.audit.parent.glob(cli.audit.name + "*")}


def test_audit_prune_and_reset_leave_the_log_of_a_read_only_store_as_it_was(cli: Cli) -> None:
    """`audit prune` deleted files after a prune record the store could not anchor, and `audit
    reset` set every file of the log aside before failing to reset the anchor (the log then held
    no records while the store anchored some: every command refused). Both are refused first."""
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "1500"}
    for _ in range(4):
        assert cli("get", "app/API_KEY", env=small, bound=False).returncode == 0
    assert len(list(cli.audit.parent.glob("store.audit.jsonl.0*"))) >= 2  # rotated files to prune
    cli.store.chmod(0o400)
    before = _log_files(cli)
    pruned = cli("audit", "prune", "--keep-files", "0", env=small)
    assert pruned.returncode == 1
    assert "is read-only (its mode 0400" in pruned.stderr.decode(), pruned.stderr
    assert _log_files(cli) == before
    first = sorted(cli.audit.parent.glob("store.audit.jsonl.0*"))[0]
    lines = first.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"actor":"root"', b'"actor":"toor"')  # an edited record: reset may run
    first.write_bytes(b"".join(lines))
    assert cli("audit", "verify").returncode == 6
    damaged = _log_files(cli)
    reset = cli("audit", "reset", "--accept-loss")
    assert reset.returncode == 1
    assert "is read-only (its mode 0400" in reset.stderr.decode(), reset.stderr
    assert _log_files(cli) == damaged  # nothing renamed, nothing appended
    cli.store.chmod(0o600)
    assert cli("audit", "reset", "--accept-loss").returncode == 0  # writable: it runs
    assert cli("audit", "verify").returncode == 0
