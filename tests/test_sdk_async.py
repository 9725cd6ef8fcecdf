"""`get_credentials()` and `AsyncClient` under asyncio, against a real `secrets-manager serve`:
many concurrent tasks are served, and the event loop never waits on the network."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from secrets_manager import AsyncClient, Credentials, get_credentials
from secrets_manager.client import Client, _async, _default, close_default_client, remote
from secrets_manager.errors import AccessDeniedError, InvalidInputError, StorageError
from service_fixtures import SEED, Server, SilentListener, client_environ, make_pki, make_store, start_server

AUTH = {name: value for name, value in SEED.items() if name.startswith("auth/")}


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
def auth_environment(server: Server, service_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for variable, value in client_environ(service_dir, "auth", [server.address]).items():
        monkeypatch.setenv(variable, value)
    yield
    close_default_client()


def revealed(creds: Credentials) -> dict[str, bytes]:
    return {name: value.reveal() for name, value in creds.items()}


async def ticking(stop: asyncio.Event, period: float = 0.01) -> list[float]:
    """The loop's heartbeat: when each `sleep(period)` actually came back."""
    beats = [time.monotonic()]
    while not stop.is_set():
        await asyncio.sleep(period)
        beats.append(time.monotonic())
    return beats


def test_many_concurrent_tasks_get_the_callers_credentials(auth_environment: None) -> None:
    async def main() -> list[Credentials]:
        return await asyncio.gather(*(get_credentials() for _ in range(200)))

    results = asyncio.run(main())
    assert len(results) == 200 and all(revealed(creds) == AUTH for creds in results)


def test_the_event_loop_keeps_ticking_while_a_slow_call_is_in_flight(
    server: Server, service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first address hangs and, given a head start as long as the timeout, is waited for.
    monkeypatch.setattr(remote, "HEAD_START_SECONDS", 1.0)
    silent = SilentListener()
    client = AsyncClient(
        environ=client_environ(service_dir, "auth", [silent.address, server.address]), timeout=1.0
    )

    async def main() -> tuple[list[float], float, list[Credentials]]:
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticking(stop))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        results = await asyncio.gather(*(client.credentials() for _ in range(100)))
        slow = time.monotonic() - started
        await asyncio.sleep(0.05)
        stop.set()
        return await ticker, slow, results

    try:
        beats, slow, results = asyncio.run(main())
    finally:
        asyncio.run(client.close())
        silent.close()
    assert slow >= 0.9, "the call was meant to be slow (the hanging address's 1 s timeout)"
    assert all(revealed(creds) == AUTH for creds in results)
    # A loop that waited on the network would stall for about the hanging address's 1 s. On a
    # loaded machine the loop's thread also waits for the CPU and for the SDK's threads (the GIL):
    # CI-like load gave a third of the ideal 100 ticks a second (half was asked for), so the
    # bounds are a fifth of them, and no stall past a quarter of the network's wait.
    gaps = [later - earlier for earlier, later in itertools.pairwise(beats)]
    assert len(beats) >= slow / 0.01 / 5, (len(beats), slow)
    assert max(gaps) < 0.25, f"the loop stalled for {max(gaps) * 1000:.0f} ms"


def test_concurrent_calls_to_a_hung_service_each_end_at_its_timeout(service_dir: Path) -> None:
    """They run on the SDK's own threads: in the event loop's default executor (min(32, CPUs + 4)
    workers) they queued behind each other, 20 calls on 2 CPUs ending after 4 timeouts."""
    silent = SilentListener()
    client = AsyncClient(environ=client_environ(service_dir, "auth", [silent.address]), timeout=1.0)

    async def main() -> tuple[float, list[Any]]:
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.describe(f"auth/NAME_{i}") for i in range(20)), return_exceptions=True
        )
        return time.monotonic() - started, results

    try:
        elapsed, results = asyncio.run(main())
    finally:
        asyncio.run(client.close())
        silent.close()
    assert all(isinstance(result, StorageError) for result in results), results
    assert elapsed < 2.5, f"20 calls with a 1 s timeout took {elapsed:.1f} s"


def test_cached_reads_are_answered_in_the_loop_without_a_thread(
    server: Server, service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = AsyncClient(environ=client_environ(service_dir, "auth", [server.address]))
    threads_started = 0
    to_thread = _async._in_thread

    async def counting_to_thread(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        nonlocal threads_started
        threads_started += 1
        return await to_thread(function, *args, **kwargs)

    async def main() -> None:
        await client.credentials()
        await client.get("auth/JWT_KEY")
        monkeypatch.setattr(_async, "_in_thread", counting_to_thread)
        for _ in range(1000):
            await client.credentials()
            await client.get("auth/JWT_KEY")
        monkeypatch.undo()

    try:
        asyncio.run(main())
    finally:
        asyncio.run(client.close())
    assert threads_started == 0


def test_the_process_wide_client_survives_a_new_event_loop(auth_environment: None) -> None:
    first = asyncio.run(get_credentials())
    second = asyncio.run(get_credentials("auth"))
    assert revealed(first) == AUTH
    assert revealed(second) == {"DB_PASSWORD": AUTH["auth/DB_PASSWORD"], "JWT_KEY": AUTH["auth/JWT_KEY"]}


def test_aclose_default_client_leaves_the_event_loop_running(
    service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close_default_client() waits for the client's threads (a call in flight ends within the
    timeout); called in a coroutine it stalled the loop for that long. Its awaitable form waits
    in a worker thread."""
    silent = SilentListener()  # the first read's watcher waits for its health check's timeout
    for variable, value in client_environ(service_dir, "auth", [silent.address]).items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("SECRETS_MANAGER_TIMEOUT", "1")

    async def main() -> tuple[float, list[float]]:
        reading = asyncio.create_task(get_credentials())
        await asyncio.sleep(0.2)
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticking(stop))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await _default.aclose_default_client()
        closing = time.monotonic() - started
        stop.set()
        beats = await ticker
        await asyncio.gather(reading, return_exceptions=True)  # it fails: its client was closed
        return closing, beats

    try:
        closing, beats = asyncio.run(main())
    finally:
        close_default_client()
        silent.close()
    assert closing >= 0.3, "the close was meant to wait for the watcher's hung health check"
    gaps = [later - earlier for earlier, later in itertools.pairwise(beats)]
    assert max(gaps) < 0.25, f"the loop stalled for {max(gaps) * 1000:.0f} ms during the close"
    assert _default._default_client is None and _default._default_async_client is None


def test_a_close_racing_the_first_get_credentials_leaves_no_closed_client_behind(
    service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close_default_client() landing between the making of the process-wide client and of its
    asyncio face left that face wrapping the closed client: every later get_credentials() said
    'this secrets-manager client is closed' until the default client was closed again."""
    for variable, value in client_environ(service_dir, "auth", ["127.0.0.1:9"]).items():
        monkeypatch.setenv(variable, value)  # nothing is contacted: no read is made
    make_face = _default.AsyncClient
    closers: list[threading.Thread] = []

    def face_with_a_close_racing_it(client: Client) -> AsyncClient:
        # The close starts once the process-wide client exists and the face is being made; it
        # is given time to finish before the face is: it may only if nothing holds it off.
        closer = threading.Thread(target=close_default_client)
        closers.append(closer)
        closer.start()
        closer.join(timeout=0.5)
        return make_face(client=client)

    monkeypatch.setattr(_default, "AsyncClient", face_with_a_close_racing_it)
    try:
        first = _default._default_async()
        for closer in closers:
            closer.join(timeout=10)
        assert closers and not any(closer.is_alive() for closer in closers)
        monkeypatch.setattr(_default, "AsyncClient", make_face)
        after_the_close = _default._default_async()
        assert after_the_close is not first  # the close took the first away ...
        assert not after_the_close.sync._closed.is_set()  # ... and the next call made a live one
    finally:
        close_default_client()


def test_async_client_gets_versions_describes_and_reports_denials(server: Server, service_dir: Path) -> None:
    async def main() -> None:
        async with AsyncClient(environ=client_environ(service_dir, "writer", [server.address])) as client:
            assert await client.put("auth/JWT_KEY", b"async-put-SEEKRIT") == 2
            assert (await client.get("auth/JWT_KEY")).value.reveal() == b"async-put-SEEKRIT"
            assert (await client.get("auth/JWT_KEY", version=1)).value.reveal() == AUTH["auth/JWT_KEY"]
            assert (await client.describe("auth/JWT_KEY")).current_version == 2
            assert [m.name for m in await client.list("auth/")] == sorted(AUTH)
            with pytest.raises(AccessDeniedError):
                await client.get("market-connector/BINANCE_API_KEY")
            assert not client.stale

    asyncio.run(main())


def test_a_closed_client_answers_no_read_not_even_from_its_cache(server: Server, service_dir: Path) -> None:
    """After close() (or leaving `async with`) a read that the cache could answer was answered until
    the TTL (300 s by default), though no watcher kept the values fresh any more: a rotated
    credential was handed out as current. Now every read raises at once, as a closed file does."""

    async def main() -> AsyncClient:
        async with AsyncClient(environ=client_environ(service_dir, "auth", [server.address])) as client:
            assert revealed(await client.credentials()) == AUTH
            assert (await client.get("auth/JWT_KEY")).value.reveal() == AUTH["auth/JWT_KEY"]
        for read in (client.credentials(), client.credentials("auth"), client.get("auth/JWT_KEY")):
            started = time.monotonic()
            with pytest.raises(InvalidInputError, match="client is closed: it serves nothing, cached values"):
                await read
            assert time.monotonic() - started < 0.5
        return client

    client = asyncio.run(main()).sync
    for sync_read in (client.credentials, lambda: client.get("auth/DB_PASSWORD")):
        with pytest.raises(InvalidInputError, match="client is closed") as error:
            sync_read()
        assert "SEEKRIT" not in str(error.value) and "\n" not in str(error.value)


def test_reads_cancelled_while_pending_leave_no_task_flight_or_debug_warning(
    service_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reads cancelled (wait_for) against a stopped replica, in asyncio's debug mode: they share one
    worker call, which ends at its own timeout after the loop has gone, leaving no task, no entry
    in the client's flights, no asyncio warning (a task destroyed pending, an exception never
    retrieved, a callback on a closed loop) and no thread of the client once it is closed."""
    server = start_server(service_dir)
    server.process.send_signal(signal.SIGSTOP)
    caplog.set_level(logging.WARNING)
    client = AsyncClient(environ=client_environ(service_dir, "auth", [server.address]), timeout=1.0)
    try:

        async def cancelled_reads() -> list[asyncio.Task[Any]]:
            # debug mode also warns of any step over 0.1 s, as one was at a load of 20-40 on two
            # cores in CI: a slow machine, not a leak, which is what this test is about
            asyncio.get_running_loop().slow_callback_duration = 60.0
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.credentials(), 0.2)
            assert len(client._in_flight) == 1  # the three shared one call
            return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            left = asyncio.run(cancelled_reads(), debug=True)
            time.sleep(1.0 + 2.0)  # past the call's timeout: it lands after its loop closed
            gc.collect()
        assert all(task.done() for task in left) and client._in_flight == {}
        assert not [w for w in warned if "secrets_manager" in str(w.filename) or "asyncio" in str(w.filename)]
        assert not [r for r in caplog.records if r.name == "asyncio"]
    finally:
        server.process.send_signal(signal.SIGCONT)
        asyncio.run(client.close())
        server.kill()
    assert not [
        t for t in threading.enumerate() if t.name in ("secrets-manager-watch", "secrets-manager-refresh")
    ]
