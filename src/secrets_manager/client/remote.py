"""`RemoteStore`: the `SecretStore` protocol over the gRPC service, with mutual TLS.

The CLI uses it for `--server`, so `store`, `get`, `list`, `history`, `delete`, `rotate` behave
the same locally and remotely; status codes come back as the same exceptions (wire.STATUS_OF_ERROR).
The SDK (client/_replicas.py) also uses its `watch` stream, one RemoteStore per address (its own
failover). `first_serving` chooses among several addresses by their health checks, each started
once the one before has failed or had a short head start (RFC 8305's "happy eyeballs"): the CLI,
the SDK's watch stream and the moves below choose so. Given several `replicas` (the CLI's
`--server A,B`), a read that gets no answer moves to another replica that says SERVING, and so
does a change that found no connection (never sent; one that may have been made never moves),
and `fail_over` moves a store held open for long (`run --restart-on-change`) whose watch stream
broke.
"""

from __future__ import annotations

import builtins
import contextlib
import ipaddress
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secrets_manager.errors import (
    AccessDeniedError,
    ChangeUnrecordedError,
    ConnectionClosedError,
    HandshakeFailedError,
    InvalidInputError,
    NotConnectedError,
    NothingToChangeError,
    OutcomeUnknownError,
    SecretsManagerError,
    StorageError,
    ThrottledError,
    UnsupportedOperationError,
)
from secrets_manager.rotation import MAX_TIMEOUT, Rotated
from secrets_manager.store import CURRENT, PENDING, Secret, SecretMetadata, VersionInfo
from secrets_manager.store.backoff import Backoff
from secrets_manager.store.base import (
    checked_expect_version,
    checked_expiry,
    checked_max_versions,
    checked_metadata,
    checked_metadata_update,
    checked_target,
)
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.tls.files import ClientTlsFiles, read_client_tls
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from secrets_manager.wire import (
    WATCH_HISTORY_KEY,
    WATCH_REVISION_KEY,
    error_for,
    expiry_from_text,
    metadata_from_message,
    secret_from_message,
)

DEFAULT_TIMEOUT_SECONDS = 10.0
FAILOVER_HEALTH_CHECK_SECONDS = 3.0  # per replica, before a read that got no answer is sent there
# How long a replica's health check has to say SERVING before the next address's check starts
# beside it (`first_serving`; RFC 8305's connection attempt delay, 250 ms there too). A healthy
# replica answers within it (a TLS handshake and one RPC take milliseconds here), so the first
# address in the order given is used and the next is not even contacted; a blackholed one (its
# packets dropped: no refusal, no answer) costs this, not its whole health-check timeout.
HEAD_START_SECONDS = 0.25
ENDED_WAIT_SECONDS = 1.0  # a Watch call whose initial metadata named no revision: has it ended?
HEALTH_POLL_SECONDS = 1.0  # a read unanswered this long (several replicas) checks its replica's health
# A call the service throttled (its identity past server.toml's [limits]: nothing was done) is sent
# again after a jittered pause from THROTTLED_FIRST_DELAY doubling to THROTTLED_MAX_DELAY, for at
# most THROTTLED_RETRY_SECONDS; then ThrottledError (the SDK serves from its cache; the CLI exits 1).
THROTTLED_FIRST_DELAY = 0.25
THROTTLED_MAX_DELAY = 2.0
THROTTLED_RETRY_SECONDS = 6.0
PAGE_SIZE = 100  # secrets per BatchGetSecrets / ListSecrets page (AWS ListSecrets' maximum)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Secrets"].full_name
_CHANGE_KIND = {
    pb.ChangeEvent.VERSION_ADDED: ChangeKind.VERSION_ADDED,
    pb.ChangeEvent.METADATA_CHANGED: ChangeKind.METADATA_CHANGED,
    pb.ChangeEvent.SECRET_DESTROYED: ChangeKind.SECRET_DESTROYED,
    pb.ChangeEvent.RESYNC: ChangeKind.RESYNC,
}


@dataclass(frozen=True)
class TlsFiles:
    """The client certificate, its key, and the CA that signed the server's certificate."""

    cert: Path
    key: Path
    ca: Path

    def __post_init__(self) -> None:
        # Paths given as text ("client.pem") failed the first read with "'str' object has no
        # attribute 'open'"; os.fspath refuses what is no path (TypeError naming its type).
        for name in ("cert", "key", "ca"):
            object.__setattr__(self, name, Path(os.fspath(getattr(self, name))))

    def read(self) -> ClientTlsFiles:
        """The files' contents, checked. One that cannot be read (missing, a directory, no
        permission), is not PEM of its kind, a key not of the certificate, or a certificate out of
        its validity dates, is named with the variable that usually sets it: gRPC would report
        each as a failed handshake or a closed socket (and aborts on an empty file)."""
        return read_client_tls(
            (self.cert, "SECRETS_MANAGER_CERT"),
            (self.key, "SECRETS_MANAGER_KEY"),
            (self.ca, "SECRETS_MANAGER_CA"),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """The files read (see `read`) into gRPC credentials."""
        return channel_credentials(self.read())

    def signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        """(st_ino, st_size, st_mtime_ns) of each file (None: cannot be stat'ed): what changes when
        a file is renewed, by a rename (a new inode; a symlink swapped, as in a Kubernetes secret
        volume, too, since stat follows it) or rewritten in place (size, mtime). Three stat calls."""
        found: list[tuple[int, int, int] | None] = []
        for path in (self.cert, self.key, self.ca):
            try:
                info = os.stat(path)
            except OSError:
                found.append(None)
            else:
                found.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(found)


def channel_credentials(files: ClientTlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
    )


# How gRPC begins the details of a call that failed because no connection could be made (the
# address refused it, or the TLS handshake failed): the request was never sent.
_NEVER_CONNECTED = "failed to connect to all addresses"
# ... and of one whose host name could not be resolved (c-ares, the native resolver): never sent.
_UNRESOLVED = ("errors resolving ", "DNS resolution failed")
# The address gRPC puts before its last error ("UNKNOWN: ipv4:127.0.0.1:7443: Failed to connect
# to remote host: Connection refused"): our message names the address once, itself.
_GRPC_ADDRESS = re.compile(
    r"^(?:[A-Z_]+: )?(?:(?:ipv4|ipv6|unix|unix-abstract|vsock|dns):\S*?: )?"
    r"(?:Failed to connect to remote host: )?"
)
_CHANNEL_CLOSED = "Channel closed!"  # the details of a call whose channel was closed under it


_READS = frozenset({"GetSecret", "BatchGetSecrets", "ListSecrets", "DescribeSecret"})  # change nothing


class RemoteStore:
    """A `SecretStore` whose every call is one RPC to a secrets-manager service."""

    def __init__(
        self,
        address: str,
        tls: TlsFiles,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        replicas: Sequence[str] = (),
    ) -> None:
        """`credentials`: the `tls` files already read (several channels from one reading).
        `replicas`: every address of the service, `address` among them, for `fail_over`."""
        self.address = address
        self.replicas = tuple(replicas) or (address,)
        self._tls = tls
        self._options = list(options)
        self._tls_signature = tls.signature()
        self._switch = threading.Lock()  # one renewal or failover at a time
        self._connect(credentials or tls.credentials())
        self._timeout = timeout

    def _connect(self, credentials: grpc.ChannelCredentials) -> None:
        self._credentials = credentials
        self._channel = grpc.secure_channel(self.address, credentials, options=self._options)
        self._stub = pb_grpc.SecretsStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def fail_over(self, timeout: float) -> bool:
        """For a store held open for long (`run --restart-on-change`) with several `replicas`,
        whose connection broke: if the address in use does not say SERVING (gone, hung, or its
        store does not answer), a channel to the next replica that does (in the order given,
        after this one) replaces this one (closed: calls on it end). They are asked as
        `first_serving` asks, this one first: each health check has `timeout`, and the next one
        starts once the one before has failed or had its head start. The replicas share one
        store, so a watch stream resumes on another where it stopped. True if it moved; False
        with one address, or if this one serves (first), or if none does."""
        address = self.address
        if len(self.replicas) < 2:
            return False
        return self._move(timeout, avoid={address}, leaving=address, staying=True)

    def move_on(self, timeout: float) -> bool:
        """As `fail_over`, for a replica that serves but refused a call for want of room (its
        watch-stream limit): to the next replica that says SERVING within `timeout`, whatever
        this one says. True if it moved; False with one address, or if no other serves."""
        if len(self.replicas) < 2:
            return False
        address = self.address
        return self._move(timeout, avoid={address}, leaving=address)

    def _move(self, timeout: float, *, avoid: builtins.set[str], leaving: str, staying: bool = False) -> bool:
        """From `leaving` to the next replica after it, not in `avoid`, that says SERVING within
        `timeout`: a channel to it replaces this one (closed). False if none does. True at once
        if another thread has moved off `leaving` meanwhile (a read in `run` while its follower
        fails over): moving again would leave a replica just found serving.
        The replicas are asked as `first_serving` asks (each given a head start, not its whole
        timeout); `staying`: this one is asked first, and if it serves, it stays (False)."""
        with self._switch:
            if self.address != leaving:
                return True
            # A new connection never uses files replaced on disk since they were read (renewed;
            # the old ones may have expired): taken for good once a replica serves with them.
            renewed = self._renewed_files()
            credentials = self._credentials if renewed is None else renewed[1]
            at = self.replicas.index(self.address) if self.address in self.replicas else -1
            others = [
                address
                for address in (*self.replicas[at + 1 :], *self.replicas[: max(at, 0)])
                if address not in avoid
            ]
            candidates: list[RemoteStore | Callable[[], RemoteStore]] = [self] if staying else []
            candidates += [partial(self._sibling, address, credentials) for address in others]
            chosen = first_serving(candidates, timeout).store
            if chosen is None or chosen is self:
                return False
            if renewed is not None:
                self._tls_signature, self._credentials = renewed
            old, self.address = self._channel, chosen.address
            self._channel, self._stub, self._health = chosen._channel, chosen._stub, chosen._health
            old.close()
            return True

    def _sibling(self, address: str, credentials: grpc.ChannelCredentials) -> RemoteStore:
        """A store for another replica, made as this one was (its channel taken over by `_move`)."""
        return RemoteStore(
            address,
            self._tls,
            timeout=self._timeout,
            options=self._options,
            credentials=credentials,
            replicas=self.replicas,
        )

    def _renewed_files(
        self,
    ) -> tuple[tuple[tuple[int, int, int] | None, ...], grpc.ChannelCredentials] | None:
        """The TLS files' signature and credentials if they changed on disk since they were read
        and are usable; None if not (half-written ones are looked at again next time)."""
        signature = self._tls.signature()
        if signature == self._tls_signature:
            return None
        try:
            return signature, self._tls.credentials()
        except SecretsManagerError:
            return None

    def renew_connection(self) -> bool:
        """For a store held open for long (`run --restart-on-change`), whose connection broke:
        if the TLS files changed on disk since they were read (a renewed client certificate, a
        rotated CA), a new channel with them replaces this one (closed: calls on it end). False
        if they did not change, or are not usable yet (half-written: the old ones stay, and they
        are looked at again next time)."""
        with self._switch:
            renewed = self._renewed_files()
            if renewed is None:
                return False
            old = self._channel
            self._tls_signature = renewed[0]
            self._connect(renewed[1])
            old.close()
            return True

    def _call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """One RPC. With several `replicas`, a read (it changes nothing) that got no answer (the
        service gone, hung past the deadline, or unable to read its store) is sent to the next
        that says SERVING, which serves the rest of the command; so is a change that was surely
        not made (no connection could be made: it was never sent), but never one that may have
        been (made twice, it would be two versions).
        A read whose channel was replaced while it waited (`renew_connection` or `fail_over` in
        another thread: gRPC cancels it, "Channel closed!") is sent again on the new one.
        A call the service throttled (nothing was done, a change included) is sent again with
        backoff, for at most THROTTLED_RETRY_SECONDS; then ThrottledError."""
        worth_another = _no_answer if method in _READS else _never_sent
        tried: set[str] = set()
        replaced = 0
        throttled: Backoff | None = None
        while True:
            channel, address = self._channel, self.address
            try:
                return self._call_here(method, request, timeout=timeout)
            except ThrottledError as exc:
                if throttled is None:
                    throttled = Backoff(
                        first=THROTTLED_FIRST_DELAY,
                        cap=THROTTLED_MAX_DELAY,
                        deadline_seconds=THROTTLED_RETRY_SECONDS,
                        what=address,
                    )
                if not throttled.pause():
                    raise ThrottledError(
                        f"{address} is throttling this client's identity (retried for "
                        f"{THROTTLED_RETRY_SECONDS:g} s): {exc}"
                    ) from None
            except StorageError as exc:
                if method in _READS and self._channel is not channel and replaced < len(self.replicas) + 1:
                    replaced += 1
                    continue
                if len(self.replicas) < 2 or not worth_another(exc):
                    raise
                tried.add(address)
                if not self._move(FAILOVER_HEALTH_CHECK_SECONDS, avoid=tried, leaving=address):
                    raise

    def _call_here(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        try:
            if method in _READS and len(self.replicas) > 1:
                return self._read_while_serving(method, request, timeout or self._timeout)
            return getattr(self._stub, method)(request, timeout=timeout or self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or code.name
            unconnected = self._not_connected(code, details)
            if method not in _READS and _ended_mid_call(code, details, unconnected):
                # Sent, and the connection ended before the answer came: the change may stand.
                raise OutcomeUnknownError(
                    f"the connection to {self.address} ended during {method} ({details}); the change "
                    "may have been made: check (history, describe) before trying again"
                ) from None
            if unconnected is not None:
                raise unconnected from None
            if code is grpc.StatusCode.CANCELLED and details == _CHANNEL_CLOSED:
                # Its channel was closed under it: replaced by a renewal or a move (another thread).
                if method in _READS:
                    raise StorageError(
                        f"the connection to {self.address} was replaced during {method}"
                    ) from None
                raise OutcomeUnknownError(
                    f"the connection to {self.address} was replaced during {method}; the change may "
                    "have been made: check (history, describe) before trying again"
                ) from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:  # gRPC says only "Deadline Exceeded"
                waited = f"{self.address} did not answer {method} within {timeout or self._timeout:g} s"
                if method not in _READS:
                    raise OutcomeUnknownError(
                        f"{waited}; the change may have been made: check (history, describe) before "
                        "trying again"
                    ) from None
                raise StorageError(f"{waited}: is the service up, reachable and not overloaded?") from None
            if code is grpc.StatusCode.UNIMPLEMENTED:  # an older service, without this RPC
                raise UnsupportedOperationError(
                    f"{method} is not supported by the service at {self.address} "
                    "(an older secrets-manager?); upgrade it"
                ) from None
            raise error_for(code, f"{details}", exc.trailing_metadata()) from None

    def _not_connected(self, code: grpc.StatusCode, details: str) -> StorageError | None:
        """The error of a call that failed as one does that found no connection, or whose TLS
        handshake failed (named so, with what to check); None for any other failure."""
        if "hostname verification check failed" in details.lower():  # gRPC's words for it
            host = self.address.rpartition(":")[0].strip("[]")
            option = "--ip" if _is_ip_address(host) else "--dns"
            return HandshakeFailedError(
                f"the server at {self.address} presented a certificate not issued for {host}: "
                "connect with a name or address the certificate holds, or issue the server's "
                f"certificate again with it ('pki issue NAME --server {option} {host}')"
            )
        if code is grpc.StatusCode.UNAVAILABLE and "handshake" in details.lower():
            if "WRONG_VERSION_NUMBER" in details:  # BoringSSL's words for an answer that is not TLS
                return HandshakeFailedError(
                    f"TLS handshake with {self.address} failed: what answers there does not speak TLS "
                    "(a plain-text port, another service?): check the address"
                )
            # BoringSSL's words for a server certificate out of its dates: the generic line below
            # sent the on-call to the CA and the address, where it is a renewal (or a clock) to see to.
            if "certificate has expired" in details:
                return HandshakeFailedError(
                    f"TLS handshake with {self.address} failed: the server's certificate has expired: "
                    "renew it ('pki issue NAME --server --force') and send serve SIGHUP, or check this "
                    "host's clock"
                )
            if "certificate is not yet valid" in details:
                return HandshakeFailedError(
                    f"TLS handshake with {self.address} failed: the server's certificate is not valid "
                    "yet: check this host's clock and the server's"
                )
            return HandshakeFailedError(
                f"TLS handshake with {self.address} failed: check the certificate files (is the "
                f"server's certificate signed by the CA in {self._tls.ca} and issued for this address?)"
            )
        if code is grpc.StatusCode.UNAVAILABLE and "socket closed" in details.lower():
            # How a server that refuses the client certificate in the handshake looks from here;
            # once connected, also how a call looks whose server went away mid-call.
            # gRPC's details name the address it never connected to, but not the one a connection
            # was to ("Stream removed (Socket closed)"): with several replicas, which one was it?
            never = details.startswith(_NEVER_CONNECTED)
            closed = HandshakeFailedError if never else ConnectionClosedError
            return closed(
                f"{'' if never else f'{self.address}: '}{details} (if the service is up, it may have "
                f"refused the client certificate {self._tls.cert}: one from another CA than the server "
                "trusts, or expired?)"
            )
        if code is grpc.StatusCode.UNAVAILABLE and details.startswith(_NEVER_CONNECTED):
            last = details.partition("last error: ")[2] or details
            return NotConnectedError(
                f"{self.address}: failed to connect ({_GRPC_ADDRESS.sub('', last)}): is the service "
                "running there, and is this its address?"
            )
        if code is grpc.StatusCode.UNAVAILABLE and details.startswith(_UNRESOLVED):
            host = self.address.rpartition(":")[0].strip("[]")
            return NotConnectedError(
                f"{self.address}: the host name {host!r} could not be resolved: check the address "
                "(a typing error?) and this host's DNS"
            )
        return None

    def why_not_serving(self, timeout: float) -> StorageError | None:
        """None if Health/Check of the Secrets service says SERVING within `timeout` (or there is
        no health service); else why not, as an error: a failed TLS handshake or a refused
        certificate as a call would report it (HandshakeFailedError), no connection, no answer
        in time, or the status it said (NOT_SERVING)."""
        check = self.start_health_check(timeout)
        check.exception()  # waits until it has ended: answered, failed or past `timeout`
        return self.why_not_from(check, timeout)

    def start_health_check(self, timeout: float) -> grpc.Future:
        """Health/Check of the Secrets service, started (connecting first if needed), not waited
        for: a future ending within `timeout`; `cancel()` gives it up."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return self._health.Check.future(request, timeout=timeout)

    def why_not_from(self, check: grpc.Future, timeout: float) -> StorageError | None:
        """`why_not_serving` of a health check started with `timeout` (`start_health_check`),
        once it has ended."""
        try:
            reply = check.result()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in _ANSWERED:  # answered: no health service, or this certificate refused
                return None
            details = exc.details() or code.name
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return StorageError(f"{self.address} did not answer its health check within {timeout:g} s")
            return self._not_connected(code, details) or StorageError(f"{self.address}: {details}")
        except grpc.FutureCancelledError:
            return StorageError(f"{self.address}: its health check was cancelled")
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return None
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return StorageError(f"{self.address} says {status}")

    def _read_while_serving(self, method: str, request: Any, deadline: float) -> Any:
        """A read that has not been answered within HEALTH_POLL_SECONDS is given up (StorageError,
        so `_call` sends it to another replica) as soon as this replica's health check no longer
        says SERVING within FAILOVER_HEALTH_CHECK_SECONDS: its store stopped answering (it says
        NOT_SERVING once its probe has waited 5 s), or the process hangs. Not before: a slow
        answer from a replica that still serves is waited for, up to `deadline`."""
        call = getattr(self._stub, method).future(request, timeout=deadline)
        health = self._health
        while True:
            try:
                return call.result(timeout=HEALTH_POLL_SECONDS)
            except grpc.FutureTimeoutError:
                pass
            if not _serving(health, FAILOVER_HEALTH_CHECK_SECONDS) and call.cancel():
                raise StorageError(
                    f"{self.address} had not answered {method} and its health check no longer says "
                    "SERVING: is its store answering?"
                )

    def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        request = pb.GetSecretRequest(name=checked_text(name, "secret name"))
        if version is not None and label is not None:  # one oneof: the label set last would win
            raise InvalidInputError("give a version or a label, not both")
        if version is not None:
            if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**64:
                raise InvalidInputError("a version is a whole number, 1 or more")
            request.version = version
        if label is not None:
            request.label = checked_text(label, "label")
        return secret_from_message(self._call("GetSecret", request).secret)

    def get_many(self, names: Iterable[str] = (), *, prefix: str = "") -> list[Secret]:
        """The named secrets, or every secret the caller may read under `prefix`, a page at a time."""
        request = pb.BatchGetSecretsRequest(names=list(names), prefix=prefix, page_size=PAGE_SIZE)
        return [secret_from_message(m) for m in self._pages("BatchGetSecrets", request)]

    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        max_versions: int | None = None,
        expires: datetime | None = None,
    ) -> VersionInfo:
        response = self._put(
            name,
            value,
            expect_version=expect_version,
            description=description,
            tags=tags,
            max_versions=max_versions,
            expires=expires,
        )
        version = int(response.version)
        if response.created:  # what the store returns, without a DescribeSecret (which needs list)
            return VersionInfo(
                version=version,
                created=datetime.fromisoformat(response.created),
                created_by=response.created_by,
                labels=(CURRENT,),
            )
        meta = self.describe(name)  # an older service: its response has the version alone
        for info in meta.versions:
            if info.version == version:
                return info
        return VersionInfo(version=version, created=meta.updated, created_by="")

    def put_version(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        max_versions: int | None = None,
        expires: datetime | None = None,
    ) -> int:
        """PutSecret: the new version number."""
        return int(
            self._put(
                name,
                value,
                expect_version=expect_version,
                description=description,
                tags=tags,
                max_versions=max_versions,
                expires=expires,
            ).version
        )

    def _put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None,
        description: str | None,
        tags: Mapping[str, str] | None,
        max_versions: int | None,
        expires: datetime | None = None,
    ) -> Any:
        checked_max_versions(name, max_versions)  # the service checks too; uint32 holds no -1
        expires = checked_expiry(name, expires)
        checked_metadata(name, description, tags)  # protobuf cannot encode text that is not UTF-8
        request = pb.PutSecretRequest(name=checked_text(name, "secret name"), value=value)
        if expect_version is not None:
            if (
                not isinstance(expect_version, int)
                or isinstance(expect_version, bool)
                or not 0 <= expect_version < 2**64
            ):
                raise InvalidInputError("expect_version is a whole number, 0 or more (0: only a new secret)")
            request.expect_version = expect_version
        if description is not None:
            request.description = description
        if tags is not None:
            request.tags.update(tags)
            request.replace_tags = True
        if max_versions is not None:
            request.max_versions = max_versions
        if expires is not None:
            request.expires = expires.isoformat()
        response = self._call("PutSecret", request)
        if expires is not None and not response.HasField("expires"):
            raise UnsupportedOperationError(
                f"stored {name} version {response.version}, but the service at {self.address} is from "
                "before expiries and kept none: an expiry is not supported by this store (upgrade the "
                "service, then set it with 'metadata NAME --expires TIME')"
            )
        return response

    def list(self, prefix: str = "", *, include_deleted: bool = False) -> list[SecretMetadata]:
        prefix = "" if prefix is None else checked_text(prefix, "name prefix")
        request = pb.ListSecretsRequest(prefix=prefix, include_deleted=include_deleted, page_size=PAGE_SIZE)
        return [metadata_from_message(m) for m in self._pages("ListSecrets", request)]

    def _pages(self, method: str, request: Any) -> builtins.list[Any]:
        """Every page of a paged call (the proto's "Paging"): the request again with each
        next_page_token until there is none. A server from before paging answers in one page."""
        items: builtins.list[Any] = []
        seen: set[str] = set()
        while True:
            response = self._call(method, request)
            items.extend(response.secrets)
            token = str(response.next_page_token)
            if not token:
                return items
            if token in seen:
                raise StorageError(f"the service at {self.address} repeated a page of {method}; try again")
            seen.add(token)
            request.page_token = token

    def describe(self, name: str) -> SecretMetadata:
        return metadata_from_message(
            self._call(
                "DescribeSecret", pb.DescribeSecretRequest(name=checked_text(name, "secret name"))
            ).metadata
        )

    def history(self, name: str) -> builtins.list[VersionInfo]:
        return list(self.describe(name).versions)

    def update_metadata(
        self,
        name: str,
        *,
        description: str | None = None,
        set_tags: Mapping[str, str] | None = None,
        remove_tags: Iterable[str] = (),
        max_versions: int | None = None,
        expires: datetime | None = None,
        clear_expiry: bool = False,
        expect_current: int | None = None,
    ) -> None:
        """UpdateSecretMetadata (needs write); with `expect_current`, UpdateSecretMetadataIfCurrent:
        only if that version is still current, decided in the service's store commit
        (ConflictError, nothing changed, otherwise). A service from before that RPC answers
        UNIMPLEMENTED (UnsupportedOperationError): the change is refused, never made unconditional."""
        # The service checks too; but uint32 holds no -1, and protobuf cannot encode non-UTF-8 text.
        expires = checked_expiry(name, expires)
        if expires is not None and clear_expiry:
            raise InvalidInputError(f"give an expiry for {name!r} or clear it, not both")
        expiry_given = expires is not None or clear_expiry
        checked_metadata_update(
            name, description, set_tags, remove_tags, max_versions, expiry_change=expiry_given
        )
        if expect_current is not None and (
            isinstance(expect_current, bool) or not isinstance(expect_current, int) or expect_current < 1
        ):  # uint64 holds no -1
            raise InvalidInputError("expect_current is the version read as current: 1 or more")
        unsupported = UnsupportedOperationError(
            f"the service at {self.address} is from before expiries and did not change the expiry of "
            f"{name}: an expiry is not supported by this store (upgrade the service)"
        )
        fields: dict[str, Any] = {
            "name": name,
            "description": description,
            "set_tags": set_tags or {},
            "remove_tags": list(remove_tags),
            "max_versions": max_versions,
            "expires": (expires.isoformat() if expires is not None else "") if expiry_given else None,
        }
        try:
            if expect_current is None:
                response = self._call("UpdateSecretMetadata", pb.UpdateSecretMetadataRequest(**fields))
            else:
                request = pb.UpdateSecretMetadataIfCurrentRequest(**fields, expect_current=expect_current)
                try:
                    response = self._call("UpdateSecretMetadataIfCurrent", request)
                except UnsupportedOperationError as exc:
                    raise UnsupportedOperationError(
                        f"the metadata of {name} was not changed: {exc}; it cannot change it on "
                        f"condition that version {expect_current} is still current, and changing it "
                        "without the condition could give a version written meanwhile what was meant "
                        "for that one"
                    ) from None
        except NothingToChangeError:
            # A service from before expiries drops the field and finds nothing else to change: the
            # expiry given is not there, unless it already was (then "nothing to change" is true).
            if expires is None or self._expiry_now(name, expires) == expires:
                raise
            raise unsupported from None
        if expiry_given and not response.HasField("expires"):
            raise unsupported

    def _expiry_now(self, name: str, asked: datetime) -> datetime | None:
        """The expiry DescribeSecret shows (it needs `list`; refused: taken to be `asked`)."""
        try:
            return self.describe(name).expires
        except AccessDeniedError:
            return asked

    def delete(
        self, name: str, *, expect_version: int | None = None, expect_no_pending: bool = False
    ) -> None:
        """DeleteSecret; with `expect_version`, DeleteSecretIfCurrent (ConflictError, nothing
        deleted, if that version is no longer current), and with `expect_no_pending` too,
        DeleteSecretIfUnchanged (also refused while a rotation is in progress; it needs
        `expect_version`). A service from before either RPC answers UNIMPLEMENTED
        (UnsupportedOperationError): the delete is refused, never made with less condition."""
        if expect_version is None and not expect_no_pending:
            self._call("DeleteSecret", pb.DeleteSecretRequest(name=name))
            return
        if expect_version is None:
            raise InvalidInputError(
                "a delete through the service on condition of no pending version needs the version read"
            )
        checked_expect_version(expect_version)  # uint64 holds no -1
        if not expect_no_pending:
            self._call(
                "DeleteSecretIfCurrent",
                pb.DeleteSecretIfCurrentRequest(name=name, expect_version=expect_version),
            )
            return
        self._call(
            "DeleteSecretIfUnchanged",
            pb.DeleteSecretIfUnchangedRequest(name=name, expect_version=expect_version),
        )

    def undelete(self, name: str) -> None:
        self._call("UndeleteSecret", pb.UndeleteSecretRequest(name=name))

    def destroy(self, name: str, versions: Iterable[int]) -> None:
        raise InvalidInputError("destroy is not offered by the service; run it on the server's store")

    def destroy_secret(self, name: str, *, deleted_before: datetime | None = None) -> None:
        raise InvalidInputError("destroy is not offered by the service; run it on the server's store")

    def stage(
        self, name: str, value: bytes, *, expect_current: int | None = None, target: str | None = None
    ) -> VersionInfo:
        """StageSecretVersion (needs the rotate capability): a new version labelled `pending`;
        with `expect_current`, StageSecretVersionIfCurrent: only if that version is still current
        (ConflictError, nothing staged, otherwise). A service from before that RPC answers
        UNIMPLEMENTED (UnsupportedOperationError): the stage is refused, never made unconditional.
        `target` is sent along; a service from before it records none (a resume then warns)."""
        target = checked_target(name, target)
        if expect_current is None:
            request = pb.StageSecretVersionRequest(name=name, value=value, target=target)
            response = self._call("StageSecretVersion", request)
        else:
            if isinstance(expect_current, bool) or not isinstance(expect_current, int) or expect_current < 1:
                raise InvalidInputError("expect_current is the version the value was built from: 1 or more")
            request = pb.StageSecretVersionIfCurrentRequest(
                name=name, value=value, expect_current=expect_current, target=target
            )
            try:
                response = self._call("StageSecretVersionIfCurrent", request)
            except UnsupportedOperationError as exc:
                raise UnsupportedOperationError(
                    f"nothing was staged for {name}: {exc}; it cannot stage on condition that version "
                    f"{expect_current} is still current, and staging without the condition could undo a "
                    "write made meanwhile (rotating a whole value with --stdin needs no condition)"
                ) from None
        return VersionInfo(
            version=int(response.version),
            created=datetime.fromisoformat(response.created),
            created_by=response.created_by,
            labels=(PENDING,),
        )

    def promote(self, name: str, version: int) -> int | None:
        """PromoteSecretVersion: `version`, which must still be pending (ConflictError otherwise),
        becomes current. Returns the version that became previous, from the response (no
        DescribeSecret, which would need the list capability on top of rotate)."""
        response = self._call(
            "PromoteSecretVersion", pb.PromoteSecretVersionRequest(name=name, version=version)
        )
        return int(response.previous) if response.HasField("previous") else None

    def discard_pending(self, name: str) -> int:
        """DiscardPendingVersion: remove the `pending` label (NotFoundError if no version has it).
        Returns the version that carried it (it stays)."""
        return int(self._call("DiscardPendingVersion", pb.DiscardPendingVersionRequest(name=name)).version)

    def rotate_on_service(self, name: str) -> Rotated:
        """RotateSecret (needs the rotate capability): the service runs the rotation its schedule
        configures for `name`, commands included, and audits every step. It lasts as long as the
        commands, so its deadline allows two of the longest command timeout and a minute more."""
        response = self._call("RotateSecret", pb.RotateSecretRequest(name=name), timeout=2 * MAX_TIMEOUT + 60)
        return Rotated(
            name=name,
            version=int(response.version),
            previous=int(response.previous) if response.HasField("previous") else None,
            resumed=response.resumed,
            promoted_elsewhere=response.promoted_elsewhere,
            expires=expiry_from_text(response.expires) if response.HasField("expires") else None,
        )

    def watch(
        self,
        prefix: str = "",
        since_revision: int | None = None,
        since_history: str | None = None,
        *,
        check_health: float | None = None,
    ) -> ChangeStream:
        """Watch: change events (never values) for the secrets under `prefix` the caller may read.

        With `since_revision` (a `ChangeStream.revision` of an earlier stream) the stream resumes:
        the changes after that revision come first, or a RESYNC event if the service's change feed
        no longer goes back that far, or if `since_history` (that stream's `history`) is not the
        store's now (its database failed over or was restored since). The stream has no deadline;
        it ends when the server shuts down or `cancel()` is called.

        `check_health` (seconds; the default with several `replicas`: FAILOVER_HEALTH_CHECK_SECONDS):
        a start that waits (a replica whose store has just gone silent holds it for the store's
        30 s answer timeout) is given up, StorageError, once the replica no longer says SERVING
        within that long, so the caller can watch through another."""
        request = pb.WatchRequest(prefix=prefix)
        if since_revision is not None:
            request.since_revision = since_revision
            if since_history is not None:
                request.since_history = since_history
        if check_health is None and len(self.replicas) > 1:
            check_health = FAILOVER_HEALTH_CHECK_SECONDS
        serving = partial(_serving, self._health, check_health) if check_health is not None else None
        return ChangeStream(
            self._stub.Watch(request),
            self.address,
            since_revision,
            serving=serving,
            unconnected=self._not_connected,
        )

    def is_serving(self, timeout: float) -> bool:
        """Health/Check of the Secrets service (connecting first if needed), within `timeout`.

        A stream opened without such a probe could hang without an error on a peer that accepts
        TCP and never answers; this also skips a server that is shutting down (NOT_SERVING). It is
        an RPC rather than a connectivity subscription: gRPC's subscription thread may raise
        "Channel closed!" when the channel is closed while it polls (grpc/grpc#18995)."""
        return _serving(self._health, timeout)

    def health_status(self, timeout: float) -> tuple[str, str | None]:
        """Health/Check of the Secrets service within `timeout`: its status's name (SERVING,
        NOT_SERVING, ...) and None, or UNREACHABLE and why (`secrets-manager health`)."""
        status, error, _ = health_statuses([self], timeout)[0]
        return status, error

    def close(self) -> None:
        self._channel.close()

    def __repr__(self) -> str:
        return f"RemoteStore({self.address!r})"


class ChangeStream:
    """The change events of one Watch call: iterate in one thread, `cancel()` from any other.

    Iteration ends quietly after `cancel()` or when the server ends the stream; a broken stream
    raises the exception of its status (StorageError for UNAVAILABLE, and for RESOURCE_EXHAUSTED:
    the service's watch-stream limit, ResourceExhaustedError).

    `revision` is where a later stream may resume (`RemoteStore.watch(since_revision=...)`): every
    change up to it has been delivered. It is the revision the server said the stream starts after,
    then each event's; None until the server has said (an older server never does). `history` is
    the line of the store's history it belongs to (None: the server did not say): a RESYNC event
    may move both, back too, when the store's database failed over or was restored."""

    def __init__(
        self,
        call: Any,
        address: str,
        since_revision: int | None = None,
        *,
        serving: Callable[[], bool] | None = None,
        unconnected: Callable[[grpc.StatusCode, str], StorageError | None] | None = None,
    ) -> None:
        """`serving`: the replica's health check, asked while the stream's start waits (`start`).
        `unconnected`: the store's words for a stream that never connected (`_not_connected`)."""
        self._call = call
        self._serving = serving
        self._unconnected = unconnected
        self.address = address
        self.since_revision = since_revision
        self.revision: int | None = None
        self.history: str | None = None
        self._start: int | None = None
        self._started = False
        self._cancelled = False

    def start(self) -> int | None:
        """Wait until the server says the stream is live (its initial metadata): every change after
        the revision returned reaches this stream. None if the server did not say which revision.
        Raises the stream's error if the call ended before it went live."""
        if not self._started:
            self._started = True
            if self._serving is not None:
                self._wait_while_serving(self._serving)
            try:
                metadata = self._call.initial_metadata() or ()
            except grpc.RpcError as exc:
                self._raise(exc)
                return None
            for key, value in metadata:
                if key == WATCH_REVISION_KEY and str(value).isdigit():
                    self._start = int(value)
                    self.revision = max(self.revision or 0, self._start)
                elif key == WATCH_HISTORY_KEY:
                    self.history = str(value)
            if self._start is None and not self._cancelled and self._ended_within(ENDED_WAIT_SECONDS):
                # No revision: a service that does not send one (older), or a call the service
                # ended (Watch refused), whose end can become visible a moment after its empty
                # initial metadata; without this wait, a refusal under load looked like a live
                # stream and surfaced only when it was read.
                code = self._call.code()
                if code is not grpc.StatusCode.OK:
                    raise self._error(code, self._call.details())
        return self._start

    def _ended_within(self, seconds: float) -> bool:
        ended = threading.Event()
        self._call.add_done_callback(lambda call: ended.set())  # at once if it has ended
        return ended.wait(seconds)

    def _wait_while_serving(self, serving: Callable[[], bool]) -> None:
        """Until the stream is live or has ended; StorageError (the stream cancelled) if, after
        HEALTH_POLL_SECONDS without that, the replica's health check no longer says SERVING."""
        live = threading.Event()

        def wait() -> None:
            with contextlib.suppress(grpc.RpcError):
                self._call.initial_metadata()
            live.set()

        threading.Thread(target=wait, name="watch-start", daemon=True).start()
        while not live.wait(HEALTH_POLL_SECONDS):
            if not serving() and not live.is_set():
                self.cancel()
                raise StorageError(
                    f"watch stream from {self.address}: not live yet, and the service no longer says "
                    "SERVING (is its store answering?)"
                )

    @property
    def resumed(self) -> bool:
        """Whether the server took up `since_revision`: nothing after it was missed (after `start()`)."""
        return self.since_revision is not None and self._start == self.since_revision

    def __iter__(self) -> Iterator[SecretChange]:
        try:
            self.start()
            for event in self._call:
                # An unknown kind (a newer server) is treated as "re-read what you cache".
                kind = _CHANGE_KIND.get(event.kind, ChangeKind.RESYNC)
                change = SecretChange(kind, event.name, event.version or None, event.revision)
                if event.history and event.history != self.history:  # a new line of history
                    self.history, self.revision = event.history, change.revision
                else:
                    self.revision = max(self.revision or 0, change.revision)
                yield change
        except grpc.RpcError as exc:
            self._raise(exc)

    def _raise(self, exc: grpc.RpcError) -> None:
        if not self._cancelled:
            raise self._error(exc.code(), exc.details()) from None

    def _error(self, code: grpc.StatusCode, details: str | None) -> Exception:
        if self._unconnected is not None and details and details.startswith((_NEVER_CONNECTED, *_UNRESOLVED)):
            # Never connected (refused, unresolved, a failed handshake): said as a call says it.
            why = self._unconnected(code, details)
            if why is not None:
                return why
        return error_for(code, f"watch stream from {self.address}: {details or code.name}")

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


# How gRPC words a connection that ended under a call (reset, half-written), once connected.
_ENDED_MID_CALL = ("connection reset", "broken pipe")


def _ended_mid_call(code: grpc.StatusCode, details: str, unconnected: StorageError | None) -> bool:
    """Whether a call that failed so was sent on a connection that then ended ("Socket closed"
    once connected, a reset): its request may have been carried out."""
    if isinstance(unconnected, ConnectionClosedError):
        return True
    lowered = details.lower()
    return (
        unconnected is None
        and code is grpc.StatusCode.UNAVAILABLE
        and any(marker in lowered for marker in _ENDED_MID_CALL)
    )


def _no_answer(error: StorageError) -> bool:
    """Whether a read that failed with `error` may get an answer from another replica: not one
    whose certificate files the replicas refuse alike (a failed handshake), nor a change made."""
    if isinstance(error, HandshakeFailedError) and not isinstance(error, ConnectionClosedError):
        return False
    return not isinstance(error, (OutcomeUnknownError, ChangeUnrecordedError))


def _never_sent(error: StorageError) -> bool:
    """Whether a change that failed with `error` was surely not sent: no connection was made."""
    return isinstance(error, NotConnectedError)


def _serving(health: health_pb2_grpc.HealthStub, timeout: float) -> bool:
    """Whether Health/Check of the Secrets service says SERVING (or there is no health service)."""
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    try:
        reply = health.Check(request, timeout=timeout)
    except grpc.RpcError as exc:
        return bool(exc.code() in _ANSWERED)  # no health service, or this certificate refused
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# A health check ending with one of these was answered by a running service: UNIMPLEMENTED, it has
# no health service; UNAUTHENTICATED, it refuses this client certificate (revoked, or its CA
# retired), which it also does to health checks. Choosing replicas, either counts as serving, so
# the call made next is refused with the service's own message (its certificate), not
# "no service is serving", which the SDK would take for an outage and serve its cache through.
_ANSWERED = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED)


@dataclass(frozen=True)
class Chosen:
    """What `first_serving` found: the store that said SERVING first and its place among the
    candidates, or (none did) why each did not, in the candidates' order."""

    store: RemoteStore | None
    index: int | None
    reasons: tuple[StorageError, ...] = ()


def at_address(error: Exception, address: str) -> str:
    """`error`'s message, led by `address` unless it begins by naming it already (as the reasons
    `first_serving` gives are put on one line, by the CLI and the SDK)."""
    said = str(error)
    named = said.startswith((address, f"TLS handshake with {address} ", f"the server at {address} "))
    return said if named else f"{address}: {said}"


def first_serving(
    candidates: Sequence[RemoteStore | Callable[[], RemoteStore]],
    timeout: float,
    *,
    head_start: float | None = None,
) -> Chosen:
    """The first of `candidates` (stores, or functions that make one when its turn comes) whose
    health check says SERVING, in the spirit of RFC 8305 ("happy eyeballs"): the order given is
    the preference, but an address that does not answer no longer costs its whole `timeout`.

    The first candidate's check starts; if it has not said SERVING within `head_start`, the next
    one's starts too while it goes on (and so on down the list; `head_start` default:
    HEAD_START_SECONDS); one that fails at once (refused,
    a failed TLS handshake, NOT_SERVING) lets the next start at once. The first SERVING answer
    wins, so the first candidate does whenever it answers within its head start, and the others
    are then never contacted. Each check has its own `timeout`, so when none serves the reasons
    are those each would give alone (`why_not_serving`), and the wait is at most `timeout` plus
    the head starts. Every check not chosen is cancelled, and the stores made here for them are
    closed (stores given are the caller's: left open)."""
    head_start = HEAD_START_SECONDS if head_start is None else head_start
    ended: queue.SimpleQueue[int] = queue.SimpleQueue()
    started: list[tuple[RemoteStore, grpc.Future | None, bool]] = []  # store, its check, made here
    reasons: dict[int, StorageError] = {}
    chosen: int | None = None
    next_start = time.monotonic()
    try:
        while chosen is None and len(reasons) < len(candidates):
            now = time.monotonic()
            if len(started) < len(candidates) and now >= next_start:
                candidate = candidates[len(started)]
                made = not isinstance(candidate, RemoteStore)
                store = candidate() if not isinstance(candidate, RemoteStore) else candidate
                started.append((store, None, made))  # closed below even if the start fails
                check = store.start_health_check(timeout)
                started[-1] = (store, check, made)
                check.add_done_callback(partial(_put, ended, len(started) - 1))
                next_start = time.monotonic() + head_start  # from its start, however long that took
                continue
            waiting = len(started) < len(candidates)
            try:
                index = ended.get(timeout=max(next_start - now, 0) if waiting else timeout)
            except queue.Empty:
                continue  # the next one's turn (every check ends by its own deadline)
            store, check, _ = started[index]
            assert check is not None
            why = store.why_not_from(check, timeout)
            if why is None:
                chosen = index
            else:
                reasons[index] = why
                next_start = time.monotonic()  # failed: the next need not wait its turn
    finally:
        for index, (store, check, made) in enumerate(started):
            if index == chosen:
                continue
            if check is not None:
                check.cancel()
            if made:
                store.close()
    if chosen is not None:
        return Chosen(started[chosen][0], chosen)
    return Chosen(None, None, tuple(reasons[index] for index in range(len(candidates))))


def _put(ended: queue.SimpleQueue[int], index: int, _check: object) -> None:
    ended.put(index)


def health_statuses(
    stores: Sequence[RemoteStore], timeout: float
) -> list[tuple[str, str | None, str | None]]:
    """`RemoteStore.health_status` of each of `stores`, asked all at once (`secrets-manager health`
    with several addresses takes one `timeout`, not one per address), in their order; third, for
    one UNREACHABLE, why in words that say what to check (as a call's error would)."""
    checks = [(store, store.start_health_check(timeout)) for store in stores]
    statuses: list[tuple[str, str | None, str | None]] = []
    for store, check in checks:
        try:
            reply = check.result()
        except grpc.RpcError as exc:
            code = exc.code()
            why = store.why_not_from(check, timeout)
            said = str(why) if why is not None else None
            statuses.append(("UNREACHABLE", f"{code.name}: {exc.details() or code.name}", said))
        else:
            statuses.append((health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), None, None))
    return statuses


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def checked_text(value: object, what: str) -> str:
    """`value` if it is text: protobuf takes bytes for a string field too (and decodes them), so
    a name given as bytes was sent, and written, before the caller's code failed on it."""
    if not isinstance(value, str):
        raise InvalidInputError(f"the {what} must be text (str), not {type(value).__name__}")
    return value
