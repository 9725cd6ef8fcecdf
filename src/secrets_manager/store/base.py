"""The `SecretStore` protocol in plaintext terms, and the values it returns.

Every entry point (CLI, service, SDK) talks to a `SecretStore`; `store.testing.check_secret_store`
is the conformance suite every implementation passes.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    NothingToChangeError,
    OutcomeUnknownError,
    RotationInProgressError,
    SecretsManagerError,
    SecretStateError,
    UnsupportedOperationError,
)
from secrets_manager.values import SecretValue

CURRENT = "current"
PREVIOUS = "previous"
PENDING = "pending"
LABELS = (CURRENT, PREVIOUS, PENDING)
MAX_VALUE_SIZE = 64 * 1024
DEFAULT_MAX_VERSIONS = 10
# What a secret's own max_versions may be set to. At least 2: `current` and `previous` are labels,
# never pruned, so 1 would keep two anyway (and Vault, whose `previous` is just the version before
# the latest, would prune it). At most 100: about what AWS Secrets Manager keeps of a secret.
MIN_MAX_VERSIONS = 2
MAX_MAX_VERSIONS = 100
# Metadata limits: AWS Secrets Manager's documented ones (Description; TagResource), for every store.
MAX_DESCRIPTION_LENGTH = 2048  # characters
MAX_TAGS = 50
MAX_TAG_KEY_LENGTH = 128  # characters, at least 1
MAX_TAG_VALUE_LENGTH = 256  # characters, may be empty
# Tag keys that start with these are reserved: ours (Vault custom_metadata and AWS tags hold our own
# bookkeeping under it) and AWS's own (TagResource refuses them). Refused by every store, so a
# backup of any store restores into any other.
RESERVED_TAG_PREFIX = "secrets-manager:"
AWS_RESERVED_TAG_PREFIX = "aws:"
# A rotation's target (`stage(target=…)`): a role's name and what kind of target it is fits.
MAX_TARGET_BYTES = 128


class Capability(enum.StrEnum):
    """Optional parts of the contract. A store that lacks one lists it in its class attribute
    `unsupported_capabilities`; the operation then raises UnsupportedOperationError ("... is not
    supported by this store"), and the conformance suite checks exactly that."""

    DESTROY_VERSION = "destroy-version"  # erase one version's value for good (`destroy`)
    PENDING_LABEL = "pending-label"  # a version can carry the `pending` label
    EMPTY_VALUE = "empty-value"  # a value of zero bytes
    # descriptions and tags up to every limit of `checked_metadata` (2048 characters, 50 tags, …);
    # a store whose backend holds less (Vault's custom_metadata, AWS's 50 tags counting ours) refuses
    # what does not fit before it writes anything
    METADATA_AT_LIMITS = "metadata-at-limits"
    # destroy a deleted secret only if it was deleted before a time (`purge`); AWS purges deleted
    # secrets itself at the end of their recovery window, and its DeletedDate is that end
    PURGE_DELETED = "purge-deleted"


def max_versions_hide_at_once(store: object) -> bool:
    """Whether a lower max_versions hides the versions past it at once (AWS, which keeps old
    versions itself: the limit only filters what we show) rather than from the next write on,
    as Vault and our encrypted store prune. A store says so in `max_versions_hide_at_once`."""
    return bool(getattr(store, "max_versions_hide_at_once", False))


def unsupported_capabilities(store: object) -> frozenset[Capability]:
    """The capabilities `store` declares it lacks (none, unless it says so)."""
    declared: Iterable[str] = getattr(store, "unsupported_capabilities", frozenset())
    return frozenset(Capability(c) for c in declared)


def check_metadata_fits(
    store: object,
    name: str,
    *,
    description: str | None,
    tags: Mapping[str, str] | None,
    max_versions: int | None,
) -> None:
    """What a `put` creating `name` with this metadata would refuse for the metadata alone, asked
    before anything is written (a restore checks every secret before its first write).

    Optional: a store whose backend holds less than `checked_metadata` allows (Vault's
    custom_metadata, AWS's tag characters and 50 tags counting ours) defines a method
    `check_metadata_fits(name, *, description, tags, max_versions)` raising what its `put` would
    (InvalidInputError or UnsupportedOperationError); a store without one holds all of it."""
    check = getattr(store, "check_metadata_fits", None)
    if check is not None:
        check(name, description=description, tags=tags, max_versions=max_versions)


@dataclass(frozen=True)
class Secret:
    """One version of a secret, with its value redacted until `value.reveal()`."""

    name: str
    version: int
    value: SecretValue
    created: datetime
    labels: tuple[str, ...] = ()
    # When this version's value stops working (an exchange key's 90 days, a role's VALID UNTIL), if
    # one was recorded for it; None: none recorded, or the store could not tell on this read.
    expires: datetime | None = None
    # What a rotation staged this version for (`stage(target=…)`: e.g. the PostgreSQL role whose
    # password it is), so a resume sets it there and nowhere else; None: a version not staged with
    # one (a write, or a stage by a build before targets), or the store could not tell on this read.
    target: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """Metadata of one version; never its value."""

    version: int
    created: datetime
    created_by: str
    labels: tuple[str, ...] = ()
    destroyed: bool = False


@dataclass(frozen=True)
class SecretMetadata:
    """Everything about a secret except values. Names and metadata are not secret."""

    name: str
    namespace: str
    created: datetime
    updated: datetime
    created_by: str
    description: str
    tags: Mapping[str, str]
    current_version: int | None
    versions: tuple[VersionInfo, ...]
    deleted: datetime | None = None
    max_versions: int = DEFAULT_MAX_VERSIONS
    labels: Mapping[str, int] = field(default_factory=dict)
    # The current version's expiry. A store keeps one (version, time) pair: it applies only while
    # that version is current, so a later version (a store, a rotation's promote) has none.
    expires: datetime | None = None


@dataclass(frozen=True)
class Anchor:
    """The newest audit record a store vouched for (its sequence number and chained hash)."""

    seq: int
    hash: str


@runtime_checkable
class SecretStore(Protocol):
    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        max_versions: int | None = None,
        expires: datetime | None = None,
    ) -> VersionInfo:
        """Write a new version and move `current`/`previous`. `expect_version=0` means create-only.
        `expires`: when the value written stops working (`checked_expiry`), for this version only.
        `description`, `tags` and `max_versions`, when given, are set on the secret (new or not)
        with this write, and not at all if the write is refused. A lower `max_versions` prunes
        (`update_metadata`) from this write on, or on a store that can set it only after the write
        (Vault: no compare-and-set on its metadata) from the next write on. SecretStateError (a
        ConflictError, not a lost compare-and-set) if the secret is deleted."""

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """One version: by number, by label, or `current` when neither is given."""

    def list(self, prefix: str = "", *, include_deleted: bool = False) -> list[SecretMetadata]:
        """Metadata of the secrets whose names start with `prefix`, sorted by name."""

    def describe(self, name: str) -> SecretMetadata:
        """Metadata and version history of one secret (deleted ones too)."""

    def update_metadata(
        self,
        name: str,
        *,
        description: str | None = None,
        set_tags: Mapping[str, str] | None = None,
        remove_tags: Iterable[str] = (),
        max_versions: int | None = None,
        expires: datetime | None = None,
        clear_expiry: bool = False,
        expect_current: int | None = None,
    ) -> None:
        """`expires` records when the current version stops working, `clear_expiry` forgets it
        (InvalidInputError if the secret has no current version, `refuse_expiry_without_current`);
        a clear forgets only the current version's (another's, which a rollback carries, stays), and
        an expiry set or cleared as it already is changes nothing (NothingToChangeError, as any
        update that changes nothing).
        `expect_current`: only if that version is current (`refuse_unless_still_current`:
        ConflictError, nothing changed), so an expiry meant for it never lands on a version written
        meanwhile; decided in the update's own commit on our stores (through a service too:
        UpdateSecretMetadataIfCurrent), on the metadata read on Vault and AWS (their metadata has no
        compare-and-set: docs/stores.md).
        Change the description, tags and max_versions without writing a version, as AWS's
        UpdateSecret without a value, TagResource and UntagResource and Vault's `kv metadata put`
        do: `set_tags` are added or replaced, `remove_tags` removed (an absent key is no error),
        other tags stay. A lower `max_versions` prunes nothing now: as in Vault, the next write
        removes the oldest unlabelled versions past it (AwsStore, which prunes nothing itself, hides
        them at once). NotFoundError if the secret is missing, SecretStateError if it is deleted; the
        checks of `put` on the result."""

    def delete(
        self, name: str, *, expect_version: int | None = None, expect_no_pending: bool = False
    ) -> None:
        """Soft delete: hidden from get and list until `undelete`. NotFoundError if the secret is
        missing or already deleted (deleted, it is not found by reads either). `expect_version`:
        only if that version is still current (`refuse_unless_current`: ConflictError, nothing
        deleted, if a write landed since the caller read it), decided in the delete's own commit
        on our stores; Vault and AWS, which have no conditional delete, check around theirs
        (docs/stores.md says what window remains). `expect_no_pending`: only if no rotation is
        in progress (`refuse_if_staged`: ConflictError, nothing deleted, if a version other than
        current carries `pending`), decided the same way: a rotation staged after the caller read
        the secret is not hidden with it (`mv`, which checked for one before its copy)."""

    def undelete(self, name: str) -> None:
        """Undo a soft delete. SecretStateError (a ConflictError) if the secret is not deleted."""

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        """Erase the given versions' values for good; metadata remembers they existed."""

    def destroy_secret(self, name: str, *, deleted_before: datetime | None = None) -> None:
        """Erase the secret entirely: every version and its metadata. `deleted_before` (`purge`):
        only a secret that is deleted, since before that time; SecretStateError otherwise, and
        nothing is erased (one undeleted meanwhile stays)."""

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        """Write a new version labelled `pending` (rotation, step 1); `current` and `previous` do not
        move. RotationInProgressError (a ConflictError) while another rotation is in progress (a
        version other than current carries `pending`), as AWS's RotateSecret refuses: two rotations
        at once would each set their own value at the target. `expect_current`: the current version
        the new value was built from (a field rotation rewrites one field of it): ConflictError,
        nothing staged, if another version is current now (`refuse_if_changed`), so a write made
        after the rotation read the value is not undone by its promote. `target`: what the value is
        for (`checked_target`: e.g. `postgres-role:app`, never a password), recorded with the
        version and given back as `Secret.target` by a read of it, so a resume can refuse to set the
        value anywhere else. Otherwise the same errors as `put`."""

    def promote(self, name: str, version: int) -> int | None:
        """Make `version`, which must carry `pending` (ConflictError otherwise), `current` in one
        step: the old current becomes `previous` and the `pending` label is removed. Returns the
        version that became `previous` (None if nothing was current), as the change saw it: a
        describe afterwards could report another rotation's labels. ConflictError, nothing moved,
        if the current version is newer than `version` (`refuse_to_demote`), or if `version` was
        destroyed (`destroy` of the pending version: it has no value to make current;
        `discard_pending` drops it)."""

    def discard_pending(self, name: str) -> int:
        """Remove the `pending` label (the version stays, unlabelled). NotFoundError if none has it,
        SecretStateError (as `promote` and `stage`) if the secret is deleted. Returns the version
        that carried it, as the change saw it."""

    def close(self) -> None:
        """Release the backend."""


# A store several hosts share (PostgreSQL, Vault, AWS): how long a handle uses the audit keys it read
# before it reads them again, so a process whose log never meets another host's or process's
# `audit rotate-key` moves on.
AUDIT_KEYS_RECHECK_SECONDS = 5.0


IF_EXISTS = ("fail", "skip", "overwrite")


class SecretExistsError(ConflictError):
    """`put_batch` with if_exists="fail" met a secret that exists already: nothing was written."""

    def __init__(self, name: str) -> None:
        super().__init__(f"secret {name!r} exists already; nothing was written")
        self.name = name


@runtime_checkable
class BatchWriter(Protocol):
    """Optional for a store whose backend has transactions (our encrypted store): several new
    versions written in one commit, all or none."""

    def put_batch(
        self,
        writes: Sequence[tuple[str, bytes]],
        *,
        if_exists: str = "fail",
        expires: datetime | None = None,
    ) -> list[VersionInfo | None]:
        """A new current version of each `(name, value)`, every one or none of them, with one
        commit. A name that exists (deleted or not): `fail` raises SecretExistsError, `skip`
        leaves it (None in the result), `overwrite` writes its new version (a deleted one is
        refused as `put` refuses it). Each result in the order of `writes`."""


@runtime_checkable
class NameLister(Protocol):
    """Optional for a store whose `list` costs a read per secret (Vault: a metadata GET each): the
    names alone, for a caller that reads each secret anyway (the service's BatchGetSecrets, page
    after page)."""

    def list_names(self, prefix: str = "") -> list[str]:
        """Every valid secret name under `prefix`, sorted, without reading any secret's metadata.
        A deleted secret may be among them (`get` of it is NotFoundError)."""


@dataclass(frozen=True)
class CurrentRead:
    """One secret of a read of many current values (`read_current`): its current version (and
    with `fingerprints` the value's audit fingerprint), or the error a `get` of it raised: the
    NotFoundError of a secret deleted, without a current version, destroyed or gone, the
    IntegrityError that names its damaged record, or (a store read secret by secret) whatever
    ended the read there. Never both a secret and an error."""

    name: str
    secret: Secret | None = None
    fingerprint: str | None = None
    error: SecretsManagerError | None = None


@runtime_checkable
class BulkReader(Protocol):
    """Optional for a store whose storage can read many records at one instant (our encrypted
    store on SQLite and PostgreSQL): `read_current` of many secrets in a few reads of one
    snapshot, instead of a `get` each (four round trips each on PostgreSQL)."""

    def read_current(
        self, names: Sequence[str] = (), *, prefix: str | None = None, fingerprints: bool = False
    ) -> list[CurrentRead]:
        """What `read_current` (the function) returns, read at one instant; only NotFoundError
        and IntegrityError are kept in a read, anything else is raised."""


def read_current(
    store: SecretStore, names: Sequence[str] = (), *, prefix: str | None = None, fingerprints: bool = False
) -> list[CurrentRead]:
    """The current version of each of `names` (in their order), or with `prefix` of every secret
    under it that is not deleted (in name order): what `get` of each gives, with every check of
    `get` made for each. `fingerprints`: each value's audit fingerprint too (the service audits
    its reads with them; for a store that can give them). A caller takes the reads in order and
    raises a read's error where `get` of it would have raised (skipping a NotFoundError where a
    secret may vanish between list and read).

    A `BulkReader` reads them all at one instant (so a prefix is never half before and half after
    a concurrent write), keeps a NotFoundError or IntegrityError in its secret's read and raises
    anything else. Any other store lists, then gets each secret in turn, and stops at the first
    error that is not NotFoundError (kept in the last read): the reads after it are not made, as
    a loop of `get` would not make them (on a service, each is audited as read)."""
    if isinstance(store, BulkReader):
        return store.read_current(names, prefix=prefix, fingerprints=fingerprints)
    if prefix is not None:
        names = [meta.name for meta in store.list(prefix)]
    reads = []
    for name in names:
        try:
            if fingerprints:
                secret, fingerprint = store.get_with_fingerprint(name)  # type: ignore[attr-defined]
            else:
                secret, fingerprint = store.get(name), None
        except NotFoundError as exc:
            reads.append(CurrentRead(name, error=exc))
            continue
        except SecretsManagerError as exc:
            reads.append(CurrentRead(name, error=exc))
            break
        reads.append(CurrentRead(name, secret, fingerprint))
    return reads


@runtime_checkable
class AuditedStore(SecretStore, Protocol):
    """A store that also keeps the audit log's key and anchor (the `AuditAnchor` of audit/)."""

    def audit_key(self) -> bytes:
        """The secret HMAC key of the audit log, created on first use."""

    def audit_keys(self, *, reload: bool = False) -> tuple[bytes, ...]:
        """Every audit key the store keeps, oldest first (the newest is `audit_key()`), to verify
        records made before a rotation; `reload`: read again, not from this handle's cache."""

    def rotate_audit_key(self) -> int:
        """Append a new random audit key to the store's (`audit rotate-key`) in one
        compare-and-set write, and return its generation (the number of keys kept once it landed,
        not counting a rotation that lands after it)."""

    def audit_anchor(self) -> Anchor | None:
        """The newest audit record this store vouched for, or None before the first one."""

    @property
    def audit_anchor_scoped(self) -> bool:
        """Whether the anchor is kept under a scope of the host and log path (a store several
        hosts share), so that a log meets none whenever its scope is new; else it is the store's
        one anchor, and none, for a log holding signed records, means it was deleted."""

    def set_audit_anchor(
        self, anchor: Anchor, *, lock_wait: float | None = None, reset: bool = False
    ) -> None:
        """Vouch for a newer audit record. A store that serialises writers on a lock waits at
        most `lock_wait` seconds for it (None: its usual limit), then raises StoreBusyError;
        one without such a lock (Vault, AWS) ignores it."""


# Who a write in this thread or task is made for (`acting_for`): the service's caller.
_ACTING_FOR: ContextVar[str | None] = ContextVar("secrets_manager_acting_for", default=None)


@contextlib.contextmanager
def acting_for(actor: str) -> Iterator[None]:
    """Writes in this block, in this thread or task, record `actor` as their creator (a version's
    `created_by` in our store; the `secrets-manager:created-by` metadata or tag on Vault and AWS):
    the service's caller rather than the user the service runs as. One mechanism for every store."""
    token = _ACTING_FOR.set(actor)
    try:
        yield
    finally:
        _ACTING_FOR.reset(token)


def acting_actor(default: str) -> str:
    """The creator a write records: the one `acting_for` set, else the store's own `default`."""
    return _ACTING_FOR.get() or default


def checked_expiry(name: str, expires: datetime | None) -> datetime | None:
    """`expires` as every store keeps it: UTC, whole seconds (AWS tags and Vault's custom_metadata
    hold text); InvalidInputError for a time without a zone. Any time is taken, a past one too (an
    expiry learnt late, a restore): refusing those is the caller's choice."""
    if expires is None:
        return None
    if not isinstance(expires, datetime) or expires.tzinfo is None:
        raise InvalidInputError(f"the expiry of {name!r} must be a time with a zone (UTC)")
    try:
        return expires.astimezone(UTC).replace(microsecond=0)
    except OverflowError:
        raise InvalidInputError(f"the expiry of {name!r} is out of range") from None


def checked_expiry_change(
    name: str, expires: datetime | None, clear_expiry: bool
) -> tuple[datetime | None, bool]:
    """An update_metadata's expiry arguments checked (`checked_expiry`; not both a time and a
    clear), and whether they change the expiry at all."""
    expires = checked_expiry(name, expires)
    if expires is not None and clear_expiry:
        raise InvalidInputError(f"give an expiry for {name!r} or clear it, not both")
    return expires, expires is not None or clear_expiry


def format_expiry(version: int, expires: datetime) -> str:
    """The (version, time) pair as text, for a backend that keeps it in a tag or custom_metadata
    entry: `N@YYYY-MM-DDTHH:MM:SSZ` (characters AWS tags and Vault's custom_metadata take)."""
    return f"{version}@{utc_text(expires)}"


def format_target(version: int, target: str) -> str:
    """The (version, rotation target) pair as text for a backend that keeps it in a tag: `N@` and
    the target's UTF-8 in base64 (its characters are among those AWS tags take)."""
    return f"{version}@{base64.b64encode(target.encode('utf-8')).decode('ascii')}"


def parse_target(text: str | None) -> tuple[int, str] | None:
    """The pair of `format_target`; None for none, or text another tool spoilt."""
    number, sep, encoded = (text or "").partition("@")
    if not sep or not number.isascii() or not number.isdigit():
        return None
    try:
        target = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return (int(number), target) if target else None


def utc_text(moment: datetime) -> str:
    """`moment` as ISO 8601 UTC to the second, e.g. 2027-03-01T00:00:00Z; the year always has four
    digits (strftime's %Y gives "227" for year 227, which no ISO 8601 reader, `parse_expiry`
    included, takes: a typed 0227-03-01 was written, then read back as no expiry)."""
    utc = moment.astimezone(UTC) if moment.tzinfo is not None else moment  # naive: taken as UTC
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}Z"


def parse_expiry(text: str | None) -> tuple[int, datetime] | None:
    """The (version, time) pair of `format_expiry`; None for none, or text another tool spoilt."""
    if not text:
        return None
    number, sep, moment = text.partition("@")
    if not sep or not number.isascii() or not number.isdigit():
        return None
    try:
        when = datetime.strptime(moment, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(number), when


def expiry_of(pair: tuple[int, datetime] | None, version: int | None) -> datetime | None:
    """The expiry the recorded `pair` gives `version` (None unless it names that version)."""
    if pair is None or version is None or pair[0] != version:
        return None
    return pair[1]


def expiry_counts(listing: Iterable[SecretMetadata], now: datetime, within: timedelta) -> tuple[int, int]:
    """Of the secrets in `listing` not deleted: how many have a current version that has expired
    (at or before `now`), and how many one that expires after `now` but within `within`."""
    expired = expiring = 0
    for meta in listing:
        if meta.deleted is not None or meta.expires is None:
            continue
        if meta.expires <= now:
            expired += 1
        elif meta.expires <= now + within:
            expiring += 1
    return expired, expiring


def refuse_expiry_without_current(name: str, current: int | None) -> None:
    """InvalidInputError for an expiry set or cleared on a secret with no current version: an
    expiry belongs to a value."""
    if current is None:
        raise InvalidInputError(
            f"{name!r} has no current version, so no value to give an expiry; store one with "
            f"'store {name} --expires TIME'"
        )


def destroyed_current_message(name: str, number: int) -> str:
    """Why a read of NAME's current value finds none (`destroy --version` of it), and the way back
    to a readable value, in the same words on every store."""
    return (
        f"the current version ({number}) of {name!r} was destroyed; 'rollback {name} --version N' "
        f"makes an earlier version's value current, or 'store {name}' writes a new one"
    )


def refuse_if_rotating(name: str, pending: int | None, current: int | None) -> None:
    """RotationInProgressError if a rotation of `name` is in progress: `pending` on a version that is not
    current. (Pending on the current version is a finished promote on a store that moves labels
    one call at a time, as AWS does.) The message cannot name that rotation's commands, which the
    store never sees, but must ask for them: a resume without them would promote a value nothing
    has set at the target."""
    if pending is not None and pending != current:
        raise RotationInProgressError(
            f"a rotation of {name!r} is in progress (version {pending} is pending) and may still be "
            f"running; if no other rotation of {name!r} is running, finish it by running "
            f"'secrets-manager rotate {name} --resume' with the --set-command/--test-command of the "
            "rotation that started it (or its --postgres-role and --postgres; a schedule resumes its own), "
            "or drop it with "
            f"'secrets-manager rotate {name} --discard'"
        )


def refuse_unless_deleted_before(name: str, deleted: datetime | None, cutoff: datetime) -> None:
    """`destroy_secret(deleted_before=…)`: SecretStateError unless the secret was deleted before
    `cutoff` (one undeleted, or deleted again since, is not purged)."""
    if deleted is None:
        raise SecretStateError(f"secret {name!r} is not deleted (undeleted meanwhile?): not purged")
    if deleted >= cutoff:
        raise SecretStateError(
            f"secret {name!r} was deleted at {utc_text(deleted)}, not before {utc_text(cutoff)}: not purged"
        )


def refuse_if_changed(name: str, expect_current: int | None, current: int | None) -> None:
    """ConflictError if `name`'s current version is no longer `expect_current`, the one a
    rotation read to build its new value: staging it would undo the write made meanwhile."""
    if expect_current is not None and current != expect_current:
        now = "it has no current version now" if current is None else f"now version {current}"
        raise ConflictError(
            f"{name!r} changed while the rotation read it (version {expect_current}; {now}); nothing "
            "was staged and no command ran; run the rotation again"
        )


def checked_target(name: str, target: str | None) -> str | None:
    """A stage's `target` as every store keeps it: text of 1 to MAX_TARGET_BYTES bytes of UTF-8
    without NUL (AWS keeps it in a tag, base64 inside). InvalidInputError names the limit, not the
    text."""
    if target is None:
        return None
    if not isinstance(target, str) or not target or "\x00" in target or has_undecodable_bytes(target):
        raise InvalidInputError(f"the rotation target of {name!r} must be UTF-8 text without NUL")
    if len(target.encode("utf-8")) > MAX_TARGET_BYTES:
        raise InvalidInputError(
            f"the rotation target of {name!r} is longer than {MAX_TARGET_BYTES} bytes of UTF-8"
        )
    return target


def checked_expect_version(expect_version: int | None) -> None:
    """InvalidInputError unless `expect_version` (of a delete) is None or a version number."""
    if expect_version is not None and (
        not isinstance(expect_version, int) or isinstance(expect_version, bool) or expect_version < 1
    ):
        raise InvalidInputError("--expect-version of a delete is a version number, 1 or more")


def refuse_unless_current(name: str, expect_version: int | None, current: int | None) -> None:
    """ConflictError if a delete's `expect_version` is no longer `name`'s current version: a write
    landed after the caller read it, and deleting would hide that value."""
    if expect_version is not None and current != expect_version:
        raise not_current_error(name, expect_version, current)


def refuse_if_staged(name: str, expect_no_pending: bool, pending: int | None, current: int | None) -> None:
    """ConflictError if a delete's `expect_no_pending` finds a rotation of `name` in progress (the
    `pending` label on a version that is not current, as `refuse_if_rotating` counts one): it was
    staged after the caller read the secret, and deleting would hide it with the secret."""
    if expect_no_pending and pending is not None and pending != current:
        raise ConflictError(
            f"secret {name!r} has a pending version {pending} now (a rotation was staged after it was "
            "read); nothing was deleted: read it again and retry"
        )


def refuse_unless_still_current(name: str, expect_current: int | None, current: int | None) -> None:
    """ConflictError if an update_metadata's `expect_current` is no longer `name`'s current version:
    a write landed since the caller read it, and the change (an expiry for that version) would
    land on the new one."""
    if expect_current is not None and current != expect_current:
        now = "it has no current version now" if current is None else f"now version {current}"
        raise ConflictError(
            f"secret {name!r} is not at version {expect_current} ({now}); its metadata was not "
            "changed: read it again and retry"
        )


def not_current_error(name: str, expect_version: int, current: int | None) -> ConflictError:
    """The refusal of a delete whose `expect_version` is not current: `current` is."""
    now = "it has no current version now" if current is None else f"now version {current}"
    return ConflictError(
        f"secret {name!r} is not at version {expect_version} ({now}); nothing was deleted: "
        "read it again and retry"
    )


def unchecked_delete_error(name: str, error: Exception) -> OutcomeUnknownError:
    """A conditional delete made on a store without one (Vault, AWS) whose check after the delete
    failed: the secret is deleted, and whether a newer version overtook the delete is unknown."""
    return OutcomeUnknownError(
        f"secret {name!r} was deleted, but whether a newer version overtook the delete is "
        f"unknown: the check after it failed ({error}); read 'history {name}' and, if it must "
        f"stay, 'undelete {name}'"
    )


def unread_delete_error(name: str, error: Exception) -> OutcomeUnknownError:
    """A delete on Vault (no delete of a whole secret there: of the versions read) whose read after
    it failed: the secret is deleted, and whether a version written meanwhile stays is unknown."""
    return OutcomeUnknownError(
        f"secret {name!r} was deleted, but whether a version written meanwhile stays readable is "
        f"unknown: the check after it failed ({error}); read 'history {name}' and, if one is, "
        f"'delete {name}' again"
    )


def refuse_to_demote(name: str, version: int, current: int | None) -> None:
    """ConflictError if promoting `version` would demote a newer current version: one written
    after the rotation staged `version` (a `store` meanwhile). Promoting would undo that write."""
    if current is not None and current > version:
        raise ConflictError(
            f"version {current} of {name!r} was written after the rotation staged version {version}; "
            f"promoting it would undo that write, so nothing was promoted. If no other rotation of "
            f"{name!r} is running, drop it with 'secrets-manager rotate {name} --discard' and rotate again"
        )


def unknown_label(label: str) -> InvalidInputError:
    """The refusal of a label that is none of LABELS, quoting at most 64 characters of it: a
    label is the caller's, and a megabyte one was sent back whole in the error, more than the
    client accepts (it got RESOURCE_EXHAUSTED instead of this)."""
    shown = repr(label) if len(label) <= 64 else f"{label[:64]!r}... ({len(label)} characters)"
    return InvalidInputError(f"unknown label {shown}; labels are {', '.join(LABELS)}")


def checked_value(value: bytes, *, empty_supported: bool = True) -> bytes:
    """The bytes to write, after the checks every store makes (type, 64 KiB limit)."""
    if isinstance(value, SecretValue):
        value = value.reveal()
    if not isinstance(value, bytes):
        raise InvalidInputError("a secret value is bytes; encode text as UTF-8")
    if len(value) > MAX_VALUE_SIZE:
        raise InvalidInputError(f"value is {len(value)} bytes; the limit is {MAX_VALUE_SIZE} (64 KiB)")
    if not value and not empty_supported:
        raise UnsupportedOperationError(
            "an empty value is not supported by this store (AWS Secrets Manager needs a non-empty "
            "SecretString or SecretBinary); store at least one byte"
        )
    return value


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a control character (Unicode category Cc: C0, DEL and C1, which
    includes ESC, BEL, NUL, newline and tab)."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def has_undecodable_bytes(text: str) -> bool:
    """Whether `text` holds a lone surrogate (Unicode category Cs): what Python makes of a byte that
    is not UTF-8 in a command-line argument or file name. It cannot be encoded as UTF-8, so no
    store, file or response could hold it."""
    return any(unicodedata.category(char) == "Cs" for char in text)


def checked_metadata(name: str, description: str | None, tags: Mapping[str, str] | None) -> None:
    """The checks every store makes on a write's description and tags, before anything is written:
    AWS Secrets Manager's limits (description up to 2048 characters; at most 50 tags; keys of 1 to
    128 characters, values of 0 to 256) and no control characters anywhere, so metadata stays small
    enough to list and safe to print. InvalidInputError names the limit and the secret, never the
    offending text (only a tag key that is itself valid, to say which tag's value is wrong)."""
    if description is not None:
        if not isinstance(description, str):
            raise InvalidInputError(f"the description of {name!r} must be text")
        _check_text(description, f"the description of {name!r}", 0, MAX_DESCRIPTION_LENGTH)
    if tags is None:
        return
    if not isinstance(tags, Mapping):
        raise InvalidInputError(f"the tags of {name!r} must be a mapping of text to text")
    if len(tags) > MAX_TAGS:
        raise InvalidInputError(f"{name!r} would have {len(tags)} tags; the limit is {MAX_TAGS}")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInputError(f"the tags of {name!r} must be a mapping of text to text")
        _check_text(key, f"a tag key of {name!r}", 1, MAX_TAG_KEY_LENGTH)
        if key.startswith(RESERVED_TAG_PREFIX) or key.lower().startswith(AWS_RESERVED_TAG_PREFIX):
            raise InvalidInputError(
                f"tag {key!r} of {name!r} is not allowed: tag keys must not start with "
                f"{RESERVED_TAG_PREFIX!r} (reserved for secrets-manager's own metadata) or "
                f"{AWS_RESERVED_TAG_PREFIX!r} (reserved by AWS)"
            )
        _check_text(value, f"the value of tag {key!r} of {name!r}", 0, MAX_TAG_VALUE_LENGTH)


def checked_max_versions(name: str, max_versions: int | None) -> None:
    """InvalidInputError unless `max_versions` is None (unchanged) or MIN_MAX_VERSIONS to
    MAX_MAX_VERSIONS; checked by every store before anything is written."""
    if max_versions is None:
        return
    if not isinstance(max_versions, int) or isinstance(max_versions, bool):
        raise InvalidInputError(f"max versions of {name!r} must be a whole number")
    if not MIN_MAX_VERSIONS <= max_versions <= MAX_MAX_VERSIONS:
        raise InvalidInputError(
            f"max versions of {name!r} cannot be {max_versions}; give {MIN_MAX_VERSIONS} to "
            f"{MAX_MAX_VERSIONS} (current and previous are always kept)"
        )


def checked_metadata_update(
    name: str,
    description: str | None,
    set_tags: Mapping[str, str] | None,
    remove_tags: Iterable[str],
    max_versions: int | None = None,
    *,
    expiry_change: bool = False,
) -> tuple[dict[str, str], frozenset[str]]:
    """The checks of an `update_metadata` before anything is read: something to change, each
    tag key set or removed (not both), and the limits of `checked_metadata` and
    `checked_max_versions` on what is given. Returns the tags to set and the keys to remove."""
    setting = dict(set_tags or {})
    checked_metadata(name, description, setting)
    checked_max_versions(name, max_versions)
    removing = frozenset(remove_tags)
    for key in removing:
        if not isinstance(key, str):
            raise InvalidInputError(f"the tag keys to remove from {name!r} must be text")
        _check_text(key, f"a tag key to remove from {name!r}", 1, MAX_TAG_KEY_LENGTH)
        if key.startswith(RESERVED_TAG_PREFIX) or key.lower().startswith(AWS_RESERVED_TAG_PREFIX):
            raise InvalidInputError(f"tag {key!r} of {name!r} is reserved and cannot be removed")
    both = sorted(removing & setting.keys())
    if both:
        raise InvalidInputError(f"tag {both[0]!r} of {name!r} is both set and removed; give one or the other")
    if description is None and not setting and not removing and max_versions is None and not expiry_change:
        raise NothingToChangeError(
            f"nothing to change for {name!r}: give a description, tags to set or to remove, max "
            "versions or an expiry"
        )
    return setting, removing


def refuse_if_unchanged(
    name: str,
    before: tuple[str, Mapping[str, str], int | None],
    after: tuple[str, Mapping[str, str]],
    max_versions: int | None,
    *,
    expiry_changes: bool = False,
) -> None:
    """NothingToChangeError if an `update_metadata` leaves `name` as it is (`expiry_changes`: the
    expiry recorded moves, which is a change): its (description,
    tags) `after` as `before`, and `max_versions` not given or what it is (`before[2]`; None when
    the store cannot tell, as a Vault secret on its mount's default). Checked on what the update
    read, so nothing is written, `updated` does not move and no change event is sent."""
    description, tags, max_now = before
    if (
        not expiry_changes
        and after[0] == description
        and dict(after[1]) == dict(tags)
        and (max_versions is None or max_versions == max_now)
    ):
        raise NothingToChangeError(
            f"nothing to change for {name!r}: its description, tags and max versions are already as "
            "given (a tag to remove that it does not have is none to remove)"
        )


def updated_metadata(
    name: str,
    description: str,
    tags: Mapping[str, str],
    *,
    new_description: str | None,
    set_tags: Mapping[str, str],
    remove_tags: frozenset[str],
) -> tuple[str, dict[str, str]]:
    """A secret's description and tags after an `update_metadata`: the tags given were checked
    already; the count may not grow past MAX_TAGS (a secret that another tool gave more, as Vault
    allows, can still lose some)."""
    merged = {key: value for key, value in tags.items() if key not in remove_tags} | dict(set_tags)
    result = description if new_description is None else new_description
    checked_metadata(name, result, None)
    if len(merged) > MAX_TAGS and len(merged) > len(tags):  # one written elsewhere may shrink
        raise InvalidInputError(f"{name!r} would have {len(merged)} tags; the limit is {MAX_TAGS}")
    return result, merged


def _check_text(text: str, what: str, shortest: int, longest: int) -> None:
    """`what` (a description, tag key or value) is `shortest`..`longest` characters of printable
    text; the message names it and the limit, never the text."""
    if not shortest <= len(text) <= longest:
        bounds = f"the limit is {longest}" if shortest == 0 else f"it must be {shortest} to {longest}"
        raise InvalidInputError(f"{what} is {len(text)} characters; {bounds}")
    if has_undecodable_bytes(text):
        raise InvalidInputError(
            f"{what} holds a byte that is not UTF-8 (text from a Latin-1 terminal or file?); give it "
            "as UTF-8 text"
        )
    if has_control_characters(text):
        raise InvalidInputError(
            f"{what} contains a control character (such as a newline, tab or escape); it must be "
            "printable text on one line"
        )
