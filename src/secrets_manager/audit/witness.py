"""The head of an audit log, for a witness off the host (docs/audit.md §7a).

Nothing on the host can tell a store and its log rolled back together from their real history.
`audit head` prints one line naming the log's newest record (its seq, time and hash) with a MAC
under the audit key, to be shipped where the host cannot rewrite it (as CloudTrail's digest files
go to S3); `audit verify --witness` then fails when the log no longer holds that exact record.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secrets_manager.crypto.mac import head_mac, head_mac_ok
from secrets_manager.errors import InvalidInputError

HEAD_PREFIX = "secrets-manager-audit-head/1"
_HEAD = re.compile(
    re.escape(HEAD_PREFIX)
    + r" seq=([1-9][0-9]{0,17}) time=(\S{1,64}) hash=([0-9a-f]{64}) mac=([0-9a-f]{64})(?!\S)"
)
_TIME = re.compile(r"[0-9][0-9:T.+-]{0,40}")
_WITNESS_FILE_TAIL = 1 << 20  # a witness file is read from its last MiB: its newest heads


@dataclass(frozen=True)
class Head:
    """The newest record of a log as a witness keeps it: seq, time, hash, and the MAC over them."""

    seq: int
    time: str
    hash: str
    mac: str

    @property
    def signed(self) -> str:
        return f"{HEAD_PREFIX} seq={self.seq} time={self.time} hash={self.hash}"

    @property
    def line(self) -> str:
        return f"{self.signed} mac={self.mac}"

    def authentic(self, key: bytes) -> bool:
        """Whether this head was made with `key` (this store's audit key) and not edited since."""
        return head_mac_ok(key, self.signed, self.mac)


def head_of(key: bytes, record: dict[str, Any]) -> Head:
    """The head naming `record` (a record the caller verified), its MAC under `key`."""
    time = record.get("time")
    shown = time if isinstance(time, str) and _TIME.fullmatch(time) else "unknown"
    unsigned = Head(seq=int(record["seq"]), time=shown, hash=str(record["hash"]), mac="")
    return Head(unsigned.seq, unsigned.time, unsigned.hash, head_mac(key, unsigned.signed))


def parse_head(text: str, *, source: str = "--witness") -> Head:
    """The head in one line (a syslog prefix before it is fine); InvalidInputError otherwise."""
    found = _HEAD.search(text)
    if found is None:
        raise InvalidInputError(
            f"{source} does not hold a whole audit head ('{HEAD_PREFIX} seq=N time=T hash=H mac=M', "
            "as 'secrets-manager audit head' prints it): give the line as it was shipped"
        )
    seq, time, hash_, mac = found.groups()
    return Head(int(seq), time, hash_, mac)


def read_witness(argument: str) -> Head:
    """`--witness HEAD_OR_FILE`: a head line itself, or a file whose last head line counts (a file
    cron appends heads to, or a syslog file: other lines are passed over)."""
    if HEAD_PREFIX in argument:
        return parse_head(argument)
    path = Path(argument)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidInputError(
            f"--witness {argument}: {exc.strerror or exc}: give a head line as 'secrets-manager audit head' "
            "printed it, or a file holding such lines"
        ) from None
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        os.close(fd)
        raise InvalidInputError(f"--witness {argument} is not a regular file: give a head line or a file")
    with os.fdopen(fd, "rb") as handle:
        size = found.st_size
        handle.seek(max(0, size - _WITNESS_FILE_TAIL))
        tail = handle.read(_WITNESS_FILE_TAIL).decode("utf-8", errors="replace")
    lines = [line for line in tail.splitlines() if HEAD_PREFIX in line]
    if not lines:
        raise InvalidInputError(
            f"--witness {argument} holds no audit head ('{HEAD_PREFIX} …' lines, as "
            "'secrets-manager audit head' prints them)"
        )
    return parse_head(lines[-1], source=f"the last head line of {argument}")
