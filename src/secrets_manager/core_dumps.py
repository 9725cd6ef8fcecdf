"""Keep the master password and decrypted keys out of core dumps.

A process that unlocked a store holds its master password (or root key) and decrypted values in
memory; a core dump (a crash, `kill -SEGV`, `gcore`) would write them to disk in the clear, where
whoever can read core files (often more people than can read the store) finds them. Vault's
production hardening disables core dumps for the same reason. Two switches, both for this process
only (nothing is changed on the host):

- RLIMIT_CORE's soft limit 0, in every environment: no core file where the kernel writes core
  files itself. It is inherited by the programs we start (`run`'s program, a rotation's commands),
  which hold secrets too; they may raise it again up to the hard limit, which is left alone.
- PR_SET_DUMPABLE 0 outside development (Linux): no core dump even through a core_pattern pipe
  (systemd-coredump), and no ptrace by other processes of the same user. It is reset by exec, so
  programs we start are unaffected. Development keeps it, so a developer's own profiler or
  debugger can attach without root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import sys

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3


def keep_secrets_out_of_core_dumps(*, development: bool) -> None:
    """Turn core dumps of this process off (see the module docstring); best effort where the
    platform has no such switch."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    if not development and sys.platform == "linux":
        _prctl(PR_SET_DUMPABLE, 0)


def dumpable() -> bool | None:
    """Whether this process may dump core per PR_GET_DUMPABLE (None off Linux): for tests and `status`."""
    if sys.platform != "linux":
        return None
    return bool(_prctl(PR_GET_DUMPABLE, 0))


def _prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0))


__all__ = ["dumpable", "keep_secrets_out_of_core_dumps"]
