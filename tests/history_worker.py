"""One client of a recorded history test (tests/test_history.py): random operations on a few
names for a while, each recorded as it is invoked and as it ends (tests/history_checker.py).

Run as a process of its own: `python tests/history_worker.py CONFIG_JSON`. CONFIG's `target` says
how it reaches the store: `store` (an EncryptedStore on a SQLite file or a PostgreSQL schema,
through the Python API; cp and mv through the CLI's own `copy_secret`), `remote` (a `RemoteStore`:
the service, over mutual TLS) or `cli` (the
`secrets-manager` console script, one process per operation, on a store URL or `--server`). Each
record is one JSON line, written and flushed to CONFIG's `out` before the operation is sent and
after it returns, so a client killed mid-operation leaves an invoke without a completion: its
outcome unknown. Values are unique (`process-counter-random`), never secret material.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from secrets_manager.errors import ConflictError, InvalidInputError, NotFoundError, UnlockError


class Recorder:
    def __init__(self, out: TextIO, process: str) -> None:
        self.out = out
        self.process = process
        self.counter = 0
        self.fail_over: Callable[[], object] | None = None  # after an unknown outcome
        self.context: dict[str, Any] = {}  # recorded with every invocation (`pw`: the password used)
        self.last_error = ""  # of the last operation ("" if it succeeded)

    def record(self, **fields: Any) -> None:
        fields.setdefault("time", time.monotonic())
        if fields.get("t") in ("ok", "fail", "info"):
            self.last_error = str(fields.get("error", ""))
        self.out.write(json.dumps({"p": self.process, **fields}) + "\n")
        self.out.flush()

    def run(
        self, kind: str, name: str, call: Callable[[], dict[str, Any]], **args: Any
    ) -> dict[str, Any] | None:
        """Record the invocation, call, record how it ended; the answer if ok, else None."""
        self.counter += 1
        index = self.counter
        self.record(i=index, t="invoke", f=kind, name=name, **{**self.context, **args})
        try:
            answer = call()
        except Outcome as outcome:
            self.record(i=index, t=outcome.status, error=outcome.error)
            return None
        except UnlockError as exc:
            self.record(i=index, t="fail", error=f"unlock: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        except ConflictError as exc:
            if unlock_refusal(str(exc)):  # the handle's password no longer opens the store
                self.record(i=index, t="fail", error=f"unlock: {type(exc).__name__}: {str(exc)[:200]}")
                return None
            self.record(i=index, t="fail", error="conflict", detail=type(exc).__name__)
            return None
        except NotFoundError:
            self.record(i=index, t="fail", error="not_found")
            return None
        except InvalidInputError as exc:  # refused before anything was sent
            self.record(i=index, t="fail", error=f"invalid: {str(exc)[:200]}")
            return None
        except Exception as exc:  # anything else: the outcome is unknown
            self.record(i=index, t="info", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(0.1)  # a store or service that is down: do not spin
            if self.fail_over is not None:
                self.fail_over()
            return None
        self.record(i=index, t="ok", **answer)
        return answer


def unlock_refusal(message: str) -> bool:
    """Whether a ConflictError (exit 7) says the store's unlock changed under the caller: its
    master password changed and root key rotated since it opened the store, not a write conflict."""
    return "master password changed" in message or "open the store again" in message


class Outcome(Exception):
    """A CLI run that did not succeed: `fail` (a definite refusal) or `info` (unknown)."""

    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class ApiClient:
    """The operations through a `SecretStore` (EncryptedStore or RemoteStore)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def put(self, name: str, value: str, expect: int | None) -> dict[str, Any]:
        return {"version": self.store.put(name, value.encode(), expect_version=expect).version}

    def get(self, name: str, version: int | None) -> dict[str, Any]:
        secret = self.store.get(name, version=version)
        return {"version": secret.version, "value": secret.value.reveal().decode()}

    def delete(self, name: str, expect: int | None = None) -> dict[str, Any]:
        self.store.delete(name, expect_version=expect)
        return {}

    def undelete(self, name: str) -> dict[str, Any]:
        self.store.undelete(name)
        return {}

    def destroy(self, name: str, version: int) -> dict[str, Any]:
        self.store.destroy(name, [version])
        return {}

    def stage(self, name: str, value: str) -> dict[str, Any]:
        return {"version": self.store.stage(name, value.encode()).version}

    def promote(self, name: str, version: int) -> dict[str, Any]:
        self.store.promote(name, version)
        return {}

    def discard(self, name: str) -> dict[str, Any]:
        return {"version": self.store.discard_pending(name)}

    def list(self, prefix: str) -> dict[str, Any]:
        return {"listed": {meta.name: meta.current_version for meta in self.store.list(prefix)}}

    def copy(self, verb: str, old: str, new: str) -> dict[str, Any]:
        """`mv`/`cp OLD NEW --force` as the CLI does them (its own function), on this store."""
        from secrets_manager.cli.move_commands import copy_secret
        from secrets_manager.cli.session import Note

        copied = copy_secret(self.store, Note(), old, new, force=True, remove=verb == "mv")
        return {"version": copied.version, "from_version": copied.from_version}


class CliClient:
    """The operations through the console script, one process each."""

    def __init__(self, command: list[str], env: dict[str, str], password_file: str | None = None) -> None:
        self.command = command
        self.env = env
        self.password_file = password_file  # read before every run: `passwd` may have changed it
        self.password: str | None = None

    def generation(self) -> int | None:
        """The generation of the master password the next run uses (history_maintenance)."""
        if self.password_file is None:
            return None
        from history_maintenance import generation_of, read_password

        self.password = read_password(self.password_file)
        return generation_of(self.password)

    def cli(self, *args: str, data: str = "") -> Any:
        env = self.env if self.password is None else {**self.env, "MASTER_PASSWORD": self.password}
        proc = subprocess.run(
            [*self.command, *args], input=data.encode(), capture_output=True, env=env, timeout=60
        )
        if proc.returncode == 0:
            return json.loads(proc.stdout) if proc.stdout.strip() else {}
        error = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        if proc.returncode == 4 or (proc.returncode == 7 and unlock_refusal(error[0])):
            raise Outcome("fail", f"unlock: exit {proc.returncode}: {error[0][:200]}")
        if proc.returncode == 7:
            raise Outcome("fail", "conflict")
        if proc.returncode == 3:
            raise Outcome("fail", "not_found")
        if proc.returncode == 2:
            raise Outcome("fail", f"invalid: {error[0][:200]}")
        raise Outcome("info", f"exit {proc.returncode}: {error[0][:200]}")

    def put(self, name: str, value: str, expect: int | None) -> dict[str, Any]:
        extra = [] if expect is None else ["--expect-version", str(expect)]
        return {"version": self.cli("store", name, "--json", *extra, data=value)["version"]}

    def get(self, name: str, version: int | None) -> dict[str, Any]:
        extra = [] if version is None else ["--version", str(version)]
        doc = self.cli("get", name, "--json", *extra)
        return {"version": doc["version"], "value": doc["value"]}

    def delete(self, name: str, expect: int | None = None) -> dict[str, Any]:
        extra = [] if expect is None else ["--expect-version", str(expect)]
        return dict(self.cli("delete", name, *extra))

    def undelete(self, name: str) -> dict[str, Any]:
        return dict(self.cli("undelete", name))

    def destroy(self, name: str, version: int) -> dict[str, Any]:
        return dict(self.cli("destroy", name, "--version", str(version)))

    def copy(self, verb: str, old: str, new: str) -> dict[str, Any]:
        doc = self.cli(verb, old, new, "--force", "--json")
        return {"version": doc["version"], "from_version": doc["from_version"]}

    def list(self, prefix: str) -> dict[str, Any]:
        return {"listed": {doc["name"]: doc["current_version"] for doc in self.cli("list", prefix, "--json")}}


def open_client(target: dict[str, Any]) -> tuple[Any, Callable[[], None]]:
    kind = target["kind"]
    if kind == "cli":
        return CliClient(target["command"], dict(target["env"]), target.get("password_file")), lambda: None
    if kind == "remote":
        from pathlib import Path

        from secrets_manager.client import RemoteStore, TlsFiles

        tls = TlsFiles(cert=Path(target["cert"]), key=Path(target["key"]), ca=Path(target["ca"]))
        remote = RemoteStore(
            target["address"], tls, timeout=target.get("timeout", 10.0), replicas=target.get("replicas", ())
        )
        return ApiClient(remote), remote.close
    from secrets_manager.crypto import kdf
    from secrets_manager.store import EncryptedStore, PasswordUnlock

    storage: Any
    if kind == "sqlite":
        from secrets_manager.storage.sqlite import SqliteStorage

        storage = SqliteStorage(target["path"])
    else:
        from secrets_manager.storage.postgres import PostgresStorage

        storage = PostgresStorage(target["conninfo"], schema=target["schema"])
    password_file = target.get("password_file")
    if password_file is None:
        store = EncryptedStore.open(storage, PasswordUnlock(target["password"], kdf.TEST))
        return ApiClient(store), store.close
    # A password read from a file (history_maintenance's passwd changes it): `renew` reads the file
    # again when the held password stops opening the store, as serve and the SDK do; without it
    # the client is one started with MASTER_PASSWORD, which the README says to start again.
    from history_maintenance import generation_of, read_password

    password = read_password(password_file)
    store = EncryptedStore.open(storage, PasswordUnlock(password, kdf.TEST))
    if target.get("renew"):
        store.renew_unlock_with(lambda: PasswordUnlock(read_password(password_file), kdf.TEST))
    client = ApiClient(store)
    client.generation = generation_of(password)  # type: ignore[attr-defined]
    return client, lambda: client.store.close()


def main(config: dict[str, Any]) -> None:
    rng = random.Random(config["seed"])
    names: list[str] = config["names"]
    weights: dict[str, int] = config["weights"]
    deadline = time.monotonic() + config["duration"]
    if config["target"]["kind"] == "maint":
        import history_maintenance

        with open(config["out"], "a", encoding="utf-8") as out:
            history_maintenance.main(config, Recorder(out, config["process"]))
        return
    client, close = open_client(config["target"])
    seen: dict[str, int] = {}  # the newest version of each name this client saw
    with open(config["out"], "a", encoding="utf-8") as out:
        recorder = Recorder(out, config["process"])
        if isinstance(client, ApiClient) and hasattr(client.store, "fail_over"):
            recorder.fail_over = lambda: client.store.fail_over(2.0)  # to another replica serving
        kinds, chances = list(weights), list(weights.values())
        stop_file = config["target"].get("stop_file")  # the maintenance client's end, if given
        while time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
            kind = rng.choices(kinds, chances)[0]
            name = rng.choice(names)
            value = f"{config['process']}-{recorder.counter + 1}-{secrets.token_hex(3)}"
            client, close = with_password_context(client, close, recorder, config["target"])
            if client is None:  # started again, and its password did not open the store yet
                time.sleep(0.1)
                continue
            one_operation(rng, client, recorder, seen, names, config["prefix"], kind, name, value)
            time.sleep(config["target"].get("pace", 0))  # fewer operations over a longer history
    close()


def with_password_context(
    client: Any, close: Callable[[], None], recorder: Recorder, target: dict[str, Any]
) -> tuple[Any, Callable[[], None]]:
    """Record which master password the next operation unlocks with (`pw`: its generation, or
    "renew" for a handle that reads its file again). A handle without renewal whose last operation
    was refused for its password is started again (an `open` operation, with the file's password)."""
    if target.get("password_file") is None:
        if "unlock" in target:  # a client of a service: how the service unlocks (`renew`)
            recorder.context = {"pw": target["unlock"]}
        return client, close
    if isinstance(client, CliClient):
        recorder.context = {"pw": client.generation()}
        return client, close
    if target.get("renew"):
        recorder.context = {"pw": "renew"}
        return client, close
    if client is None or recorder.last_error.startswith("unlock"):
        close()
        from history_maintenance import generation_of, read_password

        generation = generation_of(read_password(target["password_file"]))
        recorder.context = {"pw": generation}
        opened: list[Any] = []

        def reopen() -> dict[str, Any]:
            opened.append(open_client(target))
            return {}

        if recorder.run("open", "", reopen) is None:
            return None, lambda: None
        client, close = opened[0]
    recorder.context = {"pw": client.generation}
    return client, close


def one_operation(
    rng: random.Random,
    client: Any,
    recorder: Recorder,
    seen: dict[str, int],
    names: list[str],
    prefix: str,
    kind: str,
    name: str,
    value: str,
) -> None:
    """One operation of `kind` on `name`, recorded; `seen` learns the versions it is told of."""
    answer: dict[str, Any] | None = None
    if kind == "put":
        answer = recorder.run("put", name, lambda: client.put(name, value, None), value=value)
    elif kind == "cas":
        expect = seen.get(name, 1) - (1 if rng.random() < 0.2 else 0)
        answer = recorder.run(
            "put", name, lambda: client.put(name, value, expect), value=value, expect=expect
        )
    elif kind == "get":
        answer = recorder.run("get", name, lambda: client.get(name, None))
    elif kind == "get_version":
        asked = rng.randint(1, max(1, seen.get(name, 1)))
        answer = recorder.run("get", name, lambda: client.get(name, asked), asked=asked)
    elif kind == "delete":
        recorder.run("delete", name, lambda: client.delete(name))
    elif kind == "cdelete":
        expect = seen.get(name, 1)
        recorder.run("delete", name, lambda: client.delete(name, expect), expect=expect)
    elif kind == "undelete":
        recorder.run("undelete", name, lambda: client.undelete(name))
    elif kind == "destroy" and seen.get(name, 0) >= 4:
        old = rng.randint(1, seen[name] - 3)  # never current or previous: current only grows
        recorder.run("destroy", name, lambda: client.destroy(name, old), version=old)
    elif kind == "rotate" and isinstance(client, ApiClient):
        staged = recorder.run("stage", name, lambda: client.stage(name, value), value=value)
        if staged is not None:
            number = staged["version"]
            if recorder.run("promote", name, lambda: client.promote(name, number), version=number) is None:
                recorder.run("discard", name, lambda: client.discard(name))
    elif kind in ("cp", "mv"):
        to = rng.choice([n for n in names if n != name])
        copied = recorder.run(kind, name, lambda: client.copy(kind, name, to), to=to)
        if copied is not None:
            seen[to] = max(seen.get(to, 0), copied["version"])
    elif kind == "list":
        listed = recorder.run("list", prefix, lambda: client.list(prefix))
        for listed_name, current in (listed or {}).get("listed", {}).items():
            if current is not None:
                seen[listed_name] = max(seen.get(listed_name, 0), current)
    if answer is not None and "version" in answer:
        seen[name] = max(seen.get(name, 0), answer["version"])


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    sys.modules.setdefault("history_worker", sys.modules["__main__"])  # one Outcome class, not two
    # Run.wait sends SIGUSR1 to a client that outlived its wait: every thread's stack goes to
    # stderr (the failure message), written by C code, so even from a call that never returns.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    main(json.loads(sys.argv[1]))
