"""The polled change feed of a store without one (store/polled.py): snapshots diffed into change
events, read at most every poll_seconds and at once after a poke, resumable from its bounded log,
and in front of the service's ChangeHub. Pure and fast: snapshots are dicts, the clock is a list."""

from __future__ import annotations

import threading
import time

import pytest

from secrets_manager.errors import StorageError
from secrets_manager.service.watch import ChangeHub
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.store.polled import PolledChangeFeed, SecretState, Snapshot, diff_snapshots

K = ChangeKind


def state(*versions: int, current: int | None = None, deleted: bool = False, stamp: str = "") -> SecretState:
    labels = {} if not versions else {"current": str(current or max(versions))}
    return SecretState({str(v): v for v in versions}, labels, deleted, stamp)


def kinds(changes: list[SecretChange]) -> list[tuple[ChangeKind, str, int | None]]:
    return [(c.kind, c.name, c.version) for c in changes]


def test_each_kind_of_change_is_one_event_like_our_stores_feed() -> None:
    before = {
        "a/PUT": state(1),
        "a/LABEL": state(1, 2, current=2),
        "a/DELETE": state(1),
        "a/UNDELETE": state(1, deleted=True),
        "a/META": state(1, stamp="tags=x"),
        "a/GONE": state(1),
        "a/SAME": state(3),
    }
    after = {
        "a/PUT": SecretState({"1": 1, "2": 2}, {"current": "2", "previous": "1"}, stamp="t2"),
        "a/LABEL": state(1, 2, current=1),  # promoted back: no new version
        "a/DELETE": state(1, deleted=True),
        "a/UNDELETE": state(1),
        "a/META": state(1, stamp="tags=y"),
        "a/NEW": state(1),
        "a/NEW_DELETED": state(1, deleted=True),
        "a/SAME": state(3),
    }
    changes = diff_snapshots(before, after, 41)
    assert kinds(changes) == [
        (K.METADATA_CHANGED, "a/DELETE", None),
        (K.SECRET_DESTROYED, "a/GONE", None),
        (K.METADATA_CHANGED, "a/LABEL", None),
        (K.METADATA_CHANGED, "a/META", None),
        (K.VERSION_ADDED, "a/NEW", 1),
        (K.METADATA_CHANGED, "a/NEW_DELETED", None),
        (K.VERSION_ADDED, "a/PUT", 2),
        (K.METADATA_CHANGED, "a/UNDELETE", None),
    ]
    assert [c.revision for c in changes] == list(range(42, 50))
    assert diff_snapshots(after, after, 7) == []


def test_a_version_the_backend_does_not_number_is_added_as_version_0() -> None:
    """AWS versions another tool wrote carry a UUID: new all the same, number unknown (0)."""
    before = {"a/K": SecretState({"ours-1": 1}, {"current": "ours-1"})}
    after = {"a/K": SecretState({"ours-1": 1, "uuid": 0}, {"current": "uuid", "previous": "ours-1"})}
    assert kinds(diff_snapshots(before, after, 0)) == [(K.VERSION_ADDED, "a/K", 0)]


class Backend:
    """A snapshot source: its state is a dict the test edits; counts its reads."""

    def __init__(self, snapshot: dict[str, SecretState] | None = None) -> None:
        self.snapshot: dict[str, SecretState] = dict(snapshot or {})
        self.reads = 0

    def __call__(self) -> Snapshot:
        self.reads += 1
        return dict(self.snapshot)


def test_the_backend_is_read_at_most_every_poll_seconds_and_at_once_after_a_poke() -> None:
    now = [100.0]
    backend = Backend({"a/K": state(1)})
    feed = PolledChangeFeed(backend, poll_seconds=10, clock=lambda: now[0], start_revision=0)
    assert feed.changes_since(None) == ([], 0)  # the baseline: what was there is not news
    assert backend.reads == 1
    backend.snapshot["a/K"] = state(1, 2)
    for _ in range(49):  # the hub asks every 0.2 s: 9.8 s of asking, no read
        now[0] += 0.2
        assert feed.changes_since(0) == ([], 0)
    assert backend.reads == 1
    now[0] += 0.2
    assert kinds(feed.changes_since(0)[0]) == [(K.VERSION_ADDED, "a/K", 2)]
    assert backend.reads == 2
    backend.snapshot["a/K"] = state(1, 2, 3)
    now[0] += 0.5
    feed.poke()  # a change through the service: read now, not in 9.5 s
    changes, head = feed.changes_since(1)
    assert (kinds(changes), head, backend.reads) == ([(K.VERSION_ADDED, "a/K", 3)], 2, 3)
    assert feed.changes_since(2) == ([], 2) and backend.reads == 3
    assert kinds(feed.changes_since(0)[0]) == [(K.VERSION_ADDED, "a/K", 2), (K.VERSION_ADDED, "a/K", 3)]
    # A burst of pokes (writes through the service): at most one read per 0.5 s.
    now[0] += 0.3
    feed.poke()
    assert feed.changes_since(2) == ([], 2) and backend.reads == 3
    now[0] += 0.2
    feed.changes_since(2)
    assert backend.reads == 4


def test_a_resume_from_before_the_log_or_from_another_feed_gets_resync() -> None:
    now = [0.0]
    backend = Backend({"a/K": state(1)})
    earlier = PolledChangeFeed(backend, poll_seconds=1, keep=2, clock=lambda: now[0])
    earlier.changes_since(None)
    for version in (2, 3, 4):
        backend.snapshot["a/K"] = state(*range(1, version + 1))
        now[0] += 1
        earlier.changes_since(None)
    _, head = earlier.changes_since(None)
    # Two changes kept: a resume from before them cannot be answered.
    assert [c.kind for c in earlier.changes_since(head - 3)[0]] == [K.RESYNC]
    assert [c.version for c in earlier.changes_since(head - 2)[0]] == [3, 4]
    later = PolledChangeFeed(backend, poll_seconds=10)  # a restarted service's
    assert later.change_history() != earlier.change_history()
    later_head = later.changes_since(None)[1]
    assert later_head > head  # revisions start at the clock: the earlier one's are below its log
    assert [c.kind for c in later.changes_since(head)[0]] == [K.RESYNC]


def test_the_hub_reads_nothing_while_nobody_watches_and_a_poke_reaches_a_watcher_at_once() -> None:
    backend = Backend({"a/K": state(1)})
    feed = PolledChangeFeed(backend, poll_seconds=60)  # only a poke can explain a prompt event
    hub = ChangeHub(feed, max_subscribers=4, poll_seconds=0.05)
    try:
        hub.poke()  # a change through the service with nobody watching
        time.sleep(0.3)
        assert backend.reads == 0
        with hub.subscribe() as subscription:
            assert backend.reads == 1  # the baseline, read when the first watcher came
            time.sleep(0.3)  # the hub asks six times meanwhile: the feed reads none
            assert backend.reads == 1
            backend.snapshot["a/K"] = state(1, 2)
            started = time.monotonic()
            threading.Timer(0.05, hub.poke).start()
            received: list[SecretChange] = []
            while not received and time.monotonic() - started < 20:
                received = subscription.next_batch(0.1) or []
            assert kinds(received) == [(K.VERSION_ADDED, "a/K", 2)]
            # At once: well within the feed's 60 s poll (a loaded machine can hold the hub's
            # thread for a second or more, so not 1 s).
            assert time.monotonic() - started < 10
            assert subscription.history == feed.change_history()
        reads = backend.reads
        time.sleep(0.3)
        assert backend.reads == reads  # the last watcher left: no more reads
    finally:
        hub.close()


def test_a_failing_backend_is_asked_at_most_once_per_interval() -> None:
    now = [0.0]
    calls = [0]

    def failing() -> Snapshot:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError("backend down")
        return {}

    feed = PolledChangeFeed(failing, poll_seconds=10, clock=lambda: now[0])
    feed.changes_since(None)
    now[0] = 10.0
    with pytest.raises(OSError):
        feed.changes_since(None)
    now[0] = 15.0
    feed.changes_since(None)  # not due again yet: answered from the log
    assert calls[0] == 2


def test_a_backend_failing_before_the_baseline_is_asked_once_per_interval_not_once_per_watcher() -> None:
    """Vault or AWS down (or denying the listing) when the first watchers come: every SDK client
    reconnecting with backoff asks for a stream; they all get the error, the backend one read an
    interval (before: one snapshot per attempt, a ListSecrets storm on the account's quota)."""
    now = [0.0]
    calls = [0]

    def failing() -> Snapshot:
        calls[0] += 1
        raise StorageError("AWS throttled list secrets (ThrottlingException)")

    feed = PolledChangeFeed(failing, poll_seconds=10, clock=lambda: now[0])
    hub = ChangeHub(feed, max_subscribers=100, poll_seconds=0.05)
    try:
        for _ in range(50):  # fifty watchers, or one reconnecting fifty times, within the interval
            now[0] += 0.1
            with pytest.raises(StorageError, match="ThrottlingException"):
                hub.subscribe()
        assert calls[0] == 1
        assert hub.subscribers == 0 and not hub.running
        now[0] += 10
        with pytest.raises(StorageError):
            hub.subscribe()
        assert calls[0] == 2
    finally:
        hub.close()


def test_a_backend_slower_than_the_interval_is_not_read_back_to_back() -> None:
    """A snapshot that takes longer than poll_seconds (Vault: a request per secret, a slow node):
    the next read waits the interval after it ended, not at once (a Vault read without pause)."""
    now = [0.0]
    backend = Backend({"a/K": state(1)})

    def slow() -> Snapshot:
        now[0] += 15  # the read takes 15 s of a 10 s interval
        return backend()

    feed = PolledChangeFeed(slow, poll_seconds=10, clock=lambda: now[0])
    feed.changes_since(None)
    now[0] += 0.2  # the hub's next ask
    feed.changes_since(None)
    assert backend.reads == 1
    now[0] += 10
    feed.changes_since(None)
    assert backend.reads == 2


def test_a_slow_first_snapshot_holds_up_neither_writes_nor_shutdown() -> None:
    """The first watcher's subscribe reads a whole snapshot (Vault: a request per secret; a slow or
    hung node: up to its timeouts). Meanwhile every write through the service pokes the hub and
    SIGTERM closes it: neither may wait for that read (before: both waited on the hub's lock)."""
    release = threading.Event()
    backend = Backend({"a/K": state(1)})

    entered = threading.Event()

    def slow() -> Snapshot:
        entered.set()
        release.wait(20)
        return backend()

    hub = ChangeHub(PolledChangeFeed(slow, poll_seconds=30), max_subscribers=4, poll_seconds=0.05)
    outcome: list[object] = []

    def subscribe() -> None:
        try:
            outcome.append(hub.subscribe())
        except Exception as exc:
            outcome.append(exc)

    watcher = threading.Thread(target=subscribe, daemon=True)
    watcher.start()
    try:
        assert entered.wait(10)  # the watcher is in its snapshot (until release, or 20 s)
        for step in (hub.poke, hub.close):
            done = threading.Thread(target=step, daemon=True)
            started = time.monotonic()
            done.start()
            done.join(8)
            assert not done.is_alive(), f"{step.__name__} waited for the snapshot"
            # Not waiting for the snapshot, which lasts 20 s; not 1 s: a loaded machine can be
            # that slow to run a thread.
            assert time.monotonic() - started < 8
    finally:
        release.set()
        watcher.join(5)
        hub.close()
    # The watcher that came during the shutdown is refused, not left subscribed to a closed hub.
    assert len(outcome) == 1 and isinstance(outcome[0], StorageError)
    assert hub.subscribers == 0 and not hub.running


def test_a_backend_that_stays_down_is_logged_once_a_minute_not_once_a_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Vault or AWS down for longer than a poll: each read fails and ends the streams, which the
    SDK reopens (resuming) at once; the log had a warning per poll (5 a second at 0.2 s), now
    one, saying how many were left out when the next comes."""
    down = [False]
    backend = Backend({"a/K": state(1)})

    def snapshot() -> Snapshot:
        if down[0]:
            raise StorageError("Vault is sealed or unavailable (503) for list /")
        return backend()

    hub = ChangeHub(PolledChangeFeed(snapshot, poll_seconds=0.2), max_subscribers=4, poll_seconds=0.05)
    failures = 0
    try:
        subscription = hub.subscribe()
        down[0] = True
        with caplog.at_level("WARNING", logger="secrets_manager.service"):
            started = time.monotonic()
            while time.monotonic() - started < 2:  # a watcher that reconnects whenever it ends
                if subscription.next_batch(0.1) is None:
                    assert isinstance(subscription.error, StorageError)
                    failures += 1
                    subscription = hub.subscribe(subscription.revision)
        subscription.close()
    finally:
        hub.close()
    assert failures >= 2  # the streams still end at each failed read
    warned = [r for r in caplog.records if getattr(r, "event", None) == "watch.feed_failed"]
    assert len(warned) == 1, [r.getMessage() for r in warned]


def test_watchers_reconnecting_together_make_one_read_of_the_position() -> None:
    """After a failure ended every stream, the SDK clients reconnect at once: the hub is idle and
    each needs the store's position. One reads it, the others wait for it (the read is outside the
    hub's lock, so writes and SIGTERM do not wait; it must still be one read, not one each: on
    PostgreSQL a query per client, on Vault/AWS a snapshot's worth of waiting per client)."""

    class CountingFeed:
        def __init__(self) -> None:
            self.heads = 0

        def changes_since(self, revision: int | None) -> tuple[list[SecretChange], int]:
            if revision is None:
                self.heads += 1
                time.sleep(0.2)
            return [], 7

        def change_history(self) -> str | None:
            return "h"

    feed = CountingFeed()
    hub = ChangeHub(feed, max_subscribers=20, poll_seconds=60)
    subscribed: list[object] = []
    threads = [threading.Thread(target=lambda: subscribed.append(hub.subscribe())) for _ in range(10)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(subscribed) == 10 and hub.subscribers == 10
        assert feed.heads == 1
    finally:
        hub.close()
