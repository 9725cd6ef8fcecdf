"""A tmpfs of a test's own (mounting needs root, as CI runs): a small disk to fill, or a place to
remount read-only; a process with no writable temporary directory. Where it cannot be mounted the
test is skipped, saying why, and fails under CI."""

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


def without_writable_temporary_directory(writable: Path) -> list[str]:
    """A command prefix: the command after it runs in a mount namespace of its own where /tmp and
    /var/tmp are read-only, and so its working directory (/tmp), as in a container whose root file
    system is read-only and that mounts no /tmp: Python's tempfile finds no directory to use. Only
    `writable` (a test's tmp_path, under /tmp or not) is left writable."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        reason = f"cannot make a mount namespace here ({probe.stderr.decode().strip()}): needs root"
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to make a mount namespace (runs as root): {reason}")
        pytest.skip(reason)
    script = (
        'mount --bind /tmp /tmp && mount --bind "$0" "$0" && mount -o remount,ro,bind /tmp'
        " && mount --bind /var/tmp /var/tmp && mount -o remount,ro,bind /var/tmp"
        ' && cd /tmp && exec "$@"'
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(writable)]
