"""Time-based one-time passwords (TOTP, RFC 6238) from a stored seed, as `pass otp` gives them.

Brokers' and exchanges' logins often want a TOTP code beside the password, and a trading service
that logs in by itself needs to make that code. The seed is stored as any secret: an
`otpauth://totp/…` URI (what an authenticator app's QR code holds) or the bare base32 "setup key"
a web page shows. The code is computed by pyotp; what is ours is reading the seed, refusing what
is not one without ever repeating it, and keeping the code out of logs (`OneTimeCode`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

import pyotp

from secrets_manager.errors import InvalidInputError
from secrets_manager.values import REDACTED, SecretValue

# Google Authenticator's classic 16-character keys are 80 bits and services still issue them;
# pyotp asks 112 by default (NIST SP 800-63B), which would refuse accounts people have.
MIN_SEED_BITS = 80
DIGESTS: dict[str, Callable[..., Any]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}
MAX_PERIOD = 24 * 3600


class NotATotpSeedError(InvalidInputError):
    """A stored value that is not a TOTP seed; the message never repeats the value."""


class _Totp(pyotp.TOTP):
    min_secret_length_bits = MIN_SEED_BITS


class OneTimeCode:
    """A TOTP code and how many seconds it stays valid; redacted like a `SecretValue`: a code is
    a credential for its period, so it is shown only through `reveal()`."""

    __slots__ = ("_code", "period", "valid_for")

    def __init__(self, code: str, *, valid_for: float, period: int) -> None:
        self._code = code
        self.valid_for = valid_for
        self.period = period

    def reveal(self) -> str:
        return self._code

    def __repr__(self) -> str:
        return f"OneTimeCode('{REDACTED}', valid_for={self.valid_for:.1f})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, format_spec: str) -> str:
        return REDACTED

    def __reduce__(self) -> NoReturn:
        raise TypeError("OneTimeCode cannot be pickled")


def one_time_code(value: SecretValue | bytes, *, name: str, at: float | None = None) -> OneTimeCode:
    """The TOTP code of the seed `value` (the secret `name`) at `at` (now by default)."""
    totp = _totp(value.reveal() if isinstance(value, SecretValue) else value, name)
    moment = time.time() if at is None else at
    period = int(totp.interval)
    # RFC 6238's counter from the Unix time itself: pyotp's at() before 2.10 made a local naive
    # datetime of it and back (mktime), which in the hour a DST change repeats can be an hour off.
    counter = int(moment) // period
    return OneTimeCode(totp.generate_otp(counter), valid_for=period - (moment % period), period=period)


def _totp(raw: bytes, name: str) -> _Totp:
    def refused(why: str) -> NotATotpSeedError:
        return NotATotpSeedError(
            f"{name} holds no TOTP seed ({why}); store an otpauth://totp/ URI or the base32 setup key"
        )

    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise refused("its value is not text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        # pass's layout (the password first, an otpauth:// line among others) is read as pass otp
        # reads it. Anything else of several lines is refused: joined (urlsplit drops newlines,
        # setup keys drop spaces) a second line would silently make a wrong seed.
        uris = [line for line in lines if line[:10].lower() == "otpauth://"]
        if len(uris) != 1:
            raise refused("its value has several lines; store the otpauth:// URI or the setup key alone")
        text = uris[0]
    options: dict[str, Any] = {}
    period = 30
    if text[:10].lower() == "otpauth://":
        seed, options, period = _uri_parts(text, refused)
    else:
        seed = text
    # Setup keys are shown in groups ("JBSW Y3DP EHPK 3PXP"), and padded or not: pyotp pads itself.
    seed = "".join(seed.split()).rstrip("=").upper()
    if not seed:
        raise refused("no secret in it")
    try:
        decoded = base64.b32decode(seed + "=" * (-len(seed) % 8))
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        raise refused("its secret is not base32") from None
    if len(decoded) * 8 < MIN_SEED_BITS:
        raise refused(f"its secret is shorter than {MIN_SEED_BITS} bits")
    totp = _Totp(seed, **options)
    # pyotp refuses periods over 120 s (NIST's advice for new deployments), but a code must match
    # what the service's own period makes: set after construction, as at() reads it.
    totp.interval = period
    return totp


def _uri_parts(uri: str, refused: Callable[[str], NotATotpSeedError]) -> tuple[str, dict[str, Any], int]:
    """The seed, TOTP options and period of an otpauth URI (Google's Key Uri Format)."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # a bracketed host ("[...]"): its message quotes that part of the value
        raise refused("an otpauth value that is not a URI") from None
    kind = parts.netloc.lower()
    if kind == "hotp":
        raise refused("a counter-based HOTP URI: only time-based codes are made here")
    if kind != "totp":
        raise refused("an otpauth URI that is not otpauth://totp/")
    parameters: dict[str, str] = {}
    # A '#' left unencoded in the label ("Desk #2:alice", as some QR makers write it) starts a
    # fragment for urlsplit, which then finds no query: the parameters follow the first '?'.
    query = uri.partition("?")[2].partition("#")[0]
    for key, value in parse_qsl(query, keep_blank_values=True):
        key = key.lower()
        if key in parameters:
            raise refused(f"its URI gives {key} twice")
        parameters[key] = value
    options: dict[str, Any] = {}
    algorithm = parameters.get("algorithm", "SHA1").upper()
    if algorithm not in DIGESTS:
        raise refused("its algorithm is not SHA1, SHA256 or SHA512")
    options["digest"] = DIGESTS[algorithm]
    digits = parameters.get("digits", "6")
    if digits not in ("6", "7", "8"):
        raise refused("its digits are not 6, 7 or 8")
    options["digits"] = int(digits)
    period = parameters.get("period", "30")
    # isdigit() alone takes '²' (int() refuses it) and other scripts' digits
    if not (period.isascii() and period.isdigit()) or not 1 <= int(period) <= MAX_PERIOD:
        raise refused(f"its period is not a whole number of seconds from 1 to {MAX_PERIOD}")
    return parameters.get("secret", ""), options, int(period)
