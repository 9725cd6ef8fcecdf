"""Differential testing of stores: one operation applied to several `SecretStore`s (the encrypted
store on SQLite and PostgreSQL, Vault, AWS), and what each gave back, normalised and compared.

`tests/test_store_differential.py` drives it. What a store hands back is reduced to an `Outcome`:
the result as plain values, or the error's class and exit code. Every normalisation is a decision
written down here, and nothing else is normalised:

- Times (a secret's created/updated, a version's created): each backend stamps its own clock.
  Dropped.
- `deleted`: ours is when the delete was made, AWS's `DeletedDate` when AWS will erase the secret
  (docs/stores.md, the data model's `delete` row). Compared as deleted or not.
- A version's `created_by`: not recorded on Vault and AWS (docs/stores.md, "who wrote a version").
  Dropped. The secret's own `created_by` is compared (every store records it).
- The error's message: its class and exit code are compared here; the CLI pass compares the line
  the user reads.

Where a store cannot do what the others do (docs/stores.md, "Not supported by these stores"), the
store must refuse with UnsupportedOperationError and change nothing; the names it refused on are
then `Divergence`s, left out of later comparisons until every store erases them, because the others
did what it could not.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moto_fixtures import moto_environ
from secrets_manager.crypto import kdf
from secrets_manager.errors import NotFoundError, SecretsManagerError
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.store.base import Secret, SecretMetadata, VersionInfo


@dataclass(frozen=True)
class Outcome:
    """What one store answered: `ok` and the normalised result, or the error's class and code."""

    ok: bool
    result: Any = None
    error: str = ""
    exit_code: int = 0
    message: str = ""

    def shown(self) -> str:
        if self.ok:
            return f"ok {json.dumps(self.result, default=str)[:400]}"
        return f"{self.error} (exit {self.exit_code}): {self.message[:300]}"

    def same_as(self, other: Outcome) -> bool:
        if self.ok != other.ok:
            return False
        if self.ok:
            return bool(self.result == other.result)
        return (self.error, self.exit_code) == (other.error, other.exit_code)


def normalised(result: Any) -> Any:
    """A store's result as plain, comparable values (the decisions of the module docstring)."""
    if isinstance(result, Secret):
        return {
            "name": result.name,
            "version": result.version,
            "value": result.value.reveal().hex(),
            "labels": sorted(result.labels),
            "expires": None if result.expires is None else result.expires.isoformat(),
            "target": result.target,
        }
    if isinstance(result, VersionInfo):
        return {"version": result.version, "labels": sorted(result.labels), "destroyed": result.destroyed}
    if isinstance(result, SecretMetadata):
        return {
            "name": result.name,
            "namespace": result.namespace,
            "created_by": result.created_by,
            "description": result.description,
            "tags": dict(result.tags),
            "current_version": result.current_version,
            "versions": [normalised(info) for info in result.versions],
            "deleted": result.deleted is not None,
            "max_versions": result.max_versions,
            "labels": dict(sorted(result.labels.items())),
            "expires": None if result.expires is None else result.expires.isoformat(),
        }
    if isinstance(result, list | tuple):
        return [normalised(item) for item in result]
    if isinstance(result, bytes):
        return result.hex()
    return result


def outcome_of(call: Callable[[], Any]) -> Outcome:
    """Run `call` on one store: its normalised result, or the error it raised (any other
    exception is a crash and propagates: a store must not raise one)."""
    try:
        return Outcome(True, normalised(call()))
    except SecretsManagerError as error:
        return Outcome(False, error=type(error).__name__, exit_code=error.exit_code, message=str(error))


def state_of(store: Any, prefix: str = "") -> dict[str, Any]:
    """Everything a client can see of the secrets under `prefix`: the metadata of each (deleted
    ones too) and the value of each version still readable (a deleted secret's: none)."""
    state: dict[str, Any] = {}
    for meta in store.list(prefix, include_deleted=True):
        entry = normalised(meta)
        values: dict[int, Any] = {}
        if meta.deleted is None:
            for info in meta.versions:
                try:
                    values[info.version] = store.get(meta.name, version=info.version).value.reveal().hex()
                except NotFoundError:
                    values[info.version] = None
        entry["values"] = values
        state[meta.name] = entry
    return state


@dataclass
class Divergence:
    """Names a store is known to hold otherwise than the others (a documented limit refused
    there), and why: left out of comparisons until every store has erased them."""

    names: dict[str, dict[str, str]] = field(default_factory=dict)  # store → name → reason
    # of those, the ones alike again after the store's next write of the name (store → names)
    healing: dict[str, set[str]] = field(default_factory=dict)

    def add(self, store: str, name: str, reason: str, *, until_next_write: bool = False) -> None:
        if until_next_write and name in self.names.get(store, {}) and name not in self.healing.get(store, ()):
            return  # diverged for good already
        self.names.setdefault(store, {})[name] = reason
        if until_next_write:
            self.healing.setdefault(store, set()).add(name)
        else:
            self.healing.get(store, set()).discard(name)

    def written(self, store: str, name: str) -> None:
        """`store` wrote a version of `name`: what only lasted until then is alike again."""
        if name in self.healing.get(store, ()):
            self.healing[store].discard(name)
            self.names[store].pop(name, None)

    def clear(self, name: str) -> None:
        for names in self.names.values():
            names.pop(name, None)
        for healing in self.healing.values():
            healing.discard(name)

    def of(self, store: str) -> Mapping[str, str]:
        return self.names.get(store, {})

    def any_for(self, name: str) -> bool:
        return any(name in names for names in self.names.values())


def differences(outcomes: Mapping[str, Outcome], reference: str) -> list[str]:
    """One line per store whose outcome is not the reference store's."""
    base = outcomes[reference]
    return [
        f"{store}: {outcome.shown()}  but {reference}: {base.shown()}"
        for store, outcome in outcomes.items()
        if store != reference and not outcome.same_as(base)
    ]


def state_differences(
    states: Mapping[str, dict[str, Any]], reference: str, divergence: Divergence
) -> list[tuple[str, str]]:
    """Each secret that a store holds otherwise than the reference store, and how, leaving out
    the names either has diverged on (a documented limit)."""
    lines: list[tuple[str, str]] = []
    base = states[reference]
    for store, state in states.items():
        if store == reference:
            continue
        skip = set(divergence.of(store)) | set(divergence.of(reference))
        for name in sorted((set(base) | set(state)) - skip):
            if base.get(name) != state.get(name):
                lines.append(
                    (name, f"{store} holds {name}: {state.get(name)}\n    but {reference}: {base.get(name)}")
                )
    return lines


def four_cli_stores(
    tmp_path: Path,
    postgres_cluster: Any,
    vault_address: str,
    vault_token: str,
    moto_endpoint: str,
    *,
    password: str,
    aws_prefix: str,
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """For the CLI: a new, empty store of each kind (an encrypted one on SQLite and on PostgreSQL,
    Vault's `secret` mount, AWS under `aws_prefix`-RANDOM), and each one's `--store` URL and the
    environment a command on it runs with (a HOME of its own under `tmp_path`)."""
    path = tmp_path / "store.db"
    EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(password, kdf.TEST)).close()
    schema = postgres_cluster.new_schema()
    EncryptedStore.create(
        PostgresStorage(postgres_cluster.url(with_password=True), schema=schema, create=True),
        PasswordUnlock(password, kdf.TEST),
    ).close()
    urls = {
        "sqlite": str(path),
        "postgres": f"{postgres_cluster.url()}?schema={schema}",
        "vault": vault_address.replace("http://", "vault+http://") + "/secret",
        "aws": f"aws-secretsmanager://us-east-1/{aws_prefix}-{secrets.token_hex(4)}",
    }
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GRPC_ENABLE_FORK_SUPPORT": "false"}
    own = {
        "sqlite": {"MASTER_PASSWORD": password},
        "postgres": {"MASTER_PASSWORD": password, **postgres_cluster.env()},
        "vault": {"VAULT_TOKEN": vault_token},
        "aws": moto_environ(moto_endpoint, "us-east-1"),
    }
    environs = {}
    for label in urls:
        home = tmp_path / label
        home.mkdir()
        environs[label] = {
            **base,
            "HOME": str(home),
            "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"],
            **own[label],
        }
    return urls, environs
