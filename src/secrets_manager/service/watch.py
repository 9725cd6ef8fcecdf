"""`ChangeHub`: one poller of the store's change feed, fanned out to every open Watch stream.

A Watch stream used to poll the store itself (one SQLite query per stream every 0.2 s). Now one
thread polls every `WATCH_POLL_SECONDS` and hands the decoded `SecretChange`s to each subscriber's
bounded queue; the stream's own thread only waits on that queue. A change committed through this
process `poke`s the poller, which reads at once: this replica's watchers hear of its own changes
without waiting for a tick. On PostgreSQL a commit by any process pokes it too (the store's
`on_commits`, LISTEN/NOTIFY); on SQLite changes made elsewhere (the CLI, another replica) wait
for the next tick.

- A subscription starts at a revision: every change committed after it reaches the subscriber.
  `subscribe(None)` starts from the hub's current position (read from the store when no poller is
  running), which the caller reads before it tells its client the stream is live.
  `subscribe(since_revision)` resumes: the changes after `since_revision` up to the hub's position
  are read from the feed for this subscriber alone (a RESYNC event first if the feed no longer
  goes back that far, or never got there), then it follows the live changes.
- The feed's revisions belong to one line of history of the database (the store's
  `change_history()`: PostgreSQL's server, SQLite's file). A database that comes back with less
  history (a failover to a standby that lacked the last commits, a restore) reuses revisions it
  lost for other changes, so a revision alone would skip them. When the poller finds the history
  changed, every subscriber is sent RESYNC (with the new history) at the new head and follows the
  new line from there; a resume that names another history than the hub's starts with RESYNC.
- A subscriber that falls behind (its queue holds `queue_events` undelivered events) has its queue
  cleared and gets one RESYNC event instead: memory stays bounded and the poller never blocks.
- A store error in the poller ends every subscription with that error (the stream ends with the
  error's status; logged at most once a minute); the poller carries on and polls again for the
  next subscribers. So does
  `interrupt(error)`, which the service calls when its health probe finds the store not answering:
  the poller's own read of a hung database would wait out the store's answer timeout.
- `max_subscribers` bounds the open subscriptions: each Watch stream holds a gRPC worker thread, so
  the bound keeps workers free for every other call. One more gets `ResourceExhaustedError`.

The poller starts with the first subscription and idles (no queries) while there is none, so a
service nobody watches never touches the feed; `close()` ends every subscription and the thread.
Names and versions only ever pass through here, never values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from secrets_manager.errors import (
    InvalidInputError,
    ResourceExhaustedError,
    SecretsManagerError,
    StorageError,
)
from secrets_manager.store.changes import ChangeKind, SecretChange, SecretChanges

log = logging.getLogger("secrets_manager.service")

WATCH_POLL_SECONDS = 0.2  # how often the one poller reads the change feed
QUEUE_EVENTS = 1024  # undelivered events a subscriber may have before it is sent RESYNC instead
LIMIT_WARNING_SECONDS = 60.0  # at most one "limit reached" warning in the log per this interval
# How long close() waits for the poller. An idle one ends at once; one inside a read of a store that
# does not answer (a hung Vault or AWS endpoint, PostgreSQL) would hold SIGTERM for the store's
# timeouts: it is a daemon thread with nothing left to hand out, so it is left to end with the process.
CLOSE_WAIT_SECONDS = 1.0


@runtime_checkable
class ChangeFeed(Protocol):
    """What the hub needs of a store: EncryptedStore's own feed, or a `PolledChangeFeed`
    (store/polled.py) over a Vault or AWS store's snapshots. Either may also have `on_commits`
    (PostgreSQL's NOTIFY) or `poke()` (told of each change made through this process)."""

    def changes_since(self, revision: int | None) -> tuple[SecretChanges, int]: ...

    def change_history(self) -> str | None: ...


def _resync(revision: int) -> SecretChange:
    return SecretChange(ChangeKind.RESYNC, "", None, revision)


def _same(earlier: str | None, later: str | None) -> bool:
    """Whether two readings of the store's history name one line of it (None: the store cannot
    tell, as a store before this check could not: taken as the same)."""
    return earlier is None or later is None or earlier == later


class Subscription:
    """One subscriber's queue. Read with `next_batch` from one thread; `close()` from any."""

    def __init__(self, hub: ChangeHub, capacity: int, revision: int) -> None:
        self._hub = hub
        self._capacity = capacity
        self._condition = threading.Condition()
        self._backlog: list[SecretChange] = []  # the resumed part, delivered before the live queue
        self._events: deque[SecretChange] = deque()
        self._floor = revision  # live changes at or below this were already delivered (resume)
        self._ended = False
        self.revision = revision  # every change committed after this revision reaches the subscriber
        self.history: str | None = None  # the line of the store's history `revision` belongs to
        self.error: BaseException | None = None  # why the hub ended the subscription, if it did
        self.resyncs = 0  # how often the queue overflowed and was replaced by RESYNC

    def next_batch(self, timeout: float) -> list[SecretChange] | None:
        """The changes waiting (after up to `timeout` seconds: maybe none); None once it has ended
        (closed, or failed: then `error` says why). Changes queued before an error come first."""
        with self._condition:
            if not (self._backlog or self._events or self._ended):
                self._condition.wait(timeout)
            if self._backlog or self._events:
                floor = self._floor
                live = [c for c in self._events if c.kind is ChangeKind.RESYNC or c.revision > floor]
                batch = self._backlog + live
                self._backlog = []
                self._events.clear()
                return batch
            return None if self._ended else []

    def close(self) -> None:
        """End the subscription and leave the hub (frees its place under the limit). Idempotent."""
        self._end(None)
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- called by the hub ---------------------------------------------------------------------

    def _offer(self, changes: SecretChanges, revision: int) -> None:
        """Queue live changes; past the capacity, drop what is queued and queue RESYNC instead."""
        with self._condition:
            if self._ended or not changes:
                return
            if len(self._events) + len(changes) > self._capacity:
                self._events.clear()
                self._events.append(_resync(revision))
                self.resyncs += 1
            else:
                self._events.extend(changes)
            self._condition.notify_all()

    def _set_backlog(self, backlog: SecretChanges, floor: int, revision: int) -> None:
        with self._condition:
            self._backlog = backlog
            self._floor = floor
            self.revision = revision

    def _restart(self, revision: int) -> None:
        """The store's history changed under the subscriber: what is queued belongs to the old
        line, so it gets RESYNC at `revision` and follows the new line from there (a resumed
        subscriber's floor, a revision of the old line, no longer holds back what follows)."""
        with self._condition:
            if self._ended:
                return
            self._backlog = []
            self._events.clear()
            self._events.append(_resync(revision))
            self._floor = revision
            self._condition.notify_all()

    def _end(self, error: BaseException | None) -> None:
        with self._condition:
            if not self._ended:
                self._ended = True
                self.error = error
            self._condition.notify_all()


class ChangeHub:
    """One thread polls `store.changes_since` and fans the changes out to every `Subscription`."""

    def __init__(
        self,
        store: ChangeFeed,
        *,
        max_subscribers: int,
        poll_seconds: float = WATCH_POLL_SECONDS,
        queue_events: int = QUEUE_EVENTS,
    ) -> None:
        if max_subscribers < 1 or queue_events < 1:
            raise InvalidInputError("a change hub needs max_subscribers >= 1 and queue_events >= 1")
        self._store = store
        self._max = max_subscribers
        self._poll_seconds = poll_seconds
        self._queue_events = queue_events
        self._lock = threading.Condition()
        self._positioning = threading.Lock()  # held (before `_lock`) while reading the position
        self._subscribers: set[Subscription] = set()
        self._revision: int | None = None  # fanned out up to here; None while nobody subscribes
        self._history: str | None = None  # the line of the store's history `_revision` is on
        self._thread: threading.Thread | None = None
        self._closed = False
        self._poked = False  # a change was committed (here, or elsewhere where the store tells)
        self._stop_listening: Callable[[], None] | None = None
        self._last_limit_warning = -LIMIT_WARNING_SECONDS
        # The feed's failures: when the last one was logged, and how many were not since then (a
        # Vault/AWS outage fails the polled feed's read once an interval, 5 a second at 0.2 s).
        self._last_failure_logged: float | None = None
        self._failures_unlogged = 0
        self.polls = 0  # change-feed reads by the poller (for tests and benchmarks)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def running(self) -> bool:
        """Whether the poller thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def subscribe(self, since_revision: int | None = None, since_history: str | None = None) -> Subscription:
        """A new subscription: from now (`since_revision=None`) or resuming after `since_revision`,
        a revision of the store's history `since_history` (None: not said; taken as the hub's). A
        resume from another history than the hub's begins with RESYNC.

        Raises ResourceExhaustedError at the limit, StorageError once closed, and whatever the store
        raises while reading the starting revision (then nothing is subscribed)."""
        if since_revision is not None and since_revision < 0:
            raise InvalidInputError(f"since_revision must be 0 or more, not {since_revision}")
        while True:
            with self._lock:
                if self._closed:
                    raise StorageError("the service is shutting down; watch through another replica")
                if len(self._subscribers) >= self._max:
                    self._warn_limit()
                    raise ResourceExhaustedError(
                        f"too many watch streams (max_watch_streams = {self._max}): raise max_watch_streams "
                        "and max_workers in the server config, or watch through another replica"
                    )
                if self._revision is not None:
                    live_from, history = self._revision, self._history
                    subscription = Subscription(self, self._queue_events, live_from)
                    subscription.history = history
                    self._subscribers.add(subscription)
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=self._poll_forever, name="watch-hub", daemon=True
                        )
                        self._thread.start()
                        # Where the store can tell (PostgreSQL), a commit by any process pokes the poller.
                        on_commits = getattr(self._store, "on_commits", None)
                        self._stop_listening = None if on_commits is None else on_commits(self.poke)
                    self._lock.notify_all()
                    break
            # Read outside the hub's lock: a polled feed's first read is a whole snapshot of Vault
            # or AWS, and poke() (every write through the service) and close() (SIGTERM) take
            # that lock. One reader at a time: the watchers reconnecting together after a failure
            # make one read of the store, not one each.
            with self._positioning:
                if self._revision is None:
                    position = self._position()
                    with self._lock:
                        if self._revision is None and not self._closed:
                            self._history, self._revision = position
        if since_revision is not None and not _same(since_history, history):
            # Its revision is of another line of history (before a failover or a restore): the
            # same numbers name other changes here, so nothing can be resumed from it.
            subscription._set_backlog([_resync(live_from)], live_from, live_from)
        elif since_revision is not None and since_revision != live_from:
            try:
                self._resume(subscription, since_revision, live_from)
            except BaseException:
                subscription.close()
                raise
        return subscription

    def poke(self) -> None:
        """A change was just committed through this process: read the feed now rather than at the
        next tick, so its watchers hear of it at once. Changes made elsewhere (the CLI, another
        replica) are still found by the poll. A feed that reads its backend only now and then
        (store/polled.py) is told too, so that this read goes to the backend."""
        poke = getattr(self._store, "poke", None)
        if poke is not None:
            poke()
        with self._lock:
            self._poked = True
            self._lock.notify_all()

    def close(self, timeout: float = CLOSE_WAIT_SECONDS) -> None:
        """End every subscription (their streams end) and stop the poller, waiting for it at most
        `timeout` seconds (a read of a hung store is not waited out). Idempotent."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
            self._subscribers.clear()
            thread = self._thread
            self._lock.notify_all()
        for subscription in subscribers:
            subscription._end(None)
        if self._stop_listening is not None:
            self._stop_listening()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def interrupt(self, error: BaseException) -> None:
        """End every subscription now with `error`, as a failed read of the feed would: the store
        does not answer (the health probe says so) and the poller's read may be stuck in it. A read
        that returns later is dropped (the hub's position moved on)."""
        with self._lock:
            revision = self._revision
            if revision is not None:
                self._fail(revision, error)

    # ---- internals -------------------------------------------------------------------------------

    def _position(self) -> tuple[str | None, int]:
        """The store's history and change head, read so that the head is of that history (a head
        read while the database was replaced under the store is read again)."""
        for _ in range(3):
            history = self._store.change_history()
            _, head = self._store.changes_since(None)
            if self._store.change_history() == history:
                break
        return history, head

    def _resume(self, subscription: Subscription, since: int, live_from: int) -> None:
        """Give a resuming subscriber what it missed: the feed from `since` up to `live_from`."""
        if since > live_from:
            _, current = self._store.changes_since(None)
            if since > current:  # the feed never got there (another store, or restored): start over
                subscription._set_backlog([_resync(live_from)], live_from, live_from)
            else:  # the caller saw more than this hub has fanned out yet (another replica's hub)
                subscription._set_backlog([], since, since)
            return
        backlog: list[SecretChange] = []
        revision = since
        while revision < live_from:
            changes, following = self._store.changes_since(revision)
            for change in changes:
                if change.kind is ChangeKind.RESYNC:  # the feed was trimmed past `since`
                    backlog.append(_resync(min(change.revision, live_from)))
                elif change.revision <= live_from:  # later ones reach the live queue
                    backlog.append(change)
            if len(backlog) > self._queue_events:
                backlog = [_resync(live_from)]
                break
            if following <= revision:
                break
            revision = following
        subscription._set_backlog(backlog, live_from, since)

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(subscription)
            if not self._subscribers:
                self._revision = None  # idle: the next subscriber reads the store's position anew

    def _warn_limit(self) -> None:
        now = time.monotonic()
        if now - self._last_limit_warning >= LIMIT_WARNING_SECONDS:
            self._last_limit_warning = now
            log.warning(
                "watch stream refused: max_watch_streams reached",
                extra={"event": "watch.refused", "max_watch_streams": self._max},
            )

    def _poll_forever(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._subscribers:
                    self._lock.wait()
                if self._closed:
                    return
                revision = self._revision
                self._poked = False  # this read covers every change committed before it
            assert revision is not None
            self._poll_once(revision)
            with self._lock:
                if not self._closed and not self._poked:  # a poke during the read: read again now
                    self._lock.wait(self._poll_seconds)

    def _poll_once(self, revision: int) -> None:
        """One read of the feed, fanned out; an error ends every subscription and is logged."""
        self.polls += 1
        try:
            before = self._store.change_history()
            changes, following = self._store.changes_since(revision)
            if not (_same(self._history, before) and before == self._store.change_history()):
                self._restart(revision)
                return
        except Exception as exc:  # the store's error (or a bug) ends the streams; polling goes on
            if self._closed:  # a read cut short by the shutdown: nobody is left to tell
                return
            self._log_failure(exc)
            self._fail(revision, exc)
            return
        with self._lock:
            if self._revision != revision:  # everyone left (and maybe others came) meanwhile
                return
            for subscription in self._subscribers:
                subscription._offer(changes, following)
            self._revision = following

    def _log_failure(self, exc: Exception) -> None:
        """At most one line per LIMIT_WARNING_SECONDS for failed reads of the feed, saying how many
        were left out since the last (as the service's "request failed" lines). Each failure still
        ends the streams, which the audit log and the metrics count."""
        now = time.monotonic()
        if self._last_failure_logged is not None and now - self._last_failure_logged < LIMIT_WARNING_SECONDS:
            self._failures_unlogged += 1
            return
        suppressed, self._last_failure_logged, self._failures_unlogged = self._failures_unlogged, now, 0
        if isinstance(exc, SecretsManagerError):  # our messages never hold a value
            log.warning(
                "change feed could not be read; watch streams end",
                extra={"event": "watch.feed_failed", "error": str(exc), "suppressed": suppressed},
            )
        else:  # a bug: its message is withheld (it could hold data)
            log.error(
                "change feed poller failed",
                extra={
                    "event": "watch.poller_failed",
                    "error_type": type(exc).__name__,
                    "suppressed": suppressed,
                },
            )

    def _restart(self, revision: int) -> None:
        """The store's history changed (the database failed over or was restored): what was read
        may be of either line, so it is dropped; every subscriber gets RESYNC at the new head and
        the hub follows the new line from there."""
        history, head = self._position()
        with self._lock:
            if self._revision != revision:  # everyone left (and maybe others came) meanwhile
                return
            log.warning(
                "the store's database changed under the service (a failover or a restore): watch "
                "streams are told to re-read what they cache",
                extra={"event": "watch.history_changed", "revision": head},
            )
            for subscription in self._subscribers:
                subscription.history = history
                subscription._restart(head)
            self._revision, self._history = head, history

    def _fail(self, revision: int, error: BaseException) -> None:
        with self._lock:
            if self._revision != revision:
                return
            failed = list(self._subscribers)
            self._subscribers.clear()
            self._revision = None
        for subscription in failed:
            subscription._end(error)


__all__ = ["QUEUE_EVENTS", "WATCH_POLL_SECONDS", "ChangeFeed", "ChangeHub", "Subscription"]
