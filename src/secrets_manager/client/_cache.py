"""The SDK's cache: values trusted for a jittered TTL, and the stale-if-error bound.

Two invariants:

- Reads take no lock. The entries live in a dict that writers never mutate: a writer copies it,
  changes the copy and swaps it in under one lock (copy-on-write, like Vault's keyring). A reader
  that takes `entries()` once sees one consistent generation: never half of a batch refresh.
  (Secrets are written one at a time, so two changed in turn can still be seen one old and one
  new: values that must change together belong in one secret.)
- A slower, older fetch never overwrites a newer one. Each write carries the monotonic time its
  fetch *started*; the cache keeps the newer of the two, and `outdate()` (a change event arrived)
  refuses every fetch that started before it.

Those per-key markers (when a change event outdated a key, when a key was discarded) matter only
to fetches that started before them. Fetches say when they start and end (`fetching()`), so a
marker older than every fetch in flight is dropped: a long-running client that sees many names
created and deleted keeps markers for its fetches in flight, not one per name it ever heard of.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

# Markers kept before old ones are pruned (then twice what a prune leaves): each prune is one pass
# over them, so their upkeep stays O(1) per change event.
MARKERS_BEFORE_PRUNE = 256
K = TypeVar("K")
V = TypeVar("V")
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Entry(Generic[V]):
    value: V
    fresh_until: float  # monotonic; past it the value is re-fetched before it is served
    started: float  # monotonic start of the fetch that produced it


class TtlCache(Generic[K, V]):
    """Thread-safe TTL cache whose lifetimes are jittered downwards, so a fleet of clients started
    together does not refresh in lock-step: a value lives between (1 - jitter) x ttl and ttl."""

    def __init__(
        self,
        ttl: float,
        *,
        jitter: float = 0.1,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if ttl <= 0 or not 0 <= jitter < 1:
            raise ValueError("ttl must be positive and jitter in [0, 1)")
        self.ttl = ttl
        self.jitter = jitter
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (spreading refreshes, not a secret)
        self._entries: dict[K, Entry[V]] = {}
        self._floors: dict[K, float] = {}  # fetches that started before this are outdated
        self._removed: dict[K, float] = {}  # discarded (gone from the store) at this time
        self._fetches: Counter[float] = Counter()  # start times of the fetches in flight
        self._prune_at = MARKERS_BEFORE_PRUNE
        self._lock = threading.Lock()
        self.generation = 0  # bumped by every change: a key for anything derived from entries()

    # ---- reads: no lock ---------------------------------------------------------------------

    def get(self, key: K) -> Entry[V] | None:
        return self._entries.get(key)

    def entries(self) -> Mapping[K, Entry[V]]:
        """The current generation of entries; never changes after it is returned."""
        return self._entries

    def lifetime(self) -> float:
        return self.ttl * (1.0 - self.jitter * self._rng.random())

    # ---- fetches in flight ------------------------------------------------------------------------

    @contextmanager
    def fetching(self) -> Iterator[float]:
        """A fetch whose result may be stored here: yields its start time (the `started` of
        `put`, `put_many`, `put_outdated`), and keeps the markers it may be refused by until it
        ends. Taken under the lock, so a fetch not registered yet starts after any prune."""
        with self._lock:
            started = self._clock()
            self._fetches[started] += 1
        try:
            yield started
        finally:
            with self._lock:
                self._fetches[started] -= 1
                if not self._fetches[started]:
                    del self._fetches[started]
                self._prune_if_due()

    def markers(self) -> int:
        """How many per-key markers are kept (outdated and discarded keys)."""
        return len(self._floors) + len(self._removed)

    def _prune_if_due(self) -> None:
        """(Under the lock.) Drop the markers older than every fetch in flight (all of them when
        none is): each only refuses a fetch that started before it, and every fetch still to be
        stored started after."""
        if len(self._floors) + len(self._removed) < self._prune_at:
            return
        horizon = min(self._fetches) if self._fetches else self._clock()
        self._floors = {key: at for key, at in self._floors.items() if at >= horizon}
        self._removed = {key: at for key, at in self._removed.items() if at >= horizon}
        self._prune_at = max(MARKERS_BEFORE_PRUNE, 2 * (len(self._floors) + len(self._removed)))

    # ---- writes: copy, change, swap ------------------------------------------------------------

    def put(self, key: K, value: V, *, started: float) -> bool:
        """Store a fetched value unless a newer fetch (or a change event) came after its start."""
        return bool(self.put_many({key: value}, started=started))

    def put_many(self, values: Mapping[K, V], *, started: float, drop: Iterable[K] = ()) -> list[K]:
        """Store a batch in one swap (and remove `drop`); returns the keys actually stored."""
        with self._lock:
            now = self._clock()
            fresh_until = now + self.lifetime()
            entries = dict(self._entries)
            stored = []
            for key, value in values.items():
                if started < self._newest(entries, key):
                    continue
                entries[key] = Entry(value, fresh_until, started)
                self._removed.pop(key, None)
                stored.append(key)
            for key in drop:
                if key not in values and started >= self._newest(entries, key):
                    entries.pop(key, None)
            self._swap(entries)
            return stored

    def put_outdated(self, values: Mapping[K, V], *, started: float) -> None:
        """Keep fetched values that a change event outdated while they were in flight, for keys
        that hold nothing (their first fetch) and were not discarded since: expired, so they are
        fetched again before being served as fresh, yet a listing that names them has a value
        for each. Never over a newer value, nor bringing back a key removed meanwhile."""
        with self._lock:
            added = {
                key: Entry(value, float("-inf"), started)
                for key, value in values.items()
                if key not in self._entries and self._removed.get(key, float("-inf")) < started
            }
            if added:
                self._swap({**self._entries, **added})

    def replace_value(self, key: K, value: V) -> None:
        """Change a value in place, keeping its freshness (e.g. one name added to a listing)."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._swap({**self._entries, key: Entry(value, old.fresh_until, old.started)})

    def expire(self, key: K) -> None:
        """Keep the value (it may still be served stale) but re-fetch it before serving it fresh."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._swap({**self._entries, key: Entry(old.value, float("-inf"), old.started)})

    def outdate(self, key: K) -> None:
        """A change to `key` happened now: any fetch that started before now must not be stored."""
        with self._lock:
            self._floors[key] = self._clock()
            self.generation += 1
            self._prune_if_due()

    def discard(self, key: K) -> None:
        with self._lock:
            self._removed[key] = self._clock()
            self._prune_if_due()
            if key in self._entries:
                entries = dict(self._entries)
                del entries[key]
                self._swap(entries)

    def clear(self) -> None:
        with self._lock:
            self._swap({})
            self._floors.clear()
            self._removed.clear()

    def reset_after_fork(self) -> None:
        """In a forked child: a new lock (the parent's may have been held by a thread that did not
        survive the fork), and every value expired, since no watcher kept them fresh meanwhile.
        The parent's fetches in flight are not the child's: none will end here."""
        self._lock = threading.Lock()
        self._fetches = Counter()
        self._swap({key: Entry(old.value, float("-inf"), old.started) for key, old in self._entries.items()})

    def _newest(self, entries: Mapping[K, Entry[V]], key: K) -> float:
        old = entries.get(key)
        return max(old.started if old else float("-inf"), self._floors.get(key, float("-inf")))

    def _swap(self, entries: dict[K, Entry[V]]) -> None:
        self._entries = entries
        self.generation += 1


class Reachability:
    """Whether any service answered lately, and so whether stale values may still be served.

    An outage starts at the first failure after a success (every address failed) and ends at the
    next success. During an outage the last good values are served for at most `stale_if_error`
    seconds from its start; after that, reads fail with a clear error."""

    def __init__(self, stale_if_error: float, *, clock: Clock = time.monotonic) -> None:
        self.stale_if_error = stale_if_error
        self._clock = clock
        self._lock = threading.Lock()
        self.outage_since: float | None = None

    def failed(self) -> bool:
        """Record a failure; True if it starts an outage."""
        with self._lock:
            if self.outage_since is not None:
                return False
            self.outage_since = self._clock()
            return True

    def succeeded(self) -> bool:
        """Record a success; True if it ends an outage."""
        if self.outage_since is None:  # the common case, without the lock
            return False
        with self._lock:
            ended = self.outage_since is not None
            self.outage_since = None
            return ended

    def reset_after_fork(self) -> None:
        """In a forked child: a new lock (the parent's may have been held at the fork)."""
        self._lock = threading.Lock()

    def may_serve_stale(self, now: float) -> bool:
        since = self.outage_since
        return since is not None and now < since + self.stale_if_error

    def stale_deadline(self) -> float | None:
        since = self.outage_since
        return None if since is None else since + self.stale_if_error
