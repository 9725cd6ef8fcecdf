"""`audit rotate-key`: a new audit key that keeps the one chain (docs/audit.md §3a). Records
before the rotation verify under the old key, the rotation record (MAC'd under the old key)
names the new one, and every record after it is under the new key: one made with the old key
after it is a forgery. Other writers (a running `serve`, a later CLI) pick the new key up."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.audit.records import canonical, record_hash
from secrets_manager.crypto import kdf
from secrets_manager.crypto.mac import record_mac, value_fingerprint
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.base import AUDIT_KEYS_RECHECK_SECONDS, AuditedStore
from secrets_manager.store.vault import VaultStore, connect_vault
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import PASSWORD, SEED, Server, make_pki, make_store, run_script, start_server
from store_differ import four_cli_stores
from test_audit import PASSWORD as CLI_PASSWORD
from test_audit import Cli
from test_read_only_store import BOUND, _require_setpriv
from test_store_aws import aws_client
from vault_server import FakeVault


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    assert c("init", "--kdf-profile", "test").returncode == 0
    return c


def _keys(store_path: Path, password: str) -> tuple[bytes, ...]:
    store = EncryptedStore.open(SqliteStorage(store_path), PasswordUnlock(password, kdf.TEST))
    try:
        return store.audit_keys()
    finally:
        store.close()


def _authenticated(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in records if r.get("mac") is not None]


def test_records_after_a_rotation_are_under_the_new_key_and_the_chain_verifies(cli: Cli) -> None:
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    head_before = cli("audit", "head")
    assert head_before.returncode == 0, head_before.stderr
    rotated = cli("audit", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert b"audit key 2 is in force" in rotated.stderr
    assert cli("get", "auth/DB_PASSWORD").returncode == 0
    records = cli.records()
    at = next(
        i for i, r in enumerate(records) if r["operation"] == "audit.rotate_key" and r["outcome"] == "ok"
    )
    rotation = records[at]
    assert rotation["version"] == 2 and "key_id" not in rotation  # under the old key, naming the new
    assert all("key_id" not in r for r in records[:at])
    after = _authenticated(records[at + 1 :])
    assert after and all(r["key_id"] == 2 for r in after)
    keys = _keys(cli.store, CLI_PASSWORD)
    assert len(keys) == 2 and keys[0] != keys[1]
    assert record_mac(keys[0], str(rotation["hash"])) == rotation["mac"]
    assert all(record_mac(keys[1], str(r["hash"])) == r["mac"] for r in after)
    # the value fingerprint of the read after the rotation is under the new key
    get = next(r for r in records[at:] if r["operation"] == "get")
    single = cli("audit", "hash", input=b"db-pass")
    assert single.stdout.decode().strip() == get["value_hmac"]
    verified = cli("audit", "verify")
    assert verified.returncode == 0, verified.stderr
    # a head shipped before the rotation, and one after, are both still checked
    for head in (head_before.stdout.decode().strip(), cli("audit", "head").stdout.decode().strip()):
        witnessed = cli("audit", "verify", "--witness", head)
        assert witnessed.returncode == 0, witnessed.stderr


def test_audit_show_finds_a_values_records_under_every_audit_key_they_were_written_under(cli: Cli) -> None:
    """The leaked-value runbook: 'audit hash' fingerprints under the key in force only, so the
    reads of a leaked value from before an 'audit rotate-key' were not found by its fingerprint.
    'audit hash --every-key' gives one per key (oldest first), and 'audit show --value-hmac'
    selects the records of any of them."""
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    assert cli("get", "auth/DB_PASSWORD").returncode == 0
    assert cli("audit", "rotate-key").returncode == 0
    assert cli("get", "auth/DB_PASSWORD").returncode == 0
    assert cli("store", "auth/OTHER", input=b"another value").returncode == 0
    every = cli("audit", "hash", "--every-key", input=b"db-pass")
    assert every.returncode == 0, every.stderr
    old, new = every.stdout.decode().splitlines()
    assert new == cli("audit", "hash", input=b"db-pass").stdout.decode().strip() != old
    records = cli.records()
    of_the_value = [r for r in records if r.get("value_hmac") in (old, new)]
    assert [(r["operation"], r.get("key_id")) for r in of_the_value if r["outcome"] == "ok"] == [
        ("store", None),
        ("get", None),
        ("get", 2),
    ]
    assert any(r.get("value_hmac") not in (None, old, new) for r in records)  # auth/OTHER's

    def shown(*fingerprints: str) -> list[dict[str, Any]]:
        args = [arg for fingerprint in fingerprints for arg in ("--value-hmac", fingerprint)]
        result = cli("audit", "show", "--json", *args)
        assert result.returncode == 0, result.stderr
        found: list[dict[str, Any]] = json.loads(result.stdout)
        return found

    assert [r["request_id"] for r in shown(old, new)] == [r["request_id"] for r in of_the_value]
    assert [r["request_id"] for r in shown(new)] == [
        r["request_id"] for r in of_the_value if r["value_hmac"] == new
    ]
    refused = cli("audit", "show", "--value-hmac", "db-pass")  # the value itself, by mistake
    assert refused.returncode == 2
    assert refused.stderr.decode().strip().splitlines() == [
        "secrets-manager: error: --value-hmac takes a value's fingerprint, as 'secrets-manager audit "
        "hash' prints it (hmac-sha256: and 64 hex digits), never the value"
    ]


def test_a_record_made_with_the_retired_key_after_the_rotation_is_a_forgery(cli: Cli) -> None:
    old_key = _keys(cli.store, CLI_PASSWORD)[0]  # what a leaked copy of the store holds
    assert cli("audit", "rotate-key").returncode == 0
    last = cli.records()[-1]
    forged: dict[str, object] = {
        "actor": "mallory",
        "decision": "allow",
        "name": "auth/DB_PASSWORD",
        "operation": "get",
        "outcome": "ok",
        "peer": None,
        "prev": last["hash"],
        "request_id": "00000000-0000-4000-8000-000000000000",
        "seq": int(str(last["seq"])) + 1,
        "source": "cli",
        "time": last["time"],
        "value_hmac": None,
        "version": 1,
    }
    forged["hash"] = record_hash(forged)
    forged["mac"] = record_mac(old_key, str(forged["hash"]))
    with cli.audit.open("ab") as handle:
        handle.write(canonical(forged) + b"\n")
    found = cli("audit", "verify")
    assert found.returncode == 6
    assert b"retired audit key is a forgery" in found.stderr
    # the same forgery claiming the new key does not verify either
    lines = cli.audit.read_bytes().splitlines(keepends=True)[:-1]
    forged.pop("mac")
    forged["key_id"] = 2
    forged["hash"] = record_hash(forged)
    forged["mac"] = record_mac(old_key, str(forged["hash"]))
    cli.audit.write_bytes(b"".join(lines) + canonical(forged) + b"\n")
    again = cli("audit", "verify")
    assert again.returncode == 6
    assert b"MAC does not match" in again.stderr


def test_a_rotation_whose_record_was_lost_is_recorded_by_the_next_writer(cli: Cli) -> None:
    """The crash point between storing the new key and appending its record: the log stays under
    the old key (it verifies), and the next writer that reads the new key records the rotation
    (under the old key) before its own records, which are under the new one."""
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    store = EncryptedStore.open(SqliteStorage(cli.store), PasswordUnlock(CLI_PASSWORD, kdf.TEST))
    try:
        assert store.rotate_audit_key() == 2  # the key stored; the process dies before its record
    finally:
        store.close()
    verified = cli("audit", "verify")
    assert verified.returncode == 0, verified.stderr
    before = len(cli.records())
    assert cli("get", "auth/DB_PASSWORD").returncode == 0
    new = cli.records()[before:]
    assert new[0]["operation"] == "audit.rotate_key" and new[0]["version"] == 2 and "key_id" not in new[0]
    assert all(r["key_id"] == 2 for r in new[1:])
    assert cli("audit", "verify").returncode == 0


def test_rotate_key_is_refused_without_the_password(cli: Cli) -> None:
    wrong = cli("audit", "rotate-key", env={"MASTER_PASSWORD": "wrong"})
    assert wrong.returncode == 4
    assert len(wrong.stderr.decode().strip().splitlines()) == 1
    assert len(_keys(cli.store, CLI_PASSWORD)) == 1
    assert cli("audit", "verify").returncode == 0


def test_rotate_key_is_refused_on_a_store_this_process_can_only_read(cli: Cli) -> None:
    _require_setpriv()
    os.chmod(cli.store, 0o400)
    try:
        before = cli.store.read_bytes()
        refused = cli("audit", "rotate-key", prefix=tuple(BOUND))
        assert cli.store.read_bytes() == before
    finally:
        os.chmod(cli.store, 0o600)
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "is read-only (" in lines[0], lines
    assert len(_keys(cli.store, CLI_PASSWORD)) == 1
    assert cli.records()[-1]["operation"] == "audit.rotate_key"
    assert cli.records()[-1]["outcome"] == "storage_error"
    assert cli("audit", "verify").returncode == 0


def test_rotate_key_is_refused_through_a_server(cli: Cli) -> None:
    refused = cli("audit", "rotate-key", env={"SECRETS_MANAGER_ADDR": "127.0.0.1:1"})
    assert refused.returncode == 2
    assert b"local store only" in refused.stderr


def _served(tmp_path: Path) -> tuple[Server, dict[str, str], Path]:
    """A real serve on a new SQLite store, the CLI's environment on that store, and its path."""
    make_pki(tmp_path)
    store_path = make_store(tmp_path)
    running = start_server(tmp_path)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": str(store_path),
        "MASTER_PASSWORD": PASSWORD,
    }
    return running, environ, store_path


def test_a_running_serve_writes_under_the_new_key_after_a_rotation(tmp_path: Path) -> None:
    running, environ, store_path = _served(tmp_path)
    try:
        stub = running.stub("auth")
        stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        rotated = run_script(environ, "audit", "rotate-key")
        assert rotated.returncode == 0, rotated.stderr
        stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
    finally:
        running.stop()
    records = [json.loads(line) for line in (tmp_path / "store.audit.jsonl").read_text().splitlines()]
    at = max(
        i for i, r in enumerate(records) if r["operation"] == "audit.rotate_key" and r["outcome"] == "ok"
    )
    served = [r for r in records[at + 1 :] if r["source"] == "grpc" and r["operation"] == "get"]
    assert len(served) == 2 and all(r["key_id"] == 2 for r in served)
    assert all(r["key_id"] == 2 for r in _authenticated(records[at + 1 :]))
    keys = _keys(store_path, PASSWORD)
    assert all(record_mac(keys[1], r["hash"]) == r["mac"] for r in served)
    # Its first read after the rotation was fingerprinted before it met the rotation in the log
    # (docs/audit.md §3a): recorded without a fingerprint, never one under the retired key, which
    # an old copy's holder could test guesses against; the next, from its read cache, anew. Unless
    # serve met the rotation first: its audit health probe appends (no record) every 2 s, reading
    # the log's tail, so one that ran between the rotation and the read gave it the new key.
    value = SEED["auth/DB_PASSWORD"]
    assert served[0]["value_hmac"] in (None, value_fingerprint(keys[1], value))
    assert served[1]["value_hmac"] == value_fingerprint(keys[1], value)
    assert all(r.get("value_hmac") != value_fingerprint(keys[0], value) for r in records[at + 1 :])
    verified = run_script(environ, "audit", "verify")
    assert verified.returncode == 0, verified.stderr


def test_a_listing_paged_across_an_audit_key_rotation_goes_on_to_its_end(tmp_path: Path) -> None:
    """A page token holds a MAC under the store's audit key: once serve had moved to the key an
    'audit rotate-key' made, a token it issued before was refused (INVALID_ARGUMENT, start
    again), so a listing or get_credentials() paging through the rotation failed."""
    running, environ, _ = _served(tmp_path)
    try:
        stub = running.stub("ops")
        first = stub.ListSecrets(pb.ListSecretsRequest(page_size=1), timeout=10)
        assert first.next_page_token
        rotated = run_script(environ, "audit", "rotate-key")
        assert rotated.returncode == 0, rotated.stderr
        stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)  # serve meets key 2
        names, token = [s.name for s in first.secrets], first.next_page_token
        while token:
            page = stub.ListSecrets(pb.ListSecretsRequest(page_size=1, page_token=token), timeout=10)
            names += [s.name for s in page.secrets]
            token = page.next_page_token
    finally:
        running.stop()
    assert names == sorted(SEED)
    records = [json.loads(line) for line in (tmp_path / "store.audit.jsonl").read_text().splitlines()]
    assert any(r.get("key_id") == 2 and r["operation"] == "list" for r in records)  # paged under key 2


def _lose_the_store(cli: Cli) -> None:
    for path in cli.store.parent.glob(cli.store.name + "*"):
        path.unlink()


def test_a_store_restored_from_a_copy_made_after_a_rotation_verifies_the_log_across_it(cli: Cli) -> None:
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    assert cli("audit", "rotate-key").returncode == 0
    assert cli("get", "auth/DB_PASSWORD").returncode == 0
    copy = cli.store.parent / "copy.smbackup"
    assert cli("backup", str(copy)).returncode == 0
    _lose_the_store(cli)  # the store file is lost; its log survives
    restored = cli("restore", str(copy))
    assert restored.returncode == 0, restored.stderr
    assert len(_keys(cli.store, CLI_PASSWORD)) == 2
    assert cli("get", "auth/DB_PASSWORD").returncode == 0
    assert cli.records()[-1]["key_id"] == 2
    verified = cli("audit", "verify")
    assert verified.returncode == 0, verified.stderr


def test_a_copy_made_before_a_rotation_is_refused_over_the_log_that_spans_it(cli: Cli) -> None:
    """That copy lacks the new key, so the log's records after the rotation cannot be checked:
    refused as another store's log (exit 7), up front, nothing built."""
    copy = cli.store.parent / "copy.smbackup"
    assert cli("backup", str(copy)).returncode == 0
    assert cli("audit", "rotate-key").returncode == 0
    _lose_the_store(cli)
    refused = cli("restore", str(copy))
    assert refused.returncode == 7, refused.stderr
    assert not cli.store.exists()


def test_on_the_four_stores_audit_rotate_key_rotates_and_later_reads_are_under_key_2(
    tmp_path: Path, postgres_cluster: Any, fake_vault: FakeVault, moto_endpoint: str
) -> None:
    """SQLite, PostgreSQL, Vault and AWS alike: the rotation lands (key 2), a read after it is
    recorded under key 2 with the value's fingerprint under the new key (what `audit hash` says),
    and the log verifies across the rotation."""
    urls, environs = four_cli_stores(
        tmp_path,
        postgres_cluster,
        fake_vault.address,
        fake_vault.root_token,
        moto_endpoint,
        password=CLI_PASSWORD,
        aws_prefix="akey",
    )
    for label, url in urls.items():
        log = tmp_path / f"{label}.audit.jsonl"
        environ = {**environs[label], "SECRETS_MANAGER_STORE": url, "SECRETS_MANAGER_AUDIT_FILE": str(log)}
        assert run_script(environ, "store", "app/KEY", input=b"value").returncode == 0
        rotated = run_script(environ, "audit", "rotate-key")
        assert rotated.returncode == 0, (label, rotated.stderr)
        assert b"audit key 2 is in force" in rotated.stderr, (label, rotated.stderr)
        assert run_script(environ, "get", "app/KEY").returncode == 0
        records = [json.loads(line) for line in log.read_text().splitlines()]
        [read] = [r for r in records if r["operation"] == "get"]
        hashed = run_script(environ, "audit", "hash", input=b"value")
        assert hashed.returncode == 0, (label, hashed.stderr)
        assert read["key_id"] == 2 and read["value_hmac"] == hashed.stdout.decode().strip(), (label, read)
        assert any(r["operation"] == "audit.rotate_key" and r["outcome"] == "ok" for r in records), label
        verified = run_script(environ, "audit", "verify")
        assert verified.returncode == 0, (label, verified.stderr)


def test_a_new_chain_after_a_rotation_begins_under_the_newest_key(cli: Cli) -> None:
    """`audit reset` keeps the keys: the new chain's first record is under the newest one, and the
    log verifies (status too)."""
    assert cli("audit", "rotate-key").returncode == 0
    cli.audit.unlink()  # the log lost
    reset = cli("audit", "reset", "--accept-loss")
    assert reset.returncode == 0, reset.stderr
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    records = cli.records()
    assert records[0]["operation"] == "audit.reset" and records[0]["seq"] == 1
    assert all(r["key_id"] == 2 for r in _authenticated(records))
    assert not any(r["operation"] == "audit.rotate_key" for r in records)
    assert cli("audit", "verify").returncode == 0
    assert cli("status").returncode == 0


def test_audit_help_names_the_key_rotation(cli: Cli) -> None:
    shown = cli("audit", "--help")
    assert shown.returncode == 0
    assert b"and rotate its key" in shown.stdout and b"rotate-key" in shown.stdout


def test_a_log_pruned_past_its_rotation_record_still_verifies(cli: Cli) -> None:
    """The chain then begins under the new key: its first record with a MAC sets the key in force."""
    small = {"SECRETS_MANAGER_AUDIT_MAX_BYTES": "1500"}  # a new live file every command or two
    assert cli("audit", "rotate-key", env=small).returncode == 0
    for i in range(6):
        assert cli("store", f"app/K{i}", input=b"v", env=small).returncode == 0
    pruned = cli("audit", "prune", "--keep-files", "1", env=small)
    assert pruned.returncode == 0, pruned.stderr
    remaining = cli.records_of_every_file()
    assert remaining[0]["seq"] > 1
    assert not any(r["operation"] == "audit.rotate_key" for r in remaining)
    verified = cli("audit", "verify", env=small)
    assert verified.returncode == 0, verified.stderr
    assert b"those before were pruned" in verified.stdout


@pytest.fixture(params=["vault", "aws"])
def two_handles(request: pytest.FixtureRequest) -> Iterator[tuple[AuditedStore, AuditedStore]]:
    """Two handles (as two processes hold them) on one new Vault or AWS (moto) store."""
    if request.param == "vault":
        server = FakeVault().start()

        def vault_handle() -> AuditedStore:
            client = connect_vault(server.address, environ={"VAULT_TOKEN": server.root_token})
            return VaultStore(client, "secret", actor="tester")

        handles = (vault_handle(), vault_handle())
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        prefix = f"akey-{secrets.token_hex(4)}"
        handles = (AwsStore(aws_client(endpoint), prefix), AwsStore(aws_client(endpoint), prefix))
    yield handles
    for handle in handles:
        handle.close()
    if request.param == "vault":
        server.stop()


def test_a_second_handle_on_vault_or_aws_moves_to_the_new_key_after_the_recheck_interval(
    two_handles: tuple[AuditedStore, AuditedStore],
) -> None:
    """A long-running process (serve, SDK) keeps the keys it read for AUDIT_KEYS_RECHECK_SECONDS,
    then reads them again: it moves on to another process's rotation, the old key kept first."""
    reader, rotator = two_handles
    [first] = reader.audit_keys()
    assert rotator.audit_keys() == (first,)  # the one key the first use made, not a second
    assert rotator.rotate_audit_key() == 2
    assert reader.audit_keys() == (first,)  # read moments ago: not yet again
    time.sleep(AUDIT_KEYS_RECHECK_SECONDS + 0.5)
    keys = reader.audit_keys()
    assert len(keys) == 2 and keys[0] == first and keys == rotator.audit_keys()
    assert reader.audit_key() == keys[1]
    assert reader.audit_keys() is keys  # kept, not read again, until the next interval


def test_a_rotation_returns_the_generation_it_wrote_though_another_lands_before_its_reread(
    two_handles: tuple[AuditedStore, AuditedStore],
) -> None:
    """The first rotation writes key 2; the second lands (key 3) before the first reads the keys
    again: the first still reports 2 (its audit record names the key it made), not 3."""
    one, other = two_handles
    [first] = one.audit_keys()
    reading = one._read_audit_keys  # type: ignore[attr-defined]
    reads = 0

    def read_after_the_other_rotated() -> Any:
        nonlocal reads
        reads += 1
        if reads == 2:  # one's write has landed; the other rotates before one reads again
            assert other.rotate_audit_key() == 3
        return reading()

    one._read_audit_keys = read_after_the_other_rotated  # type: ignore[attr-defined]
    assert one.rotate_audit_key() == 2
    assert reads == 2
    keys = one.audit_keys()
    assert len(keys) == 3 and keys[0] == first and keys == other.audit_keys(reload=True)


def test_a_rotation_on_a_shared_store_returns_its_generation_past_the_recheck_interval(
    tmp_path: Path,
) -> None:
    """On a store several hosts share (a scoped anchor), the keys are read again once
    AUDIT_KEYS_RECHECK_SECONDS have gone: a rotation whose commit came after that must still
    report the key it made, not another host's that landed after it."""
    storage = SqliteStorage(tmp_path / "shared.db", create=True)
    EncryptedStore.create(storage, PasswordUnlock(PASSWORD, kdf.TEST), audit_scope="host-a").close()
    one = EncryptedStore.open(
        SqliteStorage(tmp_path / "shared.db"), PasswordUnlock(PASSWORD, kdf.TEST), audit_scope="host-a"
    )
    other = EncryptedStore.open(
        SqliteStorage(tmp_path / "shared.db"), PasswordUnlock(PASSWORD, kdf.TEST), audit_scope="host-b"
    )
    try:
        [first] = one.audit_keys()
        committing = one._commit  # type: ignore[attr-defined]

        def commit_then_the_other_rotates(*args: Any, **kwargs: Any) -> Any:
            result = committing(*args, **kwargs)
            assert other.rotate_audit_key() == 3
            one._audit_keys_read_at -= AUDIT_KEYS_RECHECK_SECONDS  # type: ignore[attr-defined]
            return result

        one._commit = commit_then_the_other_rotates  # type: ignore[attr-defined]
        assert one.rotate_audit_key() == 2
        keys = one.audit_keys(reload=True)
        assert len(keys) == 3 and keys[0] == first
    finally:
        one.close()
        other.close()


def test_two_rotations_at_once_on_vault_or_aws_lose_no_key(
    two_handles: tuple[AuditedStore, AuditedStore],
) -> None:
    """Both rotations read the same one key before either writes; the store's compare-and-set
    refuses the second write, which then appends to the first's: three keys, none lost.

    The other rotation runs whole inside this one's first read, after it (not two threads let go
    together at a barrier: which write reached the backend first was the scheduler's choice, and
    moto decides a ClientRequestToken race in two steps its lock does not cover)."""
    one, other = two_handles
    [first] = one.audit_keys()
    assert other.audit_keys() == (first,)
    generations: dict[str, int] = {}
    reads = {"one": 0, "other": 0}

    def counted(store: AuditedStore, label: str) -> None:
        reading = store._read_audit_keys  # type: ignore[attr-defined]

        def read() -> Any:
            keys = reading()
            reads[label] += 1
            if label == "one" and reads["one"] == 1:  # one has read the one key: other reads it too
                generations["other"] = other.rotate_audit_key()  # and writes first
            return keys

        store._read_audit_keys = read  # type: ignore[attr-defined]

    counted(one, "one")
    counted(other, "other")
    generations["one"] = one.rotate_audit_key()
    assert generations == {"other": 2, "one": 3}
    # Each read once to rotate and once after its write; the loser once more, after its refusal.
    assert reads == {"other": 2, "one": 3}
    keys = one.audit_keys(reload=True)
    assert len(keys) == 3 and keys[0] == first and len(set(keys)) == 3
    assert other.audit_keys(reload=True) == keys


_ROTATED_BEFORE_THE_WALK = """
import os, subprocess, sys
from pathlib import Path
from secrets_manager.store import EncryptedStore
_anchor = EncryptedStore.audit_anchor
def _anchor_after_another_rotation(self):
    if not os.path.exists(os.environ["ROTATED_MARK"]):
        open(os.environ["ROTATED_MARK"], "w").close()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        script = str(Path(sys.executable).with_name("secrets-manager"))
        for args in (["audit", "rotate-key"], ["get", "auth/DB_PASSWORD"]):
            subprocess.run([script, *args], env=env, check=True, capture_output=True)
    return _anchor(self)
EncryptedStore.audit_anchor = _anchor_after_another_rotation
"""


@pytest.mark.parametrize("command", ["verify", "head", "status", "prune"])
def test_audit_verify_and_head_beside_a_rotation_landing_after_they_read_the_keys(
    cli: Cli, command: str
) -> None:
    """`audit verify`, `audit head`, `status` and `audit prune` read the store's audit keys, then
    walk the log. Another process's `audit rotate-key` (and a record under the new key) landing
    between the two made the walk meet a rotation to a key it did not hold: exit 6 (status:
    "audit_verified": false), "forged or edited", a false alarm about a log that verifies. The
    keys are read again when the walk meets a newer one."""
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    hook = cli.store.parent.parent / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ROTATED_BEFORE_THE_WALK)
    mark = hook / "rotated"
    args = {
        "verify": ("audit", "verify"),
        "head": ("audit", "head"),
        "status": ("status", "--json"),
        "prune": ("audit", "prune", "--keep-files", "0", "--dry-run"),
    }[command]
    found = cli(*args, env={"PYTHONPATH": str(hook), "ROTATED_MARK": str(mark)})
    assert mark.exists()
    assert found.returncode == 0, found.stderr
    records = cli.records()
    assert [r["key_id"] for r in records[-2:]] == [2, 2]  # the rotation landed, and a record under key 2
    if command == "head":
        last = records[-1]
        assert f"seq={last['seq']} " in found.stdout.decode() and str(last["hash"]) in found.stdout.decode()
        witnessed = cli("audit", "verify", "--witness", found.stdout.decode().strip())
        assert witnessed.returncode == 0, witnessed.stderr
    elif command == "status":
        doc = json.loads(found.stdout)
        assert doc["audit_verified"] is True and doc["audit_records"] >= len(records) - 2, doc
    elif command == "verify":
        assert f"audit log verified: {len(records)} records".encode() in found.stdout


_ROTATED_BEFORE_THE_RESET = """
import os, subprocess, sys
from pathlib import Path
from secrets_manager.audit import AuditLog
_reset = AuditLog.reset
def _reset_after_another_rotation(self, anchor, event):
    anchor.audit_keys()  # this handle holds the keys, as any command's has by now
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = str(Path(sys.executable).with_name("secrets-manager"))
    for args in (["audit", "rotate-key"], ["get", "auth/DB_PASSWORD"]):
        subprocess.run([script, *args], env=env, check=True, capture_output=True)
    return _reset(self, anchor, event)
AuditLog.reset = _reset_after_another_rotation
"""


def test_audit_reset_after_a_rotation_its_handle_did_not_see_keeps_the_log(cli: Cli) -> None:
    """`audit reset --accept-loss` starts a new chain only over a log that does not verify. Its
    handle held the keys from before another process's `audit rotate-key`, so the log (rotation
    record and one under key 2) did not verify under them: the reset set the good log aside and
    began a new chain. The keys are read again first; the log verifies, nothing is reset (exit 2)."""
    assert cli("store", "auth/DB_PASSWORD", input=b"db-pass").returncode == 0
    hook = cli.store.parent.parent / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ROTATED_BEFORE_THE_RESET)
    reset = cli("audit", "reset", "--accept-loss", env={"PYTHONPATH": str(hook)})
    assert reset.returncode == 2, reset.stderr
    assert b"the audit log verifies" in reset.stderr and b"nothing to reset" in reset.stderr
    assert [p.name for p in cli.audit.parent.iterdir() if ".lost-" in p.name] == []
    records = cli.records()
    assert records[0]["seq"] == 1 and [r["key_id"] for r in records[-2:]] == [2, 2]
    assert cli("audit", "verify").returncode == 0
