"""A clock for expiries that must count the time a machine spends asleep.

Python's monotonic clock stops while a laptop is closed or a VM is suspended: a key, a cached
value or a clipboard copy timed on it outlives its time by however long the machine slept.
Linux's CLOCK_BOOTTIME runs on through a suspend. Python names it from the headers it was built
with, and a kernel or sandbox may still refuse it (EINVAL), so it is tried once and the monotonic
clock used where it is refused.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable


@functools.cache
def awake_or_asleep_clock_id() -> int:
    """CLOCK_BOOTTIME where this kernel gives it, else CLOCK_MONOTONIC."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return time.CLOCK_MONOTONIC
    try:
        time.clock_gettime(clock)
    except OSError:
        return time.CLOCK_MONOTONIC
    return int(clock)


def awake_or_asleep_clock() -> Callable[[], float]:
    """Seconds on that clock, as a function as cheap to call as time.monotonic (a C partial: the
    SDK reads it on every cached read)."""
    return functools.partial(time.clock_gettime, awake_or_asleep_clock_id())
