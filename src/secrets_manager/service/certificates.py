"""The server's TLS certificate, key and client CA, re-read on SIGHUP without dropping connections.

Certificates are renewed (short-lived ones every few hours or days, `pki issue --force` by a
job), and a CA is rotated by trusting the new one beside the old one for a while. As Vault does on
SIGHUP, the service reads its [tls] files again: connections made from then on get the new
certificate and are checked against the new client CA; connections already open keep theirs,
except that a call with a certificate signed by a CA the reload took out is refused (the servicer
asks `retired`, tls/retired.py: a leaked CA's certificates must not outlive its removal). gRPC
asks for the configuration before each new handshake (`dynamic_ssl_server_credentials`), and gets
a new one only once after a reload.

A reload is checked as the start is (`read_server_tls`): a renewal caught half-written (the new
certificate beside the old key), an expired certificate or a file that does not parse is rejected
with one log line, and the files in force stay in force, as for a policy that does not parse. A
certificate refused only because it is not valid yet is tried again once it is (`retry_due`,
polled by serve's main loop), without another SIGHUP.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from secrets_manager.environment import Environment
from secrets_manager.errors import CertificateNotYetValidError, SecretsManagerError
from secrets_manager.tls import ServerTlsFiles, read_server_tls
from secrets_manager.tls.identity import serial_text
from secrets_manager.tls.retired import RetiredAuthorities

log = logging.getLogger(__name__)

# A certificate that ends sooner than this is logged as a warning at start and at each reload:
# the renewal job may be broken. Alerting should use the expiry metric; this is the fallback.
EXPIRY_WARNING = timedelta(days=7)


class ServerCertificates:
    """The [tls] files in force, and the gRPC server credentials that follow their reloads."""

    def __init__(
        self, cert: Path, key: Path, client_ca: Path, *, environment: Environment = Environment.DEVELOPMENT
    ) -> None:
        self._paths = (cert, key, client_ca)
        self._environment = environment  # production refuses a key others can read, a CA they can write
        self._lock = threading.Lock()
        # a bad file stops the start
        self.current: ServerTlsFiles = read_server_tls(*self._paths, environment=environment)
        self._unsent: ServerTlsFiles | None = None  # reloaded, not yet handed to gRPC
        # A reload refused only because the new certificate is not valid yet (an issuer that does
        # not backdate, this clock behind) is tried again from then on, without another SIGHUP.
        self.retry_at: datetime | None = None
        # Client CAs a reload took out of client_ca: calls on connections made before it, with a
        # certificate one of them signed, are refused (the service asks per call).
        self.retired = RetiredAuthorities()
        _warn_if_ending_soon(self.current, cert, client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Mutual-TLS credentials that take the files of the latest good reload at each handshake."""
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self.current), self._next_configuration, require_client_authentication=True
        )

    def reload(self) -> bool:
        """Read the files again; on any error keep the ones in force and log why."""
        cert, _, client_ca = self._paths
        self.retry_at = None
        try:
            files = read_server_tls(*self._paths, environment=self._environment)
        except CertificateNotYetValidError as exc:
            self.retry_at = exc.not_before
            log.error(
                "TLS reload rejected; the certificate in force stays until the new one is valid",
                extra={
                    "event": "tls.reload_rejected",
                    "error": str(exc),
                    "serial": _serial(self.current),
                    "retry_at": exc.not_before.isoformat(),
                },
            )
            return False
        except SecretsManagerError as exc:
            log.error(
                "TLS reload rejected; the certificate in force stays",
                extra={"event": "tls.reload_rejected", "error": str(exc), "serial": _serial(self.current)},
            )
            return False
        previous = self.retired
        retired = previous.after_reload(self.current.client_ca, files.client_ca)
        with self._lock:
            self.current = self._unsent = files
            self.retired = retired
        log.info(
            "TLS certificate reloaded",
            extra={
                "event": "tls.reloaded",
                "cert": str(cert),
                "serial": _serial(files),
                "not_valid_after": files.not_valid_after.isoformat(),
            },
        )
        if len(retired) > len(previous):
            log.warning(
                "client CA certificates taken out of tls.client_ca are no longer trusted: calls with a "
                "certificate they issued are refused, on connections made before this reload too",
                extra={"event": "tls.client_ca_retired", "client_ca": str(client_ca)},
            )
        _warn_if_ending_soon(files, cert, client_ca)
        return True

    def retry_due(self) -> bool:
        """Whether a reload refused for a certificate not valid yet should be tried again now."""
        return self.retry_at is not None and datetime.now(UTC) >= self.retry_at

    def not_valid_after(self) -> float:
        """The end of the certificate in force, as a Unix time (the expiry metric)."""
        return self.current.not_valid_after.timestamp()

    def client_ca_not_valid_after(self) -> float:
        """The end of the first CA in the client_ca in force to expire, as a Unix time (a metric)."""
        return self.current.client_ca_not_valid_after.timestamp()

    def _next_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration once per reload, else None
        (keep the current one). Never raises: it runs on gRPC's own threads."""
        with self._lock:
            files, self._unsent = self._unsent, None
        return None if files is None else _configuration(files)


def _configuration(files: ServerTlsFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(files.key, files.cert)], root_certificates=files.client_ca
    )


def _serial(files: ServerTlsFiles) -> str:
    # As `pki issue`, `openssl x509 -serial`, the audit log's certificate_serial and the client
    # certificate log lines write it (upper-case hex): a lower-case one was not found by a search
    # for the serial `pki issue` printed when a server key leaked.
    return serial_text(files.serial_number)


def _warn_if_ending_soon(files: ServerTlsFiles, cert: Path, client_ca: Path) -> None:
    now = datetime.now(UTC)
    left = files.not_valid_after - now
    if left < EXPIRY_WARNING:
        log.warning(
            "the server certificate expires soon: renew it and send SIGHUP",
            extra={
                "event": "tls.certificate_expiring",
                "cert": str(cert),
                "not_valid_after": files.not_valid_after.isoformat(),
                "hours_left": round(left.total_seconds() / 3600, 1),
            },
        )
    left = files.client_ca_not_valid_after - now
    if left < EXPIRY_WARNING:
        log.warning(
            "a CA in client_ca has expired or expires soon: client certificates it signed are refused "
            "from then on; add its successor to client_ca (secrets-manager pki init in a new directory, "
            "clients renewed from it), remove the old one once unused, and send SIGHUP",
            extra={
                "event": "tls.client_ca_expiring",
                "client_ca": str(client_ca),
                "not_valid_after": files.client_ca_not_valid_after.isoformat(),
                "hours_left": round(left.total_seconds() / 3600, 1),
            },
        )
