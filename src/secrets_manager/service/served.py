"""`ServedStore`: what the service (the servicer, the rotation schedule, health) asks of its store.

The service is thin: it calls the store, never a kind of store. Every store it serves has the
`AuditedStore` verbs (store/base.py: put, get, list, describe, update_metadata, delete, undelete,
stage, promote, discard_pending, and the audit key and anchor) and these two more:

- `get_with_fingerprint`: a read and the value's audit fingerprint (`audit.value_fingerprint`),
  which the service's record of the read carries;
- `acting_for(identity)`: what is written in the block is attributed to the service's caller.

Two parts are optional, and the service says what it does without them:

- a change feed (`ChangeFeed` of service/watch.py: `changes_since`, `change_history`), which Watch
  streams and the SDK's push refresh need. Our encrypted stores have one. Vault KV v2 and AWS
  Secrets Manager keep no log of changes: they give `version_snapshot()` instead, and the service
  diffs snapshots into a feed (store/polled.py `PolledChangeFeed`) read from the backend at most
  every `watch_poll_seconds` (server.toml; default: the store's `watch_poll_seconds`) and at once
  after a change made through the service. `watch_poll_seconds = 0` turns it off. A store with
  neither (or with the polled feed off) has Watch refused at once (WatchUnsupportedError,
  UNIMPLEMENTED) and clients refresh what they cache by its TTL;
- `probe()`: a cheap read proving the backend answers and takes our credentials, for the health
  check. A store with a change feed is probed by reading the feed's head instead.

A capability a store declares unsupported (store/base.py `Capability`: Vault's `pending` label, so
its stage, promote and discard) raises UnsupportedOperationError there, which the RPC answers as
the CLI's error is mapped (INVALID_ARGUMENT, exit 2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from secrets_manager.errors import WatchUnsupportedError
from secrets_manager.service.watch import ChangeFeed
from secrets_manager.store.base import AuditedStore, Secret
from secrets_manager.store.changes import SecretChanges
from secrets_manager.store.polled import PolledChangeFeed, SecretState

WATCH_UNSUPPORTED = (
    "Watch is not supported by this service: its store has no change feed (or watch_poll_seconds = 0 "
    "turned it off), so clients refresh what they cache by its TTL, and a changed value reaches them "
    "within the TTL rather than at once"
)


class ServedStore(AuditedStore, Protocol):
    def get_with_fingerprint(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> tuple[Secret, str]:
        """`get`, and the value's `hmac-sha256:` fingerprint under the store's audit key."""

    def acting_for(self, actor: str) -> AbstractContextManager[None]:
        """Versions (or secrets) written in this block, in this thread, record `actor` as their
        creator: the service's caller rather than the user the service runs as."""


@runtime_checkable
class Probed(Protocol):
    def probe(self) -> None:
        """Raise the store's error unless the backend answers and accepts our credentials."""


@runtime_checkable
class Snapshotted(Protocol):
    """A store without a change feed that can say cheaply what it holds (Vault, AWS)."""

    @property
    def watch_poll_seconds(self) -> float:
        """How often, by default, a polled feed reads `version_snapshot` (its cost: the store's)."""

    def version_snapshot(self) -> Mapping[str, SecretState]:
        """Each secret's versions, labels, deleted or not and a stamp of its metadata; no values."""


class NoChangeFeed:
    """The change feed of a store that has none: every read of it is WatchUnsupportedError."""

    def changes_since(self, revision: int | None) -> tuple[SecretChanges, int]:
        raise WatchUnsupportedError(WATCH_UNSUPPORTED)

    def change_history(self) -> str | None:
        return None


def change_feed(store: ServedStore, *, poll_seconds: float | None = None) -> ChangeFeed | None:
    """The store's change feed: its own, else one polled from its snapshots every `poll_seconds`
    (None: the store's default; 0: none), else None."""
    if isinstance(store, ChangeFeed):
        return store
    if isinstance(store, Snapshotted):
        seconds = store.watch_poll_seconds if poll_seconds is None else poll_seconds
        return PolledChangeFeed(store.version_snapshot, poll_seconds=seconds) if seconds > 0 else None
    return None


def store_probe(store: ServedStore) -> Callable[[], object]:
    """The health check's store read: the store's own `probe()` (our encrypted store's also checks
    that its root key is the one in force), else the change feed's head."""
    if isinstance(store, Probed):
        return store.probe
    feed = store if isinstance(store, ChangeFeed) else None
    if feed is None:
        raise TypeError(f"{type(store).__name__} has neither probe() nor a change feed to check its health")
    return lambda: feed.changes_since(None)


__all__ = [
    "WATCH_UNSUPPORTED",
    "NoChangeFeed",
    "Probed",
    "ServedStore",
    "Snapshotted",
    "change_feed",
    "store_probe",
]
