"""`Client`, `AsyncClient` and `get_credentials()`: a cache in front of the service that is pushed
fresh values, fails over between replicas, and keeps serving through a bounded outage.

How a value reaches a caller:

- Read path. A fresh cache entry is returned at once: a dict lookup, no lock, no I/O. Otherwise one
  fetch per key at a time (single flight) goes to the service, trying each address in turn
  (failover); the address that answered is tried first next time.
- Push refresh. A watcher thread holds one Watch stream (to the first address that connects) and
  hands each change event to a refresher thread, which re-fetches that name at once: a rotated
  value is served within about a second. The jittered TTL is only a backstop for missed events.
  The first fetch waits (up to the timeout) for the first stream to go live: it then starts
  after the stream's starting revision, every change after which reaches the stream, so what it
  read needs no second read. The watcher remembers the last revision its stream reached and a
  reconnect resumes from it (`since_revision`): the service replays what changed meanwhile, so
  nothing is missed. Otherwise (a service that cannot resume, a first stream slower than the
  timeout) the refresher re-reads what was fetched before the stream went live, and a fetch in
  flight then is fetched again once it lands (a service that does not say its stream's revision:
  everything cached, now and `SETTLE_SECONDS` later). A RESYNC event (the service's change feed
  was trimmed, or this client fell behind) re-reads everything.
  A service at its watch-stream limit (or its per-identity one) refuses the stream
  (RESOURCE_EXHAUSTED): values are then refreshed by TTL only while the watcher retries with
  backoff. A call the service throttles (its identity past server.toml's [limits] rate) is sent
  again with backoff by RemoteStore for at most THROTTLED_RETRY_SECONDS, then ThrottledError:
  a cached value is served stale meanwhile, as in an outage. A service whose store has no
  change feed (Vault or AWS Secrets Manager with watch_poll_seconds = 0, or a service from before
  it polled them) refuses it for good (UNIMPLEMENTED, WatchUnsupportedError): values are refreshed
  by TTL only, so a changed value is served within the TTL, not at once; one warning, and the
  stream is asked for again only every WATCH_UNSUPPORTED_RETRY_SECONDS, not in a loop.
- Stale-if-error. When no address answers (a call failed on all of them, or the watcher cannot
  connect anywhere) an outage starts. Cached values are served, marked stale (`Client.stale`,
  `Credentials.stale`, one warning in the log), for at most `stale_if_error` seconds from its start
  and without touching the network, while the watcher reconnects with exponential backoff and
  jitter. Past the bound a read tries the service again and, if it still fails, raises a
  `StorageError` that says so. Any successful call or event ends the outage.
- A re-fetch that fails (an event's, a re-read's) is owed: the refresher tries it again with
  backoff until one succeeds, since neither a resumed stream (it replays nothing already
  delivered) nor the TTL may come soon; meanwhile reads serve the cached value marked stale, as
  in an outage and within the same bound from the first failure, never as fresh.
- Time. TTLs, the outage bound and retries count on a clock that runs while the machine sleeps
  (secrets_manager.clocks): a VM resumed after an hour's suspend re-fetches what it cached then,
  rather than serving it as fresh for the rest of its TTL.
- Renewed certificate. gRPC presents the client certificate only in a new connection's
  handshake and keeps a channel's connection for the channel's life, so a renewal needs new
  channels. The refresher stats the three files every `TLS_CHECK_SECONDS`, and a call that fails
  as a refused certificate looks ("Socket closed", a failed handshake) checks them at once (and is
  tried again, once, if they changed or another call has renewed the channels since it began).
  Changed files that `read_client_tls` accepts get new channels to every address, swapped in at
  once; calls in flight finish on the old ones, the watch stream is cancelled and resumes from its
  revision on the new ones, and the old channels close when their last call or stream ends. Files
  caught half-written (a new certificate beside the old key, an empty file) are not used: one
  warning, and they are read again when they change (a certificate not valid yet: once it is).
  A certificate near its expiry with no renewal in sight gets one warning (client/_renewal.py).
- Without an address, outside production, the same machinery runs over the local store, read-only;
  the watcher polls the store's change feed like the service does.

- fork(). A forked child (gunicorn --preload, Celery prefork) inherits the cache but not the
  watcher and refresher threads, and must not use the parent's gRPC channels (gRPC's fork support
  doc: gRPC objects made before a fork are not safe to use after it) nor its SQLite connection.
  So in the child every client drops (without closing: that would act on the parent's state)
  its backend and starts over at the next read: new channels, new threads, and the values it
  inherited expired, so that read fetches them again (or serves them stale during an outage).
  Before the fork the parent stops its threads, so none is inside a gRPC call, but keeps its
  channels open and idle: closing them then would set gRPC's own threads tearing them down, and
  a child forked meanwhile inherits the locks they hold. The parent closes them after the fork.

`AsyncClient` wraps a `Client`. A cached read is answered in the event loop (it never waits);
anything that may wait on the network or the disk runs in a worker thread (the SDK's own pool),
with concurrent misses for one key sharing one thread. One cache and one watcher then serve sync
and async callers alike, and the client is not bound to one event loop (grpc.aio channels are),
so the process-wide client behind `get_credentials()` survives `asyncio.run()` being called twice.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import wraps
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from secrets_manager.client import remote
from secrets_manager.client._backend import _Backend, _ChangeSource
from secrets_manager.client._cache import Entry, Reachability, TtlCache
from secrets_manager.client._config import (
    TTL_JITTER,
    ClientConfig,
    RemoteTarget,
    resolve_config,
)
from secrets_manager.client._credentials import Credentials, drop_tracebacks
from secrets_manager.client._local import _LocalStore
from secrets_manager.client._logging import LIVE_VALUES
from secrets_manager.client._notify import Listener, Notifier, SecretChanged, Subscription
from secrets_manager.client._replicas import _NoneServing, _ServiceReplicas
from secrets_manager.client.remote import (
    TlsFiles,
    checked_text,
)
from secrets_manager.clocks import awake_or_asleep_clock
from secrets_manager.errors import (
    AccessDeniedError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    ResourceExhaustedError,
    SecretsManagerError,
    StorageError,
    WatchUnsupportedError,
)
from secrets_manager.store import Secret, SecretMetadata
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.store.names import DEFAULT_NAMESPACE, validate_namespace
from secrets_manager.values import SecretValue

log = logging.getLogger("secrets_manager.client")

T = TypeVar("T")
V = TypeVar("V")
P = ParamSpec("P")
SETTLE_SECONDS = 0.5  # > the service's 0.2 s watch poll plus the time its stream takes to start
BACKOFF_INITIAL_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
HEALTHY_STREAM_SECONDS = 5.0  # a stream that lived this long resets the reconnect backoff
WATCH_DENIED_RETRY_SECONDS = 60.0  # a watch stream the policy refused is asked for again this often
# A service whose store has no change feed (Vault, AWS) refuses every watch stream: values refresh
# by TTL, and the stream is asked for again only this often (a service moved to a store with one).
WATCH_UNSUPPORTED_RETRY_SECONDS = 300.0
# How often the certificate files are stat'ed for a renewal. Three stat calls in the refresher
# thread, nothing on the read path, so cost does not bound it; what does is how soon a renewed
# certificate is in use. Renewers act long before expiry (SPIFFE helpers at half an SVID's hour,
# cert-manager with a third of the lifetime left), so seconds are far inside their margin, and
# a call refused the way an expired certificate is refused checks at once anyway.
TLS_CHECK_SECONDS = 5.0
# The refresher's longest wait: a thread's wait counts on the monotonic clock, which stops while
# the machine sleeps, so a retry or certificate check due on the clock that runs on (a suspend)
# is looked at this soon after waking rather than a whole wait later.
REFRESH_WAKE_SECONDS = 1.0
_EVERYTHING = "*"  # refresher job: re-read all that is cached ('*' is never a secret name)
# Listings (the names a credentials() call returns) are cached by the prefix they were fetched
# with: _ALL for every name the caller may read, "ns/" for one namespace's. As refresher jobs and
# debts these keys never clash with a secret's name (never empty, never ending in '/').
_ALL = ""
_RENEWAL = "?tls"  # refresher job: have the certificate files been renewed? (never a secret name)


# ---- what an error carries out of the SDK -----------------------------------------------------


def _frames_withheld(method: Callable[P, T]) -> Callable[P, T]:
    """A method whose errors leave without the frames below it in their tracebacks (the public
    ones that are not on the cache-hit path, and the network paths under those that are).

    Those frames' locals hold values: a page of secrets read before a later page failed, the
    value a put was writing. Error trackers and rich tracebacks show every frame's locals (Sentry
    by default), so the error is raised again from here with no traceback below this call, and
    the exceptions chained to it lose theirs; their messages, which never hold values, stay."""

    @wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            error = exc
        del args, kwargs  # the caller's own arguments: not shown again in this frame
        drop_tracebacks(error)
        raise error  # outside the except block: nothing new is chained to it

    return call


# ---- where values come from ------------------------------------------------------------------
# A backend (client/_backend.py): the service's replicas (client/_replicas.py), or the local store
# (client/_local.py).


def _no_answer_now(error: SecretsManagerError) -> bool:
    """Whether `error` from a read says the service cannot answer now (its store changed under it,
    a corrupt or locked store, an internal error), not something about the secret or the request
    (not found, denied, invalid), so the cached value stands in for it, marked stale."""
    return not isinstance(error, (NotFoundError, AccessDeniedError, InvalidInputError))


# ---- background work ---------------------------------------------------------------------------


class _Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling to a cap."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._delay = BACKOFF_INITIAL_SECONDS

    def next_delay(self) -> float:
        delay = self._delay
        self._delay = min(BACKOFF_MAX_SECONDS, delay * 2)
        return delay / 2 + self._rng.random() * delay / 2

    def reset(self) -> None:
        self._delay = BACKOFF_INITIAL_SECONDS


class _Flight:
    """The lock of one key's fetch and how many requests for the key hold or wait for it."""

    __slots__ = ("lock", "requests")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0


class _RefreshQueue:
    """Keys to re-fetch and when; `take_due` blocks until some are due (or `wake`)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._woken = False

    def schedule(self, key: str, at: float | None = None) -> None:
        with self._condition:
            heapq.heappush(self._heap, (self._clock() if at is None else at, next(self._order), key))
            self._condition.notify()

    def schedule_once(self, key: str, at: float) -> None:
        """`schedule`, unless `key` is pending already: a retry, whose failure schedules the
        next one, so each failure adding one beside those pending would multiply them."""
        with self._condition:
            if any(pending == key for _, _, pending in self._heap):
                return
            heapq.heappush(self._heap, (at, next(self._order), key))
            self._condition.notify()

    def take_due(self) -> set[str]:
        with self._condition:
            while not self._woken:
                now = self._clock()
                if self._heap and self._heap[0][0] <= now:
                    due = set()
                    while self._heap and self._heap[0][0] <= now:
                        due.add(heapq.heappop(self._heap)[2])
                    return due
                self._condition.wait(
                    min(self._heap[0][0] - now, REFRESH_WAKE_SECONDS) if self._heap else None
                )
            return set()

    def wake(self) -> None:
        with self._condition:
            self._woken = True
            self._condition.notify_all()


# ---- the client --------------------------------------------------------------------------------


class Client:
    """The secrets this service may read, cached, pushed fresh, failing over between replicas.

    Safe to share between threads. Each argument left out comes from the environment (see
    `secrets_manager.client._config`): `addresses` ("host:port,host:port" or a list), `tls` (the
    client certificate), `ttl` (seconds a value is trusted without asking), `stale_if_error`
    (seconds the last good values are served while no service answers), `timeout` (seconds per
    call to one address), `environ` (instead of os.environ). Nothing is contacted until the first
    read. Call `close()` (or use `with`) to stop its threads."""

    def __init__(
        self,
        addresses: str | Sequence[str] | None = None,
        *,
        tls: TlsFiles | None = None,
        ttl: float | None = None,
        stale_if_error: float | None = None,
        timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config: ClientConfig = resolve_config(
            addresses, tls=tls, ttl=ttl, stale_if_error=stale_if_error, timeout=timeout, environ=environ
        )
        self._clock = clock = awake_or_asleep_clock()  # TTLs count a suspend (module docstring)
        self._rng = random.Random()  # noqa: S311 (spreading refreshes and retries, not a secret)
        self._secrets: TtlCache[str, Secret] = TtlCache(
            self._config.ttl, jitter=TTL_JITTER, clock=clock, rng=self._rng
        )
        self._listing: TtlCache[str, frozenset[str]] = TtlCache(
            self._config.ttl, jitter=TTL_JITTER, clock=clock, rng=self._rng
        )
        self._reach = Reachability(self._config.stale_if_error, clock=clock)
        self._snapshots: dict[str | None, tuple[tuple[Any, ...], str, Credentials]] = {}
        self._write_lock = threading.RLock()  # every cache write; reads take no lock
        self._flights: dict[str, _Flight] = {}  # only keys with a request in flight
        self._flights_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._backend: _Backend | None = None
        self._paused_backend: _Backend | None = None  # from before a fork until just after it
        self._queue = _RefreshQueue(clock)
        self._closed = threading.Event()
        # close() was called (not a pause for fork(), which sets _closed too): reads raise at once
        self._shut = False
        self._threads: list[threading.Thread] = []
        self._stream: _ChangeSource | None = None
        self._stream_lock = threading.Lock()
        self._live_since: float | None = None
        # While a stream is live: a fetch that started before this (monotonic) time may predate a
        # change the stream never reports, so one stored after it is fetched again.
        self._covered_since: float | None = None
        # Set once the watcher's first stream went live (or its attempt failed): a first fetch
        # waits for it, so it starts after the stream's revision and needs no re-read.
        self._first_stream = threading.Event()
        # Why the watcher's first attempt found no address serving (each health check failed or
        # went unanswered for the timeout): the first reads waiting for it fail with it, rather
        # than ask each address again for a timeout each (N + 1 timeouts in all, before).
        self._first_stream_error: StorageError | None = None
        # Refreshes that failed and are owed: key (a name, or a listing's prefix) -> (start of
        # the first failed attempt, attempts failed). Copy-on-write under _write_lock, read without.
        self._owed: dict[str, tuple[float, int]] = {}
        self._notifier = Notifier()
        _CLIENTS.add(self)

    # ---- reading ---------------------------------------------------------------------------------

    def credentials(self, namespace: str | None = None) -> Credentials:
        """Every secret the caller may read (BatchGetSecrets), by full name; with `namespace`,
        only that namespace's secrets, by their names inside it ('BINANCE_API_KEY'), fetched by
        the prefix 'namespace/' (the service reads nothing else; 'default', whose names have no
        '/', is picked out of everything)."""
        if self._shut:
            raise _closed_error()
        if namespace is not None:
            validate_namespace(namespace)
        hit = self._cached_credentials(namespace)
        return hit if hit is not None else self._load_credentials(namespace)

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """One secret (GetSecret): the current version from the cache; a given version or label
        ('previous', 'pending') is always asked of the service."""
        if self._shut:
            raise _closed_error()
        checked_text(name, "secret name")  # before the cache: a list is unhashable, bytes miss
        if version is None and label is None:
            entry = self._secrets.get(name)
            if entry is not None and self._reach.outage_since is None and self._clock() < entry.fresh_until:
                return entry.value
            hit = self._cached_secret(name)
            return hit if hit is not None else self._load_secret(name)
        secret = self._uncached(lambda backend: backend.fetch(name, version=version, label=label))
        LIVE_VALUES.remember(secret.value)  # served, never cached: remembered for log redaction
        return secret

    @_frames_withheld
    def describe(self, name: str) -> SecretMetadata:
        """Metadata and version history (DescribeSecret); never cached, never a value."""
        return self._uncached(lambda backend: backend.describe(name))

    @_frames_withheld
    def list(self, prefix: str = "", *, include_deleted: bool = False) -> list[SecretMetadata]:
        """Metadata of the secrets under `prefix` the caller may list (ListSecrets); never cached."""
        return self._uncached(lambda backend: backend.list(prefix, include_deleted=include_deleted))

    @_frames_withheld
    def put(
        self,
        name: str,
        value: bytes | str | SecretValue,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        expires: datetime | None = None,
    ) -> int:
        """Write a new version (PutSecret) when the caller's role may; returns its number.
        `expires`: when this value stops working (a time with a zone), shown by `describe` and
        `get` as `expires` while this version is current.

        It goes to another replica only if the first surely did not make it (it could not be
        reached, or refused before writing); if its answer was lost mid-call, StorageError says
        the outcome is unknown, rather than risk making it twice (two versions of one value, and
        `previous` no longer the value it replaced). With `expect_version` it fails over like a
        read: a second try cannot double it; refused after a first try whose answer was lost, it is
        OutcomeUnknownError (the first may have made it), not ConflictError."""
        data = _value_bytes(value)
        LIVE_VALUES.remember(SecretValue(data))  # this process has it: a log record may quote it
        version = self._uncached(
            lambda backend: backend.put(
                name, data, expect_version=expect_version, description=description, tags=tags, expires=expires
            )
        )
        with self._write_lock:  # read your own write: the next read asks the service
            self._secrets.outdate(name)
            self._secrets.expire(name)
            for key in list(self._listing.entries()):
                if name.startswith(key):
                    self._listing.expire(key)
        return version

    def on_change(self, callback: Listener, prefix: str = "") -> Subscription:
        """Call `callback(SecretChanged)` whenever a secret under `prefix` that this client reads
        (by name, or by a namespace or everything it asked for) changes, is added under such a
        namespace, or goes: after the new value is cached, so `get`/`credentials` in the callback
        already see it. For an exchange key or a database password in use beyond one call: log
        in again, open new connections. The callback gets names and versions, never a value; it
        runs on a thread of the client's own, one change at a time. `cancel()` the returned
        subscription to stop it."""
        if not callable(callback):
            raise InvalidInputError(f"callback must be callable, not {type(callback).__name__}")
        if not isinstance(prefix, str):
            raise InvalidInputError(f"prefix must be a str, not {type(prefix).__name__}")
        return self._notifier.add(prefix, callback)

    @property
    def stale(self) -> bool:
        """True while no service answers, or a value known to have changed could not be fetched
        again yet: reads serve the last good values, for at most the stale-if-error bound from the
        moment the outage (or the failed re-fetch) began."""
        return self._reach.outage_since is not None or bool(self._owed)

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the watcher and refresher threads and close the connections (or local store)."""
        with self._start_lock:
            self._shut = True  # first: no read is answered from the cache from now on
            if self._closed.is_set():
                return
            self._closed.set()
            self._first_stream.set()  # no read waits for a watcher that is stopping
            threads, backend = list(self._threads), self._backend
        with self._stream_lock:
            if self._stream is not None:
                self._stream.cancel()
        self._queue.wake()
        for thread in threads:  # a call in flight ends within the timeout
            thread.join(timeout=self._config.timeout + 5)
        if backend is not None:
            backend.close()
        self._notifier.close()

    def _pause_for_fork(self) -> bool:
        """Before fork(): stop the watcher and refresher, so no thread of this client is inside
        gRPC when the process forks. gRPC's fork support (GRPC_ENABLE_FORK_SUPPORT) skips its
        fork handlers when other threads are calling into it, and a child forked so could hang
        for good in its post-fork handler. The channels stay open until after the fork: closing
        them sets gRPC's own threads tearing them down (and, for the last channels, shutting
        gRPC down), and a child forked during that inherits the locks those threads hold, so its
        first channel waits for good (see `_resume_after_fork_in_parent`).
        `_start_lock` stays held until after the fork, so no read starts new channels meanwhile.
        Whether there was anything to stop (the parent then starts it again)."""
        self._start_lock.acquire()
        backend, threads = self._backend, list(self._threads)
        if backend is None or self._closed.is_set():
            return False  # the lock stays held: released by _resume_after_fork_in_parent
        self._closed.set()  # the threads' loops end
        self._start_lock.release()
        with self._stream_lock:
            if self._stream is not None:
                self._stream.cancel()
        self._queue.wake()
        for thread in threads:  # a call in flight ends within the timeout; not under _start_lock
            thread.join(timeout=self._config.timeout + 5)  # (a refresh may be waiting for it)
        self._start_lock.acquire()  # released by _resume_after_fork_in_parent
        self._paused_backend = backend  # closed in the parent once the fork is done
        self._backend, self._threads, self._stream, self._live_since = None, [], None, None
        self._covered_since = None
        self._closed, self._queue = threading.Event(), _RefreshQueue(self._clock)
        return True

    def _resume_after_fork_in_parent(self, paused: bool) -> None:
        """After fork() in the parent: the channels of before the fork close (the child has its
        own copy of them, which it never uses), and new channels and threads start, as after a
        first read. The new stream re-reads everything cached (nothing may be missed while
        paused), and what was owed is tried again."""
        backend, self._paused_backend = self._paused_backend, None
        self._start_lock.release()
        if not paused:
            return
        if backend is not None:
            backend.close()
        try:
            self._started_backend()
        except SecretsManagerError as exc:  # the next read starts it again
            log.warning("restarting the secrets-manager client after fork() failed: %s", exc)
            return
        for key in list(self._owed):
            self._queue.schedule(key)

    def _after_fork_in_child(self) -> None:
        """Only the thread that forked survives: locks other threads held stay held, and the
        watcher and refresher are gone. New locks and queue; the backend is kept referenced but
        never used or closed here, and the next read starts a new one (see the module doc)."""
        self._write_lock = threading.RLock()
        self._flights, self._flights_lock = {}, threading.Lock()
        self._start_lock, self._stream_lock = threading.Lock(), threading.Lock()
        self._queue, self._closed = _RefreshQueue(self._clock), threading.Event()  # not set: checked
        self._first_stream = threading.Event()  # its first read waits for its own first stream
        self._first_stream_error = None
        self._rng.seed()  # else every worker would jitter its TTLs and backoffs exactly alike
        self._owed = {}  # every value is expired: the next read fetches it
        self._notifier.reset_after_fork()
        self._secrets.reset_after_fork()
        self._listing.reset_after_fork()
        self._reach.reset_after_fork()
        for backend in (self._backend, self._paused_backend):
            if backend is not None:
                _LEFT_BY_FORK.append(backend)
        self._paused_backend = None
        self._backend, self._threads, self._stream, self._live_since = None, [], None, None
        self._covered_since = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", stale=True" if self.stale else ""
        return f"Client({self._config.description!r}{state})"

    # ---- the read path ---------------------------------------------------------------------------

    def _cached_credentials(self, namespace: str | None) -> Credentials | None:
        """What `credentials()` returns if that needs no I/O; else None. Never blocks."""
        used = _ALL if namespace is None else _listing_key(namespace)  # the hot path: no call for None
        listing = self._listing.get(used)
        if listing is None and used != _ALL:  # a namespace served from the listing of everything
            used, listing = _ALL, self._listing.get(_ALL)
        if listing is None:
            return None
        now = self._clock()
        if self._reach.outage_since is None:
            if now >= listing.fresh_until:
                return None
            owed = self._owed
            if owed:  # a listed value changed and its re-fetch failed: stale, and being retried
                # (the listing of everything is re-read for a namespace's too: its debt is theirs)
                since = min(
                    (owed[key][0] for key in owed if key in (used, _ALL) or key in listing.value),
                    default=None,
                )
                if since is not None:
                    if self._owed_servable(since, now):
                        return self._snapshot(namespace, used, stale=True)
                    return None
            return self._snapshot(namespace, used, stale=False)
        if self._reach.may_serve_stale(now):
            return self._snapshot(namespace, used, stale=True)
        return None

    def _listing_for(self, namespace: str | None) -> str | None:
        """The cached listing that holds `namespace`'s names: its own, else every name's."""
        own = _listing_key(namespace)
        if self._listing.get(own) is not None:
            return own
        if own != _ALL and self._listing.get(_ALL) is not None:
            return _ALL
        return None

    def _cached_secret(self, name: str) -> Secret | None:
        """What `get(name)` returns if that needs no I/O; else None. Never blocks."""
        entry = self._secrets.get(name)
        if entry is None:
            return None
        now = self._clock()
        if self._reach.outage_since is None:
            if now < entry.fresh_until:
                return entry.value
            owed = self._owed.get(name)
            return entry.value if owed is not None and self._owed_servable(owed[0], now) else None
        return entry.value if self._reach.may_serve_stale(now) else None

    def _owed_servable(self, since: float, now: float) -> bool:
        """Whether a value whose re-fetch has failed since `since` may still be served (stale): as
        during an outage, for at most the stale-if-error bound."""
        return now < since + self._config.stale_if_error

    @_frames_withheld
    def _load_credentials(self, namespace: str | None) -> Credentials:
        key = _listing_key(namespace)
        unserved = self._await_first_stream()
        with self._flight(key):
            hit = self._cached_credentials(namespace)  # another thread may just have fetched
            if hit is not None:
                return hit
            with self._secrets.fetching() as started:
                try:
                    if unserved is not None:
                        raise unserved
                    secrets = self._call(lambda backend: backend.fetch_all(key))
                except StorageError as exc:
                    used = self._listing_for(namespace)
                    if used is not None and self._reach.may_serve_stale(self._clock()):
                        return self._snapshot(namespace, used, stale=True)
                    raise self._unavailable(exc, cached=used is not None) from None
                except (NotFoundError, AccessDeniedError):
                    # Refused (an identity the service no longer gives a role): what the listing held
                    # is forgotten, as the refresher forgets it, so no later outage serves it stale.
                    self._forget_listing(key)
                    raise
                except SecretsManagerError as exc:
                    used = self._listing_for(namespace)
                    if not _no_answer_now(exc) or used is None:
                        raise
                    self._owe(key, started, exc, by_read=True)
                    if self._owed_servable(self._owed.get(key, (started, 0))[0], self._clock()):
                        return self._snapshot(namespace, used, stale=True)
                    raise
                self._store_all(secrets, started, key)
                return self._snapshot(namespace, key, stale=False, fetched=secrets)

    @_frames_withheld
    def _load_secret(self, name: str) -> Secret:
        unserved = self._await_first_stream()
        with self._flight(name):
            hit = self._cached_secret(name)
            if hit is not None:
                return hit
            with self._secrets.fetching() as started:
                try:
                    if unserved is not None:
                        raise unserved
                    secret = self._call(lambda backend: backend.fetch(name))
                except StorageError as exc:
                    entry = self._secrets.get(name)
                    if entry is not None and self._reach.may_serve_stale(self._clock()):
                        return entry.value
                    raise self._unavailable(exc, cached=entry is not None) from None
                except (NotFoundError, AccessDeniedError):
                    self._forget(name)
                    raise
                except SecretsManagerError as exc:
                    entry = self._secrets.get(name)
                    if not _no_answer_now(exc) or entry is None:
                        raise
                    self._owe(name, started, exc, by_read=True)
                    if self._owed_servable(self._owed.get(name, (started, 0))[0], self._clock()):
                        return entry.value
                    raise
                self._store_secret(secret, started)
                return secret

    def _snapshot(
        self, namespace: str | None, key: str, *, stale: bool, fetched: Sequence[Secret] | None = None
    ) -> Credentials:
        """Credentials from one generation of the cache (the listing `key`), built once per
        generation."""
        # Stale snapshots also hang on what is owed and on the outage: they say which values are
        # stale and since when (the dict of debts is copy-on-write: the same object, the same debts).
        owed, outage = (self._owed, self._reach.outage_since) if stale else (None, None)
        generation = (self._secrets.generation, self._listing.generation, stale, owed, outage)
        cached = self._snapshots.get(namespace)
        if cached is not None and cached[0] == generation and cached[1] == key:
            return cached[2]
        entries = self._secrets.entries()
        listing = self._listing.get(key)
        if listing is not None:
            values = {name: entries[name].value.value for name in sorted(listing.value) if name in entries}
        else:  # only when the fetch just made was older than one stored meanwhile (rare)
            values = {secret.name: secret.value for secret in fetched or ()}
        stale_since = self._stale_since(values, key) if stale else {}
        credentials = Credentials(
            _in_namespace(values, namespace),
            stale=stale,
            stale_since=_in_namespace(stale_since, namespace),
            clock=self._clock,
        )
        self._snapshots[namespace] = (generation, key, credentials)
        return credentials

    def _stale_since(self, names: Iterable[str], key: str) -> dict[str, float]:
        """Since when (the client's clock) each of `names`, from the listing `key`, has been
        served without the service vouching for it: the outage's start for every name during one;
        otherwise the start of the first failed re-fetch owed for it, its own or its listing's.
        A name owed nothing is absent: fresh, though others beside it are stale."""
        outage = self._reach.outage_since
        if outage is not None:
            return dict.fromkeys(names, outage)
        owed = self._owed
        listed = [owed[each][0] for each in (key, _ALL) if each in owed]
        since: dict[str, float] = {}
        for name in names:
            times = listed + ([owed[name][0]] if name in owed else [])
            if times:
                since[name] = min(times)
        return since

    def _await_first_stream(self) -> StorageError | None:
        """Before the first fetch: start the backend and give the watcher's first stream up to the
        timeout to go live (a health check and the stream's first answer, milliseconds on a
        service that answers). Every change after the stream's starting revision reaches it and
        a fetch begun after that sees every change up to it, so nothing fetched needs reading
        again (before, the whole cache was re-read once the stream was live: every secret read,
        and audited, twice per start). If the stream is not live in time the fetch goes ahead
        and what it read is read again once the stream is (`_reload_after_connect`).

        If that attempt found no address serving (each was asked at once, after a head start, and
        none said SERVING within the timeout: hung, stopped, refusing), that error: the read fails
        with it (or serves what it inherited, stale) rather than ask each address again for a
        timeout each, so a first read with every address hung ends after one timeout, not N + 1."""
        if self._first_stream.is_set():
            return None
        try:
            self._started_backend()
        except SecretsManagerError:
            return None  # the fetch raises it, where its callers expect it
        target = self._config.target
        # The attempt's health checks: the timeout, plus each later address's head start (and a
        # margin for a loaded machine: the attempt ends by itself, this only bounds the wait).
        heads = len(target.addresses) - 1 if isinstance(target, RemoteTarget) else 0
        if not self._first_stream.wait(self._config.timeout + heads * remote.HEAD_START_SECONDS + 1.0):
            return None
        return self._first_stream_error

    @contextmanager
    def _flight(self, key: str) -> Iterator[None]:
        """At most one fetch per key at a time; the others wait for it and use its result. A key's
        entry lives only while requests for it are in flight, so names asked for once (missing
        ones included) leave nothing behind."""
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
            flight.requests += 1
        try:
            with flight.lock:
                yield
        finally:
            with self._flights_lock:
                flight.requests -= 1
                if flight.requests == 0 and self._flights.get(key) is flight:
                    del self._flights[key]

    def _call(self, operation: Callable[[_Backend], T]) -> T:
        """One operation on the backend, recording whether any service answered."""
        backend = self._started_backend()
        try:
            result = operation(backend)
        except OutcomeUnknownError:  # a change that may have been made: some service took it, or
            raise  # another refused it (answered); no outage to mark the cache stale for
        except StorageError as exc:
            self._unreachable(exc)
            raise
        self._reachable()
        return result

    @_frames_withheld
    def _uncached(self, operation: Callable[[_Backend], T]) -> T:
        """A call that no cached value can stand in for."""
        try:
            return self._call(operation)
        except OutcomeUnknownError:  # a service answered, or may have: its own words say what to do
            raise
        except StorageError as exc:
            raise StorageError(
                f"no secrets-manager service answered ({self._config.description}): {exc}"
            ) from None

    def _unreachable(self, error: SecretsManagerError) -> None:
        if self._reach.failed():
            if self._live_since is not None:  # the stream is up, so no reconnect will end this
                self._queue.schedule_once(_EVERYTHING, self._clock() + BACKOFF_INITIAL_SECONDS)
            if not self._secrets.entries() and not self._listing.entries():  # a start with it down
                serving = "nothing is cached yet: reads fail until one does"
            elif self._config.stale_if_error == 0:
                serving = "serving stale values is turned off (stale_if_error=0): reads fail until one does"
            else:
                serving = f"serving cached values, marked stale, for up to {self._config.stale_if_error:g} s"
            log.warning(
                "no secrets-manager service answered (%s); %s: %s", self._config.description, serving, error
            )

    def _reachable(self) -> None:
        if self._reach.succeeded():
            log.info("secrets-manager service answering again (%s)", self._config.description)

    def _unavailable(self, error: SecretsManagerError, *, cached: bool) -> StorageError:
        if not cached:
            why = "and nothing is cached for this read"
        elif self._config.stale_if_error == 0:
            why = "and serving stale values is turned off (stale_if_error=0)"
        else:
            why = (
                f"for longer than the stale-if-error bound of {self._config.stale_if_error:g} s, "
                "so cached values are no longer served"
            )
        return StorageError(
            f"no secrets-manager service answered ({self._config.description}) {why}: {error}"
        )

    # ---- cache writes ----------------------------------------------------------------------------

    def _store_all(
        self, secrets: Sequence[Secret], started: float, key: str, *, refresh: bool = False
    ) -> None:
        """A fresh listing `key`: every readable secret under its prefix, replacing the old listing
        in one swap. Other listings learn of the names it found and lost under their prefixes.
        on_change callbacks hear what differs from what was cached (a read after the client's own
        put, or after a TTL, included); `refresh` (the refresher's, not a read's): also the names
        new to the client, which a first read's are not."""
        by_name = {secret.name: secret for secret in secrets}
        LIVE_VALUES.remember(*(secret.value for secret in secrets))
        with self._write_lock:
            before = self._secrets.entries()
            old = self._listing.get(key)
            dropped = old.value - by_name.keys() if old is not None else frozenset()
            stored = self._secrets.put_many(by_name, started=started, drop=dropped)
            entries = self._secrets.entries()
            vouched_later = {name for name in dropped if name in entries and entries[name].started > started}
            self._listing.put(key, frozenset(by_name) | vouched_later, started=started)
            gone = dropped - vouched_later
            for other, listing in list(self._listing.entries().items()):
                if other == key:
                    continue
                names = listing.value
                added = {name for name in stored if name.startswith(other) and name not in names}
                removed = names & gone
                if added or removed:
                    self._listing.replace_value(other, (names | added) - removed)
            # The listing of everything also updated each namespace's listing (above): their
            # debts are paid with it (a retry of one taken with a re-read of everything is not run).
            self._paid({key, *by_name, *dropped, *(self._listing.entries() if key == _ALL else ())}, started)
            # Names changed while this fetch was in flight (a change event outdated them) and not
            # cached: listed, yet with no value to serve. Kept expired (what this fetch read: the
            # listing, and every Credentials made of it, holds each of its names) and fetched
            # again at once; not one removed meanwhile (destroyed, denied), whose re-fetch drops it.
            refetch = [name for name in by_name if name not in self._secrets.entries()]
            if refetch:
                self._secrets.put_outdated({name: by_name[name] for name in refetch}, started=started)
            after = self._secrets.entries()
        dropped_now = sorted(name for name in gone if name in before and name not in after)
        if dropped_now:  # names are not secret: say which, since a policy reload can be why
            log.info(
                "secrets-manager (%s): %s no longer include (deleted, or no longer readable by this "
                "identity), dropped from the cache: %s",
                self._config.description,
                _what(key),
                ", ".join(dropped_now),
            )
        if self._notifier.listening:
            changed = [
                _changed(name, before.get(name), by_name[name])
                for name in stored
                if refresh or name in before
            ]
            changed += [
                _changed(name, before[name], None) for name in gone if name in before and name not in after
            ]
            self._notifier.publish(change for change in changed if change is not None)
        for name in refetch:
            self._queue.schedule(name)
        self._settle(key, started)

    def _store_secret(self, secret: Secret, started: float, *, refresh: bool = False) -> None:
        """Cache a fetched `secret`; on_change as for `_store_all`."""
        LIVE_VALUES.remember(secret.value)
        change = None
        with self._write_lock:
            before = self._secrets.get(secret.name)
            if self._secrets.put(secret.name, secret, started=started):
                for key, listing in list(self._listing.entries().items()):
                    if secret.name.startswith(key) and secret.name not in listing.value:
                        self._listing.replace_value(key, listing.value | {secret.name})
                change = _changed(secret.name, before, secret) if refresh or before is not None else None
            self._paid({secret.name}, started)
        if change is not None:
            self._notifier.publish([change])
        self._settle(secret.name, started)

    def _owe(
        self,
        key: str,
        started: float,
        error: SecretsManagerError,
        *,
        by_read: bool = False,
        said: bool = False,
    ) -> None:
        """A re-fetch of `key` (a name, or a listing's prefix) that started at `started` failed.
        Until one started later succeeds, reads serve the cached value marked stale (within the
        stale-if-error bound), and the refresher tries again with backoff: no later event, stream
        or TTL may come to do it (a resumed stream replays nothing already delivered). The same
        whether the service did not answer (StorageError: an outage, warned about as such) or
        answered that it cannot now (a store changed under it: ABORTED, DATA_LOSS; warned here).
        `by_read`: from the read path, which starts a retry only if none is under way. `said`: the
        error was warned about already (a re-read of everything that stopped at its first failure).
        Nothing is owed once the client is closed: its refreshes fail for that reason alone."""
        if self._closed.is_set():
            return
        with self._write_lock:
            debt = self._owed.get(key)
            since, failures = debt if debt is not None else (started, 0)
            self._owed = {**self._owed, key: (since, failures + 1)}
        if debt is None and not said and not isinstance(error, StorageError):
            log.warning(
                "secrets-manager (%s) could not give %s; serving the cached value, marked "
                "stale, and asking again: %s",
                self._config.description,
                _what(key),
                error,
            )
        if by_read and debt is not None:
            return  # the refresher's retries are under way
        # (2 ** failures unbounded overflowed a float after 1024 failures: 85 minutes at the cap)
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** min(failures, 16))
        delay = delay / 2 + self._rng.random() * delay / 2
        self._queue.schedule_once(key, self._clock() + delay)  # one retry of a key at a time

    def _paid(self, keys: Iterable[str], started: float) -> None:
        """A fetch of `keys` that started at `started` succeeded: what it covers is owed no more.
        (Under _write_lock.)"""
        owed = self._owed
        if owed:
            remaining = {key: debt for key, debt in owed.items() if key not in keys or started < debt[0]}
            if len(remaining) != len(owed):
                self._owed = remaining

    def _forget(self, name: str) -> None:
        """`name` is gone (destroyed, deleted, no longer readable): out of the cache, and its
        on_change callbacks told, if it was cached."""
        with self._write_lock:
            before = self._secrets.get(name)
            if name in self._owed:
                self._owed = {key: debt for key, debt in self._owed.items() if key != name}
            self._secrets.discard(name)
            for key, listing in list(self._listing.entries().items()):
                if name in listing.value:
                    self._listing.replace_value(key, listing.value - {name})
        if before is not None:
            self._notifier.publish([SecretChanged(name, None, before.value.version)])

    def _forget_listing(self, key: str) -> None:
        """The listing `key` (that of everything: every listing) may no longer be read: it and the
        names it held are forgotten (their on_change callbacks told), so a read fetches them
        again and raises what it is told."""
        with self._write_lock:
            keys = [key] if key != _ALL else list(self._listing.entries())
            names = {name for each in keys if (listing := self._listing.get(each)) for name in listing.value}
            for each in keys:
                self._listing.discard(each)
            self._owed = {other: debt for other, debt in self._owed.items() if other not in keys}
        if names:
            log.warning(
                "secrets-manager (%s) refused this identity %s; no longer served, cached copies dropped: %s",
                self._config.description,
                _what(key),
                ", ".join(sorted(names)),
            )
        for name in sorted(names):
            self._forget(name)

    def _settle(self, key: str, started: float) -> None:
        """A fetch that began before the stream had surely started, stored after that (and after
        the re-read of what was cached then), may predate a change the stream never reports:
        fetch it again."""
        covered_since = self._covered_since
        if covered_since is not None and started < covered_since <= self._clock():
            self._queue.schedule(key)

    # ---- background threads ----------------------------------------------------------------------

    def _started_backend(self) -> _Backend:
        backend = self._backend
        if backend is not None and not self._closed.is_set():
            return backend
        with self._start_lock:
            if self._closed.is_set():
                raise (
                    _closed_error()
                    if self._shut
                    else InvalidInputError("this secrets-manager client is closed")
                )
            if self._backend is None:
                target = self._config.target
                if isinstance(target, RemoteTarget):
                    self._backend = _ServiceReplicas(target, self._config.timeout)
                    _register_fork_pause()
                    self._queue.schedule(_RENEWAL, self._clock() + TLS_CHECK_SECONDS)
                else:
                    self._backend = _LocalStore(target)
                for name, run in (("watch", self._watch), ("refresh", self._refresh_forever)):
                    thread = threading.Thread(target=run, name=f"secrets-manager-{name}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            return self._backend

    def _watch(self) -> None:
        """Hold a change stream; on loss reconnect at once (failover), then with backoff, resuming
        from the last revision the stream reached."""
        backend = self._backend
        assert backend is not None
        backoff = _Backoff(self._rng)
        resume: int | None = None  # every change up to this revision has reached `_on_change`
        resume_history: str | None = None  # the line of the store's history `resume` is on
        refusals = 0  # streams refused in a row (the service at its watch-stream limit)
        denials = 0  # streams denied in a row (this identity holds no role in the service's policy)
        unsupported = 0  # streams refused in a row by a service whose store has no change feed
        while not self._closed.is_set():
            try:
                stream = backend.open_watch(resume, resume_history)
            except StorageError as exc:
                if isinstance(exc, _NoneServing) and not self._first_stream.is_set():
                    self._first_stream_error = exc
                self._first_stream.set()  # a first fetch waits for this attempt only
                self._unreachable(exc)
                self._pause(backoff.next_delay())
                continue
            except AccessDeniedError as exc:
                self._first_stream.set()
                denials += 1
                self._watch_denied(exc, denials)
                continue
            except WatchUnsupportedError as exc:
                self._first_stream.set()
                unsupported += 1
                self._watch_unsupported(exc, unsupported)
                continue
            except SecretsManagerError as exc:
                self._first_stream.set()
                log.warning("cannot watch for changes (%s): %s", self._config.description, exc)
                self._pause(backoff.next_delay())
                continue
            with self._stream_lock:
                if self._closed.is_set():
                    stream.close()
                    return
                self._stream = stream
            opened = self._clock()
            self._live_since = opened
            try:
                # Wait until the service says the stream is live and whether it took up `resume`
                # (a refused stream raises here, before it costs the service a re-read).
                stream.start()
                if stream.moved:  # renewed while it connected: to the new channels at once
                    continue
                self._reachable()  # it answered: an outage ends even if no event follows
                if not stream.resumed:
                    self._reload_after_connect(opened, self._clock(), known=stream.revision is not None)
                self._first_stream.set()
                for change in stream:
                    self._reachable()
                    self._on_change(change)
                if stream.moved:
                    log.debug("watch stream moving to the channels of the renewed certificate")
                else:
                    log.debug("watch stream ended by the service, reconnecting")
            except ResourceExhaustedError as exc:
                backend.watch_refused()  # try the other replicas first next time
                refusals += 1
                (log.warning if refusals == 1 else log.debug)(
                    "watch stream refused, retrying with backoff (values refresh by TTL): %s", exc
                )
            except StorageError as exc:
                log.info("watch stream lost, reconnecting: %s", exc)
            except AccessDeniedError as exc:
                denials += 1
                self._watch_denied(exc, denials)
                continue
            except WatchUnsupportedError as exc:
                unsupported += 1
                self._watch_unsupported(exc, unsupported)
                continue
            except SecretsManagerError as exc:
                log.warning("watch stream failed, reconnecting: %s", exc)
            finally:
                self._first_stream.set()  # a first fetch waits for this attempt only
                with self._stream_lock:
                    self._stream = None
                self._live_since = self._covered_since = None
                stream.close()  # its channels may close now, if a renewal replaced them
                if stream.revision is not None:  # the stream went live
                    resume, resume_history = stream.revision, stream.history
                    refusals = denials = unsupported = 0
            if stream.moved:
                continue  # not a failure: no backoff
            if self._clock() - opened >= HEALTHY_STREAM_SECONDS:
                backoff.reset()
            else:
                self._pause(backoff.next_delay())

    def _pause(self, seconds: float) -> None:
        """Wait `seconds` on the clock that counts a suspend, or until closed. A thread's wait
        counts on the monotonic clock, which stops while the machine sleeps: a 60 s retry begun
        before an hour's suspend would still be 60 s away on waking. Waiting in slices of
        REFRESH_WAKE_SECONDS and reading the clock after each ends it soon after the wake-up."""
        until = self._clock() + seconds
        while (left := until - self._clock()) > 0:
            if self._closed.wait(min(left, REFRESH_WAKE_SECONDS)):
                return

    def _watch_denied(self, error: AccessDeniedError, denials: int) -> None:
        """The service refused this identity a watch stream (it holds no role in the policy, or its
        certificate was revoked), or ended the one it had (a reload took its last role): ask
        again only every WATCH_DENIED_RETRY_SECONDS, so a policy that grants one is picked up but
        the service's audit log and ours do not get a refusal every few seconds. Said once.
        What is cached is read again at once, as after a RESYNC (no event says what went): the
        service refuses this identity every call now, so those reads drop what it may no longer
        read, and reads raise AccessDeniedError rather than serve it until the TTL."""
        if denials == 1:
            self._queue.schedule(_EVERYTHING)
        (log.warning if denials == 1 else log.debug)(
            "secrets-manager (%s) may not watch for changes (values refresh by TTL only; asking again "
            "every %g s): %s",
            self._config.description,
            WATCH_DENIED_RETRY_SECONDS,
            error,
        )
        self._pause(WATCH_DENIED_RETRY_SECONDS)

    def _watch_unsupported(self, error: WatchUnsupportedError, refusals: int) -> None:
        """The service's store has no change feed (Vault or AWS with its polled feed turned off,
        or a service from before it): no stream will come, so values are refreshed by TTL only.
        Said once (a warning), and asked again only every
        WATCH_UNSUPPORTED_RETRY_SECONDS, so neither the service's audit log nor ours gets a refusal
        every few seconds."""
        (log.warning if refusals == 1 else log.debug)(
            "secrets-manager (%s) cannot push changes (values refresh by TTL only, so a changed value "
            "is served within the TTL; asking again every %g s): %s",
            self._config.description,
            WATCH_UNSUPPORTED_RETRY_SECONDS,
            error,
        )
        self._pause(WATCH_UNSUPPORTED_RETRY_SECONDS)

    def _reload_after_connect(self, opened: float, live: float, *, known: bool) -> None:
        """A stream that did not resume went live at `live`: changes before its starting revision
        were not sent. What was fetched before then may predate one of them, so it is read again:
        each listing, and each secret outside them, still served fresh and fetched before `live`
        (a first start fetches after the stream is live: nothing; after a lost stream the service
        could not resume: everything cached). A fetch in flight now is fetched again once it lands
        (`_settle`). A service that does not say the stream's revision (one from before it): all
        cached, now and once the stream has surely started (SETTLE_SECONDS)."""
        if not known:
            self._covered_since = opened + SETTLE_SECONDS
            self._queue.schedule(_EVERYTHING)
            self._queue.schedule(_EVERYTHING, opened + SETTLE_SECONDS)
            return
        self._covered_since = live  # first: a fetch landing during the scan below is caught there
        listed: set[str] = set()
        for key, listing in list(self._listing.entries().items()):
            if listing.started < live < listing.fresh_until:
                self._queue.schedule(key)
                listed |= listing.value
        for name, entry in list(self._secrets.entries().items()):
            if name not in listed and entry.started < live < entry.fresh_until:
                self._queue.schedule(name)

    def _on_change(self, change: SecretChange) -> None:
        if change.kind is ChangeKind.RESYNC:
            self._queue.schedule(_EVERYTHING)
            return
        # A fetch begun before now must not be stored: without this floor an answer in flight
        # lands after the change, a destroyed secret included, and is served as fresh until the
        # TTL ends. Also for a name not cached yet: its first read may be the fetch in flight.
        self._secrets.outdate(change.name)
        if change.kind is ChangeKind.SECRET_DESTROYED:
            self._forget(change.name)
        elif change.name in self._secrets.entries() or any(
            change.name.startswith(key) for key in self._listing.entries()
        ):
            self._queue.schedule(change.name)

    def _refresh_forever(self) -> None:
        probes = _Backoff(self._rng)
        while not self._closed.is_set():
            due = self._queue.take_due()
            if _RENEWAL in due:
                due.discard(_RENEWAL)
                self._check_renewal()
            if _EVERYTHING in due:
                self._refresh_everything()
            else:
                for key in due:
                    if _is_listing(key):
                        self._refresh_listing(key)
                    else:
                        self._refresh(key)
            if self._reach.outage_since is None:
                probes.reset()
            elif due and self._live_since is not None:
                # A call failed while the stream stayed up (a blip, a hung replica): keep asking,
                # with backoff, so the outage ends when the service answers, not at the bound.
                # One probe at a time: every step with work due came here, each adding another.
                self._queue.schedule_once(_EVERYTHING, self._clock() + probes.next_delay())

    def _check_renewal(self) -> None:
        """Every TLS_CHECK_SECONDS: new channels if the certificate files were renewed."""
        backend = self._backend
        try:
            if backend is not None:
                backend.renew_tls()
        except Exception as exc:  # never end the refresher; the next check tries again
            log.warning("checking the client certificate files for a renewal failed: %s", exc)
        self._queue.schedule(_RENEWAL, self._clock() + TLS_CHECK_SECONDS)

    def _refresh_everything(self) -> None:
        """Every cached listing (by its prefix), then every cached name no listing holds. With the
        listing of everything cached, only that one: it holds (and updates) the others' names.
        Once one fails, the rest is not asked for now (while no service answers each would cost
        the timeout), but owed like it: served marked stale, never as fresh until its TTL, and
        each retried with backoff until it is read (no later event or stream may come to do it)."""
        keys = list(self._listing.entries())
        listings = [_ALL] if _ALL in keys else keys
        for index, key in enumerate(listings):
            started = self._clock()
            error = self._refresh_listing(key)
            if error is not None:
                for other in listings[index + 1 :]:
                    self._owe(other, started, error, said=True)
                for name in self._unlisted():
                    self._secrets.expire(name)
                    self._owe(name, started, error, said=True)
                return
        for name in self._unlisted():
            self._refresh(name)

    def _unlisted(self) -> tuple[str, ...]:
        """The cached names no cached listing holds (read by name alone)."""
        listed = {name for listing in self._listing.entries().values() for name in listing.value}
        return tuple(name for name in self._secrets.entries() if name not in listed)

    def _refresh_listing(self, key: str) -> SecretsManagerError | None:
        """Fetch the listing `key` again; None if that succeeded (or was refused for good), else
        why not (it is owed)."""
        with self._secrets.fetching() as started:
            try:
                secrets = self._call(lambda backend: backend.fetch_all(key))
            except (NotFoundError, AccessDeniedError):
                # A listing by prefix is filtered, never refused, but for an identity the service
                # refuses every call (no role left, a revoked certificate): nothing under it may be
                # read any more, as a secret read by name that is refused is forgotten (`_refresh`).
                # Not owed: retried every few seconds, each refusal audited, to no end.
                self._forget_listing(key)
                return None
            except SecretsManagerError as exc:
                log.debug("refresh of %s failed: %s", _what(key), exc)
                self._owe(key, started, exc)
                return exc
            self._store_all(secrets, started, key, refresh=True)
            return None

    def _refresh(self, name: str) -> None:
        with self._secrets.fetching() as started:
            try:
                secret = self._call(lambda backend: backend.fetch(name))
            except (NotFoundError, AccessDeniedError):
                self._forget(name)
                return
            except SecretsManagerError as exc:
                log.debug("refresh of %s failed: %s", name, exc)
                self._secrets.expire(name)
                self._owe(name, started, exc)  # served stale until a retry succeeds
                return
            self._store_secret(secret, started, refresh=True)


def _changed(name: str, before: Entry[Secret] | None, after: Secret | None) -> SecretChanged | None:
    """What on_change callbacks hear of `name` going from the cached `before` to `after` (None:
    gone); None if nothing they would see changed (the same version and value, fetched again)."""
    previous = before.value if before is not None else None
    if after is None:
        return SecretChanged(name, None, previous.version) if previous is not None else None
    if previous is not None and previous.version == after.version and previous.value == after.value:
        return None
    return SecretChanged(name, after.version, previous.version if previous is not None else None)


def _closed_error() -> InvalidInputError:
    """A read of a closed client: raised at once, as by a closed file, rather than answered from
    a cache that no watcher keeps fresh any more."""
    return InvalidInputError(
        "this secrets-manager client is closed: it serves nothing, cached values included; "
        "read through a client that is open (after close_default_client(), get_credentials() "
        "makes a new one)"
    )


def _value_bytes(value: bytes | str | SecretValue) -> bytes:
    """The bytes to write. Not UnicodeEncodeError for text that is not Unicode (a lone
    surrogate): it would carry the whole text (`.object`) and show it in its repr."""
    raw = value.reveal() if isinstance(value, SecretValue) else value
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    if not isinstance(raw, str):  # its type only: the object's text could be the value
        raise InvalidInputError(f"the value must be bytes, str or SecretValue, not {type(raw).__name__}")
    try:
        return raw.encode("utf-8")
    except UnicodeEncodeError:
        pass  # raised below, outside this block: not even as its suppressed context
    raise InvalidInputError("the value is text that UTF-8 cannot encode (a lone surrogate): pass bytes")


def _listing_key(namespace: str | None) -> str:
    """The listing (and the prefix it is fetched with) that holds `namespace`'s secrets: its own,
    'namespace/'; every secret for None, and for the default namespace, whose names have no '/'
    (no prefix selects just those)."""
    if namespace is None or namespace == DEFAULT_NAMESPACE:
        return _ALL
    return f"{namespace}/"


def _is_listing(key: str) -> bool:
    """Whether a refresher job or debt `key` is a listing (else it is a secret's name)."""
    return key == _ALL or key.endswith("/")


def _what(key: str) -> str:
    """A refresher job or debt, as a log line names it."""
    if key == _ALL:
        return "the secrets"
    return f"the secrets under {key}" if key.endswith("/") else key


def _in_namespace(values: Mapping[str, V], namespace: str | None) -> dict[str, V]:
    if namespace is None:
        return dict(values)
    if namespace == DEFAULT_NAMESPACE:
        return {name: value for name, value in values.items() if "/" not in name}
    prefix = f"{namespace}/"
    return {name[len(prefix) :]: value for name, value in values.items() if name.startswith(prefix)}


# ---- fork() ---------------------------------------------------------------------------------------

_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()  # every client of this process, not kept alive
_LEFT_BY_FORK: list[_Backend] = []  # a parent's backends, in a child: referenced, so never finalised


_PAUSED_FOR_FORK: list[tuple[Client, bool]] = []  # in the forking thread, between before and after


def _before_fork() -> None:
    for client in list(_CLIENTS):
        try:
            paused = client._pause_for_fork()
        except Exception as exc:  # never stop the fork; the client starts over at its next read
            log.warning("pausing the secrets-manager client for fork() failed: %s", exc)
            paused = False
        _PAUSED_FOR_FORK.append((client, paused))


def _after_fork_in_parent() -> None:
    paused, _PAUSED_FOR_FORK[:] = list(_PAUSED_FOR_FORK), []
    for client, was_running in paused:
        client._resume_after_fork_in_parent(was_running)


def _after_fork_in_child() -> None:
    _PAUSED_FOR_FORK.clear()
    for client in list(_CLIENTS):
        if not client._closed.is_set():
            client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
_fork_pause_lock = threading.Lock()
_fork_pause_registered = False


def _register_fork_pause() -> None:
    """Register the before/after-in-parent hooks once gRPC has registered its own (at its first
    channel): `before` hooks run in reverse order of registration, so ours cancels the watch stream
    and stops the client's threads before gRPC's marks a fork in progress (after which gRPC would
    hold them back until the fork is done)."""
    global _fork_pause_registered
    with _fork_pause_lock:
        if not _fork_pause_registered:
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)
            _fork_pause_registered = True
