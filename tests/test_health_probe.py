"""Health that follows the store (service/health_probe.py): a real grpc HealthServicer, and a
probe that the test makes fail, hang and answer again, as a database that is down, frozen, or back
would. The PostgreSQL variant with a frozen cluster is in test_service_postgres.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from grpc_health.v1 import health, health_pb2

from secrets_manager.service.health_probe import StoreHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("secrets_manager.v1.Secrets", "")


class Store:
    """What the probe reads: answers, raises, or blocks until released."""

    def __init__(self) -> None:
        self.failing = False
        self.released = threading.Event()
        self.released.set()

    def read(self) -> None:
        self.released.wait()
        if self.failing:
            raise OSError("connection refused")


def status(servicer: health.HealthServicer, name: str) -> int:
    request = health_pb2.HealthCheckRequest(service=name)
    return int(servicer.Check(request, None).status)


def wait_for(condition: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the health status did not change in time"
        time.sleep(0.01)


@pytest.fixture
def store() -> Iterator[Store]:
    store = Store()
    yield store
    store.released.set()  # never leave a probe thread blocked


def started(servicer: health.HealthServicer, store: Store) -> StoreHealth:
    for name in NAMES:
        servicer.set(name, SERVING)
    probe = StoreHealth(servicer, NAMES, store.read, interval=0.05, timeout=0.3)
    probe.start()
    return probe


def test_a_store_that_fails_is_not_serving_until_it_answers_again(store: Store) -> None:
    servicer = health.HealthServicer()
    probe = started(servicer, store)
    try:
        time.sleep(0.2)
        assert all(status(servicer, name) == SERVING for name in NAMES)
        store.failing = True
        wait_for(lambda: all(status(servicer, name) == NOT_SERVING for name in NAMES))
        store.failing = False
        wait_for(lambda: all(status(servicer, name) == SERVING for name in NAMES))
    finally:
        probe.stop()


def test_a_store_that_hangs_is_not_serving_after_the_timeout(store: Store) -> None:
    servicer = health.HealthServicer()
    probe = started(servicer, store)
    try:
        store.released.clear()  # the next read blocks, as on a frozen database
        hung_at = time.monotonic()
        wait_for(lambda: status(servicer, "") == NOT_SERVING)
        assert time.monotonic() - hung_at >= 0.3  # not before the timeout
        store.released.set()
        wait_for(lambda: status(servicer, "") == SERVING)
    finally:
        probe.stop()


def test_a_graceful_shutdown_is_not_undone_by_a_store_that_answers(store: Store) -> None:
    servicer = health.HealthServicer()
    probe = started(servicer, store)
    try:
        store.failing = True
        wait_for(lambda: not probe.serving)
        servicer.enter_graceful_shutdown()
        store.failing = False
        wait_for(lambda: probe.serving)
        assert status(servicer, "") == NOT_SERVING
    finally:
        probe.stop()
