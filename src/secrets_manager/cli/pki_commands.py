"""`secrets-manager pki init|issue`: a CA and certificates for the service's mutual TLS.

These commands write files only: they open no store, ask for no password and write no audit
record. Key files and certificates are written 0600 in a directory created 0700.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from secrets_manager.cli.app import cli
from secrets_manager.cli.output import info_line, timestamp, warning_line
from secrets_manager.environment import current_environment, refuse_open_directory
from secrets_manager.errors import InvalidInputError
from secrets_manager.tls import DEFAULT_TRUST_DOMAIN, WrittenCertificate, init_ca, issue_certificate

_DIRECTORY = click.Path(file_okay=False, path_type=Path)


@cli.group()
def pki() -> None:
    """Create a CA and issue server and client certificates for mutual TLS.

    \b
    secrets-manager pki init --dir certs
    secrets-manager pki issue server --server --dns secrets.internal --dir certs
    secrets-manager pki issue auth --dir certs        # identity spiffe://<trust-domain>/auth
    """


@pki.command("init")
@click.option("--dir", "directory", type=_DIRECTORY, required=True, help="Where ca.pem and ca-key.pem go.")
@click.option(
    "--trust-domain",
    default=DEFAULT_TRUST_DOMAIN,
    show_default=True,
    help="The SPIFFE trust domain of the certificates this CA issues.",
)
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True, help="CA validity.")
@click.option("--force", is_flag=True, help="Replace an existing CA (its certificates stop working).")
def init_command(directory: Path, trust_domain: str, days: int, force: bool) -> None:
    """Create a certificate authority: DIR/ca.pem and DIR/ca-key.pem."""
    _refuse_open_directory(directory)
    written = init_ca(directory, trust_domain=trust_domain, days=days, force=force)
    info_line(f"wrote {written.certificate} and {written.key}: CA for {written.identity}, {_until(written)}")


@pki.command("issue")
@click.argument("name")
@click.option("--dir", "directory", type=_DIRECTORY, required=True, help="The directory holding the CA.")
@click.option("--server", is_flag=True, help="A server certificate (serverAuth) instead of a client one.")
@click.option("--dns", multiple=True, metavar="NAME", help="A DNS name of the server (repeatable).")
@click.option("--ip", "ips", multiple=True, metavar="ADDR", help="An IP address of the server (repeatable).")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True, help="Validity.")
@click.option("--force", is_flag=True, help="Replace NAME's existing certificate and key (renewal).")
def issue_command(
    name: str,
    directory: Path,
    server: bool,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    days: int,
    force: bool,
) -> None:
    """Issue DIR/NAME.pem and DIR/NAME-key.pem, signed by the CA in DIR.

    A client certificate's identity is spiffe://<trust-domain>/NAME (its CN is NAME). A server
    certificate covers the --dns names and --ip addresses, or localhost and 127.0.0.1 if none.
    Prints the serial number and SHA-256 fingerprint: listed under [revoked] in the service's
    policy, they cut the certificate off (renewing with --force does not: the old one still works).
    """
    _refuse_open_directory(directory)
    written = issue_certificate(directory, name, server=server, dns=dns, ips=ips, days=days, force=force)
    kind = "server" if server else "client"
    info_line(
        f"wrote {written.certificate} and {written.key}: {kind} certificate for {written.identity}, "
        f"{_until(written)}"
    )
    # What cuts this certificate off later, should its key leak: [revoked] in the policy.
    info_line(f"serial {written.serial}, SHA-256 fingerprint {written.fingerprint}")
    old = written.replaced
    if old is not None and old.not_after > datetime.now(UTC):
        # The file that named it is gone: this line is where a renewal after a leak finds what to
        # list under [revoked] (renewing does not end the old certificate).
        warning_line(
            f"the certificate replaced (serial {old.serial}, SHA-256 fingerprint {old.fingerprint}) "
            f"stays valid until {timestamp(old.not_after)}: if its key may have leaked, list it "
            "under [revoked] in the service's policy and send serve SIGHUP"
        )


def _refuse_open_directory(directory: Path) -> None:
    """Production refuses a --dir group or others may write: they could replace the CA (and so
    admit any client) or a key, as `recovery init` refuses such an --out-dir."""
    try:
        refuse_open_directory(directory, "--dir", current_environment(), readable=False)
    except OSError as exc:  # a directory on the way this user may not search (EACCES)
        raise InvalidInputError(
            f"cannot use --dir {directory}: {exc.strerror or type(exc).__name__}"
        ) from None


def _until(written: WrittenCertificate) -> str:
    return f"valid until {timestamp(written.not_after)}"


__all__ = ["pki"]
