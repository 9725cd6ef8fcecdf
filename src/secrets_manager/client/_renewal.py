"""Noticing that the client certificate files were renewed on disk (cert-manager, a SPIFFE helper,
a cron job running `pki issue NAME --force`), and that the one in use is about to expire.

A check is three stat() calls; only when the files' (st_ino, st_size, st_mtime_ns) changed are they
read and checked (`read_client_tls`). A renewal caught half-written (a new certificate beside the
old key, an empty file) is not used: one warning names what is wrong (never key material), and the
files are read again once they change again. A renewal that is only not valid yet (an issuer that
does not backdate, this clock a little behind) is read again once it is valid, changed or not.
`client._client` decides when to check, and `client._replicas` swaps the channels.
"""

from __future__ import annotations

import logging
import math
import threading
from datetime import UTC, datetime, timedelta

from secrets_manager.client.remote import TlsFiles
from secrets_manager.errors import CertificateNotYetValidError, SecretsManagerError
from secrets_manager.tls.files import ClientTlsFiles

log = logging.getLogger("secrets_manager.client")

# Warn once when the certificate in use has this share of its lifetime left (capped below) and no
# renewal has appeared: SPIFFE helpers renew at half the lifetime, cert-manager with a third left,
# so a sixth left (10 minutes of an hour's SVID) means the renewal is late, with time to act.
EXPIRY_WARNING_SHARE = 1 / 6
EXPIRY_WARNING_MAX = timedelta(days=7)  # a year's certificate: a week's notice, not two months'

Signature = tuple[tuple[int, int, int] | None, ...]


class CertificateFiles:
    """The client's TLS files as last loaded, and whether they have changed since."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._lock = threading.Lock()  # one check at a time (the refresher, a failed call)
        signature = tls.signature()
        self.loaded = tls.read()  # raises: the first load reports a bad file to the caller
        self._signature = signature  # of the files as loaded, or as last found unusable
        self._valid_from: datetime | None = None  # found unusable only until then: read again
        self._warn_at = _warning_time(self.loaded)
        self._warned_expiry = False
        self._warn_if_expiring()

    def renewed(self) -> ClientTlsFiles | None:
        """The files' new contents if they changed since the last look (or were last found not
        valid yet and now are) and are usable; else None (unchanged, or not usable yet: warned once
        per state of the files)."""
        with self._lock:
            signature = self.tls.signature()
            now = datetime.now(UTC)
            due = self._valid_from is not None and now >= self._valid_from
            if signature == self._signature and not due:
                self._warn_if_expiring()
                return None
            self._signature = signature  # taken before reading: a later change is seen next time
            self._valid_from = None
            try:
                files = self.tls.read()
            except CertificateNotYetValidError as exc:
                self._valid_from = exc.not_before
                self._not_usable_yet(
                    exc, f"once the new certificate is valid{_in_seconds(exc.not_before - now)}"
                )
                return None
            except SecretsManagerError as exc:
                self._not_usable_yet(exc, "when they change")
                return None
            self.loaded, self._warn_at, self._warned_expiry = files, _warning_time(files), False
            log.info(
                "client certificate %s renewed (valid until %s UTC): new connections use it",
                self.tls.cert,
                f"{files.not_after:%Y-%m-%d %H:%M}",
            )
            self._warn_if_expiring()
            return files

    def _not_usable_yet(self, error: SecretsManagerError, again: str) -> None:
        log.warning(
            "the client certificate files changed but cannot be used yet, so the certificate "
            "loaded before stays in use; they are read again %s (%s)",
            again,
            error,
        )
        self._warn_if_expiring()

    def _warn_if_expiring(self) -> None:
        if self._warned_expiry or datetime.now(UTC) < self._warn_at:
            return
        self._warned_expiry = True
        log.warning(
            "the client certificate %s (SECRETS_MANAGER_CERT) expires on %s UTC and no renewal has "
            "appeared; the service refuses it from then on: check the job that renews it",
            self.tls.cert,
            f"{self.loaded.not_after:%Y-%m-%d %H:%M:%S}",
        )


def _warning_time(files: ClientTlsFiles) -> datetime:
    lifetime = files.not_after - files.not_before
    return files.not_after - min(lifetime * EXPIRY_WARNING_SHARE, EXPIRY_WARNING_MAX)


def _in_seconds(gap: timedelta) -> str:
    """', in 3 s' when the wait is short enough to count in seconds; the message has the date."""
    return f", in {math.ceil(gap.total_seconds())} s" if gap < timedelta(minutes=2) else ""
