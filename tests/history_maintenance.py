"""The maintenance client of a recorded history (tests/test_history.py): an operator running the
key-management commands through the CLI while the other clients read and write.

Run by tests/history_worker.py for a target of kind `maint`. Its operations, each recorded as the
other clients' are (invoke, then ok | fail | info):

- `keys_rotate` (`keys rotate NAMESPACE`: answers the new primary's id as `key`),
  `keys_rotate_root` (`keys rotate --root`), `keys_rewrap` (`keys rewrap NAMESPACE`),
  `keys_disable` / `keys_enable` / `keys_destroy` of a retired key (`key`), `keys_status`
  (`keys status --json`: answers `keys`, each `[id, state, records]` in creation order),
  `audit_verify`;
- `passwd` (`passwd --new-password-file`) from generation `pw` to `new_pw`; only once it is
  acknowledged is the shared password file (what the CLI clients, and the API clients that
  renew, read) rewritten, so the completion time is when the new password reached the others;
- `sweep`: a fresh handle (the Python API, the current password) reads every version of every
  name, live or deleted, by number: `versions` {name: {version: [value or None if destroyed, id
  of the key that sealed it]}}, `keys` (the keyset's ids in creation order) and `errors` (any
  version that did not open);
- faults, if `kill` is set: a `keys rewrap` or `passwd` SIGKILLed part-way (`info`; a passwd
  then says in `changed` which password opens the store), then a sweep, then the command again.

Passwords are `password_of(generation)`; every client records the generation it unlocked with.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from history_worker import Outcome, Recorder

NEW_KEY = re.compile(r"new primary key (\d+)")
FIRST_PASSWORD = "service test password"  # service_fixtures.PASSWORD: generation 0


def password_of(generation: int) -> str:
    return FIRST_PASSWORD if generation == 0 else f"history password {generation}"


def generation_of(password: str) -> int:
    return 0 if password == FIRST_PASSWORD else int(password.rsplit(" ", 1)[1])


def read_password(path: str) -> str:
    return Path(path).read_text().strip()


def write_password(path: str, password: str) -> None:
    """Atomically: a reader finds the old password or the new one, never half of one."""
    temporary = f"{path}.new"
    with open(temporary, "w") as out:
        out.write(password + "\n")
    os.replace(temporary, path)


class Maintenance:
    def __init__(self, target: dict[str, Any], recorder: Recorder, rng: random.Random) -> None:
        self.command: list[str] = target["command"]
        self.env: dict[str, str] = dict(target["env"])
        self.password_file: str = target["password_file"]
        self.namespace: str = target["namespace"]
        self.prefix: str = target["prefix"]
        self.store: dict[str, Any] = target["store"]
        self.kill = bool(target.get("kill"))
        self.recorder = recorder
        self.rng = rng
        self.generation = generation_of(read_password(self.password_file))
        self.durations: dict[str, list[float]] = {}

    # ---- running the CLI ---------------------------------------------------------------------

    def cli(self, *args: str, kill_after: float | None = None) -> tuple[int, str, str]:
        env = {**self.env, "MASTER_PASSWORD": password_of(self.generation)}
        proc = subprocess.Popen(
            [*self.command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=kill_after if kill_after is not None else 120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def checked(self, *args: str, kill_after: float | None = None) -> str:
        """stdout+stderr of a CLI run that exited 0; else Outcome (fail: refused, info: unknown)."""
        code, out, err = self.cli(*args, kill_after=kill_after)
        if code == 0:
            return out + err
        line = (err.strip().splitlines() or [""])[-1][:300]
        if code == -signal.SIGKILL:
            raise Outcome("info", "killed")
        if code == 4:
            raise Outcome("fail", f"unlock: {line}")
        if code in (2, 3, 5, 7):
            raise Outcome("fail", f"exit {code}: {line}")
        raise Outcome("info", f"exit {code}: {line}")

    def run(self, kind: str, call: Any, **args: Any) -> dict[str, Any] | None:
        started = time.monotonic()
        answer = self.recorder.run(kind, self.namespace, call, pw=self.generation, **args)
        self.durations.setdefault(kind, []).append(time.monotonic() - started)
        return answer

    # ---- the operations ----------------------------------------------------------------------

    def rotate(self) -> None:
        def call() -> dict[str, Any]:
            found = NEW_KEY.search(self.checked("keys", "rotate", self.namespace))
            assert found is not None
            return {"key": int(found[1])}

        self.run("keys_rotate", call)

    def rotate_root(self) -> None:
        self.run("keys_rotate_root", lambda: {"said": self.checked("keys", "rotate", "--root")[-200:]})

    def rewrap(self, kill_after: float | None = None) -> dict[str, Any] | None:
        return self.run(
            "keys_rewrap",
            lambda: {"said": self.checked(
                "keys", "rewrap", self.namespace, "--batch-size", "2", kill_after=kill_after
            )[-300:]},
            killed_after=kill_after,
        )  # fmt: skip

    def status(self) -> list[list[Any]] | None:
        def call() -> dict[str, Any]:
            doc = json.loads(self._json("keys", "status", self.namespace, "--json"))
            return {"keys": [[k["id"], k["state"], k["records"]] for k in doc["keys"]]}

        answer = self.run("keys_status", call)
        return None if answer is None else answer["keys"]

    def _json(self, *args: str) -> str:
        code, out, err = self.cli(*args)
        if code != 0:
            line = (err.strip().splitlines() or [""])[-1][:300]
            raise Outcome("fail" if code in (2, 3, 4, 5, 7) else "info", f"exit {code}: {line}")
        return out

    def retire(self) -> None:
        """Disable (and now and then destroy, or enable again) a key no record uses any more."""
        keys = self.status()
        if not keys:
            return
        # An operator retires a key rewrap left unused; one still in use now and then (refused).
        unused = [key for key, state, records in keys if state == "enabled" and not records]
        enabled = unused or [key for key, state, _ in keys if state == "enabled" and self.rng.random() < 0.3]
        disabled = [key for key, state, _ in keys if state == "disabled"]
        if disabled and self.rng.random() < 0.5:
            key = self.rng.choice(disabled)
            verb = self.rng.choice(["enable", "destroy"])
            self.run(f"keys_{verb}", lambda: {"said": self.checked("keys", verb, str(key))[-200:]}, key=key)
        elif enabled:
            key = self.rng.choice(enabled)
            self.run(
                "keys_disable", lambda: {"said": self.checked("keys", "disable", str(key))[-200:]}, key=key
            )

    def audit_verify(self) -> None:
        self.run("audit_verify", lambda: {"said": self.checked("audit", "verify")[-200:]})

    def passwd(self, kill_after: float | None = None) -> None:
        new = self.generation + 1
        new_file = f"{self.password_file}.{new}"
        with open(new_file, "w") as out:
            out.write(password_of(new) + "\n")

        def call() -> dict[str, Any]:
            try:
                self.checked("passwd", "--new-password-file", new_file, kill_after=kill_after)
            except Outcome as outcome:
                if outcome.status == "fail":
                    raise
                # Killed or unknown: one commit, so one of the two passwords opens the store.
                changed = self.opens_with(new)
                self.adopt(new if changed else self.generation)
                raise Outcome("info", f"{outcome.error}; changed={changed}") from None
            self.adopt(new)
            return {"changed": True}

        self.run("passwd", call, new_pw=new, killed_after=kill_after)

    def adopt(self, generation: int) -> None:
        self.generation = generation
        write_password(self.password_file, password_of(generation))

    def opens_with(self, generation: int) -> bool:
        from secrets_manager.errors import UnlockError

        try:
            open_store(self.store, password_of(generation)).close()
        except UnlockError:
            return False
        return True

    def sweep(self) -> None:
        self.run(
            "sweep", lambda: sweep(self.store, password_of(self.generation), self.namespace, self.prefix)
        )

    def rotate_rewrap(self) -> None:
        """A new primary, then every older record re-sealed under it, under the others' load."""
        self.rotate()
        self.rewrap()
        self.status()

    def killed_rewrap(self) -> None:
        """`keys rewrap` SIGKILLed part-way; every version still opens; run again, it finishes."""
        self.rotate()
        self.rewrap(kill_after=self.rng.uniform(0.3, 1.2))
        self.sweep()
        self.rewrap()
        self.status()

    def killed_passwd(self) -> None:
        self.passwd(kill_after=self.rng.uniform(0.2, 0.9))
        self.sweep()


def open_store(target: dict[str, Any], password: str) -> Any:
    from secrets_manager.crypto import kdf
    from secrets_manager.store import EncryptedStore, PasswordUnlock

    storage: Any
    if target["kind"] == "sqlite":
        from secrets_manager.storage.sqlite import SqliteStorage

        storage = SqliteStorage(target["path"])
    else:
        from secrets_manager.storage.postgres import PostgresStorage

        storage = PostgresStorage(target["conninfo"], schema=target["schema"])
    return EncryptedStore.open(storage, PasswordUnlock(password, kdf.TEST))


def sweep(target: dict[str, Any], password: str, namespace: str, prefix: str) -> dict[str, Any]:
    """Every version of every name under `prefix`, live or deleted, read by number from a fresh
    handle, with the id of the key that sealed it; and the namespace's keys in creation order."""
    from secrets_manager.crypto import Purpose, open_record
    from secrets_manager.crypto.record import record_key_id
    from secrets_manager.errors import IntegrityError
    from secrets_manager.store.encrypted import DATA_PREFIX, KEYSET_PREFIX
    from secrets_manager.store.keys import key_status

    store = open_store(target, password)
    try:
        versions: dict[str, dict[str, list[Any]]] = {}
        errors: list[str] = []
        for meta in store.list(prefix, include_deleted=True):
            held = versions.setdefault(meta.name, {})
            for info in meta.versions:
                if info.destroyed:
                    held[str(info.version)] = [None, None]
                    continue
                entry = store._storage.get(f"{DATA_PREFIX}{meta.name}#{info.version}")
                if entry is None:
                    now = {v.version: v for v in store.describe(meta.name).versions}
                    if info.version in now and not now[info.version].destroyed:
                        errors.append(f"{meta.name} v{info.version}: listed, not stored")
                    else:  # destroyed or pruned since the listing
                        errors.append(f"{meta.name} v{info.version}: skipped: gone since the listing")
                    continue
                try:
                    key_id = record_key_id(entry.value)
                    if meta.deleted is None:
                        value = store.get(meta.name, version=info.version).value.reveal()
                    else:  # a deleted secret's versions are read below the API, as rewrap reads them
                        keyset = store._keyset_for_read(namespace)
                        value = open_record(
                            keyset.key_for_decryption, Purpose.SECRET_VALUE, meta.name, info.version,
                            entry.value,
                        )  # fmt: skip
                except IntegrityError as exc:
                    errors.append(f"{meta.name} v{info.version}: IntegrityError: {str(exc)[:200]}")
                    continue
                except Exception as exc:  # a concurrent delete, destroy or prune
                    errors.append(f"{meta.name} v{info.version}: skipped: {type(exc).__name__}")
                    continue
                held[str(info.version)] = [value.decode(), key_id]
        assert store._storage.get(KEYSET_PREFIX + namespace) is not None
        keys = [[info.id, info.state, info.records] for info in key_status(store, namespace)]
        return {"versions": versions, "keys": keys, "errors": errors}
    finally:
        store.close()


ROUND = ["rotate", "rotate_rewrap", "retire", "rotate_root", "passwd", "status", "sweep", "audit_verify"]
KILL_ROUND = ["killed_rewrap", "killed_passwd", "rotate_root", "retire", "audit_verify"]  # kills, then sweeps


def main(config: dict[str, Any], recorder: Recorder) -> None:
    """Rounds of every operation in a random order (a CLI run takes a second or more under load,
    so random picks would leave some out of a 10 s history), until the deadline."""
    rng = random.Random(config["seed"])
    maintenance = Maintenance(config["target"], recorder, rng)
    deadline = time.monotonic() + config["duration"]
    kinds = KILL_ROUND if maintenance.kill else ROUND
    rounds = 0
    while rounds == 0 or time.monotonic() < deadline:  # the first round whole
        rounds += 1
        for kind in rng.sample(kinds, len(kinds)):
            if rounds > 1 and time.monotonic() >= deadline:
                break
            getattr(maintenance, kind)()
            time.sleep(rng.uniform(0, 0.1))
        if rounds == 1:
            maintenance.rotate_root()  # after the round's passwd: running clients read theirs again
    maintenance.sweep()  # the test then checks the final state, and runs audit verify
    with open(config["out"] + ".figures", "w") as out:
        json.dump(maintenance.durations, out)
    stop_file = config["target"].get("stop_file")
    if stop_file:  # the other clients stop now: every operation above ran under their load
        Path(stop_file).touch()
