"""The service's rotation schedule: due rotations run in one background thread (DESIGN.md section 8).

server.toml's `rotation_schedule` names a schedule file (rotation.py has its format). Every
`rotation_check_seconds` the thread reads it again and runs each due rotation as `rotate NAME`
does: stage a generated value, run the set and test commands, promote. Every step is audited in
the service's log as actor "rotation-schedule", source "schedule", and the versions it writes are
created by "rotation-schedule". The schedule is operator configuration and is not subject to the
access policy. RotateSecret (`rotate NAME --on-server`) runs one entry at once for a caller with the
`rotate` capability, every step audited under the caller's identity and request id; the version
it stages is created by "rotation-schedule" too, as its value is the schedule's.

At shutdown no new rotation starts; one that is running gets what is left of the grace period. A
command still running at the end of it is killed, as at a timeout (run_server does that); its
version stays pending.

Replicas that share a store may all run the same schedule: the store refuses a second stage while
a version is pending, so only one replica rotates a secret and the others skip it. A pending
version older than three command timeouts (a rotation that failed or was killed) is resumed: its
value is set and tested again and promoted, so replicas that resume it together apply one value.
Only one the schedule staged (created by "rotation-schedule", or owed here): anyone with the
`rotate` capability may stage a value of their choosing (StageSecretVersion), which a resume
would set at the target; such a version stays in progress, and is logged once.

Interruptions (_Ledger): a rotation whose set command exited 0 but that then failed (the store
was unreachable for its promote, say) is retried by this replica with backoff, from the test on,
while its version is young; another replica cannot tell it from a rotation still running, so it
would wait three timeouts. A rotation this replica was running when it stopped is resumed at the
next start's first pass: a marker file beside the audit log, locked while the process lives,
tells the next start which pending versions were its own and not another live replica's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from secrets_manager.audit import AuditEvent, AuditLog, value_fingerprint
from secrets_manager.environment import Environment
from secrets_manager.errors import (
    NotFoundError,
    RotationInProgressError,
    SecretsManagerError,
)
from secrets_manager.rotation import (
    SCHEDULE_ACTOR,
    Due,
    NoLongerDue,
    Plan,
    Rotated,
    ScheduledRotation,
    end_running_commands,
    load_schedule,
    plan,
    staged_by_another,
)
from secrets_manager.service.served import ServedStore
from secrets_manager.store import CURRENT, PENDING, SecretMetadata
from secrets_manager.values import SecretValue

log = logging.getLogger("secrets_manager.service.schedule")

ACTOR = SCHEDULE_ACTOR
SOURCE = "schedule"


# A rotation owed a retry here is tried again after 1, 2, 4 ... s, at most this long apart.
RETRY_FIRST_SECONDS = 1.0
RETRY_CAP_SECONDS = 60.0
# An entry whose rotation failed and that this process owes no retry (its set command did not run
# here: the secret is not one it can rotate as configured, a PostgreSQL administrator's password is
# wrong, the set command fails) is tried again after one check interval, then twice as long each
# time, up to this: not every pass, which would log the same error and, for a database, a failed
# login every minute all day.
FAILED_ENTRY_BACKOFF_CAP_SECONDS = 3600.0
BACKING_OFF = "backing off"  # a pass's outcome for such an entry before its next try


@dataclass
class _Owed:
    """A rotation this process started (or a stopped run of this replica left) and has not seen end."""

    version: int
    set_ran: bool = False  # its set command exited 0 here: the value is at the target
    failures: int = 0
    next_try: float = 0.0  # time.monotonic() of the next attempt


class _Ledger:
    """The rotations under way or owed a retry in this process, mirrored in a marker file beside
    the audit log (`<audit log>.rotating.<pid>-<random token chosen at start>`, JSON {"owed":
    {name: version}, "clean": bool}, no value; the token keeps two processes with one pid, e.g.
    PID 1 in two containers sharing the directory, from renaming over each other's live marker;
    a marker of an earlier version, `.rotating.<pid>`, is still taken over). The file is written
    and fsynced before a set command runs and holds a lock for as long as the process lives, so
    a later start takes over the markers whose lock it can get (their process is gone) and leaves
    a running replica's alone. It only appears once locked (made
    under another name, then renamed), so a replica starting beside it cannot take it over. Only a
    marker closed at a clean stop, after its commands were ended, is resumed at once: after a crash
    (SIGKILL, OOM) the set command, in a session of its own, may still run, and a second one beside
    it could leave the older value at the target; those wait until stale like any replica's.
    Without a usable directory it works in memory only."""

    def __init__(self, audit_path: Path) -> None:
        self._lock = threading.Lock()
        self._owed: dict[str, _Owed] = {}
        # name: the version this process last staged for it (memory only): ours to resume once
        # stale where the store records no author per version (AWS), which `plan` cannot tell.
        self._staged: dict[str, int] = {}
        self._fd: int | None = None
        self._stopping = False
        unique = f"{os.getpid()}-{secrets.token_hex(8)}"  # a pid alone repeats across containers
        self._path = audit_path.with_name(f"{audit_path.name}.rotating.{unique}")
        try:
            self._owed = {name: _Owed(version) for name, version in self._take_over(audit_path).items()}
            making = self._path.with_name(f"{audit_path.name}.rotating-new.{unique}")  # not globbed
            fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                self._write()
                os.rename(making, self._path)  # the lock goes with the open file
            except OSError:
                self._fd = None
                os.close(fd)
                with contextlib.suppress(OSError):
                    making.unlink()
                raise
        except OSError as exc:
            log.warning(
                "cannot keep the rotation marker file; a rotation this replica leaves unfinished is "
                "resumed only once it is stale",
                extra={
                    "event": "schedule.marker_unusable",
                    "path": str(self._path),
                    "error": exc.strerror or type(exc).__name__,
                },
            )

    def _take_over(self, audit_path: Path) -> dict[str, int]:
        """The versions in the marker files of processes that are gone; those files are removed.
        Only a marker this user wrote: one that names a version is resumed at once, whoever
        staged it (`plan`'s `stagers` are not asked), so one another user could write (its file,
        or one group or others may write, or a link) is left alone, with a warning."""
        left: dict[str, int] = {}
        for path in sorted(audit_path.parent.glob(f"{audit_path.name}.rotating.*")):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                found = os.fstat(fd)
                if (
                    not stat.S_ISREG(found.st_mode)
                    or found.st_uid != os.geteuid()
                    or stat.S_IMODE(found.st_mode) & 0o022
                ):
                    log.warning(
                        "a rotation marker file this user did not write (another's, or writable by "
                        "group or others) is ignored: nothing it names is resumed; remove it",
                        extra={"event": "schedule.marker_ignored", "path": str(path)},
                    )
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while its process lives
                with contextlib.suppress(ValueError, OSError):
                    doc = json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
                    owed = doc.get("owed") if isinstance(doc, dict) else None
                    if doc.get("clean") is True and isinstance(owed, dict):  # else: crashed, see above
                        left.update({k: v for k, v in owed.items() if isinstance(v, int)})
                path.unlink()
            except OSError:
                pass
            finally:
                os.close(fd)
        return left

    def _write(self, *, clean: bool = False) -> None:
        if self._fd is None:
            return
        owed = {name: owed.version for name, owed in self._owed.items()}
        data = json.dumps({"owed": owed, "clean": clean}).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as exc:
            log.warning(
                "cannot write the rotation marker file",
                extra={"event": "schedule.marker_write_failed", "error": exc.strerror},
            )

    def started(self, name: str, version: int) -> None:
        """A set command is about to run: noted durably, so the next start knows it may have run."""
        with self._lock:
            owed = self._owed.setdefault(name, _Owed(version))
            if owed.version != version:
                self._owed[name] = _Owed(version)
            self._write()

    def set_ran(self, name: str, version: int) -> None:
        with self._lock:
            owed = self._owed.get(name)
            if owed is not None and owed.version == version:
                owed.set_ran = True

    def failed(self, name: str) -> None:
        """The rotation failed: retried with backoff if its set ran here, else forgotten (it is
        resumed once stale, as any replica's)."""
        with self._lock:
            owed = self._owed.get(name)
            if owed is None:
                return
            if not owed.set_ran and not self._stopping:
                del self._owed[name]
                self._write()
                return
            delay = min(RETRY_FIRST_SECONDS * 2**owed.failures, RETRY_CAP_SECONDS)
            owed.failures += 1
            owed.next_try = time.monotonic() + delay

    def staged(self, name: str, version: int) -> None:
        with self._lock:
            self._staged[name] = version

    def staged_here(self, name: str, version: int | None) -> bool:
        """Whether this process staged `version` of `name` (the last it staged for it)."""
        with self._lock:
            return version is not None and self._staged.get(name) == version

    def done(self, name: str) -> None:
        with self._lock:
            if self._owed.pop(name, None) is not None:
                self._write()

    def owed(self, name: str, pending: int | None) -> _Owed | None:
        """What this process owes `name`, if its version is still the pending one (else the
        rotation ended elsewhere, or was discarded or overtaken: forgotten)."""
        with self._lock:
            owed = self._owed.get(name)
            if owed is not None and owed.version != pending:
                del self._owed[name]
                self._write()
                return None
            return owed

    def next_try(self) -> float | None:
        with self._lock:
            return min((owed.next_try for owed in self._owed.values()), default=None)

    def stopping(self) -> None:
        """The process is stopping and ends its commands: a rotation that fails now was cut
        short, not refused by its target, so it stays owed for the next start."""
        with self._lock:
            self._stopping = True

    def close(self) -> None:
        """At a clean stop, once the commands were ended: the marker file goes if nothing is owed,
        else it says so (clean), for the next start to take it over and resume at once."""
        with self._lock:
            if self._fd is None:
                return
            if not self._owed:
                with contextlib.suppress(OSError):
                    self._path.unlink()
            else:
                self._write(clean=True)
            os.close(self._fd)
            self._fd = None


class _ServiceSteps:
    """RotationSteps on the service's own store, each step audited in the service's log (a change
    with a durable request record before it, like a client's request) as `actor`: the schedule's,
    or a RotateSecret caller's (with its peer, request id and certificate serial, so `audit show
    --serial` finds the steps a certificate caused, `rotate.read` among them). The versions it
    stages are created by ACTOR either way: the schedule generated their values."""

    def __init__(
        self,
        store: ServedStore,
        audit: AuditLog,
        *,
        actor: str = ACTOR,
        source: str = SOURCE,
        peer: str | None = None,
        request_id: str | None = None,
        certificate_serial: str | None = None,
        ledger: _Ledger | None = None,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._audit = audit
        self._actor = actor
        self._source = source
        self._peer = peer
        self._request_id = request_id
        self._certificate_serial = certificate_serial

    @contextmanager
    def _audited(
        self, operation: str, name: str, *, mutating: bool, version: int | None = None
    ) -> Iterator[AuditEvent]:
        event = AuditEvent(
            operation,
            self._actor,
            self._source,
            self._peer,
            name,
            certificate_serial=self._certificate_serial,
        )
        event.version = version
        if self._request_id is not None:
            event.request_id = self._request_id
        if mutating:
            self._audit.append([replace(event, outcome="pending")], self._store)
        try:
            # The versions a rotation of the schedule stages are the schedule's (their value is one
            # it generated), whoever asked for it: a stale one is resumed only if so (`plan`).
            with self._store.acting_for(ACTOR):
                yield event
        except BaseException as exc:
            event.outcome = exc.kind if isinstance(exc, SecretsManagerError) else "error"
            self._audit.append([event], self._store)
            raise
        self._audit.append([event], self._store)

    def stage(
        self, name: str, value: SecretValue, *, expect_current: int | None = None, target: str | None = None
    ) -> int:
        with self._audited("rotate.stage", name, mutating=True) as event:
            event.value_hmac = value_fingerprint(self._store, value.reveal())
            staged = self._store.stage(name, value.reveal(), expect_current=expect_current, target=target)
            event.version = staged.version
            if self._ledger is not None:
                self._ledger.staged(name, staged.version)
        return event.version

    def pending(self, name: str) -> tuple[int, SecretValue, str | None]:
        with self._audited("rotate.resume", name, mutating=False) as event:
            secret = self._store.get(name, label=PENDING)
            event.version = secret.version
            event.value_hmac = value_fingerprint(self._store, secret.value.reveal())
        return secret.version, secret.value, secret.target

    def promote(self, name: str, version: int) -> int | None:
        with self._audited("rotate.promote", name, mutating=True) as event:
            event.version = version
            return self._store.promote(name, version)

    def current(self, name: str) -> int | None:
        return self._store.describe(name).labels.get(CURRENT)

    def record_expiry(self, name: str, version: int, expires: datetime) -> None:
        """The schedule entry's `expires_after` for the version its rotation made current, only if
        that version is still current (a write landing meanwhile has an expiry of its own, or none)."""
        with self._audited("rotate.expiry", name, mutating=True, version=version):
            # Decided in the update's own commit on our stores (on Vault and AWS, on their read).
            self._store.update_metadata(name, expires=expires, expect_current=version)

    def read_current(self, name: str) -> tuple[int, SecretValue]:
        with self._audited("rotate.read", name, mutating=False) as event:
            secret = self._store.get(name)
            event.version = secret.version
            event.value_hmac = value_fingerprint(self._store, secret.value.reveal())
        return secret.version, secret.value

    def command_step(self, step: str, name: str, version: int) -> AbstractContextManager[object]:
        return self._command_step(step, name, version)

    @contextmanager
    def _command_step(self, step: str, name: str, version: int) -> Iterator[None]:
        # The set command changes the target: like a change, a durable record that it started goes
        # first (and the marker), so a log that ends there shows the set may have happened.
        setting = step == "set"
        if setting and self._ledger is not None:
            self._ledger.started(name, version)
        with self._audited(f"rotate.{step}", name, mutating=setting, version=version):
            yield
            if setting and self._ledger is not None:  # before its outcome record, which may fail
                self._ledger.set_ran(name, version)


class RotationScheduler:
    """Runs the due rotations of one schedule file, now and then every `check_seconds`."""

    def __init__(
        self,
        path: Path,
        store: ServedStore,
        audit: AuditLog,
        *,
        check_seconds: float,
        environ: Mapping[str, str],
        environment: Environment,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self._environment = environment
        self._warned: set[tuple[str, str]] = set()  # (name, problem) already logged
        # A bad file at start stops the service from starting; so does, in production, one that
        # others could change (its commands run as the service): see load_schedule.
        self.rules = load_schedule(path, environment=environment, warn=self._warn_file_once)
        self._ledger = _Ledger(audit.path)
        self._steps = _ServiceSteps(store, audit, ledger=self._ledger)
        self._unseen = {rule.name for rule in self.rules}  # not yet described since the start
        self._failing: dict[str, tuple[int, float]] = {}  # name: failures in a row, next try (monotonic)
        # Entries whose stale pending version another staged (plan's staged_by_another): never
        # resumed, so they rotate no more until a person finishes or discards it; counted failing.
        self._blocked: set[str] = set()
        # Entries whose rotation runs in this process now (the schedule's thread, or a RotateSecret
        # request's): a pass leaves them alone. Their ledger entry alone would send a pass to
        # resume one beside the running rotation, its commands run twice at once.
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        self._store = store
        self._audit = audit
        self._reloading = threading.Lock()  # the thread and RotateSecret calls both reload
        self._check_seconds = check_seconds
        self._environ = dict(environ)
        self._clock = clock
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rotation-schedule", daemon=True)
        self._on_outcome: Callable[[str], None] = lambda _outcome: None
        self._on_reload: Callable[[bool], None] = lambda _ok: None
        self._on_pass: Callable[[int], None] = lambda _failing: None

    def start(
        self,
        on_outcome: Callable[[str], None] = lambda _outcome: None,
        on_reload: Callable[[bool], None] = lambda _ok: None,
        on_pass: Callable[[int], None] = lambda _failing: None,
    ) -> None:
        """Run passes in the background; `on_outcome` hears each entry's outcome, `on_reload`
        whether a re-read of the file was taken or (once per new error) rejected, `on_pass` at
        the end of each pass how many entries are failing (for metrics)."""
        self._on_outcome = on_outcome
        self._on_reload = on_reload
        self._on_pass = on_pass
        self._thread.start()

    def request_stop(self) -> None:
        """Run no further rotation; one already running finishes (see `join`)."""
        self._stopping.set()

    def running(self) -> bool:
        """Whether a pass is still running (after `join`: one that outlived it)."""
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the running pass, then close the marker file: it goes unless a rotation is
        left, and is not written again (the rotation ended at exit must stay in it)."""
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "a scheduled rotation was still running at shutdown; its command is ended, its "
                "version stays pending and this replica resumes it when it starts again",
                extra={"event": "schedule.rotation_ended_at_shutdown"},
            )
            self._ledger.stopping()  # the rotation its ended command fails stays owed
            end_running_commands()  # before the marker says the stop was clean
            self._thread.join(1.0)
        self._ledger.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_due()
            except Exception as exc:  # a bug: logged (type only), and the next pass tries again
                log.error(
                    "rotation schedule pass failed",
                    extra={"event": "schedule.pass_failed", "error_type": type(exc).__name__},
                )
            self._stopping.wait(self._wait_seconds())

    def _wait_seconds(self) -> float:
        """Until the next pass: `check_seconds`, or sooner when a retry owed here is due."""
        retry = self._ledger.next_try()
        if retry is None:
            return self._check_seconds
        return max(0.05, min(self._check_seconds, retry - time.monotonic()))

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
        # Failing: failed now, or failed before and waiting for its next try (backing off, or a
        # staged version of ours owed a retry), until a run of it succeeds.
        failing = {name for name, outcome in outcomes.items() if outcome == "failed"}
        failing |= {rule.name for rule in self.rules if rule.name in self._failing}
        failing |= self._blocked & outcomes.keys()  # stale and another's: a person must act
        self._on_pass(len(failing))
        return outcomes

    def _reload(self) -> None:
        """Read the file again; on any error keep the schedule in force and log why, once."""
        with self._reloading:
            try:
                problems: list[str] = []  # outside production: a loose file, warned of once
                self.rules = load_schedule(self.path, environment=self._environment, warn=problems.append)
                # a later breakage is logged again
                self._warned = {w for w in self._warned if w[0] or w[1] in problems}
                for problem in problems:
                    self._warn_file_once(problem)
            except SecretsManagerError as exc:
                if ("", str(exc)) not in self._warned:
                    self._warned.add(("", str(exc)))
                    log.error(
                        "rotation schedule rejected; the previous one stays in force",
                        extra={
                            "event": "schedule.reload_rejected",
                            "schedule": str(self.path),
                            "error": str(exc),
                        },
                    )
                    self._on_reload(False)
            else:
                self._on_reload(True)

    def rotate_now(
        self,
        name: str,
        *,
        actor: str,
        peer: str | None,
        request_id: str,
        certificate_serial: str | None = None,
    ) -> Rotated:
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
        planned = self._plan(rule, self._store.describe(name), self._clock())
        if planned.staged_by_another is not None and self._ledger.owed(name, planned.pending) is None:
            raise RotationInProgressError(staged_by_another(name, planned))
        state = planned.state
        steps = _ServiceSteps(
            self._store,
            self._audit,
            actor=actor,
            source="grpc",
            peer=peer,
            request_id=request_id,
            certificate_serial=certificate_serial,
            ledger=self._ledger,
        )
        with self._rotating(name):  # refused first if one runs here: its ledger entry is not ours
            try:
                rotated = rule.run(steps, self._environ, state)
            except SecretsManagerError:
                self._ledger.failed(name)  # the schedule retries it if its set ran here
                raise
        self._failing.pop(name, None)  # it works again: the schedule need not wait to try it
        self._ledger.done(name)
        return replace(rotated, expires=self._record_expiry(rule, rotated, steps))

    def _record_expiry(
        self, rule: ScheduledRotation, rotated: Rotated, steps: _ServiceSteps
    ) -> datetime | None:
        """After a rotation that promoted here: the entry's expiry for the new value, if it has one.
        The rotation stands either way; a failure is logged (rotation.expiry_failed)."""
        expiry = None if rotated.promoted_elsewhere else rule.expiry(self._clock())
        if expiry is None:
            return None
        try:
            steps.record_expiry(rotated.name, rotated.version, expiry)
        except SecretsManagerError as exc:
            log.error(
                "scheduled rotation's expiry not recorded",
                extra={
                    "event": "rotation.expiry_failed",
                    "secret": rotated.name,
                    "version": rotated.version,
                    "error": str(exc),
                },
            )
            return None
        return expiry

    def _plan(self, rule: ScheduledRotation, meta: SecretMetadata, now: datetime) -> Plan:
        """`plan`, resuming only the stale pending versions the schedule staged: created by ACTOR,
        or staged by this process (a store that records no author per version: AWS)."""
        planned = plan(rule, meta, now, stagers=(ACTOR,))
        if planned.staged_by_another is not None and self._ledger.staged_here(rule.name, planned.pending):
            return plan(rule, meta, now)
        return planned

    @contextmanager
    def _rotating(self, name: str) -> Iterator[None]:
        """Mark `name`'s rotation as running here while it runs; RotationInProgressError if it
        already is (a pass meeting a RotateSecret's, or the reverse): never two at once."""
        with self._running_lock:
            if name in self._running:
                raise RotationInProgressError(f"a rotation of {name!r} is running on this service now")
            self._running.add(name)
        try:
            yield
        finally:
            with self._running_lock:
                self._running.discard(name)

    def _run_one(self, rule: ScheduledRotation) -> str:
        try:
            meta = self._store.describe(rule.name)
        except NotFoundError:
            self._blocked.discard(rule.name)  # its pending version went with it: nothing to finish
            self._warn_once(rule.name, "scheduled secret not found; store a first value to rotate it")
            return "missing"
        except SecretsManagerError as exc:
            log.error(
                "rotation schedule cannot read a secret",
                extra={"event": "rotation.read_failed", "secret": rule.name, "error": str(exc)},
            )
            return "failed"
        now = self._clock()
        planned = self._plan(rule, meta, now)
        state = planned.state
        owed = self._ledger.owed(rule.name, planned.pending)
        if rule.name in self._unseen:
            self._unseen.discard(rule.name)
            self._log_found(rule, meta, planned.pending, ours=owed is not None)
        if owed is None and planned.staged_by_another is not None:
            self._warn_once(rule.name, staged_by_another(rule.name, planned))
            self._blocked.add(rule.name)
        else:
            self._blocked.discard(rule.name)
        set_ran = False
        if owed is not None:  # a rotation of ours that has not ended: retried, not waited out
            if time.monotonic() < owed.next_try:
                return Due.IN_PROGRESS.value
            # While young only this replica knows the set ran; once stale, every replica resumes
            # it from the set, and so does this one (the target may have lost the value).
            set_ran = owed.set_ran and state is Due.IN_PROGRESS
            state = Due.RESUME
        if not state.runs:
            if state is Due.DELETED:
                self._warn_once(rule.name, "scheduled secret is deleted; it is not rotated until undeleted")
            return state.value
        failing = self._failing.get(rule.name)
        if owed is None and failing is not None and time.monotonic() < failing[1]:
            return BACKING_OFF
        started = time.monotonic()
        try:
            with self._rotating(rule.name):
                rotated = rule.run(
                    self._steps, self._environ, state, set_ran=set_ran, found_due=planned.current
                )
        except RotationInProgressError:  # another replica (or a person) staged first: theirs runs
            return Due.IN_PROGRESS.value
        except NoLongerDue as exc:  # stored, or rotated by another replica, since `meta` was read
            log.info(
                "scheduled secret stored again since it was found due; not rotated",
                extra={"event": "rotation.no_longer_due", "secret": rule.name, "version": exc.current},
            )
            return Due.NOT_DUE.value
        except SecretsManagerError as exc:  # never a value in these messages
            self._ledger.failed(rule.name)
            failures = 1 if failing is None else failing[0] + 1
            delay = min(self._check_seconds * 2 ** (failures - 1), FAILED_ENTRY_BACKOFF_CAP_SECONDS)
            self._failing[rule.name] = (failures, time.monotonic() + delay)
            log.error(
                "scheduled rotation failed",
                extra={
                    "event": "rotation.failed",
                    "secret": rule.name,
                    "error": str(exc),
                    "next_try_seconds": round(delay, 3),
                },
            )
            return "failed"
        self._failing.pop(rule.name, None)
        self._ledger.done(rule.name)
        self._warned = {w for w in self._warned if w[0] != rule.name}
        self._record_expiry(rule, rotated, self._steps)
        if rotated.promoted_elsewhere:  # replicas resume a stale version together: one promote wins
            log.info(
                "scheduled rotation finished by another runner",
                extra={"event": "rotation.finished_elsewhere", "secret": rule.name},
            )
            return "resumed elsewhere"
        log.info(
            "scheduled rotation finished",
            extra={
                "event": "rotation.finished",
                "secret": rule.name,
                "version": rotated.version,
                "previous": rotated.previous,
                "resumed": rotated.resumed,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return "resumed" if rotated.resumed else "rotated"

    def _log_found(
        self, rule: ScheduledRotation, meta: SecretMetadata, pending: int | None, *, ours: bool
    ) -> None:
        """At start: a pending version is a rotation that did not finish here (resumed now) or
        another runner's, perhaps still running (resumed once stale, if it does not end first)."""
        if pending is None:
            return
        staged = next((v.created for v in meta.versions if v.version == pending), None)
        resume_at = None if staged is None else (staged + rule.stale_after).isoformat()
        if ours:
            log.warning(
                "found a rotation this replica left unfinished when it stopped; resuming it now",
                extra={"event": "rotation.resuming", "secret": rule.name, "version": pending},
            )
        else:
            log.warning(
                "found a pending version (another runner's rotation, perhaps still running); it is "
                "resumed once stale unless it finishes first, if the schedule staged it",
                extra={
                    "event": "rotation.pending_found",
                    "secret": rule.name,
                    "version": pending,
                    "resume_after": resume_at,
                },
            )

    def _warn_file_once(self, problem: str) -> None:
        """Outside production, a schedule file others could change is logged once, not per pass."""
        if ("", problem) not in self._warned:
            self._warned.add(("", problem))
            log.warning(
                "rotation schedule is not safe",
                extra={"event": "schedule.unsafe", "schedule": str(self.path), "error": problem},
            )

    def _warn_once(self, name: str, problem: str) -> None:
        if (name, problem) not in self._warned:
            self._warned.add((name, problem))
            log.warning(problem, extra={"event": "schedule.entry_warning", "secret": name})


__all__ = ["ACTOR", "SOURCE", "RotationScheduler"]
