"""The keyset lifecycle in crypto/keyset.py, in Tink's style: for each keyset state along
add → promote → rewrap → disable → destroy, which records decrypt and which key encrypts; that no
step the store allows leaves a stored record unreadable; and the rules each step enforces.

Pure values, no I/O: the store-level commands built on these steps are tested in test_keys.py.
"""

from __future__ import annotations

import base64
import json

import pytest

from secrets_manager.crypto import Keyset, KeyStatus, Purpose, RotationPolicy, open_record, seal_record
from secrets_manager.crypto.keyset import ROTATE_AFTER_USES
from secrets_manager.crypto.record import record_key_id
from secrets_manager.errors import IntegrityError

NAME = "auth/DB_PASSWORD"


def seal(keyset: Keyset, plaintext: bytes, version: int = 1) -> bytes:
    return seal_record(keyset.primary, Purpose.SECRET_VALUE, NAME, version, plaintext)


def opens(keyset: Keyset, record: bytes, version: int = 1) -> bool:
    try:
        open_record(keyset.key_for_decryption, Purpose.SECRET_VALUE, NAME, version, record)
    except IntegrityError:
        return False
    return True


def rewrap_record(keyset: Keyset, record: bytes, version: int = 1) -> bytes:
    """What the store's rewrap does to one record: open with its key, seal with the primary."""
    plaintext = open_record(keyset.key_for_decryption, Purpose.SECRET_VALUE, NAME, version, record)
    return seal(keyset, plaintext, version)


class Lifecycle:
    """One keyset walked through every state, with a record sealed under each of its two keys."""

    def __init__(self) -> None:
        generated = Keyset.generate(created=1)
        self.a = generated.primary_id
        added = generated.with_new_key(created=2)
        self.b = added.keys[-1].id
        promoted = added.with_primary(self.b)
        self.under_a = seal(generated, b"sealed under A")
        self.under_b = seal(promoted, b"sealed under B")
        rewrapped = promoted.with_uses(1)  # rewrap re-seals records; the keyset only counts them
        disabled = rewrapped.with_status(self.a, KeyStatus.DISABLED)
        destroyed = disabled.with_destroyed(self.a)
        self.states = {
            "generated": generated,
            "added": added,
            "promoted": promoted,
            "rewrapped": rewrapped,
            "disabled": disabled,
            "destroyed": destroyed,
        }


# state → (the key new records are sealed under, does a record under A open, under B)
MATRIX = {
    "generated": ("A", True, False),
    "added": ("A", True, True),
    "promoted": ("B", True, True),
    "rewrapped": ("B", True, True),
    "disabled": ("B", False, True),
    "destroyed": ("B", False, True),
}


@pytest.mark.parametrize("state", list(MATRIX))
def test_which_records_decrypt_in_each_keyset_state(state: str) -> None:
    life = Lifecycle()
    keyset = life.states[state]
    encrypts, a_opens, b_opens = MATRIX[state]
    assert keyset.primary_id == {"A": life.a, "B": life.b}[encrypts]
    assert record_key_id(seal(keyset, b"new")) == keyset.primary_id
    assert opens(keyset, life.under_a) is a_opens
    assert opens(keyset, life.under_b) is b_opens


def test_no_allowed_step_leaves_a_stored_record_unreadable() -> None:
    """A store of three secrets follows the lifecycle as `keys` runs it: disable only once no
    stored record names the key. After every step, every stored record still opens."""
    keyset = Keyset.generate(created=1)
    old = keyset.primary_id
    stored = {version: seal(keyset, f"value {version}".encode(), version) for version in (1, 2, 3)}

    def all_readable(ks: Keyset) -> bool:
        return all(opens(ks, record, version) for version, record in stored.items())

    keyset = keyset.with_new_key(created=2)
    assert all_readable(keyset)
    keyset = keyset.with_primary(keyset.keys[-1].id)
    assert all_readable(keyset)
    stored[4] = seal(keyset, b"value 4", 4)
    for version in list(stored):  # rewrap, one record at a time (one commit each in the store)
        stored[version] = rewrap_record(keyset, stored[version], version)
        assert all_readable(keyset)
    assert all(record_key_id(record) == keyset.primary_id for record in stored.values())
    keyset = keyset.with_status(old, KeyStatus.DISABLED)
    assert all_readable(keyset)
    keyset = keyset.with_destroyed(old)
    assert all_readable(keyset)


def test_disabling_a_key_that_records_still_name_would_make_them_unreadable() -> None:
    """Why `keys disable` counts records first: the keyset itself cannot know."""
    life = Lifecycle()
    premature = life.states["promoted"].with_status(life.a, KeyStatus.DISABLED)
    assert not opens(premature, life.under_a)
    assert opens(premature.with_status(life.a, KeyStatus.ENABLED), life.under_a)


def test_rewrapped_record_names_the_primary_and_keeps_its_plaintext() -> None:
    life = Lifecycle()
    promoted = life.states["promoted"]
    rewrapped = rewrap_record(promoted, life.under_a)
    assert record_key_id(rewrapped) == life.b
    assert open_record(promoted.key_for_decryption, Purpose.SECRET_VALUE, NAME, 1, rewrapped) == (
        b"sealed under A"
    )
    assert opens(life.states["destroyed"], rewrapped)


# ---- the rules of each step ----------------------------------------------------------------------


def test_an_added_key_decrypts_but_does_not_encrypt_until_promoted() -> None:
    keyset = Keyset.generate(created=1)
    added = keyset.with_new_key(created=2)
    assert added.primary_id == keyset.primary_id
    assert [k.status for k in added.keys] == [KeyStatus.ENABLED, KeyStatus.ENABLED]
    assert added.keys[-1].created == 2
    assert added.with_primary(added.keys[-1].id).primary_id == added.keys[-1].id


def test_only_an_enabled_key_can_be_promoted() -> None:
    life = Lifecycle()
    with pytest.raises(ValueError):
        life.states["disabled"].with_primary(life.a)
    with pytest.raises(ValueError):
        life.states["destroyed"].with_primary(life.a)


@pytest.mark.parametrize("step", ["disable", "destroy"])
def test_the_primary_can_never_be_disabled_or_destroyed(step: str) -> None:
    keyset = Keyset.generate(created=1).with_new_primary(created=2)
    with pytest.raises(ValueError):
        if step == "disable":
            keyset.with_status(keyset.primary_id, KeyStatus.DISABLED)
        else:
            keyset.with_destroyed(keyset.primary_id)


def test_only_a_disabled_key_can_be_destroyed() -> None:
    life = Lifecycle()
    with pytest.raises(ValueError, match="disabled"):
        life.states["promoted"].with_destroyed(life.a)
    with pytest.raises(ValueError):
        life.states["destroyed"].with_destroyed(life.a)


def test_a_disabled_key_can_be_enabled_again_but_a_destroyed_one_cannot() -> None:
    life = Lifecycle()
    again = life.states["disabled"].with_status(life.a, KeyStatus.ENABLED)
    assert again.key(life.a).status is KeyStatus.ENABLED
    assert opens(again, life.under_a)
    with pytest.raises(ValueError):
        life.states["destroyed"].with_status(life.a, KeyStatus.ENABLED)
    with pytest.raises(ValueError):
        life.states["disabled"].with_status(life.a, KeyStatus.DESTROYED)


def test_unknown_key_ids_are_a_key_error() -> None:
    keyset = Keyset.generate(created=1)
    unknown = keyset.primary_id ^ 1
    for step in (
        lambda: keyset.with_status(unknown, KeyStatus.DISABLED),
        lambda: keyset.with_destroyed(unknown),
        lambda: keyset.with_primary(unknown),
    ):
        with pytest.raises(KeyError):
            step()


def test_destroyed_key_keeps_its_id_and_counts_but_no_material() -> None:
    life = Lifecycle()
    disabled = life.states["disabled"]
    material = disabled.key(life.a).material
    destroyed = life.states["destroyed"]
    key = destroyed.key(life.a)
    assert (key.status, key.material, key.created, key.uses) == (KeyStatus.DESTROYED, b"", 1, 0)
    data = destroyed.to_bytes()
    for form in (material, material.hex().encode(), base64.b64encode(material)):
        assert form not in data
    assert json.loads(data)["keys"][0] == {
        "created": 1,
        "id": life.a,
        "material": "",
        "status": "destroyed",
        "uses": 0,
    }
    assert Keyset.from_bytes(data) == destroyed


def test_every_lifecycle_step_is_copy_on_write() -> None:
    life = Lifecycle()
    before = {state: keyset.to_bytes() for state, keyset in life.states.items()}
    life.states["promoted"].with_status(life.a, KeyStatus.DISABLED)
    life.states["disabled"].with_destroyed(life.a)
    life.states["added"].with_primary(life.b)
    life.states["generated"].with_new_key(created=9)
    assert {state: keyset.to_bytes() for state, keyset in life.states.items()} == before


# ---- rotation policy -----------------------------------------------------------------------------


def test_policy_rotates_the_primary_at_a_lowered_use_count() -> None:
    policy = RotationPolicy(max_uses=4)
    keyset = Keyset.generate(created=1).with_uses(3)
    assert keyset.with_rotation_if_due(created=2, policy=policy) is keyset
    worn = keyset.with_uses(1)
    fresh = worn.with_rotation_if_due(created=2, policy=policy)
    assert fresh.primary_id != worn.primary_id
    assert fresh.key(worn.primary_id).status is KeyStatus.ENABLED


def test_policy_rotates_the_primary_at_its_maximum_age() -> None:
    policy = RotationPolicy(max_age_seconds=100)
    keyset = Keyset.generate(created=1_000)
    assert keyset.with_rotation_if_due(created=1_099, policy=policy) is keyset
    fresh = keyset.with_rotation_if_due(created=1_100, policy=policy)
    assert fresh.primary_id != keyset.primary_id
    assert fresh.primary.created == 1_100


def test_default_policy_is_the_hard_limit_and_no_age_limit() -> None:
    policy = RotationPolicy()
    assert (policy.max_uses, policy.max_age_seconds) == (ROTATE_AFTER_USES, None)
    old = Keyset.generate(created=0)
    assert old.with_rotation_if_due(created=10**9, policy=policy) is old


@pytest.mark.parametrize(
    "fields",
    [{"max_uses": 0}, {"max_uses": ROTATE_AFTER_USES + 1}, {"max_uses": True}, {"max_age_seconds": 0}],
    ids=["no-uses", "above-the-hard-limit", "bool", "zero-age"],
)
def test_policy_refuses_unsafe_or_meaningless_limits(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RotationPolicy(**fields)


def test_policy_bytes_round_trip_canonically() -> None:
    policy = RotationPolicy(max_uses=1000, max_age_seconds=86_400)
    data = policy.to_bytes()
    assert data == b'{"format":1,"max_age_seconds":86400,"max_uses":1000}'
    assert RotationPolicy.from_bytes(data) == policy
    assert RotationPolicy.from_bytes(RotationPolicy().to_bytes()) == RotationPolicy()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"format":2,"max_age_seconds":null,"max_uses":5}',
        b'{"format":1,"max_uses":5}',
        b'{"format":1,"max_age_seconds":null,"max_uses":"5"}',
        b'{"format":1,"max_age_seconds":null,"max_uses":0}',
        b'{"format":1,"max_age_seconds":null,"max_uses":4294967296}',
        b'{"format":1,"max_age_seconds":1.5,"max_uses":5}',
    ],
    ids=["empty", "array", "format", "missing-field", "string", "zero", "above-limit", "float-age"],
)
def test_malformed_policy_bytes_fail_integrity_check(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        RotationPolicy.from_bytes(data)
