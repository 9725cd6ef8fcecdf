"""Unit tests of crypto/: records, keysets and the Argon2id KDF (docs/format.md sections 3-7)."""

from __future__ import annotations

import base64
import copy
import json
import pickle
import struct
from dataclasses import replace

import pytest
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from secrets_manager.crypto import (
    NONCE_SIZE,
    TAG_SIZE,
    DataKey,
    KdfParams,
    Keyset,
    KeyStatus,
    Purpose,
    aead,
    derive_unlock_key,
    mac,
    open_record,
    seal_record,
    stream,
)
from secrets_manager.crypto import kdf as kdf_module
from secrets_manager.crypto.keyset import ROTATE_AFTER_USES
from secrets_manager.crypto.record import MIN_RECORD_SIZE, record_key_id
from secrets_manager.errors import IntegrityError

NAME = "auth/DB_PASSWORD"
SALT = bytes(range(16))
ZERO_KEY_B64 = base64.b64encode(bytes(32)).decode()


def enabled_key(key_id: int = 7, fill: int = 1) -> DataKey:
    return DataKey(id=key_id, status=KeyStatus.ENABLED, created=0, material=bytes([fill]) * 32)


def seal_value(keyset: Keyset, plaintext: bytes = b"s3cret", version: int = 1) -> bytes:
    return seal_record(keyset.primary, Purpose.SECRET_VALUE, NAME, version, plaintext)


def open_value(keyset: Keyset, record: bytes, version: int = 1) -> bytes:
    return open_record(keyset.key_for_decryption, Purpose.SECRET_VALUE, NAME, version, record)


def kdf_params(**changes: object) -> KdfParams:
    return replace(kdf_module.TEST, **{"salt": SALT, **changes})


# ---- records -----------------------------------------------------------------------------------


def test_two_seals_of_the_same_plaintext_use_fresh_nonces() -> None:
    key = enabled_key()
    first = seal_record(key, Purpose.SECRET_VALUE, NAME, 1, b"same")
    second = seal_record(key, Purpose.SECRET_VALUE, NAME, 1, b"same")
    assert first[5 : 5 + NONCE_SIZE] != second[5 : 5 + NONCE_SIZE]
    assert first != second


def test_record_starts_with_format_byte_and_big_endian_key_id() -> None:
    record = seal_record(enabled_key(0x01020304), Purpose.SECRET_VALUE, NAME, 1, b"abc")
    assert record[:5] == b"\x01\x01\x02\x03\x04"
    assert record_key_id(record) == 0x01020304
    assert len(record) == 1 + 4 + NONCE_SIZE + 3 + TAG_SIZE


def test_record_round_trips_for_each_purpose() -> None:
    key = enabled_key()
    for purpose in Purpose:
        record = seal_record(key, purpose, NAME, 0, b"x")
        assert open_record(lambda _id: key, purpose, NAME, 0, record) == b"x"


def test_seal_refuses_a_nonce_that_is_not_96_bits() -> None:
    with pytest.raises(ValueError):
        seal_record(enabled_key(), Purpose.SECRET_VALUE, NAME, 1, b"x", nonce=bytes(8))


@pytest.mark.parametrize("size", [16, 24, 31, 33])
def test_the_cipher_refuses_a_key_that_is_not_256_bits(size: int) -> None:
    """AES-GCM also takes 128- and 192-bit keys: only this check keeps a short key, from a caller
    that did not check its own (a chunk's file key, a key's material), from sealing at all."""
    with pytest.raises(ValueError, match="32-byte key"):
        aead.cipher_for(bytes(size))
    assert aead.cipher_for(bytes(32)).encrypt(bytes(12), b"x", None)


def test_opening_anything_shorter_than_a_nonce_and_a_tag_is_the_one_integrity_error() -> None:
    """Shorter than 28 bytes, AES-GCM would get a nonce it refuses (ValueError, under 8 bytes) or
    no whole tag: the same opaque IntegrityError as a wrong tag, whatever the length."""
    cipher = aead.cipher_for(bytes(32))
    for length in range(NONCE_SIZE + TAG_SIZE):
        with pytest.raises(IntegrityError):
            aead.open_sealed(cipher, bytes(length), b"ad")


def test_a_chunk_of_the_wrong_size_for_its_place_does_not_open_though_its_tag_holds() -> None:
    """A chunk's AD binds its index and whether it is the last, not its length: a chunk before
    the last must hold exactly CHUNK_SIZE bytes, and the last at least one (docs/backup-format.md
    6), or the payload was not cut as the writer cuts it."""
    key, context = bytes(32), bytes(stream.CONTEXT_SIZE)
    cipher = aead.cipher_for(key)

    def sealed(plaintext: bytes, index: int, final: bool) -> bytes:
        return aead.seal(cipher, plaintext, stream.chunk_associated_data(context, index, final))

    assert stream.open_chunk(key, context, 0, False, sealed(bytes(stream.CHUNK_SIZE), 0, False))
    assert stream.open_chunk(key, context, 1, True, sealed(b"x", 1, True)) == b"x"
    for plaintext, final in ((bytes(stream.CHUNK_SIZE - 1), False), (b"", True)):
        with pytest.raises(IntegrityError):
            stream.open_chunk(key, context, 0, final, sealed(plaintext, 0, final))


def test_every_record_shorter_than_the_minimum_fails_integrity_check() -> None:
    record = seal_record(enabled_key(), Purpose.SECRET_VALUE, NAME, 1, b"")
    assert len(record) == MIN_RECORD_SIZE == 33
    for length in range(MIN_RECORD_SIZE):
        with pytest.raises(IntegrityError):
            open_record(lambda _id: enabled_key(), Purpose.SECRET_VALUE, NAME, 1, record[:length])


# ---- keysets -----------------------------------------------------------------------------------


def test_generated_keyset_has_one_enabled_primary_with_a_nonzero_32_bit_id() -> None:
    keyset = Keyset.generate(created=100)
    assert len(keyset.keys) == 1
    assert keyset.primary.status is KeyStatus.ENABLED
    assert 0 < keyset.primary.id < 2**32
    assert keyset.primary.created == 100
    assert keyset.primary.uses == 0
    assert len(keyset.primary.material) == 32


def test_after_rotation_old_records_open_and_new_records_use_the_new_primary() -> None:
    old = Keyset.generate(created=1)
    old_record = seal_value(old)
    rotated = old.with_new_primary(created=2)
    assert rotated.primary_id != old.primary_id
    assert [k.id for k in rotated.keys] == [old.primary_id, rotated.primary_id]
    assert open_value(rotated, old_record) == b"s3cret"
    new_record = seal_value(rotated)
    assert record_key_id(new_record) == rotated.primary_id
    with pytest.raises(IntegrityError):
        open_value(old, new_record)


def test_keyset_changes_are_copy_on_write() -> None:
    keyset = Keyset.generate(created=1)
    keyset.with_new_primary(created=2)
    keyset.with_uses(5)
    assert len(keyset.keys) == 1
    assert keyset.primary.uses == 0


def test_with_uses_counts_encryptions_on_the_primary_only() -> None:
    keyset = Keyset.generate(created=1).with_uses(3)
    rotated = keyset.with_new_primary(created=2).with_uses(2).with_uses(1)
    uses = {k.id: k.uses for k in rotated.keys}
    assert uses == {keyset.primary_id: 3, rotated.primary_id: 3}


def test_primary_is_rotated_once_it_reaches_the_use_limit() -> None:
    keyset = Keyset.generate(created=1)
    almost = keyset.with_uses(ROTATE_AFTER_USES - 1)
    assert almost.with_rotation_if_due(created=2) is almost
    worn = keyset.with_uses(ROTATE_AFTER_USES)
    fresh = worn.with_rotation_if_due(created=2)
    assert fresh.primary_id != keyset.primary_id
    assert fresh.primary.uses == 0
    assert fresh.key_for_decryption(keyset.primary_id).uses == ROTATE_AFTER_USES
    assert ROTATE_AFTER_USES <= 2**32 // 2


def test_keyset_bytes_round_trip() -> None:
    keyset = Keyset.generate(created=1).with_uses(4).with_new_primary(created=2)
    data = keyset.to_bytes()
    again = Keyset.from_bytes(data)
    assert again == keyset
    assert again.to_bytes() == data
    assert [k.material for k in again.keys] == [k.material for k in keyset.keys]


def test_keyset_bytes_are_canonical_json() -> None:
    doc = json.loads(Keyset.generate(created=1).to_bytes())
    assert sorted(doc) == ["format", "keys", "primary"]
    assert doc["format"] == 1
    assert sorted(doc["keys"][0]) == ["created", "id", "material", "status", "uses"]


def test_keyset_with_destroyed_key_round_trips_without_material() -> None:
    primary = enabled_key(1)
    destroyed = DataKey(id=2, status=KeyStatus.DESTROYED, created=0)
    keyset = Keyset(primary_id=1, keys=(primary, destroyed))
    assert json.loads(keyset.to_bytes())["keys"][1]["material"] == ""
    assert Keyset.from_bytes(keyset.to_bytes()) == keyset


def _keyset_doc(**changes: object) -> bytes:
    doc = json.loads(Keyset(primary_id=7, keys=(enabled_key(7),)).to_bytes())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        _keyset_doc(format=2),
        _keyset_doc(primary=8),
        _keyset_doc(keys=[]),
        _keyset_doc(keys="nope"),
        _keyset_doc(keys=[{"id": 7, "status": "enabled", "created": 0, "uses": 0}]),
        _keyset_doc(keys=[{"id": 7, "status": "lost", "created": 0, "uses": 0, "material": "AA=="}]),
        _keyset_doc(keys=[{"id": 7, "status": "enabled", "created": 0, "uses": 0, "material": "AA=="}]),
        _keyset_doc(keys=[{"id": 7, "status": "enabled", "created": 0, "uses": 0, "material": "!!"}]),
        _keyset_doc(keys=[{"id": 0, "status": "enabled", "created": 0, "uses": 0, "material": ZERO_KEY_B64}]),
    ],
    ids=[
        "empty",
        "not-json",
        "array",
        "empty-object",
        "unknown-format",
        "primary-missing",
        "no-keys",
        "keys-not-list",
        "no-material",
        "unknown-status",
        "short-material",
        "bad-base64",
        "key-id-zero",
    ],
)
def test_malformed_keyset_bytes_fail_integrity_check(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        Keyset.from_bytes(data)


@pytest.mark.parametrize("status", [KeyStatus.DISABLED, KeyStatus.DESTROYED])
def test_primary_must_be_enabled(status: KeyStatus) -> None:
    material = b"" if status is KeyStatus.DESTROYED else bytes(32)
    key = DataKey(id=3, status=status, created=0, material=material)
    with pytest.raises(ValueError):
        Keyset(primary_id=3, keys=(key, enabled_key(4)))


def test_primary_must_be_in_the_keyset_and_ids_unique() -> None:
    with pytest.raises(ValueError):
        Keyset(primary_id=9, keys=(enabled_key(4),))
    with pytest.raises(ValueError):
        Keyset(primary_id=4, keys=(enabled_key(4), enabled_key(4, fill=2)))


@pytest.mark.parametrize("status", [KeyStatus.DISABLED, KeyStatus.DESTROYED])
def test_only_enabled_keys_decrypt(status: KeyStatus) -> None:
    old = enabled_key(3)
    record = seal_record(old, Purpose.SECRET_VALUE, NAME, 1, b"v")
    retired = replace(old, status=status, material=b"" if status is KeyStatus.DESTROYED else old.material)
    keyset = Keyset(primary_id=4, keys=(retired, enabled_key(4)))
    with pytest.raises(IntegrityError):
        keyset.key_for_decryption(3)
    with pytest.raises(IntegrityError):
        open_value(keyset, record)


def test_data_key_validates_id_and_material() -> None:
    for key_id in (0, -1, 2**32):
        with pytest.raises(ValueError):
            DataKey(id=key_id, status=KeyStatus.ENABLED, created=0, material=bytes(32))
    with pytest.raises(ValueError):
        DataKey(id=1, status=KeyStatus.ENABLED, created=0, material=bytes(16))
    with pytest.raises(ValueError):
        DataKey(id=1, status=KeyStatus.DESTROYED, created=0, material=bytes(32))


def test_data_key_repr_never_shows_material() -> None:
    material = bytes.fromhex("de" * 32)
    key = DataKey(id=5, status=KeyStatus.ENABLED, created=0, material=material)
    keyset = Keyset(primary_id=5, keys=(key,))
    for text in (repr(key), str(key), repr(keyset), str(keyset)):
        assert "dede" not in text
        assert repr(material) not in text
        assert "material" not in text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_data_key_and_keyset_refuse_pickling(protocol: int) -> None:
    keyset = Keyset.generate(created=1)
    for obj in (keyset.primary, keyset):
        with pytest.raises(TypeError):
            pickle.dumps(obj, protocol=protocol)


def test_data_key_and_keyset_refuse_copying_through_reduce() -> None:
    keyset = Keyset.generate(created=1)
    for obj in (keyset.primary, keyset):
        with pytest.raises(TypeError):
            copy.deepcopy(obj)


# ---- KDF ---------------------------------------------------------------------------------------


def test_default_profile_is_rfc9106_second_recommendation() -> None:
    default = kdf_module.DEFAULT
    assert (default.time_cost, default.memory_cost_kib, default.parallelism) == (3, 65536, 4)
    assert default.version == 0x13


def test_test_profile_is_cheap_and_weaker_than_default() -> None:
    test = kdf_module.TEST
    assert (test.time_cost, test.memory_cost_kib, test.parallelism) == (1, 1024, 1)
    assert test.is_weaker_than(kdf_module.DEFAULT)
    assert not kdf_module.DEFAULT.is_weaker_than(kdf_module.DEFAULT)
    assert kdf_module.PROFILES == {"default": kdf_module.DEFAULT, "test": kdf_module.TEST}


@pytest.mark.parametrize("cost", ["time_cost", "memory_cost_kib", "parallelism"])
def test_one_cost_below_the_minimum_is_weaker_whatever_the_others(cost: str) -> None:
    """Production refuses a store or backup whose Argon2id costs are weaker than its minimum: one
    cost below it is enough, however high the others (the test profile is below in all three, so it
    cannot tell a check that ignores one of them)."""
    minimum = kdf_module.DEFAULT
    lowered = replace(minimum, **{cost: getattr(minimum, cost) - 1})
    others_raised = replace(
        lowered,
        **{
            other: getattr(minimum, other) * 2
            for other in ("time_cost", "memory_cost_kib", "parallelism")
            if other != cost
        },
    )
    assert lowered.is_weaker_than(minimum)
    assert others_raised.is_weaker_than(minimum)
    assert not replace(minimum, **{cost: getattr(minimum, cost) + 1}).is_weaker_than(minimum)


def test_new_salt_is_16_random_bytes() -> None:
    first, second = kdf_module.TEST.with_new_salt(), kdf_module.TEST.with_new_salt()
    assert len(first.salt) == len(second.salt) == 16
    assert first.salt != second.salt
    first.validate()


@pytest.mark.parametrize(
    "changes",
    [
        {"salt": b""},
        {"salt": bytes(15)},
        {"salt": bytes(17)},
        {"time_cost": 0},
        {"time_cost": 17},
        {"parallelism": 0},
        {"parallelism": 17},
        {"memory_cost_kib": 7},
        {"parallelism": 4, "memory_cost_kib": 31},
        {"memory_cost_kib": 1024 * 1024 + 1},
        {"version": 0x10},
    ],
    ids=lambda changes: ",".join(f"{k}={v!r}"[:24] for k, v in changes.items()),
)
def test_validate_rejects_bad_parameters(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        kdf_params(**changes).validate()
    with pytest.raises(ValueError):
        derive_unlock_key(b"pw", kdf_params(**changes))


def test_validate_accepts_both_profiles_with_a_salt() -> None:
    for profile in kdf_module.PROFILES.values():
        replace(profile, salt=SALT).validate()


def test_unlock_key_is_deterministic_for_the_same_inputs() -> None:
    key = derive_unlock_key(b"password", kdf_params())
    assert len(key) == 32
    assert derive_unlock_key(b"password", kdf_params()) == key


def test_unlock_key_depends_on_salt_password_and_costs() -> None:
    key = derive_unlock_key(b"password", kdf_params())
    assert derive_unlock_key(b"password", kdf_params(salt=bytes(16))) != key
    assert derive_unlock_key(b"Password", kdf_params()) != key
    assert derive_unlock_key(b"password", kdf_params(time_cost=2)) != key
    assert derive_unlock_key(b"password", kdf_params(memory_cost_kib=2048)) != key


def test_unlock_key_is_argon2id() -> None:
    params = kdf_params()
    expected = {
        kind: hash_secret_raw(
            secret=b"password",
            salt=SALT,
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            hash_len=32,
            type=kind,
            version=0x13,
        )
        for kind in (Type.ID, Type.I, Type.D)
    }
    key = derive_unlock_key(b"password", params)
    assert key == expected[Type.ID]
    assert key not in (expected[Type.I], expected[Type.D])


def test_record_header_is_big_endian_struct() -> None:
    # Pins the two header fields independently of record.py's own struct definitions.
    record = seal_record(enabled_key(0xA1B2C3D4), Purpose.KEYSET, "ns", 0, b"")
    assert struct.unpack(">BI", record[:5]) == (1, 0xA1B2C3D4)


# ---- audit digests (crypto/mac.py) ---------------------------------------------------------

AUDIT_KEY = bytes(range(32))
LENGTHS = [0, 1, 31, 32, 33, 55, 56, 63, 64, 65, 127, 128, 129, 1000, 100_000]


def _reference_sha256(data: bytes) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize().hex()


def _reference_hmac(key: bytes, data: bytes) -> str:
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize().hex()


def _data(length: int) -> bytes:
    return bytes((i * 131 + length) % 256 for i in range(length))


@pytest.mark.parametrize("length", LENGTHS)
def test_audit_digests_match_cryptography(length: int) -> None:
    data = _data(length)
    assert mac.sha256_hex(data) == _reference_sha256(data)
    for key in (AUDIT_KEY, bytes(32), b"\xff" * 32):
        assert mac.value_fingerprint(key, data) == "hmac-sha256:" + _reference_hmac(
            key, b"secrets-manager/audit-value\x00" + data
        )
        record_hash = _reference_sha256(data)
        expected = _reference_hmac(key, b"secrets-manager/audit-record\x00" + record_hash.encode())
        assert mac.record_mac(key, record_hash) == expected
        assert mac.record_mac_ok(key, record_hash, expected)
        assert not mac.record_mac_ok(key, record_hash, expected[:-1] + ("0" if expected[-1] != "0" else "1"))


def test_audit_digests_known_answers_and_domain_separation() -> None:
    assert mac.sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert mac.sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert mac.value_fingerprint(AUDIT_KEY, b"v") != mac.value_fingerprint(bytes(32), b"v")
    # the same bytes under the two labels: a value fingerprint never passes as a record MAC
    assert mac.record_mac(AUDIT_KEY, "0" * 64) != mac.value_fingerprint(AUDIT_KEY, b"0" * 64).removeprefix(
        "hmac-sha256:"
    )


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_audit_macs_refuse_keys_that_are_not_32_bytes(size: int) -> None:
    key = b"k" * size
    with pytest.raises(ValueError, match="32 bytes"):
        mac.record_mac(key, "0" * 64)
    with pytest.raises(ValueError, match="32 bytes"):
        mac.value_fingerprint(key, b"value")
    with pytest.raises(ValueError, match="32 bytes"):
        mac.record_mac_ok(key, "0" * 64, "0" * 64)
