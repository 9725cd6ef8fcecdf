"""What a `Client` reads through: a `_Backend` (fetch, put, describe, list, and a change stream
it opens, `_ChangeSource`). The service's replicas (client/_replicas.py) and the local store
(client/_local.py) are the two there are."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Protocol

from secrets_manager.store import Secret, SecretMetadata
from secrets_manager.store.changes import SecretChange


class _ChangeSource(Protocol):
    @property
    def revision(self) -> int | None: ...  # every change up to here was delivered: resume from it

    @property
    def history(self) -> str | None: ...  # the line of the store's history `revision` is on

    @property
    def moved(self) -> bool: ...  # cancelled to move to new channels (reconnect at once)

    def start(self) -> int | None: ...

    @property
    def resumed(self) -> bool: ...

    def __iter__(self) -> Iterator[SecretChange]: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...  # the watcher is done with it


class _Backend(Protocol):
    def fetch_all(self, prefix: str = "") -> list[Secret]: ...

    def fetch(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret: ...

    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None,
        description: str | None,
        tags: Mapping[str, str] | None,
        expires: datetime | None = None,
    ) -> int: ...

    def describe(self, name: str) -> SecretMetadata: ...

    def list(self, prefix: str, *, include_deleted: bool) -> list[SecretMetadata]: ...

    def open_watch(
        self, since_revision: int | None = None, since_history: str | None = None
    ) -> _ChangeSource: ...

    def watch_refused(self) -> None: ...

    def renew_tls(self) -> None: ...

    def close(self) -> None: ...
