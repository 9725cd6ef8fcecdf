"""TOTP codes from a stored seed (`otp NAME`, `Credentials.totp`): RFC 6238's own test vectors,
the seeds real services hand out, refusals that never repeat the seed, and the code kept out of
reprs and logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_manager.client import Credentials
from secrets_manager.errors import InvalidInputError
from secrets_manager.otp import NotATotpSeedError, one_time_code
from secrets_manager.values import REDACTED, SecretValue
from service_fixtures import SCRIPT, SEED, client_environ, make_pki, make_store, start_server
from test_cli import Cli, assert_one_line_error
from test_clipboard import clipboard, desktop, display, take_off_now  # noqa: F401  (fixtures)

RFC_SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
# RFC 6238, Appendix B: (time, SHA1, SHA256, SHA512), 8 digits, period 30.
RFC_VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
SETUP_KEY = "JBSWY3DPEHPK3PXP"  # 80 bits: Google Authenticator's classic length


def b32(seed: bytes) -> str:
    return base64.b32encode(seed).decode().rstrip("=")


def rfc4226(seed: bytes, moment: float, digits: int = 6, period: int = 30) -> str:
    """The test's own HOTP (RFC 4226 §5.3) of the time step, to check codes pyotp makes."""
    mac = hmac.new(seed, struct.pack(">Q", int(moment // period)), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    number = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(number % 10**digits).zfill(digits)


@pytest.mark.parametrize(("moment", "sha1", "sha256", "sha512"), RFC_VECTORS)
def test_rfc_6238_test_vectors(moment: int, sha1: str, sha256: str, sha512: str) -> None:
    for algorithm, expected in (("SHA1", sha1), ("SHA256", sha256), ("SHA512", sha512)):
        uri = f"otpauth://totp/RFC:test?secret={b32(RFC_SEEDS[algorithm])}&digits=8&algorithm={algorithm}"
        code = one_time_code(uri.encode(), name="rfc/TOTP", at=moment)
        assert code.reveal() == expected, algorithm


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process in America/New_York's zone, whose clocks go back an hour on 2026-11-01."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_codes_in_the_hour_a_dst_change_repeats_follow_unix_time(new_york: None) -> None:
    """2026-11-01 05:00-07:00 UTC is 01:00-02:00 local twice (EDT, then EST). The counter is
    Unix time / 30 whatever the zone: pyotp's at() before 2.10 went through local time (mktime),
    which in that hour can pick the other 01:xx, an hour off (this passes with the pyotp installed
    here either way; it holds the property for the versions pyproject allows)."""
    assert time.localtime(1793509200).tm_hour == time.localtime(1793512800).tm_hour == 1  # 05:00, 06:00Z
    for moment in range(1793508600, 1793517600, 450):  # 04:50 to 07:20 UTC
        code = one_time_code(f"otpauth://totp/x?secret={SETUP_KEY}".encode(), name="a/TOTP", at=moment)
        assert code.reveal() == rfc4226(base64.b32decode(SETUP_KEY), moment), moment


def test_a_bare_setup_key_as_a_web_page_shows_it() -> None:
    seed = base64.b32decode(SETUP_KEY)
    moment = 1_700_000_000.0
    expected = rfc4226(seed, moment)
    for written in (SETUP_KEY, "jbsw y3dp ehpk 3pxp", f"  {SETUP_KEY}\n"):
        assert one_time_code(written.encode(), name="broker/TOTP", at=moment).reveal() == expected
    uri = f"otpauth://totp/Broker:AB1234?secret={SETUP_KEY}&issuer=Broker"
    assert one_time_code(SecretValue(uri.encode()), name="broker/TOTP", at=moment).reveal() == expected


def test_how_long_a_code_stays_valid() -> None:
    assert one_time_code(SETUP_KEY.encode(), name="n", at=59).valid_for == pytest.approx(1)
    assert one_time_code(SETUP_KEY.encode(), name="n", at=60).valid_for == pytest.approx(30)
    code = one_time_code(f"otpauth://totp/x?secret={SETUP_KEY}&period=60".encode(), name="n", at=61)
    assert (code.period, code.valid_for) == (60, pytest.approx(59))


def test_a_period_over_two_minutes_makes_the_services_code() -> None:
    # pyotp refuses periods over 120 s; the seed was then called "not base32".
    seed = base64.b32decode(SETUP_KEY)
    for period in (300, 3600, 86400):
        uri = f"otpauth://totp/x?secret={SETUP_KEY}&period={period}"
        code = one_time_code(uri.encode(), name="n", at=1_700_000_123)
        assert code.reveal() == rfc4226(seed, 1_700_000_123, period=period)
        assert (code.period, code.valid_for) == (period, pytest.approx(period - 1_700_000_123 % period))


@pytest.mark.parametrize(
    "written",
    [
        f"{SETUP_KEY}====",  # padded, though 16 characters need none
        f"{SETUP_KEY}=",
        f"otpauth://totp/x?secret={SETUP_KEY.lower()}%3D%3D%3D%3D",
        "otpauth://totp/Acme%20Co:a%40b.c?secret=JBSW%20Y3DP%20EHPK%203PXP&issuer=Acme%20Co",
        f"otpauth://totp/Desk%20#2:alice?secret={SETUP_KEY}&issuer=Desk",  # '#' unencoded in the label
        f"otpauth://totp/Desk:alice?secret={SETUP_KEY}#a-fragment",
    ],
)
def test_padding_and_spaces_are_taken_as_authenticator_apps_take_them(written: str) -> None:
    expected = rfc4226(base64.b32decode(SETUP_KEY), 1_700_000_000)
    assert one_time_code(written.encode(), name="n", at=1_700_000_000).reveal() == expected


def test_a_value_of_several_lines_is_read_from_its_one_otpauth_line_or_refused() -> None:
    """A second line was joined to the seed (urlsplit drops newlines, setup keys drop spaces): a
    wrong code, silently, or a refusal of pass's layout, where `pass otp` reads the otpauth line."""
    expected = rfc4226(base64.b32decode(SETUP_KEY), 1_700_000_000)
    uri = f"otpauth://totp/Broker:AB1234?secret={SETUP_KEY}&issuer=Broker"
    for value in (f"hunter2-Pa55word\n{uri}\nlogin: AB1234\n", f"{uri}\nQRST\n", f"\n{SETUP_KEY}\n\n"):
        assert one_time_code(value.encode(), name="n", at=1_700_000_000).reveal() == expected, value
    for value in (f"{SETUP_KEY}\nQRSTUVWX", f"{uri}\n{uri}", "hunter2-Pa55word\nJBSWY3DPEHPK3PXP"):
        with pytest.raises(NotATotpSeedError, match="several lines") as refused:
            one_time_code(value.encode(), name="n", at=1_700_000_000)
        assert "hunter2" not in str(refused.value) and SETUP_KEY not in str(refused.value)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"\xff\xfe\x00", "not text"),
        (b"hunter2-not-base32!", "not base32"),
        (b"JBSWY3DP", "shorter than 80 bits"),
        (b"", "no secret"),
        (f"otpauth://hotp/x?secret={SETUP_KEY}&counter=1".encode(), "HOTP"),
        (b"otpauth://steam/x?secret=JBSWY3DPEHPK3PXP", "not otpauth://totp/"),
        (f"otpauth://totp/x?secret={SETUP_KEY}&algorithm=MD5".encode(), "SHA1, SHA256 or SHA512"),
        (f"otpauth://totp/x?secret={SETUP_KEY}&digits=9".encode(), "6, 7 or 8"),
        (f"otpauth://totp/x?secret={SETUP_KEY}&period=0".encode(), "period"),
        (f"otpauth://totp/x?secret={SETUP_KEY}&period=%C2%B2".encode(), "period"),  # '²': isdigit()
        (f"otpauth://totp/x?secret={SETUP_KEY}&period=%EF%BC%93%EF%BC%90".encode(), "period"),
        ("\uff2aBSWY3DPEHPK3PXP".encode(), "not base32"),  # a full-width J
        (f"otpauth://totp/x?secret={SETUP_KEY}&secret=GEZDGNBVGY3TQOJQ".encode(), "secret twice"),
        (b"otpauth://totp/x?issuer=Broker", "no secret"),
        # urlsplit's own ValueError quoted a bracketed host: part of the value
        (f"otpauth://[hunter2]/x?secret={SETUP_KEY}".encode(), "not a URI"),
        (f"otpauth://[hunter2/x?secret={SETUP_KEY}".encode(), "not a URI"),
    ],
)
def test_what_is_not_a_seed_is_refused_without_repeating_it(value: bytes, why: str) -> None:
    with pytest.raises(NotATotpSeedError) as refused:
        one_time_code(value, name="broker/TOTP")
    message = str(refused.value)
    assert message.startswith("broker/TOTP holds no TOTP seed (") and why in message
    assert isinstance(refused.value, InvalidInputError)
    for secret_part in ("hunter2", SETUP_KEY, "GEZDGNBVGY3TQOJQ"):
        assert secret_part not in message


def test_a_code_is_redacted_unless_revealed() -> None:
    code = one_time_code(SETUP_KEY.encode(), name="n")
    assert code.reveal().isdigit() and len(code.reveal()) == 6
    for shown in (repr(code), str(code), f"{code}", f"{code!r}"):
        assert code.reveal() not in shown.replace(f"{code.valid_for:.1f}", "")
        assert REDACTED in shown
    # As a SecretValue: pickled into a cache, a task queue or another process, it was in clear.
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(code)


def test_credentials_make_the_code_of_a_seed_they_hold() -> None:
    creds = Credentials({"broker/TOTP": SecretValue(SETUP_KEY.encode()), "broker/KEY": SecretValue(b"k")})
    before = rfc4226(base64.b32decode(SETUP_KEY), time.time())
    code = creds.totp("TOTP").reveal()  # the short name, as creds["TOTP"]
    after = rfc4226(base64.b32decode(SETUP_KEY), time.time())
    assert code in (before, after)
    with pytest.raises(NotATotpSeedError):
        creds.totp("broker/KEY")
    with pytest.raises(KeyError):
        creds.totp("broker/MISSING")


# ---- the command ---------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    assert cli("init", "--kdf-profile", "test").code == 0
    uri = f"otpauth://totp/Broker:AB1234?secret={SETUP_KEY}&issuer=Broker"
    assert cli("store", "broker/TOTP", input=uri.encode()).code == 0
    return cli


def codes_since(start: float, seed: bytes = base64.b32decode(SETUP_KEY)) -> set[str]:
    """Every code valid from `start` until now: a command run meanwhile made one of them."""
    return {rfc4226(seed, moment) for moment in range(int(start), int(time.time()) + 1)}


def test_otp_prints_the_current_code_and_audits_the_read(broker: Cli) -> None:
    start = time.time()
    result = broker("otp", "broker/TOTP")
    assert result.code == 0, result.stderr
    assert result.out.strip() in codes_since(start)
    records = [
        json.loads(line) for line in (broker.store.parent / "store.audit.jsonl").read_text().splitlines()
    ]
    otp_records = [record for record in records if record["operation"] == "otp"]
    assert [(record["name"], record["outcome"]) for record in otp_records] == [("broker/TOTP", "ok")]
    assert SETUP_KEY not in json.dumps(otp_records)


def test_otp_json_and_one_field_of_a_json_value(broker: Cli) -> None:
    broker("store", "broker/LOGIN", input=json.dumps({"user": "AB1234", "totp": SETUP_KEY}).encode())
    start = time.time()
    result = broker("otp", "broker/LOGIN#totp", "--json")
    assert result.code == 0, result.stderr
    shown = json.loads(result.out)
    assert shown["name"] == "broker/LOGIN#totp" and shown["code"] in codes_since(start)
    assert 1 <= shown["valid_for"] <= 30


def test_otp_of_a_value_that_is_no_seed_is_exit_2_without_it(broker: Cli) -> None:
    broker("store", "broker/PASSWORD", input=b"hunter2-Pa55word")
    result = broker("otp", "broker/PASSWORD")
    assert_one_line_error(result, 2, "broker/PASSWORD holds no TOTP seed")
    assert "hunter2" not in result.stderr
    assert_one_line_error(broker("otp", "broker/MISSING"), 3)


def test_otp_clip_copies_the_code(desktop: Cli) -> None:  # noqa: F811  (the fixture)
    desktop("store", "broker/TOTP", input=SETUP_KEY.encode())
    start = time.time()
    result = desktop("otp", "broker/TOTP", "--clip")
    assert result.code == 0, result.stderr
    assert result.out.startswith("Copied the code of broker/TOTP to the clipboard")
    assert clipboard(desktop) in codes_since(start)
    assert clipboard(desktop) not in result.out
    take_off_now(desktop)
    assert clipboard(desktop) == ""


def test_otp_through_the_service_needs_read_and_the_service_audits_it(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth", "market-connector"))
    make_store(tmp_path, {**SEED, "auth/TOTP": SETUP_KEY.encode()})
    server = start_server(tmp_path)
    try:
        start = time.time()
        allowed = subprocess.run(
            [str(SCRIPT), "otp", "auth/TOTP"],
            env=client_environ(tmp_path, "auth", [server.address]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        denied = subprocess.run(
            [str(SCRIPT), "otp", "auth/TOTP"],
            env=client_environ(tmp_path, "market-connector", [server.address]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() in codes_since(start)
    assert denied.returncode == 5 and SETUP_KEY not in denied.stderr, denied.stderr
    reads = [(r["name"], r["decision"]) for r in server.audit_records() if r["name"] == "auth/TOTP"]
    assert reads == [("auth/TOTP", "allow"), ("auth/TOTP", "deny")]
