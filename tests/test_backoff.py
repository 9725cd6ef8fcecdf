"""The shared compare-and-set retry backoff."""

from __future__ import annotations

import time

import pytest

from secrets_manager.errors import StorageError
from secrets_manager.store.backoff import Backoff


def test_backoff_sleeps_at_most_the_capped_delay() -> None:
    backoff = Backoff(first=0.001, cap=0.004, deadline_seconds=10, what="'x'")
    started = time.monotonic()
    for _ in range(10):
        backoff.wait()
    assert time.monotonic() - started < 10 * 0.004 + 0.5


def test_backoff_gives_up_with_one_clear_error_after_the_deadline() -> None:
    backoff = Backoff(first=0.001, cap=0.001, deadline_seconds=0, what="'auth/DB'")
    time.sleep(0.01)
    with pytest.raises(StorageError, match="too many concurrent writes to 'auth/DB'; try again"):
        backoff.wait()
