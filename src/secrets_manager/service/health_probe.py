"""Health (grpc.health.v1) that follows the store, not only the process.

Clients pick a replica by its health check (the CLI's and the SDK's several addresses), so a
replica whose store is down or hangs must say NOT_SERVING, or they keep choosing it and every
call fails or waits out its deadline. A cheap store read runs every `interval` seconds on a
thread of its own; while one has failed, or has not answered within `timeout` seconds (a hung
database, a lock that never comes), the service reports NOT_SERVING; SERVING again once a read
answers. A graceful shutdown's NOT_SERVING is never undone (HealthServicer ignores `set` then).

`on_not_serving(reason)` runs each time the status turns NOT_SERVING: the service ends its Watch
streams then, so a client whose stream is here moves it to a replica that can read the store (a
stream on a replica whose database hangs would otherwise stay open, silent, until the store's own
answer timeout, 30 s, while its client serves what it cached as fresh).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from grpc_health.v1 import health, health_pb2

HEALTH_PROBE_INTERVAL_SECONDS = 2.0
HEALTH_PROBE_TIMEOUT_SECONDS = 5.0

log = logging.getLogger("secrets_manager.service")


class StoreHealth:
    """Sets `names` in `servicer` to SERVING or NOT_SERVING as `probe` (a store read) answers."""

    def __init__(
        self,
        servicer: health.HealthServicer,
        names: Iterable[str],
        probe: Callable[[], object],
        *,
        interval: float = HEALTH_PROBE_INTERVAL_SECONDS,
        timeout: float = HEALTH_PROBE_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        on_not_serving: Callable[[str], None] | None = None,
    ) -> None:
        self._servicer = servicer
        self._on_not_serving = on_not_serving
        self._names = list(names)
        self._probe = probe
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._probing_since: float | None = None  # a probe is running, started then
        self._last_failed = False
        self._serving = True
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._probe_forever, name="health-probe", daemon=True),
            threading.Thread(target=self._judge_forever, name="health-judge", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop judging (a probe stuck in the store is left to its daemon thread)."""
        self._stop.set()
        self._threads[1].join(self._interval + 1)

    @property
    def serving(self) -> bool:
        return self._serving

    def _probe_forever(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._probing_since = self._clock()
            try:
                self._probe()
                failed = False
            except Exception:  # any failure of the store read: not serving
                failed = True
            with self._lock:
                self._probing_since, self._last_failed = None, failed
            self._judge()
            self._stop.wait(self._interval)

    def _judge_forever(self) -> None:
        while not self._stop.wait(min(self._interval, self._timeout) / 2):
            self._judge()

    def _judge(self) -> None:
        with self._lock:
            hung = self._probing_since is not None and self._clock() - self._probing_since > self._timeout
            serving = not (hung or self._last_failed)
            if serving == self._serving:
                return
            self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            self._servicer.set(name, status)
        if serving:
            log.info("the store answers again: health is SERVING")
        else:
            reason = f"no answer within {self._timeout:g} s" if hung else "failed"
            log.warning("the store does not answer: health is NOT_SERVING", extra={"probe": reason})
            if self._on_not_serving is not None:
                try:
                    self._on_not_serving(reason)
                except Exception as exc:  # a bug there must not stop the judging; its message is withheld
                    log.error("ending watch streams failed", extra={"error_type": type(exc).__name__})
