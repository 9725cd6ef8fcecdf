"""VaultStore: the conformance suite against the KV v2 test server (and a real Vault when VAULT_ADDR
and VAULT_TOKEN are set), the native layout other Vault tools see, and Vault's errors mapped to ours.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from secrets_manager.environment import Environment
from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    SecretStateError,
    StorageError,
    UnlockError,
    UnsafeConfigurationError,
    UnsupportedOperationError,
)
from secrets_manager.store import EncryptedStore, SecretStore
from secrets_manager.store.base import PENDING, PREVIOUS, Anchor, AuditedStore
from secrets_manager.store.external import AUDIT_KEY_NAME, CREATED_BY_KEY, DESCRIPTION_KEY, NoAnswerError
from secrets_manager.store.testing import SECRET_STORE_CHECKS, check_secret_store, run_check
from secrets_manager.store.url import (
    VaultLocation,
    default_audit_path,
    external_location,
    open_external_store,
)
from secrets_manager.store.vault import VaultStore, _surely_not_sent, connect_vault, retrying_session
from tcp_proxy import AnswerCut, SilentServer, TcpProxy, Verdict
from vault_server import FakeVault, vault_time, vault_time_ns

MakeVault = Callable[..., VaultStore]


@pytest.fixture
def make_vault(fake_vault: FakeVault) -> MakeVault:
    """Open a VaultStore on the test server (token, mount and options can be changed per call)."""

    def _open(*, token: str | None = None, mount: str = "secret", **options: Any) -> VaultStore:
        environ = {"VAULT_TOKEN": fake_vault.root_token if token is None else token}
        session = retrying_session(attempts=3, backoff=0.001)
        client = connect_vault(fake_vault.address, environ=environ, session=session)
        return VaultStore(client, mount, actor="tester", **options)

    return _open


def kv(vault: FakeVault, name: str, mount: str = "secret") -> Any:
    return vault.mounts[mount][name]


# ---- the contract --------------------------------------------------------------------------------


def test_vault_store_passes_the_whole_conformance_suite(make_vault: MakeVault) -> None:
    check_secret_store(make_vault)


def test_vault_store_conforms_on_a_mount_that_requires_cas(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """A production mount often sets cas_required=true (vault kv metadata/config): every data write
    without `cas` is then refused 400. Every write of ours carries it (the version read, 0 for a new
    secret, the audit key's and anchor's too), so the whole suite passes there (a guard)."""
    fake_vault.configs["secret"].cas_required = True
    check_secret_store(make_vault)
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set parameter required"):
        client.secrets.kv.v2.create_or_update_secret(
            path="svc/NO_CAS", secret={"value": "x"}, mount_point="secret"
        )


@pytest.mark.parametrize("behaviour", list(SECRET_STORE_CHECKS))
def test_vault_store_conforms(behaviour: str, make_vault: MakeVault) -> None:
    run_check(make_vault, behaviour)


def test_vault_store_satisfies_the_audited_store_protocol(make_vault: MakeVault) -> None:
    store = make_vault()
    assert isinstance(store, SecretStore) and isinstance(store, AuditedStore)
    store.close()


def test_mv_whose_old_is_written_just_before_its_delete_leaves_old_in_place(
    make_vault: MakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KV v2 has no conditional delete: another writer's version lands after the delete's check,
    before its POST. The POST names the versions read, so the new one stays readable; the POST is
    then undone, so nothing is left deleted, and mv (its delete refused) leaves OLD in place and
    writes nothing to NEW. (A stage cannot land so on Vault: KV v2 has no pending label.)"""
    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note

    store, other = make_vault(), make_vault()
    store.put("svc/OLD", b"KNOWN-1")
    send, written = store._send, []

    def write_before_the_delete(method: str, path: str, **kwargs: Any) -> Any:
        if (method, path) == ("POST", "delete/svc/OLD") and not written:
            written.append(other.put("svc/OLD", b"KNOWN-2"))
        return send(method, path, **kwargs)

    monkeypatch.setattr(store, "_send", write_before_the_delete)
    with pytest.raises(ConflictError, match=r"svc/OLD changed since mv read it \(now version 2, not 1\)"):
        copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    assert written
    meta = other.describe("svc/OLD")
    assert meta.deleted is None and meta.current_version == 2
    assert other.get("svc/OLD").value.reveal() == b"KNOWN-2"
    assert other.get("svc/OLD", version=1).value.reveal() == b"KNOWN-1"  # the POST was undone
    with pytest.raises(NotFoundError):  # written only after OLD's delete: not at all
        other.get("svc/NEW")


def test_mv_whose_metadata_write_was_refused_says_so_and_a_rerun_finishes_it(
    make_vault: MakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mv writes NEW's version, then its metadata (description, tags, limit, expiry): that second
    write refused, the error said only that NEW's version was stored ("do not store the value
    again"), not that OLD was left in place; and mv run again found NEW holding OLD's value, took it
    for a move killed after its copy, and deleted OLD: NEW never got OLD's description and tags.
    Now the error says what stands, and the rerun carries the metadata over before deleting OLD."""
    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note

    store = make_vault()
    store.put("svc/OLD", b"KNOWN-1", description="the desk's key", tags={"team": "desk"}, max_versions=4)
    send = store._send

    def metadata_refused(method: str, path: str, **kwargs: Any) -> Any:
        if method in ("PATCH", "POST") and path == "metadata/svc/NEW":
            raise AccessDeniedError("Vault denied change metadata of svc/NEW: permission denied")
        return send(method, path, **kwargs)

    monkeypatch.setattr(store, "_send", metadata_refused)
    with pytest.raises(AccessDeniedError) as caught:
        copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    message = str(caught.value)
    assert message.startswith(
        "svc/NEW version 1 holds the value of version 1 of svc/OLD, but not its description, tags"
    ), message
    assert "svc/OLD was left in place" in message and "run the same mv again" in message, message
    assert store.describe("svc/OLD").deleted is None
    monkeypatch.undo()
    copied = copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    assert copied.finishing and copied.version == 1
    new = store.describe("svc/NEW")
    assert (new.description, dict(new.tags), new.max_versions) == ("the desk's key", {"team": "desk"}, 4)
    assert store.describe("svc/OLD").deleted is not None
    assert store.get("svc/NEW").version == 1  # nothing written to NEW's value


def test_a_delete_whose_check_after_it_failed_says_the_secret_was_deleted(
    make_vault: MakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delete POSTs MOUNT/delete/NAME, then reads the metadata again (a version written meanwhile
    is deleted too). That read failing, the error was the read's ("Vault failed describe svc/K"),
    though the delete was made: recorded as a failed delete, and its rerun said "already deleted".
    Now it says the secret was deleted and that the check after it was not made (outcome unknown,
    as for a conditional delete)."""
    store = make_vault()
    store.put("svc/K", b"v")
    send, posted = store._send, []

    def read_after_the_delete_fails(method: str, path: str, **kwargs: Any) -> Any:
        if (method, path) == ("POST", "delete/svc/K"):
            posted.append(path)
        elif posted and (method, path) == ("GET", "metadata/svc/K"):
            raise StorageError("Vault is sealed or unavailable (503) for describe svc/K; try again")
        return send(method, path, **kwargs)

    monkeypatch.setattr(store, "_send", read_after_the_delete_fails)
    with pytest.raises(OutcomeUnknownError) as caught:
        store.delete("svc/K")
    message = str(caught.value)
    assert message.startswith("secret 'svc/K' was deleted, but"), message
    assert "503" in message and "'history svc/K'" in message, message
    monkeypatch.undo()
    assert store.describe("svc/K").deleted is not None


def test_a_mv_rerun_onto_new_holding_the_value_keeps_what_old_does_not_have(make_vault: MakeVault) -> None:
    """A rerun of mv sets on NEW only what the copy's put would have sent: OLD's empty description
    and default version limit are not sent, so NEW's own stay (as with --force)."""
    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note

    store = make_vault()
    store.put("svc/OLD", b"SAME", tags={"team": "desk"})
    store.put("svc/NEW", b"SAME", description="mine", max_versions=5)
    copied = copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    assert copied.finishing
    new = store.describe("svc/NEW")
    assert (new.description, dict(new.tags), new.max_versions) == ("mine", {"team": "desk"}, 5)


@pytest.mark.skipif(
    not (os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN")),
    reason="set VAULT_ADDR and VAULT_TOKEN (and VAULT_KV_MOUNT, default 'secret') to run on a real Vault",
)
def test_vault_store_conforms_on_a_real_vault() -> None:
    environ = dict(os.environ)
    mount = environ.get("VAULT_KV_MOUNT", "secret")
    check_secret_store(lambda: VaultStore(connect_vault(environ["VAULT_ADDR"], environ=environ), mount))


# ---- what other Vault tools see ------------------------------------------------------------------


def test_text_is_stored_as_a_value_field_and_binary_as_base64(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    store.put("svc/TEXT", "pässwörd".encode())
    store.put("svc/BIN", b"\xff\x00\xfe")
    assert kv(fake_vault, "svc/TEXT").versions[1].data == {"value": "pässwörd"}
    assert kv(fake_vault, "svc/BIN").versions[1].data == {
        "value_base64": base64.b64encode(b"\xff\x00\xfe").decode()
    }


def test_description_tags_and_author_are_custom_metadata(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    store.put("svc/META", b"v", description="exchange key", tags={"team": "desk1"})
    secret = kv(fake_vault, "svc/META")
    assert secret.custom_metadata == {
        CREATED_BY_KEY: "tester",
        DESCRIPTION_KEY: "exchange key",
        "team": "desk1",
    }
    assert secret.max_versions == 10
    meta = store.describe("svc/META")
    assert (meta.created_by, meta.description, dict(meta.tags)) == (
        "tester",
        "exchange key",
        {"team": "desk1"},
    )


def test_max_versions_is_vaults_own_and_vault_prunes_at_the_next_write(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """`update_metadata(max_versions=)` is `vault kv metadata put -max-versions`: it sends
    max_versions alone (so a concurrent change of custom_metadata is not undone), and Vault prunes
    only when the next version is written."""
    store = make_vault()
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    store.put("svc/ROLL", b"v1", description="d")
    for n in range(2, 6):
        store.put("svc/ROLL", f"v{n}".encode())
    custom = dict(kv(fake_vault, "svc/ROLL").custom_metadata) | {"other-tool": "x"}
    client.secrets.kv.v2.update_metadata(path="svc/ROLL", custom_metadata=custom, mount_point="secret")
    store.update_metadata("svc/ROLL", max_versions=2)
    secret = kv(fake_vault, "svc/ROLL")
    assert secret.max_versions == 2 and sorted(secret.versions) == [1, 2, 3, 4, 5]
    assert secret.custom_metadata == custom
    store.put("svc/ROLL", b"v6")
    assert sorted(kv(fake_vault, "svc/ROLL").versions) == [5, 6]
    native = client.secrets.kv.v2.read_secret_metadata(path="svc/ROLL", mount_point="secret")
    assert native["data"]["max_versions"] == 2
    store.put("svc/ROLL", b"v7", max_versions=3)  # set after the write: it pruned under 2
    assert kv(fake_vault, "svc/ROLL").max_versions == 3
    assert sorted(kv(fake_vault, "svc/ROLL").versions) == [6, 7]
    store.put("svc/ROLL", b"v8")  # the next write keeps 3
    assert sorted(kv(fake_vault, "svc/ROLL").versions) == [6, 7, 8]
    client.secrets.kv.v2.create_or_update_secret(
        path="svc/OTHER", secret={"value": "x"}, mount_point="secret"
    )
    assert kv(fake_vault, "svc/OTHER").max_versions == 0  # another tool's: the mount's default
    assert store.describe("svc/OTHER").max_versions == 10


def test_the_test_server_refuses_a_max_versions_that_is_no_integer(fake_vault: FakeVault) -> None:
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="max_versions"):
        client.adapter.post("/v1/secret/metadata/svc/BAD", json={"max_versions": "many"})
    assert "svc/BAD" not in fake_vault.mounts["secret"]


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("description", "é" * 256, True),  # 256 characters, 512 bytes: the most a value holds
        ("description", "é" * 257, False),  # 257 characters, 514 bytes
        ("description", "€" * 171, False),  # 171 characters, 513 bytes
        ("€" * 42, "v", True),  # a key of 126 bytes
        ("€" * 43, "v", False),  # 43 characters, 129 bytes
    ],
)
def test_the_test_server_limits_custom_metadata_in_bytes_as_vault_does(
    fake_vault: FakeVault, key: str, value: str, accepted: bool
) -> None:
    """Vault (vault-plugin-secrets-kv validateCustomMetadata, Go's len()) counts UTF-8 bytes:
    keys 1 to 128, values 1 to 512. A test server counting characters took too much."""
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)

    def write() -> None:
        client.secrets.kv.v2.update_metadata(
            path="svc/META", custom_metadata={key: value}, mount_point="secret"
        )

    if accepted:
        write()
        assert kv(fake_vault, "svc/META").custom_metadata == {key: value}
    else:
        with pytest.raises(hvac.exceptions.InvalidRequest, match="custom_metadata validation failed"):
            write()
        assert "svc/META" not in fake_vault.mounts["secret"]


def test_a_description_of_512_bytes_of_utf8_is_the_longest_vault_holds(make_vault: MakeVault) -> None:
    store = make_vault()
    store.put("svc/META", b"v", description="é" * 256)
    assert store.describe("svc/META").description == "é" * 256
    with pytest.raises(UnsupportedOperationError, match="at most 512 bytes of UTF-8"):
        store.put("svc/META", b"v2", description="é" * 257)
    assert store.describe("svc/META").description == "é" * 256


def test_a_reserved_tag_key_is_refused(make_vault: MakeVault) -> None:
    with pytest.raises(InvalidInputError, match="reserved"):
        make_vault().put("svc/T", b"v", tags={CREATED_BY_KEY: "someone else"})


def test_data_written_by_another_tool_with_several_keys_reads_as_canonical_json(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    fake_vault.handle(
        "POST", "/v1/secret/data/db/creds", fake_vault.root_token, {"data": {"username": "app", "port": 5432}}
    )
    assert make_vault().get("db/creds").value.reveal() == b'{"port":5432,"username":"app"}'


def test_a_soft_deleted_latest_version_is_not_replaced_by_an_older_one(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    store.put("svc/K", b"old")
    store.put("svc/K", b"compromised")
    fake_vault.handle("DELETE", "/v1/secret/data/svc/K", fake_vault.root_token, None)  # `vault kv delete`
    with pytest.raises(NotFoundError, match=r"current version \(2\).*deleted"):
        store.get("svc/K")
    assert store.get("svc/K", label=PREVIOUS).value.reveal() == b"old"
    assert store.describe("svc/K").deleted is None  # one version deleted, not the secret
    store.undelete("svc/K")
    assert store.get("svc/K").value.reveal() == b"compromised"


def test_get_of_a_deleted_secret_says_so_in_the_words_of_every_store(
    make_vault: MakeVault, encrypted_store: EncryptedStore
) -> None:
    """`delete` soft-deletes every version; `get` then said "the current version (2) of 'svc/K' is
    deleted", where the encrypted store and AWS say the secret is (found by
    tests/test_store_differential.py's CLI pass, seed 23). The metadata read that tells the two
    apart is refused by a policy with only `read` on data: the version's words stay."""
    answers = []
    for store in (make_vault(), encrypted_store):
        store.put("svc/K", b"v1")
        store.put("svc/K", b"v2")
        store.delete("svc/K")
        with pytest.raises(NotFoundError) as refused:
            store.get("svc/K")
        answers.append(str(refused.value))
    assert answers == ["secret 'svc/K' is deleted; 'undelete svc/K' restores it"] * 2


def test_get_of_a_deleted_secret_without_read_on_metadata_names_the_version(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    make_vault().put("svc/K", b"v1")
    make_vault().delete("svc/K")
    fake_vault.add_policy("data-only", 'path "secret/data/*" { capabilities = ["read"] }')
    with pytest.raises(NotFoundError, match=r"the current version \(1\) of 'svc/K' is deleted"):
        make_vault(token=fake_vault.add_token("data-only", policies=["data-only"])).get("svc/K")


def test_delete_soft_deletes_every_version_and_undelete_restores_them(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    store.put("svc/D", b"1")
    store.put("svc/D", b"2")
    store.delete("svc/D")
    assert all(v.deletion_time for v in kv(fake_vault, "svc/D").versions.values())
    store.undelete("svc/D")
    assert not any(v.deletion_time for v in kv(fake_vault, "svc/D").versions.values())


def test_a_delete_racing_a_write_leaves_no_version_readable(make_vault: MakeVault) -> None:
    """A version written between delete's read of the metadata and its POST (KV v2 deletes have no
    check-and-set) was left live: both acknowledged, the secret still readable."""
    store, rival = make_vault(), make_vault()
    store.put("svc/DR", b"1")
    send = store._send

    def rival_writes_first(method: str, path: str, **kwargs: Any) -> Any:
        if method == "POST" and path == "delete/svc/DR":
            store._send = send  # type: ignore[method-assign]
            rival.put("svc/DR", b"2")
        return send(method, path, **kwargs)

    store._send = rival_writes_first  # type: ignore[method-assign]
    store.delete("svc/DR")
    assert store.describe("svc/DR").deleted is not None
    with pytest.raises(NotFoundError):
        store.get("svc/DR")


def test_the_pending_label_is_not_supported(make_vault: MakeVault) -> None:
    store = make_vault()
    store.put("svc/P", b"v")
    with pytest.raises(UnsupportedOperationError, match="not supported by this store"):
        store.get("svc/P", label=PENDING)


def test_concurrent_writers_lose_no_version(make_vault: MakeVault) -> None:
    stores = [make_vault() for _ in range(4)]
    errors: list[BaseException] = []

    def writer(store: VaultStore, n: int) -> None:
        try:
            for i in range(5):
                store.put("svc/RACE", f"{n}-{i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    meta = stores[0].describe("svc/RACE")
    assert meta.current_version == 20
    assert [v.version for v in meta.versions] == list(range(11, 21))


def a_rival_writes_first(fake_vault: FakeVault) -> None:
    """The next data write reaching the server is preceded by another writer's (value "rival")."""
    original = fake_vault._write

    def write_after_a_rival(secrets: Any, key: str, body: Any) -> Any:
        fake_vault._write = original  # type: ignore[method-assign]
        original(secrets, key, {"data": {"value": "rival"}})
        return original(secrets, key, body)

    fake_vault._write = write_after_a_rival  # type: ignore[method-assign]


def test_a_stale_expect_version_is_a_conflict_even_when_vault_decides(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    store.put("svc/CAS", b"v1")
    a_rival_writes_first(fake_vault)  # between our read of the metadata and our write: cas refuses
    with pytest.raises(ConflictError, match="changed since version 1"):
        store.put("svc/CAS", b"mine", expect_version=1)
    assert store.get("svc/CAS").value.reveal() == b"rival"


def test_a_put_with_max_versions_that_loses_the_race_leaves_the_limit_alone(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """KV's metadata endpoint has no compare-and-set, so max_versions is sent only after the data
    write succeeded: a put refused by Vault's cas (a rival wrote between our read and our write)
    changes nothing, and the rival's next write does not prune under the limit we never set."""
    store = make_vault()
    for n in range(1, 7):
        store.put("svc/LIMIT", f"v{n}".encode())
    a_rival_writes_first(fake_vault)
    with pytest.raises(ConflictError, match="changed since version 6"):
        store.put("svc/LIMIT", b"mine", expect_version=6, max_versions=2)
    assert kv(fake_vault, "svc/LIMIT").max_versions == 10
    store.put("svc/LIMIT", b"next")
    assert sorted(kv(fake_vault, "svc/LIMIT").versions) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_put_with_max_versions_that_vault_fails_leaves_the_limit_alone(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    for n in range(1, 4):
        store.put("svc/FAILS", f"v{n}".encode())
    original = fake_vault.handle

    def fail_the_data_write(method: str, path: str, token: str | None, body: Any) -> Any:
        if method == "POST" and path == "/v1/secret/data/svc/FAILS":
            fake_vault.handle = original  # type: ignore[method-assign]
            return 500, {"errors": ["internal error"]}
        return original(method, path, token, body)

    fake_vault.handle = fail_the_data_write  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        store.put("svc/FAILS", b"v4", max_versions=2)
    assert kv(fake_vault, "svc/FAILS").max_versions == 10
    assert store.describe("svc/FAILS").max_versions == 10


# ---- errors ---------------------------------------------------------------------------------------


def test_no_token_is_an_unlock_error(fake_vault: FakeVault) -> None:
    with pytest.raises(UnlockError, match="VAULT_TOKEN"):
        connect_vault(fake_vault.address, environ={})


@pytest.mark.parametrize("token", ["hvs.hunter2\n", " hvs.hunter2", "hvs.hunter2\u2603", "hvs.hunter2\udcff"])
def test_a_token_no_http_header_can_carry_is_refused_without_repeating_it(
    fake_vault: FakeVault, token: str
) -> None:
    """A line end or space around VAULT_TOKEN (a file read into it) was 'cannot reach Vault
    (InvalidHeader)', whose requests error quotes the header; a character beyond Latin-1 a
    UnicodeEncodeError from http.client (an internal error), which carries the whole token."""
    with pytest.raises(InvalidInputError, match="VAULT_TOKEN") as refused:
        connect_vault(fake_vault.address, environ={"VAULT_TOKEN": token})
    for shown in (str(refused.value), repr(refused.value)):
        assert "hunter2" not in shown
    assert refused.value.__cause__ is None and refused.value.__context__ is None


def test_a_token_vault_does_not_know_is_access_denied(make_vault: MakeVault) -> None:
    with pytest.raises(AccessDeniedError, match="permission denied"):
        make_vault(token="not-a-token").list()


def test_a_read_only_token_cannot_write(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    make_vault().put("svc/RO", b"v")
    reader = make_vault(token=fake_vault.add_token("reader", readonly=True))
    assert reader.get("svc/RO").value.reveal() == b"v"
    with pytest.raises(AccessDeniedError):
        reader.put("svc/RO", b"w")


def test_a_sealed_vault_is_a_storage_error_after_retries(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    fake_vault.seal()
    with pytest.raises(StorageError, match="sealed"):
        make_vault().get("svc/X")
    assert len(fake_vault.requests) == 4  # the first try and three retries


def test_rate_limiting_and_sealed_answers_are_retried_for_writes(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    store = make_vault()
    store.put("svc/R", b"v1")
    fake_vault.fail_next(429, 1)
    fake_vault.fail_next(503, 1)
    assert store.put("svc/R", b"v2").version == 2


def test_a_server_error_on_a_write_is_not_repeated(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    store = make_vault()
    store.put("svc/W", b"v1")
    fake_vault.requests.clear()
    original = fake_vault.handle

    def fail_writes(method: str, path: str, token: str | None, body: Any) -> Any:
        if method == "POST":
            fake_vault.requests.append((method, path))
            return 500, {"errors": ["internal error"]}
        return original(method, path, token, body)

    fake_vault.handle = fail_writes  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        store.put("svc/W", b"v2")
    assert [r for r in fake_vault.requests if r[0] == "POST"] == [("POST", "/v1/secret/data/svc/W")]


def test_a_missing_mount_says_how_to_enable_it(make_vault: MakeVault) -> None:
    with pytest.raises(NotFoundError, match="vault secrets enable -path=nope kv-v2"):
        make_vault(mount="nope").put("svc/X", b"v")


def test_an_unreachable_vault_is_a_storage_error() -> None:
    client = connect_vault(
        "http://127.0.0.1:9", environ={"VAULT_TOKEN": "t"}, session=retrying_session(attempts=1, backoff=0)
    )
    with pytest.raises(StorageError, match="cannot reach Vault"):
        VaultStore(client, "secret").list()


def test_a_write_whose_answer_was_lost_is_an_unknown_outcome_not_a_failure(fake_vault: FakeVault) -> None:
    """Vault carried the POST out and the connection was reset as its answer came back: not
    "cannot reach Vault" (it was reached), but OutcomeUnknownError saying the change may have been
    made and to check before writing again; the write is not sent twice."""
    store = VaultStore(
        connect_vault(fake_vault.address, environ={"VAULT_TOKEN": fake_vault.root_token}), "secret"
    )
    store.put("app/K", b"one")
    host, port = fake_vault.address.removeprefix("http://").split(":")
    proxy = AnswerCut(host, int(port), b"POST /v1/secret/data/app/K")
    try:
        session = retrying_session(attempts=3, backoff=0.001)
        client = connect_vault(
            f"http://{proxy.address}", environ={"VAULT_TOKEN": fake_vault.root_token}, session=session
        )
        fake_vault.requests.clear()
        with pytest.raises(OutcomeUnknownError) as caught:
            VaultStore(client, "secret").put("app/K", b"two")
    finally:
        proxy.close()
    assert proxy.cut
    assert str(caught.value) == (
        f"Vault at http://{proxy.address} did not answer store app/K (ConnectionError): the change may "
        "have been made; check (history) before writing again"
    )
    assert [r for r in fake_vault.requests if r[0] == "POST"] == [("POST", "/v1/secret/data/app/K")]
    assert store.get("app/K").version == 2 and store.get("app/K").value.reveal() == b"two"


def test_a_write_that_could_not_connect_surely_was_not_made() -> None:
    """A refused connection is a failure before anything was sent: a plain StorageError."""
    session = retrying_session(attempts=1, backoff=0)
    with pytest.raises(requests.exceptions.ConnectionError) as refused:
        session.post("http://127.0.0.1:9/v1/secret/data/app/K", json={})
    assert _surely_not_sent(refused.value)
    client = connect_vault("http://127.0.0.1:9", environ={"VAULT_TOKEN": "t"}, session=session)
    with pytest.raises(StorageError, match="cannot reach Vault") as caught:
        VaultStore(client, "secret").put("app/K", b"v")
    assert not isinstance(caught.value, OutcomeUnknownError)


def test_approle_login_is_the_second_way_in(fake_vault: FakeVault) -> None:
    fake_vault.approles["role-1"] = "secret-1"
    client = connect_vault(
        fake_vault.address, environ={"VAULT_ROLE_ID": "role-1", "VAULT_SECRET_ID": "secret-1"}
    )
    store = VaultStore(client, "secret")
    store.put("svc/AR", b"v")
    assert store.get("svc/AR").value.reveal() == b"v"
    with pytest.raises(UnlockError, match="AppRole"):
        connect_vault(fake_vault.address, environ={"VAULT_ROLE_ID": "role-1", "VAULT_SECRET_ID": "wrong"})


def test_repr_names_the_server_but_never_the_token(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    shown = repr(make_vault())
    assert fake_vault.address in shown and fake_vault.root_token not in shown


# ---- audit key and anchors ---------------------------------------------------------------------


def test_the_audit_key_is_made_once_and_shared_by_every_handle(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    first, second = make_vault(), make_vault()
    key = first.audit_key()
    assert len(key) == 32 and second.audit_key() == key
    assert AUDIT_KEY_NAME in fake_vault.mounts["secret"]
    assert [m.name for m in first.list(include_deleted=True)] == []  # our bookkeeping is not listed


def test_each_audit_log_has_its_own_anchor(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    laptop, server = make_vault(audit_scope="laptop"), make_vault(audit_scope="server")
    assert laptop.audit_anchor() is None
    laptop.set_audit_anchor(Anchor(seq=1, hash="a" * 64))
    laptop.set_audit_anchor(Anchor(seq=2, hash="b" * 64))
    assert server.audit_anchor() is None
    assert make_vault(audit_scope="laptop").audit_anchor() == Anchor(seq=2, hash="b" * 64)
    anchor = kv(fake_vault, ".secrets-manager/audit-anchor/laptop")
    assert anchor.max_versions == 1 and list(anchor.versions) == [2]


def test_an_anchor_edited_to_a_number_python_reads_as_infinite_is_damage(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """Whoever may write the mount can put {"seq": 1e400} in the anchor: JSON's reader gives inf,
    and int() of it raised OverflowError, an 'internal error' on the old code."""
    laptop = make_vault(audit_scope="laptop")
    laptop.set_audit_anchor(Anchor(seq=1, hash="a" * 64))
    anchor = kv(fake_vault, ".secrets-manager/audit-anchor/laptop")
    anchor.versions[max(anchor.versions)].data["seq"] = float("inf")  # served as Infinity
    with pytest.raises(IntegrityError, match="the audit anchor in Vault is damaged"):
        make_vault(audit_scope="laptop").audit_anchor()


def test_an_anchor_moved_by_another_writer_is_a_conflict(make_vault: MakeVault) -> None:
    mine, theirs = make_vault(audit_scope="log"), make_vault(audit_scope="log")
    assert mine.audit_anchor() is None
    theirs.set_audit_anchor(Anchor(seq=5, hash="c" * 64))
    with pytest.raises(ConflictError, match="anchor"):
        mine.set_audit_anchor(Anchor(seq=1, hash="d" * 64))


# ---- opening by URL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address", "mount"),
    [
        ("vault://vault.internal/secret", "https://vault.internal:8200", "secret"),
        ("vault://vault.internal:8300/team/kv/", "https://vault.internal:8300", "team/kv"),
        ("vault+http://127.0.0.1:8200/secret", "http://127.0.0.1:8200", "secret"),
    ],
)
def test_vault_urls_name_an_address_and_a_mount(url: str, address: str, mount: str) -> None:
    assert external_location(url) == VaultLocation(address=address, mount=mount)


@pytest.mark.parametrize(
    "url", ["vault://host", "vault:///secret", "vault://host:notaport/secret", "vault://host/kv?colour=blue"]
)
def test_bad_vault_urls_are_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInputError):
        external_location(url)


def test_a_vault_store_has_its_audit_log_in_the_data_directory() -> None:
    path = default_audit_path("vault://vault.internal:8200/secret")
    assert path.name == "vault-vault.internal-8200-secret.audit.jsonl"
    assert path.parent.name == "secrets-manager"


def test_plain_http_is_refused_in_production(fake_vault: FakeVault) -> None:
    url = fake_vault.address.replace("http://", "vault+http://") + "/secret"
    with pytest.raises(UnsafeConfigurationError, match="plain http"):
        open_external_store(url, environment=Environment.PRODUCTION, actor="x", environ={"VAULT_TOKEN": "t"})


# ---- delete_version_after: a deletion_time ahead is an expiry, not a deletion ------------------------


def age(vault: FakeVault, name: str, version: int, *, seconds: int) -> None:
    """Move a version's created_time and deletion_time `seconds` back, as if written that long ago."""
    kept = kv(vault, name).versions[version]
    shift = seconds * 1_000_000_000
    kept.created_time = vault_time(vault_time_ns(kept.created_time) - shift)
    if kept.deletion_time:
        kept.deletion_time = vault_time(vault_time_ns(kept.deletion_time) - shift)


def test_the_test_server_applies_delete_version_after_as_vault_does(fake_vault: FakeVault) -> None:
    """pathDataWrite: deletion_time = created + the smaller non-zero of the secret's and the mount's
    delete_version_after; a negative mount setting disables it; the version is served until then."""
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    kv2 = client.secrets.kv.v2

    def expiry_of_a_write(path: str) -> float:
        written = kv2.create_or_update_secret(path=path, secret={"value": "x"}, mount_point="secret")["data"]
        if not written["deletion_time"]:
            return 0.0
        return (
            vault_time_ns(written["deletion_time"]) - vault_time_ns(written["created_time"])
        ) / 1_000_000_000

    kv2.update_metadata(path="svc/A", delete_version_after="720h", mount_point="secret")
    assert expiry_of_a_write("svc/A") == 720 * 3600
    assert kv2.read_secret_version(path="svc/A", mount_point="secret", raise_on_deleted_version=True)
    assert kv2.read_secret_metadata(path="svc/A", mount_point="secret")["data"]["delete_version_after"] == (
        "720h0m0s"
    )
    assert expiry_of_a_write("svc/B") == 0
    client.adapter.post("/v1/secret/config", json={"delete_version_after": "1h"})
    assert expiry_of_a_write("svc/A") == 3600  # the mount's is smaller: it wins
    assert expiry_of_a_write("svc/B") == 3600
    client.adapter.post("/v1/secret/config", json={"delete_version_after": "-1s"})
    assert expiry_of_a_write("svc/A") == 0  # disabled on the mount: the secret's is ignored too
    assert client.adapter.get("/v1/secret/config")["data"]["delete_version_after"] == "-1s"


def test_a_version_with_an_expiry_ahead_is_alive(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    """A secret whose versions carry a future deletion_time (delete_version_after) is listed,
    written, deleted and read as any other; undelete leaves a pending expiry alone."""
    store = make_vault()
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    client.secrets.kv.v2.update_metadata(path="auth/DB", delete_version_after="720h", mount_point="secret")
    client.secrets.kv.v2.create_or_update_secret(path="auth/DB", secret={"value": "v1"}, mount_point="secret")
    assert kv(fake_vault, "auth/DB").versions[1].deletion_time  # an expiry, 30 days ahead
    assert [m.name for m in store.list()] == ["auth/DB"]
    assert store.describe("auth/DB").deleted is None
    assert store.put("auth/DB", b"v2").version == 2
    assert store.get("auth/DB", version=1).value.reveal() == b"v1"
    expiry = kv(fake_vault, "auth/DB").versions[1].deletion_time
    with pytest.raises(ConflictError, match="is not deleted"):
        store.undelete("auth/DB")
    assert kv(fake_vault, "auth/DB").versions[1].deletion_time == expiry
    store.delete("auth/DB")
    assert store.describe("auth/DB").deleted is not None
    with pytest.raises(NotFoundError, match="deleted"):
        store.get("auth/DB")
    store.undelete("auth/DB")
    assert store.get("auth/DB").value.reveal() == b"v2"


def test_a_version_whose_expiry_passed_is_deleted(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    store = make_vault()
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    client.adapter.post("/v1/secret/config", json={"delete_version_after": "1h"})
    store.put("auth/TMP", b"v1")
    age(fake_vault, "auth/TMP", 1, seconds=3601)
    # its only version expired: the secret counts as deleted, and get says so as after `delete`
    with pytest.raises(NotFoundError, match=r"secret 'auth/TMP' is deleted; 'undelete auth/TMP'"):
        store.get("auth/TMP")
    assert store.list() == [] and store.describe("auth/TMP").deleted is not None
    with pytest.raises(ConflictError, match="is deleted"):
        store.put("auth/TMP", b"v2")
    store.undelete("auth/TMP")
    assert store.get("auth/TMP").value.reveal() == b"v1"


def test_the_audit_key_is_refreshed_before_a_mount_policy_expires_it(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """A secret's delete_version_after cannot lengthen the mount's (Vault takes the smaller), so
    the store writes the same key again once half of its lifetime has gone."""
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    client.adapter.post("/v1/secret/config", json={"delete_version_after": "2h"})
    key = make_vault().audit_key()
    assert make_vault().audit_key() == key and list(kv(fake_vault, AUDIT_KEY_NAME).versions) == [1]
    age(fake_vault, AUDIT_KEY_NAME, 1, seconds=3601)  # past half of its two hours
    assert make_vault().audit_key() == key
    refreshed = kv(fake_vault, AUDIT_KEY_NAME)
    assert refreshed.current_version == 2
    assert vault_time_ns(refreshed.versions[2].deletion_time) > vault_time_ns(
        refreshed.versions[1].deletion_time
    )
    age(fake_vault, AUDIT_KEY_NAME, 1, seconds=3600)  # the first version expires: the second serves
    assert make_vault().audit_key() == key


def test_an_anchor_expired_by_delete_version_after_is_still_an_integrity_failure_that_says_why(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    client.adapter.post("/v1/secret/config", json={"delete_version_after": "1h"})
    store = make_vault(audit_scope="idle")
    store.audit_anchor()
    store.set_audit_anchor(Anchor(seq=1, hash="a" * 64))
    assert make_vault(audit_scope="idle").audit_anchor() == Anchor(seq=1, hash="a" * 64)
    age(fake_vault, ".secrets-manager/audit-anchor/idle", 1, seconds=3601)
    with pytest.raises(
        IntegrityError, match=r"delete_version_after.*vault kv undelete -mount=secret -versions=1"
    ) as refused:
        make_vault(audit_scope="idle").audit_anchor()
    # the time as every command prints times (UTC to the second, Z), not "2026-11-30 18:55 UTC"
    assert re.search(r"\(version 1, at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", str(refused.value)), refused.value


# ---- the engine at the mount: KV version 2 only -----------------------------------------------------


@pytest.fixture
def vault_with_kv1() -> Iterator[FakeVault]:
    vault = FakeVault(kv1_mounts=("kv",)).start()
    vault.kv1["kv"]["auth/DB_PASSWORD"] = {
        "value": "existing-v1-secret"
    }  # `vault kv put kv/auth/DB_PASSWORD`
    yield vault
    vault.stop()


def open_on(vault: FakeVault, mount: str) -> VaultStore:
    session = retrying_session(attempts=1, backoff=0)
    return VaultStore(
        connect_vault(vault.address, environ={"VAULT_TOKEN": vault.root_token}, session=session), mount
    )


def test_the_test_server_answers_the_mounts_endpoint_as_vault_does(vault_with_kv1: FakeVault) -> None:
    client = hvac.Client(url=vault_with_kv1.address, token=vault_with_kv1.root_token)
    for path, version in (("secret", "2"), ("kv", "1"), ("kv/auth/DB_PASSWORD", "1")):
        data = client.adapter.get(f"/v1/sys/internal/ui/mounts/{path}")["data"]
        assert (data["type"], data["options"]["version"]) == ("kv", version)
    with pytest.raises(hvac.exceptions.Forbidden):  # a path in no mount: Vault does not say which exist
        client.adapter.get("/v1/sys/internal/ui/mounts/nope")
    assert client.adapter.get("/v1/kv/auth/DB_PASSWORD")["data"] == {"value": "existing-v1-secret"}


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.get("auth/DB_PASSWORD"),
        lambda s: s.list(),
        lambda s: s.put("market/API_KEY", b"hunter2-new-value"),
        lambda s: s.audit_key(),
        lambda s: s.set_audit_anchor(Anchor(seq=1, hash="a" * 64)),
    ],
    ids=["get", "list", "put", "audit_key", "set_audit_anchor"],
)
def test_a_kv_version_1_mount_is_refused_before_anything_is_read_or_written(
    vault_with_kv1: FakeVault, operation: Callable[[VaultStore], Any]
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        operation(open_on(vault_with_kv1, "kv"))
    assert str(refused.value) == (
        "kv is a KV version 1 mount; secrets-manager needs KV version 2 (vault kv enable-versioning kv)"
    )
    assert vault_with_kv1.kv1["kv"] == {"auth/DB_PASSWORD": {"value": "existing-v1-secret"}}
    assert [path for _, path in vault_with_kv1.requests] == ["/v1/sys/internal/ui/mounts/kv"]


def test_without_the_mounts_endpoint_a_kv_version_1_mount_is_refused_before_a_value_is_sent(
    vault_with_kv1: FakeVault,
) -> None:
    """A policy may refuse sys/internal/ui/mounts: reads go ahead as before (a v1 path reads as
    missing), and the first write is preceded by a probe that holds no value and is removed."""
    vault_with_kv1.refuse_mounts_endpoint = True
    store = open_on(vault_with_kv1, "kv")
    with pytest.raises(NotFoundError):
        store.get("auth/DB_PASSWORD")
    with pytest.raises(InvalidInputError, match="kv is a KV version 1 mount"):
        store.put("market/API_KEY", b"hunter2-new-value")
    assert vault_with_kv1.kv1["kv"] == {"auth/DB_PASSWORD": {"value": "existing-v1-secret"}}
    assert not any(b"hunter2" in repr(body).encode() for body in vault_with_kv1.kv1["kv"].values())
    # On a KV v2 mount the probe writes nothing, and the put goes on.
    v2 = open_on(vault_with_kv1, "secret")
    assert v2.put("market/API_KEY", b"v").version == 1
    assert list(vault_with_kv1.mounts["secret"]) == ["market/API_KEY"]


@pytest.mark.parametrize("path", ["secret/data", "secret/team-a"])
def test_a_path_inside_a_mount_is_refused_before_anything_is_written(
    vault_with_kv1: FakeVault, path: str
) -> None:
    """`vault+http://HOST/secret/data` (the API's path, a Vault habit) was taken as a mount: the
    audit key and anchor were written under secret/data/.secrets-manager/…, then `store` failed
    with Vault's 'no data provided'."""
    with pytest.raises(InvalidInputError) as refused:
        open_on(vault_with_kv1, path).put("market/API_KEY", b"hunter2-new-value")
    assert str(refused.value) == (
        f"'{path}' is a path inside the KV version 2 mount 'secret', not a mount; give the mount alone "
        "(…/secret): secrets-manager adds data/ and metadata/ itself"
    )
    assert vault_with_kv1.mounts["secret"] == {}


def test_a_mount_of_another_engine_is_refused(vault_with_kv1: FakeVault) -> None:
    original = vault_with_kv1._ui_mount

    def transit(rest: str) -> Any:
        answer = original(rest)
        answer["data"]["type"], answer["data"]["options"] = "transit", None
        return answer

    vault_with_kv1._ui_mount = transit  # type: ignore[method-assign]
    with pytest.raises(InvalidInputError, match="secret is a transit secrets engine"):
        open_on(vault_with_kv1, "secret").list()


# ---- tokens we got from an AppRole login -----------------------------------------------------------


def approle_store(vault: FakeVault, **environ: str) -> VaultStore:
    vault.approles["role-1"] = "secret-1"
    env = {"VAULT_ROLE_ID": "role-1", "VAULT_SECRET_ID": "secret-1", **environ}
    return VaultStore(connect_vault(vault.address, environ=env), "secret")


def test_an_approle_token_is_revoked_at_close(fake_vault: FakeVault) -> None:
    before = set(fake_vault.tokens)
    store = approle_store(fake_vault)
    store.put("svc/K", b"v")
    assert len(fake_vault.tokens - before) == 1
    store.close()
    assert fake_vault.tokens == before
    assert ("POST", "/v1/auth/token/revoke-self") in fake_vault.requests


def test_a_token_the_user_gave_is_never_revoked(make_vault: MakeVault, fake_vault: FakeVault) -> None:
    store = make_vault()
    store.put("svc/K", b"v")
    store.close()
    assert fake_vault.root_token in fake_vault.tokens
    assert not any("revoke" in path for _, path in fake_vault.requests)


def test_a_revoke_that_fails_does_not_fail_the_close(fake_vault: FakeVault) -> None:
    store = approle_store(fake_vault)
    store.list()
    fake_vault.seal()
    store.close()  # Vault sealed: the token lapses at its TTL instead


def test_an_expired_approle_token_is_replaced_by_a_new_login(fake_vault: FakeVault) -> None:
    """A long `serve` outlives its token's TTL: Vault then answers 403, and the store logs in again
    and repeats the request (which Vault did not act on)."""
    store = approle_store(fake_vault)
    store.put("svc/K", b"v1")
    fake_vault.tokens.discard(store._client.token)  # its TTL ran out
    assert store.put("svc/K", b"v2").version == 2
    assert store.get("svc/K").value.reveal() == b"v2"
    live = set(fake_vault.tokens)
    logins = fake_vault.requests.count(("POST", "/v1/auth/approle/login"))
    fake_vault.fail_next(403, errors=["permission denied"])  # a policy's 403, the token still valid:
    with pytest.raises(AccessDeniedError):  # it stands; no new login, no token swapped
        store.put("svc/K", b"v3")
    assert fake_vault.tokens == live and store._client.token in live
    assert fake_vault.requests.count(("POST", "/v1/auth/approle/login")) == logins
    fake_vault.approles.clear()  # and when the login itself is refused, the 403 stands
    fake_vault.tokens.discard(store._client.token)
    with pytest.raises(AccessDeniedError, match="permission denied"):
        store.get("svc/K")


APP_POLICY = """
path "secret/data/svc/*" { capabilities = ["create", "read", "update", "delete"] }
path "secret/metadata/svc/*" { capabilities = ["create", "read", "update", "delete", "list", "patch"] }
"""


def no_default_approle_store(vault: FakeVault) -> VaultStore:
    """A store on an AppRole whose tokens lack Vault's `default` policy (the role's
    token_no_default_policy): they may read and write svc/ only, and cannot look themselves up,
    renew or revoke themselves."""
    vault.add_policy("app", APP_POLICY)
    vault.add_approle("role-app", "secret-app", policies=["app"], no_default_policy=True)
    env = {"VAULT_ROLE_ID": "role-app", "VAULT_SECRET_ID": "secret-app"}
    return VaultStore(connect_vault(vault.address, environ=env), "secret")


def logins(vault: FakeVault) -> int:
    return vault.requests.count(("POST", "/v1/auth/approle/login"))


def test_a_policy_refusal_of_a_token_without_default_is_no_new_login(fake_vault: FakeVault) -> None:
    """A token without `default` cannot look itself up, so every 403, a plain policy refusal too,
    was taken for a lapsed token: an AppRole login each, a new token that the old one could not
    revoke (no revoke-self either), left live until its TTL: tokens without bound for a client
    denied in a loop (Vault's "lease explosion", developer.hashicorp.com/vault/docs/concepts/
    lease-explosions). The mount's details (sys/internal/ui/mounts/MOUNT, which any valid token
    with a capability on the mount may read) now tell a valid token's refusal from a lapsed one."""
    store = no_default_approle_store(fake_vault)
    store.put("svc/K", b"v1")
    before = set(fake_vault.tokens)
    for _ in range(10):
        with pytest.raises(AccessDeniedError, match="permission denied"):
            store.get("other/K")
    assert logins(fake_vault) == 1  # the first, at connect
    assert fake_vault.tokens == before
    fake_vault.tokens.discard(store._client.token)  # its TTL ran out: a login replaces it
    assert store.put("svc/K", b"v2").version == 2
    assert logins(fake_vault) == 2


def test_relogins_that_do_not_help_are_held_off(fake_vault: FakeVault) -> None:
    """Where nothing tells a valid token from a lapsed one (no lookup-self, the mounts endpoint
    refused), a 403 still has the store log in again and repeat the request; if the new token is
    refused too, the refusal is the policy's: later 403s are not logged in again for a while
    (RELOGIN_HOLD_SECONDS, doubled each time it happens again), so a loop of refusals makes one
    token, not one per request."""
    store = no_default_approle_store(fake_vault)
    store.put("svc/K", b"v1")
    fake_vault.refuse_mounts_endpoint = True
    live = len(fake_vault.tokens)
    for _ in range(10):
        with pytest.raises(AccessDeniedError, match="permission denied"):
            store.get("other/K")
    assert logins(fake_vault) == 2  # at connect, and the one that did not help
    # the one it replaced could not revoke itself (no `default`): it lives until its TTL
    assert len(fake_vault.tokens) == live + 1
    assert store.get("svc/K").value.reveal() == b"v1"  # the new token works where the policy allows
    store._relogin_hold_until = 0.0  # the hold is over: a lapsed token is replaced again
    fake_vault.tokens.discard(store._client.token)
    assert store.put("svc/K", b"v2").version == 2
    assert logins(fake_vault) == 3


def test_threads_refused_with_one_lapsed_token_log_in_once(fake_vault: FakeVault) -> None:
    """A serve's threads that all meet the lapsed token: one logs in, the others repeat their
    request with its new token (before, each logged in: a token per thread)."""
    store = approle_store(fake_vault)
    store.put("svc/K", b"v1")
    fake_vault.tokens.discard(store._client.token)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def read() -> None:
        start.wait()
        try:
            store.get("svc/K")
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert logins(fake_vault) == 2


def test_a_token_from_the_vault_token_file_is_read_again_once_vault_refuses_it(
    fake_vault: FakeVault, tmp_path: Path
) -> None:
    """Vault Agent's auto-auth (a file sink) and `vault login` replace ~/.vault-token when its
    token expires or is revoked; a serve that read it at start kept the old one and was denied
    everything until restarted. Now a 403 the old token cannot look itself up after (a lapsed
    token, not a policy) has the file read again, and the request repeated with its token; the
    file's token is never revoked."""
    (tmp_path / ".vault-token").write_text(fake_vault.add_token("hvs.agent-1") + "\n")
    store = VaultStore(connect_vault(fake_vault.address, environ={"HOME": str(tmp_path)}), "secret")
    store.put("svc/K", b"v1")
    fake_vault.tokens.discard("hvs.agent-1")  # expired; the agent logs in again and writes the sink
    (tmp_path / ".vault-token").write_text(fake_vault.add_token("hvs.agent-2") + "\n")
    assert store.put("svc/K", b"v2").version == 2
    assert store._client.token == "hvs.agent-2"
    fake_vault.fail_next(403, errors=["permission denied"])  # a policy's 403: the token stands
    (tmp_path / ".vault-token").write_text(fake_vault.add_token("hvs.agent-3") + "\n")
    with pytest.raises(AccessDeniedError):
        store.get("svc/K")
    assert store._client.token == "hvs.agent-2"
    store.close()
    assert "hvs.agent-2" in fake_vault.tokens  # not ours to revoke
    assert not any("revoke" in path for _, path in fake_vault.requests)


def test_a_standby_that_redirects_to_the_active_node_is_followed_with_token_and_body(
    fake_vault: FakeVault,
) -> None:
    """A Vault standby with request forwarding off answers every request 307 with the active node's
    address (api-docs: HA, "standby nodes will redirect"): reads and writes (POST, PATCH with its
    merge-patch type) must reach the active node with the token and body, as they do (a guard)."""
    import http.server

    class Standby(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def redirect(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", fake_vault.address + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = redirect

        def log_message(self, format: str, *args: Any) -> None:
            pass

    standby = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Standby)
    threading.Thread(target=standby.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{standby.server_address[1]}"
        store = VaultStore(connect_vault(address, environ={"VAULT_TOKEN": fake_vault.root_token}), "secret")
        store.put("svc/K", b"v1", tags={"team": "a"})
        store.put("svc/K", b"v2")
        store.update_metadata("svc/K", set_tags={"team": "b"})  # a PATCH
        assert store.get("svc/K").value.reveal() == b"v2"
        assert store.describe("svc/K").tags == {"team": "b"}
        assert ("PATCH", "/v1/secret/metadata/svc/K") in fake_vault.requests
    finally:
        standby.shutdown()
        standby.server_close()


NO_ACTIVE_NODE = ["local node not active but active cluster node not found"]


def test_a_write_during_a_failover_waits_for_the_new_active_node(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """While a Vault cluster elects a new leader (the active node restarted or failed), the node
    we reach answers 500 'local node not active but active cluster node not found' having done
    nothing (hashicorp/vault#20336, #13639). A write failed at once ('Vault failed store …'), a
    read after urllib3's few retries (about a second). Both now wait for the new active node, up to
    FAILOVER_WAIT_SECONDS; any other 500 to a write is still not sent again."""
    store = make_vault()
    store.put("svc/K", b"v1")
    fake_vault.fail_next(500, count=10, errors=NO_ACTIVE_NODE)
    started = time.monotonic()
    assert store.put("svc/K", b"v2").version == 2
    assert store.get("svc/K").value.reveal() == b"v2"
    assert time.monotonic() - started < 9
    handle, failed = fake_vault.handle, []

    def fail_the_write(method: str, raw_path: str, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        if method == "POST" and raw_path == "/v1/secret/data/svc/K" and not failed:
            failed.append(raw_path)  # another 500: it may have been done, so it is not repeated
            return 500, {"errors": ["internal error"]}
        return handle(method, raw_path, *args, **kwargs)

    fake_vault.handle = fail_the_write  # type: ignore[method-assign]
    posts = fake_vault.requests.count(("POST", "/v1/secret/data/svc/K"))
    with pytest.raises(StorageError, match="Vault failed store svc/K: internal error"):
        store.put("svc/K", b"v3")
    assert failed and fake_vault.requests.count(("POST", "/v1/secret/data/svc/K")) == posts  # not sent again
    fake_vault.handle = handle  # type: ignore[method-assign]
    fake_vault.fail_next(500, count=1000, errors=NO_ACTIVE_NODE)  # no leader for good: bounded
    started = time.monotonic()
    with pytest.raises(StorageError, match="active cluster node not found"):
        store.get("svc/K")
    assert time.monotonic() - started < 15
    fake_vault._failures.clear()


# ---- a token with a TTL: renewed by a long-lived handle ---------------------------------------------


def _use_for(store: VaultStore, seconds: float) -> None:
    """Use the store as a serve does (its health check), every 0.2 s for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        store.probe()
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["renewable", "periodic"])
def test_a_renewable_token_is_renewed_before_its_ttl_runs_out(
    make_vault: MakeVault, fake_vault: FakeVault, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Vault revokes a token at its TTL unless it is renewed (`vault token renew`, renew-self), and a
    periodic token (the usual one for a service) must be renewed within its period. A serve given one
    in VAULT_TOKEN renewed nothing: after 4 s here (a day, a month in production) everything was
    403. Now the handle looks the token up, then renews it each time half its TTL has passed."""
    monkeypatch.setattr("secrets_manager.store.vault.TOKEN_CHECK_AFTER_SECONDS", 0.5)
    options: dict[str, Any] = {"ttl": 4} if kind == "renewable" else {"ttl": 4, "period": 4}
    store = make_vault(token=fake_vault.add_token("hvs.service", **options))
    store.put("svc/K", b"v1")
    _use_for(store, 9)  # over two TTLs; a renewal every 2 s leaves 2 s to spare under load
    assert store.get("svc/K").value.reveal() == b"v1"
    assert fake_vault.requests.count(("GET", "/v1/auth/token/lookup-self")) == 1
    renewals = fake_vault.requests.count(("POST", "/v1/auth/token/renew-self"))
    assert 2 <= renewals <= 12, renewals  # about every 2 s, not at every request


def test_a_token_that_cannot_be_renewed_further_fails_in_one_line_once_it_lapses(
    make_vault: MakeVault, fake_vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that is not renewable, or that reached its max TTL, lapses: the 403 then says so and
    what to do, not 'check the token and its policy'."""
    monkeypatch.setattr("secrets_manager.store.vault.TOKEN_CHECK_AFTER_SECONDS", 0.2)
    store = make_vault(token=fake_vault.add_token("hvs.capped", ttl=2, max_ttl=3))
    store.put("svc/K", b"v1")
    with pytest.raises(AccessDeniedError) as caught:
        _use_for(store, 6)
    message = str(caught.value)
    assert "token has expired (its TTL ran out and it cannot be renewed further)" in message
    assert "VAULT_TOKEN" in message and "VAULT_ROLE_ID" in message
    assert "\n" not in message and "hvs.capped" not in message
    fixed = make_vault(token=fake_vault.add_token("hvs.fixed", ttl=3, renewable=False))
    time.sleep(0.3)
    fixed.probe()  # looked up: not renewable, so nothing is renewed
    time.sleep(3)
    with pytest.raises(AccessDeniedError, match="token has expired"):
        fixed.probe()
    assert fake_vault.requests.count(("POST", "/v1/auth/token/renew-self")) <= 4  # hvs.capped's only


def test_a_token_without_a_ttl_is_looked_up_once_and_a_short_command_not_at_all(
    make_vault: MakeVault, fake_vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_vault()  # the root token: ttl 0
    store.put("svc/K", b"v1")
    assert not any("auth/token" in path for _, path in fake_vault.requests)  # a short command
    monkeypatch.setattr("secrets_manager.store.vault.TOKEN_CHECK_AFTER_SECONDS", 0.0)
    store = make_vault()
    _use_for(store, 1)
    assert fake_vault.requests.count(("GET", "/v1/auth/token/lookup-self")) == 1
    assert ("POST", "/v1/auth/token/renew-self") not in fake_vault.requests


def test_a_token_refused_its_own_lookup_is_not_looked_up_again_and_again(
    fake_vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token without `default` may not look itself up (nor renew itself): a serve's handle sent
    a refused lookup-self every TOKEN_RETRY_SECONDS for its whole life, each a 403 in Vault's audit
    log. Now a refused lookup is not sent again for that token (one from a new login is looked at
    afresh); it lapses at its TTL, and an AppRole then logs in again."""
    monkeypatch.setattr("secrets_manager.store.vault.TOKEN_CHECK_AFTER_SECONDS", 0.0)
    monkeypatch.setattr("secrets_manager.store.vault.TOKEN_RETRY_SECONDS", 0.0)
    store = no_default_approle_store(fake_vault)
    store.put("svc/K", b"v1")

    def use() -> None:  # as a serve does, on what its policy allows
        for _ in range(5):
            assert store.get("svc/K").value.reveal() == b"v1"
            time.sleep(0.1)

    use()
    assert fake_vault.requests.count(("GET", "/v1/auth/token/lookup-self")) == 1
    fake_vault.tokens.discard(store._client.token)  # lapsed: a new login, looked up once more
    use()
    assert logins(fake_vault) == 2
    assert fake_vault.requests.count(("GET", "/v1/auth/token/lookup-self")) == 3  # + _login_again's


# ---- TLS: VAULT_CACERT, and the Vault CLI's VAULT_CAPATH and VAULT_SKIP_VERIFY ------------------------


@pytest.fixture
def tls_vault(tmp_path: Path) -> Iterator[FakeVault]:
    """The test Vault over https, with a certificate from a CA of its own (tmp_path/ca.pem)."""
    from secrets_manager.tls import pki

    ca_cert, ca_key = pki.new_ca(trust_domain="vault.test")
    (tmp_path / "ca.pem").write_bytes(ca_cert)
    cert, key = pki.issue(ca_cert, ca_key, "vault", server=True)
    (tmp_path / "vault.pem").write_bytes(cert)
    (tmp_path / "vault-key.pem").write_bytes(key)
    vault = FakeVault().start(tls=(str(tmp_path / "vault.pem"), str(tmp_path / "vault-key.pem")))
    yield vault
    vault.stop()


@pytest.mark.parametrize(
    ("variables", "advice"),
    [
        ({}, "set VAULT_CACERT to the PEM file of the CA that signed it"),
        ({"VAULT_CAPATH": "{home}"}, "VAULT_CAPATH is not read: put the CA certificates"),
        (
            {"VAULT_SKIP_VERIFY": "true"},
            "VAULT_SKIP_VERIFY is not honoured: Vault's certificate is always verified",
        ),
        (
            {"VAULT_CACERT": "{home}/vault.pem"},
            "VAULT_CACERT ({home}/vault.pem) does not hold the CA that signed it",
        ),
    ],
    ids=["none", "capath", "skip-verify", "another-ca"],
)
def test_a_vault_certificate_that_is_not_trusted_is_said_so_with_what_to_do(
    tls_vault: FakeVault, tmp_path: Path, variables: dict[str, str], advice: str
) -> None:
    """The Vault CLI reads a directory of CAs from VAULT_CAPATH and skips verification with
    VAULT_SKIP_VERIFY; we do neither (the guard rail stays: certificates are always verified). A
    certificate not trusted was 'cannot reach Vault (SSLError); check the address and that Vault
    is running', about a Vault that answered, whatever was set."""
    environ = {
        "VAULT_TOKEN": tls_vault.root_token,
        **{k: v.format(home=tmp_path) for k, v in variables.items()},
    }
    store = VaultStore(connect_vault(tls_vault.address, environ=environ), "secret")
    with pytest.raises(StorageError) as caught:
        store.list()
    message = str(caught.value)
    assert message.startswith(
        f"Vault at {tls_vault.address} presented a certificate that is not trusted ("
    ), message
    assert advice.format(home=tmp_path) in message and "\n" not in message
    assert tls_vault.requests == []  # the handshake failed: nothing reached Vault
    trusted = VaultStore(
        connect_vault(tls_vault.address, environ={**environ, "VAULT_CACERT": f"{tmp_path}/ca.pem"}), "secret"
    )
    assert trusted.list() == []


@pytest.mark.parametrize(
    ("file", "why"), [("nope.pem", "cannot be read"), ("vault-key.pem", "holds no PEM certificate")]
)
def test_a_vault_cacert_that_is_no_ca_file_is_bad_input(
    tls_vault: FakeVault, tmp_path: Path, file: str, why: str
) -> None:
    """A VAULT_CACERT naming a missing file was 'internal error (OSError)' at the first request."""
    environ = {"VAULT_TOKEN": tls_vault.root_token, "VAULT_CACERT": str(tmp_path / file)}
    with pytest.raises(
        InvalidInputError, match=f"VAULT_CACERT names .*{file}., which {why}.*; set it to the PEM file"
    ):
        connect_vault(tls_vault.address, environ=environ)


# ---- a Vault that accepts connections and never answers --------------------------------------------


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What `call()` raises, asserting it returns within `seconds` (the thread is left behind if not)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0]


def test_a_vault_that_never_answers_is_reported_after_one_timeout(silent: SilentServer) -> None:
    """hvac's 30 s timeout was repeated by the read retries (5 attempts): 'get' on a stopped Vault
    took 159 s. Now a request that times out is not sent again, VAULT_CLIENT_TIMEOUT (the Vault
    CLI's variable) sets the wait, and the message names the Vault that did not answer."""
    client = connect_vault(silent.url, environ={"VAULT_TOKEN": "t", "VAULT_CLIENT_TIMEOUT": "0.5"})
    store = VaultStore(client, "secret")
    started = time.monotonic()
    error = _within(5, lambda: store.get("app/K"))
    assert isinstance(error, NoAnswerError), repr(error)
    assert str(error).startswith(f"Vault at {silent.url} did not answer within 0.5 s"), str(error)
    assert time.monotonic() - started < 2.5
    assert len(silent.accepted) == 1  # not sent again
    # Until the timeout has passed again, the next request (the failure's audit record) fails at once.
    started = time.monotonic()
    assert isinstance(_within(5, lambda: store.audit_key()), NoAnswerError)
    assert time.monotonic() - started < 0.2 and len(silent.accepted) == 1
    store.close()


def test_the_default_wait_is_bounded() -> None:
    client = connect_vault("http://127.0.0.1:1", environ={"VAULT_TOKEN": "t"})
    assert client.adapter._kwargs["timeout"] == (5.0, 10.0)
    assert connect_vault("http://127.0.0.1:1", environ={"VAULT_TOKEN": "t", "VAULT_CLIENT_TIMEOUT": "1m"})
    with pytest.raises(InvalidInputError, match="VAULT_CLIENT_TIMEOUT"):
        connect_vault("http://127.0.0.1:1", environ={"VAULT_TOKEN": "t", "VAULT_CLIENT_TIMEOUT": "soon"})


class WriteSwallowingProxy(TcpProxy):
    """Passes everything but a write of data/app/K, which never reaches Vault nor is answered."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.swallowed = 0

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if from_client and data.startswith(b"POST /v1/secret/data/app/K"):
            self.swallowed += 1
            return Verdict.SWALLOW
        return Verdict.PASS


def test_a_write_whose_answer_never_came_is_not_sent_again(fake_vault: FakeVault) -> None:
    """A KV v2 write without check-and-set, sent again after its answer was lost, could make two
    versions: it is sent once, and its outcome is said to be unknown."""
    host, port = fake_vault.address.split("://")[1].rsplit(":", 1)
    proxy = WriteSwallowingProxy(host, int(port))
    try:
        environ = {"VAULT_TOKEN": fake_vault.root_token, "VAULT_CLIENT_TIMEOUT": "0.5"}
        store = VaultStore(connect_vault(f"http://{proxy.address}", environ=environ), "secret")
        error = _within(5, lambda: store.put("app/K", b"v1"))
        assert isinstance(error, OutcomeUnknownError), repr(error)
        assert "did not answer within 0.5 s" in str(error) and "may or may not" in str(error)
        assert proxy.swallowed == 1
        store.close()
    finally:
        proxy.close()


def test_a_conditional_delete_whose_check_after_is_lost_says_the_secret_is_deleted(
    make_vault: MakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete POST went through, then the metadata read that checks no newer version overtook
    it failed (Vault sealed, the network): that was said as a failed delete, though the versions
    read are soft-deleted. It is an unknown outcome that says the secret is deleted."""
    from secrets_manager.errors import OutcomeUnknownError, StorageError

    store = make_vault()
    store.put("svc/OLD", b"KNOWN-1")
    read_meta, posted = store._read_meta, []
    send = store._send

    def post(method: str, path: str, **kwargs: Any) -> Any:
        if (method, path) == ("POST", "delete/svc/OLD"):
            posted.append(True)
        return send(method, path, **kwargs)

    def meta(name: str) -> Any:
        if posted:
            raise StorageError("Vault is sealed or unavailable (503)")
        return read_meta(name)

    monkeypatch.setattr(store, "_send", post)
    monkeypatch.setattr(store, "_read_meta", meta)
    with pytest.raises(OutcomeUnknownError) as caught:
        store.delete("svc/OLD", expect_version=1)
    message = str(caught.value)
    assert "svc/OLD' was deleted, but whether a newer version overtook the delete is unknown" in message
    assert "'undelete svc/OLD'" in message, message
    monkeypatch.undo()
    assert store.describe("svc/OLD").deleted is not None


# ---- metadata changes: a JSON merge patch, so a concurrent change of other keys stays ------------


def _interleaved(fake_vault: FakeVault, name: str, meanwhile: Callable[[], None]) -> None:
    """Run `meanwhile` once, just before the first metadata write (POST or PATCH) of `name` reaches
    the test server: after the writer read the metadata, before its change lands."""
    original = fake_vault.handle
    path = f"/v1/secret/metadata/{name}"

    def interleaving(method: str, raw_path: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("POST", "PATCH") and raw_path == path:
            fake_vault.handle = original  # type: ignore[method-assign]
            meanwhile()
        return original(method, raw_path, *args, **kwargs)

    fake_vault.handle = interleaving  # type: ignore[method-assign]


@pytest.mark.parametrize("change", ["set another tag", "remove another tag", "description", "expiry"])
def test_a_tag_change_keeps_a_change_of_other_keys_made_between_its_read_and_its_write(
    make_vault: MakeVault, fake_vault: FakeVault, change: str
) -> None:
    """`metadata NAME --tag a=1` reads the metadata, and another writer's change of other keys lands
    before its write: with a merge patch of just its own key both stay (the old read-modify-write
    POST of the whole custom_metadata put back what it had read, losing the other change)."""
    from datetime import UTC, datetime

    from secrets_manager.store.external import EXPIRES_KEY

    name = "svc/TAGS"
    store, other = make_vault(), make_vault()
    store.put(name, b"v1", description="before", tags={"old": "x"})
    later = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    meanwhile = {
        "set another tag": lambda: other.update_metadata(name, set_tags={"b": "2"}),
        "remove another tag": lambda: other.update_metadata(name, remove_tags=["old"]),
        "description": lambda: other.update_metadata(name, description="after"),
        "expiry": lambda: other.update_metadata(name, expires=later),
    }[change]
    _interleaved(fake_vault, name, meanwhile)
    store.update_metadata(name, set_tags={"a": "1"})
    meta = store.describe(name)
    expected_tags = {"old": "x", "a": "1"} | {
        "set another tag": {"b": "2"},
        "remove another tag": {},
        "description": {},
        "expiry": {},
    }[change]
    if change == "remove another tag":
        del expected_tags["old"]
    assert meta.tags == expected_tags
    assert meta.description == ("after" if change == "description" else "before")
    assert meta.expires == (later if change == "expiry" else None)
    custom = kv(fake_vault, name).custom_metadata
    assert custom[CREATED_BY_KEY]  # our own keys kept, and none shown as a tag
    assert (EXPIRES_KEY in custom) == (change == "expiry")
    assert ("PATCH", f"/v1/secret/metadata/{name}") in fake_vault.requests


def test_an_expiry_change_keeps_a_tag_set_between_its_read_and_its_write(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    from datetime import UTC, datetime

    name = "svc/EXPIRY"
    store, other = make_vault(), make_vault()
    store.put(name, b"v1", tags={"keep": "me"})
    _interleaved(fake_vault, name, lambda: other.update_metadata(name, set_tags={"b": "2"}))
    later = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    store.update_metadata(name, expires=later, expect_current=1)
    meta = store.describe(name)
    assert meta.tags == {"keep": "me", "b": "2"} and meta.expires == later
    _interleaved(fake_vault, name, lambda: other.update_metadata(name, remove_tags=["keep"]))
    store.update_metadata(name, clear_expiry=True, description="d")
    meta = store.describe(name)
    assert (meta.tags, meta.expires, meta.description) == ({"b": "2"}, None, "d")


def test_a_vault_without_metadata_patch_gets_the_whole_metadata_posted_as_before() -> None:
    """A Vault from before PATCH of KV metadata answers it 405: the change is made with today's
    POST of the whole custom_metadata (our own keys kept, and a reserved key never a tag)."""
    from datetime import UTC, datetime

    from secrets_manager.store.external import EXPIRES_KEY

    old_vault = FakeVault(metadata_patch=False).start()
    try:
        store = _root_store_on(old_vault)
        name = "svc/OLD"
        later = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
        store.put(name, b"v1", tags={"old": "x", "gone": "y"}, expires=later)
        store.update_metadata(name, set_tags={"a": "1"}, remove_tags=["gone"], description="d")
        meta = store.describe(name)
        assert (meta.tags, meta.description, meta.expires) == ({"old": "x", "a": "1"}, "d", later)
        custom = old_vault.mounts["secret"][name].custom_metadata
        assert custom[CREATED_BY_KEY] and EXPIRES_KEY in custom
        metadata_writes = [
            m for m, p in old_vault.requests if p == f"/v1/secret/metadata/{name}" and m != "GET"
        ]
        # refused (405) at the first store, then the old way (the refusal remembered)
        assert metadata_writes == ["PATCH", "POST", "POST"]
    finally:
        old_vault.stop()


def _tagged_a_and_b(fake_vault: FakeVault, path: str) -> tuple[str, dict[str, str]]:
    """A secret at `path` whose custom_metadata is {a: 1, b: 2}; the URL of its metadata and the
    headers of a merge-patch PATCH of it with the root token."""
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "v"}, mount_point="secret")
    client.secrets.kv.v2.update_metadata(
        path=path, custom_metadata={"a": "1", "b": "2"}, mount_point="secret"
    )
    headers = {"X-Vault-Token": fake_vault.root_token, "Content-Type": "application/merge-patch+json"}
    return f"{fake_vault.address}/v1/secret/metadata/{path}", headers


def test_the_test_server_patches_metadata_as_vault_documents(fake_vault: FakeVault) -> None:
    """PATCH MOUNT/metadata/PATH: a JSON merge patch (Content-Type application/merge-patch+json,
    else 415) of existing metadata (404 if none): custom_metadata keys set, a null one removed,
    others kept; checked as a POST is (400, nothing changed)."""
    url, headers = _tagged_a_and_b(fake_vault, "p/x")

    def patch(body: Any, **options: Any) -> int:
        return requests.patch(url, json=body, headers=options.get("headers", headers), timeout=10).status_code

    assert patch({"custom_metadata": {"a": None, "c": "3"}, "max_versions": 4}) == 204
    assert kv(fake_vault, "p/x").custom_metadata == {"b": "2", "c": "3"}
    assert kv(fake_vault, "p/x").max_versions == 4
    plain = {"X-Vault-Token": fake_vault.root_token}
    assert patch({"custom_metadata": {"d": "4"}}, headers=plain) == 415
    too_many = {f"k{i}": "v" for i in range(65)}
    assert patch({"custom_metadata": too_many}) == 400
    assert kv(fake_vault, "p/x").custom_metadata == {"b": "2", "c": "3"}
    missing = requests.patch(f"{url}-missing", json={"custom_metadata": {}}, headers=headers, timeout=10)
    assert missing.status_code == 404


def test_the_test_server_checks_the_keys_a_patch_sets_not_its_merged_result(fake_vault: FakeVault) -> None:
    """Vault's pathMetadataPatch validates the custom_metadata of the patch (its nulls left out)
    before it looks the secret up, and writes the merged result unchecked: a patch of 64 keys onto
    a secret holding 2 is taken (66 keys then), one of 65 is not, and an invalid patch of a
    missing secret is a 400, not a 404. The test server checked the merged result instead."""
    url, headers = _tagged_a_and_b(fake_vault, "p/y")

    def patch(body: Any, at: str = url) -> int:
        return requests.patch(at, json=body, headers=headers, timeout=10).status_code

    sixty_four = {f"k{i:02d}": "v" for i in range(64)}
    assert patch({"custom_metadata": {**sixty_four, "a": None}}) == 204  # the null is not counted
    assert kv(fake_vault, "p/y").custom_metadata == {"b": "2", **sixty_four}  # 65 keys
    assert patch({"custom_metadata": {"c": "3"}}) == 204
    assert len(kv(fake_vault, "p/y").custom_metadata) == 66
    assert patch({"custom_metadata": {**sixty_four, "k64": "v"}}) == 400
    assert patch({"custom_metadata": {"x": "y" * 513}}) == 400
    assert len(kv(fake_vault, "p/y").custom_metadata) == 66
    assert patch({"custom_metadata": {**sixty_four, "k64": "v"}}, at=f"{url}-missing") == 400
    assert patch({"custom_metadata": {"ok": "v"}}, at=f"{url}-missing") == 404


def test_a_store_with_an_expiry_or_description_keeps_a_tag_set_between_its_read_and_its_metadata_write(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """`store NAME --expires T` (no `--tag`) of an existing secret reads its metadata, writes the
    version, then records the expiry: a tag another writer set in between stays (the old whole
    POST of the custom_metadata read before the data write dropped it)."""
    from datetime import UTC, datetime

    name = "svc/STORED"
    store, other = make_vault(), make_vault()
    store.put(name, b"v1", tags={"keep": "me"})
    _interleaved(fake_vault, name, lambda: other.update_metadata(name, set_tags={"b": "2"}))
    later = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert store.put(name, b"v2", expires=later, description="d").version == 2
    meta = store.describe(name)
    assert (meta.tags, meta.description, meta.expires) == ({"keep": "me", "b": "2"}, "d", later)
    store.put(name, b"v3", tags={"only": "this"})  # `--tag` replaces the tags whole, as documented
    assert store.describe(name).tags == {"only": "this"}


def test_a_token_without_the_patch_capability_gets_the_metadata_posted_as_before(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """A policy granting create/update but not `patch` on MOUNT/metadata/* (403 on PATCH): the
    change is made with the POST of the whole custom_metadata, as before PATCH was used."""
    token = fake_vault.add_token("no-patch-token", patch=False)
    store = make_vault(token=token)
    name = "svc/NOPATCH"
    store.put(name, b"v1", tags={"old": "x"})
    store.update_metadata(name, set_tags={"a": "1"}, remove_tags=["old"], description="d")
    meta = store.describe(name)
    assert (meta.tags, meta.description) == ({"a": "1"}, "d")
    writes = [m for m, p in fake_vault.requests if p == f"/v1/secret/metadata/{name}" and m != "GET"]
    assert writes == ["PATCH", "POST", "PATCH", "POST"]  # refused (403) each time, then the POST


def test_a_refused_metadata_patch_is_not_sent_again_by_the_same_store(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """A Vault without metadata PATCH (405): the first metadata write learns it; later ones of the
    same store handle go straight to the POST (one refused PATCH per change was one wasted
    request). A 403 (a token whose policy lacks `patch`, or one that failed to renew) is not
    remembered, so a long-running serve is not left on the POST's lost-update window by one."""
    old_vault = FakeVault(metadata_patch=False).start()
    try:
        refused = [(_root_store_on(old_vault), old_vault, 1)]
        refused.append((make_vault(token=fake_vault.add_token("no-patch", patch=False)), fake_vault, 6))
        for store, server, expected in refused:
            for i in range(3):
                store.put(f"svc/ONCE{i}", b"v1", tags={"a": "1"})
                store.update_metadata(f"svc/ONCE{i}", set_tags={"b": "2"}, description=f"d{i}")
                assert store.describe(f"svc/ONCE{i}").description == f"d{i}"
            patches = [p for m, p in server.requests if m == "PATCH"]
            assert len(patches) == expected, patches
        _root_store_on(old_vault).put("svc/FRESH", b"v1", tags={"a": "1"})
        assert [m for m, _ in old_vault.requests].count("PATCH") == 2  # a new handle tries again
    finally:
        old_vault.stop()


def _root_store_on(server: FakeVault) -> VaultStore:
    """A new store handle on `server` with its root token."""
    client = connect_vault(
        server.address,
        environ={"VAULT_TOKEN": server.root_token},
        session=retrying_session(attempts=3, backoff=0.001),
    )
    return VaultStore(client, mount="secret")


def test_the_first_store_of_a_secret_keeps_a_change_another_writer_made_after_its_version(
    make_vault: MakeVault, fake_vault: FakeVault
) -> None:
    """`store NAME` of a new secret writes version 1 (Vault makes its metadata then), then its own
    keys (created-by, max_versions): another writer's `store NAME --description d --expires T`
    landing in between (version 2, its keys patched in) keeps them; the whole POST of the first
    store's custom_metadata dropped them, so version 2, the current one, had no expiry."""
    from datetime import UTC, datetime

    name = "svc/NEW"
    store, other = make_vault(), make_vault()
    later = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    _interleaved(fake_vault, name, lambda: other.put(name, b"second-SEEKRIT", description="d", expires=later))
    assert store.put(name, b"first-SEEKRIT", tags={"team": "a"}).version == 1
    meta = store.describe(name)
    assert (meta.current_version, meta.description, meta.expires) == (2, "d", later)
    assert meta.tags == {"team": "a"} and meta.max_versions == kv(fake_vault, name).max_versions
    assert kv(fake_vault, name).custom_metadata.get("secrets-manager:created-by")
    plain = make_vault(token=fake_vault.add_token("no-patch-new", patch=False))
    plain.put("svc/NEW2", b"v", description="first")  # without `patch`: the POST, as before
    assert plain.describe("svc/NEW2").description == "first"


def test_the_test_server_refuses_empty_or_unprintable_custom_metadata_as_vault_does(
    fake_vault: FakeVault,
) -> None:
    """Vault's validateCustomMetadata takes values of 1 to 512 bytes and printable keys and values
    only (POST and PATCH alike); the test server took an empty value or a control character, which
    Vault answers 400."""
    client = hvac.Client(url=fake_vault.address, token=fake_vault.root_token)
    client.secrets.kv.v2.create_or_update_secret(path="p/z", secret={"value": "v"}, mount_point="secret")
    url = f"{fake_vault.address}/v1/secret/metadata/p/z"
    token = {"X-Vault-Token": fake_vault.root_token}
    patching = {**token, "Content-Type": "application/merge-patch+json"}
    for custom in ({"empty": ""}, {"tab": "a\tb"}, {"bell\x07": "v"}):
        posted = requests.post(url, json={"custom_metadata": custom}, headers=token, timeout=10)
        patched = requests.patch(url, json={"custom_metadata": custom}, headers=patching, timeout=10)
        assert (posted.status_code, patched.status_code) == (400, 400), custom
    assert not kv(fake_vault, "p/z").custom_metadata
    ok = requests.post(url, json={"custom_metadata": {"ü key": "a value"}}, headers=token, timeout=10)
    assert ok.status_code == 204


def test_destroying_the_last_versions_of_a_deleted_secret_is_refused_and_it_stays_deleted(
    make_vault: MakeVault,
) -> None:
    """KV v2 keeps no deleted flag (a secret is deleted while every version not destroyed is
    soft-deleted): destroying the last ones made a deleted secret read as live, listed, written
    to and refused an undelete. Found by tests/test_store_model.py: put, delete, destroy [1]."""
    store = make_vault()
    store.put("app/gone", b"v1")
    store.put("app/gone", b"v2")
    store.destroy("app/gone", [1])
    store.delete("app/gone")
    with pytest.raises(SecretStateError, match="nothing was destroyed"):
        store.destroy("app/gone", [2])
    meta = store.describe("app/gone")
    assert meta.deleted is not None and [v.destroyed for v in meta.versions] == [True, False]
    assert "app/gone" not in [m.name for m in store.list("app/")]
    with pytest.raises(SecretStateError):
        store.put("app/gone", b"v3")
    store.undelete("app/gone")
    assert store.get("app/gone").value.reveal() == b"v2"
    store.destroy("app/gone", [2])  # a live secret's last version: destroyed, as on every store
    assert store.describe("app/gone").deleted is None
