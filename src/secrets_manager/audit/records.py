"""One audit record: its fields, its one canonical JSON line, and its hash (docs/audit.md).

A record's `hash` is SHA-256 over its canonical JSON without `hash` and `mac`, and includes `prev`,
the previous record's hash: editing, removing or reordering any record breaks the chain. `mac` is
HMAC-SHA256 of `hash` under the store's audit key, so a chain cannot be rebuilt by someone who can
edit the file but cannot unlock the store.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secrets_manager.audit.errors import RESTORE_HINT, AuditTamperError
from secrets_manager.crypto.mac import record_mac_ok, sha256_hex

GENESIS_HASH = "0" * 64
# The operation of the record that moves the log to a newer audit key (`audit rotate-key`, or a
# writer recording a rotation it found made): MAC'd under the key in force before it, its
# `version` names the new key's generation; every authenticated record after it is under that key.
KEY_ROTATION = "audit.rotate_key"


class _RandomIds:
    """Random (version 4) UUIDs cut from a buffer of os.urandom bytes: one system call per 256
    ids instead of one per id, and every request takes one. A forked child starts a new buffer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def __call__(self) -> str:
        with self._lock:
            if self._at >= len(self._buffer):
                self._buffer, self._at = os.urandom(4096), 0
            raw = self._buffer[self._at : self._at + 16]
            self._at += 16
        return str(uuid.UUID(bytes=raw, version=4))

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer, self._at = b"", 0


new_request_id = _RandomIds()


@dataclass
class AuditEvent:
    """The facts of one operation. Never a value: at most its `hmac-sha256:` fingerprint."""

    operation: str
    actor: str
    source: str = "cli"
    peer: str | None = None
    name: str | None = None
    version: int | None = None
    decision: str = "allow"
    outcome: str = "ok"
    value_hmac: str | None = None
    request_id: str = field(default_factory=new_request_id)
    # The serial of the client certificate a service request came with (its refusal included, and
    # the steps of a RotateSecret); the CLI's and the service's own records have no such key.
    certificate_serial: str | None = None
    # `audit prune` names where the chain now begins: {"seq": first record kept, "prev": its prev}.
    pruned_before: dict[str, Any] | None = None
    # The service's summary of an identity's throttled requests (operation `throttled`): how many,
    # by method, first and last; no other record has this key.
    throttled: dict[str, Any] | None = None
    # `serve` (ok) and `policy.reload`: the SHA-256 of the access policy file in force from then on
    # (access/policy.py's Policy.digest); no other record has this key.
    policy_sha256: str | None = None
    # `serve.stop` (a graceful stop): the signal, the requests in flight then, how long they took
    # to end and how many the grace period cut (service/server.py's Drained); no other record.
    stopped: dict[str, Any] | None = None

    def as_record(self) -> dict[str, Any]:
        """The record's fields from this event (the optional ones only where set)."""
        found = dict(vars(self))
        for optional in ("certificate_serial", "pruned_before", "throttled", "policy_sha256", "stopped"):
            if found[optional] is None:
                del found[optional]
        return found


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a record without its `hash` and `mac`."""
    body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
    return sha256_hex(canonical(body))


# The canonical line of a record is its body's canonical JSON with "hash" and "mac" in their sorted
# places. Every other field sorts before "hash" or after "mac", so they go in just before the first
# field after "mac" — found by its key, which cannot occur inside a JSON string (quotes are escaped).
# (tests/test_audit.py checks the result is byte for byte what encoding the whole record gives.)
_SPLICE_AT = b',"' + min(k for k in AuditEvent.__dataclass_fields__ if k > "mac").encode() + b'":'


# `key_id` (a record under a rotated audit key) is the one field that sorts between the two.
_KEY_ID_AT = b',"key_id":'


def with_hash_and_mac(body: bytes, hash_: str, mac: str | None) -> bytes:
    """The record's canonical line, from the canonical JSON of its body (the one encoding)."""
    at = body.index(_SPLICE_AT)
    hashed = f',"hash":"{hash_}"'.encode()
    signed = (',"mac":' + ("null" if mac is None else f'"{mac}"')).encode()
    key_at = body.find(_KEY_ID_AT, 0, at)
    if key_at < 0:
        return body[:at] + hashed + signed + body[at:] + b"\n"
    return body[:key_at] + hashed + body[key_at:at] + signed + body[at:] + b"\n"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(doc: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(doc).encode("utf-8")


# How every record's line begins (canonical JSON, keys sorted: "actor" is the first field).
RECORD_START = b'{"actor":"'


def parse_line(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deep
        record = None
    if not isinstance(record, dict):
        raise AuditTamperError(
            f"audit log {path.name} line {number} is not an audit record (damaged or forged): {RESTORE_HINT}"
        )
    return record


def chained(record: dict[str, Any], path: Path, number: int) -> dict[str, Any]:
    """`record` if it has the chain's fields an append reads (an integer seq, a text hash);
    AuditTamperError otherwise, so a forged or damaged line is reported, not a crash."""
    if type(record.get("seq")) is not int or not isinstance(record.get("hash"), str):
        raise AuditTamperError(f"{path.name} line {number} is not an audit record (damaged or forged)")
    return record


def may_be_unauthenticated(record: dict[str, Any]) -> bool:
    """Only a failed unlock is written without the audit key (the writer could not unlock)."""
    return record.get("operation") == "unlock" and record.get("decision") == "deny"


def key_generation(record: dict[str, Any]) -> int | None:
    """The generation of the audit key a record's MAC is under (`key_id`; absent: 1, the store's
    first key); None if the field is not a positive integer (damaged or forged)."""
    found = record.get("key_id", 1)
    return found if type(found) is int and found >= 1 else None


def generation_after(record: dict[str, Any]) -> int | None:
    """The generation of the audit key in force after an authenticated record: the one its
    `version` names if it is a completed key rotation, else its own; None for a record without
    a MAC (a denied unlock says nothing about the key) or with a damaged `key_id`."""
    if record.get("mac") is None:
        return None
    if record.get("operation") == KEY_ROTATION and record.get("outcome") == "ok":
        named = record.get("version")
        return named if type(named) is int and named >= 1 else None
    return key_generation(record)


def record_verifies(record: dict[str, Any], keys: Sequence[bytes]) -> bool:
    """Whether one record's hash matches its body and its MAC is right under the audit key it
    names (`keys`: the store's, oldest first), or it may have none."""
    try:
        if record_hash(record) != record.get("hash"):
            return False
    except (TypeError, ValueError, RecursionError):  # not JSON the chain could have written
        return False
    mac = record.get("mac")
    if mac is None:
        return may_be_unauthenticated(record)
    generation = key_generation(record)
    if generation is None or generation > len(keys):
        return False
    return isinstance(mac, str) and record_mac_ok(keys[generation - 1], str(record["hash"]), mac)
