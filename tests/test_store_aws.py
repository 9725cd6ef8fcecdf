"""AwsStore: the conformance suite against moto's server on 127.0.0.1, the native layout that other
AWS tools see, and AWS's errors mapped to ours.

Known moto divergences, worked around rather than relied on: ListSecretVersionIds reports the time
of the call as every version's CreatedDate (our numbering does not depend on it for our own
versions, which carry their number in their VersionId; tests/conftest.py patches moto to report
the creation time, as AWS does, for `list --older-than` and `history`); UpdateSecret ignores an
empty Description (patched there too: AWS clears it); PutSecretValue on a secret scheduled for
deletion is accepted (AwsStore checks DescribeSecret first, as AWS would refuse it);
ListSecretVersionIds of a missing secret is a 500 rather than ResourceNotFoundException (AwsStore
calls DescribeSecret before it); tags with characters AWS refuses are accepted (AwsStore refuses
them first).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config

from secrets_manager.environment import Environment
from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    NothingToChangeError,
    OutcomeUnknownError,
    SecretStateError,
    StorageError,
    UnsupportedOperationError,
)
from secrets_manager.store import EncryptedStore, SecretStore
from secrets_manager.store.aws import AwsStore, connect_aws
from secrets_manager.store.base import PENDING, PREVIOUS, Anchor, AuditedStore, check_metadata_fits
from secrets_manager.store.external import CREATED_BY_KEY, MAX_VERSIONS_KEY, NoAnswerError
from secrets_manager.store.names import MAX_NAME_LENGTH
from secrets_manager.store.testing import SECRET_STORE_CHECKS, check_secret_store, run_check
from secrets_manager.store.url import AwsLocation, external_location, open_external_store
from tcp_proxy import SilentServer, TcpProxy, Verdict

REGION = "us-east-1"
MakeAws = Callable[..., AwsStore]


def aws_client(endpoint: str, **credentials: str) -> Any:
    session = boto3.session.Session(
        aws_access_key_id=credentials.get("key", "testing"),
        aws_secret_access_key=credentials.get("secret", "testing"),
        region_name=REGION,
    )
    return session.client(
        "secretsmanager",
        endpoint_url=endpoint,
        config=Config(retries={"mode": "standard", "max_attempts": 2}),
    )


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
def native(moto_endpoint: str) -> Any:
    """A plain boto3 client: what `aws secretsmanager` would see."""
    return aws_client(moto_endpoint)


@pytest.fixture
def make_aws(moto_endpoint: str, prefix: str) -> MakeAws:
    def _open(**options: Any) -> AwsStore:
        options.setdefault("actor", "tester")
        return AwsStore(aws_client(moto_endpoint), options.pop("prefix", prefix), **options)

    return _open


# ---- the contract --------------------------------------------------------------------------------


def test_aws_store_passes_the_whole_conformance_suite(make_aws: MakeAws) -> None:
    check_secret_store(make_aws)


@pytest.mark.parametrize("behaviour", list(SECRET_STORE_CHECKS))
def test_aws_store_conforms(behaviour: str, make_aws: MakeAws) -> None:
    run_check(make_aws, behaviour)


@pytest.mark.parametrize("land", ["store", "stage"])
def test_mv_whose_old_is_written_just_before_its_delete_leaves_old_in_place(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch, land: str
) -> None:
    """DeleteSecret has no condition: another writer's PutSecretValue (a store, or a rotation's
    stage: AWSPENDING) lands after the delete's check, just before DeleteSecret. The check after it
    sees AWSCURRENT moved or AWSPENDING on another version, restores the secret and refuses; mv
    (its delete refused) leaves OLD in place with the newer or staged value, NEW not written."""
    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note

    store, other = make_aws(), make_aws()
    store.put("svc/OLD", b"KNOWN-1")
    client = store._client
    delete_secret, written = client.delete_secret, []

    def write_before_the_delete(**kwargs: Any) -> Any:
        if not written:
            write = other.put if land == "store" else other.stage
            written.append(write("svc/OLD", b"KNOWN-2"))
        return delete_secret(**kwargs)

    monkeypatch.setattr(client, "delete_secret", write_before_the_delete)
    changed = "now version 2, not 1" if land == "store" else "a rotation was staged: version 2 is pending"
    with pytest.raises(ConflictError, match=re.escape(f"svc/OLD changed since mv read it ({changed}")):
        copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    assert written
    meta = other.describe("svc/OLD")
    assert meta.deleted is None and meta.current_version == (2 if land == "store" else 1)
    assert (
        other.get("svc/OLD", label="current" if land == "store" else "pending").value.reveal() == b"KNOWN-2"
    )
    with pytest.raises(NotFoundError):
        other.get("svc/NEW")


def test_mv_whose_overtaken_delete_cannot_be_undone_says_old_is_deleted_with_its_newer_version(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race, and RestoreSecret refused (a policy without it): OLD stays deleted with the
    newer version. The one line says so (not 'OLD was not deleted'), how to bring it back, and
    that NEW was not written."""
    from botocore.exceptions import ClientError

    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note

    store, other = make_aws(), make_aws()
    store.put("svc/OLD", b"KNOWN-1")
    client = store._client
    delete_secret = client.delete_secret

    def write_before_the_delete(**kwargs: Any) -> Any:
        other.put("svc/OLD", b"KNOWN-2")
        return delete_secret(**kwargs)

    def refused(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "RestoreSecret")

    monkeypatch.setattr(client, "delete_secret", write_before_the_delete)
    monkeypatch.setattr(client, "restore_secret", refused)
    with pytest.raises(AccessDeniedError) as caught:
        copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    message = str(caught.value)
    assert "'svc/OLD' got a new version while it was being deleted" in message, message
    assert "could not be undone" in message and "not deleted" not in message, message
    assert "'undelete svc/OLD' restores it" in message, message
    assert "nothing was renamed and svc/NEW was not written" in message, message
    monkeypatch.undo()
    other.undelete("svc/OLD")
    assert other.get("svc/OLD").value.reveal() == b"KNOWN-2"
    with pytest.raises(NotFoundError):
        other.get("svc/NEW")


def test_aws_store_conforms_with_no_prefix(make_aws: MakeAws) -> None:
    run_check(lambda: make_aws(prefix=""), "list-prefix")


def test_aws_store_satisfies_the_audited_store_protocol(make_aws: MakeAws) -> None:
    store = make_aws()
    assert isinstance(store, SecretStore) and isinstance(store, AuditedStore)
    store.close()


# ---- what other AWS tools see --------------------------------------------------------------------


def test_text_is_a_secret_string_and_binary_a_secret_binary(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    store = make_aws()
    store.put("svc/TEXT", "pässwörd".encode())
    store.put("svc/BIN", b"\xff\x00\xfe")
    text = native.get_secret_value(SecretId=f"{prefix}/svc/TEXT")
    assert text["SecretString"] == "pässwörd" and "SecretBinary" not in text
    binary = native.get_secret_value(SecretId=f"{prefix}/svc/BIN")
    assert binary["SecretBinary"] == b"\xff\x00\xfe" and "SecretString" not in binary


def test_versions_carry_their_number_in_the_version_id(make_aws: MakeAws, native: Any, prefix: str) -> None:
    store = make_aws()
    store.put("svc/V", b"one")
    store.put("svc/V", b"two")
    reply = native.get_secret_value(SecretId=f"{prefix}/svc/V")
    assert reply["VersionId"] == "secrets-manager-version-0000000002"
    previous = native.get_secret_value(SecretId=f"{prefix}/svc/V", VersionStage="AWSPREVIOUS")
    assert previous["SecretString"] == "one"


def test_description_and_tags_are_native(make_aws: MakeAws, native: Any, prefix: str) -> None:
    store = make_aws()
    store.put("svc/META", b"v", description="exchange key", tags={"team": "desk1", "env": "dev"})
    store.put("svc/META", b"w", tags={"team": "ops"})
    described = native.describe_secret(SecretId=f"{prefix}/svc/META")
    assert described["Description"] == "exchange key"
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {CREATED_BY_KEY: "tester", "team": "ops"}
    meta = store.describe("svc/META")
    assert (meta.created_by, dict(meta.tags)) == ("tester", {"team": "ops"})


def test_a_tag_aws_would_refuse_is_refused_before_anything_is_written(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    """moto takes any character in a tag; AWS refuses those outside its tag character set, and for
    `put` only after the new version was written. Letters of any script are allowed."""
    store = make_aws()
    kept = {"team": "désk 1", "path": "a/b:c=d+e-f_g.h@i"}
    store.put("svc/T", b"v1", description="before", tags=kept)
    before = native.describe_secret(SecretId=f"{prefix}/svc/T")
    for tags, named in (
        ({"k": "v!"}, "the value of tag 'k' of 'svc/T'"),
        ({"k": "a,b"}, "the value of tag 'k'"),
        ({"ключ": "ü", "k": "<v>"}, "the value of tag 'k'"),
        ({"k!": "v"}, "tag key 'k!' of 'svc/T'"),
        ({"k\u202e": "v"}, "tag key 'k\\u202e'"),  # a format character, escaped in the message
    ):
        with pytest.raises(InvalidInputError) as on_put:
            store.put("svc/T", b"v2", tags=tags)
        with pytest.raises(InvalidInputError) as on_update:
            store.update_metadata("svc/T", description="after", set_tags=tags)
        for message in (str(on_put.value), str(on_update.value)):
            assert named in message and "does not allow" in message and "_ . : / = + - @" in message
            assert not any(value in message for value in ("v!", "a,b", "<v>"))
    with pytest.raises(InvalidInputError, match="character AWS does not allow"):
        store.put("svc/NEW", b"v", tags={"k": "v!"})
    with pytest.raises(NotFoundError):
        store.describe("svc/NEW")
    after = native.describe_secret(SecretId=f"{prefix}/svc/T")
    assert after["Tags"] == before["Tags"] and after["Description"] == "before"
    assert after["VersionIdsToStages"] == before["VersionIdsToStages"]  # no new version
    assert store.get("svc/T").value.reveal() == b"v1"
    store.update_metadata("svc/T", set_tags={"ключ": "значение 2"}, remove_tags=["bad!"])  # absent: no call
    assert dict(store.describe("svc/T").tags) == kept | {"ключ": "значение 2"}


def test_max_versions_is_our_tag_and_limits_the_versions_we_show(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    """AWS has no per-secret max_versions: ours is the tag secrets-manager:max-versions. AWS keeps
    the versions, so a lower value hides the older ones at once and a higher one shows them again."""
    store = make_aws()
    store.put("svc/ROLL", b"v1", max_versions=3, tags={"team": "desk1"})
    for n in range(2, 6):
        store.put("svc/ROLL", f"v{n}".encode())
    described = native.describe_secret(SecretId=f"{prefix}/svc/ROLL")
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        CREATED_BY_KEY: "tester",
        MAX_VERSIONS_KEY: "3",
        "team": "desk1",
    }
    meta = store.describe("svc/ROLL")
    assert (meta.max_versions, [v.version for v in meta.versions], dict(meta.tags)) == (
        3,
        [3, 4, 5],
        {"team": "desk1"},
    )
    with pytest.raises(NotFoundError):
        store.get("svc/ROLL", version=2)
    store.update_metadata("svc/ROLL", max_versions=5)
    assert [v.version for v in store.describe("svc/ROLL").versions] == [1, 2, 3, 4, 5]
    assert store.get("svc/ROLL", version=1).value.reveal() == b"v1"
    native.tag_resource(SecretId=f"{prefix}/svc/ROLL", Tags=[{"Key": MAX_VERSIONS_KEY, "Value": "junk"}])
    assert store.describe("svc/ROLL").max_versions == 10  # spoilt by another tool: the default


def test_a_max_versions_tag_that_does_not_fit_is_refused_before_the_write(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    store = make_aws()
    store.put("svc/FULL", b"v1", tags={f"t{i:02d}": "v" for i in range(49)})  # 49 and created-by: 50
    for attempt in (
        lambda: store.put("svc/FULL", b"v2", max_versions=3),
        lambda: store.update_metadata("svc/FULL", max_versions=3),
    ):
        with pytest.raises(UnsupportedOperationError, match="not supported by this store"):
            attempt()
    meta = store.describe("svc/FULL")
    assert (meta.current_version, meta.max_versions, len(meta.tags)) == (1, 10, 49)
    with pytest.raises(UnsupportedOperationError):
        store.put("svc/NEW", b"v1", max_versions=3, tags={f"t{i:02d}": "v" for i in range(49)})
    with pytest.raises(NotFoundError):
        store.describe("svc/NEW")


def test_versions_written_by_another_tool_are_numbered_in_order(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    native.create_secret(Name=f"{prefix}/svc/FOREIGN", SecretString="from-another-tool")
    store = make_aws()
    assert store.get("svc/FOREIGN").version == 1
    assert store.put("svc/FOREIGN", b"ours").version == 2
    native.put_secret_value(SecretId=f"{prefix}/svc/FOREIGN", SecretString="rotated-by-lambda")
    meta = store.describe("svc/FOREIGN")
    assert [(v.version, v.labels) for v in meta.versions] == [(1, ()), (2, (PREVIOUS,)), (3, ("current",))]
    assert store.get("svc/FOREIGN").value.reveal() == b"rotated-by-lambda"
    assert store.get("svc/FOREIGN", version=1).value.reveal() == b"from-another-tool"
    assert store.put("svc/FOREIGN", b"ours again").version == 4


def test_the_pending_label_is_awspending(make_aws: MakeAws, native: Any, prefix: str) -> None:
    store = make_aws()
    store.put("svc/ROT", b"current")
    native.put_secret_value(
        SecretId=f"{prefix}/svc/ROT", SecretString="next", VersionStages=["AWSPENDING"]
    )  # a rotation's first step
    pending = store.get("svc/ROT", label=PENDING)
    assert pending.value.reveal() == b"next" and pending.labels == (PENDING,)
    assert store.get("svc/ROT").value.reveal() == b"current"


def test_a_kms_key_per_namespace_is_given_at_creation(make_aws: MakeAws, native: Any, prefix: str) -> None:
    store = make_aws(kms_keys={"auth": "alias/auth"}, default_kms_key="alias/shared")
    store.put("auth/DB_PASSWORD", b"a")
    store.put("market/KEY", b"b")
    assert native.describe_secret(SecretId=f"{prefix}/auth/DB_PASSWORD")["KmsKeyId"] == "alias/auth"
    assert native.describe_secret(SecretId=f"{prefix}/market/KEY")["KmsKeyId"] == "alias/shared"


def test_delete_uses_a_recovery_window_and_undelete_restores(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    store = make_aws(recovery_window_days=7)
    store.put("svc/SOFT", b"v")
    store.delete("svc/SOFT")
    assert "DeletedDate" in native.describe_secret(SecretId=f"{prefix}/svc/SOFT")
    store.undelete("svc/SOFT")
    assert "DeletedDate" not in native.describe_secret(SecretId=f"{prefix}/svc/SOFT")


def test_destroying_one_version_is_not_supported(make_aws: MakeAws) -> None:
    store = make_aws()
    store.put("svc/KEEP", b"v")
    with pytest.raises(UnsupportedOperationError, match=r"not supported by this store.*--all"):
        store.destroy("svc/KEEP", [1])
    assert store.get("svc/KEEP", version=1).value.reveal() == b"v"


def test_an_empty_value_is_not_supported(make_aws: MakeAws) -> None:
    with pytest.raises(UnsupportedOperationError, match="not supported by this store"):
        make_aws().put("svc/EMPTY", b"")


def test_concurrent_writers_lose_no_version(make_aws: MakeAws) -> None:
    stores = [make_aws() for _ in range(4)]
    stores[0].put("svc/RACE", b"start")
    errors: list[BaseException] = []

    def writer(store: AwsStore, n: int) -> None:
        try:
            for i in range(3):
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
    assert meta.current_version == 13
    assert [v.version for v in meta.versions] == list(range(4, 14))


# ---- errors ---------------------------------------------------------------------------------------


def test_a_stale_version_taken_by_another_writer_is_a_conflict(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    store = make_aws()
    store.put("svc/CAS", b"v1")
    # A rival secrets-manager writer took version 2 between our read and our write.
    original = store._versions
    calls = iter([True])

    def versions_then_rival(name: str) -> Any:
        result = original(name)
        if next(calls, False):
            native.put_secret_value(
                SecretId=f"{prefix}/svc/CAS",
                SecretString="rival",
                ClientRequestToken="secrets-manager-version-0000000002",
            )
        return result

    store._versions = versions_then_rival  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="changed since version 1"):
        store.put("svc/CAS", b"mine", expect_version=1)
    assert store.get("svc/CAS").value.reveal() == b"rival"


def test_a_missing_secret_is_not_found(make_aws: MakeAws) -> None:
    with pytest.raises(NotFoundError, match="svc/NOPE"):
        make_aws().get("svc/NOPE")


def test_a_deleted_secret_reads_as_not_found(make_aws: MakeAws) -> None:
    store = make_aws()
    store.put("svc/GONE", b"v")
    store.delete("svc/GONE")
    with pytest.raises(NotFoundError, match="deleted"):
        store.get("svc/GONE")


def test_an_unreachable_endpoint_is_a_storage_error() -> None:
    store = AwsStore(aws_client("http://127.0.0.1:9"), "x")
    with pytest.raises(StorageError, match="cannot reach AWS"):
        store.list()


def test_a_reserved_tag_key_is_refused(make_aws: MakeAws) -> None:
    with pytest.raises(InvalidInputError, match="reserved"):
        make_aws().put("svc/T", b"v", tags={"secrets-manager:created-by": "someone"})


def test_access_denied_maps_to_access_denied(make_aws: MakeAws) -> None:
    """moto accepts any credentials; the mapping is exercised with the error AWS sends."""
    from botocore.exceptions import ClientError

    store = make_aws()
    error = {"Error": {"Code": "AccessDeniedException", "Message": "User is not authorized"}}
    with pytest.raises(AccessDeniedError, match="not authorized"), store._aws("read svc/X", "svc/X"):
        raise ClientError(error, "GetSecretValue")


@pytest.fixture
def list_versions_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto answering ListSecretVersionIds as IAM does for a reader's policy without that action
    (AWS's usual least privilege for consumers: GetSecretValue, maybe DescribeSecret)."""
    from moto.secretsmanager.exceptions import SecretsManagerClientError
    from moto.secretsmanager.models import SecretsManagerBackend

    def denied(self: Any, secret_id: str, *args: Any, **kwargs: Any) -> Any:
        raise SecretsManagerClientError(
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/reader/x is not authorized to perform: "
            "secretsmanager:ListSecretVersionIds",
            400,
        )

    monkeypatch.setattr(SecretsManagerBackend, "list_secret_version_ids", denied)


def test_a_reader_without_list_versions_reads_another_tools_value_with_its_number_unknown(
    make_aws: MakeAws, native: Any, prefix: str, request: pytest.FixtureRequest
) -> None:
    """AWS already returned the value; only its number needs the version list."""
    store = make_aws()
    store.put("svc/OURS", b"our-value")
    native.create_secret(Name=f"{prefix}/svc/FROM_TERRAFORM", SecretString="tf-value")
    request.getfixturevalue("list_versions_denied")
    foreign = store.get("svc/FROM_TERRAFORM")
    assert (foreign.value.reveal(), foreign.version, foreign.labels) == (b"tf-value", 0, ("current",))
    ours = store.get("svc/OURS")
    assert (ours.value.reveal(), ours.version) == (b"our-value", 1)
    for read in (lambda: store.get("svc/FROM_TERRAFORM", version=1), lambda: store.describe("svc/OURS")):
        with pytest.raises(AccessDeniedError, match="ListSecretVersionIds"):
            read()


class _Throttled:
    """A botocore before-send handler that answers the next `count` calls of `operation` as AWS
    does when the account's rate quota is used up (HTTP 400, JSON protocol's ThrottlingException),
    without sending them; the others go to moto. `sent` counts the calls answered so."""

    def __init__(self, client: Any, operation: str, count: int) -> None:
        self.left, self.sent = count, 0
        client.meta.events.register(f"before-send.secrets-manager.{operation}", self)

    def __call__(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        if self.left <= 0:
            return None
        self.left -= 1
        self.sent += 1
        body = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'

        class Raw:
            def stream(self) -> Any:
                yield body

        headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": "throttled"}
        return AWSResponse(request.url, 400, headers, Raw())


class _Denied:
    """A botocore before-send handler answering every call of `operation` as IAM does for a
    policy without that action (HTTP 400, AccessDeniedException), without sending it; the other
    calls go to moto. `sent` counts the calls answered so."""

    def __init__(self, client: Any, operation: str) -> None:
        self.operation, self.sent = operation, 0
        client.meta.events.register(f"before-send.secrets-manager.{operation}", self)

    def __call__(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        self.sent += 1
        body = (
            b'{"__type":"AccessDeniedException","message":"User: arn:aws:iam::123456789012:user/app '
            b"is not authorized to perform: secretsmanager:" + self.operation.encode() + b'"}'
        )

        class Raw:
            def stream(self) -> Any:
                yield body

        headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": "denied"}
        return AWSResponse(request.url, 400, headers, Raw())


@pytest.mark.parametrize(
    ("operation", "metadata"),
    [
        ("TagResource", {"tags": {"team": "desk"}}),
        ("UpdateSecret", {"description": "the desk's key"}),
        ("UntagResource", {"tags": {}}),
        ("TagResource", {"max_versions": 3}),
    ],
)
def test_a_version_stored_whose_metadata_was_refused_says_it_was_stored(
    make_aws: MakeAws, operation: str, metadata: dict[str, Any]
) -> None:
    """PutSecretValue succeeds, then the TagResource, UpdateSecret or UntagResource of the
    description, tags, max_versions or expiry is refused (a policy granting PutSecretValue
    alone): the error said only 'denied', so the user stored the value again, as yet another
    version. It now says which version was stored (same class, same exit code)."""
    store = make_aws()
    store.put("svc/K", b"one", tags={"old": "tag"})
    denied = _Denied(store._client, operation)
    with pytest.raises(AccessDeniedError) as caught:
        store.put("svc/K", b"two", **metadata)
    message = str(caught.value)
    assert denied.sent == 1
    assert message.startswith("version 2 of 'svc/K' was stored, but not its metadata"), message
    assert f"secretsmanager:{operation}" in message and "do not store the value again" in message
    assert "\n" not in message and "two" not in message.replace("'svc/K'", "")
    assert store.get("svc/K").version == 2


def test_a_destroy_of_a_deleted_secret_whose_forced_delete_is_refused_says_it_was_restored(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS refuses a forced DeleteSecret of a secret scheduled for deletion, so destroy --all
    restores it first (RestoreSecret), then deletes it for good. That second DeleteSecret refused,
    the error said only "AWS denied destroy svc/K", and the secret, deleted before, was live again
    unnoticed: readable by every reader. Now it is deleted again (with its recovery window, as it
    was), and the one line says the destroy was not made; if even that fails, that it is live."""
    store = make_aws()
    store.put("svc/K", b"v")
    store.delete("svc/K")
    client = store._client
    delete_secret = client.delete_secret

    def forced_refused(**kwargs: Any) -> Any:
        """The first forced delete answered as AWS answers one of a secret scheduled for deletion
        (moto takes it), the second (after the restore) refused."""
        if kwargs.get("ForceDeleteWithoutRecovery"):
            from botocore.exceptions import ClientError

            forced_refused.calls += 1  # type: ignore[attr-defined]
            if forced_refused.calls == 1:  # type: ignore[attr-defined]
                scheduled = "You tried to perform the operation on a secret that's currently marked deleted."
                error = {"Error": {"Code": "InvalidRequestException", "Message": scheduled}}
            else:
                error = {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}
            raise ClientError(error, "DeleteSecret")
        return delete_secret(**kwargs)

    forced_refused.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(client, "delete_secret", forced_refused)
    with pytest.raises(AccessDeniedError) as caught:
        store.destroy_secret("svc/K")
    message = str(caught.value)
    assert forced_refused.calls == 2  # type: ignore[attr-defined]
    assert "'svc/K' was not destroyed" in message and "it is deleted again" in message, message
    assert store.describe("svc/K").deleted is not None  # deleted, as before the destroy
    forced_refused.calls = 0  # type: ignore[attr-defined]

    def soft_refused(**kwargs: Any) -> Any:
        if kwargs.get("ForceDeleteWithoutRecovery"):
            return forced_refused(**kwargs)
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "DeleteSecret")

    monkeypatch.setattr(client, "delete_secret", soft_refused)
    with pytest.raises(AccessDeniedError) as caught:
        store.destroy_secret("svc/K")
    message = str(caught.value)
    assert "'svc/K' was not destroyed and is no longer deleted" in message, message
    assert "'delete svc/K'" in message, message
    assert store.describe("svc/K").deleted is None


def test_a_promote_whose_second_call_failed_says_it_was_promoted_and_a_rerun_finishes_it(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """promote is two UpdateSecretVersionStage calls (AWSCURRENT moved, then AWSPENDING removed).
    The second refused, the error said only "AWS denied promote version 2 of svc/K", though
    version 2 was current and the old one previous: a rotation retried on that took the promote
    for undone. Now the error says it was promoted and still carries pending, and a promote run
    again finishes it: AWSCURRENT is not moved again, only AWSPENDING removed."""
    from botocore.exceptions import ClientError

    store = make_aws()
    store.put("svc/K", b"one")
    staged = store.stage("svc/K", b"two")
    client = store._client
    move = client.update_secret_version_stage

    def pending_kept(**kwargs: Any) -> Any:
        if kwargs["VersionStage"] == "AWSPENDING":
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "X")
        return move(**kwargs)

    monkeypatch.setattr(client, "update_secret_version_stage", pending_kept)
    with pytest.raises(AccessDeniedError) as caught:
        store.promote("svc/K", staged.version)
    message = str(caught.value)
    assert message.startswith("version 2 of 'svc/K' was promoted (current, 1 previous)"), message
    assert "still labelled 'pending'" in message and "promote it again" in message, message
    monkeypatch.undo()
    calls: list[dict[str, Any]] = []

    def counted(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return move(**kwargs)

    monkeypatch.setattr(client, "update_secret_version_stage", counted)
    assert store.promote("svc/K", staged.version) == 1
    assert [c["VersionStage"] for c in calls] == ["AWSPENDING"]
    meta = store.describe("svc/K")
    assert meta.labels == {"current": 2, "previous": 1}
    assert store.get("svc/K").value.reveal() == b"two"


def _discard_between_the_two_calls_of_a_promote(
    store: AwsStore, other: AwsStore, monkeypatch: pytest.MonkeyPatch
) -> list[object]:
    """What `other`'s discard of svc/K's pending version gives (or the ConflictError it raises),
    run when `store`'s promote has moved AWSCURRENT and not yet removed AWSPENDING."""
    move = store._client.update_secret_version_stage
    discarded: list[object] = []

    def discard_after_the_first_call(**kwargs: Any) -> Any:
        answer = move(**kwargs)
        if kwargs["VersionStage"] == "AWSCURRENT":  # moved; AWSPENDING not yet removed
            try:
                discarded.append(other.discard_pending("svc/K"))
            except ConflictError as exc:
                discarded.append(exc)
        return answer

    monkeypatch.setattr(store._client, "update_secret_version_stage", discard_after_the_first_call)
    return discarded


def test_a_discard_between_the_two_calls_of_a_promote_discards_nothing_and_the_promote_stands(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """promote moves AWSCURRENT to the pending version, then removes AWSPENDING from it. A
    `rotate --discard` by another process in between found AWSPENDING (on the version now
    current), removed it and said "discarded the pending version 2; current is unchanged", while
    version 2 was current; the promote's second call was then refused, and it said the version was
    promoted but "still labelled 'pending'" (it was not). The discard now refuses a pending label
    on the current version (nothing to discard: a promote is finishing), and the promote ends."""
    store, other = make_aws(), make_aws()
    store.put("svc/K", b"one")
    staged = store.stage("svc/K", b"two")
    discarded = _discard_between_the_two_calls_of_a_promote(store, other, monkeypatch)
    assert store.promote("svc/K", staged.version) == 1
    [refusal] = discarded
    assert isinstance(refusal, ConflictError), refusal
    assert "version 2 of 'svc/K' is current" in str(refusal) and "nothing was discarded" in str(refusal)
    assert store.describe("svc/K").labels == {"current": 2, "previous": 1}
    assert store.get("svc/K").value.reveal() == b"two"


def test_a_discard_whose_read_came_before_a_promote_and_its_removal_after_says_it_was_promoted(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The discard reads version 2 pending (not current); the promote moves AWSCURRENT to it; the
    discard removes AWSPENDING (the promote's second call's work). The discard said "discarded
    the pending version 2" and the promote failed at its second call saying the version was still
    labelled pending. Now the discard reads the labels back and says version 2 is current,
    nothing discarded, and the promote, finding its label gone and the version current, stands."""
    store, other = make_aws(), make_aws()
    store.put("svc/K", b"one")
    staged = store.stage("svc/K", b"two")
    reads = iter([other._versions("svc/K")])  # the discard's read, before the promote's first call
    versions = other._versions
    monkeypatch.setattr(other, "_versions", lambda name: next(reads, None) or versions(name))
    discarded = _discard_between_the_two_calls_of_a_promote(store, other, monkeypatch)
    assert store.promote("svc/K", staged.version) == 1
    [refusal] = discarded
    assert isinstance(refusal, ConflictError), refusal
    assert "version 2 of 'svc/K' is current" in str(refusal) and "nothing was discarded" in str(refusal)
    assert store.describe("svc/K").labels == {"current": 2, "previous": 1}


def test_a_metadata_change_whose_later_call_was_refused_says_what_was_changed(
    make_aws: MakeAws,
) -> None:
    """metadata --description --tag is UpdateSecret, then TagResource: the second refused, the
    error said only "AWS denied store the metadata of svc/K", though the description was changed.
    Now it says which part was made, and the same command run again makes the rest."""
    store = make_aws()
    store.put("svc/K", b"v", description="old", tags={"team": "desk"})
    denied = _Denied(store._client, "TagResource")
    with pytest.raises(AccessDeniedError) as caught:
        store.update_metadata("svc/K", description="new", set_tags={"team": "ops"})
    message = str(caught.value)
    assert denied.sent == 1
    assert message.startswith("the description of 'svc/K' was changed, but not the tags set"), message
    assert "secretsmanager:TagResource" in message and "run the same change again" in message, message
    store._client.meta.events.unregister("before-send.secrets-manager.TagResource", denied)
    store.update_metadata("svc/K", description="new", set_tags={"team": "ops"})
    meta = store.describe("svc/K")
    assert (meta.description, dict(meta.tags)) == ("new", {"team": "ops"})


def test_a_throttled_call_is_retried_more_than_one_that_got_no_answer(make_aws: MakeAws) -> None:
    """A call AWS throttles (ListSecrets' 100 a second, PutSecretValue's 50, shared by the whole
    account: a Watch poll of 10k secrets, replicas starting together) was sent twice in all, the
    bound meant for an endpoint that does not answer, so a burst of three throttles failed the
    command or the served call. Throttling now gets five attempts, with backoff."""
    store = make_aws()
    store.put("svc/A", b"a")
    throttled = _Throttled(store._client, "ListSecrets", 3)
    started = time.monotonic()
    assert [m.name for m in store.list()] == ["svc/A"]
    assert throttled.sent == 3 and time.monotonic() - started < 8
    throttled = _Throttled(store._client, "PutSecretValue", 100)
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        store.put("svc/A", b"b")
    assert throttled.sent == 5 and time.monotonic() - started < 10
    assert str(caught.value).startswith("AWS kept throttling") and "\n" not in str(caught.value)
    assert store.get("svc/A").value.reveal() == b"a"


def test_throttling_after_retries_is_a_storage_error(make_aws: MakeAws) -> None:
    from botocore.exceptions import ClientError

    store = make_aws()
    error = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}
    with pytest.raises(StorageError, match="throttling"), store._aws("read svc/X", "svc/X"):
        raise ClientError(error, "GetSecretValue")


def test_a_quota_and_an_invalid_parameter_keep_what_aws_said(make_aws: MakeAws) -> None:
    """LimitExceededException is a quota, not throttling; AWS's reason for refusing a parameter
    (e.g. a KMS key it cannot use) is part of the one line."""
    from botocore.exceptions import ClientError

    store = make_aws()
    quota = {"Error": {"Code": "LimitExceededException", "Message": "too many versions"}}
    with (
        pytest.raises(StorageError, match=r"quota is reached.*too many versions") as caught,
        store._aws("store svc/X", "svc/X"),
    ):
        raise ClientError(quota, "PutSecretValue")
    assert "throttling" not in str(caught.value)
    invalid = {"Error": {"Code": "InvalidParameterException", "Message": "Invalid KmsKeyId alias/nope"}}
    with pytest.raises(InvalidInputError, match="alias/nope"), store._aws("store svc/X", "svc/X"):
        raise ClientError(invalid, "CreateSecret")


def test_an_invalid_request_on_create_is_reported_at_once_not_retried_as_a_race(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.secretsmanager.exceptions import InvalidRequestException
    from moto.secretsmanager.models import SecretsManagerBackend

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestException("The KMS key is disabled.")

    monkeypatch.setattr(SecretsManagerBackend, "create_secret", refused)
    started = time.monotonic()
    with pytest.raises(ConflictError, match="KMS key is disabled"):
        make_aws().put("svc/NEW", b"v")
    assert time.monotonic() - started < 5


# ---- audit key and anchors ---------------------------------------------------------------------


def test_the_audit_key_is_made_once_and_shared(make_aws: MakeAws, native: Any, prefix: str) -> None:
    first, second = make_aws(), make_aws()
    key = first.audit_key()
    assert len(key) == 32 and second.audit_key() == key
    assert native.get_secret_value(SecretId=f"{prefix}/.secrets-manager/audit-key")["SecretBinary"] == key
    assert first.list(include_deleted=True) == []


@pytest.mark.parametrize(
    "description",
    ['{"hash":"00","seq":Infinity}', '{"hash":"00","seq":1e400}', "[" * 1000 + "]" * 1000],
    ids=["infinity", "out-of-range", "nested"],
)
def test_an_audit_anchor_description_edited_to_what_json_cannot_hold_is_damage(
    make_aws: MakeAws, native: Any, prefix: str, description: str
) -> None:
    """Whoever may write the account can edit the anchor (a secret's Description). Infinity and
    1e400 made int() raise OverflowError, deep nesting RecursionError: an 'internal error' on the
    old code. Now the anchor is damaged (IntegrityError), as any other malformed one."""
    laptop = make_aws(audit_scope="laptop")
    laptop.set_audit_anchor(Anchor(seq=1, hash=f"{1:064x}"))
    native.update_secret(SecretId=f"{prefix}/.secrets-manager/audit-anchor/laptop", Description=description)
    with pytest.raises(IntegrityError, match="the audit anchor in AWS is damaged"):
        laptop.audit_anchor()


def test_each_audit_log_has_its_own_anchor_and_moving_it_makes_no_versions(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    laptop, server = make_aws(audit_scope="laptop"), make_aws(audit_scope="server")
    assert laptop.audit_anchor() is None
    for seq in range(1, 4):
        laptop.set_audit_anchor(Anchor(seq=seq, hash=f"{seq:064x}"))
    assert laptop.audit_anchor() == Anchor(seq=3, hash=f"{3:064x}")
    assert server.audit_anchor() is None
    versions = native.list_secret_version_ids(SecretId=f"{prefix}/.secrets-manager/audit-anchor/laptop")
    assert len(versions["Versions"]) == 1


# ---- opening by URL --------------------------------------------------------------------------------


def test_the_url_names_region_prefix_kms_keys_and_recovery_window() -> None:
    location = external_location(
        "aws-secretsmanager://eu-west-1/trading/prod?kms.auth=alias/auth&kms=alias/all&recovery_window_days=7"
    )
    assert location == AwsLocation(
        region="eu-west-1",
        prefix="trading/prod",
        kms_keys={"auth": "alias/auth"},
        default_kms_key="alias/all",
        recovery_window_days=7,
    )


@pytest.mark.parametrize(
    "url",
    [
        "aws-secretsmanager://not a region/x",
        "aws-secretsmanager://us-east-1/bad prefix",
        "aws-secretsmanager://us-east-1/x?recovery_window_days=3",
        "aws-secretsmanager://us-east-1/x?colour=blue",
    ],
)
def test_bad_aws_urls_are_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInputError):
        external_location(url)


def test_the_url_opens_a_store_with_boto3s_standard_configuration(
    moto_endpoint: str, prefix: str, native: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for variable, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(variable, value)
    store = open_external_store(
        f"aws-secretsmanager://{REGION}/{prefix}", environment=Environment.DEVELOPMENT, actor="url-user"
    )
    store.put("svc/URL", b"via-url")
    assert native.get_secret_value(SecretId=f"{prefix}/svc/URL")["SecretString"] == "via-url"
    store.close()


def test_our_versions_keep_their_numbers_within_one_second_whatever_their_labels() -> None:
    """AWS dates versions to the second: a version staged and then replaced in the same second has
    no label left, yet keeps its number (sorting ours by label would renumber them)."""
    from datetime import UTC, datetime, timedelta

    from secrets_manager.store.aws import _numbered, _version_id

    second = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    raw = [
        {"VersionId": _version_id(4), "CreatedDate": second, "VersionStages": ["AWSPENDING"]},
        {"VersionId": _version_id(3), "CreatedDate": second, "VersionStages": []},
        {"VersionId": _version_id(2), "CreatedDate": second, "VersionStages": ["AWSCURRENT"]},
        {"VersionId": _version_id(1), "CreatedDate": second - timedelta(seconds=5), "VersionStages": []},
    ]
    assert [(v.number, v.version_id) for v in _numbered(raw)] == [(n, _version_id(n)) for n in (1, 2, 3, 4)]


# ---- an endpoint that accepts connections and never answers ----------------------------------------


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Callable[[str], None]:
    def point_at(endpoint: str) -> None:
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(key, value)

    return point_at


def test_an_endpoint_that_never_answers_is_reported_after_a_bounded_wait(
    aws_environment: Callable[[str], None], prefix: str
) -> None:
    """boto3's 30 s read timeout on each of 5 attempts made 'get' on a stopped endpoint take 91 s
    (186 s with the failure's audit record). Now a call waits two attempts of 5 s at most, the
    message names the endpoint, and the next call (the failure's audit record) fails at once."""
    silent = SilentServer()
    accepted, endpoint = silent.accepted, silent.url
    aws_environment(endpoint)
    try:
        config = connect_aws(REGION).meta.config
        assert (config.read_timeout, config.retries["total_max_attempts"]) == (5, 2)
        store = AwsStore(connect_aws(REGION, read_timeout=0.5), prefix)
        started = time.monotonic()
        with pytest.raises(NoAnswerError) as caught:
            store.get("app/K")
        assert time.monotonic() - started < 4
        assert str(caught.value).startswith(f"AWS Secrets Manager at {endpoint} did not answer within 0.5 s")
        assert len(accepted) == 2
        started = time.monotonic()
        with pytest.raises(NoAnswerError):
            store.audit_key()
        assert time.monotonic() - started < 0.2 and len(accepted) == 2
    finally:
        silent.close()


class CreateSwallowingProxy(TcpProxy):
    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if from_client and b"secretsmanager.CreateSecret" in data:
            return Verdict.SWALLOW
        return Verdict.PASS


def test_a_change_whose_answer_never_came_has_an_unknown_outcome(
    aws_environment: Callable[[str], None], moto_endpoint: str, prefix: str
) -> None:
    host, port = moto_endpoint.split("://")[1].rsplit(":", 1)
    proxy = CreateSwallowingProxy(host, int(port))
    try:
        aws_environment(f"http://{proxy.address}")
        store = AwsStore(connect_aws(REGION, read_timeout=0.5), prefix)
        with pytest.raises(OutcomeUnknownError, match=r"did not answer within 0.5 s.*may or may not"):
            store.put("app/K", b"v1")
    finally:
        proxy.close()


def test_a_conditional_delete_whose_check_after_is_lost_says_the_secret_is_deleted(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteSecret went through, then the DescribeSecret that checks no newer version overtook it
    failed (the network, a throttle): that was said as a failed delete ('AWS failed delete …'), and
    a script retried into 'already deleted'. The secret is deleted; only the check is unknown."""
    from botocore.exceptions import ClientError

    from secrets_manager.errors import OutcomeUnknownError

    store = make_aws()
    store.put("svc/OLD", b"KNOWN-1")
    client = store._client
    describe_secret = client.delete_secret, client.describe_secret
    deleted: list[bool] = []

    def delete_secret(**kwargs: Any) -> Any:
        deleted.append(True)
        return describe_secret[0](**kwargs)

    def describe(**kwargs: Any) -> Any:
        if deleted:
            raise ClientError(
                {"Error": {"Code": "InternalServiceError", "Message": "oops"}}, "DescribeSecret"
            )
        return describe_secret[1](**kwargs)

    monkeypatch.setattr(client, "delete_secret", delete_secret)
    monkeypatch.setattr(client, "describe_secret", describe)
    with pytest.raises(OutcomeUnknownError) as caught:
        store.delete("svc/OLD", expect_version=1)
    message = str(caught.value)
    assert "svc/OLD' was deleted, but whether a newer version overtook the delete is unknown" in message
    assert "'undelete svc/OLD'" in message, message
    monkeypatch.undo()
    assert store.describe("svc/OLD").deleted is not None


def test_mv_whose_delete_check_is_lost_says_old_is_deleted_and_new_not_written(
    make_aws: MakeAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mv said such a delete as 'svc/OLD may or may not have been deleted …; delete it with
    'delete svc/OLD' to finish the move', though OLD read as deleted. Now NEW is not written
    (it comes after the delete, and whether a newer version was hidden is unknown)."""
    from botocore.exceptions import ClientError

    from secrets_manager.cli.move_commands import copy_secret
    from secrets_manager.cli.session import Note
    from secrets_manager.errors import OutcomeUnknownError

    store = make_aws()
    store.put("svc/OLD", b"KNOWN-1")
    client = store._client
    real = client.delete_secret, client.describe_secret
    deleted: list[bool] = []

    def delete_secret(**kwargs: Any) -> Any:
        deleted.append(True)
        return real[0](**kwargs)

    def describe(**kwargs: Any) -> Any:
        if len(deleted) == 1:  # the check right after the delete; later reads answer
            deleted.append(True)
            raise ClientError(
                {"Error": {"Code": "InternalServiceError", "Message": "oops"}}, "DescribeSecret"
            )
        return real[1](**kwargs)

    monkeypatch.setattr(client, "delete_secret", delete_secret)
    monkeypatch.setattr(client, "describe_secret", describe)
    with pytest.raises(OutcomeUnknownError) as caught:
        copy_secret(store, Note(), "svc/OLD", "svc/NEW", force=False, remove=True)
    message = str(caught.value)
    assert "svc/OLD' was deleted" in message and "may or may not" not in message, message
    assert "svc/NEW was not written" in message and "'undelete svc/OLD'" in message, message
    with pytest.raises(NotFoundError):
        store.get("svc/NEW")


def test_a_stage_with_a_target_is_tagged_and_refused_before_it_writes_when_the_tags_are_full(
    make_aws: MakeAws, native: Any
) -> None:
    """A rotation's target is our tag `secrets-manager:pending-target` (N@ and base64), which
    `aws secretsmanager` sees; a secret whose 50 tags leave no room for it refuses the stage before
    PutSecretValue (nothing pending), rather than staging a version without the target."""
    store = make_aws()
    store.put("svc/ROT", b"v1")
    store.stage("svc/ROT", b"v2", target="postgres-role:app")
    aws_name = store.aws_name("svc/ROT")
    tags = {t["Key"]: t["Value"] for t in native.describe_secret(SecretId=aws_name)["Tags"]}
    assert tags["secrets-manager:pending-target"] == "2@cG9zdGdyZXMtcm9sZTphcHA="
    assert store.get("svc/ROT", label="pending").target == "postgres-role:app"
    store.discard_pending("svc/ROT")
    store.put("svc/FULL", b"v1", tags={f"k{i}": "v" for i in range(49)})  # 49 and ours: 50
    with pytest.raises(UnsupportedOperationError, match="nothing was staged"):
        store.stage("svc/FULL", b"v2", target="postgres-role:app")
    assert "pending" not in store.describe("svc/FULL").labels
    assert [v.version for v in store.describe("svc/FULL").versions] == [1]
    staged = store.stage("svc/FULL", b"v2")  # without a target, nothing to tag
    assert store.get("svc/FULL", label="pending").version == staged.version


@pytest.mark.parametrize("connect", ["secretsmanager", "kms"])
def test_a_missing_aws_profile_is_the_same_one_line_for_the_store_and_kms(
    connect: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """KMS (a store unlocked by AWS KMS, init --kms-key) said 'cannot configure AWS KMS
    (ProfileNotFound): give the key as an ARN or set AWS_DEFAULT_REGION', which does not help."""
    from secrets_manager.errors import MissingCredentialsError
    from secrets_manager.store.kms import connect_kms

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "trading-prod")
    with pytest.raises(MissingCredentialsError, match=r"no AWS profile 'trading-prod'.*AWS_PROFILE names"):
        connect_aws("eu-west-1") if connect == "secretsmanager" else connect_kms("eu-west-1")


def test_a_secret_created_elsewhere_without_a_value_is_said_to_have_none(
    make_aws: MakeAws, native: Any, prefix: str
) -> None:
    """Terraform's aws_secretsmanager_secret without an aws_secretsmanager_secret_version (or the
    console's, or CreateSecret with no value) makes a secret with no version under our prefix:
    `list` showed it, and `get` said 'secret ... not found'. It now says it has no value yet and how
    to give it one; `store` does (version 1)."""
    native.create_secret(Name=f"{prefix}/app/FROM_TERRAFORM")
    store = make_aws()
    assert [m.name for m in store.list()] == ["app/FROM_TERRAFORM"]
    with pytest.raises(
        NotFoundError, match=r"'app/FROM_TERRAFORM' has no value yet: .*'store app/FROM_TERRAFORM'"
    ):
        store.get("app/FROM_TERRAFORM")
    with pytest.raises(NotFoundError, match=r"^secret 'app/MISSING' not found$"):
        store.get("app/MISSING")
    assert store.put("app/FROM_TERRAFORM", b"first").version == 1
    assert store.get("app/FROM_TERRAFORM").value.reveal() == b"first"


def test_max_versions_set_to_the_default_a_secret_has_is_nothing_to_change(
    make_aws: MakeAws, encrypted_store: EncryptedStore
) -> None:
    """A secret without our max-versions tag has the store's default (10, as describe shows): the
    encrypted store refused `metadata --max-versions 10` on it as nothing to change (exit 2), AWS
    wrote the tag (exit 0). Found by tests/test_store_differential.py, seed 41."""
    for store in (make_aws(), encrypted_store):
        store.put("svc/K", b"v1")
        assert store.describe("svc/K").max_versions == 10
        with pytest.raises(NothingToChangeError):
            store.update_metadata("svc/K", max_versions=10)


def test_a_name_longer_than_aws_takes_under_the_prefix_is_refused_before_anything_is_written(
    make_aws: MakeAws, native: Any
) -> None:
    """AWS takes secret names of at most 512 characters, the prefix and '/' included; ours are up to
    256 under a prefix of up to 256, so PREFIX/NAME could be 513. moto takes it (AWS would refuse
    the CreateSecret): the store refused nothing. Refused now in one line (exit 2, not supported
    by this store) before anything is written, by put and by restore's check; 512 still works."""
    # A prefix of its own: the moto server is shared, and the differential test's size edges use
    # "ppp…" too (run on one worker, the second test's put found the first's secret: version 2)
    prefix = (secrets.token_hex(8) + "p" * MAX_NAME_LENGTH)[:MAX_NAME_LENGTH]
    store = make_aws(prefix=prefix)
    fits, over = "n" * (511 - len(prefix)), "n" * (512 - len(prefix))
    assert store.put(fits, b"v").version == 1 and len(store.aws_name(fits)) == 512
    for refused in (
        lambda: store.put(over, b"v"),
        lambda: store.put(over, b"v", description="d", tags={"team": "x"}),
        lambda: check_metadata_fits(store, over, description=None, tags=None, max_versions=None),
    ):
        with pytest.raises(UnsupportedOperationError) as caught:
            refused()
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
        assert "not supported by this store" in str(caught.value) and "leave 255" in str(caught.value)
    listed = native.list_secrets(Filters=[{"Key": "name", "Values": [prefix]}])["SecretList"]
    assert [entry["Name"] for entry in listed] == [store.aws_name(fits)]
    with pytest.raises(NotFoundError):
        store.describe(over)


def test_promote_and_discard_of_a_deleted_secret_say_what_the_encrypted_store_says(
    make_aws: MakeAws, encrypted_store: EncryptedStore
) -> None:
    """`rotate --discard` (and a promote) of a deleted secret: exit 7 on both, but AWS said
    "...first, or 'destroy NAME --all'", the encrypted store "...first" (destroying it would leave
    nothing to promote). Found by the differential test's CLI pass (seed 4274544168, command 24)."""
    answers = []
    for store in (make_aws(), encrypted_store):
        store.put("svc/K", b"v1")
        store.stage("svc/K", b"v2")
        store.delete("svc/K")
        said = []
        for call in (
            lambda store=store: store.discard_pending("svc/K"),
            lambda store=store: store.promote("svc/K", 2),
        ):
            with pytest.raises(SecretStateError) as caught:
                call()
            said.append((caught.value.exit_code, str(caught.value)))
        answers.append(said)
    assert answers[0] == answers[1] == [(7, "secret 'svc/K' is deleted; run 'undelete svc/K' first")] * 2
