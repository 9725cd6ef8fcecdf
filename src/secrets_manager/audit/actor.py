"""Who a local process acts as, for the audit log's `actor` field (docs/audit.md §2)."""

from __future__ import annotations

import os
import pwd


def local_actor() -> str:
    """The name of the effective user id, as the system's user database gives it; `uid:N` where
    it has none, or where its name is not UTF-8 text (a canonical audit line cannot hold it).

    Never the environment: LOGNAME, USER and friends (what getpass.getuser() reads first) are set
    by whoever starts the process, so they would let anyone record any name, or (a byte that is
    not UTF-8) make the record of a wrong password impossible to write."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # no entry for this uid (a container's arbitrary uid)
        return f"uid:{uid}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, decoded with surrogateescape
        return f"uid:{uid}"
    return name or f"uid:{uid}"
