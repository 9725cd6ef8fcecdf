"""Watch streams served by one change-feed poller (service/watch.py): `ChangeHub` against a real
EncryptedStore on a SQLite file, the `max_watch_streams` limit and resume (`since_revision`)
against a real `secrets-manager serve` process, and the SDK's watcher when the limit refuses it."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from secrets_manager.client import Client, RemoteStore
from secrets_manager.crypto import kdf
from secrets_manager.errors import (
    InvalidInputError,
    ResourceExhaustedError,
    StorageError,
)
from secrets_manager.service.config import load_config
from secrets_manager.service.watch import ChangeHub, Subscription
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from secrets_manager.wire import WATCH_REVISION_KEY, status_for
from service_fixtures import PASSWORD as SERVICE_PASSWORD
from service_fixtures import (
    SEED,
    TD,
    Server,
    client_environ,
    eventually,
    in_process_server,
    make_pki,
    make_store,
    start_server,
    tls_files,
)

FAST = 0.01  # poll interval of the hubs under test


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)


def collect(subscription: Subscription, until: Callable[[list[SecretChange]], object]) -> list[SecretChange]:
    """The subscription's changes until `until(changes)` holds (fails the test after 10 s)."""
    changes: list[SecretChange] = []
    deadline = time.monotonic() + 10
    while not until(changes):
        if time.monotonic() > deadline:
            raise AssertionError(f"only got {changes}")
        batch = subscription.next_batch(0.05)
        assert batch is not None, f"the subscription ended: {subscription.error!r}"
        changes.extend(batch)
    return changes


def names_added(changes: list[SecretChange]) -> list[str]:
    return [c.name for c in changes if c.kind is ChangeKind.VERSION_ADDED]


def hub_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "watch-hub"]


@pytest.fixture
def hub(encrypted_store: EncryptedStore) -> Iterator[ChangeHub]:
    made = ChangeHub(encrypted_store, max_subscribers=8, poll_seconds=FAST)
    yield made
    made.close()


# ---- ChangeHub ------------------------------------------------------------------------------------


def test_every_subscriber_gets_every_change_from_one_poller(
    hub: ChangeHub, encrypted_store: EncryptedStore
) -> None:
    before = len(hub_threads())
    subscriptions = [hub.subscribe() for _ in range(3)]
    # Each starts where the store is: a change committed right after subscribing is not missed.
    _, current = encrypted_store.changes_since(None)
    assert all(s.revision == current for s in subscriptions)
    encrypted_store.put("auth/A", b"value-one")
    encrypted_store.put("auth/B", b"value-two")
    for subscription in subscriptions:
        changes = collect(subscription, lambda c: len(names_added(c)) == 2)
        assert names_added(changes) == ["auth/A", "auth/B"]
        assert all(c.revision > current for c in changes)
    assert len(hub_threads()) == before + 1  # one poller for all of them
    for subscription in subscriptions:
        subscription.close()
    assert hub.subscribers == 0


def test_the_poller_starts_with_the_first_subscriber_and_idles_without_one(
    encrypted_store: EncryptedStore,
) -> None:
    hub = ChangeHub(encrypted_store, max_subscribers=2, poll_seconds=FAST)
    try:
        assert not hub.running and hub.polls == 0
        subscription = hub.subscribe()
        assert hub.running
        wait_until(lambda: hub.polls >= 2)
        subscription.close()
        polls = hub.polls
        time.sleep(20 * FAST)  # long enough for many polls, were it polling
        assert hub.polls <= polls + 1  # at most the one in progress when the last subscriber left
        assert hub.running  # idle, not dead: the next subscriber is served
        again = hub.subscribe()
        encrypted_store.put("auth/LATER", b"v")
        assert names_added(collect(again, names_added)) == ["auth/LATER"]
    finally:
        hub.close()


def test_a_subscriber_that_falls_behind_gets_resync_and_does_not_hold_up_the_others(
    encrypted_store: EncryptedStore,
) -> None:
    hub = ChangeHub(encrypted_store, max_subscribers=4, poll_seconds=FAST, queue_events=4)
    try:
        slow = hub.subscribe()  # never read while the changes arrive
        fast = hub.subscribe()
        names = [f"auth/K{i:02d}" for i in range(12)]
        seen: list[SecretChange] = []
        for name in names:  # one at a time: the reader keeps up, the other falls 12 behind
            encrypted_store.put(name, b"v")
            seen += collect(fast, lambda c, name=name: name in names_added(c))  # type: ignore[misc]
        assert names_added(seen) == names and all(c.kind is not ChangeKind.RESYNC for c in seen)
        assert fast.resyncs == 0
        backlog = slow.next_batch(0)
        assert backlog is not None and slow.resyncs >= 1
        assert backlog[0].kind is ChangeKind.RESYNC  # what it missed was dropped for one RESYNC
        assert len(backlog) <= 4  # its queue stayed bounded
        encrypted_store.put("auth/AFTER", b"v")  # and it follows the live changes again
        assert "auth/AFTER" in names_added(collect(slow, lambda c: "auth/AFTER" in names_added(c)))
    finally:
        hub.close()


def test_a_store_error_ends_every_subscription_with_it_and_polling_goes_on(
    hub: ChangeHub, encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    subscriptions = [hub.subscribe() for _ in range(2)]
    wait_until(lambda: hub.polls >= 1)
    breaker = sqlite3.connect(tmp_store_path)
    try:
        breaker.execute("ALTER TABLE changes RENAME TO changes_gone")  # the feed cannot be read
        breaker.commit()
        for subscription in subscriptions:
            wait_until(lambda s=subscription: s.next_batch(FAST) is None)  # type: ignore[misc]
            assert isinstance(subscription.error, StorageError)
            assert status_for(subscription.error) is grpc.StatusCode.UNAVAILABLE
        assert hub.subscribers == 0
        with pytest.raises(StorageError):  # a new stream fails the same way, at once
            hub.subscribe()
    finally:
        breaker.execute("ALTER TABLE changes_gone RENAME TO changes")
        breaker.commit()
        breaker.close()
    assert hub.running  # the poller did not die with the error
    again = hub.subscribe()
    encrypted_store.put("auth/RECOVERED", b"v")
    assert names_added(collect(again, names_added)) == ["auth/RECOVERED"]


def test_close_ends_every_subscription_and_stops_the_poller(hub: ChangeHub) -> None:
    subscriptions = [hub.subscribe() for _ in range(3)]
    thread = hub_threads()[-1]
    hub.close()
    assert not thread.is_alive() and not hub.running
    for subscription in subscriptions:
        assert subscription.next_batch(0) is None and subscription.error is None
    with pytest.raises(StorageError, match="shutting down"):
        hub.subscribe()


def test_the_limit_refuses_one_more_subscriber_until_one_leaves(encrypted_store: EncryptedStore) -> None:
    hub = ChangeHub(encrypted_store, max_subscribers=2, poll_seconds=FAST)
    try:
        first, _second = hub.subscribe(), hub.subscribe()
        with pytest.raises(ResourceExhaustedError, match="max_watch_streams = 2") as refused:
            hub.subscribe()
        assert status_for(refused.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "\n" not in str(refused.value)
        first.close()
        hub.subscribe().close()
        with pytest.raises(InvalidInputError):
            hub.subscribe(since_revision=-1)
    finally:
        hub.close()


def test_resume_delivers_what_changed_meanwhile_and_then_the_live_changes(
    hub: ChangeHub, encrypted_store: EncryptedStore
) -> None:
    keeps_the_poller_busy = hub.subscribe()
    first = hub.subscribe()
    encrypted_store.put("auth/SEEN", b"v")
    seen = collect(first, names_added)
    first.close()
    resume_from = seen[-1].revision
    encrypted_store.put("auth/MISSED-1", b"v")
    encrypted_store.put("auth/MISSED-2", b"v")
    collect(keeps_the_poller_busy, lambda c: len(names_added(c)) == 3)  # the hub has moved past them
    resumed = hub.subscribe(since_revision=resume_from)
    assert resumed.revision == resume_from
    encrypted_store.put("auth/LIVE", b"v")
    changes = collect(resumed, lambda c: "auth/LIVE" in names_added(c))
    assert names_added(changes) == ["auth/MISSED-1", "auth/MISSED-2", "auth/LIVE"]
    # Resuming on an idle hub (nobody subscribed) works too.
    keeps_the_poller_busy.close()
    resumed.close()
    idle_resume = hub.subscribe(since_revision=resume_from)
    assert names_added(collect(idle_resume, lambda c: len(names_added(c)) == 3)) == [
        "auth/MISSED-1",
        "auth/MISSED-2",
        "auth/LIVE",
    ]


def test_resume_ahead_of_the_hub_skips_what_the_subscriber_has_seen(encrypted_store: EncryptedStore) -> None:
    hub = ChangeHub(encrypted_store, max_subscribers=4, poll_seconds=1.0)
    try:
        other = hub.subscribe()
        wait_until(lambda: hub.polls >= 1)
        encrypted_store.put("auth/SEEN-ELSEWHERE", b"v")  # the hub polls again only in a second
        _, current = encrypted_store.changes_since(None)
        ahead = hub.subscribe(since_revision=current)  # e.g. seen through another replica's hub
        assert ahead.revision == current
        encrypted_store.put("auth/NEW", b"v")
        assert names_added(collect(ahead, names_added)) == ["auth/NEW"]
        assert names_added(collect(other, lambda c: len(names_added(c)) == 2)) == [
            "auth/SEEN-ELSEWHERE",
            "auth/NEW",
        ]
    finally:
        hub.close()


def test_resume_from_beyond_the_feed_or_past_its_trimmed_start_begins_with_resync(
    hub: ChangeHub, encrypted_store: EncryptedStore, tmp_store_path: Path
) -> None:
    _, current = encrypted_store.changes_since(None)
    never_reached = hub.subscribe(since_revision=current + 1000)  # another store's revision
    changes = collect(never_reached, bool)
    assert changes[0].kind is ChangeKind.RESYNC
    assert never_reached.revision == current
    never_reached.close()
    for i in range(3):
        encrypted_store.put(f"auth/T{i}", b"v")
    with sqlite3.connect(tmp_store_path) as trim:  # what the store does past CHANGE_LOG_RETAINED
        trim.execute("DELETE FROM changes WHERE revision <= ?", (current + 2,))
    trimmed = hub.subscribe(since_revision=current)
    changes = collect(trimmed, bool)
    assert changes[0].kind is ChangeKind.RESYNC


def test_a_resume_from_another_line_of_the_stores_history_begins_with_resync(
    hub: ChangeHub, encrypted_store: EncryptedStore
) -> None:
    """A revision kept before the store's database failed over or was restored names other changes
    in the new line of history: it cannot be resumed from, whatever its number. Before, the resume
    replayed the new line's changes after it and skipped those before it."""
    history = encrypted_store.change_history()
    assert history is not None and history.startswith("sqlite:")
    encrypted_store.put("auth/BEFORE", b"v")
    _, current = encrypted_store.changes_since(None)
    encrypted_store.put("auth/AFTER", b"v")
    same = hub.subscribe(since_revision=current, since_history=history)
    assert names_added(collect(same, names_added)) == ["auth/AFTER"]  # the same line: resumed
    same.close()
    other = hub.subscribe(since_revision=current, since_history="sqlite:0:0")
    changes = collect(other, bool)
    assert [c.kind for c in changes] == [ChangeKind.RESYNC]
    assert other.history == history and changes[0].revision == other.revision
    other.close()


# ---- config ---------------------------------------------------------------------------------------


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'policy = "policy.toml"\n{extra}\n[tls]\ncert = "c"\nkey = "k"\nclient_ca = "ca"\n')
    return path


@pytest.mark.parametrize(
    ("extra", "workers", "limit"),
    [("", 256, 240), ("max_workers = 20", 20, 4), ("max_workers = 4", 4, 1), ("max_workers = 1", 1, 1)],
)
def test_max_watch_streams_defaults_to_max_workers_minus_16(
    tmp_path: Path, extra: str, workers: int, limit: int
) -> None:
    config = load_config(_config(tmp_path, extra))
    assert (config.max_workers, config.watch_stream_limit) == (workers, limit)
    assert load_config(_config(tmp_path, extra + "\nmax_watch_streams = 1")).watch_stream_limit == 1


@pytest.mark.parametrize("value", ["0", "20", "true", '"8"'])
def test_max_watch_streams_must_leave_workers_for_other_calls(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidInputError, match=r"max_watch_streams must be 1\.\.19") as failure:
        load_config(_config(tmp_path, f"max_workers = 20\nmax_watch_streams = {value}"))
    assert "\n" not in str(failure.value)


def test_a_poke_reads_the_feed_at_once_instead_of_at_the_next_tick(encrypted_store: EncryptedStore) -> None:
    hub = ChangeHub(encrypted_store, max_subscribers=2, poll_seconds=30)
    try:
        subscription = hub.subscribe()
        wait_until(lambda: hub.polls == 1)  # the first read is done; the next tick is 30 s away
        encrypted_store.put("auth/POKED", b"v")
        started = time.monotonic()
        hub.poke()
        assert names_added(collect(subscription, names_added)) == ["auth/POKED"]
        assert time.monotonic() - started < 5
        assert hub.polls == 2
    finally:
        hub.close()


def test_the_service_pokes_its_hub_after_a_change_made_through_it(service_dir: Path) -> None:
    """With the hub's tick at 30 s, a Watch on this server hears of a put through it at once. (On
    SQLite a change made elsewhere waits for the tick: 0.2 s in service.)"""
    store = EncryptedStore.open(
        SqliteStorage(service_dir / "store.db"), PasswordUnlock(SERVICE_PASSWORD, kdf.TEST)
    )
    try:
        with in_process_server(service_dir, store, watch_tick=30) as (running, stub):
            ops = stub("ops")
            watch = ops.Watch(pb.WatchRequest(prefix="auth/"))
            assert started_revision(watch) is not None
            wait_until(lambda: running.servicer.watch_hub.polls >= 1)
            started = time.monotonic()
            ops.PutSecret(pb.PutSecretRequest(name="auth/POKED", value=b"v"), timeout=10)
            event = next(watch)
            assert (event.name, time.monotonic() - started < 5) == ("auth/POKED", True)
            watch.cancel()
    finally:
        store.close()


# ---- against a real server ------------------------------------------------------------------------


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    make_pki(tmp_path)
    make_store(tmp_path)
    return tmp_path


@pytest.fixture
def small_server(service_dir: Path) -> Iterator[Server]:
    # max_watch_streams: 20 - 16 = 4, all of which one identity may hold here (by default, half)
    running = start_server(service_dir, max_workers=20, settings="[limits]\nwatch_streams_per_identity = 4\n")
    yield running
    running.stop()


def stub_for(server: Server, identity: str) -> tuple[grpc.Channel, pb_grpc.SecretsStub]:
    files = tls_files(server.dir, identity)
    channel = grpc.secure_channel(server.address, files.credentials())
    return channel, pb_grpc.SecretsStub(channel)  # type: ignore[no-untyped-call]


def started_revision(call: grpc.Call) -> int | None:
    """The revision a Watch call says it starts after, once live; None if it ended instead."""
    for key, value in call.initial_metadata() or ():
        if key == WATCH_REVISION_KEY:
            return int(value)
    return None


def test_watch_streams_beyond_the_limit_are_refused_and_other_calls_still_run(small_server: Server) -> None:
    channel, stub = stub_for(small_server, "auth")
    calls = [stub.Watch(pb.WatchRequest(prefix="auth/")) for _ in range(20)]  # as many as workers
    try:
        live = [call for call in calls if started_revision(call) is not None]
        refused = [call for call in calls if call not in live]
        # Old behaviour: 20 streams held all 20 workers and this call queued forever.
        reply = stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=5)
        assert reply.secret.value == SEED["auth/DB_PASSWORD"]
        assert len(live) == 4 and len(refused) == 16
        for call in refused:
            assert call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            details = call.details()
            assert "max_watch_streams" in details and "max_workers" in details and "\n" not in details
        # A stream that ends gives its place to the next one.
        live[0].cancel()
        deadline = time.monotonic() + 10
        while True:
            again = stub.Watch(pb.WatchRequest(prefix="auth/"))
            calls.append(again)
            if started_revision(again) is not None:
                break
            assert again.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled stream's place was never freed"
            time.sleep(0.02)
        # Refusals are logged like any other failed request (the server's stderr is read by a thread
        # here, which a loaded machine may leave behind: CI once looked before it had the line).
        assert eventually(
            lambda: any('"code": "RESOURCE_EXHAUSTED"' in line for line in small_server.log_lines)
        )
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def test_resume_with_since_revision_receives_a_change_made_while_disconnected(
    small_server: Server, service_dir: Path
) -> None:
    reader = RemoteStore(small_server.address, tls_files(service_dir, "auth"))
    writer = RemoteStore(small_server.address, tls_files(service_dir, "writer"))
    ops = RemoteStore(small_server.address, tls_files(service_dir, "ops"))
    try:
        first = reader.watch("auth/")
        start = first.start()
        assert start is not None and first.revision == start and not first.resumed
        first.cancel()
        writer.put_version("auth/JWT_KEY", b"changed-while-away")  # nobody is watching
        ops.put_version("market-connector/BINANCE_SECRET", b"not-for-auth")
        resumed = reader.watch("auth/", since_revision=start)
        assert resumed.start() == start and resumed.resumed
        event = next(iter(resumed))
        assert (event.kind, event.name, event.version) == (ChangeKind.VERSION_ADDED, "auth/JWT_KEY", 2)
        assert resumed.revision == event.revision > start
        resumed.cancel()
        # Without since_revision the stream starts from now: the change is not replayed.
        fresh = reader.watch("auth/")
        assert fresh.start() is not None and fresh.start() >= event.revision  # type: ignore[operator]
        fresh.cancel()
    finally:
        for store in (reader, writer, ops):
            store.close()


def test_a_stream_names_its_line_of_history_and_a_resume_from_another_gets_resync(
    small_server: Server,
) -> None:
    """The service tells a stream which line of the store's history its revisions are on; a resume
    that names another (kept before a failover or a restore of the database) starts with RESYNC,
    which carries the history to resume with next time."""
    reader = RemoteStore(small_server.address, tls_files(small_server.dir, "auth"))
    try:
        first = reader.watch("auth/")
        start = first.start()
        assert start is not None and first.history is not None and first.history.startswith("sqlite:")
        first.cancel()
        same = reader.watch("auth/", since_revision=start, since_history=first.history)
        assert same.start() == start and same.resumed
        same.cancel()
        other = reader.watch("auth/", since_revision=start, since_history="postgresql:lost")
        other.start()
        event = next(iter(other))
        assert event.kind is ChangeKind.RESYNC
        assert other.history == first.history and other.revision == event.revision
        other.cancel()
    finally:
        reader.close()


def test_sigterm_ends_open_watch_streams_promptly(small_server: Server) -> None:
    channel, stub = stub_for(small_server, "auth")
    calls = [stub.Watch(pb.WatchRequest(prefix="auth/")) for _ in range(4)]
    try:
        assert all(started_revision(call) is not None for call in calls)
        ended: list[float] = []

        def drain(call: Any) -> None:
            for _ in call:
                pass
            ended.append(time.monotonic())

        readers = [threading.Thread(target=drain, args=(call,)) for call in calls]
        for reader in readers:
            reader.start()
        signalled = time.monotonic()
        small_server.process.send_signal(signal.SIGTERM)
        assert small_server.process.wait(timeout=10) == 0
        for reader in readers:
            reader.join(timeout=10)
        assert len(ended) == 4  # every stream ended cleanly (OK), not cut
        assert max(ended) - signalled < 3.0  # well inside the 5 s grace: they did not hold it up
    finally:
        channel.close()


def watch_audit(server: Server, identity: str) -> list[str]:
    """The outcomes of `identity`'s Watch calls, from the server's audit log."""
    path = server.dir / "store.audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [
        r["outcome"]
        for r in records
        if r["operation"] == "watch" and r["actor"] == f"spiffe://{TD}/{identity}"
    ]


def test_an_sdk_client_refused_a_stream_serves_its_cache_and_retries_until_it_gets_one(
    service_dir: Path,
) -> None:
    server = start_server(service_dir, max_workers=17)  # max_watch_streams: 1
    holder = Client(environ=client_environ(service_dir, "market-connector", [server.address]))
    refused = Client(environ=client_environ(service_dir, "auth", [server.address]), ttl=300)
    writer = RemoteStore(server.address, tls_files(service_dir, "writer"))
    try:
        holder.credentials()
        wait_until(lambda: watch_audit(server, "market-connector") == ["ok"])  # it has the one stream
        assert refused.credentials()["auth/JWT_KEY"].reveal() == SEED["auth/JWT_KEY"]
        wait_until(lambda: watch_audit(server, "auth")[-2:] == ["resource_exhausted"] * 2)  # retried
        served = refused.credentials()  # from its cache: the refusal is not an outage
        assert not served.stale and not refused.stale
        assert served["auth/DB_PASSWORD"].reveal() == SEED["auth/DB_PASSWORD"]
        holder.close()  # frees the stream; the refused watcher gets it on a retry (backoff <= 5 s)
        wait_until(lambda: "ok" in watch_audit(server, "auth"), timeout=15)
        new_value = b"pushed-to-the-once-refused-client"
        writer.put_version("auth/JWT_KEY", new_value)
        wait_until(lambda: refused.get("auth/JWT_KEY").value.reveal() == new_value, timeout=3)
        assert not refused.stale
    finally:
        writer.close()
        holder.close()
        refused.close()
        server.stop()


def test_an_sdk_client_refused_by_one_replica_watches_through_another(service_dir: Path) -> None:
    """A replica at its watch-stream limit sends the SDK's watcher to the next replica, so pushes
    keep arriving; without that it would retry the full one and refresh only by TTL."""
    full = start_server(service_dir, "full", max_workers=17)  # max_watch_streams: 1
    spare = start_server(service_dir, "spare")
    holder = Client(environ=client_environ(service_dir, "market-connector", [full.address]))
    client = Client(environ=client_environ(service_dir, "auth", [full.address, spare.address]), ttl=300)
    writer = RemoteStore(spare.address, tls_files(service_dir, "writer"))
    try:
        holder.credentials()
        wait_until(lambda: watch_audit(full, "market-connector") == ["ok"])  # it has full's one stream
        assert client.credentials()["auth/JWT_KEY"].reveal() == SEED["auth/JWT_KEY"]  # served by full
        wait_until(lambda: "resource_exhausted" in watch_audit(full, "auth"))
        wait_until(lambda: "ok" in watch_audit(full, "auth"))  # the shared log: spare took the stream
        new_value = b"pushed-through-the-spare-replica"
        writer.put_version("auth/JWT_KEY", new_value)
        wait_until(lambda: client.get("auth/JWT_KEY").value.reveal() == new_value, timeout=3)
        assert not client.stale
    finally:
        writer.close()
        holder.close()
        client.close()
        full.stop()
        spare.stop()
