"""What the encrypted store decoded on recent reads, kept while nothing has changed since.

A read of a secret costs three storage reads, two decryptions and a JSON parse; the service does
it for every request. This cache keeps, per secret, the decrypted metadata and the value records
already read — still sealed, with the data key that opens them, so no plaintext value is kept — and
is valid only while the storage's change head (`storage.ChangeHead`) is where it was when they were
read. Any change by any process moves the head, and the next read drops everything: one cheap read
of the head replaces the rest (on PostgreSQL a read that is not cached gets the head with the
secret's records, in one statement). Vault's physical cache keeps ciphertext the same way.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

DEFAULT_ENTRIES = 10_000  # secrets kept (about 1.5 KB each); past it the oldest entry goes

T = TypeVar("T")


class ReadCache(Generic[T]):
    """Entries by name, tagged with one change head. Thread-safe."""

    def __init__(self, limit: int = DEFAULT_ENTRIES) -> None:
        self._lock = threading.Lock()
        self._head = -1
        self._entries: dict[str, T] = {}
        self._limit = limit

    def get(self, head: int, name: str) -> T | None:
        """The entry read at `head`, or None. A newer head drops every entry."""
        with self._lock:
            if head != self._head:
                self._advance(head)
                return None
            return self._entries.get(name)

    def holding(self, name: str) -> tuple[int, T] | None:
        """The head the cache is at and its entry for `name`, if it has one (it may be stale: the
        caller reads the head before using it)."""
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else (self._head, entry)

    def put(self, head: int, name: str, entry: T) -> None:
        """Keep `entry`, read wholly while the storage's head was `head` (the caller read the head
        again after reading: an entry read across a change must not be kept). An entry tagged with
        an older head than the cache's is dropped: its reader read the head before another moved it."""
        with self._lock:
            self._advance(head)
            if head != self._head:
                return
            if name not in self._entries and len(self._entries) >= self._limit:
                del self._entries[next(iter(self._entries))]  # the oldest kept (dicts keep order)
            self._entries[name] = entry

    def clear(self) -> None:
        with self._lock:
            self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _advance(self, head: int) -> None:
        # The head only moves forward; a lower one comes from a reader that read it earlier.
        if head > self._head:
            self._head = head
            self._entries = {}
