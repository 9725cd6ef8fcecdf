"""Regenerate the backup test vectors of docs/backup-format.md, section 12.

    /tmp/venv/bin/python tests/vectors/backup/generate.py

Every input is fixed (keys, key ids, nonces, salts, passwords, times), so the output is
byte-for-byte reproducible. Each good file is built twice: from the document with `struct`,
`hashlib` and `AESGCM` (below), and through the library's writer (`store.backup._write_file` with
the same file key and nonces, fed by its own line encoders); the script stops if they differ. Bad
files are good ones edited, or content that breaks a rule sealed properly with the spec encoder.
`tests/test_backup_vectors.py` replays the committed JSON and never runs this script.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secrets_manager.crypto.kdf import KdfParams, derive_unlock_key
from secrets_manager.store import backup as library

OUT = Path(__file__).resolve().parent
VERSION_LINE = b"secrets-manager-backup/v1\n"
CHUNK = 65536
SEALED_CHUNK = 12 + CHUNK + 16

MASTER_PASSWORD = "correct horse battery staple \u00e9"  # the store's (kind store)
BACKUP_PASSWORD = "off-site backup password \u00fc"  # kind password
WRONG_PASSWORD = "not the password"
ROOT_ID, ROOT_KEY = 0x524F4F54, bytes(range(0x40, 0x60))
SVC_ID, SVC_KEY = 0x01020304, bytes(range(32))
DEFAULT_ID, DEFAULT_KEY = 0xA1B2C3D4, bytes(range(0x20, 0x40))
FILE_KEY = bytes(range(0x80, 0xA0))
FILE_KEY_ID = 0x46494C45
AUDIT_KEY = bytes(range(0xA0, 0xC0))
MASTER_SALT = bytes.fromhex("73616c742d73616c742d73616c742d21")
BACKUP_SALT = bytes.fromhex("6261636b75702d73616c742d73616c74")
TEST_KDF = {"algorithm": "argon2id", "memory_cost_kib": 1024, "parallelism": 1, "time_cost": 1, "version": 19}
CREATED = 1_700_000_000
TAKEN = 1_700_086_400


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Nonces:
    """A distinct fixed nonce per encryption: 8 bytes of 0x5a ‖ counter (4 bytes, big-endian)."""

    def __init__(self, start: int) -> None:
        self.counter = start

    def __next__(self) -> bytes:
        self.counter += 1
        return b"\x5a" * 8 + struct.pack(">I", self.counter)

    def __iter__(self) -> Iterator[bytes]:
        return self


# ---- the format, written from docs/format.md §5 and docs/backup-format.md (not from the library) ----


def record(
    material: bytes, key_id: int, purpose: int, name: str, version: int, plaintext: bytes, nonce: bytes
) -> bytes:
    ad = b"secrets-manager\x00" + struct.pack(">BBIQ", purpose, 1, key_id, version) + name.encode()
    return struct.pack(">BI", 1, key_id) + nonce + AESGCM(material).encrypt(nonce, plaintext, ad)


def password_section(password: str, salt: bytes, key_id: int, key: bytes, nonce: bytes) -> dict[str, Any]:
    kdf = {**TEST_KDF, "salt": b64(salt)}
    params = KdfParams(time_cost=1, memory_cost_kib=1024, parallelism=1, salt=salt)
    unlock_key = derive_unlock_key(password.encode("utf-8"), params)
    wrapped = record(unlock_key, key_id, 4, canonical(kdf).decode(), 0, key, nonce)
    return {"kdf": kdf, "kind": "password", "wrapped_root_key": b64(wrapped)}


def seal_payload(prefix: bytes, payload: bytes, nonces: Iterator[bytes]) -> bytes:
    """docs/backup-format.md §6: 64 KiB chunks, AD = label ‖ SHA-256(prefix) ‖ index ‖ final."""
    context = hashlib.sha256(prefix).digest()
    pieces = [payload[i : i + CHUNK] for i in range(0, len(payload), CHUNK)]
    sealed = []
    for index, piece in enumerate(pieces):
        ad = b"secrets-manager-backup\x00" + context + struct.pack(">QB", index, index == len(pieces) - 1)
        nonce = next(nonces)
        sealed.append(nonce + AESGCM(FILE_KEY).encrypt(nonce, piece, ad))
    return b"".join(sealed)


def spec_file(
    header: dict[str, Any], lines: list[dict[str, Any]], nonce_start: int, version: int = 1
) -> bytes:
    prefix = b"secrets-manager-backup/v%d\n" % version + canonical(header) + b"\n"
    payload = b"".join(canonical(line) + b"\n" for line in lines)
    return prefix + seal_payload(prefix, payload, Nonces(nonce_start))


def library_file(header: dict[str, Any], lines: Iterator[bytes], nonce_start: int, version: int = 1) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backup"
        library._write_file(
            path,
            library._dump(header),
            lines,
            FILE_KEY,
            replace=False,
            nonces=Nonces(nonce_start),
            version=version,
        )
        return path.read_bytes()


# ---- the content: one store, two namespaces -------------------------------------------------------

BINARY = bytes(range(256))
SECRETS: list[dict[str, Any]] = [
    {
        "name": "svc/api-key",
        "created": 1700000000.25,
        "updated": 1700000300.5,
        "created_by": "alice",
        "description": "exchange key",
        "tags": {"owner": "trading"},
        "max_versions": 10,
        "next_version": 4,
        "deleted": None,
        "labels": {"current": 3, "previous": 2},
        "versions": [
            (1, 1700000000.25, "alice", None),
            (2, 1700000100.0, "alice", b"sk-live-OLD-VALUE-1d2c"),
            (3, 1700000300.5, "bob", b"sk-live-CURRENT-VALUE-8f3a"),
        ],
    },
    {
        "name": "svc/binary",
        "created": 1700000400.0,
        "updated": 1700000400.0,
        "created_by": "alice",
        "description": "",
        "tags": {},
        "max_versions": 10,
        "next_version": 2,
        "deleted": None,
        "labels": {"current": 1},
        "versions": [(1, 1700000400.0, "alice", BINARY)],
    },
    {
        "name": "svc/empty",
        "created": 1700000500.0,
        "updated": 1700000500.0,
        "created_by": "carol",
        "description": "",
        "tags": {},
        "max_versions": 3,
        "next_version": 2,
        "deleted": None,
        "labels": {"current": 1},
        "versions": [(1, 1700000500.0, "carol", b"")],
    },
    {
        "name": "z-deleted",
        "created": 1700000600.0,
        "updated": 1700000600.0,
        "created_by": "dave",
        "description": "old",
        "tags": {},
        "max_versions": 10,
        "next_version": 2,
        "deleted": 1700000700.75,
        "labels": {"current": 1},
        "versions": [(1, 1700000600.0, "dave", b"db-password-DELETED-77e1")],
    },
]


def metadata_json(secret: dict[str, Any]) -> bytes:
    """format.md §7."""
    return canonical(
        {
            "created": secret["created"],
            "created_by": secret["created_by"],
            "deleted": secret["deleted"],
            "description": secret["description"],
            "labels": secret["labels"],
            "max_versions": secret["max_versions"],
            "next_version": secret["next_version"],
            "tags": secret["tags"],
            "updated": secret["updated"],
            "versions": {
                str(n): {"created": t, "created_by": who, "destroyed": value is None}
                for n, t, who, value in secret["versions"]
            },
        }
    )


def keyset_json(key_id: int, material: bytes) -> bytes:
    key = {"created": CREATED, "id": key_id, "material": b64(material), "status": "enabled", "uses": 9}
    return canonical({"format": 1, "keys": [key], "primary": key_id})


def store_entries(nonces: Nonces) -> list[tuple[str, bytes]]:
    keys = {"svc": (SVC_ID, SVC_KEY), "default": (DEFAULT_ID, DEFAULT_KEY)}
    entries = {
        "core/audit-key": record(ROOT_KEY, ROOT_ID, 5, "core/audit-key", 0, AUDIT_KEY, next(nonces)),
        "core/key-policy": record(
            ROOT_KEY,
            ROOT_ID,
            7,
            "core/key-policy",
            0,
            canonical({"format": 1, "max_age_seconds": None, "max_uses": 1000}),
            next(nonces),
        ),
    }
    for namespace, (key_id, material) in keys.items():
        plaintext = keyset_json(key_id, material)
        entries[f"core/keyset/{namespace}"] = record(
            ROOT_KEY, ROOT_ID, 3, namespace, 0, plaintext, next(nonces)
        )
    for secret in SECRETS:
        name = secret["name"]
        key_id, material = keys["svc" if name.startswith("svc/") else "default"]
        entries[f"meta/{name}"] = record(material, key_id, 2, name, 0, metadata_json(secret), next(nonces))
        for number, _, _, value in secret["versions"]:
            if value is not None:
                entries[f"data/{name}#{number}"] = record(
                    material, key_id, 1, name, number, value, next(nonces)
                )
    return sorted(entries.items())


def store_header(nonces: Nonces) -> dict[str, Any]:
    section = password_section(MASTER_PASSWORD, MASTER_SALT, ROOT_ID, ROOT_KEY, next(nonces))
    return {"created": CREATED, "format": 1, "root_key_id": ROOT_ID, "unlock": section}


# A rotation under way: the current version has an expiry (version 2's member), the pending one
# the PostgreSQL role it was staged for (version 3's).
ROTATING: dict[str, Any] = {
    "name": "db/app",
    "created": 1700001000.0,
    "updated": 1700001100.5,
    "created_by": "alice",
    "description": "",
    "tags": {},
    "max_versions": 10,
    "next_version": 3,
    "deleted": None,
    "labels": {"current": 1, "pending": 2},
    "versions": [
        (1, 1700001000.0, "alice", b"db-password-CURRENT-41c0", {"expires": 1800000000.0}),
        (2, 1700001100.5, "rotation-schedule", b"db-password-PENDING-9b7e", {"target": "postgres-role:app"}),
    ],
}
EXPIRING: dict[str, Any] = {**ROTATING, "labels": {"current": 1}, "versions": ROTATING["versions"][:1]}


def entry_lines(entries: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = [{"key": k, "type": "entry", "value": b64(v)} for k, v in entries]
    return [*lines, {"entries": len(entries), "type": "end"}]


# A version is (number, created, created_by, value) or, with the members of versions 2 and 3,
# (number, created, created_by, value, {"expires": …, "target": …}).


def secret_line(secret: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "secret",
        **{k: v for k, v in secret.items() if k != "versions"},
        "versions": [
            {
                "version": n,
                "created": t,
                "created_by": who,
                "destroyed": value is None,
                "value": None if value is None else b64(value),
                **(extra[0] if extra else {}),
            }
            for n, t, who, value, *extra in secret["versions"]
        ],
    }


def secret_lines(secrets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept = sum(1 for s in secrets for *_, value in s["versions"] if value is not None)
    return [*(secret_line(s) for s in secrets), {"secrets": len(secrets), "type": "end", "versions": kept}]


def library_secrets(secrets: list[dict[str, Any]]) -> list[library.BackupSecret]:
    return [
        library.BackupSecret(
            name=s["name"],
            created=s["created"],
            updated=s["updated"],
            created_by=s["created_by"],
            description=s["description"],
            tags=s["tags"],
            max_versions=s["max_versions"],
            next_version=s["next_version"],
            deleted=s["deleted"],
            labels=s["labels"],
            versions=tuple(
                library.BackupVersion(
                    n,
                    t,
                    who,
                    value is None,
                    value,
                    (extra[0] if extra else {}).get("expires"),
                    (extra[0] if extra else {}).get("target"),
                )
                for n, t, who, value, *extra in s["versions"]
            ),
        )
        for s in secrets
    ]


def _no_progress(_what: str, _done: int, _total: int) -> None:
    pass


# ---- files ------------------------------------------------------------------------------------------


def store_kind_file(
    edit_entries: Any = None, file_key_name: str = "backup/file-key", sealed_file_key: bytes = FILE_KEY
) -> tuple[bytes, dict[str, Any]]:
    nonces = Nonces(0)
    header = {
        "created": TAKEN,
        "file_key": b64(record(ROOT_KEY, ROOT_ID, 8, file_key_name, 0, sealed_file_key, next(nonces))),
        "kind": "store",
        "store_header": store_header(nonces),
    }
    entries = store_entries(nonces)
    lines = entry_lines(entries)
    if edit_entries is not None:
        return spec_file(header, edit_entries(lines), 1000), header
    data = spec_file(header, lines, 1000)
    if library_file(header, library._entry_lines(entries, _no_progress), 1000) != data:
        sys.exit("the library's writer disagrees with docs/backup-format.md (kind store)")
    return data, header


def password_kind_file(
    secrets: list[dict[str, Any]], edit_lines: Any = None, nonce_start: int = 2000, version: int = 1
) -> tuple[bytes, dict[str, Any]]:
    section = password_section(BACKUP_PASSWORD, BACKUP_SALT, FILE_KEY_ID, FILE_KEY, next(Nonces(nonce_start)))
    header = {"created": TAKEN, "kind": "password", "unlock": section}
    lines = secret_lines(secrets)
    if edit_lines is not None:
        return spec_file(header, edit_lines(lines), nonce_start + 1, version), header
    data = spec_file(header, lines, nonce_start + 1, version)
    if library._version_needed(header, library_secrets(secrets)) != version:
        sys.exit(f"the library would write these secrets as another version than {version}")
    encoded = library._secret_lines(library_secrets(secrets), _no_progress)
    if library_file(header, encoded, nonce_start + 1, version) != data:
        sys.exit("the library's writer disagrees with docs/backup-format.md (kind password)")
    return data, header


def expected(secrets: list[dict[str, Any]], kind: str, entries: int | None) -> dict[str, Any]:
    return {
        "summary": {
            "kind": kind,
            "secrets": len(secrets),
            "deleted": sum(1 for s in secrets if s["deleted"] is not None),
            "versions": sum(1 for s in secrets for *_, value in s["versions"] if value is not None),
            "entries": entries,
        },
        "secrets": [
            {
                "name": s["name"],
                "deleted": s["deleted"] is not None,
                "labels": s["labels"],
                "versions": [
                    {
                        "version": n,
                        "destroyed": value is None,
                        "value": None if value is None else b64(value),
                        **(extra[0] if extra else {}),
                    }
                    for n, _, _, value, *extra in s["versions"]
                ],
            }
            for s in secrets
        ],
    }


def big_secrets(sizes: list[int]) -> list[dict[str, Any]]:
    return [
        {
            **SECRETS[1],
            "name": f"svc/big-{i}",
            "versions": [(1, 1700000400.0, "alice", bytes((j * 7 + i) % 256 for j in range(size)))],
        }
        for i, size in enumerate(sizes)
    ]


def exactly_one_chunk() -> list[dict[str, Any]]:
    """One secret whose description pads the payload to exactly 65 536 bytes."""
    secret = {**SECRETS[1], "name": "svc/padded", "description": ""}
    size = len(b"".join(canonical(line) + b"\n" for line in secret_lines([secret])))
    return [{**secret, "description": "x" * (CHUNK - size)}]


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def prefix_length(data: bytes) -> int:
    return data.index(b"\n", len(VERSION_LINE)) + 1


def vector(description: str, expect: str, data: bytes, password: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "expect": expect, "password": password, "file": b64(data), **extra}


def build() -> dict[str, dict[str, Any]]:
    store_file, store_hdr = store_kind_file()
    pw_file, pw_hdr = password_kind_file(SECRETS)
    empty_file, _ = password_kind_file([], nonce_start=3000)
    two = big_secrets([25_000, 25_000])
    two_file, _ = password_kind_file(two, nonce_start=4000)
    full = exactly_one_chunk()
    full_file, _ = password_kind_file(full, nonce_start=5000)
    expiring_file, _ = password_kind_file([EXPIRING], nonce_start=6000, version=2)
    rotating_file, _ = password_kind_file([ROTATING], nonce_start=7000, version=3)
    assert len(two_file) > prefix_length(two_file) + SEALED_CHUNK, "the two-chunk vector has one chunk"
    assert len(full_file) == prefix_length(full_file) + SEALED_CHUNK, (
        "the full-chunk vector is not one full chunk"
    )

    s_end = prefix_length(store_file)
    t_end = prefix_length(two_file)
    t_prefix, t_first, t_second = (
        two_file[:t_end],
        two_file[t_end : t_end + SEALED_CHUNK],
        two_file[t_end + SEALED_CHUNK :],
    )
    store_entry_count = len(store_entries(Nonces(0)))

    def reheader(header: dict[str, Any], data: bytes, new_header: bytes) -> bytes:
        return VERSION_LINE + new_header + b"\n" + data[prefix_length(data) :]

    def secret_edit(field: str, value: Any, index: int = 0) -> Any:
        def edit(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
            lines = [dict(line) for line in lines]
            lines[index][field] = value
            return lines

        return edit

    destroyed_with_value = secret_line(SECRETS[0])
    destroyed_with_value["versions"] = [dict(v) for v in destroyed_with_value["versions"]]
    destroyed_with_value["versions"][0]["value"] = b64(b"resurrected")
    oversize = {**SECRETS[1], "name": "svc/huge", "versions": [(1, 1700000400.0, "alice", b"\x00" * 65537)]}
    empty_target = {
        **ROTATING,
        "versions": [ROTATING["versions"][0], (*ROTATING["versions"][1][:4], {"target": ""})],
    }
    newer_store = dict(store_hdr, store_header=dict(store_hdr["store_header"], format=2))

    ok = "ok"
    bad = "integrity_error"
    return {
        # good
        "good_store_copy": vector(
            "kind store: two namespaces, a destroyed version, an empty and a binary value, a deleted "
            "secret, the audit key and a key policy; opens with the store's master password",
            ok,
            store_file,
            MASTER_PASSWORD,
            **expected(SECRETS, "store", store_entry_count),
        ),
        "good_password": vector(
            "kind password: the same secrets in logical form under a backup password",
            ok,
            pw_file,
            BACKUP_PASSWORD,
            **expected(SECRETS, "password", None),
        ),
        "good_password_v2_expiry": vector(
            "kind password, version 2: a version with its expiry",
            ok,
            expiring_file,
            BACKUP_PASSWORD,
            **expected([EXPIRING], "password", None),
        ),
        "good_password_v3_target": vector(
            "kind password, version 3: a pending version with the rotation target it was staged for, "
            "beside a current one with its expiry",
            ok,
            rotating_file,
            BACKUP_PASSWORD,
            **expected([ROTATING], "password", None),
        ),
        "good_password_empty_store": vector(
            "kind password of a store with no secret: only the end line",
            ok,
            empty_file,
            BACKUP_PASSWORD,
            **expected([], "password", None),
        ),
        "good_password_two_chunks": vector(
            "a payload of two chunks (a full one, then a shorter final one)",
            ok,
            two_file,
            BACKUP_PASSWORD,
            **expected(two, "password", None),
        ),
        "good_password_one_full_chunk": vector(
            "a payload of exactly 65536 bytes: the final chunk is a full one",
            ok,
            full_file,
            BACKUP_PASSWORD,
            **expected(full, "password", None),
        ),
        # damaged: the container
        "bad_flipped_payload_byte": vector(
            "one bit flipped in the middle of the sealed payload",
            bad,
            flip(store_file, s_end + (len(store_file) - s_end) // 2),
            MASTER_PASSWORD,
        ),
        "bad_flipped_tag_byte": vector(
            "one bit flipped in the last tag", bad, flip(store_file, len(store_file) - 1), MASTER_PASSWORD
        ),
        "bad_flipped_header_byte": vector(
            "the header's creation time edited (still canonical JSON): the chunks no longer authenticate",
            bad,
            store_file.replace(b'"created":%d' % TAKEN, b'"created":%d' % (TAKEN + 1), 1),
            MASTER_PASSWORD,
        ),
        "bad_truncated_by_one_byte": vector("the last byte cut off", bad, store_file[:-1], MASTER_PASSWORD),
        "bad_truncated_after_header": vector(
            "no chunk after the header", bad, store_file[:s_end], MASTER_PASSWORD
        ),
        "bad_truncated_at_chunk_boundary": vector(
            "a two-chunk file cut after its first (full) chunk, which was not sealed as final",
            bad,
            t_prefix + t_first,
            BACKUP_PASSWORD,
        ),
        "bad_appended_byte": vector("one byte appended", bad, store_file + b"\x00", MASTER_PASSWORD),
        "bad_appended_chunk": vector(
            "a copy of the first chunk appended to a two-chunk file", bad, two_file + t_first, BACKUP_PASSWORD
        ),
        "bad_chunks_swapped": vector(
            "the two chunks of a two-chunk file in the other order",
            bad,
            t_prefix + t_second + t_first,
            BACKUP_PASSWORD,
        ),
        "bad_not_a_backup": vector(
            "an SQLite database file (a store given for its backup)",
            "not_a_backup",
            b"SQLite format 3\x00" + bytes(84),
            MASTER_PASSWORD,
        ),
        "bad_version_line_v0": vector(
            "version line v0",
            bad,
            b"secrets-manager-backup/v0\n" + store_file[len(VERSION_LINE) :],
            MASTER_PASSWORD,
        ),
        "bad_version_line_v01": vector(
            "version line v01 (leading zero)",
            bad,
            b"secrets-manager-backup/v01\n" + store_file[len(VERSION_LINE) :],
            MASTER_PASSWORD,
        ),
        "bad_header_not_canonical": vector(
            "a space in the header JSON",
            bad,
            reheader(store_hdr, store_file, canonical(store_hdr).replace(b'"kind":', b'"kind": ')),
            MASTER_PASSWORD,
        ),
        "bad_header_extra_field": vector(
            "a header field version 1 does not have",
            bad,
            reheader(store_hdr, store_file, canonical({**store_hdr, "comment": "hi"})),
            MASTER_PASSWORD,
        ),
        "bad_header_unknown_kind": vector(
            "kind 'cloud'",
            bad,
            reheader(pw_hdr, pw_file, canonical({**pw_hdr, "kind": "cloud"})),
            BACKUP_PASSWORD,
        ),
        "bad_file_key_other_name": vector(
            "the file key sealed under the root key for another name",
            bad,
            store_kind_file(edit_entries=lambda lines: lines, file_key_name="backup/other")[0],
            MASTER_PASSWORD,
        ),
        "bad_file_key_16_bytes": vector(
            "the file key sealed under the root key is 16 bytes (an AES-128 key), not 32",
            bad,
            store_kind_file(edit_entries=lambda lines: lines, sealed_file_key=FILE_KEY[:16])[0],
            MASTER_PASSWORD,
        ),
        # damaged: the content (sealed properly)
        "bad_end_line_missing": vector(
            "no end line", bad, password_kind_file(SECRETS, lambda lines: lines[:-1])[0], BACKUP_PASSWORD
        ),
        "bad_end_count_wrong": vector(
            "the end line counts one secret too many",
            bad,
            password_kind_file(SECRETS, secret_edit("secrets", len(SECRETS) + 1, index=-1))[0],
            BACKUP_PASSWORD,
        ),
        "bad_entries_out_of_order": vector(
            "two entries in the wrong order",
            bad,
            store_kind_file(edit_entries=lambda lines: [lines[1], lines[0], *lines[2:]])[0],
            MASTER_PASSWORD,
        ),
        "bad_entries_end_count_wrong": vector(
            "the end line of a store copy counts one entry too many",
            bad,
            store_kind_file(edit_entries=lambda lines: [*lines[:-1], {"entries": len(lines), "type": "end"}])[
                0
            ],
            MASTER_PASSWORD,
        ),
        "bad_entries_line_after_end": vector(
            "an entry of a store copy after its end line (the first entry again)",
            bad,
            store_kind_file(edit_entries=lambda lines: [*lines, lines[0]])[0],
            MASTER_PASSWORD,
        ),
        "bad_entries_label_on_missing_version": vector(
            "a store copy whose metadata of svc/binary (sealed properly) labels current a version it lacks",
            bad,
            store_kind_file(
                edit_entries=with_metadata(SECRETS[1], lambda doc: {**doc, "labels": {"current": 2}})
            )[0],
            MASTER_PASSWORD,
        ),
        "bad_entries_value_without_metadata": vector(
            "a store copy with a value entry (data/svc/orphan#1) of a secret it has no metadata for",
            bad,
            store_kind_file(edit_entries=with_entry("data/svc/orphan#1"))[0],
            MASTER_PASSWORD,
        ),
        "bad_entries_value_digest_mismatch": vector(
            "a store copy whose metadata of svc/binary gives version 1 the SHA-256 of another value "
            "(a namesake's record, same name, version and key, in its place)",
            bad,
            store_kind_file(
                edit_entries=with_metadata(
                    SECRETS[1], with_value_digest(hashlib.sha256(b"another value").hexdigest(), "1")
                )
            )[0],
            MASTER_PASSWORD,
        ),
        "good_store_copy_value_digest": vector(
            "a store copy whose metadata of svc/binary gives version 1 its value's SHA-256",
            "ok",
            store_kind_file(
                edit_entries=with_metadata(
                    SECRETS[1], with_value_digest(hashlib.sha256(BINARY).hexdigest(), "1")
                )
            )[0],
            MASTER_PASSWORD,
            **expected(SECRETS, "store", store_entry_count),
        ),
        "bad_unknown_storage_key": vector(
            "an entry outside the store layout (other/unknown)",
            bad,
            store_kind_file(edit_entries=with_entry("other/unknown"))[0],
            MASTER_PASSWORD,
        ),
        "bad_store_record_fails_tag": vector(
            "a value record with one bit flipped, in an otherwise intact file",
            bad,
            store_kind_file(
                edit_entries=lambda lines: [
                    {**line, "value": b64(flip(base64.b64decode(line["value"]), 20))}
                    if line.get("key") == "data/svc/api-key#3"
                    else line
                    for line in lines
                ]
            )[0],
            MASTER_PASSWORD,
        ),
        "bad_kept_version_without_value": vector(
            "the metadata lists version 2 of svc/api-key, its value entry is missing",
            bad,
            store_kind_file(
                edit_entries=lambda lines: [
                    *(line for line in lines[:-1] if line["key"] != "data/svc/api-key#2"),
                    {"entries": len(lines) - 2, "type": "end"},
                ]
            )[0],
            MASTER_PASSWORD,
        ),
        "bad_label_on_missing_version": vector(
            "current names version 9, which the secret does not have",
            bad,
            password_kind_file(SECRETS, secret_edit("labels", {"current": 9}))[0],
            BACKUP_PASSWORD,
        ),
        "bad_value_on_destroyed_version": vector(
            "a destroyed version carries a value",
            bad,
            password_kind_file(SECRETS, lambda lines: [destroyed_with_value, *lines[1:]])[0],
            BACKUP_PASSWORD,
        ),
        "bad_value_over_64_kib": vector(
            "a value of 65537 bytes",
            bad,
            password_kind_file(
                [oversize],
                lambda lines: [secret_line(oversize), {"secrets": 1, "type": "end", "versions": 1}],
            )[0],
            BACKUP_PASSWORD,
        ),
        "bad_target_in_version_2": vector(
            "a version with a rotation target in a version-2 file (targets came in version 3)",
            bad,
            password_kind_file([ROTATING], lambda lines: lines, nonce_start=8000, version=2)[0],
            BACKUP_PASSWORD,
        ),
        "bad_target_empty": vector(
            "a version whose rotation target is empty text",
            bad,
            password_kind_file(
                [ROTATING],
                lambda lines: [secret_line(empty_target), *lines[1:]],
                nonce_start=9000,
                version=3,
            )[0],
            BACKUP_PASSWORD,
        ),
        "bad_invalid_name": vector(
            "a name with a space",
            bad,
            password_kind_file(SECRETS, secret_edit("name", "svc/api key"))[0],
            BACKUP_PASSWORD,
        ),
        # wrong password
        "wrong_password_store_copy": vector(
            "kind store opened with another password", "unlock_error", store_file, WRONG_PASSWORD
        ),
        "wrong_password_password": vector(
            "kind password opened with another password", "unlock_error", pw_file, WRONG_PASSWORD
        ),
        # a newer format
        "newer_version_v4": vector(
            "version line v4: written by a newer secrets-manager (v2 adds expiries, v3 rotation targets)",
            "unsupported_version",
            b"secrets-manager-backup/v4\n" + store_file[len(VERSION_LINE) :],
            MASTER_PASSWORD,
        ),
        "newer_store_format": vector(
            "kind store holding a store of format 2",
            "unsupported_version",
            reheader(store_hdr, store_file, canonical(newer_store)),
            MASTER_PASSWORD,
        ),
        "newer_core_entry": vector(
            "kind store holding a core/ entry this version does not know (a newer one wrote it)",
            "unsupported_version",
            store_kind_file(edit_entries=with_entry("core/unknown"))[0],
            MASTER_PASSWORD,
        ),
    }


def with_entry(key: str) -> Any:
    """An entry-lines edit adding an empty entry `key` in its place, the end count one more."""
    return lambda lines: [
        *sorted([*lines[:-1], {"key": key, "type": "entry", "value": ""}], key=lambda line: line["key"]),
        {"entries": len(lines), "type": "end"},
    ]


def with_metadata(secret: dict[str, Any], edit: Any) -> Any:
    """An entry-lines edit putting `secret`'s metadata document, changed by `edit`, sealed as the
    writer seals it, in place of its own (a distinct nonce: the 0x5a counter from 9000)."""
    name = secret["name"]
    key_id, material = (SVC_ID, SVC_KEY) if name.startswith("svc/") else (DEFAULT_ID, DEFAULT_KEY)
    document = canonical(edit(json.loads(metadata_json(secret))))
    sealed = record(material, key_id, 2, name, 0, document, next(Nonces(9000)))
    return lambda lines: [
        {**line, "value": b64(sealed)} if line.get("key") == f"meta/{name}" else line for line in lines
    ]


def with_value_digest(digest: str, version: str) -> Any:
    """A metadata edit giving `version` the value digest (format.md 7) `digest`."""
    return lambda doc: {
        **doc,
        "versions": {**doc["versions"], version: {**doc["versions"][version], "sha256": digest}},
    }


def main() -> None:
    vectors = build()
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, doc in vectors.items():
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
