"""Per-identity limits (server.toml [limits]): a request rate and a cap on open Watch streams.

Each client certificate identity has a token bucket of `request_burst` tokens refilled at
`requests_per_second`; a request that finds it empty is throttled (the servicer answers
RESOURCE_EXHAUSTED and does not audit it on its own). The check is a dict lookup and some
arithmetic under one lock that is never held across I/O. Throttled requests are counted per
identity, client certificate (serial) and method until `drain` hands the counts to the periodic
summary record (docs/audit.md).
No store, no crypto, no gRPC here: the servicer (server.py) asks and answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from secrets_manager.errors import ResourceExhaustedError
from secrets_manager.service.config import Limits

# Buckets kept at most; past it, `drain` forgets the ones that are full (idle) again. A bucket
# that is full is exactly a new one, so forgetting it changes no answer.
MAX_IDLE_BUCKETS = 10_000


@dataclass
class Throttled:
    """The requests of one identity's certificate throttled since the last summary."""

    identity: str
    peer: str  # the peer of the last one
    # The serial of the client certificate they came with (upper-case hex), as every other record of
    # a request names it: a stolen certificate's throttled calls are told from the renewed one's.
    certificate_serial: str | None = None
    methods: dict[str, int] = field(default_factory=dict)
    first: float = 0.0  # wall-clock time of the first and the last
    last: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.methods.values())


class IdentityLimits:
    """The limits in force for every identity; `configure` swaps them (SIGHUP)."""

    def __init__(
        self,
        limits: Limits,
        watch_stream_limit: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # arithmetic and dict updates only: never held across I/O
        self._buckets: dict[str, list[float]] = {}  # identity -> [tokens, when last refilled]
        self._throttled: dict[tuple[str, str | None], Throttled] = {}  # by identity and serial
        self._watching: dict[str, int] = {}  # identity -> open Watch streams
        self._watch_stream_limit = watch_stream_limit
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """Take new limits; buckets keep their tokens, cut to a smaller burst."""
        with self._lock:
            self.limits = limits
            self._rate = limits.requests_per_second
            self._burst = float(limits.request_burst)
            self.watch_streams_per_identity = limits.watch_streams_of(self._watch_stream_limit)
            for bucket in self._buckets.values():
                bucket[0] = min(bucket[0], self._burst)

    def admit(self, identity: str, method: str, peer: str, serial: str | None = None) -> bool:
        """Take a token of `identity`'s bucket: False (throttled, counted under the identity and
        the certificate's `serial`) if there is none. The bucket is the identity's, whichever of its
        certificates asks."""
        rate = self._rate
        if rate == 0:
            return True
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(identity)
            if bucket is None:
                self._buckets[identity] = [self._burst - 1, now]
                return True
            tokens = min(self._burst, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
            if tokens >= 1:
                bucket[0] = tokens - 1
                return True
            bucket[0] = tokens
            seen = self._throttled.get((identity, serial))
            wall = self._wall_clock()
            if seen is None:
                seen = self._throttled[identity, serial] = Throttled(identity, peer, serial, first=wall)
            seen.peer, seen.last = peer, wall
            seen.methods[method] = seen.methods.get(method, 0) + 1
            return False

    def drain(self) -> list[Throttled]:
        """The throttled requests counted since the last drain, per identity and certificate (then
        forgotten);
        also forgets buckets that have filled up again once there are many."""
        with self._lock:
            throttled, self._throttled = list(self._throttled.values()), {}
            if len(self._buckets) > MAX_IDLE_BUCKETS:
                now = self._clock()
                self._buckets = {
                    identity: bucket
                    for identity, bucket in self._buckets.items()
                    if bucket[0] + (now - bucket[1]) * self._rate < self._burst
                }
        return throttled

    def open_watch(self, identity: str) -> WatchSlot:
        """Count a Watch stream of `identity`, until the slot returned is closed (or its `with`
        ends). ResourceExhaustedError if the identity holds `watch_streams_per_identity` already."""
        with self._lock:
            held = self._watching.get(identity, 0)
            if held >= self.watch_streams_per_identity:
                raise ResourceExhaustedError(
                    f"{identity} holds as many Watch streams as one identity may "
                    "(server.toml [limits] watch_streams_per_identity): close one (each SDK client "
                    "holds one), or ask the service's operator to raise the limit"
                )
            self._watching[identity] = held + 1
        return WatchSlot(self, identity)

    def _close_watch(self, identity: str) -> None:
        with self._lock:
            left = self._watching.get(identity, 1) - 1
            if left > 0:
                self._watching[identity] = left
            else:
                self._watching.pop(identity, None)

    def watch_streams(self, identity: str) -> int:
        """How many Watch streams `identity` holds now."""
        return self._watching.get(identity, 0)


class WatchSlot:
    """One Watch stream's place under its identity's cap; freed once, by `close` or the `with`."""

    def __init__(self, limits: IdentityLimits, identity: str) -> None:
        self._limits = limits
        self._identity = identity
        self._open = True
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
        self._limits._close_watch(self._identity)

    def __enter__(self) -> WatchSlot:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


THROTTLED_MESSAGE = (
    "the service is throttling requests from {identity}: it sent more than its per-identity rate "
    "allows (server.toml [limits]); nothing was done: retry later, with backoff"
)
