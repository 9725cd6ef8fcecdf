"""Health (grpc.health.v1) that follows the store and the audit log, not only the process.

Clients pick a replica by its health check (the CLI's and the SDK's several addresses), so a
replica that cannot serve must say NOT_SERVING, or they keep choosing it and every call fails or
waits out its deadline. Two things every call needs are checked on a thread of their own every
`interval` seconds:

- `store`: a cheap store read. It fails while the store fails (the database down, the file
  removed) or has not answered within `timeout` seconds (a hung database, a lock that never comes),
  and, on our encrypted store, while the root key another process rotated cannot be adopted (the
  password file still holds the old password: every call fails so meanwhile).
- `audit`: an append of no record to the audit log (its locks taken, its live file opened and
  checked against the store's anchor, nothing written). Every call writes an audit record and is
  refused if it cannot (audit fails closed), so a log that cannot be written is a service that
  cannot serve. A request whose record the log refused (a full disk, which an empty append cannot
  see) counts as a failed check too, for `refusal_hold` seconds; then the probe decides again.

While any check fails the service reports NOT_SERVING; SERVING again once every check passes,
without a restart. Each change is logged (the check, and why) and reported to `on_check` (the
`secrets_manager_health_check_ok` metric); each probe's duration goes to `on_probe` (a slow store
shows there before it fails, even with no traffic). A graceful shutdown's NOT_SERVING is never undone
(HealthServicer ignores `set` then).

`on_store_failing(reason)` runs each time the store check starts failing: the service ends its
Watch streams then, so a client whose stream is here moves it to a replica that can read the store
(a stream on a replica whose database hangs would otherwise stay open, silent, until the store's
own answer timeout, 30 s, while its client serves what it cached as fresh).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from grpc_health.v1 import health, health_pb2

from secrets_manager.errors import SecretsManagerError

HEALTH_PROBE_INTERVAL_SECONDS = 2.0
HEALTH_PROBE_TIMEOUT_SECONDS = 5.0
AUDIT_REFUSAL_HOLD_SECONDS = 5.0  # a request's refused audit record fails the check this long
STORE, AUDIT = "store", "audit"

log = logging.getLogger("secrets_manager.service")


class StoreHealth:
    """Sets `names` in `servicer` to SERVING or NOT_SERVING as `probe` (a store read) and, if
    given, `audit_probe` (an empty audit append) answer."""

    def __init__(
        self,
        servicer: health.HealthServicer,
        names: Iterable[str],
        probe: Callable[[], object],
        *,
        audit_probe: Callable[[], object] | None = None,
        on_check: Callable[[str, bool], None] = lambda _check, _ok: None,
        on_probe: Callable[[str, float], None] = lambda _check, _seconds: None,
        interval: float = HEALTH_PROBE_INTERVAL_SECONDS,
        timeout: float = HEALTH_PROBE_TIMEOUT_SECONDS,
        refusal_hold: float = AUDIT_REFUSAL_HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        on_store_failing: Callable[[str], None] | None = None,
    ) -> None:
        self._servicer = servicer
        self._on_store_failing = on_store_failing
        self._names = list(names)
        self._checks: list[tuple[str, Callable[[], object]]] = [(STORE, probe)]
        if audit_probe is not None:
            self._checks.append((AUDIT, audit_probe))
        self._on_check = on_check
        self._on_probe = on_probe
        self._interval = interval
        self._timeout = timeout
        self._refusal_hold = refusal_hold
        self._clock = clock
        self._lock = threading.Lock()
        self._probing: tuple[str, float] | None = None  # a probe is running: its check, since when
        self._failed: dict[str, str] = {}  # check: why its last probe failed
        self._refused_at: float | None = None  # when a request's audit record was last refused
        self._failing: dict[str, str] = {}  # what was last reported
        self._serving = True
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._probe_forever, name="health-probe", daemon=True),
            threading.Thread(target=self._judge_forever, name="health-judge", daemon=True),
        ]
        for check, _ in self._checks:
            on_check(check, True)

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

    def audit_refused(self) -> None:
        """A request's audit record could not be written: the audit check fails at once (not at
        the next probe), and for `refusal_hold` seconds after the last such refusal."""
        with self._lock:
            self._refused_at = self._clock()
        self._judge()

    def _probe_forever(self) -> None:
        while not self._stop.is_set():
            for check, probe in self._checks:
                with self._lock:
                    self._probing = (check, self._clock())
                started = time.perf_counter()
                try:
                    probe()
                    failure = None
                except SecretsManagerError as exc:  # our messages: never a value
                    failure = str(exc)
                except Exception as exc:  # anything else: its type only (its text could quote data)
                    failure = type(exc).__name__
                self._on_probe(check, time.perf_counter() - started)
                with self._lock:
                    self._probing = None
                    if failure is None:
                        self._failed.pop(check, None)
                    else:
                        self._failed[check] = failure
            self._judge()
            self._stop.wait(self._interval)

    def _judge_forever(self) -> None:
        while not self._stop.wait(min(self._interval, self._timeout) / 2):
            self._judge()

    def _judge(self) -> None:
        with self._lock:
            now = self._clock()
            failing = dict(self._failed)
            if self._probing is not None and now - self._probing[1] > self._timeout:
                failing[self._probing[0]] = f"no answer within {self._timeout:g} s"
            if self._refused_at is not None and now - self._refused_at < self._refusal_hold:
                failing.setdefault(AUDIT, "a request's audit record could not be written")
            if failing.keys() == self._failing.keys():
                return
            before, self._failing = self._failing, failing
            serving = not failing
            serving_changed = serving != self._serving
            self._serving = serving
        for check, _ in self._checks:
            if (check in failing) != (check in before):
                self._on_check(check, check not in failing)
                if check in failing:
                    log.warning(
                        _FAILING[check],
                        extra={"event": "health.check_failed", "check": check, "error": failing[check]},
                    )
                    if check == STORE:
                        self._store_failing(failing[check])
                else:
                    log.info(_PASSING[check], extra={"event": "health.check_ok", "check": check})
        if not serving_changed:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            self._servicer.set(name, status)
        log.log(
            logging.INFO if serving else logging.WARNING,
            f"health is {'SERVING' if serving else 'NOT_SERVING'}",
            extra={"event": "health.changed", "serving": serving, "failing": sorted(failing)},
        )

    def _store_failing(self, reason: str) -> None:
        if self._on_store_failing is None:
            return
        try:
            self._on_store_failing(reason)
        except Exception as exc:  # a bug there must not stop the judging; its message is withheld
            log.error(
                "ending watch streams failed",
                extra={"event": "health.watch_interrupt_failed", "error_type": type(exc).__name__},
            )


_FAILING = {
    STORE: "the store does not answer: health is NOT_SERVING",
    AUDIT: "the audit log cannot be written: health is NOT_SERVING (every request is refused "
    "meanwhile); free space on its disk or end what holds its lock",
}
_PASSING = {
    STORE: "the store answers again",
    AUDIT: "the audit log can be written again",
}
