"""A client-side deadline on a database connection's wait for its server's answer.

libpq waits for an answer for as long as the connection stays open: a server process that was
stopped (SIGSTOP, a frozen VM) while its kernel still acknowledges our packets, a proxy or firewall
that swallows the replies, or a network path that went away mid-statement leave it waiting for
ever. TCP keepalives and libpq's `tcp_user_timeout` do not end such a wait (the peer's kernel still
acknowledges, or nothing is in flight). So a deadline of our own: when it passes, the connection's
socket is shut down (through a duplicate descriptor, so libpq's own stays valid), which ends
libpq's wait with an error; the connection is then broken and is not used again.

One daemon thread per process serves every armed deadline (armed and disarmed around each wait,
so a wait costs no thread of its own). No database driver is imported here: the connection only
needs `pgconn.socket` (psycopg's), so the rotators above may use this without loading psycopg
before a rotation needs it.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from typing import Any


class Armed:
    """One armed deadline: `disarm` it once the answer came; `expired` says whether it passed
    first (the connection's socket was then shut down)."""

    __slots__ = ("_watchdog", "cancelled", "connection", "expired", "seconds", "when")

    def __init__(self, watchdog: Watchdog, connection: Any, seconds: float, when: float) -> None:
        self._watchdog = watchdog
        self.connection = connection
        self.seconds = seconds
        self.when = when
        self.cancelled = False
        self.expired = False

    def disarm(self) -> None:
        """No shutdown happens after this returns (one in progress has finished)."""
        self._watchdog._disarm(self)


class Watchdog:
    """Shuts down a connection's socket when the deadline armed on it passes."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Armed]] = []
        self._cancelled = 0  # disarmed deadlines still in the heap
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the thread wakes next, unless notified

    def arm(self, connection: Any, seconds: float) -> Armed:
        """A deadline `seconds` from now on `connection` (anything with `pgconn.socket`)."""
        if self._pid != os.getpid():  # a forked child: the parent's thread is not here
            self._reset()
        armed = Armed(self, connection, seconds, time.monotonic() + seconds)
        with self._cond:
            heapq.heappush(self._heap, (armed.when, next(self._order), armed))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="answer-deadline", daemon=True)
                self._thread.start()
            elif armed.when < self._wake_at:  # sooner than what the thread sleeps towards
                self._wake_at = armed.when
                self._cond.notify()
        return armed

    def _disarm(self, armed: Armed) -> None:
        with self._cond:
            if armed.cancelled or armed.expired:
                return
            armed.cancelled = True
            armed.connection = None
            self._cancelled += 1
            # Most waits end long before their deadline: drop them in bulk rather than let a busy
            # process's heap grow with a deadline's worth of finished waits.
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                if not self._heap:
                    self._wake_at = float("inf")
                    cond.wait()
                    continue
                self._wake_at = self._heap[0][0]
                delay = self._wake_at - time.monotonic()
                if delay > 0:
                    cond.wait(delay)
                    continue
                _, _, armed = heapq.heappop(self._heap)
                armed.expired = True
                # Under the lock: once `disarm` returns, no shutdown can still come.
                shut_down(armed.connection)
                armed.connection = None


WATCHDOG = Watchdog()


def shut_down(connection: Any) -> None:
    """End `connection` under its driver's feet: its socket, shut down through a duplicate
    descriptor, so a wait on it returns an error instead of blocking for good."""
    try:
        duplicate = socket.socket(fileno=os.dup(connection.pgconn.socket))
    except Exception:  # closed meanwhile: its wait has ended
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()
