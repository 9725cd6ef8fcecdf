"""Regenerate the test-vector corpus of docs/format.md, section 12 ("Test vectors").

    /tmp/venv/bin/python tests/vectors/generate.py

Every input is fixed (keys, key ids, nonces, salt, password, the randomness of the SLIP-0039
split), so the output is byte-for-byte reproducible. HPKE draws its ephemeral key inside the
library, so the recovery seal (4.6) is a fixed constant below, made once and checked here.
Each record is built twice: once from the primitives exactly as docs/format.md describes it
(struct + AES-GCM, below) and once through `seal_record`; the script stops if the two differ.
The generated JSON files are committed; `tests/test_vectors.py` replays them and never runs this
script, so a change to the format makes that test fail until the corpus is regenerated on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import shamir_mnemonic
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secrets_manager.crypto import DataKey, Keyset, KeyStatus, Purpose, derive_unlock_key, seal_record
from secrets_manager.crypto.kdf import TEST
from secrets_manager.crypto.recovery import open_with_recovery_key

OUT = Path(__file__).resolve().parent

# ---- fixed inputs ------------------------------------------------------------------------------

KEY_A = DataKey(id=0x01020304, status=KeyStatus.ENABLED, created=1_700_000_000, material=bytes(range(32)))
KEY_B = DataKey(
    id=0xA1B2C3D4, status=KeyStatus.ENABLED, created=1_700_000_100, material=bytes(range(0x20, 0x40))
)
KEY_C = DataKey(  # never in any keyset of the corpus: "unknown key id"
    id=0x0BADC0DE, status=KeyStatus.ENABLED, created=1_700_000_200, material=bytes(range(0x60, 0x80))
)
ROOT = DataKey(
    id=0x524F4F54, status=KeyStatus.ENABLED, created=1_700_000_000, material=bytes(range(0x40, 0x60))
)
PASSWORD = "correct horse battery staple \u00e9"  # non-ASCII on purpose: passwords are UTF-8
SALT = bytes.fromhex("73616c742d73616c742d73616c742d21")  # 16 bytes
ROOT_NONCE = bytes.fromhex("726f6f742d6e6f6e63652d31")  # 12 bytes

_nonce_counter = 0


def next_nonce() -> bytes:
    """A distinct fixed nonce per sealed record: 8 bytes of 0xa5 ‖ counter (4 bytes, big-endian)."""
    global _nonce_counter
    _nonce_counter += 1
    return b"\xa5" * 8 + struct.pack(">I", _nonce_counter)


# ---- the format, written from docs/format.md (independent of crypto/record.py) -----------------


def spec_associated_data(purpose: int, key_id: int, name: str, version: int) -> bytes:
    return b"secrets-manager\x00" + struct.pack(">BBIQ", purpose, 1, key_id, version) + name.encode()


def spec_record(material: bytes, key_id: int, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    return struct.pack(">BI", 1, key_id) + nonce + AESGCM(material).encrypt(nonce, plaintext, ad)


def sealed(key: DataKey, purpose: Purpose, name: str, version: int, plaintext: bytes) -> bytes:
    nonce = next_nonce()
    ad = spec_associated_data(purpose, key.id, name, version)
    record = spec_record(key.material, key.id, nonce, ad, plaintext)
    if seal_record(key, purpose, name, version, plaintext, nonce=nonce) != record:
        sys.exit("seal_record disagrees with docs/format.md: fix the code or the document first")
    return record


# ---- vector documents -------------------------------------------------------------------------


def key_doc(key: DataKey, status: KeyStatus | None = None) -> dict[str, Any]:
    status = status or key.status
    material = b"" if status is KeyStatus.DESTROYED else key.material
    return {"id": key.id, "status": status.value, "material": material.hex()}


def keyset_doc(primary: DataKey, *others: dict[str, Any]) -> dict[str, Any]:
    return {"primary": primary.id, "keys": [key_doc(primary), *others]}


def record_vector(
    description: str,
    *,
    keyset: dict[str, Any],
    purpose: Purpose,
    name: str,
    version: int,
    record: bytes,
    plaintext: bytes | None = None,
    key_id: int,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": description,
        "kind": "record",
        "expect": "integrity_error" if plaintext is None else "ok",
        "keyset": keyset,
        "key_id": key_id,
        "purpose": int(purpose),
        "name": name,
        "version": version,
        "record": record.hex(),
    }
    if plaintext is not None:
        doc["associated_data"] = spec_associated_data(purpose, key_id, name, version).hex()
        doc["plaintext"] = plaintext.hex()
    return doc


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def record_vectors() -> dict[str, dict[str, Any]]:
    ks_a = keyset_doc(KEY_A)
    ks_ab = keyset_doc(KEY_B, key_doc(KEY_A))  # after a rotation: B primary, A still enabled
    value_name = "market-connector/BINANCE_API_KEY"
    text = b"hunter2-api-secret"
    text_record = sealed(KEY_A, Purpose.SECRET_VALUE, value_name, 3, text)
    empty_record = sealed(KEY_A, Purpose.SECRET_VALUE, "EMPTY", 1, b"")
    binary = bytes(range(256))
    metadata = json.dumps(
        {
            "created": 1700000000.25,
            "created_by": "alice",
            "deleted": None,
            "description": "exchange key",
            "labels": {"current": 3, "previous": 2},
            "max_versions": 10,
            "next_version": 4,
            "tags": {"owner": "trading"},
            "updated": 1700000300.5,
            "versions": {
                str(n): {"created": 1700000000.25 + 100 * (n - 1), "created_by": "alice", "destroyed": n == 1}
                for n in (1, 2, 3)
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    keyset_plaintext = Keyset(
        primary_id=KEY_B.id,
        keys=(
            DataKey(
                id=KEY_A.id, status=KeyStatus.ENABLED, created=KEY_A.created, uses=7, material=KEY_A.material
            ),
            DataKey(
                id=KEY_B.id, status=KeyStatus.ENABLED, created=KEY_B.created, uses=2, material=KEY_B.material
            ),
        ),
    ).to_bytes()
    ks_root = keyset_doc(ROOT)

    def bad(description: str, record: bytes, **overrides: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "keyset": ks_a,
            "purpose": Purpose.SECRET_VALUE,
            "name": value_name,
            "version": 3,
            "key_id": KEY_A.id,
        }
        args.update(overrides)
        return record_vector(description, record=record, **args)

    v: dict[str, dict[str, Any]] = {}
    # good
    v["good_text_value"] = record_vector(
        "UTF-8 text value, version 3 of a namespaced secret",
        keyset=ks_a,
        purpose=Purpose.SECRET_VALUE,
        name=value_name,
        version=3,
        record=text_record,
        plaintext=text,
        key_id=KEY_A.id,
    )
    v["good_empty_value"] = record_vector(
        "empty value: the shortest valid record (33 bytes)",
        keyset=ks_a,
        purpose=Purpose.SECRET_VALUE,
        name="EMPTY",
        version=1,
        record=empty_record,
        plaintext=b"",
        key_id=KEY_A.id,
    )
    v["good_binary_value"] = record_vector(
        "binary value: all 256 byte values",
        keyset=ks_a,
        purpose=Purpose.SECRET_VALUE,
        name="auth/tls.key",
        version=1,
        record=sealed(KEY_A, Purpose.SECRET_VALUE, "auth/tls.key", 1, binary),
        plaintext=binary,
        key_id=KEY_A.id,
    )
    big_version = 2**32 + 5
    v["good_large_version"] = record_vector(
        "version above 2^32: the version is 8 bytes big-endian in the associated data",
        keyset=ks_a,
        purpose=Purpose.SECRET_VALUE,
        name="db/PASSWORD",
        version=big_version,
        record=sealed(KEY_A, Purpose.SECRET_VALUE, "db/PASSWORD", big_version, b"v"),
        plaintext=b"v",
        key_id=KEY_A.id,
    )
    v["good_old_enabled_key"] = record_vector(
        "record under a non-primary but enabled key (after a rotation) still opens",
        keyset=ks_ab,
        purpose=Purpose.SECRET_VALUE,
        name=value_name,
        version=3,
        record=text_record,
        plaintext=text,
        key_id=KEY_A.id,
    )
    v["good_metadata"] = record_vector(
        "metadata JSON of a secret: purpose 2, version 0",
        keyset=ks_a,
        purpose=Purpose.SECRET_METADATA,
        name=value_name,
        version=0,
        record=sealed(KEY_A, Purpose.SECRET_METADATA, value_name, 0, metadata),
        plaintext=metadata,
        key_id=KEY_A.id,
    )
    keyset_record = sealed(ROOT, Purpose.KEYSET, "market-connector", 0, keyset_plaintext)
    v["good_keyset"] = record_vector(
        "keyset JSON of namespace market-connector sealed under the root key: purpose 3, version 0",
        keyset=ks_root,
        purpose=Purpose.KEYSET,
        name="market-connector",
        version=0,
        record=keyset_record,
        plaintext=keyset_plaintext,
        key_id=ROOT.id,
    )

    # bad: tampering
    header = 5
    v["bad_flipped_ciphertext_byte"] = bad(
        "one bit of the ciphertext flipped", flip(text_record, header + 12 + 2)
    )
    v["bad_flipped_tag_byte"] = bad(
        "one bit of the last tag byte flipped", flip(text_record, len(text_record) - 1)
    )
    v["bad_flipped_nonce_byte"] = bad("one bit of the nonce flipped", flip(text_record, header + 4))
    v["bad_appended_byte"] = bad("one byte appended to a valid record", text_record + b"\x00")
    v["bad_key_id_rewritten"] = bad(
        "key id in the header rewritten to another enabled key of the keyset",
        struct.pack(">BI", 1, KEY_B.id) + text_record[header:],
        keyset=ks_ab,
        key_id=KEY_B.id,
    )
    # bad: opened in the wrong context
    v["bad_swapped_name"] = bad(
        "valid record opened under another secret's name", text_record, name="auth/BINANCE_API_KEY"
    )
    v["bad_wrong_version"] = bad("valid record (version 3) opened as version 2", text_record, version=2)
    v["bad_wrong_purpose_metadata"] = bad(
        "value record opened as metadata (purpose 2)", text_record, purpose=Purpose.SECRET_METADATA
    )
    v["bad_wrong_purpose_value"] = bad(
        "keyset record opened as a value (purpose 1)",
        keyset_record,
        keyset=ks_root,
        name="market-connector",
        version=0,
        key_id=ROOT.id,
    )
    v["bad_keyset_other_namespace"] = bad(
        "keyset record of namespace market-connector opened for namespace auth",
        keyset_record,
        keyset=ks_root,
        purpose=Purpose.KEYSET,
        name="auth",
        version=0,
        key_id=ROOT.id,
    )
    # bad: key lookup
    v["bad_unknown_key_id"] = bad(
        "record under a key id that the keyset does not hold",
        sealed(KEY_C, Purpose.SECRET_VALUE, value_name, 3, text),
        keyset=ks_ab,
        key_id=KEY_C.id,
    )
    v["bad_disabled_key"] = bad(
        "record under a key that is present (with material) but disabled",
        text_record,
        keyset=keyset_doc(KEY_B, key_doc(KEY_A, KeyStatus.DISABLED)),
    )
    v["bad_destroyed_key"] = bad(
        "record under a key that was destroyed (no material left)",
        text_record,
        keyset=keyset_doc(KEY_B, key_doc(KEY_A, KeyStatus.DESTROYED)),
    )
    # bad: framing
    v["bad_empty_record"] = bad("empty record", b"")
    for length in (1, 5, 17, 32):
        v[f"bad_truncated_to_{length}"] = bad(
            f"record truncated to {length} bytes (shorter than the 33-byte minimum)", text_record[:length]
        )
    v["bad_truncated_to_33"] = bad(
        "non-empty record truncated to exactly the 33-byte minimum", text_record[:33]
    )
    v["bad_truncated_by_one"] = bad("last byte of the tag cut off", text_record[:-1])
    v["bad_truncated_empty_value"] = bad(
        "empty-value record cut to 32 bytes", empty_record[:-1], name="EMPTY", version=1
    )
    for fmt in (0, 2, 255):
        v[f"bad_format_version_{fmt}"] = bad(
            f"format version byte {fmt} (only 1 is defined); otherwise intact",
            bytes([fmt]) + text_record[1:],
        )
    return v


# ---- root key wrap ----------------------------------------------------------------------------


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def unlock_section(password: str, salt: bytes) -> tuple[dict[str, Any], bytes]:
    kdf = {
        "algorithm": "argon2id",
        "memory_cost_kib": TEST.memory_cost_kib,
        "parallelism": TEST.parallelism,
        "salt": base64.b64encode(salt).decode(),
        "time_cost": TEST.time_cost,
        "version": 0x13,
    }
    unlock_key = derive_unlock_key(password.encode(), replace(TEST, salt=salt))
    ad = spec_associated_data(Purpose.ROOT_KEY, ROOT.id, canonical(kdf), 0)
    record = spec_record(unlock_key, ROOT.id, ROOT_NONCE, ad, ROOT.material)
    wrapping = DataKey(id=ROOT.id, status=KeyStatus.ENABLED, created=0, material=unlock_key)
    if seal_record(wrapping, Purpose.ROOT_KEY, canonical(kdf), 0, ROOT.material, nonce=ROOT_NONCE) != record:
        sys.exit("seal_record disagrees with docs/format.md for the root key wrap")
    section = {"kind": "password", "kdf": kdf, "wrapped_root_key": base64.b64encode(record).decode()}
    return section, unlock_key


def unlock_vectors() -> dict[str, dict[str, Any]]:
    section, unlock_key = unlock_section(PASSWORD, SALT)
    record = base64.b64decode(section["wrapped_root_key"])

    def vector(description: str, expect: str, password: str, sec: dict[str, Any]) -> dict[str, Any]:
        return {
            "description": description,
            "kind": "password_unwrap",
            "expect": expect,
            "password": password,
            "unlock": sec,
        }

    def with_kdf(**changes: Any) -> dict[str, Any]:
        return {**section, "kdf": {**section["kdf"], **changes}}

    def with_wrapped(blob: bytes) -> dict[str, Any]:
        return {**section, "wrapped_root_key": base64.b64encode(blob).decode()}

    good = vector(
        "password -> Argon2id (test profile, fixed salt) -> unlock key -> root key", "ok", PASSWORD, section
    )
    good.update(
        unlock_key=unlock_key.hex(),
        associated_data=spec_associated_data(Purpose.ROOT_KEY, ROOT.id, canonical(section["kdf"]), 0).hex(),
        root_key_id=ROOT.id,
        root_key=ROOT.material.hex(),
    )
    other_salt = base64.b64encode(bytes(16)).decode()
    return {
        "unlock_good": good,
        "unlock_wrong_password": vector(
            "wrong password", "unlock_error", "correct horse battery staple", section
        ),
        "unlock_kdf_time_cost_changed": vector(
            "header's time cost edited: indistinguishable from a wrong password",
            "unlock_error",
            PASSWORD,
            with_kdf(time_cost=2),
        ),
        "unlock_kdf_salt_changed": vector(
            "header's salt replaced: indistinguishable from a wrong password",
            "unlock_error",
            PASSWORD,
            with_kdf(salt=other_salt),
        ),
        "unlock_kdf_extra_field": vector(
            "unknown field added to the KDF object: it is bound by the associated data",
            "unlock_error",
            PASSWORD,
            with_kdf(comment="x"),
        ),
        "unlock_kdf_short_salt": vector(
            "8-byte salt: malformed header",
            "integrity_error",
            PASSWORD,
            with_kdf(salt=base64.b64encode(SALT[:8]).decode()),
        ),
        "unlock_kdf_not_argon2id": vector(
            "KDF algorithm other than argon2id: malformed header",
            "integrity_error",
            PASSWORD,
            with_kdf(algorithm="argon2i"),
        ),
        "unlock_wrapped_truncated": vector(
            "wrapped root key cut to 20 bytes: malformed header",
            "integrity_error",
            PASSWORD,
            with_wrapped(record[:20]),
        ),
        "unlock_wrapped_format_version_2": vector(
            "wrapped root key with format version byte 2: malformed header",
            "integrity_error",
            PASSWORD,
            with_wrapped(b"\x02" + record[1:]),
        ),
        "unlock_wrapped_not_base64": vector(
            "wrapped root key is not valid base64: malformed header",
            "integrity_error",
            PASSWORD,
            {**section, "wrapped_root_key": "not base64!"},
        ),
    }


# ---- recovery shares (docs/format.md 4.6) --------------------------------------------------------

RECOVERY_PRIVATE_KEY = bytes(range(0x80, 0xA0))
RECOVERY_CREATED = 1_700_000_300
# HPKE base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM: ROOT's material sealed to
# RECOVERY_PRIVATE_KEY's public key with the info of 4.6. Made once (HPKE picks its ephemeral key).
RECOVERY_SEALED_ROOT = bytes.fromhex(
    "59cffb7270590cb5eded6153ffadcde356b99c940a32b26166c42ee93de54079"
    "fab1a071f2a259e65a6fdecbbeb6a404629248021b6abff0cb2f9c75b26d313e"
    "3f533a48c9b20af0d72da9de476de9d9"
)


def recovery_info(root_key_id: int, public_key: bytes) -> bytes:
    return b"secrets-manager recovery\x00" + struct.pack(">I", root_key_id) + public_key


def fixed_shares(private_key: bytes, threshold: int, count: int, seed: bytes) -> list[str]:
    """SLIP-0039 shares with the library's randomness replaced by SHA-256 of `seed` ‖ counter."""
    counter = 0

    def fixed_bytes(length: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < length:
            counter += 1
            out += hashlib.sha256(seed + struct.pack(">I", counter)).digest()
        return out[:length]

    original = shamir_mnemonic.shamir.RANDOM_BYTES
    shamir_mnemonic.shamir.RANDOM_BYTES = fixed_bytes
    try:
        (shares,) = shamir_mnemonic.generate_mnemonics(1, [(threshold, count)], private_key)
    finally:
        shamir_mnemonic.shamir.RANDOM_BYTES = original
    return list(shares)


def recovery_vectors() -> dict[str, dict[str, Any]]:
    private_key = RECOVERY_PRIVATE_KEY
    public_key = X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()
    if (
        open_with_recovery_key(private_key, RECOVERY_SEALED_ROOT, recovery_info(ROOT.id, public_key))
        != ROOT.material
    ):
        sys.exit("the fixed recovery seal does not open to ROOT under docs/format.md 4.6")
    shares = fixed_shares(private_key, 2, 3, b"secrets-manager test vectors")
    foreign = fixed_shares(bytes(range(0xA0, 0xC0)), 2, 3, b"another set")
    identifier = shamir_mnemonic.Share.from_mnemonic(shares[0]).identifier

    def setup_record(public: bytes) -> str:
        doc = {
            "created": RECOVERY_CREATED,
            "identifier": identifier,
            "public_key": base64.b64encode(public).decode(),
            "shares": 3,
            "threshold": 2,
        }
        plaintext = canonical(doc).encode()
        nonce = next_nonce()
        ad = spec_associated_data(Purpose.RECOVERY_KEY, ROOT.id, "core/recovery", 0)
        record = spec_record(ROOT.material, ROOT.id, nonce, ad, plaintext)
        if seal_record(ROOT, Purpose.RECOVERY_KEY, "core/recovery", 0, plaintext, nonce=nonce) != record:
            sys.exit("seal_record disagrees with docs/format.md for core/recovery")
        return record.hex()

    section = {
        "identifier": identifier,
        "kind": "x25519-hpke",
        "root_key_id": ROOT.id,
        "sealed_root_key": base64.b64encode(RECOVERY_SEALED_ROOT).decode(),
    }
    unlock, _ = unlock_section(PASSWORD, SALT)
    header = {
        "created": ROOT.created,
        "format": 1,
        "root_key_id": ROOT.id,
        "unlock": unlock,
        "recovery": section,
    }
    record = setup_record(public_key)

    def vector(
        description: str,
        expect: str,
        given: list[str],
        *,
        header_changes: dict[str, Any] | None = None,
        section_changes: dict[str, Any] | None = None,
        recovery_record: str | None = record,
    ) -> dict[str, Any]:
        doc = {**header, **(header_changes or {}), "recovery": {**section, **(section_changes or {})}}
        out = {
            "description": description,
            "kind": "recovery",
            "expect": expect,
            "shares": given,
            "header": doc,
            "recovery_record": recovery_record,
        }
        if expect == "ok":
            out.update(public_key=public_key.hex(), root_key_id=ROOT.id, root_key=ROOT.material.hex())
        return out

    words = shares[0].split()
    mistyped = " ".join([*words[:12], "academic" if words[12] != "academic" else "acid", *words[13:]])
    flipped = base64.b64encode(flip(RECOVERY_SEALED_ROOT, 40)).decode()
    return {
        "recovery_good": vector(
            "shares 1 and 3 of 3 (threshold 2) open the sealed root key", "ok", [shares[0], shares[2]]
        ),
        "recovery_good_all_three": vector("all three shares open it too", "ok", shares),
        "recovery_too_few_shares": vector("one share of a threshold-2 set", "invalid_input", [shares[1]]),
        "recovery_mistyped_share": vector(
            "a share with one word changed fails its RS1024 checksum", "invalid_input", [mistyped, shares[1]]
        ),
        "recovery_mixed_sets": vector("shares of two sets", "invalid_input", [shares[0], foreign[1]]),
        "recovery_other_set": vector(
            "a whole other set: its identifier is not the header's", "unlock_error", foreign[:2]
        ),
        "recovery_flipped_seal": vector(
            "a ciphertext byte of the seal flipped: the shares do not open it",
            "unlock_error",
            shares[:2],
            section_changes={"sealed_root_key": flipped},
        ),
        "recovery_root_key_id_rewritten": vector(
            "header and section name another root key id: the seal's info binds the id",
            "unlock_error",
            shares[:2],
            header_changes={"root_key_id": KEY_C.id},
            section_changes={"root_key_id": KEY_C.id},
        ),
        "recovery_section_names_another_root": vector(
            "the section's root key id differs from the header's",
            "integrity_error",
            shares[:2],
            section_changes={"root_key_id": KEY_C.id},
        ),
        "recovery_record_names_another_key": vector(
            "core/recovery names another public key than the shares rebuild",
            "integrity_error",
            shares[:2],
            recovery_record=setup_record(bytes(32 * [0x09])),
        ),
        "recovery_record_missing": vector(
            "core/recovery is missing", "integrity_error", shares[:2], recovery_record=None
        ),
    }


def main() -> None:
    vectors = {**record_vectors(), **unlock_vectors(), **recovery_vectors()}
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, doc in sorted(vectors.items()):
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
