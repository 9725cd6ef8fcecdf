"""`Client.on_change`: the application hears that a secret it reads has changed, without polling.

The cache already follows every change (the service's Watch stream, a local store's change feed);
a program that keeps a credential in use beyond one call (an exchange's websocket logged in with an
API key, a database pool's connections) also needs to act on it: log in again, open new
connections. Callbacks get the name and versions, never the value (read it from the client: a
cache hit). They run on one thread of the client's own, in order, so a slow or failing callback
delays no refresh; an exception is logged and the next callback runs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("secrets_manager.client")


@dataclass(frozen=True, slots=True)
class SecretChanged:
    """A secret this client had read changed: `version` is its new current version (None: it was
    deleted, destroyed, or may no longer be read); `previous_version` the one cached before (None:
    a secret new under a prefix the client reads). Versions are 0 where the store does not tell
    them (AWS without ListSecretVersionIds)."""

    name: str
    version: int | None
    previous_version: int | None


Listener = Callable[[SecretChanged], object]


class Subscription:
    """What `on_change` returns: `cancel()` stops the callback (a change being delivered may
    still reach it)."""

    __slots__ = ("_key", "_notifier")

    def __init__(self, notifier: Notifier, key: int) -> None:
        self._notifier, self._key = notifier, key

    def cancel(self) -> None:
        self._notifier.remove(self._key)


class Notifier:
    """The callbacks of one client and the thread that calls them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[int, tuple[str, Listener]] = {}  # copy-on-write under _lock
        self._keys = itertools.count()
        self._queue: queue.SimpleQueue[SecretChanged | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def add(self, prefix: str, callback: Listener) -> Subscription:
        with self._lock:
            key = next(self._keys)
            self._listeners = {**self._listeners, key: (prefix, callback)}
        return Subscription(self, key)

    def remove(self, key: int) -> None:
        with self._lock:
            self._listeners = {k: v for k, v in self._listeners.items() if k != key}

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    def publish(self, changes: Iterable[SecretChanged]) -> None:
        if not self._listeners:
            return
        for change in changes:
            self._queue.put(change)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # the first, or after a fork
                self._thread = threading.Thread(
                    target=self._deliver, name="secrets-manager-on-change", daemon=True
                )
                self._thread.start()

    def _deliver(self) -> None:
        while True:
            change = self._queue.get()
            if change is None:
                return
            for prefix, callback in list(self._listeners.values()):
                if not change.name.startswith(prefix):
                    continue
                try:
                    callback(change)
                except Exception:  # the application's own error: said, and the others still run
                    log.exception(
                        "an on_change callback (%s) failed for %s",
                        getattr(callback, "__qualname__", type(callback).__name__),
                        change.name,
                    )

    def close(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            if thread is not threading.current_thread():  # close() called from a callback
                thread.join(timeout=5)

    def reset_after_fork(self) -> None:
        """In a forked child: the delivering thread is gone and its lock may be held."""
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        self._thread = None
