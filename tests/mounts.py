"""A tmpfs of a test's own (mounting needs root, as CI runs): a small disk to fill, or a place to
remount read-only. Where it cannot be mounted the test is skipped, saying why, and fails under CI."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (tmpfs's spelling: 256k, 4m) mounted at `mount_point` (made here, mode
    0700), unmounted when the block ends."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root"
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs (runs as root): {reason}")
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def remount_read_only(mount_point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
