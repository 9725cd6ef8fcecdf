"""`Client.on_change` / `AsyncClient.on_change`: the application hears of a changed secret after
its new value is cached (a real serve over mTLS, a writer changing secrets), by name and version,
never value; a failing callback is logged and the others still run; cancel() stops one."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secrets_manager.client import AsyncClient, Client, RemoteStore, SecretChanged
from secrets_manager.errors import InvalidInputError
from service_fixtures import Server, client_environ, make_pki, make_store, start_server, tls_files

Heard = queue.Queue[tuple[SecretChanged, bytes | None]]


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    make_pki(tmp_path)
    make_store(tmp_path)
    return tmp_path


@pytest.fixture
def server(service_dir: Path) -> Iterator[Server]:
    running = start_server(service_dir)
    yield running
    running.stop()


@pytest.fixture
def make_client(service_dir: Path, server: Server) -> Iterator[Callable[[str], Client]]:
    made: list[Client] = []

    def make(identity: str) -> Client:
        client = Client(environ=client_environ(service_dir, identity, [server.address]))
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def listening(client: Client, prefix: str = "") -> Heard:
    """Callbacks that note each change and the value the client serves when it is told."""
    heard: Heard = queue.Queue()

    def note(change: SecretChanged) -> None:
        heard.put((change, client.get(change.name).value.reveal() if change.version else None))

    client.on_change(note, prefix)
    return heard


def test_a_change_is_told_after_its_value_is_cached_and_first_reads_are_not(
    make_client: Callable[[str], Client], server: Server, service_dir: Path
) -> None:
    reader = make_client("auth")
    reader.credentials("auth")  # follows the namespace auth/: its changes, additions, removals
    heard = listening(reader, "auth/")
    time.sleep(1.0)  # the watch stream is up
    writer = make_client("writer")
    version = writer.put("auth/JWT_KEY", b"jwt-key-ROTATED")
    change, served = heard.get(timeout=10)
    assert (change, served) == (SecretChanged("auth/JWT_KEY", version, 1), b"jwt-key-ROTATED")
    assert "ROTATED" not in repr(change)
    writer.put("auth/NEW_TOKEN", b"new-token-SEEKRIT")
    assert heard.get(timeout=10) == (SecretChanged("auth/NEW_TOKEN", 1, None), b"new-token-SEEKRIT")
    ops = RemoteStore(server.address, tls_files(service_dir, "ops"))
    try:
        ops.delete("auth/NEW_TOKEN")
    finally:
        ops.close()
    assert heard.get(timeout=10) == (SecretChanged("auth/NEW_TOKEN", None, 1), None)
    time.sleep(0.5)
    assert heard.empty(), heard.get_nowait()  # nothing else: the first reads were not changes


def test_a_failing_callback_is_logged_the_others_run_and_cancel_stops_one(
    make_client: Callable[[str], Client], caplog: pytest.LogCaptureFixture
) -> None:
    reader = make_client("auth")
    reader.get("auth/DB_PASSWORD")  # followed by name
    calls: list[str] = []

    def failing(change: SecretChanged) -> None:
        raise RuntimeError("the application's own bug")

    reader.on_change(failing)
    stopped = reader.on_change(lambda change: calls.append(f"stopped {change.version}"))
    heard = listening(reader)
    time.sleep(1.0)
    writer = make_client("writer")
    with caplog.at_level(logging.ERROR, logger="secrets_manager.client"):
        writer.put("auth/DB_PASSWORD", b"db-password-ROTATED-1")
        assert heard.get(timeout=10)[0].version == 2
    assert calls == ["stopped 2"]
    assert any("on_change callback" in r.getMessage() and "failing" in r.getMessage() for r in caplog.records)
    stopped.cancel()
    writer.put("auth/DB_PASSWORD", b"db-password-ROTATED-2")
    assert heard.get(timeout=10)[0].version == 3
    assert calls == ["stopped 2"]


def test_async_callbacks_run_in_the_event_loop(
    service_dir: Path, server: Server, make_client: Callable[[str], Client]
) -> None:
    async def scenario() -> tuple[SecretChanged, bool, bytes]:
        client = AsyncClient(environ=client_environ(service_dir, "auth", [server.address]))
        loop_thread = threading.get_ident()
        told: asyncio.Queue[tuple[SecretChanged, bool, bytes]] = asyncio.Queue()

        async def on_change(change: SecretChanged) -> None:
            secret = await client.get(change.name)
            await told.put((change, threading.get_ident() == loop_thread, secret.value.reveal()))

        try:
            await client.credentials("auth")
            client.on_change(on_change, "auth/")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(make_client("writer").put, "auth/JWT_KEY", b"jwt-ASYNC-ROTATED")
            return await asyncio.wait_for(told.get(), timeout=10)
        finally:
            await client.close()

    change, in_loop_thread, value = asyncio.run(scenario())
    assert change.name == "auth/JWT_KEY" and change.previous_version == 1
    assert in_loop_thread and value == b"jwt-ASYNC-ROTATED"


def test_on_change_refuses_what_it_cannot_call(service_dir: Path) -> None:
    client = Client(environ=client_environ(service_dir, "auth", ["127.0.0.1:1"]))
    try:
        with pytest.raises(InvalidInputError, match="callable"):
            client.on_change("not a function")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="from a coroutine"):
            AsyncClient(client=client).on_change(lambda change: None)
    finally:
        client.close()
