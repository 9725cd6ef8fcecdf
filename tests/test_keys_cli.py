"""`secrets-manager keys …` through the real console script: the CLI contract (exit codes, one-line
errors, --json shapes, nothing changed on failure), audit records for every key operation, and a
SIGKILL in the middle of `keys rewrap` on a few thousand records followed by a rerun.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import keys as key_lifecycle

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "keys test password"
TIMEOUT = 120


@dataclass
class Result:
    code: int
    out: str
    stderr: str


class Cli:
    """Runs the console script against one store, detached from any terminal."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = tmp_path / "vault" / "store.db"
        self.audit = tmp_path / "vault" / "store.audit.jsonl"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "SECRETS_MANAGER_STORE": str(self.store),
            "MASTER_PASSWORD": PASSWORD,
        }

    def __call__(self, *args: str, input: bytes = b"", env: Mapping[str, str] | None = None) -> Result:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env={**self.env, **(env or {})},
            start_new_session=True,
            timeout=TIMEOUT,
        )
        stderr = proc.stderr.decode("utf-8", errors="replace")
        assert "Traceback" not in stderr, stderr
        return Result(proc.returncode, proc.stdout.decode("utf-8"), stderr)

    def ok(self, *args: str, input: bytes = b"") -> Result:
        result = self(*args, input=input)
        assert result.code == 0, (args, result.stderr)
        return result

    def status(self, namespace: str | None = None) -> dict[str, object]:
        doc: dict[str, object] = json.loads(
            self.ok("keys", "status", *filter(None, [namespace]), "--json").out
        )
        return doc

    def keys_of(self, namespace: str) -> dict[str, dict[str, object]]:
        """state ("primary", "enabled", ...) → the key's JSON, for a namespace with one key per state."""
        found = [k for k in self.status(namespace)["keys"] if isinstance(k, dict)]  # type: ignore[union-attr]
        return {str(k["state"]): k for k in found}

    def store_bytes(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.store.parent.glob(self.store.name + "*")}

    def entries(self) -> dict[str, bytes]:
        """What the store holds, except the audit anchor, which every audited command moves."""
        db = sqlite3.connect(self.store)
        try:
            rows = db.execute("SELECT key, value FROM entries WHERE key != 'core/audit-anchor'").fetchall()
        finally:
            db.close()
        return {key: bytes(value) for key, value in rows}

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("secrets-manager: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def create_store(cli: Cli, secrets: Iterable[tuple[str, bytes]]) -> None:
    """Make the store through the library (as `init --kdf-profile test` would, but without
    starting a process per secret)."""
    store = EncryptedStore.create(SqliteStorage(cli.store, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        store.audit_key()  # as init's audit record would
        for name, value in secrets:
            store.put(name, value)
    finally:
        store.close()


@pytest.fixture
def used(tmp_path: Path) -> Cli:
    """Secrets in two namespaces: svc/a (two versions), svc/b, other/x."""
    cli = Cli(tmp_path)
    create_store(cli, [("svc/a", b"a1"), ("svc/a", b"a2"), ("svc/b", b"b1"), ("other/x", b"x1")])
    return cli


def key_id(doc: dict[str, object]) -> str:
    return str(doc["id"])


# ---- status -------------------------------------------------------------------------------------


def test_status_json_lists_every_key_and_the_policy(used: Cli) -> None:
    doc = used.status()
    assert doc["policy"] == {"max_uses": 2**31, "max_age_days": None}
    rows = doc["keys"]
    assert isinstance(rows, list)
    assert [(k["namespace"], k["state"], k["records"], k["uses"]) for k in rows] == [
        ("other", "primary", 2, 2),
        ("svc", "primary", 5, 6),
    ]
    for key in rows:
        assert sorted(key) == ["created", "id", "namespace", "records", "state", "uses"]
        assert isinstance(key["id"], int) and 0 < key["id"] < 2**32
        assert str(key["created"]).endswith("Z")


def test_status_table_is_tab_separated_in_a_pipe_and_names_the_policy_on_stderr(used: Cli) -> None:
    result = used.ok("keys", "status", "svc")
    [line] = result.out.splitlines()
    namespace, key, state, created, uses, records = line.split("\t")
    assert (namespace, state, uses, records) == ("svc", "primary", "6", "5")
    assert key.isdigit() and created.endswith("Z")
    assert "key policy" in result.stderr and "no age limit" in result.stderr


# ---- the whole lifecycle ---------------------------------------------------------------------------


def test_rotate_rewrap_disable_destroy_keeps_every_value(used: Cli) -> None:
    old = key_id(used.keys_of("svc")["primary"])
    rotated = used.ok("keys", "rotate", "svc")
    assert "keys rewrap svc" in rotated.stderr
    assert used.keys_of("svc")["enabled"]["records"] == 5
    used.ok("keys", "rewrap", "svc")
    states = used.keys_of("svc")
    assert (key_id(states["enabled"]), states["enabled"]["records"], states["primary"]["records"]) == (
        old,
        0,
        5,
    )
    used.ok("keys", "disable", old)
    assert used.keys_of("svc")["disabled"]["records"] == 0
    used.ok("keys", "destroy", old)
    assert key_id(used.keys_of("svc")["destroyed"]) == old
    assert used.ok("get", "svc/a").out == "a2\n"
    assert used.ok("get", "svc/a", "--version", "1").out == "a1\n"
    assert used.ok("get", "svc/b").out == "b1\n"


def test_rotate_all_and_rewrap_all_cover_every_namespace(used: Cli) -> None:
    used.ok("keys", "rotate", "--all")
    assert all(len(used.status(ns)["keys"]) == 2 for ns in ("svc", "other"))  # type: ignore[arg-type]
    used.ok("keys", "rewrap", "--all")
    rows = used.status()["keys"]
    assert [(k["namespace"], k["state"], k["records"]) for k in rows] == [  # type: ignore[union-attr]
        ("other", "enabled", 0),
        ("other", "primary", 2),
        ("svc", "enabled", 0),
        ("svc", "primary", 5),
    ]


_ROTATE_AFTER_EACH_BATCH = """
import os
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store import keys
_batch = keys._rewrap_batch
def _batch_then_another_process_rotates(store, namespace, batch):
    result = _batch(store, namespace, batch)
    other = EncryptedStore.open(
        SqliteStorage(os.environ["SECRETS_MANAGER_STORE"]),
        PasswordUnlock(os.environ["MASTER_PASSWORD"], kdf.TEST),
    )
    try:
        keys.rotate_key(other, namespace)
    finally:
        other.close()
    with open(os.environ["ROTATIONS_LOG"], "a") as log:
        log.write("rotated\\n")
    return result
keys._rewrap_batch = _batch_then_another_process_rotates
"""


def test_a_rewrap_outrun_by_rotations_exits_7_saying_what_is_left_and_what_to_run(tmp_path: Path) -> None:
    """Another process rotates the namespace's key after every batch the rewrap commits (a
    sitecustomize in the rewrap's process does it through a second handle): every pass is outrun
    (a rotation puts every record under an older key again). It must not say every record is
    under the primary, and `keys disable` would then be refused anyway. (This used a thread that
    rotated whenever it saw a record under the primary, with strace slowing the rewrap's nonce
    draws so that it got the store's lock within every pass: whether it did was up to the
    machine's scheduling.)"""
    cli = Cli(tmp_path)
    create_store(cli, [(f"svc/k{i:03d}", f"value {i}".encode()) for i in range(10)])
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ROTATE_AFTER_EACH_BATCH)
    cli.ok("keys", "rotate", "svc")  # every record under an older key: the rewrap has work
    rotations = tmp_path / "rotations.log"
    outrun = cli(
        "keys", "rewrap", "svc", "--batch-size", "5",
        env={"PYTHONPATH": str(hook), "ROTATIONS_LOG": str(rotations)},
    )  # fmt: skip
    # 20 records (a value and its metadata each), 4 batches of 5 a pass, every pass outrun
    assert rotations.read_text().count("rotated") == 4 * key_lifecycle.MAX_REWRAP_PASSES
    assert_one_line_error(outrun, 7, "namespace svc: ", "records still under older keys", "keys rewrap svc")
    assert "every record is under key" not in outrun.stderr
    doc = cli.status("svc")
    keys_doc = [k for k in doc["keys"] if isinstance(k, dict)]  # type: ignore[union-attr]
    assert sum(int(k["records"]) for k in keys_doc if k["state"] != "primary") == 20
    cli.ok("keys", "rewrap", "svc")  # nothing rotating now: it finishes
    assert cli.ok("get", "svc/k007").out == "value 7\n"


def test_disable_of_a_key_in_use_exits_7_with_the_count_and_what_to_run(used: Cli) -> None:
    old = key_id(used.keys_of("svc")["primary"])
    used.ok("keys", "rotate", "svc")
    before = used.entries()
    result = used("keys", "disable", old)
    assert_one_line_error(result, 7, "5 records", "secrets-manager keys rewrap svc")
    assert used.entries() == before
    assert used.ok("get", "svc/b").out == "b1\n"


def test_the_primary_cannot_be_disabled_and_an_enabled_key_cannot_be_destroyed(used: Cli) -> None:
    old = key_id(used.keys_of("svc")["primary"])
    assert_one_line_error(used("keys", "disable", old), 7, "primary", "keys rotate svc")
    used.ok("keys", "rotate", "svc")
    used.ok("keys", "rewrap", "svc")
    assert_one_line_error(used("keys", "destroy", old), 7, f"secrets-manager keys disable {old}")


def test_enable_undoes_disable(used: Cli) -> None:
    old = key_id(used.keys_of("svc")["primary"])
    used.ok("keys", "rotate", "svc")
    used.ok("keys", "rewrap", "svc")
    used.ok("keys", "disable", old)
    used.ok("keys", "enable", old)
    assert key_id(used.keys_of("svc")["enabled"]) == old


def test_rotate_root_keeps_the_password_and_the_audit_chain(used: Cli) -> None:
    result = used.ok("keys", "rotate", "--root")
    assert "2 keysets" in result.stderr and "password is unchanged" in result.stderr
    assert used.ok("get", "other/x").out == "x1\n"
    used.ok("store", "svc/new", input=b"after root rotation")
    assert used.ok("audit", "verify").out.startswith("audit log verified")


def test_policy_is_shown_set_and_used_by_status(used: Cli) -> None:
    assert used.ok("keys", "policy").out == (
        f"key policy: a primary key rotates after {2**31} encryptions, no age limit\n"
    )
    doc = json.loads(used.ok("keys", "policy", "--max-uses", "6", "--max-age-days", "90", "--json").out)
    assert doc == {"max_uses": 6, "max_age_days": 90}
    assert used.status()["policy"] == {"max_uses": 6, "max_age_days": 90}
    assert json.loads(used.ok("keys", "policy", "--max-age-days", "0", "--json").out) == {
        "max_uses": 6,
        "max_age_days": None,
    }


def test_a_policy_of_one_is_said_in_the_singular(used: Cli) -> None:
    assert used.ok("keys", "policy", "--max-uses", "1", "--max-age-days", "1").out == (
        "key policy: a primary key rotates after 1 encryption, or once 1 day old\n"
    )
    assert used.ok("keys", "policy", "--max-uses", "2", "--max-age-days", "2").out == (
        "key policy: a primary key rotates after 2 encryptions, or once 2 days old\n"
    )


def test_a_lowered_policy_rotates_a_namespace_key_at_the_next_writes(used: Cli) -> None:
    used.ok("keys", "policy", "--max-uses", "6")  # svc's primary has sealed 6 records already
    used.ok("store", "svc/a", input=b"a3")
    states = used.keys_of("svc")
    assert (states["enabled"]["records"], states["primary"]["records"]) == (4, 2)
    assert [used.ok("get", "svc/a", "--version", v).out for v in ("1", "2", "3")] == ["a1\n", "a2\n", "a3\n"]


# ---- the CLI contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "rotate"),
        ("keys", "rotate", "svc", "--all"),
        ("keys", "rotate", "--all", "--root"),
        ("keys", "rewrap"),
        ("keys", "rewrap", "svc", "--all"),
        ("keys", "rewrap", "svc", "--batch-size", "0"),
        ("keys", "disable", "abc"),
        ("keys", "disable", "0"),
        ("keys", "destroy", str(2**32)),
        ("keys", "enable"),
        ("keys", "status", "svc/a"),
        ("keys", "rotate", "-bad"),
        ("keys", "disable", "5", "--namespace", "a/b"),
        ("keys", "policy", "--max-uses", "0"),
        ("keys", "policy", "--max-uses", str(2**31 + 1)),
        ("keys", "policy", "--max-age-days", "-1"),
        ("keys", "no-such-command"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_change_nothing(used: Cli, args: tuple[str, ...]) -> None:
    before = used.store_bytes()
    assert_one_line_error(used(*args, env={"MASTER_PASSWORD": "never asked for"}), 2)
    assert used.store_bytes() == before


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "status", "nope"),
        ("keys", "rotate", "nope"),
        ("keys", "rewrap", "nope"),
        ("keys", "disable", "12345"),
        ("keys", "enable", "12345"),
        ("keys", "destroy", "12345", "--namespace", "svc"),
    ],
)
def test_unknown_namespaces_and_key_ids_exit_3(used: Cli, args: tuple[str, ...]) -> None:
    before = used.entries()
    assert_one_line_error(used(*args), 3, "keys status")
    assert used.entries() == before


def test_a_stray_entry_makes_status_and_rewrap_exit_6_naming_it(used: Cli) -> None:
    db = sqlite3.connect(used.store)
    db.execute("INSERT INTO entries VALUES ('data/svc/a#x', ?, 999999)", (b"\x01" + bytes(40),))
    db.commit()
    db.close()
    before = used.entries()
    for args in (("keys", "status", "svc"), ("keys", "rewrap", "svc")):
        assert_one_line_error(used(*args), 6, "'data/svc/a#x' is not part of the store layout")
    assert used.entries() == before


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "status"),
        ("keys", "rotate", "svc"),
        ("keys", "rotate", "--all"),
        ("keys", "rotate", "--root"),
        ("keys", "rewrap", "svc"),
        ("keys", "disable", "12345"),
        ("keys", "enable", "12345"),
        ("keys", "destroy", "12345"),
        ("keys", "policy", "--max-uses", "5"),
    ],
)
def test_wrong_password_exits_4_and_leaves_the_store_unchanged(used: Cli, args: tuple[str, ...]) -> None:
    before = used.store_bytes()
    assert_one_line_error(used(*args, env={"MASTER_PASSWORD": "wrong"}), 4, "wrong master password")
    assert used.store_bytes() == before


def test_every_key_operation_is_audited_with_its_namespace_and_key_id(used: Cli) -> None:
    old = key_id(used.keys_of("svc")["primary"])
    used.ok("keys", "rotate", "svc")
    new = key_id(used.keys_of("svc")["primary"])
    used.ok("keys", "rewrap", "svc")
    used.ok("keys", "disable", old)
    used.ok("keys", "enable", old)
    used.ok("keys", "disable", old)
    used.ok("keys", "destroy", old)
    used.ok("keys", "policy", "--max-uses", "1000")
    used.ok("keys", "rotate", "--root")
    used("keys", "disable", "12345")
    finals = [
        (r["operation"], r["name"], r["version"], r["outcome"])
        for r in used.records()
        if str(r["operation"]).startswith("keys.") and r["outcome"] != "pending"
    ]
    root_id = finals[-2][2]
    assert finals == [
        ("keys.status", "svc", None, "ok"),
        ("keys.rotate", "svc", int(new), "ok"),
        ("keys.status", "svc", None, "ok"),
        ("keys.rewrap", "svc", None, "ok"),
        ("keys.disable", "svc", int(old), "ok"),
        ("keys.enable", "svc", int(old), "ok"),
        ("keys.disable", "svc", int(old), "ok"),
        ("keys.destroy", "svc", int(old), "ok"),
        ("keys.policy", None, None, "ok"),
        ("keys.rotate_root", None, root_id, "ok"),
        ("keys.disable", None, 12345, "not_found"),
    ]
    assert isinstance(root_id, int)
    pending = [r["operation"] for r in used.records() if r["outcome"] == "pending"]
    assert pending.count("keys.rotate") == 1 and pending.count("keys.destroy") == 1
    assert "keys.status" not in pending  # reads get one record, changes a request and a response
    assert used.ok("audit", "verify").code == 0


# ---- SIGKILL in the middle of a rewrap ---------------------------------------------------------------

SECRETS = 1200  # two versions each: 2,400 value records and 1,200 metadata records in namespace svc


def original_value(i: int, version: int) -> bytes:
    return f"secret {i} version {version} ".encode() * 3


@pytest.fixture
def big(tmp_path: Path) -> Cli:
    """A store with 3,600 records in svc (made through the library: fast) and a few in other."""
    cli = Cli(tmp_path)
    secrets = [(f"svc/k{i:05d}", original_value(i, version)) for version in (1, 2) for i in range(SECRETS)]
    create_store(cli, [*secrets, ("other/x", b"untouched")])
    return cli


def open_checking(cli: Cli) -> EncryptedStore:
    return EncryptedStore.open(SqliteStorage(cli.store), PasswordUnlock(PASSWORD, kdf.TEST))


def count_under(db: sqlite3.Connection, key: int) -> int:
    """Records of svc whose header names `key`, straight from the file (no unlock needed)."""
    row = db.execute(
        "SELECT count(*) FROM entries WHERE ((key >= 'data/svc/' AND key < 'data/svc0') "
        "OR (key >= 'meta/svc/' AND key < 'meta/svc0')) AND substr(value, 2, 4) = ?",
        (struct.pack(">I", key),),
    ).fetchone()
    return int(row[0])


def start_rewrap(cli: Cli, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(SCRIPT), "keys", "rewrap", "svc", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def check_consistent(cli: Cli, old: int, new: int) -> int:
    """Every value as written, the keyset whole and its use count in step with the records it
    sealed; return how many records are still under the old key."""
    store = open_checking(cli)
    try:
        for i in range(SECRETS):
            for version in (1, 2):
                got = store.get(f"svc/k{i:05d}", version=version).value.reveal()
                assert got == original_value(i, version), (i, version)
        assert store.get("other/x").value.reveal() == b"untouched"
        status = {info.id: info for info in key_lifecycle.key_status(store, "svc")}
        assert set(status) == {old, new}
        assert status[old].records + status[new].records == 3 * SECRETS
        assert status[new].uses == status[new].records  # counted in the same commits as the records
        return status[old].records
    finally:
        store.close()


def take_write_lock(db: sqlite3.Connection, deadline: float) -> None:
    """BEGIN IMMEDIATE in a tight loop: SQLite's own busy handler sleeps between tries and can miss
    every gap between the commits of a writer that commits back to back (it starved this test)."""
    db.execute("PRAGMA busy_timeout = 0")
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError:
            assert time.monotonic() < deadline, "could not take the store's write lock"


@pytest.mark.slow
def test_rewrap_killed_midway_leaves_every_secret_readable_and_a_rerun_finishes(big: Cli) -> None:
    total = 3 * SECRETS
    status = big.status("svc")["keys"]
    old = int(status[0]["id"])  # type: ignore[index]
    big.ok("keys", "rotate", "svc")
    new = int(big.keys_of("svc")["primary"]["id"])  # type: ignore[call-overload]

    db = sqlite3.connect(big.store, isolation_level=None, timeout=60)
    try:
        # Kill 1, at a known point: once some records are done, take the write lock, so the rewrap
        # stops at its next commit, and kill it there.
        proc = start_rewrap(big, "--batch-size", "1")
        deadline = time.monotonic() + TIMEOUT
        while count_under(db, new) == 0:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        take_write_lock(db, deadline)
        done = count_under(db, new)
        assert 0 < done < total
        kill(proc)
        db.execute("ROLLBACK")
        assert check_consistent(big, old, new) == total - done

        # Kill 2, wherever it lands (mid-commit included): as soon as it has made progress again.
        proc = start_rewrap(big, "--batch-size", "7")
        while count_under(db, new) == done and proc.poll() is None:
            time.sleep(0.001)
        if proc.poll() is None:
            kill(proc)
        else:
            proc.communicate(timeout=TIMEOUT)
        remaining = check_consistent(big, old, new)
        assert remaining < total - done
    finally:
        db.close()

    result = big("keys", "rewrap", "svc")
    assert result.code == 0, result.stderr
    assert result.out == ""  # quiet in a pipe: no progress bar
    assert f"every record is under key {new}" in result.stderr
    assert check_consistent(big, old, new) == 0
    big.ok("keys", "disable", str(old))
    big.ok("keys", "destroy", str(old))
    assert check_consistent(big, old, new) == 0
    assert big.ok("audit", "verify").out.startswith("audit log verified")


def test_rotate_all_failing_part_way_says_which_namespaces_were_rotated_and_which_not(used: Cli) -> None:
    """Each namespace's rotation is its own commit: when one fails (here svc's keyset is
    damaged), those rotated before it stay rotated, and the error must say so."""
    other_primary = key_id(used.keys_of("other")["primary"])
    db = sqlite3.connect(used.store)
    db.execute("UPDATE entries SET value = ? WHERE key = 'core/keyset/svc'", (b"\x01" + bytes(80),))
    db.commit()
    db.close()
    result = used("keys", "rotate", "--all")
    assert_one_line_error(result, 6, "rotated other (new primary key ", "not rotated: svc")
    new_primary = key_id(used.keys_of("other")["primary"])
    assert new_primary != other_primary
    assert f"rotated other (new primary key {new_primary})" in result.stderr
