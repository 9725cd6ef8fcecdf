"""`secrets-manager audit show|verify|head|prune|hash|reset|rotate-key`: read, check, witness and
prune the log, and rotate its key.

show, verify and head read the log and are not themselves recorded in it (show opens no store; verify
only reads, and a record of it would change the log it verifies; a failed unlock is recorded as
denied, as everywhere). hash is recorded (`audit.hash`, no name, never the candidate or its
fingerprint): it answers whether a guessed value is a record's, with the audit key. reset starts a
new chain (its first record is `audit.reset`) when the old one lost records. rotate-key makes a
new audit key and keeps the chain (`audit.rotate_key`, docs/audit.md §3a).
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from secrets_manager.access.policy import hex_digits
from secrets_manager.audit import read_witness, value_fingerprint, value_fingerprints
from secrets_manager.audit.anchor import with_fresh_keys
from secrets_manager.cli.app import cli, pass_session, read_value
from secrets_manager.cli.output import (
    counted,
    info_line,
    parse_cutoff,
    print_json,
    print_table,
    timestamp,
    warning_line,
)
from secrets_manager.cli.recovery_commands import read_share_file
from secrets_manager.cli.rotate_commands import terminate_as_interrupt
from secrets_manager.cli.session import Session
from secrets_manager.errors import InvalidInputError, NotFoundError, Terminated
from secrets_manager.store.base import AuditedStore


@cli.group()
def audit() -> None:
    """Read, verify and prune the tamper-evident audit log, and rotate its key."""


# The operations whose record says a secret's value was handed to its actor (docs/audit.md §2): a
# read by name (`get`, the service's per-name records of BatchGetSecrets included), a TOTP seed
# (`otp`), the values `run` and `inject` put in a program's environment or a file, and the current
# value `store NAME#FIELD`, `edit` and a rotation read before writing. `list`, `history` and
# `batch_get`'s request record name secrets without reading them; `backup` copies ciphertext.
VALUE_READS = frozenset({"get", "otp", "run", "inject", "export", "store.read", "edit.read", "rotate.read"})


_FINGERPRINT = re.compile(r"hmac-sha256:[0-9a-f]{64}")


@audit.command()
@click.option("--name", "name_prefix", metavar="PREFIX", help="Only records for names starting with PREFIX.")
@click.option(
    "--exact",
    is_flag=True,
    help="With --name: only records for that very name, not for the names it begins "
    "(BINANCE_API_KEY without BINANCE_API_KEY_TESTNET).",
)
@click.option(
    "--actor",
    metavar="ACTOR",
    help="Only records by this actor (an OS user, or a client certificate's identity as the "
    "service records it: spiffe://DOMAIN/NAME).",
)
@click.option(
    "--serial",
    metavar="SERIAL",
    help="Only the service's records of requests made with the client certificate of this serial "
    "number (hex, as pki issue or openssl x509 -serial print it; colons allowed).",
)
@click.option(
    "--since", metavar="TIME", help="Only records at or after TIME (ISO 8601, or 30m / 12h / 7d ago)."
)
@click.option(
    "--until", metavar="TIME", help="Only records at or before TIME (ISO 8601, or 30m / 12h / 7d ago)."
)
@click.option(
    "--read",
    "reads",
    is_flag=True,
    help="Only the reads that handed a secret's value to their actor (get, otp, run, inject, export, "
    "store.read, edit.read, rotate.read; allowed and ok): who read NAME since TIME.",
)
@click.option(
    "--operation",
    "operations",
    multiple=True,
    metavar="OP",
    help="Only these operations (repeatable; a glob such as 'rotate.*').",
)
@click.option(
    "--denied",
    is_flag=True,
    help="Only requests refused before they were authorised (decision deny): policy denials, "
    "malformed names, callers without a valid certificate, failed unlocks.",
)
@click.option("--failed", is_flag=True, help="Only records whose outcome is not ok (denials and errors).")
@click.option("--request-id", metavar="ID", help="Only the records of one request.")
@click.option(
    "--value-hmac",
    "fingerprints",
    multiple=True,
    metavar="FINGERPRINT",
    help="Only the records of the value with this fingerprint (hmac-sha256:…, as 'audit hash' "
    "prints it; repeatable: 'audit hash --every-key' gives one per audit key): who read or wrote "
    "a leaked value.",
)
@click.option(
    "--last", type=click.IntRange(min=1), metavar="N", help="Only the last N of the records selected."
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Then print each record that matches as it is written (as tail -f; rotations followed) "
    "until Ctrl-C or SIGTERM (exit 0); with --json one object per line.",
)
@click.option(
    "--summary",
    is_flag=True,
    help="One row per actor, secret, version and client certificate serial instead of each "
    "record: how many, first and last time, and the peers' addresses (with --read: who read "
    "what, from where, with which certificate).",
)
@click.option(
    "--archive",
    metavar="DIR",
    help="Show the files 'audit prune --archive DIR' moved there first, in their place in the "
    "chain: the records pruned from the log too.",
)
@click.option(
    "--serve-periods",
    is_flag=True,
    help="Instead of records: one row per 'serve' this log recorded (its start's request id), when "
    "it started and stopped and how: a clean stop's signal and drain, or no stop record (crashed, "
    "killed, or still running). Reads the whole log; other selections do not apply.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON array.")
@click.option(
    "--json-lines",
    is_flag=True,
    help="Print one record per line, as the log stores it (JSON lines, times UTC with +00:00), "
    "for a SIEM or a log store; with --summary one row per line.",
)
@pass_session
def show(
    session: Session,
    name_prefix: str | None,
    exact: bool,
    actor: str | None,
    serial: str | None,
    since: str | None,
    until: str | None,
    reads: bool,
    operations: tuple[str, ...],
    denied: bool,
    failed: bool,
    request_id: str | None,
    fingerprints: tuple[str, ...],
    last: int | None,
    follow: bool,
    summary: bool,
    archive: str | None,
    serve_periods: bool,
    as_json: bool,
    json_lines: bool,
) -> None:
    """Print audit records (values never appear in them), oldest first."""
    session.require_local("audit show")
    if exact and name_prefix is None:
        raise InvalidInputError("--exact selects the name --name gives: give --name NAME with it")
    cutoff = parse_cutoff(since, "--since", "leave --since out to show every record") if since else None
    end = (
        _through_its_second(until, parse_cutoff(until, "--until", "leave --until out to show every record"))
        if until
        else None
    )
    certificate = _serial_number(serial, "--serial") if serial is not None else None
    for fingerprint in fingerprints:
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise InvalidInputError(  # not echoed: it may be the value itself, given by mistake
                "--value-hmac takes a value's fingerprint, as 'secrets-manager audit hash' prints it "
                "(hmac-sha256: and 64 hex digits), never the value"
            )
    if as_json and json_lines:
        raise InvalidInputError(
            "--json prints one JSON array, --json-lines a record per line: give one of them"
        )
    if end is not None and follow:
        raise InvalidInputError("--until ends the selection, --follow never does: give one of them")
    if summary and follow:
        raise InvalidInputError(
            "--summary counts a selection that ends, --follow never does: give one of them"
        )
    if archive is not None and follow:
        raise InvalidInputError(
            "--archive shows records pruned from the log, --follow the records written next: give one of them"
        )
    archived = Path(archive) if archive is not None else None
    if archived is not None and not archived.is_dir():
        raise InvalidInputError(
            f"archive directory {archive} does not exist: give the one 'audit prune --archive' used"
        )
    if end is not None and cutoff is not None and end < cutoff:
        raise InvalidInputError(
            f"--until {until} is before --since {since}: no record can be in between; swap them"
        )

    def partial(path: Path, number: int) -> None:
        warning_line(
            f"line {number} of audit log {path}, its last, is a partial record (not shown): "
            "'secrets-manager audit verify' says whether a crash cut it short; the next audited "
            "operation sets it aside"
        )

    log = session.audit_log()
    if not log.files(archived):  # a mistyped --store or --audit-file: not an empty log, say so
        raise NotFoundError(
            f"no audit log at {log.path}: check --store (the log is beside the store) or give "
            "--audit-file the log to show"
        )

    actors_seen: set[str] = set()

    def matches(record: dict[str, Any]) -> bool:
        if actor is not None:
            actors_seen.add(str(record.get("actor")))
        return (
            (
                name_prefix is None
                or (
                    record.get("name") == name_prefix
                    if exact
                    else str(record.get("name") or "").startswith(name_prefix)
                )
            )
            and (actor is None or record.get("actor") == actor)
            and (certificate is None or _serial_number_of(record) == certificate)
            and (cutoff is None or record_time(record) >= cutoff)
            and (end is None or record_time(record) <= end)
            and (
                not reads
                or (
                    record.get("operation") in VALUE_READS
                    and record.get("decision") == "allow"
                    and record.get("outcome") == "ok"
                )
            )
            and (
                not operations
                or any(fnmatch.fnmatchcase(str(record.get("operation")), op) for op in operations)
            )
            and (not denied or record.get("decision") == "deny")
            and (not failed or record.get("outcome") not in ("ok", "pending"))
            and (request_id is None or record.get("request_id") == request_id)
            and (not fingerprints or record.get("value_hmac") in fingerprints)
        )

    def last_of(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        # --last keeps only N records in memory while the log streams by: the whole of a 500k-record
        # log as a list took 1.2 GB to show five of them.
        # (maxlen is a C ssize_t: a larger N, which no log holds, is all of them)
        matching = (record for record in records if matches(record))
        return list(
            collections.deque(matching, maxlen=min(last, sys.maxsize)) if last is not None else matching
        )

    if serve_periods:
        if follow or summary:
            raise InvalidInputError(
                "--serve-periods lists the service's runs in the whole log: give it without "
                "--follow and --summary"
            )
        periods = serve_periods_of(log.records(on_partial=partial, archive=archived))
        if json_lines:
            for period in periods:
                print_json(period, compact=True)
        elif as_json:
            print_json(periods)
        else:
            _print_periods(periods)
        return
    if follow:
        _follow(lambda stop: log.follow(stop, on_partial=partial), matches, last_of, as_json or json_lines)
        return
    selected = last_of(log.records(on_partial=partial, archive=archived))
    if actor is not None and actor not in actors_seen:
        _name_the_identities_meant(actor, actors_seen)
    if summary:
        groups = _summarised(selected)
        if json_lines:
            for group in groups:
                print_json(group, compact=True)
            return
        if as_json:
            print_json(groups)
            return
        _print_summary(groups)
        return
    if json_lines:  # keys sorted, no spaces: each record's line as the log wrote it (§2)
        for record in selected:
            print_json(record, compact=True)
        return
    if as_json:
        print_json(selected)
        return
    _print_records(selected, header=True)


def _follow(
    follow: Callable[[threading.Event], Iterator[Iterable[dict[str, Any]]]],
    matches: Callable[[dict[str, Any]], bool],
    last_of: Callable[[Iterable[dict[str, Any]]], list[dict[str, Any]]],
    as_json: bool,
) -> None:
    """`audit show --follow`: the records selected, then each new one that matches, as written,
    until Ctrl-C or SIGTERM (exit 0, quietly: the way to end it)."""
    stop = threading.Event()
    try:
        with terminate_as_interrupt((signal.SIGINT, signal.SIGTERM)):
            for count, batch in enumerate(follow(stop)):
                selected = last_of(batch) if count == 0 else [r for r in batch if matches(r)]
                if as_json:  # JSON lines: an array never ends
                    for record in selected:
                        print_json(record, compact=True)
                elif selected or count == 0:
                    _print_records(selected, header=count == 0)
                sys.stdout.flush()
    except Terminated:
        # The signal's handler can raise in a write that has put its bytes out but not yet
        # emptied the buffer holding them, which Python writes again as it exits: the record
        # last shown was shown twice. What is left to write goes nowhere now.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):  # no descriptor: not the process's
                    os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
        return


# A time written to the second and no finer: `23:59:59` (not `23:59:59.5`), or ISO's basic `T235959`.
_TO_THE_SECOND = re.compile(r"(?:[0-9]{2}:[0-9]{2}:[0-9]{2}|T[0-9]{6})(?![.,]?[0-9])")


def _through_its_second(text: str, moment: datetime) -> datetime:
    """`--until T` for a T written to the second, as every command prints times: the end of that
    second. The table showed a record of 23:59:59.407 as `23:59:59Z`, and `--until 23:59:59Z`
    (its time, copied) left it out, as it did a day's last records for `--until
    2026-03-20T23:59:59Z`. A date, a time to the minute or with a fraction, and an age are the
    moment they name."""
    if _TO_THE_SECOND.search(text):
        return moment.replace(microsecond=999_999)
    return moment


def _serial_number(text: str, option: str) -> int:
    """A certificate serial as pki issue, openssl (`serial=…`) or a policy's [revoked] writes it."""
    digits = hex_digits(text, "serial=")  # as the policy reads [revoked] serials
    if digits is None or len(digits) > 64:
        raise InvalidInputError(
            f"{option} {text!r} is not a certificate serial number in hex (like 3F2A... or 3f:2a:..., "
            "as 'pki issue' or 'openssl x509 -noout -serial' print it)"
        )
    return int(digits, 16)


def _serial_number_of(record: dict[str, Any]) -> int | None:
    """The serial a record names (the service writes upper-case hex), or None."""
    written = record.get("certificate_serial")
    if not isinstance(written, str):
        return None
    try:
        return int(written, 16)
    except ValueError:  # a forged or damaged record: it names no certificate
        return None


def _name_the_identities_meant(actor: str, actors_seen: set[str]) -> None:
    """`--actor market-connector` selected nothing, silently, where the service had recorded
    `spiffe://shrivenquant.local/market-connector`: at 3 a.m. an empty answer reads as "nobody".
    Say which recorded identities end with the name given (the result stays what was asked)."""
    meant = sorted(a for a in actors_seen if a.endswith("/" + actor))
    if meant:
        warning_line(
            f"no record has actor {actor!r}; the service records a client certificate's whole "
            f"identity: --actor {' or --actor '.join(meant)}"
        )


def _summarised(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`--summary`: one row per actor, secret and version (and source, and client certificate
    serial), with how many records, the first and last time and the peers' addresses (their
    ports dropped: a connection each), so a fleet's thousands of reads answer "who read NAME
    since T" in a few lines. In the order of each group's first record. The serial is part of the
    row: the reads made with a certificate later revoked (stolen) were counted in one row with
    those of its identity's renewed one, and the summary could not say which read which."""
    groups: dict[tuple[str, str, str | None, int | None, str | None], dict[str, Any]] = {}
    for record in records:
        key = (
            str(record.get("actor")),
            str(record.get("source")),
            record.get("name"),
            record.get("version"),
            _written_serial(record),
        )
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "actor": key[0],
                "source": key[1],
                "name": key[2],
                "version": key[3],
                "certificate_serial": key[4],
                "count": 0,
                "first": record.get("time"),
                "peers": [],
            }
        group["count"] += 1
        group["last"] = record.get("time")
        host = _peer_host(record.get("peer"))
        if host is not None and host not in group["peers"]:
            group["peers"].append(host)
    return list(groups.values())


def serve_periods_of(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """`--serve-periods`: each `serve` of the log, found by its request id (the start's `pending`,
    then `ok` or why it could not start, then a clean stop's `serve.stop`, docs/audit.md §2), in
    the order of their starts. Pairing by request id, not by order, keeps several serve processes
    writing one log apart. A start with no stop record ended in a crash or a kill (or a log cut
    after it), unless it is still running; a later serve on the same listen address says it ended
    before that one started."""
    periods: dict[str, dict[str, Any]] = {}
    for record in records:
        operation = record.get("operation")
        if operation not in ("serve", "serve.stop") or record.get("source") != "grpc":
            continue
        rid = str(record.get("request_id"))
        period = periods.setdefault(
            rid,
            {
                "request_id": rid,
                "actor": record.get("actor"),
                "listen": record.get("peer"),
                "started": None,
                "policy_sha256": None,
                "stopped": None,
                "stop": None,
                "ended": "no stop record: crashed or killed, or still running",
            },
        )
        outcome = record.get("outcome")
        if operation == "serve.stop":
            period["stopped"] = record.get("time")
            stop = record.get("stopped")
            period["stop"] = stop if isinstance(stop, dict) else None  # else damaged: show verifies nothing
            signal_name = stop.get("signal", "?") if isinstance(stop, dict) else "?"
            period["ended"] = f"stopped cleanly ({signal_name})"
        elif outcome == "ok":
            period["started"] = record.get("time")
            period["policy_sha256"] = record.get("policy_sha256")
        elif outcome != "pending":  # why it could not start, or the error that ended it once started
            period["ended"] = (
                f"did not start ({outcome})"
                if period["started"] is None
                else f"ended on an error ({outcome})"
            )
    found = list(periods.values())
    for at, period in enumerate(found):
        if period["stopped"] is None and period["started"] is not None:
            later = next(
                (p for p in found[at + 1 :] if p["listen"] == period["listen"] and p["started"]), None
            )
            if later is not None:
                period["ended"] = (
                    f"no stop record: crashed or killed before the serve that started at {later['started']}"
                )
    return found


def _print_periods(periods: list[dict[str, Any]]) -> None:
    print_table(
        ["STARTED", "STOPPED", "ACTOR", "LISTEN", "HOW IT ENDED", "IN FLIGHT", "CUT", "REQUEST ID"],
        [
            [
                "" if p["started"] is None else shown_time({"time": p["started"]}),
                "" if p["stopped"] is None else shown_time({"time": p["stopped"]}),
                str(p["actor"]),
                str(p["listen"] or ""),
                str(p["ended"]),
                "" if p["stop"] is None else str(p["stop"].get("in_flight", "")),
                "" if p["stop"] is None else str(p["stop"].get("cut", "")),
                p["request_id"],
            ]
            for p in periods
        ],
        free_text=["ACTOR", "HOW IT ENDED"],
        header=True,
    )


def _written_serial(record: dict[str, Any]) -> str | None:
    """The serial a record names, in upper-case hex as the service writes it (None: none, or not
    hex: a damaged or forged record names no certificate)."""
    return str(record["certificate_serial"]).upper() if _serial_number_of(record) is not None else None


def _peer_host(peer: object) -> str | None:
    """gRPC's `ipv4:10.0.1.5:51234` / `ipv6:[fd00::1]:51234` without the port; else as written."""
    if not isinstance(peer, str) or not peer:
        return None
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and address:
        host, _, port = address.rpartition(":")
        if port.isdigit() and host:
            return f"{kind}:{host}"
    return peer


def _print_summary(groups: list[dict[str, Any]]) -> None:
    print_table(
        ["ACTOR", "SOURCE", "NAME", "VERSION", "RECORDS", "FIRST", "LAST", "PEERS", "SERIAL"],
        [
            [
                str(g["actor"]),
                str(g["source"]),
                str(g["name"] or ""),
                "" if g["version"] is None else str(g["version"]),
                str(g["count"]),
                shown_time({"time": g["first"]}),
                shown_time({"time": g["last"]}),
                " ".join(g["peers"]),
                g["certificate_serial"] or "",
            ]
            for g in groups
        ],
        free_text=["ACTOR", "PEERS"],
        header=True,
    )


def _print_records(records: list[dict[str, Any]], *, header: bool) -> None:
    print_table(
        ["SEQ", "TIME", "ACTOR", "SOURCE", "OPERATION", "NAME", "VERSION", "DECISION", "OUTCOME"],
        [
            [
                str(r.get("seq")),
                shown_time(r),
                str(r.get("actor")),
                str(r.get("source")) + (f" {r['peer']}" if r.get("peer") else ""),
                str(r.get("operation")),
                str(r.get("name") or ""),
                "" if r.get("version") is None else str(r.get("version")),
                str(r.get("decision")),
                str(r.get("outcome")),
            ]
            for r in records
        ],
        free_text=["ACTOR", "SOURCE"],
        header=header,
    )


@audit.command()
@click.option(
    "--archive",
    metavar="DIR",
    help="Walk the files 'audit prune --archive DIR' moved there first: one chain from record 1.",
)
@click.option(
    "--witness",
    metavar="HEAD_OR_FILE",
    help="A head 'audit head' printed (the line, or a file whose last head line counts): the log "
    "must still hold that record.",
)
@pass_session
def verify(session: Session, archive: str | None, witness: str | None) -> None:
    """Check the whole chain: exit 0 with the count, or exit 6 naming the first bad record.

    --archive DIR: with the files pruned into DIR, the chain must run unbroken from record 1.
    --witness: exit 6 if the log no longer holds the record a head shipped off the host names
    (the store and its log rolled back together, or records cut)."""
    session.require_local("audit verify")
    head = read_witness(witness) if witness is not None else None
    archived = Path(archive) if archive is not None else None
    log = session.audit_log()
    store = session.unlock()
    try:
        anchor = store.audit_anchor()
        count = with_fresh_keys(
            store,
            lambda keys: log.verify(
                keys, anchor, anchor_required=not store.audit_anchor_scoped, archive=archived, witness=head
            ),
        )
    finally:
        store.close()
    files = log.files(archived)
    first = log.first_seq() if archived is None else 1
    pruned = f" (records {first} on; those before were pruned)" if first is not None and first > 1 else ""
    if archived is not None:
        kept = sum(1 for path in files if path.parent != log.path.parent)
        pruned = f" ({counted(kept, 'file')} of them from {archived})"
    witnessed = "" if head is None else f"; it holds the witnessed head, record {head.seq} ({head.time})"
    click.echo(
        f"audit log verified: {counted(count, 'record')} in {counted(len(files), 'file')}{pruned}{witnessed}"
    )


@audit.command()
@pass_session
def head(session: Session) -> None:
    """Print the head of the verified log (its newest record's seq, time and hash, with a MAC
    under the audit key) as one line to ship off the host; 'audit verify --witness' checks it.
    Not itself recorded (it only reads)."""
    session.require_local("audit head")
    log = session.audit_log()
    store = session.unlock()
    try:
        anchor = store.audit_anchor()
        found = with_fresh_keys(
            store, lambda keys: log.head(keys, anchor, anchor_required=not store.audit_anchor_scoped)
        )
    finally:
        store.close()
    click.echo(found.line)


@audit.command("reset")
@click.option(
    "--accept-loss",
    is_flag=True,
    help="Confirm that the log's missing or damaged records are accepted as lost.",
)
@click.option(
    "--share-file",
    "share_files",
    multiple=True,
    metavar="PATH",
    help="Open the store with recovery shares (repeat for each) when its password or KMS key is lost too.",
)
@pass_session
def reset(session: Session, accept_loss: bool, share_files: tuple[str, ...]) -> None:
    """Start the audit log again when it lost records or was damaged (a store restored without its
    log, a deleted or edited file), which otherwise stops every command. The old files are kept
    beside it as <file>.lost-<time>; the new chain begins with an 'audit.reset' record. Refused
    while the log verifies."""
    session.require_local("audit reset")
    if not accept_loss:
        raise InvalidInputError(
            "this starts a new audit chain and sets the old log files aside; give --accept-loss once "
            "you have checked them ('secrets-manager audit verify' says what is wrong)"
        )
    log = session.audit_log()
    store: AuditedStore = (
        session.open_with_recovery_shares(
            [read_share_file(Path(p), session.environment) for p in share_files]
        )
        if share_files
        else session.unlock()
    )
    try:
        outcome = log.reset(store, session.event("audit.reset"))
    finally:
        store.close()
    if outcome.set_aside is not None:
        info_line(
            f"the audit log ended in a partial record (a write a crash cut short): it was set aside "
            f"as {outcome.set_aside.name}, as the next audited command would have done"
        )
    if outcome.problem is None and outcome.set_aside is not None:
        info_line(f"the audit log verifies ({counted(outcome.records, 'record')}): no new chain was begun")
        return
    if outcome.problem is None:
        raise InvalidInputError(
            f"the audit log verifies ({counted(outcome.records, 'record')}): there is nothing to reset"
        )
    info_line(f"the audit log was: {outcome.problem}")
    moved = outcome.moved
    kept = f"; the old files are kept as {', '.join(p.name for p in moved)}" if moved else ""
    info_line(f"a new audit chain begins at {log.path}{kept}")


@audit.command("rotate-key")
@pass_session
def rotate_key(session: Session) -> None:
    """Make a new audit key and MAC every record from now on (and fingerprint every value) under
    it, keeping the one chain: the old keys stay, sealed in the store, so 'audit verify' still
    checks what they signed, and an 'audit.rotate_key' record, MAC'd under the old key, names the
    new one (never the key itself). A record MAC'd under the old key after it is a forgery. Run it
    after a copy of the store and its password may have leaked. On a store several hosts share
    (PostgreSQL, Vault, AWS) each host's log moves to the new key within seconds."""
    session.require_local("audit rotate-key")
    # Our store proves its password (never the agent's key); Vault and AWS need no unlock.
    opened = (
        session.operation("audit.rotate_key", mutating=True)
        if session.needs_password
        else session.store_operation("audit.rotate_key", mutating=True)
    )
    with opened as (store, event):
        event.version = store.rotate_audit_key()
    info_line(
        f"audit key {event.version} is in force: records from now on are MAC'd under it; the "
        f"older {'key stays' if event.version == 2 else 'keys stay'} in the store to verify "
        "what they signed"
    )


@audit.command("prune")
@click.option(
    "--older-than",
    metavar="TIME",
    help="Only files whose newest record is older than TIME (ISO 8601, or an age: 90d, 12h).",
)
@click.option(
    "--keep-files",
    type=click.IntRange(min=0),
    metavar="N",
    help="Keep the newest N rotated files whatever their age.",
)
@click.option(
    "--archive",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Move the files into DIR (an existing directory; never overwriting) instead of deleting them.",
)
@click.option("--dry-run", is_flag=True, help="Say which files would go; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_session
def prune(
    session: Session,
    older_than: str | None,
    keep_files: int | None,
    archive: Path | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove the oldest rotated audit files (never the live one) so the log stops growing and
    still verifies: an 'audit.prune' record says where the chain now begins. Only a log that
    verifies is pruned, and only files whose records the store has anchored. Deleting rotated
    files by hand (logrotate) makes 'audit verify' and 'status' fail; use this instead."""
    session.require_local("audit prune")
    if older_than is None and keep_files is None:
        raise InvalidInputError(
            "say which files may go: --older-than TIME (e.g. 90d), --keep-files N, or both"
        )
    cutoff = parse_cutoff(older_than, "--older-than", "or give --keep-files alone") if older_than else None
    log = session.audit_log()
    store = session.unlock()
    try:
        outcome = log.prune(
            store,
            session.event("audit.prune"),
            older_than=cutoff,
            keep_files=keep_files,
            archive=None if archive is None else archive.absolute(),
            dry_run=dry_run,
        )
    finally:
        store.close()
    files = [
        {
            "file": str(found.path),
            "first_seq": found.first_seq,
            "last_seq": found.last_seq,
            "newest_record": found.last_time,
            **({"archived_to": str(outcome.archived[i])} if outcome.archived else {}),
        }
        for i, found in enumerate(outcome.files)
    ]
    begins = outcome.files[-1].last_seq + 1 if outcome.files else None
    if as_json:
        print_json({"dry_run": dry_run, "files": files, "chain_begins_at": begins})
        return
    if not outcome.files:
        click.echo("nothing to prune: no rotated file matches (the live file is never pruned)")
        return
    verb = "would remove" if dry_run else ("archived" if archive is not None else "removed")
    for entry in files:
        where = f" -> {entry['archived_to']}" if "archived_to" in entry else ""
        click.echo(
            f"{verb} {entry['file']}{where} (records {entry['first_seq']}-{entry['last_seq']}, "
            f"newest {entry['newest_record']})"
        )
    click.echo(f"the audit chain {'would begin' if dry_run else 'now begins'} at record {begins}")


@audit.command("hash")
@click.option("--raw", is_flag=True, help="Keep stdin byte for byte (else one trailing newline is dropped).")
@click.option(
    "--every-key",
    is_flag=True,
    help="One fingerprint per audit key the store holds, oldest first (the key in force last): "
    "records from before an 'audit rotate-key' hold the one under their own key.",
)
@pass_session
def hash_command(session: Session, raw: bool, every_key: bool) -> None:
    """HMAC a candidate value from stdin as the audit log does, to see if a record refers to it
    ('audit show --value-hmac'). Recorded as 'audit.hash' (never the candidate or its
    fingerprint): it tests a guess."""
    session.require_local("audit hash")
    candidate = read_value(None, None, raw=raw, allow_empty=True)
    with session.store_operation("audit.hash") as (store, _):
        if every_key:
            fingerprints = value_fingerprints(store, candidate.reveal())
        else:
            fingerprints = [value_fingerprint(store, candidate.reveal())]
    click.echo("\n".join(fingerprints))  # shown only once its record is written, as a read's result is


def record_time(record: dict[str, Any]) -> datetime:
    """The record's time. Writers always write UTC with its offset: a time that does not parse,
    or has no timezone (forged or damaged), is taken as the earliest time, so `--since` never
    selects it (comparing a naive time with the cutoff was an internal error)."""
    try:
        moment = datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        return datetime.min.replace(tzinfo=UTC)
    return moment


def shown_time(record: dict[str, Any]) -> str:
    """The record's time as every command prints times (UTC to the second, `Z`); the log keeps
    it with microseconds and `+00:00` (docs/audit.md), as `--json` prints it. A time that does
    not parse or has no timezone (forged or damaged) is shown as it is written."""
    written = str(record.get("time"))
    try:
        moment = datetime.fromisoformat(written)
    except ValueError:
        return written
    return written if moment.tzinfo is None else timestamp(moment)


__all__ = ["audit"]
