"""The service's rotation schedule: due rotations run in one background thread (DESIGN.md section 8).

server.toml's `rotation_schedule` names a schedule file (rotation.py has its format). Every
`rotation_check_seconds` the thread reads it again and runs each due rotation as `rotate NAME`
does: stage a generated value, run the set and test commands, promote. Every step is audited in
the service's log as actor "rotation-schedule", source "schedule", and the versions it writes are
created by "rotation-schedule". The schedule is operator configuration and is not subject to the
access policy. RotateSecret (`rotate NAME --on-server`) runs one entry at once for a caller with the
`rotate` capability, every step audited under the caller's identity and request id.

At shutdown no new rotation starts; one that is running gets what is left of the grace period. A
command still running when the process exits is left to finish on its own; its version stays
pending and the schedule resumes it later.

Replicas that share a store may all run the same schedule: the store refuses a second stage while
a version is pending, so only one replica rotates a secret and the others skip it. A pending
version older than three command timeouts (a rotation that failed or was killed) is resumed: its
value is set and tested again and promoted, so replicas that resume it together apply one value.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from secrets_manager.audit import AuditEvent, AuditLog, value_fingerprint
from secrets_manager.errors import (
    NotFoundError,
    RotationInProgressError,
    SecretsManagerError,
)
from secrets_manager.rotation import (
    Due,
    Rotated,
    ScheduledRotation,
    load_schedule,
    plan,
)
from secrets_manager.store import CURRENT, PENDING, EncryptedStore
from secrets_manager.values import SecretValue

log = logging.getLogger("secrets_manager.service.schedule")

ACTOR = "rotation-schedule"
SOURCE = "schedule"


class _ServiceSteps:
    """RotationSteps on the service's own store, each step audited in the service's log (a change
    with a durable request record before it, like a client's request) as `actor`: the schedule's,
    or a RotateSecret caller's (with its peer and request id)."""

    def __init__(
        self,
        store: EncryptedStore,
        audit: AuditLog,
        *,
        actor: str = ACTOR,
        source: str = SOURCE,
        peer: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._actor = actor
        self._source = source
        self._peer = peer
        self._request_id = request_id

    @contextmanager
    def _audited(self, operation: str, name: str, *, mutating: bool) -> Iterator[AuditEvent]:
        event = AuditEvent(operation, self._actor, self._source, self._peer, name)
        if self._request_id is not None:
            event.request_id = self._request_id
        if mutating:
            self._audit.append([replace(event, outcome="pending")], self._store)
        try:
            with self._store.acting_for(self._actor):
                yield event
        except BaseException as exc:
            event.outcome = exc.kind if isinstance(exc, SecretsManagerError) else "error"
            self._audit.append([event], self._store)
            raise
        self._audit.append([event], self._store)

    def stage(self, name: str, value: SecretValue) -> int:
        with self._audited("rotate.stage", name, mutating=True) as event:
            event.value_hmac = value_fingerprint(self._store, value.reveal())
            event.version = self._store.stage(name, value.reveal()).version
        return event.version

    def pending(self, name: str) -> tuple[int, SecretValue]:
        with self._audited("rotate.resume", name, mutating=False) as event:
            secret = self._store.get(name, label=PENDING)
            event.version = secret.version
            event.value_hmac = value_fingerprint(self._store, secret.value.reveal())
        return secret.version, secret.value

    def promote(self, name: str, version: int) -> int | None:
        with self._audited("rotate.promote", name, mutating=True) as event:
            event.version = version
            return self._store.promote(name, version)

    def current(self, name: str) -> int | None:
        return self._store.describe(name).labels.get(CURRENT)

    def current_value(self, name: str) -> SecretValue:
        with self._audited("rotate.read", name, mutating=False) as event:
            secret = self._store.get(name)
            event.version = secret.version
            event.value_hmac = value_fingerprint(self._store, secret.value.reveal())
        return secret.value

    def command_step(self, step: str, name: str, version: int) -> AbstractContextManager[object]:
        return self._command_step(step, name, version)

    @contextmanager
    def _command_step(self, step: str, name: str, version: int) -> Iterator[None]:
        with self._audited(f"rotate.{step}", name, mutating=False) as event:
            event.version = version
            yield


class RotationScheduler:
    """Runs the due rotations of one schedule file, now and then every `check_seconds`."""

    def __init__(
        self,
        path: Path,
        store: EncryptedStore,
        audit: AuditLog,
        *,
        check_seconds: float,
        environ: Mapping[str, str],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self.rules = load_schedule(path)  # a bad file at start stops the service from starting
        self._steps = _ServiceSteps(store, audit)
        self._store = store
        self._audit = audit
        self._reloading = threading.Lock()  # the thread and RotateSecret calls both reload
        self._check_seconds = check_seconds
        self._environ = dict(environ)
        self._clock = clock
        self._stopping = threading.Event()
        self._warned: set[tuple[str, str]] = set()  # (name, problem) already logged
        self._thread = threading.Thread(target=self._serve, name="rotation-schedule", daemon=True)
        self._on_outcome: Callable[[str], None] = lambda _outcome: None

    def start(self, on_outcome: Callable[[str], None] = lambda _outcome: None) -> None:
        """Run passes in the background; `on_outcome` hears each entry's outcome (for metrics)."""
        self._on_outcome = on_outcome
        self._thread.start()

    def request_stop(self) -> None:
        """Run no further rotation; one already running finishes (see `join`)."""
        self._stopping.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "a scheduled rotation was still running at shutdown; its version stays pending and "
                "the schedule resumes it later"
            )

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_due()
            except Exception as exc:  # a bug: logged (type only), and the next pass tries again
                log.error("rotation schedule pass failed", extra={"error_type": type(exc).__name__})
            self._stopping.wait(self._check_seconds)

    def run_due(self) -> dict[str, str]:
        """One pass: what happened to each entry ("rotated", "resumed", "resumed elsewhere",
        "failed", or its plan)."""
        self._reload()
        outcomes: dict[str, str] = {}
        for rule in self.rules:
            if self._stopping.is_set():
                break
            outcomes[rule.name] = self._run_one(rule)
            self._on_outcome(outcomes[rule.name])
        return outcomes

    def _reload(self) -> None:
        """Read the file again; on any error keep the schedule in force and log why, once."""
        with self._reloading:
            try:
                self.rules = load_schedule(self.path)
                self._warned = {w for w in self._warned if w[0]}  # a later breakage is logged again
            except SecretsManagerError as exc:
                if ("", str(exc)) not in self._warned:
                    self._warned.add(("", str(exc)))
                    log.error(
                        "rotation schedule rejected; the previous one stays in force",
                        extra={"error": str(exc)},
                    )

    def rotate_now(self, name: str, *, actor: str, peer: str | None, request_id: str) -> Rotated:
        """RotateSecret: run `name`'s configured rotation at once, due or not, audited as `actor`.
        A stale pending version is resumed; a young one is another rotation in progress, which
        the store's stage refuses (RotationInProgressError)."""
        self._reload()
        rule = next((r for r in self.rules if r.name == name), None)
        if rule is None:
            raise NotFoundError(
                f"the service's rotation schedule {self.path.name} has no entry for {name!r}; add one "
                "to rotate it on the service"
            )
        state = plan(rule, self._store.describe(name), self._clock()).state
        steps = _ServiceSteps(
            self._store, self._audit, actor=actor, source="grpc", peer=peer, request_id=request_id
        )
        return rule.run(steps, self._environ, state)

    def _run_one(self, rule: ScheduledRotation) -> str:
        try:
            meta = self._store.describe(rule.name)
        except NotFoundError:
            self._warn_once(rule.name, "scheduled secret not found; store a first value to rotate it")
            return "missing"
        except SecretsManagerError as exc:
            log.error(
                "rotation schedule cannot read a secret", extra={"secret": rule.name, "error": str(exc)}
            )
            return "failed"
        state = plan(rule, meta, self._clock()).state
        if not state.runs:
            if state is Due.DELETED:
                self._warn_once(rule.name, "scheduled secret is deleted; it is not rotated until undeleted")
            return state.value
        started = time.monotonic()
        try:
            rotated = rule.run(self._steps, self._environ, state)
        except RotationInProgressError:  # another replica (or a person) staged first: theirs runs
            return Due.IN_PROGRESS.value
        except SecretsManagerError as exc:  # never a value in these messages
            log.error("scheduled rotation failed", extra={"secret": rule.name, "error": str(exc)})
            return "failed"
        self._warned = {w for w in self._warned if w[0] != rule.name}
        if rotated.promoted_elsewhere:  # replicas resume a stale version together: one promote wins
            log.info("scheduled rotation finished by another runner", extra={"secret": rule.name})
            return "resumed elsewhere"
        log.info(
            "scheduled rotation finished",
            extra={
                "secret": rule.name,
                "version": rotated.version,
                "previous": rotated.previous,
                "resumed": rotated.resumed,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return "resumed" if rotated.resumed else "rotated"

    def _warn_once(self, name: str, problem: str) -> None:
        if (name, problem) not in self._warned:
            self._warned.add((name, problem))
            log.warning(problem, extra={"secret": name})


__all__ = ["ACTOR", "SOURCE", "RotationScheduler"]
