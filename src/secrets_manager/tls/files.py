"""The PKI directory: `ca.pem`, `ca-key.pem`, and `NAME.pem` + `NAME-key.pem` per certificate.

Invariants: the directory (and any ancestor we create) is made 0700; every file is written 0600,
atomically (a temporary file in the same directory, without a name where Linux's O_TMPFILE allows,
fsync, then link or rename, then fsync of the directory), so a reader sees the old file or the new
one, never half of one, and a process killed mid-write leaves no key behind. Nothing is
overwritten without `force`: replacing a CA invalidates every certificate it issued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secrets_manager.environment import Environment, loose_file_problem, read_in_directory
from secrets_manager.errors import (
    CertificateNotYetValidError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
)
from secrets_manager.tls.identity import fingerprint_text, identity_from_certificate, serial_text
from secrets_manager.tls.pki import (
    CA_DAYS,
    CERTIFICATE_DAYS,
    DEFAULT_CA_NAME,
    DEFAULT_TRUST_DOMAIN,
    check_name,
    issue,
    new_ca,
    spiffe_id,
)

CA_CERT_FILE = "ca.pem"
MAX_TLS_FILE_BYTES = 4 << 20  # a certificate, key or CA bundle larger than this is a wrong file
# A key that does not match its certificate is read again this many times, PAIR_REREAD_SECONDS
# apart (then twice that, …): a renewal (`pki issue --force`, cert-manager) renames the key, then
# the certificate, and a process starting between the two renames reads half of each pair.
PAIR_READ_ATTEMPTS = 4
PAIR_REREAD_SECONDS = 0.05
CA_KEY_FILE = "ca-key.pem"


@dataclass(frozen=True)
class WrittenCertificate:
    """What a `pki` command wrote: the two files, whose identity, valid until when."""

    certificate: Path
    key: Path
    identity: str
    not_after: datetime
    serial: str  # as `openssl x509 -serial` prints it: what [revoked] serials in a policy takes
    fingerprint: str  # SHA-256, as `openssl x509 -fingerprint -sha256` prints it
    # `issue --force`: the certificate the new one replaced, which stays valid until it expires
    # (None when there was none, or what was there is not a certificate).
    replaced: CertificateFacts | None = None


@dataclass(frozen=True)
class CertificateFacts:
    """A certificate's end, serial and fingerprint: for the one `pki issue --force` wrote over,
    what revokes it and until when it works (once the file is replaced, the only place an
    operator still finds it)."""

    not_after: datetime
    serial: str
    fingerprint: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateFacts:
        """Its end, serial and fingerprint, each as `openssl x509` prints it."""
        return cls(
            cert.not_valid_after_utc,
            serial_text(cert.serial_number),
            fingerprint_text(cert.fingerprint(hashes.SHA256())),
        )


def init_ca(
    directory: str | os.PathLike[str],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: int = CA_DAYS,
    common_name: str = DEFAULT_CA_NAME,
    force: bool = False,
) -> WrittenCertificate:
    """Create `ca.pem` and `ca-key.pem` in `directory`; ConflictError if either exists (unless force)."""
    folder = Path(directory)
    cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    if not force:
        _refuse_existing(
            (cert_path, key_path),
            "a CA already exists at {path}; 'pki init' replaces a CA only with --force "
            "(every certificate it issued stops working)",
        )
    cert_pem, key_pem = new_ca(common_name, days, trust_domain)
    # A CA is no caller (identity_from_certificate refuses it): it is shown by its trust domain.
    identity = spiffe_id(trust_domain)
    return _write_pair(folder, cert_path, key_path, cert_pem, key_pem, identity, overwrite=force)


def issue_certificate(
    directory: str | os.PathLike[str],
    name: str,
    *,
    server: bool = False,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = CERTIFICATE_DAYS,
    force: bool = False,
) -> WrittenCertificate:
    """Issue `NAME.pem` + `NAME-key.pem`, signed by the CA in `directory`."""
    check_name(name)
    if name == "ca" or name.endswith("-key"):
        raise InvalidInputError(
            f"the certificate name {name!r} would collide with the CA's or another key's file name"
        )
    folder = Path(directory)
    ca_cert_pem, ca_key_pem = read_ca(folder)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    if not force:
        _refuse_existing((cert_path, key_path), "{path} already exists; add --force to replace it")
    replaced = _certificate_at(cert_path) if force else None
    cert_pem, key_pem = issue(ca_cert_pem, ca_key_pem, name, server=server, dns=dns, ips=ips, days=days)
    identity = identity_from_certificate(cert_pem)
    written = _write_pair(folder, cert_path, key_path, cert_pem, key_pem, identity, overwrite=force)
    return dataclasses.replace(written, replaced=replaced)


def _certificate_at(path: Path) -> CertificateFacts | None:
    """The certificate in the file `--force` is about to replace, or None (no file, not one)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return CertificateFacts.of(cert)


def read_ca(directory: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(ca.pem, ca-key.pem) from `directory`; NotFoundError naming the missing file."""
    folder = Path(directory)
    found = []
    for path in (folder / CA_CERT_FILE, folder / CA_KEY_FILE):
        try:
            found.append(path.read_bytes())
        except FileNotFoundError:
            # Run from another directory than the CA's, `pki init` as said made a second CA,
            # whose certificates no service of the first one trusts: say where it looked, and
            # that a new CA is new.
            where = "" if folder.is_absolute() else f" ({folder.resolve()})"
            raise NotFoundError(
                f"no CA in {folder}{where}: {path.name} is missing; give --dir the directory "
                f"'pki init' made, or run 'secrets-manager pki init --dir {folder}' for a new CA "
                "(which no service trusts yet)"
            ) from None
        except OSError as exc:
            raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    return found[0], found[1]


@dataclass(frozen=True)
class ServerTlsFiles:
    """The contents of the service's [tls] files, checked: gRPC reports a bad one only as "failed
    to bind", with lines of its own on stderr, so each is checked here first."""

    cert: bytes
    key: bytes = field(repr=False)  # the private key's PEM
    client_ca: bytes
    not_valid_after: datetime  # the server certificate's end, for the expiry metric and warnings
    serial_number: int  # names which certificate is in force in logs (never key material)
    # The end of the first CA certificate in client_ca to expire: past it, no certificate it
    # signed is accepted (nor any client certificate, if it is the only one). The expiry metric.
    client_ca_not_valid_after: datetime


def read_server_tls(
    cert: Path, key: Path, client_ca: Path, *, environment: Environment | None = None
) -> ServerTlsFiles:
    """Read and check the server's certificate, its key and the client CA. NotFoundError for a
    missing file; InvalidInputError for one that cannot be read, is not PEM of its kind, a key
    that does not belong to the certificate, a certificate out of its validity dates or one not
    for servers (every client would refuse it in the handshake, which they can only report as a
    failed connection). Messages name the file and the [tls] setting.

    With `environment` (the service's): a key that group or others can read, or a client CA
    whose writer could let in any certificate it likes (another user's file, writable by group
    or others, in a directory they may write), is refused in production, a warning elsewhere."""
    (cert_pem, key_pem, ca_pem), leaf = _read_pair(
        lambda: (
            read_tls_file(cert, "tls.cert"),
            read_tls_file(key, "tls.key", environment=environment, private=True),
            read_tls_file(client_ca, "tls.client_ca", environment=environment),
        ),
        (cert, "tls.cert"),
        (key, "tls.key"),
    )
    authorities = _certificates(ca_pem, client_ca, "tls.client_ca")
    if not any(_may_sign(authority) for authority in authorities):
        # gRPC serves with it, and then refuses every client certificate in the handshake.
        raise InvalidInputError(
            f"the TLS file {client_ca} (tls.client_ca) holds no CA certificate (a server's or "
            "client's, CA:FALSE), so every client certificate would be refused: give the CA that "
            "issues them (the ca.pem of 'secrets-manager pki init')"
        )
    _check_server_purpose(leaf, cert)
    _check_dates(
        leaf,
        (cert, "tls.cert"),
        "server",
        "secrets-manager pki issue {} --server --force --dir CA-DIR, with its --dns/--ip options",
    )
    return ServerTlsFiles(
        cert_pem,
        key_pem,
        ca_pem,
        leaf.not_valid_after_utc,
        leaf.serial_number,
        min(ca.not_valid_after_utc for ca in authorities),
    )


@dataclass(frozen=True)
class ClientTlsFiles:
    """The contents of a client's [TLS] files, checked, and the certificate's validity dates (the
    SDK warns before they end; the client layer does not parse certificates itself)."""

    cert: bytes
    key: bytes = field(repr=False)  # the private key's PEM
    ca: bytes
    not_before: datetime
    not_after: datetime


def read_client_tls(cert: tuple[Path, str], key: tuple[Path, str], ca: tuple[Path, str]) -> ClientTlsFiles:
    """The contents of a client's certificate, key and CA, each given with the variable that set
    it, checked as `read_server_tls` checks the server's. Also the certificate's validity dates:
    a server refuses an expired one by closing the connection, which the client can only report
    as "Socket closed", like an outage. Once per load of the files, never per call."""
    hint = "; point {} at a readable PEM file"
    (cert_pem, key_pem, ca_pem), leaf = _read_pair(
        lambda: tuple(read_tls_file(path, name, hint.format(name)) for path, name in (cert, key, ca)),
        cert,
        key,
    )
    _certificates(ca_pem, *ca)
    _check_client_purpose(leaf, cert)
    _check_dates(leaf, cert, "client", "secrets-manager pki issue {} --force --dir CA-DIR")
    return ClientTlsFiles(cert_pem, key_pem, ca_pem, leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def _check_dates(leaf: x509.Certificate, cert: tuple[Path, str], role: str, renewal: str) -> None:
    """InvalidInputError unless `leaf` is within its validity dates now: an expired one names its
    date and `renewal` (the command that renews it, {} its CN); one not valid yet points at the
    clock (CertificateNotYetValidError, with the date it becomes valid)."""
    now = datetime.now(UTC)
    renew = renewal.format(_common_name(leaf))
    if leaf.not_valid_after_utc <= now:
        raise InvalidInputError(
            f"the {role} certificate {cert[0]} ({cert[1]}) expired on "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue a new one ({renew})"
        )
    if leaf.not_valid_before_utc > now:  # to the second: it is often seconds away
        raise CertificateNotYetValidError(
            f"the {role} certificate {cert[0]} ({cert[1]}) is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC: check this machine's clock",
            leaf.not_valid_before_utc,
        )


def _check_server_purpose(leaf: x509.Certificate, cert: Path) -> None:
    """InvalidInputError if the certificate's extended key usage leaves out serverAuth (a client
    certificate, `pki issue NAME` without --server): every client would refuse it in the
    handshake ("unsupported certificate purpose")."""
    if not _lacks_purpose(leaf, ExtendedKeyUsageOID.SERVER_AUTH):
        return
    raise InvalidInputError(
        f"the server certificate {cert} (tls.cert) is not for servers (its extended key usage has no "
        "serverAuth), so every client would refuse it ('unsupported certificate purpose'): issue it "
        f"with 'secrets-manager pki issue {_common_name(leaf)} --server --dir CA-DIR', "
        "with its --dns/--ip options"
    )


def _check_client_purpose(leaf: x509.Certificate, cert: tuple[Path, str]) -> None:
    """InvalidInputError if the certificate's extended key usage leaves out clientAuth (a server
    certificate, `pki issue NAME --server`): the service refuses it in the handshake, which the
    client sees only as a closed connection."""
    if not _lacks_purpose(leaf, ExtendedKeyUsageOID.CLIENT_AUTH):
        return
    raise InvalidInputError(
        f"the client certificate {cert[0]} ({cert[1]}) is not for clients (its extended key usage has "
        "no clientAuth), so the service would refuse it: issue a client certificate with "
        f"'secrets-manager pki issue {_common_name(leaf)} --dir CA-DIR' (without --server)"
    )


def _may_sign(certificate: x509.Certificate) -> bool:
    """Whether `certificate` may be a CA: basic constraints CA:TRUE, or none at all (as a v1
    certificate, which TLS libraries may take as a trust anchor)."""
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return True


def _lacks_purpose(leaf: x509.Certificate, purpose: x509.ObjectIdentifier) -> bool:
    """Whether the certificate's extended key usage leaves out `purpose` (no such extension:
    any purpose, as TLS reads it)."""
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return purpose not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages


def _common_name(leaf: x509.Certificate) -> str:
    names = [
        a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)
    ]
    return names[0] if names else "NAME"


class _MismatchedPair(InvalidInputError):
    """The key read does not belong to the certificate read (perhaps half of a renewal)."""


def _read_pair(
    read_files: Callable[[], tuple[bytes, ...]], cert: tuple[Path, str], key: tuple[Path, str]
) -> tuple[tuple[bytes, ...], x509.Certificate]:
    """The files `read_files` reads (the certificate's and the key's bytes first) and the leaf
    certificate, once the two belong together. A renewal replaces them one after the other
    (`pki issue --force` renames the key, then the certificate), so a process starting between
    the two reads the old certificate beside the new key: they are read again,
    PAIR_READ_ATTEMPTS times in all (about 0.3 s), before a mismatch is reported as the wrong key."""
    for attempt in range(1, PAIR_READ_ATTEMPTS + 1):
        files = read_files()
        try:
            return files, _checked_pair(files[0], files[1], cert, key)
        except _MismatchedPair:
            if attempt == PAIR_READ_ATTEMPTS:
                raise
            time.sleep(PAIR_REREAD_SECONDS * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _checked_pair(
    cert_pem: bytes, key_pem: bytes, cert: tuple[Path, str], key: tuple[Path, str]
) -> x509.Certificate:
    """The leaf certificate, once it and the key parse and belong together (_MismatchedPair if
    they parse but do not)."""
    leaf = _certificates(cert_pem, *cert)[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: the key is encrypted
        raise InvalidInputError(
            f"the TLS key {key[0]} ({key[1]}) is not an unencrypted PEM private key"
        ) from None
    if _public_der(private_key.public_key()) != _public_der(leaf.public_key()):
        raise _MismatchedPair(
            f"the TLS key {key[0]} ({key[1]}) does not match the certificate {cert[0]} ({cert[1]}); "
            "give the key issued with that certificate"
        )
    return leaf


def read_tls_file(
    path: Path, setting: str, hint: str = "", *, environment: Environment | None = None, private: bool = False
) -> bytes:
    """A TLS file's bytes; one line naming it and the `setting` or variable that gave it if it
    cannot be read (missing: NotFoundError; a directory, no permission: InvalidInputError) or is
    empty (InvalidInputError: gRPC's C core aborts the whole process on an empty certificate or key
    rather than raising, "Check failed: cert_chain != nullptr").

    With `environment`, the file as opened is checked (`loose_file_problem`; `private`: group
    and others may not read it either) and refused in production, a warning elsewhere."""
    try:
        if environment is None:  # a client's files: a pipe (`<(…)`) is fine
            with path.open("rb") as handle:
                data = handle.read(MAX_TLS_FILE_BYTES + 1)
        else:
            data, found, folder = read_in_directory(path, MAX_TLS_FILE_BYTES)
            what = f"the {setting} file"
            environment.guard(loose_file_problem(path, found, what, private=private, folder=folder))
        if len(data) > MAX_TLS_FILE_BYTES:  # a wrong file, or one like /dev/zero that never ends
            raise InvalidInputError(f"TLS file {path} ({setting}) is larger than {MAX_TLS_FILE_BYTES} bytes")
    except FileNotFoundError:
        raise NotFoundError(f"TLS file {path} ({setting}) does not exist") from None
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read TLS file {path} ({setting}): {exc.strerror or type(exc).__name__}{hint}"
        ) from None
    if not data.strip():
        raise InvalidInputError(
            f"TLS file {path} ({setting}) is empty{hint or f'; point {setting} at a PEM file'}"
        )
    return data


def _certificates(pem: bytes, path: Path, setting: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise InvalidInputError(f"the TLS file {path} ({setting}) is not a PEM certificate") from None


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_private_directory(directory: Path) -> None:
    """Create `directory` and any missing ancestors 0700 (mkdir(parents=True) would use the umask)."""
    try:
        missing = [p for p in (directory, *directory.parents) if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create directory {directory}: {exc.strerror}") from None
    if not directory.is_dir():
        raise InvalidInputError(f"{directory} is not a directory")


def write_private_file(
    path: Path, data: bytes, *, overwrite: bool, mode: int = 0o600, group: int | None = None
) -> None:
    """Write `data` to `path` atomically, `mode` (0600 unless a caller lets FILE's group read it),
    owned by `group` if given; ConflictError if it exists and not `overwrite`.

    Where the file system can (Linux's O_TMPFILE), the data goes to a file without a name, named
    only once it is complete and on disk: a process killed mid-write (SIGKILL, the OOM killer,
    which no handler sees) leaves no file behind holding a private key or the secrets a template
    was filled with. Elsewhere a hidden temporary file beside `path` holds it meanwhile."""
    fd = _unnamed_file(path.parent)
    temporary: Path | None = None
    if fd is None:
        fd, temporary = _named_temporary(path)
    try:
        try:
            _write_all(fd, data, mode, group)
            if temporary is None:  # complete: named now (`path` itself, or a name to rename)
                try:
                    temporary = _name_unnamed(fd, path, overwrite=overwrite)
                except FileExistsError:
                    raise
                except OSError:  # /proc hidden, or linkat refused: the data again, as elsewhere
                    named, temporary = _named_temporary(path)
                    try:
                        _write_all(named, data, mode, group)
                    finally:
                        os.close(named)
        finally:
            os.close(fd)
        if temporary is not None:
            if overwrite:
                os.replace(temporary, path)
            else:
                os.link(temporary, path)  # fails if `path` exists, where a rename would clobber it
    except FileExistsError:
        raise ConflictError(f"{path} already exists; add --force to replace it") from None
    except _GroupRefused as refused:
        raise InvalidInputError(
            f"cannot give {path} to group {_group_name(group)}: {refused.strerror} "
            "(belong to that group, or run as root)"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    _fsync_directory(path.parent)


def _named_temporary(path: Path) -> tuple[int, Path]:
    """A hidden temporary file beside `path`, open for writing."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InvalidInputError(f"cannot write in {path.parent}: {exc.strerror}") from None
    return fd, Path(name)


def _group_name(gid: int | None) -> str:
    try:
        return grp.getgrgid(gid).gr_name if gid is not None else "?"
    except KeyError:
        return str(gid)


class _GroupRefused(OSError):
    """fchown to the group asked for was refused (not a member of it, not root)."""


def _write_all(fd: int, data: bytes, mode: int = 0o600, group: int | None = None) -> None:
    if group is not None:
        try:
            os.fchown(fd, -1, group)
        except OSError as exc:
            raise _GroupRefused(exc.errno, exc.strerror) from None
    os.fchmod(fd, mode)  # after fchown, which may clear bits; mkstemp's 0600 said, not relied on
    view = memoryview(data)
    while view:  # one write for a PEM file; a rendered template may need more
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _unnamed_file(directory: Path) -> int | None:
    """A file without a name in `directory`, open for writing (O_TMPFILE), or None where the
    platform or the file system has none (or `directory` cannot be written: mkstemp says why)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):  # naming it needs /proc (linkat)
        return None
    try:
        return os.open(directory, flag | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def _name_unnamed(fd: int, path: Path, *, overwrite: bool) -> Path | None:
    """Give the unnamed file `fd` the name `path` (FileExistsError if it exists), or with
    `overwrite` a hidden name beside it to rename over it, which is returned."""
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as open(2) shows; os.link takes linkat (not
    # link(2), which would link the /proc entry itself) only given a directory descriptor.
    descriptors = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not overwrite:
            os.link(str(fd), path, src_dir_fd=descriptors, follow_symlinks=True)
            return None
        while True:
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                os.link(str(fd), temporary, src_dir_fd=descriptors, follow_symlinks=True)
            except FileExistsError:
                continue
            return temporary
    finally:
        os.close(descriptors)


def move_private_file(source: Path, target: Path) -> None:
    """Give the file `source` the name `target` in the same directory, durably (the directory is
    fsynced); ConflictError if `target` exists, which is never replaced."""
    try:
        os.link(source, target)
        os.unlink(source)
    except FileExistsError:
        raise ConflictError(f"{target} already exists") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot rename {source} to {target.name}: {exc.strerror}") from None
    _fsync_directory(target.parent)


def _write_pair(
    folder: Path,
    cert_path: Path,
    key_path: Path,
    cert_pem: bytes,
    key_pem: bytes,
    identity: str,
    *,
    overwrite: bool,
) -> WrittenCertificate:
    make_private_directory(folder)
    write_private_file(key_path, key_pem, overwrite=overwrite)
    try:
        write_private_file(cert_path, cert_pem, overwrite=overwrite)
    except BaseException:
        if not overwrite:  # the key is ours alone: do not leave half a pair behind
            with contextlib.suppress(OSError):
                key_path.unlink()
        raise
    facts = CertificateFacts.of(x509.load_pem_x509_certificate(cert_pem))
    return WrittenCertificate(cert_path, key_path, identity, facts.not_after, facts.serial, facts.fingerprint)


def _refuse_existing(paths: Iterable[Path], message: str) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise ConflictError(message.format(path=path))


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
