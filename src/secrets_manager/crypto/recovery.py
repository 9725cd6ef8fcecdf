"""Recovery shares: a key pair whose private half is split among people, for when the unlock is lost.

The root key is sealed to an X25519 public key with HPKE (RFC 9180, base mode: DHKEM(X25519,
HKDF-SHA256), HKDF-SHA256, AES-256-GCM). The 32-byte private key exists only while shares are
being made or combined: it is split with Shamir's scheme as SLIP-0039 mnemonics (`threshold` of
`shares` rebuild it; each share is 33 words with a checksum, so a mistyped word is caught, and an
identifier, so shares of two sets are never mixed). Because the seal needs only the public key, a
root key rotation re-seals the new root key without anyone's shares (docs/format.md 4.6).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import shamir_mnemonic
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from secrets_manager.errors import IntegrityError, InvalidInputError

PRIVATE_KEY_SIZE = 32
PUBLIC_KEY_SIZE = 32
MAX_SHARES = 16  # SLIP-0039's limit for the members of one group
SEALED_SIZE = 32 + PRIVATE_KEY_SIZE + 16  # encapsulated key ‖ 32-byte root key ‖ tag (for 32 bytes)
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


@dataclass(frozen=True)
class ShareSet:
    """What the shares of one set have in common (none of it secret)."""

    identifier: int  # SLIP-0039's random 15-bit set identifier
    threshold: int
    shares: int | None  # unknown when read from a share: only its set's threshold is in it


def new_recovery_key() -> bytes:
    """A fresh X25519 private key (32 bytes from the OS CSPRNG)."""
    return os.urandom(PRIVATE_KEY_SIZE)


def recovery_public_key(private_key: bytes) -> bytes:
    """The raw 32-byte X25519 public key of `private_key`."""
    return _private(private_key).public_key().public_bytes(encoding=Encoding.Raw, format=PublicFormat.Raw)


def split_recovery_key(private_key: bytes, *, threshold: int, shares: int) -> tuple[ShareSet, list[str]]:
    """`shares` SLIP-0039 mnemonics, any `threshold` of which rebuild `private_key`."""
    if not 1 <= threshold <= shares <= MAX_SHARES:
        raise InvalidInputError(f"need 1 <= threshold <= shares <= {MAX_SHARES}")
    if threshold == 1 and shares > 1:
        # SLIP-0039 refuses it: with threshold 1 every share would simply be the key.
        raise InvalidInputError("a threshold of 1 makes every share the whole key; use 2 or more, or 1 share")
    (mnemonics,) = shamir_mnemonic.generate_mnemonics(1, [(threshold, shares)], _checked_key(private_key))
    return ShareSet(
        identifier=describe_share(mnemonics[0]).identifier, threshold=threshold, shares=shares
    ), mnemonics


def describe_share(mnemonic: str) -> ShareSet:
    """The set a share belongs to; InvalidInputError (never quoting a word) if it is not a share."""
    try:
        share = shamir_mnemonic.Share.from_mnemonic(_normalised(mnemonic))
    except (shamir_mnemonic.MnemonicError, ValueError, KeyError):
        raise InvalidInputError(
            "not a valid recovery share (a mistyped or missing word, or a damaged file): compare it "
            "word by word with the original"
        ) from None
    if share.group_count != 1:
        raise InvalidInputError("a share of a multi-group SLIP-0039 set: not made by secrets-manager")
    return ShareSet(identifier=share.identifier, threshold=share.member_threshold, shares=None)


def combine_recovery_shares(mnemonics: Sequence[str]) -> bytes:
    """The private key that `threshold` distinct shares of one set rebuild.

    InvalidInputError, naming shares by position (1-based) and never quoting a word, for a share
    that does not parse, shares of different sets, a repeated share or too few shares."""
    sets = []
    for position, mnemonic in enumerate(mnemonics, 1):
        try:
            sets.append(describe_share(mnemonic))
        except InvalidInputError as exc:
            raise InvalidInputError(f"share {position}: {exc}") from None
    if not sets:
        raise InvalidInputError("no recovery shares given")
    first = sets[0]
    for position, other in enumerate(sets[1:], 2):
        if (other.identifier, other.threshold) != (first.identifier, first.threshold):
            raise InvalidInputError(
                f"share {position} belongs to another set of recovery shares than share 1 "
                f"(set {other.identifier:05d}, not {first.identifier:05d})"
            )
    normalised = [_normalised(m) for m in mnemonics]
    first_seen: dict[str, int] = {}
    for position, mnemonic in enumerate(normalised, 1):
        earlier = first_seen.setdefault(mnemonic, position)
        if earlier != position:
            raise InvalidInputError(
                f"share {position} is the same recovery share as share {earlier}: give distinct shares"
            )
    if len(normalised) < first.threshold:
        raise InvalidInputError(
            f"{len(normalised)} recovery share(s) given; this set needs {first.threshold}"
        )
    numbers: dict[int, int] = {}
    for position, mnemonic in enumerate(normalised, 1):
        number = shamir_mnemonic.Share.from_mnemonic(mnemonic).index
        earlier = numbers.setdefault(number, position)
        if earlier != position:
            raise InvalidInputError(
                f"shares {earlier} and {position} hold the same share number but differ: one of them "
                "was altered (its checksum still holds) or comes from another issue; give another"
            )
    # More shares than the threshold: any `threshold` of them rebuild the key, so one altered
    # share among them does not stop the others. SLIP-0039's digest refuses a wrong combination.
    for chosen in itertools.combinations(normalised, first.threshold):
        try:
            return _checked_key(shamir_mnemonic.combine_mnemonics(list(chosen)))
        except (shamir_mnemonic.MnemonicError, ValueError):
            continue
    raise InvalidInputError(
        "these recovery shares do not combine: one of them was altered (a word changed so that its "
        "checksum still holds); try others of the set"
    )


def seal_to_recovery_key(public_key: bytes, plaintext: bytes, info: bytes) -> bytes:
    """HPKE single-shot seal of `plaintext` to `public_key`; `info` binds its context."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise IntegrityError()
    return bytes(_SUITE.encrypt(plaintext, X25519PublicKey.from_public_bytes(public_key), info=info))


def open_with_recovery_key(private_key: bytes, sealed: bytes, info: bytes) -> bytes:
    """Inverse of `seal_to_recovery_key`; IntegrityError on any mismatch (another key, an edited
    ciphertext or `info`)."""
    try:
        return bytes(_SUITE.decrypt(sealed, _private(private_key), info=info))
    except (InvalidTag, ValueError):
        raise IntegrityError() from None


def _private(private_key: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_checked_key(private_key))


def _checked_key(private_key: bytes) -> bytes:
    if len(private_key) != PRIVATE_KEY_SIZE:
        raise IntegrityError()
    return private_key


def _normalised(mnemonic: str) -> str:
    """Words lower-cased and single-spaced: how a person may type a share back in."""
    return " ".join(mnemonic.lower().split())
