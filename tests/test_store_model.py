"""Every `SecretStore` against a reference model: hypothesis drives random sequences of the store
operations (`StoreMachine`) on a real store and compares, after each,
what the store answered and holds with what a small model of the documented contract says.

The model (`ModelSecret`, `Model`) is written from the contract (store/base.py's docstrings,
store/testing.py's checks, docs/stores.md), not from any store's code: a few dicts per secret
(its versions, the three labels, deleted or not, description, tags, max_versions, the one
(version, expiry) pair, each version's rotation target). An error is an answer too: the model
names the error class each refusal must raise, and a refused operation must change nothing.

Where the stores documentedly differ, the model is told by `Traits` (each from the store's own
declarations: `unsupported_capabilities`, `max_versions_hide_at_once`, and docs/stores.md):

- a lacking `Capability` (Vault: the `pending` label; AWS: destroying one version, an empty value,
  purge): the operation is UnsupportedOperationError, nothing changed;
- `max_versions` on AWS only hides what we show (the newest N and every labelled version), at
  once, and a higher N shows them again; elsewhere each write removes the oldest unlabelled
  versions past it, for good;
- on Vault, `put(max_versions=N)` sets N after its write (no compare-and-set on KV metadata), so
  that write prunes under the old limit and the next under N;
- AWS's `deleted` is the date AWS will erase the secret: compared as deleted or not;
- Vault keeps a deletion in its versions alone (docs/stores.md, `destroy --version N`): a secret
  whose every version is destroyed cannot be deleted, nor a deleted one's last versions destroyed;
- through the service (`RemoteStore`), destroy is not offered, and a delete on condition of no
  rotation must name the version read too (InvalidInputError, nothing asked).

Operations: put (with and without compare-and-set, description, tags, max_versions, expiry), get
(current, by number, by label), list (prefixes, deleted or not), describe, read_current, delete
(plain, `expect_version`, `expect_no_pending`), undelete, destroy (versions), destroy_secret
(and purge's `deleted_before`), stage (`expect_current`, `target`), promote, discard_pending, a
whole rotation, update_metadata (description, tags set and removed, max_versions, expiry set
and cleared, `expect_current`). Not here: put_batch, the audit key and anchor, keys.

Two handles on one store (as two processes would hold) take turns at random: a write through one
must be what the other reads next (caches may not answer stale). Each example works in a
namespace of its own. Runs are bounded (`settings` below) so the file runs in about a minute.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from secrets_manager.client import RemoteStore
from secrets_manager.crypto import kdf
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    NothingToChangeError,
    RotationInProgressError,
    SecretStateError,
    UnsupportedOperationError,
)
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.base import (
    CURRENT,
    DEFAULT_MAX_VERSIONS,
    PENDING,
    PREVIOUS,
    Capability,
    Secret,
    SecretMetadata,
    SecretStore,
    max_versions_hide_at_once,
    read_current,
    unsupported_capabilities,
)
from secrets_manager.store.vault import VaultStore, connect_vault, retrying_session
from vault_server import FakeVault

PASSWORD = "correct horse battery staple"
ACTOR = "model-tester"

# The names an example uses, under its namespace: "a" is a prefix of "ab" and a folder of "a/b".
LEAVES = ("a", "a/b", "ab", "b")
VALUES = (b"v", b"two", b"", b"\xff\x00 binary", "ü text".encode())
DESCRIPTIONS = ("", "the exchange key", "ünï desc")
TAG_KEYS = ("team", "env", "owner")
TAG_VALUES = ("ops", "dev", "x y")
EXPIRIES = (datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2035, 6, 7, 8, 9, 10, tzinfo=UTC))
TARGETS = ("postgres-role:app", "postgres-role:ünï/@=+")

# The error families the model names; a store's answer is classed by the first it is an instance of.
ERROR_FAMILIES: tuple[type[Exception], ...] = (
    NothingToChangeError,
    UnsupportedOperationError,
    InvalidInputError,
    SecretStateError,
    RotationInProgressError,
    ConflictError,
    NotFoundError,
)


def family(error: BaseException) -> str:
    for kind in ERROR_FAMILIES:
        if isinstance(error, kind):
            return kind.__name__
    return f"unexpected {type(error).__name__}"


class Refused(Exception):
    """What the model says a refused operation raises: the error class's name."""

    def __init__(self, kind: type[Exception]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind.__name__


# ---- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traits:
    """How a store documentedly differs from the encrypted store (module docstring)."""

    name: str
    pending_label: bool = True
    destroy_version: bool = True
    empty_value: bool = True
    purge_deleted: bool = True
    hide_at_once: bool = False
    max_versions_after_write: bool = False
    # Vault: KV v2 keeps no deleted flag, a secret is deleted while every version not destroyed
    # is soft-deleted (docs/stores.md); so a secret whose every version is destroyed cannot be
    # deleted, and the last such versions of a deleted one cannot be destroyed (SecretStateError)
    deleted_in_versions: bool = False
    # AWS (README, Expiry): a long-lived handle serves the current version's expiry tag it saw in
    # the last 60 s instead of a DescribeSecret, so an expiry set or cleared through another
    # handle on the version already current may read as before, until this handle writes it
    expiry_seen_window: bool = False
    # RemoteStore (client/remote.py): the service offers neither destroy (InvalidInputError: run
    # it on the server's store), and a delete on condition of no pending version must name the
    # version read too (DeleteSecretIfUnchanged; InvalidInputError without it, nothing asked)
    destroy_offered: bool = True
    no_pending_needs_version: bool = False

    @classmethod
    def of(cls, name: str, store: SecretStore) -> Traits:
        lacking = unsupported_capabilities(store)
        return cls(
            name=name,
            pending_label=Capability.PENDING_LABEL not in lacking,
            destroy_version=Capability.DESTROY_VERSION not in lacking,
            empty_value=Capability.EMPTY_VALUE not in lacking,
            purge_deleted=Capability.PURGE_DELETED not in lacking,
            hide_at_once=max_versions_hide_at_once(store),
            max_versions_after_write=isinstance(store, VaultStore),
            deleted_in_versions=isinstance(store, VaultStore),
            expiry_seen_window=isinstance(store, AwsStore),
            destroy_offered=not isinstance(store, RemoteStore),
            no_pending_needs_version=isinstance(store, RemoteStore),
        )


@dataclass
class ModelVersion:
    value: bytes
    destroyed: bool = False
    target: str | None = None


@dataclass
class ModelSecret:
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    highest: int = 0
    current: int | None = None
    previous: int | None = None
    pending: int | None = None
    deleted: bool = False
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    max_versions: int = DEFAULT_MAX_VERSIONS
    expiry: tuple[int, datetime] | None = None

    def labels(self) -> dict[str, int]:
        held = {CURRENT: self.current, PREVIOUS: self.previous, PENDING: self.pending}
        return {label: version for label, version in held.items() if version is not None}

    def labels_of(self, version: int) -> list[str]:
        return sorted(label for label, held in self.labels().items() if held == version)

    def labelled(self) -> set[int]:
        return set(self.labels().values())


class Model:
    """The documented contract, on plain dicts. Each operation returns what the store must answer
    or raises `Refused` with the error it must raise, changing nothing."""

    def __init__(self, traits: Traits) -> None:
        self.traits = traits
        self.secrets: dict[str, ModelSecret] = {}

    # -- views -------------------------------------------------------------------------------

    def shown(self, secret: ModelSecret) -> list[int]:
        """The versions a describe shows and a get by number finds."""
        numbers = sorted(secret.versions)
        if self.traits.hide_at_once:  # the newest max_versions, and every labelled one
            newest = set(numbers[-secret.max_versions :])
            return sorted(newest | (secret.labelled() & set(numbers)))
        return numbers

    def metadata(self, name: str) -> dict[str, Any]:
        secret = self.secrets[name]
        expires = None
        if secret.expiry is not None and secret.expiry[0] == secret.current:
            expires = secret.expiry[1]
        return {
            "name": name,
            "namespace": name.split("/", 1)[0],
            "description": secret.description,
            "tags": dict(secret.tags),
            "current_version": secret.current,
            "versions": [
                (number, secret.labels_of(number), secret.versions[number].destroyed)
                for number in self.shown(secret)
            ],
            "deleted": secret.deleted,
            "max_versions": secret.max_versions,
            "labels": secret.labels(),
            "expires": expires,
        }

    def live(self, name: str) -> ModelSecret:
        """The secret, for a change: NotFoundError if missing, SecretStateError if deleted."""
        secret = self.secrets.get(name)
        if secret is None:
            raise Refused(NotFoundError)
        if secret.deleted:
            raise Refused(SecretStateError)
        return secret

    def _prune(self, secret: ModelSecret, limit: int) -> None:
        """Our stores and Vault: the oldest unlabelled versions past `limit` go, for good."""
        if self.traits.hide_at_once:
            return
        while len(secret.versions) > limit:
            unlabelled = [number for number in sorted(secret.versions) if number not in secret.labelled()]
            if not unlabelled:
                return
            del secret.versions[unlabelled[0]]

    def _checked_value(self, value: bytes) -> None:
        if not value and not self.traits.empty_value:
            raise Refused(UnsupportedOperationError)

    # -- operations --------------------------------------------------------------------------

    def put(
        self,
        name: str,
        value: bytes,
        expect_version: int | None,
        description: str | None,
        tags: dict[str, str] | None,
        max_versions: int | None,
        expires: datetime | None,
    ) -> dict[str, Any]:
        if max_versions is not None and not 2 <= max_versions <= 100:
            raise Refused(InvalidInputError)
        self._checked_value(value)
        secret = self.secrets.get(name)
        if secret is not None and secret.deleted:
            raise Refused(SecretStateError)
        current = None if secret is None else secret.current
        if expect_version is not None and expect_version != (current or 0):
            raise Refused(ConflictError)
        if secret is None:
            secret = self.secrets[name] = ModelSecret()
        number = secret.highest + 1
        secret.highest = number
        secret.versions[number] = ModelVersion(value)
        secret.previous, secret.current = secret.current, number
        if description is not None:
            secret.description = description
        if tags is not None:
            secret.tags = dict(tags)
        if expires is not None:
            secret.expiry = (number, expires)
        if max_versions is not None and not self.traits.max_versions_after_write:
            secret.max_versions = max_versions
        self._prune(secret, secret.max_versions)
        if max_versions is not None:
            secret.max_versions = max_versions
        return {"version": number, "labels": [CURRENT]}

    def get(self, name: str, version: int | None, label: str | None) -> dict[str, Any]:
        if label is not None and (label not in (CURRENT, PREVIOUS, PENDING) or version is not None):
            raise Refused(InvalidInputError)  # an unknown label, or a version and a label at once
        if label == PENDING and not self.traits.pending_label:
            raise Refused(UnsupportedOperationError)
        secret = self.secrets.get(name)
        if secret is None or secret.deleted:
            raise Refused(NotFoundError)
        if label is not None:
            version = secret.labels().get(label)
        elif version is None:
            version = secret.current
        if version is None or version not in self.shown(secret) or secret.versions[version].destroyed:
            raise Refused(NotFoundError)
        expires = None
        if secret.expiry is not None and secret.expiry[0] == version:
            expires = secret.expiry[1]
        return {
            "name": name,
            "version": version,
            "value": secret.versions[version].value,
            "labels": secret.labels_of(version),
            "expires": expires,
            "target": secret.versions[version].target,
        }

    def list(self, prefix: str, include_deleted: bool) -> list[dict[str, Any]]:
        return [
            self.metadata(name)
            for name in sorted(self.secrets)
            if name.startswith(prefix) and (include_deleted or not self.secrets[name].deleted)
        ]

    def describe(self, name: str) -> dict[str, Any]:
        if name not in self.secrets:
            raise Refused(NotFoundError)
        return self.metadata(name)

    def delete(self, name: str, expect_version: int | None, expect_no_pending: bool) -> None:
        if expect_no_pending and expect_version is None and self.traits.no_pending_needs_version:
            raise Refused(InvalidInputError)
        secret = self.secrets.get(name)
        if secret is None or secret.deleted:
            raise Refused(NotFoundError)
        undestroyed = [number for number, version in secret.versions.items() if not version.destroyed]
        if self.traits.deleted_in_versions and not undestroyed:
            raise Refused(SecretStateError)
        if expect_version is not None and expect_version != secret.current:
            raise Refused(ConflictError)
        if expect_no_pending and secret.pending is not None and secret.pending != secret.current:
            raise Refused(ConflictError)
        secret.deleted = True

    def undelete(self, name: str) -> None:
        secret = self.secrets.get(name)
        if secret is None:
            raise Refused(NotFoundError)
        if not secret.deleted:
            raise Refused(SecretStateError)
        secret.deleted = False

    def destroy(self, name: str, versions: list[int]) -> None:
        if not self.traits.destroy_offered:
            raise Refused(InvalidInputError)
        if not self.traits.destroy_version:
            raise Refused(UnsupportedOperationError)
        if not versions:
            raise Refused(InvalidInputError)
        secret = self.secrets.get(name)
        if secret is None:
            raise Refused(NotFoundError)
        if any(number not in self.shown(secret) for number in versions):
            raise Refused(NotFoundError)
        undestroyed = {number for number, version in secret.versions.items() if not version.destroyed}
        if self.traits.deleted_in_versions and secret.deleted and undestroyed <= set(versions):
            raise Refused(SecretStateError)
        for number in versions:
            secret.versions[number].destroyed = True

    def destroy_secret(self, name: str, deleted_before: str | None) -> None:
        if not self.traits.destroy_offered:
            raise Refused(InvalidInputError)
        if deleted_before is not None and not self.traits.purge_deleted:
            raise Refused(UnsupportedOperationError)
        secret = self.secrets.get(name)
        if secret is None:
            raise Refused(NotFoundError)
        if deleted_before == "past" or (deleted_before == "future" and not secret.deleted):
            raise Refused(SecretStateError)
        del self.secrets[name]

    def stage(
        self, name: str, value: bytes, expect_current: int | None, target: str | None
    ) -> dict[str, Any]:
        if not self.traits.pending_label:
            raise Refused(UnsupportedOperationError)
        self._checked_value(value)
        if target is not None and not target:
            raise Refused(InvalidInputError)  # checked_target: 1 to 128 bytes
        secret = self.live(name)
        if secret.pending is not None and secret.pending != secret.current:
            raise Refused(RotationInProgressError)
        if expect_current is not None and expect_current != secret.current:
            raise Refused(ConflictError)
        number = secret.highest + 1
        secret.highest = number
        secret.versions[number] = ModelVersion(value, target=target)
        secret.pending = number
        self._prune(secret, secret.max_versions)
        return {"version": number, "labels": [PENDING]}

    def promote(self, name: str, version: int) -> int | None:
        if not self.traits.pending_label:
            raise Refused(UnsupportedOperationError)
        secret = self.live(name)
        if secret.pending != version or secret.versions[version].destroyed:
            raise Refused(ConflictError)  # a destroyed pending version has no value to make current
        if secret.current is not None and secret.current > version:
            raise Refused(ConflictError)
        old = secret.current
        secret.previous, secret.current, secret.pending = old, version, None
        return old

    def discard_pending(self, name: str) -> int:
        if not self.traits.pending_label:
            raise Refused(UnsupportedOperationError)
        secret = self.live(name)
        if secret.pending is None:
            raise Refused(NotFoundError)
        discarded, secret.pending = secret.pending, None
        return discarded

    def update_metadata(
        self,
        name: str,
        description: str | None,
        set_tags: dict[str, str],
        remove_tags: list[str],
        max_versions: int | None,
        expires: datetime | None,
        clear_expiry: bool,
        expect_current: int | None,
    ) -> None:
        expiry_given = expires is not None or clear_expiry
        if max_versions is not None and not 2 <= max_versions <= 100:
            raise Refused(InvalidInputError)
        if set(set_tags) & set(remove_tags):
            raise Refused(InvalidInputError)
        if (
            description is None
            and not set_tags
            and not remove_tags
            and max_versions is None
            and not expiry_given
        ):
            raise Refused(NothingToChangeError)
        secret = self.live(name)
        if expect_current is not None and expect_current != secret.current:
            raise Refused(ConflictError)
        tags = {key: value for key, value in secret.tags.items() if key not in remove_tags} | set_tags
        new_description = secret.description if description is None else description
        # An expiry is the current version's: a clear forgets only that one (another version's,
        # which a rollback carries, stays), and an expiry set or cleared as it already is, is no
        # change (refuse_if_unchanged: "the expiry recorded moves").
        expiry = secret.expiry
        if expires is not None:
            assert secret.current is not None
            expiry = (secret.current, expires)
        elif clear_expiry and expiry is not None and expiry[0] == secret.current:
            expiry = None
        expiry_change = expiry != secret.expiry
        if (
            not expiry_change
            and new_description == secret.description
            and tags == secret.tags
            and (max_versions is None or max_versions == secret.max_versions)
        ):
            raise Refused(NothingToChangeError)
        secret.description, secret.tags = new_description, tags
        if max_versions is not None:
            secret.max_versions = max_versions
        secret.expiry = expiry


# ---- what a store answered, in the model's terms -----------------------------------------------


def metadata_view(meta: SecretMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "namespace": meta.namespace,
        "description": meta.description,
        "tags": dict(meta.tags),
        "current_version": meta.current_version,
        "versions": [(info.version, sorted(info.labels), info.destroyed) for info in meta.versions],
        "deleted": meta.deleted is not None,
        "max_versions": meta.max_versions,
        "labels": dict(meta.labels),
        "expires": meta.expires,
    }


def secret_view(secret: Secret) -> dict[str, Any]:
    return {
        "name": secret.name,
        "version": secret.version,
        "value": secret.value.reveal(),
        "labels": sorted(secret.labels),
        "expires": secret.expires,
        "target": secret.target,
    }


def answered(action: Callable[[], Any], view: Callable[[Any], Any] = lambda result: result) -> Any:
    """What the store answered: its result through `view`, or ("error", the error's family)."""
    try:
        result = action()
    except Exception as exc:  # every answer is compared, unexpected ones too
        return ("error", family(exc), str(exc)[:300])
    return view(result)


def expected(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Refused as refused:
        return ("error", refused.kind)


def same(store_answer: Any, model_answer: Any) -> bool:
    if isinstance(model_answer, tuple) and model_answer[:1] == ("error",):
        return isinstance(store_answer, tuple) and store_answer[:2] == model_answer
    return bool(store_answer == model_answer)


# ---- the state machine -------------------------------------------------------------------------

# How often each operation met each outcome in this process (printed by run_machine, `-s` shows
# it): a rule whose operations were always refused would test little.
OUTCOMES: Counter[str] = Counter()

HANDLES = st.sampled_from(("A", "B"))
LEAF = st.sampled_from((*LEAVES, "a", "a"))  # "a" more often: longer histories
VALUE = st.sampled_from(VALUES)
# A version number, or one the model knows ("oldest" kept, "highest" written), resolved per step.
SMALL_VERSION = st.one_of(st.integers(min_value=0, max_value=14), st.sampled_from(("oldest", "highest")))
TAGS = st.dictionaries(st.sampled_from(TAG_KEYS), st.sampled_from(TAG_VALUES), max_size=2)
MAX_VERSIONS = st.sampled_from((1, 2, 2, 3, 3, 5, DEFAULT_MAX_VERSIONS))  # 1 is refused
# How a call names the version it expects: None, the right one (what the model holds), or a number.
EXPECT = st.one_of(st.none(), st.just("right"), st.integers(min_value=0, max_value=6))


class StoreMachine(RuleBasedStateMachine):
    """Set up by `machine_for`: `handles` (two on one store) and `traits`."""

    handles: dict[str, SecretStore]
    traits: Traits
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).runs += 1
        self.ns = f"model{type(self).runs}-{secrets.token_hex(3)}"
        self.model = Model(self.traits)
        self.checks = 0
        # Per handle: the names whose current expiry it may read as it saw it (expiry_seen_window)
        self.expiry_seen: dict[str, set[str]] = {"A": set(), "B": set()}

    def name(self, leaf: str) -> str:
        return f"{self.ns}/{leaf}"

    def expect(self, name: str, choice: int | str | None, *, missing: int | None = 0) -> int | None:
        if choice != "right":
            return choice if not isinstance(choice, str) else None
        secret = self.model.secrets.get(name)
        return missing if secret is None else secret.current

    def version(self, name: str, choice: int | str) -> int:
        secret = self.model.secrets.get(name)
        if isinstance(choice, int):
            return choice
        if secret is None or not secret.versions:
            return 1
        return min(secret.versions) if choice == "oldest" else secret.highest

    def check(self, what: str, store_answer: Any, model_answer: Any) -> None:
        outcome = model_answer[1] if isinstance(model_answer, tuple) else "ok"
        event(f"{what.split('(', 1)[0]}: {outcome}")
        OUTCOMES[f"{what.split('(', 1)[0]}: {outcome}"] += 1
        if not same(store_answer, model_answer):
            raise AssertionError(
                f"{self.traits.name}: {what}\n  store answered: {store_answer!r}\n"
                f"  model says:     {model_answer!r}"
            )

    # -- writes ------------------------------------------------------------------------------

    @rule(
        handle=HANDLES,
        leaf=LEAF,
        value=VALUE,
        expect=EXPECT,
        description=st.one_of(st.none(), st.sampled_from(DESCRIPTIONS)),
        tags=st.one_of(st.none(), TAGS),
        max_versions=st.one_of(st.none(), MAX_VERSIONS),
        expires=st.one_of(st.none(), st.sampled_from(EXPIRIES)),
    )
    def put(
        self,
        handle: str,
        leaf: str,
        value: bytes,
        expect: int | str | None,
        description: str | None,
        tags: dict[str, str] | None,
        max_versions: int | None,
        expires: datetime | None,
    ) -> None:
        name = self.name(leaf)
        expect_version = self.expect(name, expect)
        store = self.handles[handle]
        got = answered(
            lambda: store.put(
                name,
                value,
                expect_version=expect_version,
                description=description,
                tags=tags,
                max_versions=max_versions,
                expires=expires,
            ),
            lambda info: {"version": info.version, "labels": sorted(info.labels)},
        )
        want = expected(
            lambda: self.model.put(name, value, expect_version, description, tags, max_versions, expires)
        )
        self.check(f"put({name!r}, expect_version={expect_version}) via {handle}", got, want)
        if not isinstance(want, tuple):
            self.expiry_seen[handle].discard(name)  # a write through a handle forgets what it saw

    @rule(handle=HANDLES, leaf=LEAF, value=VALUE)
    def put_plain(self, handle: str, leaf: str, value: bytes) -> None:
        """A write with nothing else (the commonest): sequences reach many versions."""
        self.put(handle, leaf, value, None, None, None, None, None)

    @rule(handle=HANDLES, leaf=LEAF, expect=EXPECT, expect_no_pending=st.booleans())
    def delete(self, handle: str, leaf: str, expect: int | str | None, expect_no_pending: bool) -> None:
        name = self.name(leaf)
        expect_version = self.expect(name, expect, missing=1)
        if expect_version == 0:
            expect_version = None  # a delete's expect_version is a version number (checked_expect_version)
        store = self.handles[handle]
        got = answered(
            lambda: store.delete(name, expect_version=expect_version, expect_no_pending=expect_no_pending)
        )
        want = expected(lambda: self.model.delete(name, expect_version, expect_no_pending))
        self.check(f"delete({name!r}, {expect_version=}, {expect_no_pending=}) via {handle}", got, want)

    @rule(handle=HANDLES, leaf=LEAF)
    def undelete(self, handle: str, leaf: str) -> None:
        name = self.name(leaf)
        got = answered(lambda: self.handles[handle].undelete(name))
        self.check(f"undelete({name!r}) via {handle}", got, expected(lambda: self.model.undelete(name)))

    @rule(handle=HANDLES, leaf=LEAF, versions=st.lists(SMALL_VERSION, min_size=1, max_size=2) | st.just([]))
    def destroy(self, handle: str, leaf: str, versions: list[int | str]) -> None:
        name = self.name(leaf)
        versions = sorted({self.version(name, choice) for choice in versions})
        got = answered(lambda: self.handles[handle].destroy(name, versions))
        want = expected(lambda: self.model.destroy(name, versions))
        self.check(f"destroy({name!r}, {versions}) via {handle}", got, want)

    @rule(handle=HANDLES, leaf=LEAF, spare_newest=st.booleans())
    def destroy_every_version(self, handle: str, leaf: str, spare_newest: bool) -> None:
        """Every version the model shows (or all but the newest) at once: random lists of one or
        two numbers seldom reach a secret with no value left, deleted or not."""
        name = self.name(leaf)
        secret = self.model.secrets.get(name)
        shown = self.model.shown(secret) if secret is not None else [1]
        self.destroy(handle, leaf, shown[:-1] if spare_newest and len(shown) > 1 else shown)

    @rule(handle=HANDLES, leaf=LEAF, purge=st.sampled_from((None, None, "future", "past")))
    def destroy_secret(self, handle: str, leaf: str, purge: str | None) -> None:
        name = self.name(leaf)
        cutoffs = {
            None: None,
            "future": datetime.now(UTC) + timedelta(days=1),
            "past": datetime(2001, 1, 1, tzinfo=UTC),
        }
        cutoff = cutoffs[purge]
        got = answered(lambda: self.handles[handle].destroy_secret(name, deleted_before=cutoff))
        want = expected(lambda: self.model.destroy_secret(name, purge))
        self.check(f"destroy_secret({name!r}, deleted_before={purge}) via {handle}", got, want)

    @rule(
        handle=HANDLES,
        leaf=LEAF,
        value=VALUE,
        expect=st.one_of(st.none(), st.just("right"), st.integers(min_value=1, max_value=6)),
        aim=st.one_of(st.none(), st.sampled_from((*TARGETS, ""))),
    )
    def stage(self, handle: str, leaf: str, value: bytes, expect: int | str | None, aim: str | None) -> None:
        target = aim  # `target` is hypothesis's own argument of `rule`
        name = self.name(leaf)
        expect_current = self.expect(name, expect, missing=None)
        store = self.handles[handle]
        got = answered(
            lambda: store.stage(name, value, expect_current=expect_current, target=target),
            lambda info: {"version": info.version, "labels": sorted(info.labels)},
        )
        want = expected(lambda: self.model.stage(name, value, expect_current, target))
        self.check(f"stage({name!r}, {expect_current=}, {target=}) via {handle}", got, want)

    @rule(handle=HANDLES, leaf=LEAF, which=st.sampled_from(("pending", "pending", "current", "other")))
    def promote(self, handle: str, leaf: str, which: str) -> None:
        name = self.name(leaf)
        secret = self.model.secrets.get(name)
        version = 1
        if secret is not None:
            chosen = {"pending": secret.pending, "current": secret.current, "other": secret.highest}[which]
            version = chosen if chosen is not None else secret.highest
        got = answered(lambda: self.handles[handle].promote(name, version))
        want = expected(lambda: self.model.promote(name, version))
        self.check(f"promote({name!r}, {version}) via {handle}", got, want)

    @rule(handle=HANDLES, other=HANDLES, leaf=LEAF, value=VALUE)
    def rotate(self, handle: str, other: str, leaf: str, value: bytes) -> None:
        """A whole rotation, stage through one handle and promote through the other (as a resume
        in another process would), so sequences reach the states after a promote."""
        self.stage(handle, leaf, value, "right", None)
        secret = self.model.secrets.get(self.name(leaf))
        if secret is not None and secret.pending is not None:
            self.promote(other, leaf, "pending")

    @rule(handle=HANDLES, leaf=LEAF)
    def discard_pending(self, handle: str, leaf: str) -> None:
        name = self.name(leaf)
        got = answered(lambda: self.handles[handle].discard_pending(name))
        want = expected(lambda: self.model.discard_pending(name))
        self.check(f"discard_pending({name!r}) via {handle}", got, want)

    @rule(
        handle=HANDLES,
        leaf=LEAF,
        description=st.one_of(st.none(), st.sampled_from(DESCRIPTIONS)),
        set_tags=TAGS,
        remove_tags=st.lists(st.sampled_from(TAG_KEYS), max_size=2, unique=True),
        max_versions=st.one_of(st.none(), MAX_VERSIONS),
        expiry=st.sampled_from((None, None, "clear", EXPIRIES[0], EXPIRIES[1])),
        expect=st.one_of(st.none(), st.just("right"), st.integers(min_value=1, max_value=6)),
        clash=st.sampled_from((False, False, False, True)),
    )
    def update_metadata(
        self,
        handle: str,
        leaf: str,
        description: str | None,
        set_tags: dict[str, str],
        remove_tags: list[str],
        max_versions: int | None,
        expiry: datetime | str | None,
        expect: int | str | None,
        clash: bool,
    ) -> None:
        name = self.name(leaf)
        if not clash:  # a tag both set and removed is InvalidInputError: now and then
            remove_tags = [key for key in remove_tags if key not in set_tags]
        expect_current = self.expect(name, expect, missing=None)
        expires = expiry if isinstance(expiry, datetime) else None
        clear = expiry == "clear"
        got = answered(
            lambda: self.handles[handle].update_metadata(
                name,
                description=description,
                set_tags=set_tags,
                remove_tags=remove_tags,
                max_versions=max_versions,
                expires=expires,
                clear_expiry=clear,
                expect_current=expect_current,
            )
        )
        want = expected(
            lambda: self.model.update_metadata(
                name, description, set_tags, remove_tags, max_versions, expires, clear, expect_current
            )
        )
        self.check(
            f"update_metadata({name!r}, {description=}, {set_tags=}, {remove_tags=}, {max_versions=}, "
            f"{expiry=}, {expect_current=}) via {handle}",
            got,
            want,
        )
        if want is None:
            self.expiry_seen[handle].discard(name)
            if expiry is not None and self.traits.expiry_seen_window:
                self.expiry_seen["B" if handle == "A" else "A"].add(name)

    # -- reads -------------------------------------------------------------------------------

    @rule(
        handle=HANDLES,
        leaf=LEAF,
        version=st.one_of(st.none(), SMALL_VERSION),
        label=st.sampled_from((None, None, None, CURRENT, PREVIOUS, PENDING, "latest")),
        both=st.sampled_from((False, False, False, True)),
    )
    def get(self, handle: str, leaf: str, version: int | str | None, label: str | None, both: bool) -> None:
        name = self.name(leaf)
        version = None if version is None else self.version(name, version)
        if version is not None and label is not None and not both:
            label = None  # a version and a label at once (InvalidInputError) now and then
        got = answered(lambda: self.handles[handle].get(name, version=version, label=label), secret_view)
        want = expected(lambda: self.model.get(name, version, label))
        if (
            name in self.expiry_seen[handle]
            and version is None
            and label in (None, CURRENT)
            and isinstance(got, dict)
            and isinstance(want, dict)
        ):
            want["expires"] = got["expires"]  # the documented window: as seen before, or as now
        self.check(f"get({name!r}, {version=}, {label=}) via {handle}", got, want)

    @rule(
        handle=HANDLES,
        prefix=st.sampled_from(("", "a", "a/", "ab", "b", "c")),
        include_deleted=st.booleans(),
    )
    def list(self, handle: str, prefix: str, include_deleted: bool) -> None:
        full = f"{self.ns}/{prefix}"
        got = answered(
            lambda: self.handles[handle].list(full, include_deleted=include_deleted),
            lambda listing: [metadata_view(meta) for meta in listing],
        )
        want = expected(lambda: self.model.list(full, include_deleted))
        self.check(f"list({full!r}, {include_deleted=}) via {handle}", got, want)

    @rule(handle=HANDLES, prefix=st.sampled_from(("", "a", "b")))
    def read_current(self, handle: str, prefix: str) -> None:
        """Many current values at once (`read_current`: one snapshot on our stores, a get each
        elsewhere): what a get of each secret listed gives."""
        full = f"{self.ns}/{prefix}"

        def each(reads: Any) -> list[Any]:
            return [
                (read.name, ("error", family(read.error)) if read.error else secret_view(read.secret))
                for read in reads
            ]

        got = answered(lambda: read_current(self.handles[handle], prefix=full), each)
        want = [
            (meta["name"], expected(lambda name=meta["name"]: self.model.get(name, None, None)))
            for meta in self.model.list(full, include_deleted=False)
        ]
        if isinstance(got, list) and len(got) == len(want):  # the expiry_seen_window, as in get
            for (name, read), (_, model_read) in zip(got, want, strict=True):
                if (
                    name in self.expiry_seen[handle]
                    and isinstance(read, dict)
                    and isinstance(model_read, dict)
                ):
                    model_read["expires"] = read["expires"]
        self.check(f"read_current(prefix={full!r}) via {handle}", got, want)

    @invariant()
    def every_secret_reads_as_the_model_holds(self) -> None:
        """After each step, through one handle then the other: every name described (deleted ones
        too, missing ones NotFoundError), or the whole namespace listed with the deleted."""
        self.checks += 1
        handle = "AB"[self.checks % 2]
        if self.checks % 4 in (0, 1):
            for leaf in LEAVES:
                name = self.name(leaf)
                got = answered(partial(self.handles[handle].describe, name), metadata_view)
                want = expected(partial(self.model.describe, name))
                self.check(f"describe({name!r}) via {handle}", got, want)
        else:
            full = f"{self.ns}/"
            got = answered(
                lambda: self.handles[handle].list(full, include_deleted=True),
                lambda listing: [metadata_view(meta) for meta in listing],
            )
            self.check(f"list({full!r}) via {handle}", got, self.model.list(full, include_deleted=True))


def machine_for(name: str, handle_a: SecretStore, handle_b: SecretStore) -> type[StoreMachine]:
    return type(
        f"{name.title()}StoreMachine",
        (StoreMachine,),
        {"handles": {"A": handle_a, "B": handle_b}, "traits": Traits.of(name, handle_a), "runs": 0},
    )


def run_machine(machine: type[StoreMachine], *, examples: int, steps: int) -> None:
    """MODEL_EXAMPLES=N (and MODEL_STEPS=N) hunts longer than the bounded default."""
    examples = int(os.environ.get("MODEL_EXAMPLES", examples))
    steps = int(os.environ.get("MODEL_STEPS", steps))
    OUTCOMES.clear()
    started = time.monotonic()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            print_blob=True,
        ),
    )
    print(
        f"\n{machine.traits.name}: {machine.runs} examples of up to {steps} steps "
        f"in {time.monotonic() - started:.1f} s"
    )
    for outcome, count in sorted(OUTCOMES.items()):
        print(f"  {outcome}: {count}")


# ---- the stores --------------------------------------------------------------------------------


@pytest.fixture
def two_sqlite_handles(tmp_path: Path) -> Iterator[tuple[EncryptedStore, EncryptedStore]]:
    path = tmp_path / "store.db"
    first = EncryptedStore.create(
        SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST), actor=ACTOR
    )
    second = EncryptedStore.open(SqliteStorage(path), PasswordUnlock(PASSWORD, kdf.TEST), actor=ACTOR)
    yield first, second
    first.close()
    second.close()


def test_the_encrypted_store_on_sqlite_follows_the_model(
    two_sqlite_handles: tuple[EncryptedStore, EncryptedStore],
) -> None:
    run_machine(machine_for("sqlite", *two_sqlite_handles), examples=40, steps=40)


def test_the_encrypted_store_on_postgresql_follows_the_model(postgres_cluster: Any) -> None:
    url, schema = postgres_cluster.url(with_password=True), postgres_cluster.new_schema()
    first = EncryptedStore.create(
        PostgresStorage(url, schema=schema, create=True), PasswordUnlock(PASSWORD, kdf.TEST), actor=ACTOR
    )
    second = EncryptedStore.open(
        PostgresStorage(url, schema=schema), PasswordUnlock(PASSWORD, kdf.TEST), actor=ACTOR
    )
    try:
        run_machine(machine_for("postgres", first, second), examples=12, steps=30)
    finally:
        first.close()
        second.close()


def _vault_handle(vault: FakeVault) -> VaultStore:
    client = connect_vault(
        vault.address,
        environ={"VAULT_TOKEN": vault.root_token},
        session=retrying_session(attempts=3, backoff=0.001),
    )
    return VaultStore(client, "secret", actor=ACTOR)


def test_vault_follows_the_model(fake_vault: FakeVault) -> None:
    first, second = _vault_handle(fake_vault), _vault_handle(fake_vault)
    try:
        run_machine(machine_for("vault", first, second), examples=12, steps=30)
    finally:
        first.close()
        second.close()


def _aws_handle(endpoint: str, prefix: str) -> AwsStore:
    client = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("secretsmanager", endpoint_url=endpoint, config=Config(retries={"max_attempts": 2}))
    return AwsStore(client, prefix, actor=ACTOR)


def test_aws_follows_the_model(moto_endpoint: str) -> None:
    prefix = f"model-{secrets.token_hex(4)}"
    first, second = _aws_handle(moto_endpoint, prefix), _aws_handle(moto_endpoint, prefix)
    try:
        run_machine(machine_for("aws", first, second), examples=8, steps=25)
    finally:
        first.close()
        second.close()


def test_the_remote_store_through_serve_follows_the_model(tmp_path: Path) -> None:
    """RemoteStore over a real `serve` (mTLS, the SQLite store behind it): the service's mapping
    of every operation and error onto gRPC and back, and its read cache."""
    from service_fixtures import make_pki, make_store, start_server, tls_files

    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path)
    first = RemoteStore(server.address, tls_files(tmp_path, "ops"))
    second = RemoteStore(server.address, tls_files(tmp_path, "ops"))
    try:
        run_machine(machine_for("remote", first, second), examples=12, steps=30)
    finally:
        first.close()
        second.close()
        server.stop()
