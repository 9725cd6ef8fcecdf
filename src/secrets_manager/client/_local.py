"""The local store as a `Client`'s backend, for development without a service: read-only, its
change feed polled every LOCAL_POLL_SECONDS in place of the service's Watch stream."""

from __future__ import annotations

import getpass
import os
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime

from secrets_manager.client._backend import _ChangeSource
from secrets_manager.client._config import LocalTarget
from secrets_manager.errors import InvalidInputError, NotFoundError
from secrets_manager.store import EncryptedStore, Secret, SecretMetadata
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.store.url import open_store

LOCAL_POLL_SECONDS = 0.2  # the local store's change feed, polled as the service polls it


class _LocalStore:
    """Development without a service: the local store, opened once, read-only for the SDK.

    Writes stay with `secrets-manager store`, which audits them; reads here are not audited."""

    def __init__(self, target: LocalTarget) -> None:
        # A password file may be read again when another process has changed the password and
        # rotated the root key (`passwd`, `keys rotate --root`), as `serve` does: putting the new
        # password in the file is then enough. A password from the environment cannot change.
        self._store: EncryptedStore = open_store(
            target.store_url,
            target.read_password,
            environment=target.environment,
            actor=_local_actor(),
            password_rereadable=target.password_file is not None,
        )

    def fetch_all(self, prefix: str = "") -> list[Secret]:
        """Every secret under `prefix` with a current version, read at one instant (the store
        reads only that part of it); a damaged record is its IntegrityError."""
        secrets = []
        for read in self._store.read_current(prefix=prefix):
            if isinstance(read.error, NotFoundError):
                continue  # no current version to give
            if read.error is not None:
                raise read.error
            assert read.secret is not None
            secrets.append(read.secret)
        return secrets

    def fetch(self, name: str, *, version: int | None = None, label: str | None = None) -> Secret:
        return self._store.get(name, version=version, label=label)

    def put(
        self,
        name: str,
        value: bytes,
        *,
        expect_version: int | None,
        description: str | None,
        tags: Mapping[str, str] | None,
        expires: datetime | None = None,
    ) -> int:
        raise InvalidInputError(
            "the SDK only reads the local store; write with 'secrets-manager store' (which audits "
            "the change) or set SECRETS_MANAGER_ADDR to use a service"
        )

    def describe(self, name: str) -> SecretMetadata:
        return self._store.describe(name)

    def list(self, prefix: str, *, include_deleted: bool) -> list[SecretMetadata]:
        return self._store.list(prefix, include_deleted=include_deleted)

    def open_watch(
        self, since_revision: int | None = None, since_history: str | None = None
    ) -> _ChangeSource:
        return _PolledChanges(self._store, since_revision, since_history)

    def watch_refused(self) -> None:
        """Never happens: the local store has no limit on watchers."""

    def renew_tls(self) -> None:
        """No certificate: nothing to renew."""

    def close(self) -> None:
        self._store.close()


class _PolledChanges:
    """The local store's change feed as a stream, read every LOCAL_POLL_SECONDS."""

    def __init__(
        self, store: EncryptedStore, since_revision: int | None = None, since_history: str | None = None
    ) -> None:
        self._store = store
        self.history = store.change_history()
        _, current = store.changes_since(None)
        self._pending: list[SecretChange] = []
        if since_revision is None:
            self.revision: int | None = current
        elif since_revision > current or (since_history not in (None, self.history)):
            # The feed never got there (the store was replaced), or the revision is of another line
            # of the store's history (its database failed over or was restored since).
            self._pending.append(SecretChange(ChangeKind.RESYNC, "", None, current))
            self.revision = current
        else:
            self.revision = since_revision
        self.resumed = since_revision is not None and self.revision == since_revision
        self.moved = False
        self._cancelled = threading.Event()

    def start(self) -> int | None:
        return self.revision

    def __iter__(self) -> Iterator[SecretChange]:
        yield from self._pending
        while not self._cancelled.is_set():
            revision = self.revision
            assert revision is not None
            before = self._store.change_history()
            changes, following = self._store.changes_since(revision)
            now = self._store.change_history()
            if before != self.history or now != before:  # the database changed under the handle
                _, current = self._store.changes_since(None)
                self.history, self.revision = now, current
                yield SecretChange(ChangeKind.RESYNC, "", None, current)
            else:
                self.revision = following
                yield from changes
            self._cancelled.wait(LOCAL_POLL_SECONDS)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.cancel()


def _local_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"
