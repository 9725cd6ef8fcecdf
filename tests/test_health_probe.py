"""Health that follows the store and the audit log (service/health_probe.py): a real grpc
HealthServicer, and a probe that the test makes fail, hang and answer again, as a database that is
down, frozen, or back would; and a real service whose audit log's lock another process holds.
The PostgreSQL variant with a frozen cluster is in test_service_postgres.py."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secrets_manager.crypto import kdf
from secrets_manager.service.health_probe import StoreHealth
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import PASSWORD, in_process_server, make_pki, make_store, tls_files

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


def test_an_audit_log_that_fails_is_not_serving_until_it_can_be_written_again(store: Store) -> None:
    """The audit check: every call writes an audit record and is refused if it cannot, so a log
    that cannot be written is a service that cannot serve. Fails on the old code (no audit check)."""
    servicer = health.HealthServicer()
    audit = Store()
    seen: list[tuple[str, bool]] = []
    for name in NAMES:
        servicer.set(name, SERVING)
    probe = StoreHealth(
        servicer,
        NAMES,
        store.read,
        audit_probe=audit.read,
        on_check=lambda check, ok: seen.append((check, ok)),
        interval=0.05,
        timeout=0.3,
    )
    probe.start()
    try:
        assert seen == [("store", True), ("audit", True)]
        audit.failing = True
        wait_for(lambda: all(status(servicer, name) == NOT_SERVING for name in NAMES))
        assert seen[-1] == ("audit", False)
        audit.failing = False
        wait_for(lambda: all(status(servicer, name) == SERVING for name in NAMES))
        assert seen[-1] == ("audit", True)
    finally:
        probe.stop()


def test_a_request_refused_by_the_audit_log_fails_the_check_for_the_hold_time(store: Store) -> None:
    """A full disk: the empty append of the probe succeeds, a request's record does not. The
    refusal fails the audit check at once, and for `refusal_hold` after the last one."""
    servicer = health.HealthServicer()
    servicer.set("", SERVING)
    probe = StoreHealth(servicer, [""], store.read, audit_probe=lambda: None, interval=0.05, refusal_hold=0.5)
    probe.start()
    try:
        time.sleep(0.1)
        refused_at = time.monotonic()
        probe.audit_refused()
        assert status(servicer, "") == NOT_SERVING  # at once, not at the next probe
        wait_for(lambda: status(servicer, "") == SERVING)
        assert time.monotonic() - refused_at >= 0.5
    finally:
        probe.stop()


def test_serve_is_not_serving_while_its_audit_log_cannot_be_written(tmp_path: Path) -> None:
    """The real service: another process holds the audit log's lock (a stuck writer), so every
    request would wait out the log's timeout and be refused. Health goes NOT_SERVING and
    `secrets_manager_health_check_ok{check="audit"}` 0, a refused request counts in
    `secrets_manager_audit_failures_total`; once the lock is let go, SERVING again without a
    restart. Fails on the old code (SERVING throughout, no such metrics)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with in_process_server(tmp_path, store, watch_tick=30, audit_timeout=0.5) as (running, stub):
            registry = running.metrics.registry

            def check(name: str) -> float | None:
                value: float | None = registry.get_sample_value(
                    "secrets_manager_health_check_ok", {"check": name}
                )
                return value

            health_stub = health_pb2_grpc.HealthStub(
                grpc.secure_channel(f"127.0.0.1:{running.port}", tls_files(tmp_path, "ops").credentials())
            )

            def remote_status() -> int:
                reply = health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                return int(reply.status)

            stub("ops").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
            assert remote_status() == SERVING and check("audit") == 1 and check("store") == 1
            lock = os.open(tmp_path / "in-process.audit.jsonl.lock", os.O_RDWR)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with pytest.raises(grpc.RpcError) as refused:
                    stub("ops").PutSecret(pb.PutSecretRequest(name="auth/NEW", value=b"v"), timeout=10)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                assert registry.get_sample_value("secrets_manager_audit_failures_total") >= 1
                wait_for(lambda: remote_status() == NOT_SERVING)
                assert check("audit") == 0 and check("store") == 1
            finally:
                os.close(lock)  # lets the lock go
            wait_for(lambda: remote_status() == SERVING, seconds=20)
            assert check("audit") == 1
            stub("ops").PutSecret(pb.PutSecretRequest(name="auth/NEW", value=b"v"), timeout=10)
    finally:
        store.close()


def test_each_probe_is_timed_so_a_slow_store_shows_before_it_fails(store: Store) -> None:
    """A store that answers in 0.1 s instead of 1 ms is slow, not down: health stays SERVING and
    only request latency showed it, and only under traffic. Each probe's duration now goes to
    secrets_manager_health_check_seconds{check}. Fails on the old code (no on_probe, no metric)."""
    from secrets_manager.service.metrics import Metrics

    metrics = Metrics(None)
    servicer = health.HealthServicer()
    servicer.set("", SERVING)

    def slow_read() -> None:
        time.sleep(0.1)

    probe = StoreHealth(
        servicer, [""], slow_read, audit_probe=lambda: None, on_probe=metrics.observe_probe, interval=0.05
    )
    probe.start()
    try:

        def count(check: str) -> float:
            value = metrics.registry.get_sample_value(
                "secrets_manager_health_check_seconds_count", {"check": check}
            )
            return float(value or 0)

        wait_for(lambda: count("store") >= 2 and count("audit") >= 2)
        slow = metrics.registry.get_sample_value(
            "secrets_manager_health_check_seconds_bucket", {"check": "store", "le": "0.05"}
        )
        assert slow == 0  # every store probe took longer than 50 ms
        assert status(servicer, "") == SERVING
    finally:
        probe.stop()
        metrics.close()
