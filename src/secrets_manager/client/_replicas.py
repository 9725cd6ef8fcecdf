"""The service at one or more addresses, as a `Client`'s backend: a call goes to the address that
answered last and moves on to the next when one cannot answer, never making a change twice; the
watch stream goes to the first address whose health check says SERVING; renewed certificate files
replace every channel at once, and old channels close when their last call or stream ends.

`CHANNEL_OPTIONS` are the SDK's gRPC channel settings (reconnect and keepalive), which the CLI's
long-lived connections use too."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TypeVar

from secrets_manager.client._backend import _ChangeSource
from secrets_manager.client._config import RemoteTarget
from secrets_manager.client._renewal import CertificateFiles
from secrets_manager.client.remote import (
    ChangeStream,
    RemoteStore,
    at_address,
    channel_credentials,
    first_serving,
)
from secrets_manager.errors import (
    ChangeUnrecordedError,
    ConflictError,
    ConnectionClosedError,
    HandshakeFailedError,
    NotConnectedError,
    OutcomeUnknownError,
    ResourceExhaustedError,
    SecretsManagerError,
    StorageError,
    StoreBusyError,
)
from secrets_manager.store import Secret, SecretMetadata
from secrets_manager.store.changes import SecretChange
from secrets_manager.tls.files import ClientTlsFiles
from secrets_manager.wire import MIN_PING_INTERVAL_WITHOUT_DATA_MS

T = TypeVar("T")
KEEPALIVE_TIME_MS = MIN_PING_INTERVAL_WITHOUT_DATA_MS + 1_000  # a margin over the service's minimum
KEEPALIVE_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS = (
    # Retry a lost connection within a couple of seconds, not gRPC's default of up to two minutes.
    # (Not grpc.min_reconnect_backoff_ms: gRPC also uses it as the connect timeout, TLS included.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a replica that hangs (stopped, blackholed: its TCP connection stays open, nothing
    # answers) within KEEPALIVE_TIME + KEEPALIVE_TIMEOUT: a ping unanswered that long fails the
    # connection and its calls, the watch stream included, which then fails over. Without it a
    # watch stream on a hung replica waits forever and pushes nothing. Pings go only while a call
    # or stream is open (keepalive_permit_without_calls stays 0), at most as often as the service
    # permits on a connection that sends no data (wire.MIN_PING_INTERVAL_WITHOUT_DATA_MS; more often
    # would be answered GOAWAY too_many_pings), and with no cap on pings without data (gRPC's
    # default, 2, would stop them on an idle watch stream). gRPC 1.85 waits for a keepalive ping's
    # ack as long as for any ping (grpc.http2.ping_timeout_ms, default 1 min), not keepalive_timeout
    # alone: both are set.
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
)


class _Channels:
    """One channel (RemoteStore) per address, all made from one reading of the certificate files.

    `users` counts the calls and watch streams on them; once newer channels replace these
    (`retired`), they are closed when the last of those ends, never under a call in flight."""

    def __init__(self, replicas: list[RemoteStore]) -> None:
        self.replicas = replicas
        self.users = 0
        self.retired = False
        self.streams: set[_HeldStream] = set()

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


class _HeldStream:
    """A watch stream that keeps its channels open until the watcher is done with it (`close`).
    `moved`: cancelled because newer channels replaced its own (a renewed certificate), so the
    watcher reconnects at once, resuming where this one stopped."""

    def __init__(
        self, stream: ChangeStream, channels: _Channels, done: Callable[[_HeldStream], None]
    ) -> None:
        self._stream = stream
        self.channels = channels
        self._done = done
        self._closed = False
        self.moved = False

    @property
    def revision(self) -> int | None:
        return self._stream.revision

    @property
    def history(self) -> str | None:
        return self._stream.history

    def start(self) -> int | None:
        return self._stream.start()

    @property
    def resumed(self) -> bool:
        return self._stream.resumed

    def __iter__(self) -> Iterator[SecretChange]:
        return iter(self._stream)

    def cancel(self) -> None:
        self._stream.cancel()

    def move(self) -> None:
        self.moved = True
        self._stream.cancel()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._done(self)


class _ServiceReplicas:
    """The service at one or more addresses. A call goes to the address that answered last and
    moves on to the next when one cannot give an answer (unreachable, timed out, unavailable);
    a definite answer (not found, denied, invalid, conflict) is final.

    `renew_tls` replaces every channel at once when the certificate files were renewed; calls and
    the watch stream on the old channels finish there (the stream is cancelled, to move), then
    the old channels close. A call that fails as a refused certificate looks checks the files at
    once and, if they were renewed (by this call or another since it began), is tried again on
    the new channels."""

    def __init__(self, target: RemoteTarget, timeout: float) -> None:
        self._timeout = timeout
        self._addresses = target.addresses
        self._files = CertificateFiles(target.tls)
        self._lock = threading.Lock()  # _current, _open, _closed and every _Channels' users/streams
        self._renew_lock = threading.Lock()  # one renewal at a time, so an older one never wins
        self._closed = False
        self._current = self._make_channels(self._files.loaded)
        # Channels not closed yet, kept referenced: a forked child must never finalise them.
        self._open: list[_Channels] = [self._current]
        self._preferred = 0
        self._watching: int | None = None  # the replica of the last watch stream opened
        self._watch_refused_by: int | None = None

    def _make_channels(self, files: ClientTlsFiles) -> _Channels:
        credentials = channel_credentials(files)
        replicas: list[RemoteStore] = []
        try:
            for address in self._addresses:
                replicas.append(
                    RemoteStore(
                        address,
                        self._files.tls,
                        timeout=self._timeout,
                        options=CHANNEL_OPTIONS,
                        credentials=credentials,
                    )
                )
        except BaseException:
            _Channels(replicas).close()
            raise
        return _Channels(replicas)

    def _take(self) -> _Channels:
        with self._lock:
            channels = self._current
            channels.users += 1
            return channels

    def _give_back(self, channels: _Channels) -> None:
        with self._lock:
            channels.users -= 1
            finished = channels.retired and channels.users == 0 and channels in self._open
            if finished:
                self._open.remove(channels)
        if finished:
            channels.close()

    def _in_order(self, channels: _Channels) -> list[tuple[int, RemoteStore]]:
        start = self._preferred
        indexed = list(enumerate(channels.replicas))
        return indexed[start:] + indexed[:start]

    def _call(
        self,
        operation: Callable[[RemoteStore], T],
        *,
        renewed: bool = False,
        at_most_once: bool = False,
        change: bool = False,
        maybe_made: str | None = None,
    ) -> T:
        """`operation` at the first replica that answers. `change`: it changes the store;
        `at_most_once`: a change that must not be made twice goes on to the next replica only if
        the one before surely did not make it. `maybe_made`: where an earlier try (before a
        certificate renewal) may have made it. A change that may have been made and was then
        refused as a conflict, or answered nowhere, is OutcomeUnknownError."""
        failures: list[str] = []
        refused = False
        channels = self._take()
        try:
            for index, replica in self._in_order(channels):
                try:
                    result = operation(replica)
                except SecretsManagerError as exc:
                    if type(exc) is ConflictError and maybe_made is not None:
                        # A compare-and-set sent again: refused, maybe because the first try made it.
                        raise OutcomeUnknownError(
                            f"{maybe_made}; sent again to {replica.address}, which refused it "
                            f"({exc}): the change may have been made by the first try. Read the "
                            "secret's history before writing again"
                        ) from None
                    if not _worth_another_address(exc):
                        raise
                    if at_most_once and not _surely_not_made(exc):
                        if isinstance(exc, OutcomeUnknownError):  # it says so, and where, already
                            raise
                        raise OutcomeUnknownError(
                            f"{replica.address}: {exc}; the change may have been made there before "
                            "its answer was lost, so it was not sent to another replica: read the "
                            "secret's history before writing again (a put with expect_version can "
                            "be retried safely)"
                        ) from None
                    refused = refused or isinstance(exc, HandshakeFailedError)
                    said = str(exc)
                    failures.append(
                        said if said.startswith(replica.address) else f"{replica.address}: {said}"
                    )
                    if change and maybe_made is None and not _surely_not_made(exc):
                        maybe_made = failures[-1]
                    continue
                self._preferred = index
                return result
        finally:
            self._give_back(channels)
        if refused and not renewed and self._renew(refused_on=channels):
            return self._call(
                operation, renewed=True, at_most_once=at_most_once, change=change, maybe_made=maybe_made
            )
        if maybe_made is not None:
            raise OutcomeUnknownError(
                f"{'; '.join(failures)}; the change may have been made where its answer was lost: read the "
                "secret's history before writing again"
            )
        raise StorageError("; ".join(failures))

    def fetch_all(self, prefix: str = "") -> list[Secret]:
        """BatchGetSecrets with no names: every secret under `prefix` the caller's certificate may
        read (the service reads only that part of its store)."""
        return self._call(lambda replica: replica.get_many(prefix=prefix))

    def fetch(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """GetSecret."""
        return self._call(lambda replica: replica.get(name, version=version, label=label))

    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None,
        description: str | None,
        tags: Mapping[str, str] | None,
        expires: datetime | None = None,
    ) -> int:
        """PutSecret. Without `expect_version`, sent to one replica after another only while
        none can have made it (made twice it would be two versions, and `previous` would lose the
        value it held); with it, a second try cannot double it (it is refused, ABORTED: raised as
        OutcomeUnknownError when the first try may have made it, never as a conflict)."""
        return self._call(
            lambda replica: replica.put_version(
                name,
                value,
                expect_version=expect_version,
                description=description,
                tags=tags,
                expires=expires,
            ),
            at_most_once=expect_version is None,
            change=True,
        )

    def describe(self, name: str) -> SecretMetadata:
        """DescribeSecret."""
        return self._call(lambda replica: replica.describe(name))

    def list(self, prefix: str, *, include_deleted: bool) -> list[SecretMetadata]:
        """ListSecrets."""
        return self._call(lambda replica: replica.list(prefix, include_deleted=include_deleted))

    def open_watch(
        self, since_revision: int | None = None, since_history: str | None = None
    ) -> _ChangeSource:
        """Watch, on the first address whose health check says SERVING within the timeout, each
        asked after the one before has had a head start (`first_serving`; the replicas share one
        store, so a stream resumes `since_revision` on any of them). A replica
        that refused the last stream (at its watch-stream limit) is asked only once no other
        serves: raced beside them, its quick SERVING would beat a healthy replica slower than the
        head start, and refuse the stream again. The stream holds its channels open until the
        watcher closes it."""
        channels = self._take()
        try:
            order = self._in_order(channels)
            refused = [pair for pair in order if pair[0] == self._watch_refused_by]
            found: tuple[int, RemoteStore] | None = None
            whys: list[str] = []  # why each address did not serve, if none does
            for group in ([pair for pair in order if pair[0] != self._watch_refused_by], refused):
                chosen = first_serving([replica for _, replica in group], self._timeout) if group else None
                if chosen is not None and chosen.index is not None:
                    found = group[chosen.index]
                    break
                if chosen is not None:
                    whys += [
                        at_address(why, r.address) for why, (_, r) in zip(chosen.reasons, group, strict=False)
                    ]
            if found is not None:
                index, replica = found
                self._preferred = self._watching = index
                watched = replica.watch(
                    since_revision=since_revision,
                    since_history=since_history,
                    # Another replica may serve: a start held by this one's silent store is
                    # given up once it says NOT_SERVING, not after the store's 30 s timeout.
                    check_health=self._timeout if len(self._addresses) > 1 else None,
                )
                stream = _HeldStream(watched, channels, self._ended)
                with self._lock:
                    channels.streams.add(stream)
                    replaced = channels.retired
                if replaced:  # renewed while this one connected: move at once
                    stream.move()
                return stream
        except BaseException:
            self._give_back(channels)
            raise
        self._give_back(channels)
        # Each address's reason, as the CLI gives them: a replica whose certificate this client's CA
        # does not trust (half-way through a CA rotation) was "not serving" with nothing that said so.
        reasons = f" ({'; '.join(whys)})" if whys else ""
        raise _NoneServing(
            f"no service is serving at {', '.join(replica.address for _, replica in order)}{reasons}"
        )

    def _ended(self, stream: _HeldStream) -> None:
        with self._lock:
            stream.channels.streams.discard(stream)
        self._give_back(stream.channels)

    def watch_refused(self) -> None:
        """The stream just opened was refused: its replica is at its watch-stream limit."""
        self._watch_refused_by = self._watching

    def renew_tls(self) -> None:
        """New channels if the certificate files were renewed and are usable (see `_renew`)."""
        self._renew()

    def _renew(self, *, refused_on: _Channels | None = None) -> bool:
        """Whether the certificate files changed into usable ones and now back new channels.
        Also true when `refused_on` (where a call was refused) was already replaced: calls refused
        together find the files unchanged after the first one renewed, yet are worth a retry."""
        with self._renew_lock:
            with self._lock:
                if refused_on is not None and refused_on is not self._current and not self._closed:
                    return True
            files = self._files.renewed()
            if files is None:
                return False
            fresh = self._make_channels(files)
            with self._lock:
                if self._closed:  # closed meanwhile: nothing to swap into
                    swapped, idle, moving = False, fresh, []
                else:
                    old, self._current = self._current, fresh
                    self._open.append(fresh)
                    old.retired = True
                    swapped, idle, moving = True, old, list(old.streams)
                    if old.users:
                        idle = None  # the last call or stream on them closes them
                    else:
                        self._open.remove(old)
            for stream in moving:  # the watcher reconnects on the new channels
                stream.move()
            if idle is not None:
                idle.close()
            return swapped

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._open = self._open, []
        for each in channels:
            each.close()


class _NoneServing(StorageError):
    """No address said SERVING to the health checks of `_ServiceReplicas.open_watch`, asked of
    them all at once (after head starts), each for the timeout."""


def _worth_another_address(error: SecretsManagerError) -> bool:
    # StorageError is UNAVAILABLE / DEADLINE_EXCEEDED (and a server whose store failed); the base
    # class is any status without a meaning of ours (RESOURCE_EXHAUSTED, INTERNAL, ...). A change
    # made whose audit record failed is not: made again elsewhere, it would be made twice.
    if isinstance(error, ChangeUnrecordedError):
        return False
    return isinstance(error, StorageError) or type(error) is SecretsManagerError


def _surely_not_made(error: SecretsManagerError) -> bool:
    """Whether the request that failed with `error` surely changed nothing: it never reached a
    server (no connection, or the TLS handshake failed), or the server refused it before writing
    (its store's lock was busy, a limit was reached)."""
    if isinstance(error, ConnectionClosedError):  # maybe refused in the handshake, maybe mid-call
        return False
    return isinstance(
        error, (NotConnectedError, HandshakeFailedError, StoreBusyError, ResourceExhaustedError)
    )
