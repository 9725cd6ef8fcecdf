"""The conformance suite every `SecretStore` passes: `check_secret_store(make_store)`.

EncryptedStore, VaultStore (tests/test_store_vault.py: a KV v2 test server, or a real Vault) and
AwsStore (tests/test_store_aws.py: moto's server) run the same function, so every entry point sees one
behaviour whichever store is behind it:

    from secrets_manager.store.testing import check_secret_store

    def test_encrypted_store_conforms(make_store):
        check_secret_store(make_store)

`make_store()` returns a store handle (a new one, or the same one again) on a place that may be
shared and may already hold other secrets; the store must use its default settings (in particular
`max_versions` of 10). The suite closes every handle it is given. Each check writes only under its
own namespace `conformance-<run>-<check>/`, with a random run id, so reruns against a persistent
Vault or AWS account do not collide.

Each check is a small function listed by behaviour in `SECRET_STORE_CHECKS`, so a test can run them
one by one and a failure names the behaviour that broke. Failures raise `AssertionError` explicitly
(not `assert`), so the suite also runs under `python -O` and without pytest.

A store that cannot do part of the contract (AWS cannot destroy one version; Vault has no `pending`
label) lists those `Capability` values in its `unsupported_capabilities`. Nothing is skipped for it:
the checks that cover such an operation require instead that it fails cleanly, with an
`UnsupportedOperationError` saying "not supported by this store", and changes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    NothingToChangeError,
    SecretStateError,
    UnsupportedOperationError,
)
from secrets_manager.store.base import (
    CURRENT,
    DEFAULT_MAX_VERSIONS,
    MAX_DESCRIPTION_LENGTH,
    MAX_TAG_KEY_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MAX_TAGS,
    MAX_VALUE_SIZE,
    PENDING,
    PREVIOUS,
    Capability,
    Secret,
    SecretMetadata,
    SecretStore,
    VersionInfo,
    max_versions_hide_at_once,
    unsupported_capabilities,
    utc_text,
)
from secrets_manager.values import SecretValue

MakeStore = Callable[[], SecretStore]
Check = Callable[[MakeStore, str], None]

# A value no implementation would produce by accident; the redaction checks look for it.
MARKER = "s3cr3t-VALUE-must-not-leak-7f3a9c"
UNSUPPORTED_MESSAGE = "not supported by this store"


def check_secret_store(make_store: MakeStore) -> None:
    """Run every check in `SECRET_STORE_CHECKS` against the store `make_store` opens.

    Raises AssertionError naming the first behaviour that does not hold (an unexpected exception
    from the store is wrapped in one, chained).
    """
    run = secrets.token_hex(4)
    for key, check in SECRET_STORE_CHECKS.items():
        try:
            check(make_store, f"conformance-{run}-{key}")
        except AssertionError as exc:
            raise AssertionError(f"secret store conformance check {key!r} failed: {exc}") from exc
        except Exception as exc:
            raise AssertionError(
                f"secret store conformance check {key!r} failed: unexpected {type(exc).__name__}: {exc}"
            ) from exc


def run_check(make_store: MakeStore, key: str) -> None:
    """Run the one check `SECRET_STORE_CHECKS[key]` in a fresh namespace (for per-check tests)."""
    SECRET_STORE_CHECKS[key](make_store, f"conformance-{secrets.token_hex(4)}-{key}")


# ---- helpers -----------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _raises(error: type[Exception], action: Callable[[], object], what: str) -> Exception:
    """Run `action`, require it to raise `error` (or a subclass) and return the exception."""
    try:
        action()
    except error as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: expected {error.__name__}, got {type(exc).__name__}") from exc
    raise AssertionError(f"{what}: expected {error.__name__}, nothing was raised")


@contextmanager
def _opened(make_store: MakeStore) -> Iterator[SecretStore]:
    store = make_store()
    try:
        yield store
    finally:
        store.close()


def _revealed(secret: Secret) -> bytes:
    _require(isinstance(secret.value, SecretValue), f"get returned a {type(secret.value)}, not a SecretValue")
    return secret.value.reveal()


def _version_numbers(meta: SecretMetadata) -> list[int]:
    return [info.version for info in meta.versions]


def _names(listed: list[SecretMetadata]) -> list[str]:
    return [meta.name for meta in listed]


def _leaks(obj: object, value: bytes) -> bool:
    """Whether repr() or str() of `obj` shows `value` in any common spelling."""
    shown = repr(obj) + "\n" + str(obj)
    spellings = {repr(value), value.hex()}
    with suppress(UnicodeDecodeError):
        spellings.add(value.decode("utf-8"))
    return any(spelling and spelling in shown for spelling in spellings)


def _lacks(store: SecretStore, capability: Capability) -> bool:
    return capability in unsupported_capabilities(store)


def _require_unsupported(action: Callable[[], object], what: str) -> None:
    """`action` must fail with UnsupportedOperationError whose message says so plainly."""
    exc = _raises(UnsupportedOperationError, action, f"{what} (declared unsupported)")
    _require(UNSUPPORTED_MESSAGE in str(exc), f"{what}: the error does not say {UNSUPPORTED_MESSAGE!r}")


def _require_no_leak(obj: object, value: bytes, what: str) -> None:
    _require(
        not _leaks(obj, value), f"repr() or str() of {what} ({type(obj).__name__}) shows the secret value"
    )


# ---- the checks --------------------------------------------------------------------------------


def _check_values_round_trip(make_store: MakeStore, ns: str) -> None:
    values = {
        "text": b"correct horse battery staple",
        "binary": bytes(range(256)) + b"\x00\x00\xff",
        "empty": b"",
        "unicode": "pässwörd ✓ 秘密 🔑".encode(),
        "max-size": bytes((i * 7) % 256 for i in range(MAX_VALUE_SIZE)),
    }
    with _opened(make_store) as store:
        if _lacks(store, Capability.EMPTY_VALUE):
            del values["empty"]
            _require_unsupported(lambda: store.put(f"{ns}/empty", b""), "put of an empty value")
            _raises(NotFoundError, lambda: store.describe(f"{ns}/empty"), "a refused put created the secret")
        for key, value in values.items():
            info = store.put(f"{ns}/{key}", value)
            _require(
                isinstance(info, VersionInfo) and info.version == 1, f"first put of {key!r} is not version 1"
            )
        for key, value in values.items():
            secret = store.get(f"{ns}/{key}")
            _require(
                _revealed(secret) == value, f"the {key} value ({len(value)} bytes) changed on the round trip"
            )
            _require(
                secret.name == f"{ns}/{key}" and secret.version == 1, f"get of {key!r} names the wrong secret"
            )
            _require(CURRENT in secret.labels, f"get of {key!r} without a version is not the current one")
            aware = isinstance(secret.created, datetime) and secret.created.tzinfo is not None
            _require(aware, "Secret.created is not a timezone-aware datetime")


def _check_oversize_value_refused(make_store: MakeStore, ns: str) -> None:
    too_big = b"x" * (MAX_VALUE_SIZE + 1)
    with _opened(make_store) as store:
        _raises(InvalidInputError, lambda: store.put(f"{ns}/new", too_big), "put of 64 KiB + 1 bytes")
        _raises(
            NotFoundError, lambda: store.describe(f"{ns}/new"), "a refused put created the secret: describe"
        )
        store.put(f"{ns}/existing", b"small")
        _raises(InvalidInputError, lambda: store.put(f"{ns}/existing", too_big), "put of 64 KiB + 1 bytes")
        _require(_version_numbers(store.describe(f"{ns}/existing")) == [1], "a refused put added a version")
        _require(_revealed(store.get(f"{ns}/existing")) == b"small", "a refused put changed the value")
        not_bytes = cast(Any, "text, not bytes")
        _raises(InvalidInputError, lambda: store.put(f"{ns}/text", not_bytes), "put of a str value")
        _raises(NotFoundError, lambda: store.describe(f"{ns}/text"), "a refused put created the secret")


def _check_versions_and_labels(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/rotating"
    with _opened(make_store) as store:
        infos = [store.put(name, f"value {n}".encode()) for n in (1, 2, 3)]
        _require(
            [i.version for i in infos] == [1, 2, 3], f"versions are {[i.version for i in infos]}, not 1, 2, 3"
        )
        _require(
            infos[2].labels == (CURRENT,), f"the new version's labels are {infos[2].labels}, not (current,)"
        )
        meta = store.describe(name)
        _require(meta.current_version == 3, "current_version is not the newest version")
        _require(dict(meta.labels) == {CURRENT: 3, PREVIOUS: 2}, f"labels are {dict(meta.labels)}")
        by_number = {info.version: info.labels for info in meta.versions}
        _require(
            by_number == {1: (), 2: (PREVIOUS,), 3: (CURRENT,)},
            f"version labels are {by_number}: current and previous did not move",
        )
        _require(_revealed(store.get(name)) == b"value 3", "get does not return the current version")
        _require(store.get(name).labels == (CURRENT,), "get's Secret does not carry the current label")


def _check_get_by_version_and_label(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/s"
    with _opened(make_store) as store:
        for n in (1, 2, 3):
            store.put(name, f"value {n}".encode())
        for n in (1, 2, 3):
            secret = store.get(name, version=n)
            _require(_revealed(secret) == f"value {n}".encode() and secret.version == n, f"get version={n}")
        previous = store.get(name, label=PREVIOUS)
        _require(previous.version == 2 and _revealed(previous) == b"value 2", "get label=previous")
        _require(previous.labels == (PREVIOUS,), "a Secret got by label does not carry that label")
        current = store.get(name, label=CURRENT)
        _require(current.version == 3 and _revealed(current) == b"value 3", "get label=current")
        _require(store.get(name, version=1).labels == (), "an unlabelled version carries labels")
        if _lacks(store, Capability.PENDING_LABEL):
            _require_unsupported(lambda: store.get(name, label=PENDING), "get of the pending label")
        else:
            _raises(
                NotFoundError, lambda: store.get(name, label=PENDING), "get of a label no version carries"
            )
        _raises(NotFoundError, lambda: store.get(name, version=4), "get of a version never written")
        _raises(NotFoundError, lambda: store.get(name, version=0), "get of version 0")
        _raises(NotFoundError, lambda: store.get(f"{ns}/missing"), "get of a missing secret")
        _raises(InvalidInputError, lambda: store.get(name, label="latest"), "get of an unknown label")
        _raises(
            InvalidInputError, lambda: store.get(name, version=1, label=CURRENT), "get by version and label"
        )


def _check_expect_version(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/cas"
    with _opened(make_store) as store:
        _raises(
            ConflictError,
            lambda: store.put(name, b"x", expect_version=1),
            "expect_version=1 of a missing secret",
        )
        _raises(NotFoundError, lambda: store.describe(name), "a refused put created the secret")
        created = store.put(name, b"v1", expect_version=0)
        _require(created.version == 1, "expect_version=0 did not create version 1")
        _raises(
            ConflictError,
            lambda: store.put(name, b"again", expect_version=0),
            "expect_version=0 of an existing secret",
        )
        _raises(
            ConflictError,
            lambda: store.put(name, b"stale", expect_version=2),
            "expect_version ahead of current",
        )
        _require(_version_numbers(store.describe(name)) == [1], "a refused put added a version")
        _require(_revealed(store.get(name)) == b"v1", "a refused put changed the current value")
        second = store.put(name, b"v2", expect_version=1)
        _require(second.version == 2, "expect_version equal to the current version was refused")
        _raises(
            ConflictError,
            lambda: store.put(name, b"lost", expect_version=1),
            "expect_version of a stale version",
        )
        _require(_version_numbers(store.describe(name)) == [1, 2], "a refused put added a version")
        _require(_revealed(store.get(name)) == b"v2", "a refused put changed the current value")


def _check_delete_expect_version(make_store: MakeStore, ns: str) -> None:
    """A delete on condition that a version is still current (what `mv` does after its copy):
    refused as a conflict, nothing deleted, once another version is current."""
    name = f"{ns}/cas"
    with _opened(make_store) as store:
        _raises(
            NotFoundError, lambda: store.delete(name, expect_version=1), "a conditional delete of nothing"
        )
        store.put(name, b"v1")
        store.put(name, b"v2")
        for stale in (1, 3):
            _raises(
                ConflictError,
                partial(store.delete, name, expect_version=stale),
                f"delete with expect_version={stale} while version 2 is current",
            )
            meta = store.describe(name)
            _require(meta.deleted is None, "a refused conditional delete deleted the secret")
            _require(meta.labels.get(PREVIOUS) == 1, "a refused conditional delete left previous unreadable")
            _require(_revealed(store.get(name, version=1)) == b"v1", "a refused delete hid version 1")
            _require(_revealed(store.get(name)) == b"v2", "a refused conditional delete hid the value")
        _raises(
            InvalidInputError, lambda: store.delete(name, expect_version=0), "expect_version=0 of a delete"
        )
        store.delete(name, expect_version=2)
        _require(store.describe(name).deleted is not None, "a delete at the current version was not made")
        _raises(NotFoundError, lambda: store.get(name), "a conditionally deleted secret was still read")
        _raises(
            NotFoundError,
            lambda: store.delete(name, expect_version=2),
            "a conditional delete of a deleted one",
        )


def _check_delete_expect_no_pending(make_store: MakeStore, ns: str) -> None:
    """A delete on condition that no rotation is in progress (what `mv` asks with its version):
    refused as a conflict, nothing deleted, while a version other than current is pending; made
    once the rotation is discarded. On a store without the pending label it always holds."""
    name = f"{ns}/rotating"
    with _opened(make_store) as store:
        store.put(name, b"v1")
        if not _lacks(store, Capability.PENDING_LABEL):
            store.stage(name, b"v2")
            for expect in (None, 1):
                _raises(
                    ConflictError,
                    partial(store.delete, name, expect_version=expect, expect_no_pending=True),
                    f"delete with expect_no_pending (expect_version={expect}) while version 2 is pending",
                )
                meta = store.describe(name)
                _require(meta.deleted is None, "a refused conditional delete deleted the secret")
                _require(meta.labels.get(PENDING) == 2, "a refused conditional delete moved pending")
                _require(_revealed(store.get(name, label=PENDING)) == b"v2", "a refused delete hid pending")
            store.discard_pending(name)
        store.delete(name, expect_version=1, expect_no_pending=True)
        _require(store.describe(name).deleted is not None, "a delete with no rotation pending was not made")


def _check_list_by_prefix(make_store: MakeStore, ns: str) -> None:
    value = MARKER.encode()
    names = [f"{ns}/b/one", f"{ns}/a", f"{ns}/b/two", f"{ns}/ab", f"{ns}/B"]
    with _opened(make_store) as store:
        for name in names:
            store.put(name, value)
        store.put(f"{ns}-other/a", value)  # shares the prefix text but not the namespace
        listed = store.list(f"{ns}/")
        _require(_names(listed) == sorted(names), f"list({ns + '/'!r}) gave {_names(listed)}")
        _require(all(isinstance(m, SecretMetadata) for m in listed), "list does not return SecretMetadata")
        _require(_names(store.list(f"{ns}/b/")) == [f"{ns}/b/one", f"{ns}/b/two"], "list of a sub-path")
        _require(_names(store.list(f"{ns}/a")) == [f"{ns}/a", f"{ns}/ab"], "list of a mid-segment prefix")
        _require(_names(store.list(f"{ns}/zzz")) == [], "list of a prefix with no secrets is not empty")
        every = _names(store.list())
        _require(set(names) | {f"{ns}-other/a"} <= set(every), "list() does not include every secret")
        _require(every == sorted(every), "list() is not sorted by name")
        for meta in listed:
            _require_no_leak(meta, value, "a listed secret")
            _require(meta.current_version == 1, f"list reports version {meta.current_version} of {meta.name}")
        _raises(InvalidInputError, lambda: store.list("bad prefix!"), "list of an invalid prefix")


def _check_names_differing_in_case_are_different_secrets(make_store: MakeStore, ns: str) -> None:
    """The access policy matches names case and all (`auth/*` does not grant `AUTH/KEY`): a store
    that folded case would hand `AUTH/KEY`'s caller the secret `auth/KEY`, which the policy
    decided for another name. Every store keeps them apart, as SQLite's and PostgreSQL's byte
    order, Vault's paths and AWS's names do."""
    spellings = [f"{ns}/KEY", f"{ns}/key", f"{ns}/Key"]
    with _opened(make_store) as store:
        for index, name in enumerate(spellings):
            store.put(name, f"{MARKER}-{index}".encode())
        for index, name in enumerate(spellings):
            got = _revealed(store.get(name))
            _require(got == f"{MARKER}-{index}".encode(), f"get({name!r}) gave another spelling's value")
            _require(store.describe(name).current_version == 1, f"{name!r} shares versions with another")
        _require(_names(store.list(f"{ns}/")) == sorted(spellings), f"list of {ns}/ merged spellings")
        _require(_names(store.list(f"{ns}/k")) == [f"{ns}/key"], "a list prefix matched another case")
        store.delete(f"{ns}/key")
        _require(
            _names(store.list(f"{ns}/")) == sorted(set(spellings) - {f"{ns}/key"}), "a delete took others"
        )
        _raises(NotFoundError, lambda: store.get(f"{ns}/key"), "get of the deleted spelling")


def _check_describe_and_history(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/described"
    with _opened(make_store) as store:
        store.put(name, b"v1", description="the exchange key", tags={"team": "trading", "env": "dev"})
        store.put(name, b"v2")
        store.put(name, b"v3", tags={"team": "ops"})
        meta = store.describe(name)
        _require(
            meta.name == name and meta.namespace == ns, f"describe names {meta.name!r} in {meta.namespace!r}"
        )
        _require(meta.description == "the exchange key", "a put without description dropped the description")
        _require(dict(meta.tags) == {"team": "ops"}, f"tags are {dict(meta.tags)}, not the last ones given")
        _require(_version_numbers(meta) == [1, 2, 3], f"history is {_version_numbers(meta)}, not [1, 2, 3]")
        _require(meta.current_version == 3 and meta.deleted is None, "describe of a live secret")
        _require(
            meta.max_versions == DEFAULT_MAX_VERSIONS, f"max_versions is {meta.max_versions}, not the default"
        )
        _require(meta.created <= meta.updated, "created is after updated")
        created = [info.created for info in meta.versions]
        _require(created == sorted(created), "version creation times go backwards")
        _require(all(not info.destroyed for info in meta.versions), "a live version is marked destroyed")
        _require(isinstance(meta.created_by, str), "created_by is not a string")
        history = getattr(store, "history", None)
        if history is not None:  # optional convenience beyond the protocol
            _require(list(history(name)) == list(meta.versions), "history() differs from describe().versions")
        _raises(NotFoundError, lambda: store.describe(f"{ns}/missing"), "describe of a missing secret")
        default = f"{ns}-in-default"  # a name without '/' lives in the 'default' namespace
        store.put(default, b"x")
        try:
            _require(store.describe(default).namespace == "default", "a name without '/' is not in 'default'")
        finally:
            store.destroy_secret(default)


def _check_delete_and_undelete(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/soft"
    with _opened(make_store) as store:
        store.put(name, b"v1")
        store.put(name, b"v2")
        store.delete(name)
        _raises(NotFoundError, lambda: store.get(name), "get of a deleted secret")
        _raises(NotFoundError, lambda: store.get(name, version=1), "get by version of a deleted secret")
        _require(name not in _names(store.list(f"{ns}/")), "a deleted secret is listed")
        deleted = [m for m in store.list(f"{ns}/", include_deleted=True) if m.name == name]
        _require(len(deleted) == 1 and deleted[0].deleted is not None, "list(include_deleted=True) misses it")
        _require(store.describe(name).deleted is not None, "describe of a deleted secret does not say so")
        # Deleted is a state, not a lost compare-and-set (which a caller would retry): every store
        # raises the same class for it, which the service sends as FAILED_PRECONDITION, not ABORTED.
        _raises(SecretStateError, lambda: store.put(name, b"v3"), "put to a deleted secret")
        _raises(
            SecretStateError,
            lambda: store.put(name, b"v3", expect_version=0),
            "create-only put to a deleted secret",
        )
        _require(_version_numbers(store.describe(name)) == [1, 2], "a refused put to a deleted secret wrote")
        _raises(NotFoundError, lambda: store.delete(name), "delete of an already deleted secret")
        store.undelete(name)
        _require(_revealed(store.get(name)) == b"v2", "undelete did not restore the current value")
        _require(_revealed(store.get(name, version=1)) == b"v1", "undelete did not restore older versions")
        _require(name in _names(store.list(f"{ns}/")), "an undeleted secret is not listed")
        _require(store.describe(name).deleted is None, "describe still says deleted after undelete")
        _raises(SecretStateError, lambda: store.undelete(name), "undelete of a live secret")
        _raises(NotFoundError, lambda: store.delete(f"{ns}/missing"), "delete of a missing secret")
        _raises(NotFoundError, lambda: store.undelete(f"{ns}/missing"), "undelete of a missing secret")
        _require(store.put(name, b"v3").version == 3, "put after undelete does not continue the versions")


def _check_destroy_versions(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/destroy"
    with _opened(make_store) as store:
        for n in (1, 2, 3):
            store.put(name, f"value {n}".encode())
        if _lacks(store, Capability.DESTROY_VERSION):
            _require_unsupported(lambda: store.destroy(name, [1]), "destroy of one version")
            _require_unsupported(lambda: store.destroy(name, [1, 2, 3]), "destroy of every version")
            for n in (1, 2, 3):
                _require(
                    _revealed(store.get(name, version=n)) == f"value {n}".encode(),
                    f"a refused destroy changed version {n}",
                )
            marked = [info.version for info in store.describe(name).versions if info.destroyed]
            _require(not marked, f"a refused destroy marked versions {marked} destroyed")
            return
        store.destroy(name, [1])
        _raises(NotFoundError, lambda: store.get(name, version=1), "get of a destroyed version")
        _require(_revealed(store.get(name, version=2)) == b"value 2", "destroying v1 broke v2")
        _require(_revealed(store.get(name)) == b"value 3", "destroying v1 broke the current version")
        flags = {info.version: info.destroyed for info in store.describe(name).versions}
        _require(flags == {1: True, 2: False, 3: False}, f"describe's destroyed flags are {flags}")
        store.destroy(name, [3])
        _raises(NotFoundError, lambda: store.get(name), "get of a destroyed current version")
        _require(
            _revealed(store.get(name, label=PREVIOUS)) == b"value 2", "previous unreadable after destroy"
        )
        _raises(NotFoundError, lambda: store.destroy(name, [9]), "destroy of a version never written")
        _raises(InvalidInputError, lambda: store.destroy(name, []), "destroy of no versions")
        _raises(NotFoundError, lambda: store.destroy(f"{ns}/missing", [1]), "destroy on a missing secret")
        _require(_revealed(store.get(name, version=2)) == b"value 2", "a refused destroy erased a version")


def _check_destroy_secret(make_store: MakeStore, ns: str) -> None:
    name, other = f"{ns}/doomed", f"{ns}/survivor"
    with _opened(make_store) as store:
        store.put(name, b"v1")
        store.put(name, b"v2")
        store.put(other, b"kept")
        store.destroy_secret(name)
        _raises(NotFoundError, lambda: store.get(name), "get after destroy_secret")
        _raises(NotFoundError, lambda: store.get(name, version=1), "get of a version after destroy_secret")
        _raises(NotFoundError, lambda: store.describe(name), "describe after destroy_secret")
        _require(name not in _names(store.list(f"{ns}/", include_deleted=True)), "destroyed secret listed")
        _require(_revealed(store.get(other)) == b"kept", "destroy_secret touched another secret")
        _raises(NotFoundError, lambda: store.destroy_secret(name), "destroy_secret of a missing secret")
        _require(store.put(name, b"reborn").version == 1, "a re-created secret does not start at version 1")
        store.delete(name)
        store.destroy_secret(name)  # a soft-deleted secret can be destroyed for good
        _raises(NotFoundError, lambda: store.describe(name), "describe after destroying a deleted secret")


def _check_purge_deleted(make_store: MakeStore, ns: str) -> None:
    """destroy_secret(deleted_before=…), `purge`: only a secret deleted before the time goes."""
    name, alive = f"{ns}/purged", f"{ns}/alive"
    later = datetime.now(UTC) + timedelta(minutes=5)  # past any clock skew between us and a backend
    with _opened(make_store) as store:
        store.put(name, b"v1")
        store.put(alive, b"kept")
        if _lacks(store, Capability.PURGE_DELETED):
            store.delete(name)
            _require_unsupported(lambda: store.destroy_secret(name, deleted_before=later), "purge")
            _require(store.describe(name).deleted is not None, "a refused purge erased the secret")
            return
        _raises(
            SecretStateError,
            lambda: store.destroy_secret(alive, deleted_before=later),
            "purge of a live secret",
        )
        _require(_revealed(store.get(alive)) == b"kept", "a refused purge erased a live secret")
        store.delete(name)
        deleted = store.describe(name).deleted
        _require(deleted is not None, "describe of a deleted secret does not say when")
        assert deleted is not None
        too_soon = deleted - timedelta(seconds=1)
        refused = _raises(
            SecretStateError,
            lambda: store.destroy_secret(name, deleted_before=too_soon),
            "purge of a secret deleted after the cutoff",
        )
        _require(
            f"deleted at {utc_text(deleted)}, not before {utc_text(too_soon)}" in str(refused),
            f"the refused purge does not say its times as every command does (UTC, Z): {refused}",
        )
        _require(store.describe(name).deleted == deleted, "a refused purge changed the deleted secret")
        store.destroy_secret(name, deleted_before=later)
        _raises(NotFoundError, lambda: store.describe(name), "describe after a purge")
        _raises(
            NotFoundError,
            lambda: store.destroy_secret(f"{ns}/never", deleted_before=later),
            "purge of a missing secret",
        )
        _require(_revealed(store.get(alive)) == b"kept", "purge touched another secret")


def _check_pending_rotation(make_store: MakeStore, ns: str) -> None:
    """stage / promote / discard_pending: rotation's four steps on the `pending` label."""
    name = f"{ns}/rotated"
    with _opened(make_store) as store:
        store.put(name, b"value 1")
        store.put(name, b"value 2")
        if _lacks(store, Capability.PENDING_LABEL):
            _require_unsupported(lambda: store.stage(name, b"value 3"), "stage of a pending version")
            _require_unsupported(lambda: store.promote(name, 2), "promote")
            _require_unsupported(lambda: store.discard_pending(name), "discard_pending")
            _require(_revealed(store.get(name)) == b"value 2", "a refused stage changed the current value")
            _require(_version_numbers(store.describe(name)) == [1, 2], "a refused stage wrote a version")
            return
        _raises(NotFoundError, lambda: store.stage(f"{ns}/missing", b"x"), "stage on a missing secret")
        staged = store.stage(name, b"value 3")
        _require(staged.version == 3 and staged.labels == (PENDING,), f"stage returned {staged}")
        current = store.get(name)
        _require(current.version == 2 and _revealed(current) == b"value 2", "stage moved the current label")
        _require(store.get(name, label=PREVIOUS).version == 1, "stage moved the previous label")
        pending = store.get(name, label=PENDING)
        _require(pending.version == 3 and _revealed(pending) == b"value 3", "get label=pending after stage")
        labels = dict(store.describe(name).labels)
        _require(labels == {CURRENT: 2, PREVIOUS: 1, PENDING: 3}, f"labels after stage are {labels}")
        _raises(ConflictError, lambda: store.stage(name, b"value 4"), "a second stage while one is pending")
        labels = dict(store.describe(name).labels)
        _require(labels == {CURRENT: 2, PREVIOUS: 1, PENDING: 3}, f"a refused second stage left {labels}")
        _require(
            _version_numbers(store.describe(name)) == [1, 2, 3], "a refused second stage wrote a version"
        )
        discarded = store.discard_pending(name)
        _require(discarded == 3, f"discard_pending returned {discarded}, not the pending version 3")
        _require(
            store.stage(name, b"value 4").version == 4, "a stage after a discard is not the next version"
        )
        _require(store.get(name, label=PENDING).version == 4, "a stage after a discard did not take pending")
        _require(store.get(name, version=3).labels == (), "the discarded version still carries a label")
        _raises(ConflictError, lambda: store.promote(name, 3), "promote of a version no longer pending")
        _require(store.get(name).version == 2, "a refused promote moved the current label")
        previous = store.promote(name, 4)
        _require(previous == 2, f"promote returned {previous}, not the old current 2")
        promoted = store.get(name)
        _require(
            promoted.version == 4 and _revealed(promoted) == b"value 4", "promote did not make it current"
        )
        _require(
            store.get(name, label=PREVIOUS).version == 2, "promote did not make the old current previous"
        )
        _raises(NotFoundError, lambda: store.get(name, label=PENDING), "get label=pending after promote")
        labels = dict(store.describe(name).labels)
        _require(labels == {CURRENT: 4, PREVIOUS: 2}, f"labels after promote are {labels}")
        _raises(ConflictError, lambda: store.promote(name, 4), "promote of the current version")
        _require(store.stage(name, b"value 5").version == 5, "a stage after a promote was refused")
        discarded = store.discard_pending(name)
        _require(discarded == 5, f"discard_pending returned {discarded}, not the pending version 5")
        _raises(NotFoundError, lambda: store.get(name, label=PENDING), "get label=pending after discard")
        _require(_revealed(store.get(name, version=5)) == b"value 5", "discard_pending lost the version")
        _require(store.get(name).version == 4, "discard_pending moved the current label")
        _raises(NotFoundError, lambda: store.discard_pending(name), "discard_pending with nothing pending")
        _raises(ConflictError, lambda: store.promote(name, 5), "promote of a discarded version")
        store.delete(name)
        _raises(SecretStateError, lambda: store.stage(name, b"value 6"), "stage on a deleted secret")
        store.undelete(name)
        _require(store.get(name).version == 4, "a refused stage on a deleted secret changed it")
        # A write while a rotation is pending: promoting the older pending version would undo it.
        staged = store.stage(name, b"value 6")
        written = store.put(name, b"value 7")
        _raises(ConflictError, lambda: store.promote(name, staged.version), "promote under a newer current")
        labels = dict(store.describe(name).labels)
        _require(labels.get(CURRENT) == written.version, "a refused promote demoted the newer current")
        _require(store.get(name, label=PENDING).version == staged.version, "a refused promote lost pending")
        # A deleted secret's rotation is neither promoted nor discarded until it is undeleted.
        store.delete(name)
        _raises(SecretStateError, lambda: store.discard_pending(name), "discard_pending on a deleted secret")
        _raises(SecretStateError, lambda: store.promote(name, staged.version), "promote on a deleted secret")
        store.undelete(name)
        _require(store.get(name, label=PENDING).version == staged.version, "a refused discard lost pending")
        _require(store.discard_pending(name) == staged.version, "discard after a refused promote")
        # A field rotation stages a value built from the current version it read: a write made
        # since then must refuse the stage, or the promote would undo that write.
        _raises(
            ConflictError,
            lambda: store.stage(name, b"value 8", expect_current=written.version - 1),
            "a stage whose expect_current is no longer current",
        )
        _require(
            _version_numbers(store.describe(name))[-1] == written.version,
            "a stage refused for its expect_current wrote a version",
        )
        _raises(NotFoundError, lambda: store.get(name, label=PENDING), "a refused stage took pending")
        again = store.stage(name, b"value 8", expect_current=written.version)
        _require(again.labels == (PENDING,), "a stage whose expect_current is current was refused")
        _require(store.discard_pending(name) == again.version, "discard after a stage with expect_current")
        # A rotation records what its value is for (a PostgreSQL role) with the version it stages,
        # so a resume sets it there and nowhere else; a stage without one reads back none.
        target = "postgres-role:app ünï/@=+"
        aimed = store.stage(name, b"value 9", target=target)
        read = store.get(name, label=PENDING)
        _require(
            read.version == aimed.version and read.target == target, f"target read back as {read.target!r}"
        )
        _require(
            store.get(name, version=aimed.version).target == target, "the target of a version read by number"
        )
        _require(store.get(name).target is None, "the current version read the pending version's target")
        store.discard_pending(name)
        plain = store.stage(name, b"value 10")
        _require(store.get(name, label=PENDING).target is None, "a stage without a target read one back")
        store.discard_pending(name)
        for bad in ("", "x" * 129, "nul\x00"):

            def stage_bad(bad: str = bad) -> object:
                return store.stage(name, b"value 11", target=bad)

            _raises(InvalidInputError, stage_bad, "a stage with a bad target")
        _require(
            _version_numbers(store.describe(name))[-1] == plain.version,
            "a stage refused for its target wrote",
        )


INVALID_NAMES = (
    "", "/leading", "trailing/", "double//slash", "-flag", "../escape", "a/../b", "a/./b", ".hidden",
    "has space", "new\nline", "tab\t", "nul\x00", "pct%", "star*", "qu?", "colon:x", "back\\slash",
    "ünïcode", "x" * 257,
)  # fmt: skip


_NAME_VERBS: dict[str, Callable[[SecretStore, str], object]] = {
    "put": lambda store, name: store.put(name, b"x"),
    "get": lambda store, name: store.get(name),
    "describe": lambda store, name: store.describe(name),
    "delete": lambda store, name: store.delete(name),
    "undelete": lambda store, name: store.undelete(name),
    "destroy": lambda store, name: store.destroy(name, [1]),
    "destroy_secret": lambda store, name: store.destroy_secret(name),
}


def _check_invalid_names_refused(make_store: MakeStore, ns: str) -> None:
    with _opened(make_store) as store:
        before = _names(store.list(include_deleted=True))
        for bad in INVALID_NAMES:
            for verb, action in _NAME_VERBS.items():
                _raises(InvalidInputError, partial(action, store, bad), f"{verb} of the invalid name {bad!r}")
        _raises(InvalidInputError, lambda: store.put(cast(Any, None), b"x"), "put with name None")
        _require(_names(store.list(include_deleted=True)) == before, "a refused invalid name was written")
        longest = f"{ns}/" + "n" * (256 - len(ns) - 1)
        _require(store.put(longest, b"ok").version == 1, "a 256-character name was refused")


def _check_max_versions_pruning(make_store: MakeStore, ns: str) -> None:
    name = f"{ns}/pruned"
    total = DEFAULT_MAX_VERSIONS + 3
    with _opened(make_store) as store:
        for n in range(1, total + 1):
            store.put(name, f"value {n}".encode())
        meta = store.describe(name)
        kept = _version_numbers(meta)
        _require(meta.max_versions == DEFAULT_MAX_VERSIONS, f"max_versions is {meta.max_versions}")
        _require(len(kept) <= meta.max_versions, f"{len(kept)} versions kept, more than {meta.max_versions}")
        newest = list(range(total - DEFAULT_MAX_VERSIONS + 1, total + 1))
        _require(kept == newest, f"kept versions {kept}, not the newest {DEFAULT_MAX_VERSIONS}")
        _require(total in kept and total - 1 in kept, "pruning dropped the current or previous version")
        for n in kept:
            _require(
                _revealed(store.get(name, version=n)) == f"value {n}".encode(), f"kept version {n} unreadable"
            )
        for n in range(1, total + 1):
            if n not in kept:
                _raises(NotFoundError, partial(store.get, name, version=n), f"get of pruned version {n}")
        _require(
            _revealed(store.get(name, label=PREVIOUS)) == f"value {total - 1}".encode(), "previous pruned"
        )


def _check_max_versions_setting(make_store: MakeStore, ns: str) -> None:
    """A secret's own max_versions (put or update_metadata, 2 to 100): shown by describe and list;
    a lower one prunes the oldest unlabelled versions from the next write on (or hides them at
    once, if the store says so: `max_versions_hide_at_once`), never a labelled one; a higher one
    keeps more; out of range, or with a put that is refused, nothing changed."""
    name = f"{ns}/rolled"
    with _opened(make_store) as store:
        store.put(name, b"value 1", description="kept", tags={"desk": "fx"})
        for n in range(2, 7):
            store.put(name, f"value {n}".encode())
        store.update_metadata(name, max_versions=3)
        meta = store.describe(name)
        _require(meta.max_versions == 3, f"max_versions is {meta.max_versions} after setting 3")
        shown = [4, 5, 6] if max_versions_hide_at_once(store) else [1, 2, 3, 4, 5, 6]
        _require(
            meta.current_version == 6 and _version_numbers(meta) == shown,
            f"setting max_versions shows versions {_version_numbers(meta)}, not {shown}",
        )
        _require(
            meta.description == "kept" and dict(meta.tags) == {"desk": "fx"},
            "setting max_versions changed the description or tags",
        )
        listed = [m for m in store.list(f"{ns}/") if m.name == name]
        _require(
            len(listed) == 1 and listed[0].max_versions == 3, "list does not show the secret's max_versions"
        )
        store.put(name, b"value 7")
        pruned = _version_numbers(store.describe(name))
        _require(pruned == [5, 6, 7], f"after a write under max_versions 3, kept {pruned}, not [5, 6, 7]")
        for n in range(1, 5):
            _raises(NotFoundError, partial(store.get, name, version=n), f"get of version {n}, pruned under 3")
        _require(_revealed(store.get(name, version=5)) == b"value 5", "the oldest kept version is unreadable")

        store.update_metadata(name, max_versions=2)  # labelled versions stay past it
        if _lacks(store, Capability.PENDING_LABEL):
            store.put(name, b"value 8")
            kept = [7, 8]
        else:
            store.stage(name, b"value 8")  # pending 8, current 7, previous 6: three labelled
            staged = _version_numbers(store.describe(name))
            _require(
                staged == [6, 7, 8], f"under max_versions 2 a stage kept {staged}, not the labelled [6, 7, 8]"
            )
            store.put(name, b"value 9")  # current 9, previous 7, pending still 8
            kept = [7, 8, 9]
        _require(
            _version_numbers(store.describe(name)) == kept,
            f"under max_versions 2 kept {_version_numbers(store.describe(name))}, not {kept}",
        )
        _require(store.get(name, label=PREVIOUS).version == 7, "a labelled version (previous) was pruned")
        if not _lacks(store, Capability.PENDING_LABEL):
            store.discard_pending(name)

        store.update_metadata(name, max_versions=4)
        last = kept[-1] + 2
        store.put(name, f"value {last - 1}".encode())
        store.put(name, f"value {last}".encode())
        raised = _version_numbers(store.describe(name))
        _require(raised == list(range(last - 3, last + 1)), f"under max_versions 4 kept {raised}")

        before = (_metadata_state(store, name), store.describe(name).max_versions)
        for bad in (0, 1, 101, -3, True, "3"):
            exc = _raises(
                InvalidInputError,
                partial(store.update_metadata, name, max_versions=cast(Any, bad)),
                f"update_metadata with max_versions {bad!r}",
            )
            _require(name in str(exc), f"max_versions {bad!r}: the error does not name the secret")
            _raises(
                InvalidInputError,
                partial(store.put, name, b"refused", max_versions=cast(Any, bad)),
                f"put with max_versions {bad!r}",
            )
        _require(
            "2 to 100"
            in str(_raises(InvalidInputError, lambda: store.update_metadata(name, max_versions=101), "101")),
            "the error does not give the allowed range 2 to 100",
        )
        after = (_metadata_state(store, name), store.describe(name).max_versions)
        _require(after == before, "a refused max_versions changed the secret")
        _raises(
            InvalidInputError,
            lambda: store.put(f"{ns}/never", b"x", max_versions=1),
            "put of a new secret, 1",
        )
        _raises(NotFoundError, lambda: store.describe(f"{ns}/never"), "a refused put created the secret")

        short = f"{ns}/short"
        store.put(short, b"v1", max_versions=5)
        _require(store.describe(short).max_versions == 5, "put of a new secret did not set max_versions")
        store.put(short, b"v2", tags={"a": "b"})
        store.put(short, b"v3", description="d")
        _require(store.describe(short).max_versions == 5, "a put without max_versions changed it")
        _raises(
            ConflictError,
            lambda: store.put(short, b"refused", expect_version=2, max_versions=2),
            "put with a stale expect_version and max_versions",
        )
        _require(store.describe(short).max_versions == 5, "a refused put changed max_versions")
        # This write prunes under the new limit (encrypted, AWS) or under the old one (Vault sets it
        # only after the data write, having no compare-and-set there); the next write under the new.
        store.put(short, b"v4", max_versions=2)
        meta = store.describe(short)
        _require(
            meta.max_versions == 2 and _version_numbers(meta) in ([3, 4], [1, 2, 3, 4]),
            f"put with max_versions 2 kept {_version_numbers(meta)} (max {meta.max_versions})",
        )
        _require(
            dict(meta.tags) == {"a": "b"} and meta.description == "d", "put with max_versions lost metadata"
        )
        store.put(short, b"v5")
        kept = _version_numbers(store.describe(short))
        _require(kept == [4, 5], f"the write after a put with max_versions 2 kept {kept}, not [4, 5]")

        _raises(
            NotFoundError,
            lambda: store.update_metadata(f"{ns}/missing", max_versions=3),
            "max_versions of a missing secret",
        )
        store.delete(short)
        _raises(
            SecretStateError,
            lambda: store.update_metadata(short, max_versions=3),
            "max_versions while deleted",
        )
        store.undelete(short)
        _require(store.describe(short).max_versions == 2, "a refused update of a deleted secret changed it")


def _check_repr_never_shows_values(make_store: MakeStore, ns: str) -> None:
    value = MARKER.encode()
    name = f"{ns}/redacted"
    with _opened(make_store) as store:
        returned: list[tuple[str, object]] = [
            ("put's VersionInfo", store.put(name, value, description="desc", tags={"k": "v"})),
            ("put's VersionInfo", store.put(name, value)),
        ]
        secret = store.get(name)
        returned += [
            ("get's Secret", secret),
            ("Secret.value", secret.value),
            ("get by version", store.get(name, version=1)),
            ("get by label", store.get(name, label=PREVIOUS)),
            ("describe's SecretMetadata", store.describe(name)),
            ("the store", store),
        ]
        returned += [("a listed SecretMetadata", m) for m in store.list(f"{ns}/")]
        returned += [("a VersionInfo", v) for v in store.describe(name).versions]
        for what, obj in returned:
            _require_no_leak(obj, value, what)
        _require(f"{secret.value}" != MARKER and f"{secret!s}".count(MARKER) == 0, "format() shows the value")
        _require(secret.value.reveal() == value, "the value is not recoverable through reveal()")


# Text a refused write's error must never echo (it would reach terminals and logs as given).
OFFENDING = "offending-TEXT-9c1e"


def _metadata_state(store: SecretStore, name: str) -> tuple[object, ...]:
    meta = store.describe(name)
    return (_version_numbers(meta), meta.description, dict(meta.tags), _revealed(store.get(name)))


def _require_metadata_refused(
    store: SecretStore, name: str, what: str, description: str | None, tags: dict[str, str] | None
) -> None:
    """A put with this metadata fails with InvalidInputError: one line that names the secret and
    not the offending text, and the secret (which exists) is left as it was."""
    before = _metadata_state(store, name)
    exc = _raises(
        InvalidInputError, lambda: store.put(name, b"refused", description=description, tags=tags), what
    )
    message = str(exc)
    _require(name in message, f"{what}: the error does not name the secret: {message!r}")
    _require(OFFENDING not in message, f"{what}: the error echoes the offending text")
    _require(
        not any(char in message for char in "\x00\x07\x1b\n\t\r"),
        f"{what}: the error holds a control character",
    )
    _require(_metadata_state(store, name) == before, f"{what}: a refused put changed the secret")


def _require_metadata_kept(
    store: SecretStore, name: str, what: str, description: str, tags: dict[str, str], *, optional: bool
) -> None:
    """A put with this metadata is written and read back exactly; when `optional` (the store lacks
    METADATA_AT_LIMITS) it may instead be refused as not supported, changing nothing."""
    before = _metadata_state(store, name)
    try:
        store.put(name, b"kept", description=description, tags=tags)
    except UnsupportedOperationError as exc:
        if not optional:
            raise AssertionError(f"{what} was refused ({exc})") from exc
        _require(UNSUPPORTED_MESSAGE in str(exc), f"{what}: the error does not say {UNSUPPORTED_MESSAGE!r}")
        _require(_metadata_state(store, name) == before, f"{what}: a refused put changed the secret")
        return
    meta = store.describe(name)
    _require(meta.description == description, f"{what}: the description changed on the round trip")
    _require(dict(meta.tags) == tags, f"{what}: the tags changed on the round trip")
    listed = [m for m in store.list(f"{name}") if m.name == name]
    _require(
        len(listed) == 1 and listed[0].description == description and dict(listed[0].tags) == tags,
        f"{what}: list does not show the metadata describe shows",
    )


def _check_metadata_limits(make_store: MakeStore, ns: str) -> None:
    """AWS's limits on descriptions and tags, and no control characters in them, for every store."""
    name = f"{ns}/described"
    with _opened(make_store) as store:
        lacks = _lacks(store, Capability.METADATA_AT_LIMITS)
        store.put(name, b"v1", description="before", tags={"team": "trading"})
        # Within what every backend holds (Vault: 512 bytes per entry; AWS: 50 tags with ours).
        _require_metadata_kept(
            store,
            name,
            "a 512-character description and 40 tags with a 128-character key and a 256-character value",
            "d" * 512,
            {f"k{i:02d}": f"v{i}" for i in range(38)}
            | {"k" * MAX_TAG_KEY_LENGTH: "long key", "long-value": "v" * MAX_TAG_VALUE_LENGTH},
            optional=False,
        )
        _require_metadata_kept(
            store,
            name,
            f"a {MAX_DESCRIPTION_LENGTH}-character description and {MAX_TAGS} tags",
            "é" * MAX_DESCRIPTION_LENGTH,
            {f"tag-{i:02d}": "ü" * MAX_TAG_VALUE_LENGTH for i in range(MAX_TAGS)},
            optional=lacks,
        )
        store.put(name, b"v-reset", description="plain", tags={"team": "trading"})
        too_long = OFFENDING + "x" * MAX_DESCRIPTION_LENGTH
        refused: list[tuple[str, str | None, dict[str, str] | None]] = [
            (
                f"a {MAX_DESCRIPTION_LENGTH + 1}-character description",
                too_long[: MAX_DESCRIPTION_LENGTH + 1],
                None,
            ),
            (f"{MAX_TAGS + 1} tags", None, {f"tag-{i:02d}": "v" for i in range(MAX_TAGS + 1)}),
            ("an empty tag key", None, {"": "v"}),
            (
                f"a {MAX_TAG_KEY_LENGTH + 1}-character tag key",
                None,
                {(OFFENDING + "k" * MAX_TAG_KEY_LENGTH)[: MAX_TAG_KEY_LENGTH + 1]: "v"},
            ),
            (
                f"a {MAX_TAG_VALUE_LENGTH + 1}-character tag value",
                None,
                {"k": (OFFENDING + "v" * MAX_TAG_VALUE_LENGTH)[: MAX_TAG_VALUE_LENGTH + 1]},
            ),
            ("a tag key with the reserved prefix secrets-manager:", None, {"secrets-manager:mine": "v"}),
            ("a tag key with AWS's reserved prefix aws:", None, {"aws:mine": "v"}),
        ]
        for char in ("\x1b", "\x00", "\n", "\t", "\x07", "\x7f", "\x9b"):
            spelled = repr(char)
            refused += [
                (f"a description with {spelled}", f"{OFFENDING}{char}[31mRED", None),
                (f"a tag key with {spelled}", None, {f"{OFFENDING}{char}": "v"}),
                (f"a tag value with {spelled}", None, {"k": f"{OFFENDING}{char}x"}),
            ]
        for what, description, tags in refused:
            _require_metadata_refused(store, name, what, description, tags)
        new = f"{ns}/never-written"
        _raises(
            InvalidInputError,
            lambda: store.put(new, b"x", description="x" * (MAX_DESCRIPTION_LENGTH + 1)),
            "put of a new secret with a too-long description",
        )
        _raises(NotFoundError, lambda: store.describe(new), "a refused put created the secret")


def _check_update_metadata(make_store: MakeStore, ns: str) -> None:
    """update_metadata changes the description and tags, and nothing else: no new version, the
    other tags kept; bad input is refused with nothing changed."""
    name = f"{ns}/annotated"
    with _opened(make_store) as store:
        store.put(name, b"v1", description="before", tags={"team": "trading", "env": "dev"})
        store.put(name, b"v2")
        store.update_metadata(
            name,
            description="after",
            set_tags={"env": "prod", "owner": "ops"},
            remove_tags=["team", "absent"],
        )
        meta = store.describe(name)
        _require(
            _version_numbers(meta) == [1, 2], f"update_metadata wrote a version: {_version_numbers(meta)}"
        )
        _require(meta.current_version == 2, "update_metadata moved current")
        _require(_revealed(store.get(name)) == b"v2", "update_metadata changed the value")
        _require(meta.description == "after", f"the description is {meta.description!r}, not 'after'")
        _require(
            dict(meta.tags) == {"env": "prod", "owner": "ops"},
            f"tags are {dict(meta.tags)} after setting env, owner and removing team",
        )
        listed = [m for m in store.list(f"{ns}/") if m.name == name]
        _require(
            len(listed) == 1 and listed[0].description == "after" and dict(listed[0].tags) == dict(meta.tags),
            "list does not show the updated metadata",
        )
        store.update_metadata(name, set_tags={"k": "v"})
        meta = store.describe(name)
        _require(meta.description == "after", "setting a tag changed the description")
        _require(dict(meta.tags) == {"env": "prod", "owner": "ops", "k": "v"}, "setting a tag dropped others")
        store.update_metadata(name, description="")
        _require(store.describe(name).description == "", "an empty description did not clear it")
        store.update_metadata(name, remove_tags=["env", "owner", "k"])
        _require(dict(store.describe(name).tags) == {}, "removing every tag left some")
        store.update_metadata(name, set_tags={f"t{i:02d}": "v" for i in range(30)})
        before = _metadata_state(store, name)
        refused: list[tuple[str, dict[str, Any]]] = [
            ("an update with nothing to change", {}),
            ("a tag both set and removed", {"set_tags": {"t00": "w"}, "remove_tags": ["t00"]}),
            ("a tag key with AWS's reserved prefix", {"set_tags": {"aws:mine": "v"}}),
            ("removing secrets-manager's own tag", {"remove_tags": ["secrets-manager:created-by"]}),
            ("a description with an escape", {"description": f"{OFFENDING}\x1b[31m"}),
            ("an empty tag key to remove", {"remove_tags": [""]}),
            (f"{MAX_TAGS + 1} tags in all", {"set_tags": {f"u{i:02d}": "v" for i in range(MAX_TAGS - 29)}}),
        ]
        for what, change in refused:
            exc = _raises(InvalidInputError, partial(store.update_metadata, name, **change), what)
            _require(OFFENDING not in str(exc), f"{what}: the error echoes the offending text")
        _require(_metadata_state(store, name) == before, "a refused update_metadata changed the secret")
        store.update_metadata(name, max_versions=7)  # its own limit, on every store
        unchanged = store.describe(name)
        shown = (unchanged.updated, unchanged.description, dict(unchanged.tags), unchanged.max_versions)
        no_ops: list[tuple[str, dict[str, Any]]] = [
            ("removing a tag it does not have", {"remove_tags": ["absent"]}),
            ("its own description", {"description": unchanged.description}),
            ("a tag set to the value it has", {"set_tags": {"t00": unchanged.tags["t00"]}}),
            ("its own max_versions", {"max_versions": 7}),
            (
                "all of them at once",
                {"description": "", "set_tags": {"t01": "v"}, "remove_tags": ["absent"], "max_versions": 7},
            ),
        ]
        for what, change in no_ops:
            _raises(NothingToChangeError, partial(store.update_metadata, name, **change), f"update of {what}")
            meta = store.describe(name)
            _require(
                (meta.updated, meta.description, dict(meta.tags), meta.max_versions) == shown,
                f"an update of {what} changed the secret ('updated' included)",
            )
        store.update_metadata(name, max_versions=8, remove_tags=["absent"])  # one change is enough
        _require(store.describe(name).max_versions == 8, "an update that changes one thing was not made")
        _raises(
            NotFoundError,
            lambda: store.update_metadata(f"{ns}/missing", description="x"),
            "update_metadata of a missing secret",
        )
        _raises(NotFoundError, lambda: store.describe(f"{ns}/missing"), "update_metadata created a secret")
        store.delete(name)
        _raises(
            SecretStateError,
            lambda: store.update_metadata(name, description="while deleted"),
            "update_metadata of a deleted secret",
        )
        store.undelete(name)
        _require(store.describe(name).description == "", "a refused update of a deleted secret changed it")


def _check_expiry(make_store: MakeStore, ns: str) -> None:
    """An expiry belongs to a version: `put(expires=…)` gives the version written one, which
    describe, list and get show (UTC, whole seconds); the next version has none, nor does a promoted
    rotation's; update_metadata sets or clears the current version's, and keeps it when tags change."""
    name = f"{ns}/api-key"
    first = datetime(2031, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
    later = datetime(2031, 9, 1, 12, 0, 0, tzinfo=UTC)
    with _opened(make_store) as store:
        _raises(
            InvalidInputError,
            lambda: store.put(name, b"v1", expires=datetime(2031, 1, 1)),
            "put with an expiry without a time zone",
        )
        _raises(NotFoundError, lambda: store.describe(name), "a refused put with an expiry wrote the secret")
        store.put(name, b"v1", expires=first)
        whole = first.replace(microsecond=0)
        meta = store.describe(name)
        _require(meta.expires == whole, f"describe after put(expires=…) says expires={meta.expires}")
        listed = [m for m in store.list(f"{ns}/") if m.name == name]
        _require(bool(listed) and listed[0].expires == whole, "list does not show the expiry")
        _require(store.get(name).expires == whole, "get of the version with an expiry does not show it")
        store.put(name, b"v2")
        _require(store.describe(name).expires is None, "a new version inherited the previous one's expiry")
        _require(store.get(name).expires is None, "get of a new version shows the old version's expiry")
        _require(store.get(name, version=1).expires == whole, "version 1 lost its expiry")
        _raises(
            NothingToChangeError,
            lambda: store.update_metadata(name, clear_expiry=True),
            "update_metadata(clear_expiry=True) of a current version without an expiry",
        )
        _require(
            store.get(name, version=1).expires == whole,
            "clearing the current version's expiry (it had none) dropped version 1's",
        )
        store.update_metadata(name, expires=later)
        _require(store.describe(name).expires == later, "update_metadata(expires=…) did not set it")
        _require(store.get(name).expires == later, "get does not show the expiry update_metadata set")
        _raises(
            NothingToChangeError,
            lambda: store.update_metadata(name, expires=later),
            "update_metadata with the expiry it already has",
        )
        store.update_metadata(name, set_tags={"team": "desk"})
        meta = store.describe(name)
        _require(meta.expires == later, "a tag change dropped the expiry")
        _require(dict(meta.tags) == {"team": "desk"}, f"the expiry shows among the tags: {dict(meta.tags)}")
        store.put(name, b"v3", tags={"owner": "ops"}, expires=first)
        meta = store.describe(name)
        _require(
            meta.expires == whole and dict(meta.tags) == {"owner": "ops"}, "put replacing tags and expiry"
        )
        store.update_metadata(name, clear_expiry=True)
        _require(store.describe(name).expires is None, "update_metadata(clear_expiry=True) did not clear it")
        # An expiry meant for a version that is no longer current (a write landed meanwhile).
        current = store.describe(name).current_version
        assert current is not None
        exc = _raises(
            ConflictError,
            lambda: store.update_metadata(name, expires=later, expect_current=current - 1),
            "update_metadata(expect_current=…) of a version no longer current",
        )
        _require(type(exc) is ConflictError, f"a version no longer current refused as {type(exc).__name__}")
        _require(store.describe(name).expires is None, "a refused update_metadata(expect_current=…) set it")
        store.update_metadata(name, expires=later, expect_current=current)
        _require(
            store.describe(name).expires == later, "update_metadata(expect_current=current) did not set it"
        )
        store.update_metadata(name, clear_expiry=True, expect_current=current)
        _raises(
            NotFoundError,
            lambda: store.update_metadata(f"{ns}/missing", expires=later),
            "an expiry for a missing secret",
        )
        if not _lacks(store, Capability.PENDING_LABEL):
            store.put(name, b"v4", expires=first)
            staged = store.stage(name, b"v5")
            store.promote(name, staged.version)
            _require(store.describe(name).expires is None, "a promoted rotation inherited the old expiry")


SECRET_STORE_CHECKS: dict[str, Check] = {
    "round-trip": _check_values_round_trip,
    "oversize-refused": _check_oversize_value_refused,
    "versions-labels": _check_versions_and_labels,
    "get-version-label": _check_get_by_version_and_label,
    "expect-version": _check_expect_version,
    "list-prefix": _check_list_by_prefix,
    "names-case-sensitive": _check_names_differing_in_case_are_different_secrets,
    "describe-history": _check_describe_and_history,
    "delete-undelete": _check_delete_and_undelete,
    "delete-expect-version": _check_delete_expect_version,
    "destroy-versions": _check_destroy_versions,
    "destroy-secret": _check_destroy_secret,
    "purge-deleted": _check_purge_deleted,
    "invalid-names": _check_invalid_names_refused,
    "max-versions": _check_max_versions_pruning,
    "pending-rotation": _check_pending_rotation,
    "delete-expect-no-pending": _check_delete_expect_no_pending,
    "repr-redacted": _check_repr_never_shows_values,
    "metadata-limits": _check_metadata_limits,
    "update-metadata": _check_update_metadata,
    "max-versions-setting": _check_max_versions_setting,
    "expiry": _check_expiry,
}
"""Every check by a short key (used in its namespace and in test ids); run in this order."""
