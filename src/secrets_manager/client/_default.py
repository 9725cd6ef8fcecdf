"""The process-wide client behind `get_credentials()`, made from the environment at first use; the
next call after `close_default_client()` makes a new one."""

from __future__ import annotations

import os
import threading

from secrets_manager.client._async import AsyncClient, _in_thread
from secrets_manager.client._client import Client
from secrets_manager.client._credentials import Credentials

_default_lock = threading.Lock()
_default_client: Client | None = None
_default_async_client: AsyncClient | None = None


def _default_after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_default_after_fork_in_child)


def default_client() -> Client:
    """The process-wide client, configured from the environment on first use."""
    client = _default_client
    if client is None:
        with _default_lock:
            client = _default_client_locked()
    return client


def _default_client_locked() -> Client:
    """Holding `_default_lock`: the process-wide client, made if there is none."""
    global _default_client
    if _default_client is None:
        _default_client = Client()
    return _default_client


def _default_async() -> AsyncClient:
    """The process-wide client's asyncio face. Made under the same lock as the client it wraps
    (and as `close_default_client` takes both away), so a close racing a first call cannot leave
    it wrapping a client that was closed meanwhile: after a close, the next call makes both anew."""
    global _default_async_client
    client = _default_async_client
    if client is None:
        with _default_lock:
            if _default_async_client is None:
                _default_async_client = AsyncClient(client=_default_client_locked())
            client = _default_async_client
    return client


async def get_credentials(namespace: str | None = None) -> Credentials:
    """The secrets this service may read, from the process-wide client (see `Client.credentials`).

    `creds = await get_credentials(); creds["market-connector/BINANCE_API_KEY"].reveal_text()`"""
    return await _default_async().credentials(namespace)


def get_credentials_sync(namespace: str | None = None) -> Credentials:
    """`get_credentials` for code without an event loop."""
    return default_client().credentials(namespace)


def _take_default_client() -> Client | None:
    """The process-wide client (sync and async faces alike), no longer the default: the next call
    makes a new one from the environment as it is then."""
    global _default_client, _default_async_client
    with _default_lock:
        client, _default_client, _default_async_client = _default_client, None, None
    return client


def close_default_client() -> None:
    """Close the process-wide client; the next `get_credentials()` makes a new one from the
    environment as it is then. It waits for the client's threads (a call in flight ends within
    the timeout): in a coroutine, `await aclose_default_client()` instead."""
    client = _take_default_client()
    if client is not None:
        client.close()


async def aclose_default_client() -> None:
    """`close_default_client` for a coroutine: the wait for the client's threads happens in a
    worker thread, so the event loop keeps running meanwhile."""
    client = _take_default_client()
    if client is not None:
        await _in_thread(client.close)
