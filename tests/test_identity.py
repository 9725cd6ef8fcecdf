"""Which client certificates name an identity, and which the service must refuse (UNAUTHENTICATED)
however its CA came to sign them: tls/identity.py, and `unpresentable_identity`, the same rule
seen from the policy's side. tests/test_pki.py covers the ordinary cases."""

from __future__ import annotations

import pytest
from cryptography import x509

from secrets_manager.rotation import SCHEDULE_ACTOR
from secrets_manager.tls import (
    IdentityError,
    identity_from_auth_context,
    identity_from_certificate,
    new_ca,
)
from secrets_manager.tls.identity import unpresentable_identity
from test_pki import self_signed

TD = "shrivenquant.local"
OPS = f"spiffe://{TD}/ops"

# A CA whose requesters choose their CN (tls.client_ca may be any CA) can sign each of these.
REFUSED_COMMON_NAMES = {
    "spiffe ID": (OPS, "written like a URI"),
    "spiffe, upper case": (f"SPIFFE://{TD}/ops", "written like a URI"),
    "spiffe without slashes": (f"spiffe:{TD}/ops", "written like a URI"),
    "another URI": ("https://example.com/ops", "written like a URI"),
    "a scheme": ("urn:ops", "written like a URI"),
    "the audit marker": ("<unidentified>", "audit log's marker"),
    "leading space": (" ops", "spaces at an end"),
    "trailing space": ("ops ", "spaces at an end"),
    "zero-width space": ("o\u200bps", "control characters"),
    "right-to-left override": ("\u202eops", "control characters"),
    "line separator": ("ops\u2028x", "control characters"),
    "paragraph separator": ("ops\u2029", "control characters"),
    "DEL": ("ops\x7f", "control characters"),
    "Cyrillic a": ("\u0430uth", "ASCII letters"),
    "glob characters": ("auth/*", "ASCII letters"),
    "an inner space": ("auth service", "ASCII letters"),
    "an e-mail address": ("svc@example.com", "ASCII letters"),
    "starts with a dot": (".ops", "ASCII letters"),
}
ACCEPTED_COMMON_NAMES = ["ops", "market-connector", "svc-auth.prod.example.com", "_build", "A" * 64]


@pytest.mark.parametrize(("cn", "problem"), REFUSED_COMMON_NAMES.values(), ids=REFUSED_COMMON_NAMES)
def test_a_common_name_that_is_not_a_certificate_name_is_no_identity(cn: str, problem: str) -> None:
    for uris in ([], ["https://example.com/x"]):  # an ordinary URI SAN changes nothing
        with pytest.raises(IdentityError, match=problem) as caught:
            identity_from_certificate(self_signed([cn], uris))
        assert "a CN identity is 1 to 64 ASCII letters" in str(caught.value)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("cn", ACCEPTED_COMMON_NAMES)
def test_a_common_name_that_is_a_certificate_name_is_the_identity(cn: str) -> None:
    assert identity_from_certificate(self_signed([cn])) == cn
    assert unpresentable_identity(cn) is None


@pytest.mark.parametrize(("cn", "problem"), REFUSED_COMMON_NAMES.values(), ids=REFUSED_COMMON_NAMES)
def test_a_policy_identity_no_certificate_can_present_is_named_by_the_same_rule(
    cn: str, problem: str
) -> None:
    if cn.lower().startswith("spiffe:"):  # judged as a SPIFFE ID: test_pki, test_policy_cli
        return
    reason = unpresentable_identity(cn)
    assert reason is not None and problem in reason


def test_the_rotation_schedules_own_name_is_no_certificates_identity() -> None:
    """The service's rotation schedule acts as `rotation.SCHEDULE_ACTOR`: its audit records, and
    the versions it stages (which it alone resumes), carry that name. A certificate with it as its
    CN would pass for the schedule, and is refused; tls/identity.py keeps its own copy of the name
    (it may not import rotation), so this also fails if the two drift apart. (Mutant: the
    `name == _SCHEDULE_ACTOR` check removed; every test passed.)"""
    with pytest.raises(IdentityError, match="rotation schedule acts as") as caught:
        identity_from_certificate(self_signed([SCHEDULE_ACTOR]))
    assert "\n" not in str(caught.value)
    reason = unpresentable_identity(SCHEDULE_ACTOR)
    assert reason is not None and "rotation schedule acts as" in reason
    with pytest.raises(IdentityError):
        identity_from_auth_context(
            {"transport_security_type": [b"ssl"], "x509_common_name": [SCHEDULE_ACTOR.encode()]}
        )


def test_a_spiffe_id_in_a_uri_san_is_still_the_identity_whatever_the_cn() -> None:
    assert identity_from_certificate(self_signed(["ops"], [OPS])) == OPS
    assert identity_from_certificate(self_signed([OPS], [OPS])) == OPS


def test_the_auth_context_without_a_pem_applies_the_same_common_name_rule() -> None:
    base = {"transport_security_type": [b"ssl"]}
    assert identity_from_auth_context({**base, "x509_common_name": [b"ops"]}) == "ops"
    for cn in (OPS, "<unidentified>", "ops ", "\u0430uth"):
        with pytest.raises(IdentityError):
            identity_from_auth_context({**base, "x509_common_name": [cn.encode()]})


# ---- a CA is no caller (F6) -----------------------------------------------------------------


def test_a_ca_certificate_is_no_client_whatever_it_names() -> None:
    ca_cert, _key = new_ca(trust_domain=TD)
    with pytest.raises(IdentityError, match="is a CA certificate"):
        identity_from_certificate(ca_cert)
    ca_with_a_path = self_signed(["ops"], [OPS], [x509.BasicConstraints(ca=True, path_length=None)])
    with pytest.raises(IdentityError, match="is a CA certificate"):
        identity_from_certificate(ca_with_a_path)
    not_a_ca = self_signed(["ops"], [OPS], [x509.BasicConstraints(ca=False, path_length=None)])
    assert identity_from_certificate(not_a_ca) == OPS


def test_a_spiffe_id_without_a_path_names_no_workload() -> None:
    with pytest.raises(IdentityError, match="trust domain alone"):
        identity_from_certificate(self_signed(["ops"], [f"spiffe://{TD}"]))
    reason = unpresentable_identity(f"spiffe://{TD}")
    assert reason is not None and "trust domain alone" in reason
    assert unpresentable_identity(OPS) is None
