"""Prometheus metrics: requests by method and status code, a latency histogram per unary method,
the lives of Watch streams in a histogram of their own, and what an operator alerts on (health
checks, audit failures, certificate expiry, scheduled rotations). No label ever holds a secret's
name, a value or a client's address."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from secrets_manager.errors import SecretsManagerError, StorageError
from secrets_manager.store.base import SecretMetadata, expiry_counts

ROTATION_OUTCOMES = ("rotated", "resumed", "failed")
EXPIRY_STATES = ("expired", "within_7d")
EXPIRY_SOON = timedelta(days=7)


def version() -> str:
    """The installed distribution's version (secrets_manager.__version__ imports the SDK)."""
    try:
        return metadata.version("secrets-manager")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


class Metrics:
    """Own registry per server, exposed on `listen` (HOST:PORT) when given."""

    def __init__(self, listen: str | None) -> None:
        self.registry = CollectorRegistry()
        # What the default registry has: process_* (open and max file descriptors, memory, CPU,
        # start time), python_info and python_gc_*. The collectors hold no state of their own.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        Gauge(
            "secrets_manager_build_info",
            "Always 1; the labels say which version of secrets-manager is running.",
            ["version"],
            registry=self.registry,
        ).labels(version()).set(1)
        self.requests = Counter(
            "secrets_manager_requests",
            "gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "secrets_manager_request_seconds",
            "gRPC request latency in seconds, by method (unary calls; Watch streams are not in it).",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        # A stream's life is not a latency: hours of a healthy Watch would swamp the quantiles of
        # the method, so Watch streams have their own buckets, where short lives show churn.
        self.stream_lives = Histogram(
            "secrets_manager_watch_stream_seconds",
            "How long Watch streams lived, from the call to its end (refused ones too), in seconds.",
            registry=self.registry,
            buckets=(0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600),
        )
        self.watch_streams = Gauge(
            "secrets_manager_watch_streams",
            "Watch streams open now (each holds a worker thread; refused past max_watch_streams).",
            registry=self.registry,
        )
        self.watch_stream_limit = Gauge(
            "secrets_manager_watch_streams_limit",
            "max_watch_streams: Watch streams past it are refused (RESOURCE_EXHAUSTED). Alert on "
            "secrets_manager_watch_streams / this.",
            registry=self.registry,
        )
        self.scheduled_rotations = Counter(
            "secrets_manager_scheduled_rotations",
            "Scheduled rotations attempted, by outcome (rotated, resumed, failed).",
            ["outcome"],
            registry=self.registry,
        )
        # The schedule's gauges exist only while a schedule is in force (start_rotation_counts): a
        # last pass at 0 on a service without one would fire every "no pass for N s" alert.
        self.rotations_failing: Gauge | None = None
        self.schedule_pass: Gauge | None = None
        self.certificate_expiry = Gauge(
            "secrets_manager_tls_certificate_expiry_timestamp_seconds",
            "When the server's TLS certificate in force expires (Unix time); alert on it minus time().",
            registry=self.registry,
        )
        self.health_checks = Gauge(
            "secrets_manager_health_check_ok",
            "Whether a health check passes (1) or fails (0), by check: store (a store read answers "
            "in time), audit (the audit log can be written). Any 0: health is NOT_SERVING.",
            ["check"],
            registry=self.registry,
        )
        self.probe_seconds = Histogram(
            "secrets_manager_health_check_seconds",
            "How long each health check's probe took, by check (store: a store read; audit: an "
            "empty audit append), every 2 s whatever the traffic.",
            ["check"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.throttled = Counter(
            "secrets_manager_throttled_requests",
            "Requests refused (RESOURCE_EXHAUSTED) because their identity was past its request rate "
            "(server.toml [limits]), by method. Not audited one by one: see the `throttled` records.",
            ["method"],
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "secrets_manager_audit_failures",
            "Requests' audit records the audit log refused (could not write in time): each such "
            "request was refused, or (a change) made but reported unrecorded.",
            registry=self.registry,
        )
        self.reload_failures = Counter(
            "secrets_manager_config_reload_failures",
            "Reloads of a file that were rejected (the one in force stays), by file: policy, tls "
            "(SIGHUP), rotation_schedule (re-read at each pass; a file counted once per new error), config "
            "(server.toml changed at a SIGHUP: its settings need a restart).",
            ["file"],
            registry=self.registry,
        )
        self.reload_ok = Gauge(
            "secrets_manager_config_last_reload_successful",
            "Whether the last reload of a file was taken (1) or rejected (0: the one in force is "
            "older than the file), by file: policy, tls, rotation_schedule, config (0: server.toml says "
            "other than the settings in force, which only a restart takes).",
            ["file"],
            registry=self.registry,
        )
        self.client_ca_expiry = Gauge(
            "secrets_manager_tls_client_ca_expiry_timestamp_seconds",
            "When the first CA certificate in the client_ca in force expires (Unix time): client "
            "certificates it signed are refused from then on. Alert on it minus time().",
            registry=self.registry,
        )
        self.client_expiry_notices = Counter(
            "secrets_manager_client_certificate_expiry_warnings",
            "Client certificates seen ending within 7 days, each counted (and logged, event "
            "tls.client_certificate_expiring) at most once a day.",
            registry=self.registry,
        )
        self.anchor_lag = Gauge(
            "secrets_manager_audit_anchor_lag_seconds",
            "How long audit records this service wrote and fsynced have waited for the store's "
            "anchor to reach them (0: none waits; the store busy or unreachable makes it grow).",
            registry=self.registry,
        )
        self.audit_disk_free = Gauge(
            "secrets_manager_audit_disk_free_bytes",
            "Bytes free on the filesystem of the audit log (-1: cannot be read). Every request writes a "
            "record and is refused if it cannot: alert well before 0 (health turns NOT_SERVING below "
            "64 KiB).",
            registry=self.registry,
        )
        self.expiring = Gauge(
            "secrets_manager_secrets_expiring",
            "Secrets whose current version has an expiry (store --expires) that has passed "
            "(state=expired) or comes within 7 days (state=within_7d); computed at each scrape, "
            "NaN while the store cannot be listed. Alert on any expired.",
            ["state"],
            registry=self.registry,
        )
        # Label children by key, so a request does not look them up under the metric's lock.
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._histograms: dict[str, Any] = {}
        self._http: Any = None
        if listen:
            host, _, port = listen.rpartition(":")
            try:
                self._http = _serve_metrics(host, int(port), self.registry)
            except OSError as exc:  # in use, or not an address of this host: not a bug of ours
                raise StorageError(
                    f"cannot listen on {listen} for metrics (metrics_listen): "
                    f"{exc.strerror or type(exc).__name__}"
                ) from None

    def observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """A unary call that ended with `code`, `started` at this `time.perf_counter()`."""
        elapsed = time.perf_counter() - started
        histogram = self._histograms.get(method)
        if histogram is None:
            histogram = self._histograms[method] = self.latency.labels(method)
        self._count(method, code)
        histogram.observe(elapsed)

    def observe_stream(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """A Watch stream that ended (refused, failed, cancelled or closed) with `code`."""
        elapsed = time.perf_counter() - started
        self._count(method, code)
        self.stream_lives.observe(elapsed)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = self.requests.labels(method, code.name)
        counter.inc()

    def start_rotation_counts(self) -> None:
        """Show every outcome's count at 0 while a schedule is in force: a series that appears
        only at the first rotation (weeks later) makes `absent()` alerts fire, and `increase()`
        miss that first one."""
        for outcome in ROTATION_OUTCOMES:
            self.scheduled_rotations.labels(outcome)
        self._schedule_gauges()

    def _schedule_gauges(self) -> tuple[Gauge, Gauge]:
        if self.rotations_failing is None or self.schedule_pass is None:
            self.rotations_failing = Gauge(
                "secrets_manager_scheduled_rotations_failing",
                "Schedule entries whose rotation is failing (failed at its last try, retried with "
                "backoff; or blocked by a stale pending version another staged) at the end of the last "
                "schedule pass; 0 once each succeeds.",
                registry=self.registry,
            )
            self.schedule_pass = Gauge(
                "secrets_manager_schedule_last_pass_timestamp_seconds",
                "When the last schedule pass ended (Unix time): a pass stuck, or a schedule thread "
                "gone, leaves due rotations undone.",
                registry=self.registry,
            )
        return self.rotations_failing, self.schedule_pass

    def schedule_passed(self, failing: int) -> None:
        """A schedule pass ended with `failing` entries failing."""
        rotations_failing, schedule_pass = self._schedule_gauges()
        rotations_failing.set(failing)
        schedule_pass.set_to_current_time()

    def count_rotation(self, outcome: str) -> None:
        """Count a scheduled rotation that ran (a skipped or not-due entry is not counted)."""
        if outcome in ROTATION_OUTCOMES:
            self.scheduled_rotations.labels(outcome).inc()

    def count_watch_streams(self, open_streams: Callable[[], int], limit: int) -> None:
        """Read the open Watch streams from `open_streams` at every scrape; show their `limit`."""
        self.watch_streams.set_function(open_streams)
        self.watch_stream_limit.set(limit)

    def track_certificate_expiry(
        self, not_valid_after: Callable[[], float], client_ca_not_valid_after: Callable[[], float]
    ) -> None:
        """Read the server certificate's end and the client CA's from these at every scrape (they
        follow reloads)."""
        self.certificate_expiry.set_function(not_valid_after)
        self.client_ca_expiry.set_function(client_ca_not_valid_after)

    def track_reloads(self, files: list[str]) -> None:
        """Show each file's reload as successful (its load at the start) and its failures at 0."""
        for file in files:
            self.reload_ok.labels(file).set(1)
            self.reload_failures.labels(file)

    def count_reload(self, file: str, ok: bool) -> None:
        """A reload of `file` was taken (`ok`) or rejected."""
        self.reload_ok.labels(file).set(1 if ok else 0)
        if not ok:
            self.reload_failures.labels(file).inc()

    def track_anchor_lag(self, lag_seconds: Callable[[], float]) -> None:
        """Read the audit log's anchor lag at every scrape."""
        self.anchor_lag.set_function(lag_seconds)

    def track_audit_disk(self, free_bytes: Callable[[], int | None]) -> None:
        """Read the free space of the audit log's filesystem at every scrape."""

        def read() -> float:
            free = free_bytes()
            return -1.0 if free is None else float(free)

        self.audit_disk_free.set_function(read)

    def track_expiries(self, listing: Callable[[], Iterable[SecretMetadata]], refresh_seconds: float) -> None:
        """Count the secrets expired and expiring within 7 days at every scrape, from `listing`
        (the store's, which no label names) fetched again once `refresh_seconds` have passed."""
        counts = _ExpiryCounts(listing, refresh_seconds)
        self.expiring.labels(EXPIRY_STATES[0]).set_function(lambda: counts.now()[0])
        self.expiring.labels(EXPIRY_STATES[1]).set_function(lambda: counts.now()[1])

    def count_client_expiry_notice(self) -> None:
        self.client_expiry_notices.inc()

    def set_check(self, check: str, ok: bool) -> None:
        """A health check now passes (`ok`) or fails."""
        self.health_checks.labels(check).set(1 if ok else 0)

    def observe_probe(self, check: str, seconds: float) -> None:
        self.probe_seconds.labels(check).observe(seconds)

    def count_throttled(self, method: str) -> None:
        self.throttled.labels(method).inc()

    def count_audit_failure(self) -> None:
        self.audit_failures.inc()

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


# The metrics endpoint is plain HTTP that anyone who reaches its port may call. prometheus_client's
# own server started a thread for every connection and kept it while the connection sent nothing:
# 800 connections that never finished their request held 800 threads (every thread the process
# may start is one fewer for gRPC's calls). Now at most METRICS_CONNECTIONS at once (one more is
# closed at once: a scraper tries again at its next interval), each given METRICS_TIMEOUT_SECONDS
# for every read.
METRICS_CONNECTIONS = 8
METRICS_TIMEOUT_SECONDS = 10.0
# How often the endpoint's accept loop looks for a stop: `close` (at SIGTERM) waits for that look,
# and socketserver's default of 0.5 s held every shutdown, before `service.stopped`, for up to 0.5 s.
METRICS_STOP_POLL_SECONDS = 0.02


class _MetricsHandler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT_SECONDS  # set on the connection's socket before it is read

    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._places = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._places.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread was started to give the place back
            self._places.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or broke: the client's affair. (The base class printed a
        traceback on stderr for each, a line per connection anyone could open.)"""


def _serve_metrics(host: str, port: int, registry: CollectorRegistry) -> _MetricsServer:
    """The metrics endpoint on host:port, served from a daemon thread."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(_MetricsServer):
        address_family = family  # an IPv6 address needs its own family (as prometheus_client does)

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_MetricsHandler)
    threading.Thread(
        target=server.serve_forever, args=(METRICS_STOP_POLL_SECONDS,), name="metrics", daemon=True
    ).start()
    return server


class _ExpiryCounts:
    """(expired, within 7 days) now, from a listing kept `refresh` seconds (the service's
    encrypted store keeps its own listing while nothing changes, one read of its change head, so
    it passes 0; a store that lists with a request per secret would keep it a while). The counts
    are taken against the clock at each scrape: a secret expires with nothing written."""

    def __init__(
        self,
        listing: Callable[[], Iterable[SecretMetadata]],
        refresh: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listing = listing
        self._refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: tuple[float, list[SecretMetadata]] | None = None
        self._counted: tuple[float, tuple[float, float]] | None = None

    def now(self) -> tuple[float, float]:
        with self._lock:
            at = self._clock()
            if self._counted is not None and at - self._counted[0] < 0.5:
                return self._counted[1]  # the two states of one scrape share one listing
            if self._kept is None or at - self._kept[0] >= self._refresh:
                try:
                    self._kept = (at, list(self._listing()))
                except SecretsManagerError:  # the store down: the health check says so; no number
                    self._kept = None
                    return (math.nan, math.nan)
            expired, soon = expiry_counts(self._kept[1], datetime.now(UTC), EXPIRY_SOON)
            self._counted = (at, (float(expired), float(soon)))
            return self._counted[1]
