"""A checker of recorded histories of concurrent clients, in the style of Jepsen's and Elle's.

Each client records every operation it invokes and how it ended (`Op`): `ok` with what the store
answered, `fail` with a definite refusal (`conflict`, `not_found`), or `info` when the outcome is
unknown (the client was killed, timed out, or lost its connection). Values are unique per write,
so a value read names the write that made it. `check` compares the history, and the store's state
read afterwards (`Final`), with what a store that applies each operation at one instant between
its invocation and its completion (linearizability) could show, for the properties below, and
returns the anomalies found (empty: none). It checks necessary conditions, not a full search for a
serial order: every anomaly it reports is real, and each names the operations that show it.

- a change whose outcome is unknown is raised as OutcomeUnknownError, never as another error;
- every acknowledged write is in the final state with its value (unless a later `destroy` of
  that version, or pruning past the secret's version limit, erased it);
- versions per name are unique, and contiguous; one write makes one version, never two (a write
  retried after its answer was lost); every version the store holds was made by a write
  of the history, with that write's value; a write refused (`fail`) is never seen;
- a compare-and-set (a put or delete with an expected version) that succeeded had that version
  current: none newer was acknowledged before it started (`current` only moves forward: no
  rollback in these histories);
- a read returns a value some write of that name (or a copy into it) made, at a version at least
  as new as every version acknowledged, or read, before the read started;
- a read, delete, undelete or write sees the secret live or deleted as the deletes and undeletes
  around it allow, and a compare-and-set is refused only if its version may not have been current;
- a cp or mv copies a version of its source that was current while it ran, and its value;
- a read of a version by number finds it while nothing could have erased it, and not once a
  destroy of it was acknowledged;
- beside key management (tests/history_maintenance.py): no operation fails an integrity check;
  a sweep (every version read by number) finds each version acknowledged before it with its
  value, sealed by a key no older than the primary when its write began, and after a rewrap with
  no rotation since, by the primary; `keys status` agrees with the rotations, disables, enables and
  destroys that ran; a client is refused for its master password only where the README says so
  (a new process holding the password a `passwd` replaced; a running one after a `passwd` and a
  root rotation, until it reads its password file again or, without one, is started again).

The store's own guarantee for reads through its read cache (`store/read_cache.py`) is that one
cheap read of the change head on every read drops whatever another process changed, so reads are
held to every write acknowledged before they started, by any client, on any replica.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# What each kind of operation carries: `name`, and
#   put: value, expect (None or a version; 0: create only)  → version
#   get: asked (None: current)                              → version, value
#   list: prefix                                            → listed {name: current version}
#   delete: expect (None or the version that must be current) → nothing
#   undelete                                                → nothing
#   destroy: version                                        → nothing
#   stage: value                                            → version (labelled pending)
#   promote: version                                        → nothing
#   cp, mv: to (the name written)                           → version (of `to`), from_version
WRITES = ("put", "stage", "cp", "mv")
SETS_CURRENT = ("put", "promote", "cp", "mv")  # an ok one leaves its version current


@dataclass
class Op:
    process: str
    kind: str
    name: str
    invoke: float  # seconds on one clock shared by every client (CLOCK_MONOTONIC)
    complete: float  # for `info`: when the client stopped waiting (or +inf: killed)
    status: str  # ok | fail | info
    value: str | None = None  # written (put, stage) or read (get)
    version: int | None = None  # answered (put, stage, cp, mv, get) or named (destroy, promote)
    expect: int | None = None
    asked: int | None = None  # get: the version asked for (None: the current one)
    to: str | None = None
    from_version: int | None = None  # cp, mv: the version of `name` copied
    listed: Mapping[str, int | None] | None = None
    error: str | None = None
    index: int = 0
    # What else the record held: `pw` (the master password's generation the client unlocked with,
    # or "renew"), and the maintenance client's fields (history_maintenance: `key`, `keys`,
    # `versions`, `errors`, `new_pw`).
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"#{self.index} {self.process} {self.kind} {self.name}"]
        for label in ("to", "from_version", "expect", "asked", "version", "value", "error"):
            if getattr(self, label) is not None:
                parts.append(f"{label}={getattr(self, label)}")
        if self.listed is not None:
            parts.append(f"listed={dict(self.listed)}")
        return f"{' '.join(parts)} -> {self.status} [{self.invoke:.4f}, {self.complete:.4f}]"

    @property
    def writes_to(self) -> str:
        return self.to if self.kind in ("cp", "mv") and self.to is not None else self.name


@dataclass
class FinalSecret:
    """A secret as read after every client stopped: each version held, its value (None: destroyed)."""

    deleted: bool
    current: int | None
    versions: dict[int, str | None] = field(default_factory=dict)


Final = Mapping[str, FinalSecret]


def ops_from_records(records: Iterable[Mapping[str, Any]]) -> list[Op]:
    """Pair the clients' `invoke` and completion records (JSON lines: `p` the process, `i` its
    operation counter, `t` invoke | ok | fail | info, `time`, and the fields of `Op`). An invoke
    without a completion (a killed client) is `info`, unfinished for ever."""
    invoked: dict[tuple[str, int], dict[str, Any]] = {}
    ops: list[Op] = []
    for record in records:
        key = (str(record["p"]), int(record["i"]))
        if record["t"] == "invoke":
            invoked[key] = dict(record)
            continue
        start = invoked.pop(key)
        ops.append(_op(start, record))
    for start in invoked.values():
        ops.append(_op(start, {"t": "info", "time": float("inf"), "error": "no answer"}))
    ops.sort(key=lambda op: op.invoke)
    for index, op in enumerate(ops):
        op.index = index
    return ops


_RECORD_FIELDS = {"p", "i", "t", "f", "name", "time", "value", "version", "expect", "asked", "to",
                  "from_version", "listed", "error"}  # fmt: skip


def _op(start: Mapping[str, Any], end: Mapping[str, Any]) -> Op:
    listed = end.get("listed")
    return Op(
        process=str(start["p"]),
        kind=start["f"],
        name=start["name"],
        invoke=float(start["time"]),
        complete=float(end["time"]),
        status=end["t"],
        value=end.get("value", start.get("value")),
        version=end.get("version", start.get("version")),
        expect=start.get("expect"),
        asked=start.get("asked"),
        to=start.get("to"),
        from_version=end.get("from_version"),
        listed=None if listed is None else {str(k): v for k, v in listed.items()},
        error=end.get("error"),
        extra={k: v for k, v in {**end, **start}.items() if k not in _RECORD_FIELDS},  # as invoked
    )


def check(ops: list[Op], final: Final, *, max_versions: int = 100) -> list[str]:
    """The anomalies in `ops` and `final` (see the module docstring); [] if none.
    `max_versions`: the secrets' version limit, below which old unlabelled versions may be pruned."""
    for index, op in enumerate(ops):
        op.index = index
    return _Checker(ops, final, max_versions).run()


class _Checker:
    def __init__(self, ops: list[Op], final: Final, max_versions: int) -> None:
        self.ops = ops
        self.final = final
        # Labelled versions are never pruned, so a few more than the limit may be kept.
        self.prune_margin = max_versions - 3
        self.anomalies: list[str] = []
        self.by_name: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            self.by_name[op.name].append(op)
            if op.kind in ("cp", "mv") and op.to is not None:
                self.by_name[op.to].append(op)
        # Every value a put or stage tried to write (whatever its outcome), to the op that wrote it.
        self.writer_of: dict[str, Op] = {}
        for op in ops:
            if op.kind in ("put", "stage") and op.value is not None:
                self.writer_of[op.value] = op
        # (name, version) -> the ok write that made it
        self.made: dict[tuple[str, int], Op] = {}
        # Per name, built once: what the read checks rescanned every op of the name for, per read
        # and per earlier write or delete (cubic: seconds of CPU for one 10 s history, minutes of
        # wall time on a loaded machine).
        self._allowed: dict[str, set[str]] = {}
        self._undoers: dict[tuple[str, str], tuple[list[float], list[float]]] = {}

    def report(self, what: str, *ops: Op) -> None:
        self.anomalies.append("; ".join([what, *(str(op) for op in ops)]))

    def run(self) -> list[str]:
        self.check_unknown_outcomes_say_so()
        self.check_unique_versions()
        self.check_final_state()
        self.check_compare_and_set()
        self.check_reads()
        self.check_keys()
        return self.anomalies

    def check_unknown_outcomes_say_so(self) -> None:
        """A change whose outcome the store says is unknown ("may have been made") is raised as
        such (`OutcomeUnknownError`, or `ChangeUnrecordedError`: made), through any client, so a
        caller can tell it from a refusal that changed nothing. (`error` is "Class: message" from
        API clients; the CLI's exit code is 1 for either.)"""
        for op in self.ops:
            said = op.error or ""
            if (
                op.status == "info"
                and "may have been made" in said
                and ":" in said.split()[0]
                and not said.startswith(("OutcomeUnknownError:", "ChangeUnrecordedError:"))
            ):
                self.report(f"unknown outcome raised as {said.split(':')[0]}", op)

    # ---- writes --------------------------------------------------------------------------------

    def ok_writes(self, name: str) -> list[Op]:
        return [
            op
            for op in self.by_name[name]
            if op.kind in WRITES and op.status == "ok" and op.writes_to == name and op.version is not None
        ]

    def check_unique_versions(self) -> None:
        for name in list(self.by_name):
            for op in self.ok_writes(name):
                assert op.version is not None
                other = self.made.setdefault((name, op.version), op)
                if other is not op:
                    self.report(
                        f"duplicate version: two writes acknowledged as {name} v{op.version}", other, op
                    )

    def values_allowed_in(self, name: str) -> set[str]:
        """Values a version of `name` may hold: written to it, or copied into it from another."""
        if name not in self._allowed:
            self._allowed[name] = self._values_allowed_in(name)
        return self._allowed[name]

    def _values_allowed_in(self, name: str) -> set[str]:
        allowed = {op.value for op in self.by_name[name] if op.kind in ("put", "stage") and op.name == name}
        sources = {op.name for op in self.by_name[name] if op.kind in ("cp", "mv") and op.to == name}
        seen: set[str] = set()
        while sources - seen:  # copies of copies
            source = (sources - seen).pop()
            seen.add(source)
            allowed |= {
                op.value for op in self.by_name[source] if op.kind in ("put", "stage") and op.name == source
            }
            sources |= {op.name for op in self.by_name[source] if op.kind in ("cp", "mv") and op.to == source}
        return {value for value in allowed if value is not None}

    def erased(self, name: str, version: int, before: float = float("inf")) -> bool:
        """Whether a destroy of that version, or pruning, may have erased it (invoked before `before`)."""
        for op in self.by_name[name]:
            if op.kind == "destroy" and op.version == version and op.status != "fail" and op.invoke < before:
                return True
        newest = max((v for v in self.final.get(name, FinalSecret(False, None)).versions), default=0)
        return newest - version >= self.prune_margin

    def check_final_state(self) -> None:
        for name in sorted(set(self.by_name) | set(self.final)):
            held = self.final.get(name)
            versions = held.versions if held is not None else {}
            for op in self.ok_writes(name):
                assert op.version is not None
                if op.version not in versions:
                    if not self.erased(name, op.version):
                        self.report(
                            f"lost write: {name} v{op.version} was acknowledged; the store does not hold it",
                            op,
                        )
                    continue
                stored = versions[op.version]
                if stored is None:
                    if not self.erased(name, op.version):
                        self.report(
                            f"lost write: {name} v{op.version} was acknowledged, and destroyed unasked",
                            op,
                        )
                elif op.kind in ("put", "stage") and stored != op.value:
                    self.report(
                        f"wrong value: {name} v{op.version} holds {stored}, not the value acknowledged", op
                    )
            allowed = self.values_allowed_in(name)
            if versions:
                newest = max(versions)
                for number in range(1, newest + 1):
                    if (
                        number not in versions
                        and newest - number < self.prune_margin
                        and not any(
                            op.kind == "destroy" and op.version == number for op in self.by_name[name]
                        )
                    ):
                        self.report(f"version gap: {name} holds v{newest} but not v{number}")
            # A value may be held twice only by copies into this name (a cp of the version it holds).
            # (An mv whose copy's metadata write failed on Vault or AWS leaves the copy made.)
            copies = sum(op.kind in ("cp", "mv") and op.to == name for op in self.by_name[name])
            at: dict[str, int] = {}
            for number, stored in sorted(versions.items()):
                if stored is None:
                    continue
                if stored in at and stored in self.writer_of:
                    if copies == 0:
                        self.report(
                            f"write applied twice: {name} v{at[stored]} and v{number} hold one write's value",
                            self.writer_of[stored],
                        )
                    copies -= 1
                at.setdefault(stored, number)
                writer = self.writer_of.get(stored)
                if stored not in allowed:
                    if writer is None:
                        self.report(f"value never written: {name} v{number} holds {stored}")
                    else:
                        self.report(
                            f"value of another secret: {name} v{number} holds one written to {writer.name}",
                            writer,
                        )
                elif writer is not None and writer.status == "fail" and writer.name == name:
                    self.report(
                        f"refused write applied: {name} v{number} holds the value of a write that failed",
                        writer,
                    )

    def check_compare_and_set(self) -> None:
        for name, ops in self.by_name.items():
            setters = [
                op
                for op in ops
                if op.kind in SETS_CURRENT
                and op.status == "ok"
                and op.writes_to == name
                and self.set_version(op) is not None
            ]
            for cas in ops:
                if (
                    cas.kind not in ("put", "delete")
                    or cas.expect is None
                    or cas.status != "ok"
                    or cas.name != name
                ):
                    continue
                for setter in setters:
                    version = self.set_version(setter)
                    assert version is not None
                    if setter is not cas and version > cas.expect and setter.complete < cas.invoke:
                        self.report(
                            f"compare-and-set on a stale version: {name} expected v{cas.expect}, "
                            f"but v{version} was current before it started",
                            setter,
                            cas,
                        )
                        break

    def set_version(self, op: Op) -> int | None:
        """The version an ok operation made current."""
        if op.kind == "promote" or op.kind in ("put", "cp", "mv"):
            return op.version
        return None

    # ---- reads ---------------------------------------------------------------------------------

    def check_reads(self) -> None:
        for op in self.ops:
            self.check_deleted_state(op)
            if op.status != "ok":
                if op.kind == "get" and op.status == "fail" and op.error == "not_found":
                    if op.asked is None:
                        self.check_read_not_found(op.name, op)
                    else:
                        self.check_version_not_found(op)
                continue
            if op.kind == "get":
                self.check_read_value(op)
                if op.asked is not None:
                    self.check_not_destroyed(op)
                if op.version is not None and op.asked is None:
                    self.check_read_current(op.name, op.version, op)
            elif op.kind in ("cp", "mv") and op.from_version is not None:
                self.check_copy(op)
            elif op.kind == "list" and op.listed is not None:
                for name, current in op.listed.items():
                    if current is not None:
                        self.check_read_current(name, current, op)
                for name in self.by_name:
                    if name.startswith(op.name) and name not in op.listed:
                        self.check_read_not_found(name, op)

    def check_deleted_state(self, op: Op) -> None:
        """What deletes, undeletes and writes found of the secret's deleted state, and refusals of
        compare-and-sets, against the deletes and undeletes around them."""
        name = op.name
        refused = op.status == "fail"
        if op.kind == "delete" and op.status == "ok":
            self.check_live(name, op, "delete of a deleted secret acknowledged")
        elif op.kind == "delete" and refused and op.error == "not_found":
            self.check_read_not_found(name, op, "delete found no")
        elif op.kind == "undelete" and op.status == "ok":
            self.check_read_not_found(name, op, "undelete acknowledged of a live")
        elif op.kind == "undelete" and refused and op.error == "conflict":
            deleted = self.deleted_before(name, op)
            if deleted is not None:
                self.report(f"undelete refused as if live: {name} was deleted before it began", deleted, op)
        elif op.kind == "put" and refused and op.error == "conflict":
            if op.expect is None:  # a plain write is refused only while the secret is deleted
                self.check_read_not_found(name, op, "write refused as if deleted:")
            else:
                self.check_compare_and_set_refusal(op)

    def check_compare_and_set_refusal(self, cas: Op) -> None:
        """A put expecting version N was refused: N was not current, or the secret deleted, at some
        instant while it ran. Not so if a write acknowledged before it began made N current, and
        nothing that could change that (a write, a promote, a copy into it, a delete) can have
        come between."""
        name = cas.name
        for setter in self.by_name[name]:
            if not (
                setter.kind in SETS_CURRENT
                and setter.status == "ok"
                and setter.writes_to == name
                and setter.version == cas.expect
                and setter.complete < cas.invoke
            ):
                continue
            changed = any(
                op is not setter
                and op.invoke < cas.complete
                and op.complete > setter.invoke
                and (
                    (
                        op.kind in SETS_CURRENT
                        and op.writes_to == name
                        and (op.status != "fail" or op.kind == "mv")
                    )
                    # a failed mv too: it deletes OLD before it writes NEW, and undeletes OLD if
                    # that write fails (a put meanwhile finds OLD deleted: a conflict)
                    or (self.deletes(op, name) and (op.status != "fail" or op.kind == "mv"))
                )
                for op in self.by_name[name]
            )
            if not changed:
                self.report(f"compare-and-set refused while v{cas.expect} of {name} was current", setter, cas)
            return

    def check_copy(self, copy: Op) -> None:
        """A cp or mv reads `name`'s current version and writes its value as a version of `to`."""
        assert copy.from_version is not None and copy.to is not None
        self.check_read_current(copy.name, copy.from_version, copy)
        source = self.made.get((copy.name, copy.from_version))
        held = self.final.get(copy.to)
        if source is None or source.kind not in ("put", "stage") or held is None or copy.version is None:
            return
        copied = held.versions.get(copy.version)
        if copied is not None and copied != source.value:
            self.report(
                f"wrong copy: {copy.to} v{copy.version} does not hold {copy.name} v{copy.from_version}",
                source,
                copy,
            )

    def check_read_value(self, read: Op) -> None:
        name, version, value = read.name, read.version, read.value
        if value is None or version is None:
            return
        writer = self.writer_of.get(value)
        if value not in self.values_allowed_in(name):
            if writer is None:
                self.report(f"read of a value never written: {name} v{version}", read)
            else:
                self.report(f"read of another secret's value: {name} v{version}", writer, read)
            return
        if writer is not None:
            if writer.status == "fail":
                self.report(f"read of a refused write: {name} v{version}", writer, read)
            if writer.invoke > read.complete:
                self.report(
                    f"read from the future: {name} v{version} read before its write began", writer, read
                )
        made = self.made.get((name, version))
        if made is not None and made.kind in ("put", "stage") and made.value != value:
            self.report(
                f"wrong value read: {name} v{version} is not the value acknowledged for it", made, read
            )

    def check_not_destroyed(self, read: Op) -> None:
        for op in self.by_name[read.name]:
            if (
                op.kind == "destroy"
                and op.version == read.asked
                and op.status == "ok"
                and op.complete < read.invoke
            ):
                self.report(f"read of a destroyed version: {read.name} v{read.asked}", op, read)
                return

    def check_read_current(self, name: str, version: int, read: Op) -> None:
        """A read of `name`'s current version (a get, or a list) that answered `version`."""
        for op in self.by_name[name]:
            if op is read or op.status != "ok" or op.complete >= read.invoke:
                continue
            newer: int | None = None
            if (op.kind in SETS_CURRENT and op.writes_to == name) or (
                op.kind == "get" and op.name == name and op.asked is None
            ):
                newer = op.version  # made current, or read as current
            elif op.kind == "list" and op.listed is not None:
                newer = op.listed.get(name)
            if newer is not None and newer > version:
                self.report(
                    f"stale read: {name} v{version}, but v{newer} was current before the read started",
                    op,
                    read,
                )
                return
        self.check_live(name, read, "read of a deleted secret")

    def check_live(self, name: str, op: Op, what: str) -> None:
        """`op` found `name` live (not deleted)."""
        deleted = self.deleted_before(name, op)
        if deleted is not None:
            self.report(f"{what}: {name} was deleted before it began, not undeleted since", deleted, op)

    def deleted_before(self, name: str, read: Op) -> Op | None:
        """An acknowledged delete of `name` before `read` began that no undelete can have undone."""
        undone_until = self.last_undo_end(name, "undelete", read.complete)
        for delete in self.by_name[name]:
            if not self.deletes(delete, name) or delete.status != "ok" or delete.complete >= read.invoke:
                continue
            if not undone_until > delete.invoke:  # no undelete that `read` can follow ended after it
                return delete
        return None

    def last_undo_end(self, name: str, kind: str, before: float) -> float:
        """The latest end of an op of `name` that may have undone a state (an undelete, or for
        kind "delete" a delete or an mv from it; not refused, except an mv, which deletes OLD before
        it writes NEW and undeletes it if that write fails) invoked before `before`; -inf if none.
        Such an op can have undone a state made by an op invoked at t iff it ended after t."""
        if (name, kind) not in self._undoers:
            undoers = sorted(
                (op.invoke, op.complete)
                for op in self.by_name[name]
                if (op.status != "fail" or (kind == "delete" and op.kind == "mv"))
                and (self.deletes(op, name) if kind == "delete" else op.kind == kind and op.name == name)
            )
            latest, ends = float("-inf"), []
            for _, complete in undoers:
                latest = max(latest, complete)
                ends.append(latest)
            self._undoers[name, kind] = ([invoke for invoke, _ in undoers], ends)
        invokes, ends = self._undoers[name, kind]
        count = bisect.bisect_left(invokes, before)
        return ends[count - 1] if count else float("-inf")

    def deletes(self, op: Op, name: str) -> bool:
        return op.name == name and op.kind in ("delete", "mv")

    def check_read_not_found(self, name: str, read: Op, what: str = "read found no") -> None:
        """A read of `name`'s current version found nothing (or a list did not name it)."""
        for live in self.by_name[name]:
            if live.status != "ok" or live.complete >= read.invoke:
                continue
            if not (
                (live.kind in ("put", "undelete", "promote") and live.name == name)
                or (live.kind in ("cp", "mv") and live.to == name)
            ):
                continue
            if not self.last_undo_end(name, "delete", read.complete) > live.invoke:
                self.report(
                    f"{what} {name}, which was live before it started and not deleted since",
                    live,
                    read,
                )
                return

    def check_version_not_found(self, read: Op) -> None:
        name, version = read.name, read.asked
        assert version is not None
        made = self.made.get((name, version))
        if made is None or made.complete >= read.invoke or self.erased(name, version, read.complete):
            return
        if any(
            self.deletes(op, name) and op.status != "fail" and op.invoke < read.complete
            for op in self.by_name[name]
        ):
            return
        self.report(f"acknowledged version not found: {name} v{version}", made, read)

    # ---- key management under load (tests/history_maintenance.py) ------------------------------

    def check_keys(self) -> None:
        """The maintenance client's rotations, rewraps, retirements and passwd against what the
        other clients and its own sweeps (every version read by number) saw."""
        self.maintenance = sorted(
            (op for op in self.ops if op.kind.startswith("keys_") or op.kind in ("passwd", "sweep")),
            key=lambda op: op.invoke,
        )
        for op in self.ops:
            if op.status != "ok" and (op.error or "").startswith(("IntegrityError", "exit 6")):
                self.report(f"integrity error{self.after_maintenance(op)}", op)
            elif (op.error or "").startswith("unlock"):
                self.check_unlock_refusal(op)
            elif op.kind == "sweep" and op.status == "ok":
                self.check_sweep(op)
            elif op.kind == "keys_status" and op.status == "ok":
                self.check_key_status(op, [tuple(key) for key in op.extra.get("keys", [])])

    def after_maintenance(self, op: Op) -> str:
        """' after X' naming the last key operation that began before `op` ended, if any."""
        before = [m for m in self.maintenance if m is not op and m.invoke < op.complete and m.kind != "sweep"]
        return f" after {before[-1]}" if before else ""

    def rotations(self) -> list[Op]:
        return [op for op in self.maintenance if op.kind == "keys_rotate" and op.status != "fail"]

    def check_sweep(self, sweep: Op) -> None:
        """Every version acknowledged before the sweep began is read by number, with its value and
        sealed by a key no older than the primary when its write began; after a rewrap with no
        rotation since, by the primary."""
        versions: Mapping[str, Mapping[str, list[Any]]] = sweep.extra.get("versions", {})
        keys = [tuple(key) for key in sweep.extra.get("keys", [])]
        order = {key[0]: position for position, key in enumerate(keys)}
        for error in sweep.extra.get("errors", []):
            if "IntegrityError" in error or "not stored" in error:
                self.report(f"integrity error in a sweep: {error}{self.after_maintenance(sweep)}", sweep)
        for (name, number), write in sorted(self.made.items(), key=lambda item: item[0]):
            if write.complete >= sweep.invoke:
                continue
            held = versions.get(name, {}).get(str(number))
            if held is None or held[0] is None:
                if not self.erased(name, number, sweep.complete) and not any(
                    e.startswith(f"{name} v{number}: skipped") for e in sweep.extra.get("errors", [])
                ):
                    self.report(
                        f"version lost: {name} v{number} was acknowledged; a sweep did not find it"
                        f"{self.after_maintenance(sweep)}",
                        write,
                        sweep,
                    )
                continue
            value, key_id = held
            expected = self.value_of(write)
            if expected is not None and value != expected:
                self.report(
                    f"version changed: {name} v{number} reads {value}, not the value acknowledged"
                    f"{self.after_maintenance(sweep)}",
                    write,
                    sweep,
                )
            rotated = [r for r in self.rotations() if r.status == "ok" and r.complete < write.invoke]
            newest = rotated[-1].extra.get("key") if rotated else None
            if key_id in order and newest in order and order[key_id] < order[newest]:
                self.report(
                    f"write acknowledged under an old key generation: {name} v{number} is sealed by "
                    f"key {key_id}, older than key {newest}, primary before the write began",
                    rotated[-1],
                    write,
                    sweep,
                )
        primary = next((key[0] for key in keys if key[1] == "primary"), None)
        rewrap = self.rewrap_unrotated_since(sweep)
        if rewrap is not None and primary is not None:
            for name, held_versions in sorted(versions.items()):
                for number, (value, key_id) in sorted(held_versions.items()):
                    if value is not None and key_id != primary:
                        self.report(
                            f"rewrap skipped: {name} v{number} is sealed by key {key_id}, not the "
                            f"primary {primary}, after a rewrap with no rotation since",
                            rewrap,
                            sweep,
                        )

    def value_of(self, write: Op) -> str | None:
        """The value an ok write made: its own, or for a copy the value of the version copied."""
        if write.kind in ("put", "stage"):
            return write.value
        source = self.made.get((write.name, write.from_version or 0))
        return None if source is None or source is write else self.value_of(source)

    def rewrap_unrotated_since(self, read: Op) -> Op | None:
        """An acknowledged rewrap that ended before `read` began, with no rotation since it began."""
        for rewrap in reversed(self.maintenance):
            if rewrap.kind == "keys_rewrap" and rewrap.status == "ok" and rewrap.complete < read.invoke:
                if any(r.invoke < read.complete and r.complete > rewrap.invoke for r in self.rotations()):
                    return None
                return rewrap
        return None

    def check_key_status(self, status: Op, keys: list[tuple[Any, ...]]) -> None:
        """`keys status` names as primary the key the last rotation made, shows each retired key in
        the state its last disable, enable or destroy left, and after a rewrap with no rotation
        since, no record under any key but the primary."""
        states = {key[0]: key[1] for key in keys}
        before = [op for op in self.maintenance if op.complete < status.invoke]
        rotated = [op for op in before if op.kind == "keys_rotate" and op.status != "fail"]
        overlapping = any(
            op.kind == "keys_rotate" and op.invoke < status.complete and op.complete > status.invoke
            for op in self.maintenance
        )
        if rotated and rotated[-1].status == "ok" and not overlapping:
            made = rotated[-1].extra.get("key")
            if states.get(made) != "primary":
                self.report(
                    f"keys status inconsistent: key {made}, made primary by the last rotation, is "
                    f"{states.get(made, 'missing')}",
                    rotated[-1],
                    status,
                )
        last: dict[Any, Op] = {}
        for op in before:
            if op.kind in ("keys_disable", "keys_enable", "keys_destroy") and op.status == "ok":
                last[op.extra.get("key")] = op
        expected = {"keys_disable": "disabled", "keys_enable": "enabled", "keys_destroy": "destroyed"}
        for key, op in last.items():
            if states.get(key) != expected[op.kind]:
                self.report(
                    f"keys status inconsistent: key {key} is {states.get(key, 'missing')} after {op.kind}",
                    op,
                    status,
                )
        rewrap = self.rewrap_unrotated_since(status)
        if rewrap is not None:
            for key in keys:
                if key[1] != "primary" and key[2]:
                    self.report(
                        f"rewrap skipped: keys status counts {key[2]} record(s) under key {key[0]}, not "
                        "the primary, after a rewrap with no rotation since",
                        rewrap,
                        status,
                    )

    def check_unlock_refusal(self, op: Op) -> None:
        """A client refused for its master password only where the README says it may be: a new
        process (a CLI run, a handle opened again) holding the password of generation g once a
        passwd from g may have landed; a handle holding the root key (opened with g, not reading
        its file again) once a passwd from g or later and then a root rotation may have landed; a
        handle that reads its password file again (`renew`) within that, until the file holds the
        new password and its RENEW_RETRY_SECONDS (5 s) spacing of attempts has passed."""
        generation = op.extra.get("pw")
        passwds = [
            p
            for p in self.maintenance
            if p.kind == "passwd" and p.status != "fail" and p.invoke < op.complete
        ]
        roots = [
            r
            for r in self.ops
            if r.kind == "keys_rotate_root" and r.status != "fail" and r.invoke < op.complete
        ]
        fresh = (op.error or "").startswith(("unlock: exit", "unlock: UnlockError"))
        if generation == "renew":
            allowed = any(
                op.invoke < p.complete + 6.0 and any(r.complete > p.invoke for r in roots) for p in passwds
            )
            said = "a handle that reads its password file again"
        elif fresh:
            allowed = any(p.extra.get("pw") == generation for p in passwds)
            said = f"a new process with password generation {generation}"
        else:
            allowed = any(
                isinstance(generation, int) and p.extra.get("pw", -1) >= generation
                and any(r.complete > p.invoke for r in roots)
                for p in passwds
            )  # fmt: skip
            said = f"a running handle opened with password generation {generation}"
        if not allowed:
            self.report(
                f"unlock refused where the README says it works: {said}", *passwds[-1:], *roots[-1:], op
            )
