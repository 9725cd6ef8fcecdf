"""`AsyncClient`, the asyncio face of a `Client`: a cached read is answered in the event loop
without waiting; anything that may wait on the network or the disk runs in a thread of the SDK's
own pool, with concurrent misses for one key sharing one thread (see client/_client.py's doc)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial, wraps
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from secrets_manager.client._client import Client, _closed_error
from secrets_manager.client._credentials import Credentials, drop_tracebacks
from secrets_manager.client._notify import SecretChanged, Subscription
from secrets_manager.client.remote import TlsFiles, checked_text
from secrets_manager.errors import InvalidInputError
from secrets_manager.store import Secret, SecretMetadata
from secrets_manager.store.names import validate_namespace
from secrets_manager.values import SecretValue

log = logging.getLogger("secrets_manager.client")

T = TypeVar("T")
P = ParamSpec("P")


def _frames_withheld_async(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """`_frames_withheld` for a coroutine method (AsyncClient's: not `get` and `credentials`,
    whose hits are answered in the loop and whose misses run Client's, which trims them)."""

    @wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            error = exc
        del args, kwargs
        drop_tracebacks(error)
        raise error

    return call


# Threads for AsyncClient's blocking calls, each bounded by the client's timeout. Not the event
# loop's default executor: its min(32, CPUs + 4) workers are the application's too (getaddrinfo,
# its own to_thread calls), and misses against a hung service queued there behind each other, past
# the timeout. Threads start only as calls need them.
SDK_THREADS = 64
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


async def _in_thread(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread` on the SDK's own threads."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(SDK_THREADS, thread_name_prefix="secrets-manager-async")
    call = partial(contextvars.copy_context().run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor, call)


def _executor_after_fork_in_child() -> None:
    global _executor, _executor_lock
    _executor, _executor_lock = None, threading.Lock()  # its threads are the parent's


os.register_at_fork(after_in_child=_executor_after_fork_in_child)


def _call_in_loop(
    callback: Callable[[SecretChanged], object], change: SecretChanged, running: set[Any]
) -> None:
    """In AsyncClient.on_change's loop: the callback; what it returns, if awaitable (a coroutine
    function, or an object whose `__call__` is one), as a task of the loop."""
    try:
        result = callback(change)
    except Exception:  # the application's own error: said, as for the Client's callbacks
        log.exception(
            "an on_change callback (%s) failed for %s",
            getattr(callback, "__qualname__", type(callback).__name__),
            change.name,
        )
        return
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)
        running.add(task)
        task.add_done_callback(running.discard)
        task.add_done_callback(partial(_said_if_failed, callback, change.name))


def _said_if_failed(callback: object, name: str, done: Any) -> None:
    """A coroutine callback of AsyncClient.on_change that raised: logged, as the sync ones are."""
    if not done.cancelled() and done.exception() is not None:
        log.error(
            "an on_change callback (%s) failed for %s",
            getattr(callback, "__qualname__", type(callback).__name__),
            name,
            exc_info=done.exception(),
        )


class AsyncClient:
    """The asyncio face of a `Client`: a cached read is answered in the event loop without
    waiting; anything else runs in a worker thread, so the loop is never blocked."""

    def __init__(
        self,
        addresses: str | Sequence[str] | None = None,
        *,
        tls: TlsFiles | None = None,
        ttl: float | None = None,
        stale_if_error: float | None = None,
        timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
        client: Client | None = None,
    ) -> None:
        self._client = client or Client(
            addresses, tls=tls, ttl=ttl, stale_if_error=stale_if_error, timeout=timeout, environ=environ
        )
        self._in_flight: dict[tuple[asyncio.AbstractEventLoop, Hashable], asyncio.Future[Any]] = {}

    @property
    def sync(self) -> Client:
        """The synchronous client underneath (same cache, same watcher)."""
        return self._client

    @property
    def stale(self) -> bool:
        """See `Client.stale`."""
        return self._client.stale

    async def credentials(self, namespace: str | None = None) -> Credentials:
        """See `Client.credentials` (BatchGetSecrets)."""
        if self._client._shut:
            raise _closed_error()
        if namespace is not None:
            validate_namespace(namespace)
        hit = self._client._cached_credentials(namespace)
        if hit is not None:
            return hit
        result: Credentials = await self._shared(
            ("credentials", namespace), self._client.credentials, namespace
        )
        return result

    async def get(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        """See `Client.get` (GetSecret)."""
        if self._client._shut:
            raise _closed_error()
        checked_text(name, "secret name")
        if version is None and label is None:
            hit = self._client._cached_secret(name)
            if hit is not None:
                return hit
            result: Secret = await self._shared(("get", name), self._client.get, name)
            return result
        return await _in_thread(self._client.get, name, version=version, label=label)

    @_frames_withheld_async
    async def describe(self, name: str) -> SecretMetadata:
        """See `Client.describe` (DescribeSecret)."""
        return await _in_thread(self._client.describe, name)

    @_frames_withheld_async
    async def list(self, prefix: str = "", *, include_deleted: bool = False) -> list[SecretMetadata]:
        """See `Client.list` (ListSecrets)."""
        return await _in_thread(self._client.list, prefix, include_deleted=include_deleted)

    @_frames_withheld_async
    async def put(
        self,
        name: str,
        value: bytes | str | SecretValue,
        *,
        expect_version: int | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        expires: datetime | None = None,
    ) -> int:
        """See `Client.put` (PutSecret)."""
        return await _in_thread(
            self._client.put,
            name,
            value,
            expect_version=expect_version,
            description=description,
            tags=tags,
            expires=expires,
        )

    def on_change(
        self, callback: Callable[[SecretChanged], Awaitable[object] | object], prefix: str = ""
    ) -> Subscription:
        """See `Client.on_change`. Called from the event loop, whose thread runs the callback: a
        callback called in that loop, what it returns, if awaitable (a coroutine function, or an
        object whose `__call__` is one), as a task of the loop. Once the loop has closed the
        subscription cancels itself (at the next change), so it does not keep the loop alive."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise InvalidInputError(
                "AsyncClient.on_change is called from a coroutine (it delivers to the running event "
                "loop); without one, use the Client's on_change (AsyncClient.sync)"
            ) from None
        if not callable(callback):
            raise InvalidInputError(f"callback must be callable, not {type(callback).__name__}")

        running: set[asyncio.Future[Any]] = set()  # its tasks, referenced until done
        subscription: Subscription | None = None

        def in_the_loop(change: SecretChanged) -> None:
            try:
                loop.call_soon_threadsafe(_call_in_loop, callback, change, running)
            except RuntimeError:  # the loop has closed: nothing runs there again, nor is it kept
                if subscription is not None:
                    subscription.cancel()

        subscription = self._client.on_change(in_the_loop, prefix)
        return subscription

    async def close(self) -> None:
        await _in_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Async{self._client!r}"

    async def _shared(self, key: Hashable, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function` in a worker thread; concurrent callers with the same key share one run.
        A caller's cancellation does not cancel the run the others are waiting for."""
        loop = asyncio.get_running_loop()
        flight = self._in_flight.get((loop, key))
        if flight is None:
            flight = asyncio.ensure_future(_in_thread(function, *args))
            self._in_flight[(loop, key)] = flight
            flight.add_done_callback(lambda done: self._landed(loop, key, done))
        return await asyncio.shield(flight)

    def _landed(self, loop: asyncio.AbstractEventLoop, key: Hashable, flight: asyncio.Future[Any]) -> None:
        self._in_flight.pop((loop, key), None)
        if not flight.cancelled():
            flight.exception()  # retrieved: no "never retrieved" warning if every waiter left
