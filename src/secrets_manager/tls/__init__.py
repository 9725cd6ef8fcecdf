"""Certificates for the service's mutual TLS, and the caller identity they carry (DESIGN.md §6).

`pki` makes a CA and issues client/server certificates (EC P-256, SPIFFE ID URI SANs); `files`
keeps them in a private directory; `identity` reads the caller's identity back from a certificate
or from grpc's auth context.
"""

from secrets_manager.tls.files import (
    ServerTlsFiles,
    WrittenCertificate,
    init_ca,
    issue_certificate,
    read_ca,
    read_server_tls,
)
from secrets_manager.tls.identity import (
    Caller,
    IdentityError,
    caller_from_auth_context,
    caller_from_certificate,
    identity_from_auth_context,
    identity_from_certificate,
    unpresentable_identity,
)
from secrets_manager.tls.pki import DEFAULT_TRUST_DOMAIN, issue, new_ca, spiffe_id

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "Caller",
    "IdentityError",
    "ServerTlsFiles",
    "WrittenCertificate",
    "caller_from_auth_context",
    "caller_from_certificate",
    "identity_from_auth_context",
    "identity_from_certificate",
    "init_ca",
    "issue",
    "issue_certificate",
    "new_ca",
    "read_ca",
    "read_server_tls",
    "spiffe_id",
    "unpresentable_identity",
]
