"""Credential expiry in the store layer: the (version, time) pair each store kind keeps, and what
an older reader makes of it (backups: test_expiry_backup.py).

(The conformance check `expiry` in store/testing.py runs on all four stores through their own test
files; these are the parts it cannot see.)"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.crypto import Purpose, kdf, open_record
from secrets_manager.errors import InvalidInputError
from secrets_manager.store import EncryptedStore
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.backup import read_backup, write_backup
from secrets_manager.store.base import PREVIOUS, format_expiry, parse_expiry
from secrets_manager.store.encrypted import META_PREFIX, _Meta
from secrets_manager.store.external import EXPIRES_KEY
from secrets_manager.store.names import namespace_of
from secrets_manager.store.restore import restore_into
from secrets_manager.store.vault import VaultStore, connect_vault, retrying_session
from test_store_aws import aws_client
from vault_server import FakeVault

EXPIRES = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
NAME = "market-connector/BINANCE_API_KEY"


@pytest.fixture
def vault() -> Iterator[VaultStore]:
    server = FakeVault().start()
    client = connect_vault(
        server.address,
        environ={"VAULT_TOKEN": server.root_token},
        session=retrying_session(attempts=3, backoff=0.001),
    )
    store = VaultStore(client, "secret", actor="tester")
    store.fake = server  # type: ignore[attr-defined]
    yield store
    store.close()
    server.stop()


@pytest.fixture
def aws(moto_endpoint: str) -> Iterator[AwsStore]:
    store = AwsStore(aws_client(moto_endpoint), f"expiry-{secrets.token_hex(4)}")
    yield store
    store.close()


def _sealed_meta(store: EncryptedStore, name: str) -> dict[str, Any]:
    entry = store._storage.get(META_PREFIX + name)
    assert entry is not None
    keyset = store._keyset_for_read(namespace_of(name))
    return dict(
        json.loads(open_record(keyset.key_for_decryption, Purpose.SECRET_METADATA, name, 0, entry.value))
    )


def test_the_encrypted_store_keeps_the_expiry_in_the_version_and_one_version_at_a_time(
    encrypted_store: EncryptedStore,
) -> None:
    """docs/format.md §7: `expires` (epoch seconds) in the entry of the version it belongs to."""
    encrypted_store.put(NAME, b"v1", expires=EXPIRES)
    encrypted_store.put(NAME, b"v2")
    doc = _sealed_meta(encrypted_store, NAME)
    assert doc["versions"]["1"]["expires"] == EXPIRES.timestamp()
    assert "expires" not in doc["versions"]["2"]
    encrypted_store.update_metadata(NAME, expires=EXPIRES)  # now version 2's: version 1's goes
    doc = _sealed_meta(encrypted_store, NAME)
    assert "expires" not in doc["versions"]["1"] and doc["versions"]["2"]["expires"] == EXPIRES.timestamp()


def test_a_metadata_record_parsed_and_written_again_keeps_the_expiry(encrypted_store: EncryptedStore) -> None:
    """What an older build does with the record: it parses the known members (versions' entries as
    whole dicts) and writes them back, so the expiry survives its writes; it just does not show it."""
    encrypted_store.put(NAME, b"v1", expires=EXPIRES)
    raw = json.dumps(_sealed_meta(encrypted_store, NAME)).encode()
    again = _Meta.from_json(_Meta.from_json(raw).to_json())
    assert again.versions[1]["expires"] == EXPIRES.timestamp()
    assert again.public(NAME).expires == EXPIRES


def test_an_expiry_without_a_zone_is_refused_and_nothing_is_written(encrypted_store: EncryptedStore) -> None:
    encrypted_store.put(NAME, b"v1")
    with pytest.raises(InvalidInputError, match="with a zone"):
        encrypted_store.update_metadata(NAME, expires=datetime(2031, 1, 1))
    with pytest.raises(InvalidInputError, match="not both"):
        encrypted_store.update_metadata(NAME, expires=EXPIRES, clear_expiry=True)
    assert encrypted_store.describe(NAME).expires is None


def test_vault_keeps_the_pair_in_custom_metadata_out_of_the_tags(vault: VaultStore) -> None:
    vault.put(NAME, b"v1", tags={"owner": "desk"}, expires=EXPIRES)
    custom = vault.fake.mounts["secret"][NAME].custom_metadata  # type: ignore[attr-defined]
    assert custom[EXPIRES_KEY] == "1@2031-05-06T07:08:09Z"
    assert dict(vault.describe(NAME).tags) == {"owner": "desk"}
    vault.put(NAME, b"v2", tags={"owner": "ops"})  # tags replaced: our key stays (naming version 1)
    assert vault.fake.mounts["secret"][NAME].custom_metadata[EXPIRES_KEY] == "1@2031-05-06T07:08:09Z"  # type: ignore[attr-defined]
    assert vault.describe(NAME).expires is None


def test_aws_keeps_the_pair_in_a_tag_of_ours_kept_when_the_user_replaces_tags(aws: AwsStore) -> None:
    aws.put(NAME, b"v1", tags={"owner": "desk"})
    aws.put(NAME, b"v2", expires=EXPIRES)
    aws.put(NAME, b"v3", tags={"owner": "ops"})
    aws.update_metadata(NAME, expires=EXPIRES)
    aws.put(NAME, b"v4", tags={"team": "x"})  # replaces the user's tags
    described = aws._client.describe_secret(SecretId=aws.aws_name(NAME))
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags[EXPIRES_KEY] == "3@2031-05-06T07:08:09Z" and "owner" not in tags
    meta = aws.describe(NAME)
    assert meta.expires is None and dict(meta.tags) == {"team": "x"}
    assert aws.get(NAME, version=3).expires == EXPIRES


def test_a_spoilt_pair_reads_as_no_expiry() -> None:
    assert parse_expiry(format_expiry(7, EXPIRES)) == (7, EXPIRES)
    for spoilt in ("", "7", "x@2031-05-06T07:08:09Z", "7@tomorrow", "7@2031-05-06"):
        assert parse_expiry(spoilt) is None


def test_a_password_backup_of_vault_restores_the_expiry_into_aws(
    vault: VaultStore, aws: AwsStore, tmp_path: Path
) -> None:
    vault.put(NAME, b"v1")
    vault.put(NAME, b"v2", expires=EXPIRES)
    write_backup(vault, tmp_path / "b.smbackup", password=b"off-site backup password", kdf=kdf.TEST)
    assert (tmp_path / "b.smbackup").read_bytes().startswith(b"secrets-manager-backup/v2\n")
    restore_into(aws, read_backup(tmp_path / "b.smbackup", b"off-site backup password").secrets)
    meta = aws.describe(NAME)
    assert meta.current_version == 2 and meta.expires == EXPIRES
    assert aws.get(NAME).expires == EXPIRES


def test_aws_reads_again_without_a_describe_for_the_expiry_and_see_writes(
    aws: AwsStore, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read by label made a DescribeSecret for the expiry tag, doubling the calls (and the
    bill) of every read a long-lived process (serve) makes. The tag seen stands in for
    EXPIRY_SEEN_SECONDS; a write through this store forgets it at once, one by another process
    shows once that time is past. Fails on the old code (a DescribeSecret per read)."""
    import secrets_manager.store.aws as aws_module

    calls: list[str] = []
    aws._client.meta.events.register(
        "before-call.secrets-manager", lambda model, **_: calls.append(model.name)
    )
    aws.put(NAME, b"v1", expires=EXPIRES)
    calls.clear()
    for _ in range(5):
        assert aws.get(NAME).expires == EXPIRES
    assert calls.count("GetSecretValue") == 5 and calls.count("DescribeSecret") == 1, calls
    aws.update_metadata(NAME, clear_expiry=True)  # through this store: seen at once
    assert aws.get(NAME).expires is None
    # Another process (here another store on the same prefix) sets it: seen once the time is past.
    other = AwsStore(aws_client(moto_endpoint), aws._prefix)
    other.update_metadata(NAME, expires=EXPIRES)
    other.close()
    assert aws.get(NAME).expires is None  # within EXPIRY_SEEN_SECONDS
    monkeypatch.setattr(aws_module, "EXPIRY_SEEN_SECONDS", 0.0)
    assert aws.get(NAME).expires == EXPIRES


def test_aws_the_expiry_notes_of_names_gone_by_do_not_pile_up(
    aws: AwsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store notes, per SecretId, the expiry tag it saw and when it last began a write: a
    long-lived process (serve) kept a note for every name it ever read or wrote, made and purged
    or not. Past EXPIRY_NOTES_BEFORE_PRUNE (8 here) those older than EXPIRY_SEEN_SECONDS (0 here)
    are dropped, and reads and writes still see each other. Fails on the old code (10 notes after
    5 names, two more for each name)."""
    import secrets_manager.store.aws as aws_module

    monkeypatch.setattr(aws_module, "EXPIRY_NOTES_BEFORE_PRUNE", 8, raising=False)
    monkeypatch.setattr(aws_module, "EXPIRY_SEEN_SECONDS", 0.0)
    for index in range(40):
        aws.put(f"{NAME}_{index}", b"v1", expires=EXPIRES)
        assert aws.get(f"{NAME}_{index}").expires == EXPIRES
        assert len(aws._written_at) + len(aws._expiries_seen) <= 8
    aws.update_metadata(f"{NAME}_39", clear_expiry=True)
    assert aws.get(f"{NAME}_39").expires is None
    assert aws.get(f"{NAME}_0").expires == EXPIRES


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_an_expiry_before_year_1000_is_kept_as_given(kind: str, request: pytest.FixtureRequest) -> None:
    """A typed 0227-03-01 (a typo, or a date learnt late) was written as '227-03-01T…Z', which no
    ISO 8601 reader takes: read back from Vault's custom_metadata or AWS's tag as no expiry at all.
    The year now always has four digits. Fails on the old code (expires None)."""
    store = request.getfixturevalue(kind)
    early = datetime(227, 3, 1, tzinfo=UTC)
    store.put(NAME, b"v1")
    store.update_metadata(NAME, expires=early)
    assert store.describe(NAME).expires == early
    assert parse_expiry(format_expiry(1, early)) == (1, early)


def test_aws_a_describe_answered_before_a_write_through_the_store_is_not_kept(aws: AwsStore) -> None:
    """serve reads in one thread while another writes through it: a DescribeSecret answered before
    the write forgot the tag was kept after it, and the old expiry served for EXPIRY_SEEN_SECONDS
    though the write went through this very store. Here the expiry is changed (once) right after
    AWS answered the describe. Fails on the old code (the old expiry)."""
    later = datetime(2032, 1, 2, 3, 4, 5, tzinfo=UTC)
    aws.put(NAME, b"v1", expires=EXPIRES)
    written: list[bool] = []

    def write_meanwhile(**_: Any) -> None:
        if not written:
            written.append(True)  # once: the write's own describes come back here
            aws.update_metadata(NAME, expires=later)

    aws._client.meta.events.register("after-call.secrets-manager.DescribeSecret", write_meanwhile)
    assert aws.get(NAME).expires == EXPIRES  # its describe was answered before the write
    aws._client.meta.events.unregister("after-call.secrets-manager.DescribeSecret", write_meanwhile)
    assert written
    secret = aws.get(NAME)
    assert (secret.version, secret.expires) == (1, later)


def test_aws_a_describe_answered_while_a_write_through_the_store_is_in_flight_is_not_kept(
    aws: AwsStore,
) -> None:
    """A read asked for after a write began but answered before it landed has the tag from before
    it, and was kept once the write was done: the old expiry served for EXPIRY_SEEN_SECONDS after
    this store's own write. Here the read comes (once) as the TagResource is about to be sent.
    Fails on the old code (the old expiry)."""
    later = datetime(2032, 1, 2, 3, 4, 5, tzinfo=UTC)
    aws.put(NAME, b"v1", expires=EXPIRES)
    read: list[datetime | None] = []

    def read_meanwhile(**_: Any) -> None:
        if not read:
            read.append(None)  # once
            read[0] = aws.get(NAME).expires

    aws._client.meta.events.register("before-call.secrets-manager.TagResource", read_meanwhile)
    aws.update_metadata(NAME, expires=later)
    aws._client.meta.events.unregister("before-call.secrets-manager.TagResource", read_meanwhile)
    assert read == [EXPIRES]  # answered before the write landed
    secret = aws.get(NAME)
    assert (secret.version, secret.expires) == (1, later)


def test_aws_a_listing_from_before_a_write_through_the_store_does_not_bring_the_old_expiry_back(
    aws: AwsStore,
) -> None:
    """ListSecrets "might not reflect changes from the last five minutes" (AWS's API reference; use
    DescribeSecret for a secret's latest): the polled Watch feed lists every 10 s, and each
    listing noted its (older) expiry tag as just seen, so serve's reads after its own
    `metadata --expires` served the old expiry for minutes. Here the listing after the write is
    the one AWS gave before it (moto's is never behind). Fails on the old code (the old expiry)."""
    later = datetime(2032, 1, 2, 3, 4, 5, tzinfo=UTC)
    aws.put(NAME, b"v1", expires=EXPIRES)
    behind: list[dict[str, Any]] = []

    def lagging(parsed: dict[str, Any], **_: Any) -> None:
        if not behind:
            behind.append(json.loads(json.dumps(parsed, default=str)))
        else:  # AWS's listing not yet showing the write
            parsed["SecretList"] = behind[0]["SecretList"]

    aws._client.meta.events.register("after-call.secrets-manager.ListSecrets", lagging)
    aws.version_snapshot()  # the listing before the write (a Watch poll)
    aws.update_metadata(NAME, expires=later)
    assert aws.get(NAME).expires == later
    aws.version_snapshot()  # the next poll: AWS's listing is still the one from before
    assert aws.get(NAME).expires == later


def test_aws_a_new_version_written_by_another_process_is_read_with_its_expiry_at_once(
    aws: AwsStore, moto_endpoint: str
) -> None:
    """Another serve replica (or the CLI) rotates the secret with its expiry: a read here within
    EXPIRY_SEEN_SECONDS took the tag seen for the version before, which names that version, and
    served the new one with no expiry at all. A version other than the one seen is described.
    Fails on the old code (expires None)."""
    later = datetime(2032, 1, 2, 3, 4, 5, tzinfo=UTC)
    aws.put(NAME, b"v1", expires=EXPIRES)
    assert aws.get(NAME).expires == EXPIRES  # seen here
    other = AwsStore(aws_client(moto_endpoint), aws._prefix)
    other.put(NAME, b"v2", expires=later)
    other.close()
    secret = aws.get(NAME)
    assert (secret.version, secret.expires) == (2, later)
    aws.version_snapshot()  # a listing notes the current version too: still no stale reuse
    secret = aws.get(NAME)
    assert (secret.version, secret.expires) == (2, later)


def test_aws_previous_after_another_process_wrote_is_read_without_the_expiry_seen_when_it_was_current(
    aws: AwsStore, moto_endpoint: str
) -> None:
    """The expiry tag seen stands in for a DescribeSecret only while the version read is the one
    seen current: a read of `previous` after another process wrote version 2 is the version that
    was current when the tag was seen, and was served that tag's expiry, which the write had moved
    to version 2. Found by tests/test_store_model.py (put with an expiry, get, a put with another
    expiry through a second handle, get --label previous). Fails on the old code (version 1 read
    with the expiry version 2 now has)."""
    later = datetime(2032, 1, 2, 3, 4, 5, tzinfo=UTC)
    aws.put(NAME, b"v1", expires=EXPIRES)
    assert aws.get(NAME).expires == EXPIRES  # seen here, version 1 current
    other = AwsStore(aws_client(moto_endpoint), aws._prefix)
    other.put(NAME, b"v2", expires=later)
    other.close()
    previous = aws.get(NAME, label=PREVIOUS)
    assert (previous.version, previous.expires) == (1, None)
    assert (aws.get(NAME).version, aws.get(NAME).expires) == (2, later)
