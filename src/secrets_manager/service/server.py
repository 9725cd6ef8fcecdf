"""The Secrets gRPC servicer and the process around it (TLS, health, reflection, signals, metrics).

Every RPC runs through `SecretsServicer._call`: identity from the client certificate → its
per-identity rate (service/limits.py; throttled: RESOURCE_EXHAUSTED, counted for a periodic summary
record instead of one each) → refused if the policy revokes that certificate → name
validation → policy → (for changes) a durable audit request record → the store → the audit
record → the response. Denials and failures are audited too. Values are only ever in responses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import os
import resource
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from secrets_manager.access import Capability, Policy, load_policy
from secrets_manager.access.policy import IPAddress
from secrets_manager.audit import (
    AuditError,
    AuditEvent,
    AuditLog,
    local_actor,
    page_token_mac,
    page_token_macs,
    value_fingerprint,
)
from secrets_manager.environment import Environment
from secrets_manager.errors import (
    AccessDeniedError,
    ChangeUnrecordedError,
    InvalidInputError,
    NotFoundError,
    SecretsManagerError,
    StorageError,
    ThrottledError,
    WatchUnsupportedError,
)
from secrets_manager.rotation import ScheduledRotation, end_running_commands
from secrets_manager.service.certificates import ServerCertificates
from secrets_manager.service.config import (
    DEFAULT_MAX_WORKERS,
    WORKERS_KEPT_FROM_WATCH,
    Limits,
    ServerConfig,
    changed_settings,
    load_config,
)
from secrets_manager.service.health_probe import StoreHealth
from secrets_manager.service.limits import THROTTLED_MESSAGE, IdentityLimits, Throttled
from secrets_manager.service.metrics import Metrics, version
from secrets_manager.service.paging import MAX_PAGE_SIZE, Page, TokenBinding
from secrets_manager.service.schedule import RotationScheduler
from secrets_manager.service.served import (
    WATCH_UNSUPPORTED,
    NoChangeFeed,
    ServedStore,
    change_feed,
    store_probe,
)
from secrets_manager.service.watch import ChangeFeed, ChangeHub
from secrets_manager.store.base import (
    BulkReader,
    CurrentRead,
    NameLister,
    SecretMetadata,
    checked_expiry,
    checked_value,
    read_current,
)
from secrets_manager.store.changes import ChangeKind
from secrets_manager.store.names import DEFAULT_NAMESPACE, as_recorded, validate_name, validate_prefix
from secrets_manager.store.polled import PolledChangeFeed
from secrets_manager.store.url import display_url
from secrets_manager.tls.identity import (
    Caller,
    IdentityError,
    caller_from_auth_context,
    serial_text,
    unpresentable_identity,
)
from secrets_manager.tls.retired import RetiredAuthorities
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from secrets_manager.wire import (
    MIN_PING_INTERVAL_WITHOUT_DATA_MS,
    WATCH_HISTORY_KEY,
    WATCH_REVISION_KEY,
    error_metadata,
    fill_secret_message,
    metadata_message,
    secret_message,
    status_for,
)

log = logging.getLogger("secrets_manager.service")

REFLECTION_STREAMS = 4  # server reflection streams open at once, at most (fewer on a small pool)
REFLECTION_WARNING_SECONDS = 60.0  # at most one "reflection stream refused" warning per interval
SIGNAL_POLL_SECONDS = 0.1  # how soon serve's main loop acts on SIGHUP, SIGTERM and SIGINT
# After the grace period, how long the stop waits for handlers gRPC cancelled to end (each writes its
# record then) before the stop record counts them as unfinished.
CUT_HANDLERS_WAIT_SECONDS = 1.0
CLIENT_EXPIRY_WARNING_SECONDS = 7 * 86400  # a client certificate ending sooner is warned of
CLIENT_EXPIRY_NOTICE_SECONDS = 86400  # once a day per certificate
REQUEST_FAILURE_LOG_SECONDS = 10.0  # at most one "request failed" line per method and code this often
EXTERNAL_EXPIRY_REFRESH_SECONDS = 300.0  # the expiry gauge's listing of a Vault or AWS store
PAGE_READ_BATCH = MAX_PAGE_SIZE  # secrets of a BatchGetSecrets page read at once: a whole page
UNPAGED_READ_BATCH = 100  # of an unpaged one (all at once): refused past 4 MiB, so read in parts
WATCH_IDLE_SECONDS = 1.0  # a quiet watch stream still checks this often that it should go on
# No limit on a connection's concurrent HTTP/2 streams (SETTINGS_MAX_CONCURRENT_STREAMS): gRPC's
# core refuses a stream past the limit (RST_STREAM REFUSED_STREAM, UNAVAILABLE to the caller)
# instead of the client holding it back, so with 100 a client's burst of 300 calls on one channel
# lost half of them. Against streams opened and reset in a loop (CVE-2023-44487, "rapid reset")
# that limit helped (4 such connections: another client's p99 243 ms instead of 875 ms, no call
# CANCELLED, 90 MB instead of 155 MB), but an attacker opens more connections, and the service
# recovers as soon as they stop; gRPC's own mitigations apply either way.
# How long a new connection has for its TCP, TLS and HTTP/2 handshakes (gRPC's default: 120 s).
# A connection that never finishes them (no TLS at all, half a ClientHello) held a descriptor that
# long: a client without a certificate opening 1,000 such took every descriptor of a service
# under the usual limit of 1024, and every call failed until it let go.
HANDSHAKE_TIMEOUT_SECONDS = 10.0
MAX_OPEN_FILES = 1 << 20  # the soft limit on open files serve raises to when the hard one is unlimited
_KIND = {
    ChangeKind.VERSION_ADDED: pb.ChangeEvent.VERSION_ADDED,
    ChangeKind.METADATA_CHANGED: pb.ChangeEvent.METADATA_CHANGED,
    ChangeKind.SECRET_DESTROYED: pb.ChangeEvent.SECRET_DESTROYED,
    ChangeKind.RESYNC: pb.ChangeEvent.RESYNC,
}


def _requested_expiry(request: Any) -> datetime | Literal[""] | None:
    """A request's `expires`: None if absent, "" if empty (cleared), else the time it names
    (InvalidInputError unless RFC 3339 with a zone)."""
    if not request.HasField("expires"):
        return None
    if not request.expires:
        return ""
    try:
        moment: datetime | None = datetime.fromisoformat(request.expires)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidInputError(f"expires of {request.name!r} is not an RFC 3339 time with a zone")
    return moment


def _kept(name: str, expires: datetime) -> str:
    """The expiry as the store keeps it (UTC, whole seconds), for a response."""
    kept = checked_expiry(name, expires)
    assert kept is not None
    return kept.isoformat()


class PolicyHolder:
    """The policy in force; swapped whole on reload, so a request sees one policy or the other."""

    def __init__(self, path: Path, environment: Environment = Environment.DEVELOPMENT) -> None:
        self.path = path
        self._environment = environment  # production refuses a file others could change
        self.current: Policy = load_policy(path, environment=environment)
        self._warn_of_unpresentable_identities()

    def reload(self) -> bool:
        """Load the file again; on any error keep the old policy and log why."""
        try:
            self.current = load_policy(self.path, environment=self._environment)
        except SecretsManagerError as exc:
            log.error(
                "policy reload rejected; the previous policy stays in force",
                extra={"event": "policy.reload_rejected", "policy": str(self.path), "error": str(exc)},
            )
            return False
        log.info("policy reloaded", extra={"event": "policy.reloaded", **self.summary()})
        self._warn_of_unpresentable_identities()
        return True

    def summary(self) -> dict[str, object]:
        """What a log line says of the policy in force: its file, digest and sizes (never a rule's
        text)."""
        policy = self.current
        return {
            "policy": str(self.path),
            "policy_sha256": policy.digest,
            "identities": len(policy.identities),
            "roles": len(policy.roles),
            "revoked": len(policy.revoked_serials) + len(policy.revoked_fingerprints),
        }

    def _warn_of_unpresentable_identities(self) -> None:
        """An identity no certificate can present (`spiffe://UPPER.case/x`, a CN with a space) grants
        nothing: a typo that locks its callers out, which `policy check` warns of too."""
        for identity in self.current.identities:
            problem = unpresentable_identity(identity)
            if problem is not None:
                log.warning(
                    "policy names an identity no client certificate can present; it grants nothing",
                    extra={
                        "event": "policy.identity_unpresentable",
                        "policy": str(self.path),
                        "identity": identity,
                        "problem": problem,
                    },
                )


@dataclass
class _Request:
    """What one RPC knows about its caller, for authorisation and audit."""

    identity: str
    peer: str
    address: IPAddress | None  # the peer's IP address, which a role's bound_cidrs are checked on
    event: AuditEvent
    extra_events: list[AuditEvent]
    caller: Caller  # its certificate's serial and fingerprint: a Watch re-checks `[revoked]`
    # Set once the policy granted the request; a failure before that is audited as a denial.
    allowed: bool = False


def _ended_by_client(context: grpc.ServicerContext, exc: BaseException | None) -> grpc.StatusCode | None:
    """How a stream's client ended it, if it did: its deadline passed, or it cancelled (or went).
    GeneratorExit: gRPC dropped the stream's generator unfinished, which it does once the call ended."""
    if context.is_active() and not isinstance(exc, GeneratorExit):
        return None
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _CallEnded(Exception):
    """The call ended (its client cancelled, went, or its deadline passed) while its handler was
    still working: the handler stops, rather than scan the store for a caller that gave up."""


def _still_wanted(context: grpc.ServicerContext) -> None:
    """Raise `_CallEnded` once the call is no longer active (checked between secrets)."""
    if not context.is_active():
        raise _CallEnded()


def _page_reads(
    store: ServedStore, candidates: Iterator[str], page: Page, context: grpc.ServicerContext
) -> Iterator[CurrentRead]:
    """The current value of each candidate for a BatchGetSecrets page, in order, while the page
    has room by count: as many as it has room for at once, with `read_current`, which our
    encrypted store reads at one instant in a few reads (a `get` each was four round trips on
    PostgreSQL). A page whose candidates were deleted since the listing reads on for the rest,
    at a later instant. A store read secret by secret (Vault, AWS) reads one at a time, as before.
    A call whose client has gone stops before each secret. Secrets read past what fits in the
    page's bytes are not sent, and so not audited."""
    batch = PAGE_READ_BATCH if isinstance(store, BulkReader) else 1
    while True:
        _still_wanted(context)
        room = page.room()
        if room == 0:
            if next(candidates, None) is not None:
                page.has_room()  # another page follows
            return
        chunk = list(itertools.islice(candidates, min(UNPAGED_READ_BATCH if room is None else room, batch)))
        if not chunk:
            return
        for read in read_current(store, chunk, fingerprints=True):
            _still_wanted(context)
            yield read


def _denied(identity: str, capability: str, name: str) -> AccessDeniedError:
    """The refusal of `capability` on `name`. A name without '/' is in the default namespace,
    which a service's rules (`market-connector/*`) do not cover: the seed's short names
    (`get BINANCE_API_KEY`) were refused as if the policy were wrong, with nothing to say so."""
    hint = ""
    if name and "/" not in name:
        hint = (
            f" (a name without '/' is in the '{DEFAULT_NAMESPACE}' namespace, not a service's: "
            f"give the full name, NAMESPACE/{name})"
        )
    return AccessDeniedError(f"{identity} may not {capability} {name!r}{hint}")


def peer_address(peer: str) -> IPAddress | None:
    """The caller's IP address in gRPC's peer string ("ipv4:10.0.0.5:51234", "ipv6:[::1]:51234",
    brackets %-encoded by some gRPC versions); None for another kind of peer (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rpartition(":")[0]
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _name_of(meta: SecretMetadata) -> str:
    return meta.name


def _serial_of(caller: Caller | None, refusal: IdentityError) -> str | None:
    """The serial number of a refused certificate: a revoked one's (`caller`), or one that names
    no usable identity (the refusal's)."""
    if caller is not None:
        return caller.serial_text
    return None if refusal.serial is None else serial_text(refusal.serial)


def _unrecorded_change(event: AuditEvent, audit_exc: SecretsManagerError) -> ChangeUnrecordedError:
    """The error for a change made whose record the log then refused: it says the change stands
    (a client told "refused" would make it again), as the CLI does for a local change."""
    cause = getattr(audit_exc, "cause", None) or str(audit_exc)
    what = " ".join(part for part in (event.operation, event.name) if part)
    if event.version:
        what += f", version {event.version}"
    return ChangeUnrecordedError(
        f"the change was made ({what}), but the service could not write its audit record ({cause}): "
        "do not make the change again; the service's operator must make its audit log writable "
        "(free space on its disk if it is full) and run 'secrets-manager audit verify' on its store"
    )


class _ClientExpiryNotices:
    """A warning (and a count in the metrics) when a client calls with a certificate that ends
    within CLIENT_EXPIRY_WARNING_SECONDS, once a day per certificate: the SDK warns in the
    client's own log, which the service's operator may never read, and past its end the client is
    refused with only a closed connection to show for it. One comparison per call otherwise.
    The certificate's end is compared with the wall clock; the day between notices is counted on
    the monotonic one, so a clock stepped back does not silence them for the length of the step,
    nor one stepped forward repeat them at once."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._warned: dict[bytes | str, float] = {}  # certificate: when it was last warned of (monotonic)

    def check(self, caller: Caller, peer: str) -> None:
        ends = caller.not_valid_after
        if ends is None:
            return
        now = time.time()
        if ends - now >= CLIENT_EXPIRY_WARNING_SECONDS:
            return
        key = caller.fingerprint or caller.identity
        at = time.monotonic()
        with self._lock:
            last = self._warned.get(key)
            if last is not None and at - last < CLIENT_EXPIRY_NOTICE_SECONDS:
                return
            if len(self._warned) >= 4096:  # forget the oldest notices: a day's worth is plenty
                self._warned = {
                    k: t for k, t in self._warned.items() if at - t < CLIENT_EXPIRY_NOTICE_SECONDS
                }
            self._warned[key] = at
        self._metrics.count_client_expiry_notice()
        log.warning(
            "a client certificate expires soon: renew it (secrets-manager pki issue NAME --force) "
            "before its client is refused",
            extra={
                "event": "tls.client_certificate_expiring",
                "identity": caller.identity,
                "serial": caller.serial_text,
                "not_valid_after": datetime.fromtimestamp(ends, UTC).isoformat(),
                "hours_left": round((ends - now) / 3600, 1),
                "peer": peer,
            },
        )


class _Throttle:
    """At most one log line per key every `interval` seconds; the next one due says how many like
    it were left out (`suppressed`). A line per request let any client grow the log as fast as it
    could send requests (a refusal looped on, every request failing in an outage, the audit log
    unwritable: one `audit.write_failed` line per request); the audit log has every request, and
    the metrics count each."""

    def __init__(self, interval: float = REQUEST_FAILURE_LOG_SECONDS) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[tuple[object, ...], tuple[float, int]] = {}

    def due(self, *key: object) -> int | None:
        """None if a line for `key` was logged within the interval (this one is counted as left
        out); else how many were left out since that line, and this one is to be logged."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (None, 0))
            if last is not None and now - last < self._interval:
                self._last[key] = (last, suppressed + 1)
                return None
            self._last[key] = (now, 0)
        return suppressed


# The "internal error" lines, per method: a request that a bug fails can be sent in a loop.
_INTERNAL_ERRORS = _Throttle()


def _log_internal_error(method: str, exc: BaseException) -> None:
    suppressed = _INTERNAL_ERRORS.due(method)
    if suppressed is not None:
        log.error(
            "internal error",
            extra={
                "event": "request.internal_error",
                "method": method,
                "error_type": type(exc).__name__,
                "suppressed": suppressed,
            },
        )


class _FailureLog:
    """The "request failed" lines: at most one per method and status code every `interval`
    seconds (`_Throttle`). A failure on the service's side (the store, the audit log, a bug) is a
    warning; the caller's (not found, denied, invalid, conflict) info."""

    def __init__(self, interval: float = REQUEST_FAILURE_LOG_SECONDS) -> None:
        self._throttle = _Throttle(interval)

    def log(self, method: str, code: grpc.StatusCode, **fields: object) -> None:
        suppressed = self._throttle.due(method, code)
        if suppressed is None:
            return
        log.log(
            logging.WARNING if code in _SERVICE_SIDE else logging.INFO,
            "request failed",
            extra={
                "event": "request.failed",
                "method": method,
                "code": code.name,
                **fields,
                "suppressed": suppressed,
            },
        )


_SERVICE_SIDE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class InFlight:
    """The Secrets RPCs whose handler is running (unary calls and Watch streams apart), for the
    stop record (docs/audit.md: `serve.stop`): a handler leaves only once its audit record is
    written, so none running means no request's record is still to come."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.calls = 0
        self.streams = 0

    @contextmanager
    def held(self, *, stream: bool) -> Iterator[None]:
        with self._changed:
            if stream:
                self.streams += 1
            else:
                self.calls += 1
        try:
            yield
        finally:
            with self._changed:
                if stream:
                    self.streams -= 1
                else:
                    self.calls -= 1
                self._changed.notify_all()

    def wait_until_idle(self, timeout: float) -> int:
        """Wait at most `timeout` seconds for every handler to end; how many still run."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.calls + self.streams and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            return self.calls + self.streams


@dataclass(frozen=True)
class Drained:
    """How a graceful stop ended the requests in flight (the `stopped` object of the stop record)."""

    in_flight: int  # unary calls running when the stop began
    watch_streams: int  # Watch streams open then, which the stop ends
    drain_seconds: float  # from the stop's start until the last handler ended (or the bound)
    cut: int  # handlers still running when the grace period ended: gRPC cancelled their calls
    unfinished: int  # of those, still running CUT_HANDLERS_WAIT_SECONDS later: their records may be missing

    def as_record(self, signal_name: str, grace: float) -> dict[str, object]:
        return {
            "signal": signal_name,
            "in_flight": self.in_flight,
            "watch_streams": self.watch_streams,
            "drain_seconds": round(self.drain_seconds, 3),
            "grace_seconds": grace,
            "cut": self.cut,
            "unfinished": self.unfinished,
        }


class SecretsServicer(pb_grpc.SecretsServicer):
    def __init__(
        self,
        store: ServedStore,
        policy: PolicyHolder,
        audit: AuditLog,
        metrics: Metrics,
        *,
        fsync_reads: bool = False,
        max_watch_streams: int = DEFAULT_MAX_WORKERS - WORKERS_KEPT_FROM_WATCH,
        watch_poll_seconds: float | None = None,
        scheduler: RotationScheduler | None = None,
        retired: Callable[[], RetiredAuthorities] = RetiredAuthorities,
        limits: Limits | None = None,
    ) -> None:
        self._store = store
        # Per-identity request rate and Watch streams ([limits]); `configure`d again at SIGHUP.
        self.limits = IdentityLimits(limits or Limits(), max_watch_streams)
        # The client CAs a [tls] reload took out of the trusted bundle (certificates.py): the
        # certificates they signed are refused on connections made before the reload too.
        self._retired = retired
        self._scheduler = scheduler  # RotateSecret runs its entries
        self._policy = policy
        self._audit = audit
        self._metrics = metrics
        # Changes are always audited durably; reads only if asked (config `audit_sync`).
        self._fsync_reads = fsync_reads
        self.stopping = threading.Event()
        self.in_flight = InFlight()  # counted by _withholding_errors's wrappers, for the stop record
        self.audit_refused: Callable[[], None] = lambda: None  # the health check hears of a refusal
        self._failures = _FailureLog()
        self._audit_failures = _Throttle()  # the lines saying a refusal's record was not written
        self._expiring = _ClientExpiryNotices(metrics)
        # One poller of the change feed for every Watch stream, and the cap on open streams. Vault
        # and AWS: a feed polled from the store's snapshots, read from the backend at most every
        # `watch_poll_seconds` and at once after a change through here (the hub's poke). A store
        # without a feed (or that feed turned off): Watch is refused at once, and the hub never polls.
        feed = change_feed(store, poll_seconds=watch_poll_seconds)
        self._watchable = feed is not None
        self.watch_mode = (  # for the start's log line
            "refused"
            if feed is None
            else f"polled every {feed.poll_seconds:g} s"
            if isinstance(feed, PolledChangeFeed)
            else "change feed"
        )
        if watch_poll_seconds is not None and self.watch_mode == "change feed":
            log.warning(
                "watch_poll_seconds is ignored: this store has a change feed of its own, which Watch "
                "reads every 0.2 s; the setting is for Vault and AWS stores (remove it)",
                extra={"event": "config.ignored", "setting": "watch_poll_seconds"},
            )
        self.watch_hub = ChangeHub(feed or NoChangeFeed(), max_subscribers=max_watch_streams)
        metrics.count_watch_streams(lambda: self.watch_hub.subscribers, max_watch_streams)

    # ---- the request pipeline ------------------------------------------------------------------

    def _refuse_if_retired(self, auth: Mapping[str, Iterable[bytes | str]], caller: Caller) -> None:
        """IdentityError if the caller's certificate was signed by a client CA a reload retired:
        gRPC checked it against the CA in force at its connection's handshake, before the reload."""
        retired = self._retired()
        if not retired:
            return
        pem = next(iter(auth.get("x509_pem_cert") or ()), None)
        issuer = None if pem is None else retired.issuer_of(pem)
        if issuer is not None:
            raise IdentityError(
                f"the client certificate of {caller.identity} was issued by {issuer}, a client CA the "
                "service no longer trusts (taken out of tls.client_ca at a reload): issue a new one "
                "from the current CA",
                serial=caller.serial,
            )

    def refuse_unauthenticated(
        self, context: grpc.ServicerContext, method: str, operation: str, name: str | None
    ) -> None:
        """Health and server reflection: abort UNAUTHENTICATED, recorded (`operation`, `deny`,
        `unauthenticated`, the identity, serial and peer) as the Secrets RPCs record it, a caller
        they would refuse as unauthenticated: a certificate the policy revokes, one a reload's
        retired CA signed, or one naming no usable identity. A revoked credential gets nothing,
        not even whether the service is up. Anyone else is let through, unrecorded (a load
        balancer's probes would fill the log). As in `_call`, a refused identity past its rate
        is throttled instead of recorded each time."""
        peer = context.peer()
        identity, caller = "<unidentified>", None
        try:
            auth = context.auth_context()
            caller = caller_from_auth_context(auth)
            identity = caller.identity
            revoked = self._policy.current.revocation(caller.serial, caller.fingerprint)  # set lookups
            if revoked is not None:
                raise IdentityError(revoked)
            self._refuse_if_retired(auth, caller)
        except IdentityError as exc:
            started = time.perf_counter()
            if caller is not None and not self.limits.admit(identity, method, peer, caller.serial_text):
                self._refuse_throttled(context, method, identity, started, self._metrics.observe)
            event = AuditEvent(
                operation,
                identity,
                "grpc",
                peer,
                as_recorded(name),
                decision="deny",
                outcome="unauthenticated",
                certificate_serial=_serial_of(caller, exc),
            )
            self._record(event, self._fsync_reads)
            self._metrics.observe(method, grpc.StatusCode.UNAUTHENTICATED, started)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    @contextmanager
    def _call(
        self,
        context: grpc.ServicerContext,
        method: str,
        operation: str,
        name: str | None,
        capability: str | None,
        *,
        mutating: bool = False,
        prefix: bool = False,
        stream: bool = False,
        value: bytes | None = None,
    ) -> Iterator[_Request]:
        """Authenticate, validate, authorise, audit and map errors around one RPC body.

        `capability=None` means the body filters by policy itself (list, batch get, watch) and sets
        `allowed` once it has decided; the caller must still hold a role, so one the policy does
        not know cannot scan the store or hold watch streams. A failure before the request was
        allowed (an invalid name included) is audited `decision: deny` (docs/audit.md).
        A `stream` refused here is counted in the metrics as a stream; one set up is counted by
        `_counted_stream` when it ends. A `value` to write is checked with the name (its 64 KiB
        limit), before a change's pending record is written or the value's fingerprint taken."""
        started = time.perf_counter()
        count = self._metrics.observe_stream if stream else self._metrics.observe
        code = grpc.StatusCode.OK
        peer = context.peer()
        recorded = as_recorded(name)  # not validated yet: a refusal names what was refused
        durable = mutating or self._fsync_reads
        identity, caller = "<unidentified>", None
        try:
            auth = context.auth_context()
            caller = caller_from_auth_context(auth)  # parsed once per certificate
            identity = caller.identity
            if not self.limits.admit(identity, method, peer, caller.serial_text):
                self._refuse_throttled(context, method, identity, started, count)
            revoked = self._policy.current.revocation(caller.serial, caller.fingerprint)  # set lookups
            if revoked is not None:
                raise IdentityError(revoked)
            self._refuse_if_retired(auth, caller)
            self._expiring.check(caller, peer)
        except IdentityError as exc:
            self._record(
                AuditEvent(
                    operation,
                    identity,
                    "grpc",
                    peer,
                    recorded,
                    decision="deny",
                    outcome="unauthenticated",
                    certificate_serial=_serial_of(caller, exc),
                ),
                durable,
            )
            count(method, grpc.StatusCode.UNAUTHENTICATED, started)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        assert caller is not None  # else IdentityError aborted above
        # Which certificate of the identity made it: after a key is stolen, its reads are told
        # from those of the renewed certificate (and one shared identity's holders from each other).
        event = AuditEvent(operation, identity, "grpc", peer, recorded, certificate_serial=caller.serial_text)
        request = _Request(identity, peer, peer_address(peer), event, [], caller)
        try:
            if name is not None:
                (validate_prefix if prefix else validate_name)(name)
            if value is not None:
                checked_value(value)
            policy = self._policy.current
            if capability is None and not policy.roles_of(identity, request.address):
                raise AccessDeniedError(f"{identity} holds no role in the service's policy: {method} refused")
            if capability is not None and not policy.allows(
                identity, capability, name or "", request.address
            ):
                raise _denied(identity, capability, name or "")
            request.allowed = capability is not None
            if mutating:
                self._append([replace(event, outcome="pending")], durable=True)
                with self._store.acting_for(identity):  # versions it writes are by the caller
                    yield request
            else:
                yield request
            try:
                self._append(request.extra_events or [event], durable=durable)
            except SecretsManagerError as exc:
                if not mutating:  # a read: its result is not sent, so it was refused indeed
                    raise
                raise _unrecorded_change(event, exc) from None
            if mutating:  # this replica's watchers hear of its own changes without waiting a tick
                self.watch_hub.poke()
        except SecretsManagerError as exc:
            code = status_for(exc)
            event.outcome = exc.kind
            event.decision = "allow" if request.allowed else "deny"
            if isinstance(exc, AuditError) and exc.timed_out:
                # The log did not answer within its timeout a moment ago: a record of this refusal
                # would wait as long again, and the caller twice the timeout for its answer (past
                # its deadline). The refusal is logged, counted and answered now.
                suppressed = self._audit_failures.due("audit.write_skipped", method)
                if suppressed is not None:
                    log.error(
                        "audit record of a refusal not attempted: the audit log is not answering",
                        extra={
                            "event": "audit.write_skipped",
                            "method": method,
                            "error": str(exc),
                            "suppressed": suppressed,
                        },
                    )
            else:
                self._record(event, durable)
            self._failures.log(method, code, identity=identity, peer=peer, secret=recorded, kind=exc.kind)
            refinement = error_metadata(exc)
            if refinement:  # the client raises this class, not only its status's
                context.set_trailing_metadata(refinement)
            context.abort(code, str(exc))
        except _CallEnded:  # nothing was sent: the reads it made are not audited as reads
            code = _ended_by_client(context, None) or grpc.StatusCode.CANCELLED
            event.outcome = "cancelled"
            event.decision = "allow" if request.allowed else "deny"
            self._record(event, durable)
            context.abort(code, "the call ended (cancelled by its client, or past its deadline)")
        except Exception as exc:  # a bug: audited and counted, its message withheld (it could hold data)
            code = grpc.StatusCode.INTERNAL
            event.outcome = "error"
            event.decision = "allow" if request.allowed else "deny"
            self._record(event, durable)
            _log_internal_error(method, exc)
            context.abort(code, "internal error")
        finally:
            if not stream or code is not grpc.StatusCode.OK:
                count(method, code, started)

    def _refuse_throttled(
        self,
        context: grpc.ServicerContext,
        method: str,
        identity: str,
        started: float,
        count: Callable[[str, grpc.StatusCode, float], None],
    ) -> None:
        """Answer a request past its identity's rate: RESOURCE_EXHAUSTED naming ThrottledError,
        counted in the metrics; audited only in the identity's next summary record (Vault's rate
        limit quotas are not audited either): one per request let a runaway client fill the disk."""
        self._metrics.count_throttled(method)
        count(method, grpc.StatusCode.RESOURCE_EXHAUSTED, started)
        error = ThrottledError(THROTTLED_MESSAGE.format(identity=identity))
        context.set_trailing_metadata(error_metadata(error))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))

    def summarise_throttled(self) -> None:
        """One audit record (`throttled`) and one log line per identity throttled since the last
        summary: how many of its requests were, by method. Run every `throttled_summary_seconds`
        and once at shutdown."""
        for throttled in self.limits.drain():
            self._record(_throttled_event(throttled), durable=False)
            log.warning(
                "requests throttled",
                extra={
                    "event": "limits.throttled",
                    "identity": throttled.identity,
                    "peer": throttled.peer,
                    "count": throttled.count,
                    "methods": dict(sorted(throttled.methods.items())),
                },
            )

    def summarise_throttled_until_stopped(self) -> None:
        """The summary loop (a thread of its own): never ends on an error, which it logs."""
        while not self.stopping.wait(self.limits.limits.throttled_summary_seconds):
            try:
                self.summarise_throttled()
            except Exception as exc:  # a bug: logged, and the next summary still comes
                _log_internal_error("summarise_throttled", exc)

    @contextmanager
    def _counted_stream(self, context: grpc.ServicerContext, method: str, started: float) -> Iterator[None]:
        """Count a stream set up by `_call` once it ends, by the status it ended with: an abort's,
        CANCELLED or DEADLINE_EXCEEDED if its client went, INTERNAL for a bug, else OK."""
        code = grpc.StatusCode.OK
        try:
            yield
        except BaseException as exc:
            code = context.code() or _ended_by_client(context, exc) or grpc.StatusCode.INTERNAL
            raise
        else:
            code = context.code() or _ended_by_client(context, None) or grpc.StatusCode.OK
        finally:
            self._metrics.observe_stream(method, code, started)

    def _record(self, event: AuditEvent, durable: bool) -> None:
        """Audit a failure; if even that fails, the request is failing already: log it."""
        try:
            self._append([event], durable=durable)
        except SecretsManagerError as exc:
            suppressed = self._audit_failures.due("audit.write_failed", event.operation)
            if suppressed is not None:
                log.error(
                    "audit record could not be written",
                    extra={
                        "event": "audit.write_failed",
                        "operation": event.operation,
                        "error": str(exc),
                        "suppressed": suppressed,
                    },
                )

    def _append(self, events: list[AuditEvent], *, durable: bool) -> None:
        """Append to the audit log; a record it refuses is counted, and fails the audit health check."""
        try:
            self._audit.append(events, self._store, durable=durable)
        except AuditError:
            self._metrics.count_audit_failure()
            self.audit_refused()
            raise

    # ---- RPCs -------------------------------------------------------------------------------------

    def GetSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context, "GetSecret", "get", request.name, "read") as call:
            selector = request.WhichOneof("selector")
            secret, fingerprint = self._store.get_with_fingerprint(
                request.name,
                version=request.version if selector == "version" else None,
                label=request.label if selector == "label" else None,
            )
            call.event.version = secret.version
            call.event.value_hmac = fingerprint
        response = pb.GetSecretResponse()
        fill_secret_message(response.secret, secret)
        return response

    def BatchGetSecrets(self, request: Any, context: grpc.ServicerContext) -> Any:
        # Each name once, in the caller's order (as the proto says): a name listed 5000 times was
        # sent back, and audited as read, 5000 times (one small request, megabytes of audit log).
        names = list(dict.fromkeys(request.names))
        # A refusal's record names what was refused: by name, the first name (a caller with no role,
        # refused before the body, may read none of them), else the name the body refuses.
        audited = names[0] if names else request.prefix or None
        with self._call(context, "BatchGetSecrets", "batch_get", audited, None, prefix=not names) as call:
            policy = self._policy.current
            if names:
                call.event.name = as_recorded(request.prefix) or None
                validate_prefix(request.prefix)  # unused beside names, but still checked
                for name in names:
                    call.event.name = as_recorded(name)
                    validate_name(name)
                refused = [n for n in names if not policy.allows(call.identity, "read", n, call.address)]
                if refused:
                    call.event.name = refused[0]
                    raise _denied(call.identity, "read", refused[0])
                call.event.name = request.prefix or None
                call.allowed = True
            else:
                call.allowed = True
            binding = self._page_binding(
                "BatchGetSecrets", call.identity, prefix=request.prefix, names=list(request.names)
            )
            page = Page(
                request.page_size, request.page_token, by_position=bool(request.names), binding=binding
            )
            if names:
                candidates = page.start(names)
            else:
                # The store keeps its last listing while nothing changes, sorted: a page starts by
                # bisection and filters only the names it goes through, so it costs about its own.
                _still_wanted(context)
                shown = bool(policy.roles_of(call.identity, call.address))
                if isinstance(self._store, NameLister):
                    # Vault: its listing GETs every secret's metadata, and each page listed again
                    # (no change head to keep it by): N/100 pages of N reads for N secrets.
                    names_listed = self._store.list_names(request.prefix)
                    listed_names = page.start_sorted(names_listed, str)
                else:
                    listed = self._store.list(request.prefix)
                    listed_names = (meta.name for meta in page.start_sorted(listed, _name_of))
                candidates = (
                    name
                    for name in listed_names
                    if shown and policy.enumerable_by_read(call.identity, name, call.address)
                )
            messages = []
            for read in _page_reads(self._store, candidates, page, context):
                name, secret, fingerprint = read.name, read.secret, read.fingerprint
                if isinstance(read.error, NotFoundError):
                    if request.names:
                        call.event.name = name
                        raise read.error
                    page.skipped(name)
                    continue  # deleted between list and get
                if read.error is not None:
                    raise read.error
                assert secret is not None
                message = secret_message(secret)
                if not page.fits(name, message.ByteSize()):
                    break
                event = AuditEvent(
                    "get",
                    call.identity,
                    "grpc",
                    call.peer,
                    name,
                    version=secret.version,
                    value_hmac=fingerprint,
                    request_id=call.event.request_id,
                    certificate_serial=call.event.certificate_serial,
                )
                call.extra_events.append(event)
                messages.append(message)
            if not call.extra_events:
                call.extra_events.append(call.event)
        return pb.BatchGetSecretsResponse(secrets=messages, next_page_token=page.next_token())

    def PutSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(
            context, "PutSecret", "store", request.name, "write", mutating=True, value=request.value
        ) as call:
            if request.tags and not request.replace_tags:
                # The store takes tags only as the whole set: merging them here (read, then write)
                # would drop a tag another client set in between. So they are refused, not merged.
                raise InvalidInputError(
                    f"tags given for {request.name!r} replace every tag it has: set replace_tags to "
                    "say so, or add and remove single tags with UpdateSecretMetadata"
                )
            expires = _requested_expiry(request) or None
            call.event.value_hmac = value_fingerprint(self._store, request.value)
            info = self._store.put(
                request.name,
                request.value,
                expect_version=request.expect_version if request.HasField("expect_version") else None,
                description=request.description if request.HasField("description") else None,
                tags=dict(request.tags) if request.replace_tags else None,
                max_versions=request.max_versions if request.HasField("max_versions") else None,
                expires=expires,
            )
            call.event.version = info.version
        response = pb.PutSecretResponse(
            name=request.name,
            version=info.version,
            created=info.created.isoformat(),
            created_by=info.created_by,
        )
        if expires is not None:
            response.expires = _kept(request.name, expires)
        return response

    def ListSecrets(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context, "ListSecrets", "list", request.prefix or None, None, prefix=True) as call:
            call.allowed = True  # it holds a role; the names it is shown are filtered below
            binding = self._page_binding(
                "ListSecrets", call.identity, prefix=request.prefix, include_deleted=request.include_deleted
            )
            page = Page(request.page_size, request.page_token, by_position=False, binding=binding)
            _still_wanted(context)
            found = self._store.list(request.prefix, include_deleted=request.include_deleted)
            policy = self._policy.current
            shown = bool(policy.roles_of(call.identity, call.address))
            messages = []
            # `found` is sorted and kept by the store while nothing changes: a page starts by
            # bisection and asks the policy only about the names it goes through.
            for meta in page.start_sorted(found, _name_of):
                _still_wanted(context)
                if not (shown and policy.allows(call.identity, Capability.LIST, meta.name, call.address)):
                    continue
                if not page.has_room():
                    break
                message = metadata_message(meta)
                if not page.fits(meta.name, message.ByteSize()):
                    break
                messages.append(message)
        return pb.ListSecretsResponse(secrets=messages, next_page_token=page.next_token())

    def _page_binding(self, method: str, identity: str, **request: object) -> TokenBinding:
        """What a page token of `method` is bound to; keyed by the store's audit key, which every
        replica of the store shares (service/paging.py)."""
        return TokenBinding(
            lambda data: page_token_mac(self._store, data),
            method,
            identity,
            lambda data, reload: page_token_macs(self._store, data, reload=reload),
            **request,
        )

    def DescribeSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context, "DescribeSecret", "history", request.name, "list"):
            meta = self._store.describe(request.name)
        return pb.DescribeSecretResponse(metadata=metadata_message(meta))

    def UpdateSecretMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._update_metadata(context, "UpdateSecretMetadata", request, None)

    def UpdateSecretMetadataIfCurrent(self, request: Any, context: grpc.ServicerContext) -> Any:
        """UpdateSecretMetadata on condition (store.update_metadata's expect_current), decided in the
        store's own commit: ABORTED (a ConflictError), nothing changed, if `expect_current` is no
        longer current. A method of its own, so a client asking for the condition gets
        UNIMPLEMENTED from an older service, not an unconditional change."""
        return self._update_metadata(
            context, "UpdateSecretMetadataIfCurrent", request, request.expect_current or None
        )

    def _update_metadata(
        self, context: grpc.ServicerContext, method: str, request: Any, expect: int | None
    ) -> Any:
        """A metadata change audited as `metadata` (with the version it was held to, if any).
        UpdateSecretMetadataIfCurrent without a version to hold to (`expect` None) is refused:
        INVALID_ARGUMENT, nothing changed."""
        with self._call(context, method, "metadata", request.name, "write", mutating=True) as call:
            if method == "UpdateSecretMetadataIfCurrent":
                call.event.version = expect
                if expect is None:
                    raise InvalidInputError("expect_current is the version read as current: 1 or more")
            expires = _requested_expiry(request)
            self._store.update_metadata(
                request.name,
                description=request.description if request.HasField("description") else None,
                set_tags=dict(request.set_tags),
                remove_tags=list(request.remove_tags),
                max_versions=request.max_versions if request.HasField("max_versions") else None,
                expires=expires or None,
                clear_expiry=expires == "",
                expect_current=expect,
            )
        if expires is None:
            return pb.UpdateSecretMetadataResponse()
        return pb.UpdateSecretMetadataResponse(expires=_kept(request.name, expires) if expires else "")

    def DeleteSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context, "DeleteSecret", "delete", request.name, "delete", mutating=True):
            self._store.delete(request.name)
        return pb.DeleteSecretResponse()

    def DeleteSecretIfCurrent(self, request: Any, context: grpc.ServicerContext) -> Any:
        """DeleteSecret on condition (store.delete's expect_version): ABORTED (a ConflictError),
        nothing deleted, if `expect_version` is no longer current. Audited as `delete` with it."""
        return self._delete_on_condition(request, context, "DeleteSecretIfCurrent", expect_no_pending=False)

    def DeleteSecretIfUnchanged(self, request: Any, context: grpc.ServicerContext) -> Any:
        """DeleteSecretIfCurrent that is also refused while a rotation is in progress (store.delete's
        expect_no_pending): ABORTED, nothing deleted, if a version other than current is pending.
        Audited as `delete` with the version."""
        return self._delete_on_condition(request, context, "DeleteSecretIfUnchanged", expect_no_pending=True)

    def _delete_on_condition(
        self, request: Any, context: grpc.ServicerContext, method: str, *, expect_no_pending: bool
    ) -> Any:
        with self._call(context, method, "delete", request.name, "delete", mutating=True) as call:
            call.event.version = request.expect_version or None
            if not request.expect_version:
                raise InvalidInputError("expect_version is the version read as current: 1 or more")
            self._store.delete(
                request.name, expect_version=request.expect_version, expect_no_pending=expect_no_pending
            )
        return pb.DeleteSecretResponse()

    def UndeleteSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context, "UndeleteSecret", "undelete", request.name, "delete", mutating=True):
            self._store.undelete(request.name)
        return pb.UndeleteSecretResponse()

    def StageSecretVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Rotation step 1 (store.stage): a new version labelled pending; audited with its fingerprint.
        ABORTED (a ConflictError) if `expect_current` is given and no longer current (the field
        clients sent before StageSecretVersionIfCurrent, still honoured)."""
        expect = request.expect_current if request.HasField("expect_current") else None
        return self._stage(context, "StageSecretVersion", request, expect)

    def StageSecretVersionIfCurrent(self, request: Any, context: grpc.ServicerContext) -> Any:
        """StageSecretVersion on condition (store.stage's expect_current): ABORTED (a ConflictError),
        nothing staged, if `expect_current` is no longer current. A method of its own, so a client
        asking for the condition gets UNIMPLEMENTED from an older service, not an unconditional stage."""
        return self._stage(context, "StageSecretVersionIfCurrent", request, request.expect_current or None)

    def _stage(self, context: grpc.ServicerContext, method: str, request: Any, expect: int | None) -> Any:
        """A stage audited as rotate.stage with the value's fingerprint, recording the request's
        target. StageSecretVersionIfCurrent without a version to hold to (`expect` None) is refused:
        INVALID_ARGUMENT, nothing staged."""
        name, value = request.name, request.value
        target = request.target if request.HasField("target") else None
        with self._call(context, method, "rotate.stage", name, "rotate", mutating=True, value=value) as call:
            if method == "StageSecretVersionIfCurrent" and expect is None:
                raise InvalidInputError("expect_current is the version the value was built from: 1 or more")
            call.event.value_hmac = value_fingerprint(self._store, value)
            info = self._store.stage(name, value, expect_current=expect, target=target)
            call.event.version = info.version
        return pb.StageSecretVersionResponse(
            name=name,
            version=info.version,
            created=info.created.isoformat(),
            created_by=info.created_by,
        )

    def PromoteSecretVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Rotation's last step (store.promote): ABORTED (a ConflictError) if the version is no longer
        pending. The response names the old current as the change itself saw it."""
        with self._call(
            context, "PromoteSecretVersion", "rotate.promote", request.name, "rotate", mutating=True
        ) as call:
            call.event.version = request.version
            previous = self._store.promote(request.name, request.version)
        response = pb.PromoteSecretVersionResponse(name=request.name, version=request.version)
        if previous is not None:
            response.previous = previous
        return response

    def DiscardPendingVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Abandon a rotation (store.discard_pending): NOT_FOUND if no version is pending."""
        with self._call(
            context, "DiscardPendingVersion", "rotate.discard", request.name, "rotate", mutating=True
        ) as call:
            # The audit record and the caller get the version the change itself took the label from.
            call.event.version = self._store.discard_pending(request.name)
        return pb.DiscardPendingVersionResponse(name=request.name, version=call.event.version)

    def RotateSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Run the name's configured rotation here and now (service/schedule.py), each step audited
        under the caller's identity and this request's id; the call holds its worker meanwhile."""
        with self._call(context, "RotateSecret", "rotate", request.name, "rotate", mutating=True) as call:
            if self._scheduler is None:
                raise NotFoundError(
                    "this service has no rotation schedule (rotation_schedule in server.toml); rotate "
                    f"{request.name!r} from the client with 'secrets-manager rotate', or configure one"
                )
            rotated = self._scheduler.rotate_now(
                request.name,
                actor=call.identity,
                peer=call.peer,
                request_id=call.event.request_id,
                certificate_serial=call.event.certificate_serial,
            )
            call.event.version = rotated.version
        response = pb.RotateSecretResponse(
            name=request.name,
            version=rotated.version,
            resumed=rotated.resumed,
            promoted_elsewhere=rotated.promoted_elsewhere,
        )
        if rotated.previous is not None:
            response.previous = rotated.previous
        if rotated.expires is not None:
            response.expires = rotated.expires.isoformat()
        return response

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Stream change events from the one change-feed poller (service/watch.py). The stream holds
        this worker thread while open; past `max_watch_streams` open streams: RESOURCE_EXHAUSTED."""
        started = time.perf_counter()
        prefix = request.prefix
        since = request.since_revision if request.HasField("since_revision") else None
        since_history = request.since_history if request.HasField("since_history") else None
        with self._call(context, "Watch", "watch", prefix or None, None, prefix=True, stream=True) as call:
            call.allowed = True  # it holds a role; the changes it is shown are filtered below
            if not self._watchable:  # UNIMPLEMENTED: the client refreshes by TTL, and says so once
                raise WatchUnsupportedError(WATCH_UNSUPPORTED)
            subscription = self.watch_hub.subscribe(since, since_history)
            try:  # then its identity's cap ([limits]); the global one's refusal says more when both are full
                slot = self.limits.open_watch(call.identity)
            except BaseException:
                subscription.close()
                raise
        # Its places under the limits are freed however the stream ends; it is counted then.
        with slot, subscription, self._counted_stream(context, "Watch", started):
            if not context.add_callback(subscription.close):  # the client has gone already
                return
            # Tell the client the stream is live: every change after this revision will reach it.
            live = [(WATCH_REVISION_KEY, str(subscription.revision))]
            if subscription.history is not None:
                live.append((WATCH_HISTORY_KEY, subscription.history))
            context.send_initial_metadata(tuple(live))
            identity = call.identity
            in_force = self._policy.current  # the policy this stream's events were filtered by
            delivered = subscription.revision  # every change up to here was offered to this stream
            while context.is_active() and not self.stopping.is_set():
                changes = subscription.next_batch(WATCH_IDLE_SECONDS)
                if changes is None:  # closed (shutdown, client gone) or failed
                    break
                policy = self._policy.current
                revoked = policy.revocation(call.caller.serial, call.caller.fingerprint)
                if revoked is None:
                    try:
                        self._refuse_if_retired(context.auth_context(), call.caller)
                    except IdentityError as exc:
                        revoked = str(exc)
                if revoked is not None:  # a reload revoked its certificate or CA: no more events
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{revoked}: Watch ended")
                if not policy.roles_of(identity, call.address):  # a reload took its last role: free the slot
                    context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"{identity} no longer holds a role in the service's policy: Watch ended",
                    )
                if policy is not in_force:
                    # A reload may have granted or taken names it reads: no change event says so,
                    # so the client is told to read again what it caches (SDK: at once, not at the
                    # TTL), from where this stream has reached. Not if the file did not change (a
                    # SIGHUP for a renewed certificate): every client would read everything again.
                    changed, in_force = policy != in_force, policy
                    if changed:
                        yield _resync_event(delivered, subscription.history)
                for change in changes:
                    if change.kind is ChangeKind.RESYNC:  # its revision may be of a new history
                        delivered = change.revision
                        yield _resync_event(change.revision, subscription.history)
                        continue
                    delivered = max(delivered, change.revision)
                    if change.name.startswith(prefix) and policy.enumerable_by_read(
                        identity, change.name, call.address
                    ):
                        yield pb.ChangeEvent(
                            name=change.name,
                            version=change.version or 0,
                            kind=_KIND[change.kind],
                            revision=change.revision,
                        )
            error = subscription.error
            if isinstance(error, SecretsManagerError):
                context.abort(status_for(error), str(error))
            elif error is not None:  # a bug in the poller, logged there; its message is withheld
                context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _throttled_event(throttled: Throttled) -> AuditEvent:
    """The summary record of an identity's throttled requests (docs/audit.md): `deny`, outcome
    `throttled`, and `throttled` = how many, by method, and the first and last one's time."""
    return AuditEvent(
        "throttled",
        throttled.identity,
        "grpc",
        throttled.peer,
        None,
        decision="deny",
        outcome="throttled",
        certificate_serial=throttled.certificate_serial,
        throttled={
            "count": throttled.count,
            "methods": dict(sorted(throttled.methods.items())),
            "first": datetime.fromtimestamp(throttled.first, UTC).isoformat(),
            "last": datetime.fromtimestamp(throttled.last, UTC).isoformat(),
        },
    )


def _probe_audit(audit: AuditLog, store: ServedStore) -> None:
    """The health check of the audit log: an append of no record (locks, live file, anchor), and
    room on its disk for the next records (an empty append needs none, so a full disk would read
    SERVING between the refusals of real requests)."""
    audit.append([], store)
    audit.require_space()


def _resync_event(revision: int, history: str | None) -> Any:
    return pb.ChangeEvent(kind=pb.ChangeEvent.RESYNC, revision=revision, history=history or "")


# ---- the process ------------------------------------------------------------------------------


def reflection_stream_limit(max_workers: int, watch_stream_limit: int) -> int:
    """How many server reflection streams may be open at once: `REFLECTION_STREAMS`, or half of the
    worker threads Watch streams leave to other calls if that is fewer (at least 1)."""
    return max(1, min(REFLECTION_STREAMS, (max_workers - watch_stream_limit) // 2))


class BoundedReflection:
    """grpcio-reflection's servicer, at most `limit` streams at once. A reflection stream is a
    bidirectional stream that holds a worker thread until the client closes it (grpcurl does when
    its command ends), and any certificate the CA signed may open one: without a bound, one that
    never closed them took every thread, and every other call waited until its deadline. One
    more is refused at once with RESOURCE_EXHAUSTED."""

    def __init__(
        self,
        service_names: tuple[str, ...],
        limit: int,
        refuse: Callable[[grpc.ServicerContext, str, str, str | None], None] = lambda *_: None,
    ) -> None:
        self._servicer = reflection.ReflectionServicer(service_names)
        self._refuse = refuse  # a revoked certificate is not shown the services either
        self._limit = limit
        self._places = threading.BoundedSemaphore(limit)
        self._last_warning = -REFLECTION_WARNING_SECONDS

    def ServerReflectionInfo(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._refuse(context, "ServerReflectionInfo", "reflection", None)
        if not self._places.acquire(blocking=False):
            self._warn(context)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many server reflection streams open (at most {self._limit} at once, each holds "
                "a worker thread): close a reflection stream once answered, "
                "and retry",
            )
        try:
            yield from self._servicer.ServerReflectionInfo(requests, context)
        finally:
            self._places.release()

    def _warn(self, context: grpc.ServicerContext) -> None:
        now = time.monotonic()
        if now - self._last_warning >= REFLECTION_WARNING_SECONDS:  # a race here costs one more line
            self._last_warning = now
            log.warning(
                "server reflection stream refused: the limit of open reflection streams is reached",
                extra={
                    "event": "reflection.refused",
                    "reflection_streams": self._limit,
                    "peer": context.peer(),
                },
            )


class GatedHealth(health.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 (Check, Watch) that first refuses a caller the Secrets RPCs would refuse as
    unauthenticated (`SecretsServicer.refuse_unauthenticated`): a revoked certificate is not told
    whether the service serves. The SDK and --server take such a refusal from a replica as the
    replica answering (client/remote.py), so the call they make next is refused with the
    revocation's message, as before."""

    def __init__(self, refuse: Callable[[grpc.ServicerContext, str, str, str | None], None]) -> None:
        super().__init__()
        self._refuse = refuse

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._refuse(context, "Health/Check", "health", request.service)
        return super().Check(request, context)

    def Watch(self, request: Any, context: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
        self._refuse(context, "Health/Watch", "health", request.service)
        return super().Watch(request, context, send_response_callback)


@dataclass
class RunningServer:
    server: grpc.Server
    servicer: SecretsServicer
    port: int
    health: health.HealthServicer
    metrics: Metrics
    store_health: StoreHealth

    def stop(self, grace: float) -> Drained:
        """Refuse new calls, end watch streams, let in-flight calls finish within `grace` seconds;
        what it ended, for the stop record. Calls gRPC cancelled at the end of the grace period
        (`cut`) are given CUT_HANDLERS_WAIT_SECONDS more to end, and so to write their records."""
        began = time.monotonic()
        in_flight = self.servicer.in_flight
        calls, streams = in_flight.calls, in_flight.streams
        self.health.enter_graceful_shutdown()
        self.store_health.stop()
        self.servicer.stopping.set()
        self.servicer.watch_hub.close()  # every watch stream ends now, and the feed poller stops
        self.server.stop(grace).wait()  # returns once every call ended, or at the grace's end
        cut = in_flight.wait_until_idle(0.0)
        unfinished = in_flight.wait_until_idle(CUT_HANDLERS_WAIT_SECONDS) if cut else 0
        drained = Drained(calls, streams, time.monotonic() - began, cut, unfinished)
        self.servicer.summarise_throttled()  # the last summary: what was throttled since the one before
        self.metrics.close()
        return drained


def build_server(
    config: ServerConfig,
    store: ServedStore,
    audit: AuditLog,
    policy: PolicyHolder,
    scheduler: RotationScheduler | None = None,
    certificates: ServerCertificates | None = None,
    bound: Callable[[int], None] = lambda port: None,
) -> RunningServer:
    """A started gRPC server with mutual TLS, health, reflection and (optionally) metrics.
    `certificates` (default: the config's [tls] files, read now) are what SIGHUP reloads.
    `bound(port)` runs once the port is bound, before the first call is taken: if it raises
    (the start's audit record could not be written), no call is served."""
    if certificates is None:
        certificates = ServerCertificates(config.tls_cert, config.tls_key, config.tls_client_ca)
    metrics = Metrics(config.metrics_listen)
    metrics.track_certificate_expiry(certificates.not_valid_after, certificates.client_ca_not_valid_after)
    try:
        return _start(config, certificates, metrics, store, audit, policy, scheduler, bound)
    except BaseException:
        metrics.close()  # its port is free again for the next attempt
        raise


def _start(
    config: ServerConfig,
    certificates: ServerCertificates,
    metrics: Metrics,
    store: ServedStore,
    audit: AuditLog,
    policy: PolicyHolder,
    scheduler: RotationScheduler | None,
    bound: Callable[[int], None],
) -> RunningServer:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.so_reuseport", 0),
            # Let clients keep idle watch streams alive, so a silently dropped connection is noticed.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_WITHOUT_DATA_MS),
            ("grpc.server_handshake_timeout_ms", round(HANDSHAKE_TIMEOUT_SECONDS * 1000)),
        ],
    )
    servicer = SecretsServicer(
        store,
        policy,
        audit,
        metrics,
        fsync_reads=config.audit_sync == "always",
        max_watch_streams=config.watch_stream_limit,
        watch_poll_seconds=config.watch_poll_seconds,
        scheduler=scheduler,
        retired=lambda: certificates.retired,
        limits=config.limits,
    )
    pb_grpc.add_SecretsServicer_to_server(_withholding_errors(servicer), server)  # type: ignore[no-untyped-call]
    health_servicer = GatedHealth(servicer.refuse_unauthenticated)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = pb.DESCRIPTOR.services_by_name["Secrets"].full_name
    for name in (service_name, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflected = (
        service_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        BoundedReflection(
            reflected,
            reflection_stream_limit(config.max_workers, config.watch_stream_limit),
            servicer.refuse_unauthenticated,
        ),
        server,
    )
    port = _bind(server, config.listen, certificates.credentials())
    try:
        bound(port)
    except BaseException:
        server.stop(0)
        raise
    server.start()
    # NOT_SERVING while the store does not answer or the audit log cannot be written (every call
    # would fail), so clients pass over this replica. Its Watch streams end when the store fails:
    # their clients move them to a replica that reads the store.
    store_health = StoreHealth(
        health_servicer,
        (service_name, ""),
        store_probe(store),  # the change feed's head; a store without one (Vault, AWS): its probe()
        audit_probe=partial(_probe_audit, audit, store),
        on_check=metrics.set_check,
        on_probe=metrics.observe_probe,
        on_store_failing=lambda reason: servicer.watch_hub.interrupt(
            StorageError(f"this replica cannot read its store ({reason}): watch through another replica")
        ),
    )
    servicer.audit_refused = store_health.audit_refused
    metrics.track_anchor_lag(lambda: audit.anchor_lag_seconds)
    metrics.track_audit_disk(audit.free_bytes)
    # Our encrypted store keeps its listing while nothing changes (one read of the change head),
    # so it is asked at every scrape; Vault lists with a request per secret and AWS pages through
    # ListSecrets, so those are listed again only every EXTERNAL_EXPIRY_REFRESH_SECONDS.
    refresh = 0.0 if isinstance(store, ChangeFeed) else EXTERNAL_EXPIRY_REFRESH_SECONDS
    metrics.track_expiries(lambda: store.list(""), refresh_seconds=refresh)
    store_health.start()
    threading.Thread(
        target=servicer.summarise_throttled_until_stopped, name="throttled-summary", daemon=True
    ).start()
    return RunningServer(server, servicer, port, health_servicer, metrics, store_health)


def _bind(server: grpc.Server, listen: str, credentials: grpc.ServerCredentials) -> int:
    """The port `listen` got. gRPC says only "failed to bind" (a RuntimeError) and writes lines of
    its own to stderr; those are held back and, if the bind fails, replaced by our one line (the
    TLS files were checked before, so what is left is the address)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to hold back
        saved = -1
    with _held_output() as held:
        if saved >= 0:
            os.dup2(held.fileno(), 2)
        try:
            port: int = server.add_secure_port(listen, credentials)
        except RuntimeError:
            port = 0
        finally:
            if saved >= 0:
                os.dup2(saved, 2)
                os.close(saved)
        if port:  # bound: whatever was written meanwhile goes out after all
            held.seek(0)
            with contextlib.suppress(OSError):
                os.write(2, held.read())
    if not port:
        raise StorageError(f"cannot listen on {listen} (in use, or not an address of this host)")
    return port


def _held_output() -> IO[bytes]:
    """A file to hold gRPC's lines in: in memory (memfd) on Linux, so `serve` needs no writable
    temporary directory (a container's read-only root file system with no /tmp mounted: a
    temporary file there failed the start, "internal error (FileNotFoundError)"); elsewhere a
    temporary file."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create("secrets-manager-bind", os.MFD_CLOEXEC), "w+b")
    return tempfile.TemporaryFile()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, and return it. Each
    connection takes a descriptor, and so does every file the store and the audit log open: under
    the soft limit most systems start a process with (1024), a client without a certificate holding
    1,000 connections failed every call (the audit log could not open its file) until it let go.
    The hard limit is what the administrator allows (systemd's LimitNOFILE); Go's runtime and
    nginx's worker_rlimit_nofile raise the soft limit so, too. A limit that cannot be raised
    stays as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # macOS refuses more than its kern.maxfilesperproc
        return soft
    return wanted


def _warn_of_pgpassword(rules: Sequence[ScheduledRotation], store_url: str | None, schedule: Path) -> None:
    """A PostgreSQL store's password in PGPASSWORD, beside `postgres_role` entries: libpq sends it to
    the administrator's connection before it reads a passfile, so each of those rotations fails,
    first when it comes due (30 days after the start, say), with one log line. Said at the start."""
    roles = [rule.name for rule in rules if rule.postgres is not None]
    scheme = (store_url or "").split("://", 1)[0].lower()
    if not roles or scheme not in ("postgresql", "postgres") or not os.environ.get("PGPASSWORD"):
        return
    log.warning(
        "PGPASSWORD (the store's database password) is set, and libpq sends it before it reads a "
        "passfile, so the administrator's connection of each postgres_role rotation is sent the "
        "store role's password and refused: unset PGPASSWORD and put both passwords in a passfile "
        "(PGPASSFILE, one line per role)",
        extra={"event": "schedule.pgpassword", "schedule": str(schedule), "secrets": roles},
    )


def run_server(
    config: ServerConfig,
    store: ServedStore,
    audit: AuditLog,
    *,
    ready: Callable[[int, str], None] = lambda port, policy_sha256: None,
    stopped: Callable[[dict[str, object]], None] = lambda summary: None,
    environment: Environment = Environment.DEVELOPMENT,
    config_path: Path | None = None,
    store_url: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (graceful stop, exit 0); SIGHUP reloads the policy and the TLS
    files, each on its own (a rejected one keeps what is in force, the other still reloads).
    `ready` gets the bound port and the SHA-256 of the policy file in force before any call is
    served (the start's audit record names it); `stopped` gets what the graceful stop ended (the
    signal, the requests in flight, how long they took, how many the grace period cut: the stop
    record's `stopped` object) once no request's record is still to come, before the log's last
    flush."""
    # A handler only sets a flag: it runs between two bytecodes of the main thread, which may be
    # inside a write to stderr (a log line from the handler then failed, "reentrant call") or hold
    # a lock the handler would wait for. The main loop below acts on the flags. Set from before
    # the files are first read: a SIGHUP meanwhile reloads them once more when serving starts.
    requested = _Requested()
    signal.signal(signal.SIGHUP, lambda *_: setattr(requested, "reload", True))
    open_files = raise_open_files_limit()
    policy = PolicyHolder(config.policy, environment)
    certificates = ServerCertificates(
        config.tls_cert, config.tls_key, config.tls_client_ca, environment=environment
    )
    reloadable: list[PolicyHolder | ServerCertificates] = [policy, certificates]
    scheduler = None
    if config.rotation_schedule is not None:  # read now: a bad file stops the start, as a bad policy does
        scheduler = RotationScheduler(
            config.rotation_schedule,
            store,
            audit,
            check_seconds=config.rotation_check_seconds,
            environ=os.environ,
            environment=environment,
        )
    # The start's audit record ("serve", ok) is written once the port is bound and before any
    # call is served, so it comes before every request's; unwritten, nothing is served.
    running = build_server(
        config,
        store,
        audit,
        policy,
        scheduler,
        certificates,
        bound=lambda port: ready(port, policy.current.digest),
    )
    running.metrics.track_reloads(
        ["policy", "tls"]
        + (["rotation_schedule"] if scheduler else [])
        + (["config"] if config_path is not None else [])
    )
    # The settings in force, as a reload would read them (paths from the same resolved file), to
    # tell at SIGHUP an edited server.toml, whose settings a reload does not take.
    in_force = _load_quietly(config_path)
    if scheduler is not None:  # before the start line: a scrape after it sees every count at 0
        running.metrics.start_rotation_counts()
    signal.signal(signal.SIGTERM, lambda number, _frame: setattr(requested, "stop", number))
    signal.signal(signal.SIGINT, lambda number, _frame: setattr(requested, "stop", number))
    log.info(
        "serving",
        extra={
            "event": "service.started",
            "listen": config.listen,
            "port": running.port,
            "open_files_limit": open_files,
            **_start_summary(
                config,
                config_path,
                store_url,
                environment,
                policy,
                certificates,
                audit,
                running.servicer.watch_mode,
            ),
            **_limits_summary(running.servicer.limits),
        },
    )
    refusal = getattr(store, "read_only_error", None)
    read_only = refusal() if callable(refusal) else None
    if read_only is not None:
        log.warning(
            "the store is read-only: reads are served and audited, every change is refused, and "
            "the audit log's records wait for a process that can write the store to anchor them",
            extra={"event": "service.store_read_only", "error": str(read_only)},
        )
    if scheduler is not None:

        def after_scheduled(outcome: str) -> None:
            running.metrics.count_rotation(outcome)
            if outcome in ("rotated", "resumed"):
                running.servicer.watch_hub.poke()

        scheduler.start(
            after_scheduled,
            lambda ok: running.metrics.count_reload("rotation_schedule", ok),
            running.metrics.schedule_passed,
        )
        log.info(
            "rotation schedule in force",
            extra={
                "event": "schedule.started",
                "schedule": str(scheduler.path),
                "entries": len(scheduler.rules),
            },
        )
        _warn_of_pgpassword(scheduler.rules, store_url, scheduler.path)
    # The handlers' flags are read every SIGNAL_POLL_SECONDS (a signal also cuts a sleep short
    # only to run its handler; the sleep then goes on).
    while not requested.stop:
        if requested.reload:
            requested.reload = False
            _audit_policy_reload(audit, store, _reload(reloadable, running.metrics), policy.current.digest)
            if config_path is not None and in_force is not None:
                taken = _config_unchanged(config_path, in_force, running.servicer.limits)
                running.metrics.count_reload("config", taken)
        elif certificates.retry_due():  # a renewal that was not valid yet at its SIGHUP
            _reload([certificates], running.metrics)
        time.sleep(SIGNAL_POLL_SECONDS)
    log.info(
        "shutting down",
        extra={
            "event": "service.stopping",
            "signal": signal.Signals(requested.stop).name,
            "grace_seconds": config.shutdown_grace_seconds,
        },
    )
    deadline = time.monotonic() + config.shutdown_grace_seconds
    if scheduler is not None:
        scheduler.request_stop()
    drained = running.stop(config.shutdown_grace_seconds)
    if scheduler is not None:  # a rotation running now gets what is left of the grace period
        scheduler.join(max(0.0, deadline - time.monotonic()))
    # A set or test command still running (the schedule's, or a RotateSecret's) is ended as at a
    # timeout: left running after we exit, it could set an old value after a newer one.
    ended = end_running_commands()
    if ended:
        log.warning(
            "rotation commands still running at the end of the grace period were ended",
            extra={"event": "rotation.commands_ended", "commands": ended},
        )
    summary = drained.as_record(signal.Signals(requested.stop).name, config.shutdown_grace_seconds)
    if scheduler is not None and scheduler.running():
        summary["rotation_unfinished"] = True  # a scheduled rotation outlived the grace period
    # The stop record (after every request's), then the log's last flush, within one bound.
    _flush_at_shutdown(audit, lambda: stopped(summary))
    log.info("stopped", extra={"event": "service.stopped", **summary})
    return 0


def _flush_at_shutdown(audit: AuditLog, record_stop: Callable[[], None] = lambda: None) -> None:
    """Write the stop record (`record_stop`), then fsync the audit log and anchor it in the store,
    waiting at most the log's timeout (and a second) for both: a store that stopped answering
    (the stop record's MAC may need its audit keys read again) would otherwise hold the exit for
    its own answer timeout (10 s on Vault, 30 s on PostgreSQL), past what SIGTERM is documented
    to take. The requests' records are written already; what is left undone then is the stop
    record, or an anchor that lags."""
    errors: list[SecretsManagerError] = []

    def flush() -> None:
        try:
            record_stop()
            audit.flush()
        except SecretsManagerError as exc:
            errors.append(exc)

    flushing = threading.Thread(target=flush, name="audit-flush-at-shutdown", daemon=True)
    flushing.start()
    flushing.join(audit.timeout + 1)
    if flushing.is_alive():
        log.error(
            "audit log could not be flushed at shutdown",
            extra={
                "event": "audit.flush_failed",
                "error": f"the store did not answer within {audit.timeout + 1:g} s; the requests' records "
                "are written, the stop's record may not be, and the store's anchor lags until a writer "
                "of this log moves it",
            },
        )
    elif errors:
        log.error(
            "audit log could not be flushed at shutdown",
            extra={"event": "audit.flush_failed", "error": str(errors[0])},
        )


def _start_summary(
    config: ServerConfig,
    config_path: Path | None,
    store_url: str | None,
    environment: Environment,
    policy: PolicyHolder,
    certificates: ServerCertificates,
    audit: AuditLog,
    watch_mode: str,
) -> dict[str, object]:
    """What the start's log line says of the service: where its settings came from and what is in
    force (never a value, a password, or a credential in a store URL)."""
    kind = None
    if store_url is not None:
        kind = store_url.split("://", 1)[0].lower() if "://" in store_url else "sqlite"
    tls = certificates.current
    return {
        "version": version(),
        "environment": environment.value,
        "config": None if config_path is None else str(config_path),
        "store": display_url(store_url) if store_url is not None else None,
        "store_kind": kind,
        "audit_file": str(audit.path),
        "audit_sync": config.audit_sync,
        **policy.summary(),
        "tls_cert": str(config.tls_cert),
        "tls_not_valid_after": tls.not_valid_after.isoformat(),
        "client_ca": str(config.tls_client_ca),
        "client_ca_not_valid_after": tls.client_ca_not_valid_after.isoformat(),
        "metrics_listen": config.metrics_listen,
        "max_workers": config.max_workers,
        "max_watch_streams": config.watch_stream_limit,
        "watch": watch_mode,
        "rotation_schedule": None if config.rotation_schedule is None else str(config.rotation_schedule),
    }


def _withholding_errors(servicer: SecretsServicer) -> Any:
    """The servicer's RPC methods, each wrapped once (at registration, so nothing is added per call
    beyond a frame): an exception that escapes a handler without a status (a bug, or a response
    that cannot be built, such as text that is not UTF-8) ends the call INTERNAL "internal error",
    its type logged. gRPC itself would send "Exception calling application: <its text>", which
    could hold data. (A server interceptor did this before, at the cost of new handler objects on
    every call.)"""
    wrapped = SimpleNamespace()
    for method in pb.DESCRIPTOR.services_by_name["Secrets"].methods:
        handler = getattr(servicer, method.name)
        if method.server_streaming:
            setattr(wrapped, method.name, _withheld_stream(handler, method.name, servicer.in_flight))
        else:
            setattr(wrapped, method.name, _withheld_unary(handler, method.name, servicer.in_flight))
    return wrapped


def _withheld_unary(
    handler: Callable[[Any, grpc.ServicerContext], Any], method: str, in_flight: InFlight
) -> Callable[..., Any]:
    def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
        with in_flight.held(stream=False):
            try:
                return handler(request, context)
            except Exception as exc:
                _withhold(exc, context, method)

    return unary_call


def _withheld_stream(
    handler: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str, in_flight: InFlight
) -> Callable[..., Iterator[Any]]:
    def stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with in_flight.held(stream=True):
            try:
                yield from handler(request, context)
            except Exception as exc:
                _withhold(exc, context, method)

    return stream_call


def _withhold(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    """Re-raise an abort (its status is set already); end anything else as "internal error"."""
    if context.code() is not None:
        raise exc
    _log_internal_error(method, exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


class _Requested:
    """What signals asked serve's main loop to do."""

    reload = False
    stop = 0  # the number of the signal that asked to stop


def _reload(
    reloadable: list[PolicyHolder | ServerCertificates], metrics: Metrics | None = None
) -> bool | None:
    """After SIGHUP: reload each on its own, counted in `metrics`. A reload rejects bad files
    itself; anything it raises besides is a bug, logged without its message (it could quote a
    file), never fatal: this runs in serve's main loop, and an exception there would end the
    service. Returns whether the policy was taken (None: no policy among them)."""
    policy_taken = None
    for each in reloadable:
        file = "policy" if isinstance(each, PolicyHolder) else "tls"
        try:
            taken = each.reload()
        except Exception as exc:
            taken = False
            log.error(
                "reload failed; what was in force stays",
                extra={"event": "reload.failed", "file": file, "error_type": type(exc).__name__},
            )
        if metrics is not None:
            metrics.count_reload(file, taken)
        if isinstance(each, PolicyHolder):
            policy_taken = taken
    return policy_taken


def _audit_policy_reload(audit: AuditLog, store: ServedStore, taken: bool | None, in_force: str) -> None:
    """The policy decides every request, so its reload at SIGHUP is an administrative change:
    recorded as `policy.reload` (docs/audit.md §2), actor the OS user serve runs as, outcome `ok`,
    or `invalid_input` when the file was refused and the policy in force stays. Before, only the
    service's stderr log said so, which no audit check covers. The reload has happened either way:
    a record that cannot be written is logged, and the service goes on. `in_force` is the SHA-256
    of the policy file in force after it (the new file's, or the old one's that stays)."""
    if taken is None:
        return
    event = AuditEvent(
        "policy.reload",
        local_actor(),
        "grpc",
        outcome="ok" if taken else "invalid_input",
        policy_sha256=in_force,
    )
    try:
        audit.append([event], store)
    except SecretsManagerError as exc:
        log.error(
            "the policy reload's audit record could not be written",
            extra={"event": "audit.write_failed", "operation": "policy.reload", "error": str(exc)},
        )


def _load_quietly(config_path: Path | None) -> ServerConfig | None:
    """The config file as it is now; None if there is none or it cannot be read (no comparison)."""
    if config_path is None:
        return None
    try:
        return load_config(config_path)
    except SecretsManagerError:
        return None


def _config_unchanged(
    config_path: Path, in_force: ServerConfig, limits: IdentityLimits | None = None
) -> bool:
    """At SIGHUP: take server.toml's [limits] into `limits`, and say whether the rest still says
    what is in force. SIGHUP reloads the files it names (the policy, the [tls] files) and the
    limits, not its other settings: an edited path, listen address or
    store was ignored while the reload said "reloaded", so an operator who edited the file (a new
    client_ca path for a CA rotation, say) thought it taken. Now a changed file is logged with the
    settings that changed (never their values), and one that no longer loads with why a restart
    would fail; `secrets_manager_config_last_reload_successful{file="config"}` is then 0."""
    try:
        now = load_config(config_path)
    except SecretsManagerError as exc:
        log.error(
            "the server config no longer loads: serve keeps what is in force, and a restart would "
            "fail to start; fix it",
            extra={"event": "config.invalid", "config": str(config_path), "error": str(exc)},
        )
        return False
    if limits is not None and now.limits != limits.limits:
        limits.configure(now.limits)
        log.info(
            "limits reloaded",
            extra={"event": "limits.reloaded", "config": str(config_path), **_limits_summary(limits)},
        )
    changed = changed_settings(in_force, now)
    if changed:
        log.warning(
            "the server config changed since serve started: SIGHUP reloads the policy, the [tls] "
            "files at the paths in force and [limits], not the config's other settings; restart "
            "serve to apply them",
            extra={"event": "config.restart_required", "config": str(config_path), "changed": changed},
        )
    return not changed


def _limits_summary(limits: IdentityLimits) -> dict[str, object]:
    """The per-identity limits in force, for the start line and the reload's."""
    return {
        "requests_per_second": limits.limits.requests_per_second,
        "request_burst": limits.limits.request_burst,
        "watch_streams_per_identity": limits.watch_streams_per_identity,
        "throttled_summary_seconds": limits.limits.throttled_summary_seconds,
    }


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and a stable `event` (each line of the
    service names its own; one from a lower layer is named after its logger and level, e.g.
    `environment.warning`). Only fields we put in `extra` appear: never a value. `time` is UTC
    (RFC 3339, milliseconds), as the audit log's and every time in the lines are: it was the
    host's local time (`2026-11-30T20:00:00-0500` in a container with TZ=America/New_York)."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if "event" not in doc:  # a line from below the service: named after its logger and level
            doc["event"] = f"{record.name.removeprefix('secrets_manager.')}.{doc['level']}"
        return json.dumps(doc, default=str, sort_keys=True)


def configure_logging(stream: Any) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("secrets_manager")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


__all__ = [
    "JsonLogFormatter",
    "PolicyHolder",
    "RunningServer",
    "SecretsServicer",
    "build_server",
    "configure_logging",
    "run_server",
]
