"""Jittered exponential backoff with an overall deadline (a lost write race, a Vault failover).

Every store retries a lost write race the same way: sleep a random time up to the current delay
(full jitter, so racing writers spread out), double the delay up to a cap, and give up with one
clear StorageError once the deadline has passed.
"""

from __future__ import annotations

import random
import time

from secrets_manager.errors import StorageError


class Backoff:
    def __init__(self, *, first: float, cap: float, deadline_seconds: float, what: str) -> None:
        self._delay = first
        self._cap = cap
        self._deadline = time.monotonic() + deadline_seconds
        self._what = what

    def wait(self) -> None:
        """Sleep before the next attempt; StorageError once the deadline has passed."""
        if not self.pause():
            raise StorageError(f"too many concurrent writes to {self._what}; try again")

    def pause(self) -> bool:
        """Sleep before the next attempt and say True; False, without sleeping, once the deadline
        has passed (for a caller that gives up with the error it last had)."""
        if time.monotonic() > self._deadline:
            return False
        time.sleep(random.uniform(0, self._delay))  # noqa: S311 (jitter, not crypto)
        self._delay = min(self._delay * 2, self._cap)
        return True
