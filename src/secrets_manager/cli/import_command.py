"""`import FILE --service NAME`: move hard-coded credentials from a .env or JSON file into the store.

The inverse of `run --service NAME`: each KEY of the file becomes the secret NAME/KEY, which `run`
hands back to the service as the variable KEY. The whole file is parsed and checked before the
store is opened, and the names it would overwrite are checked before anything is written, so a
mistake in line 40 writes nothing. Into our store (a `BatchWriter`) every secret is written in one
commit, all or none; on Vault and AWS, which have no transactions, one after another, each audited
before the next. Each secret written gets its own audit record.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import click

from secrets_manager.cli.app import cli, expires_option, future_expiry, pass_session
from secrets_manager.cli.env_files import parse_env
from secrets_manager.cli.output import counted, info_line, print_json, timestamp, warning_line
from secrets_manager.cli.password import read_small_file
from secrets_manager.cli.run_command import service_variable_problems
from secrets_manager.cli.session import Note, Session
from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    OperationInterrupted,
    SecretsManagerError,
    UnsupportedOperationError,
)
from secrets_manager.store import MAX_VALUE_SIZE, SecretMetadata, SecretStore, validate_name
from secrets_manager.store.base import (
    BatchWriter,
    Capability,
    SecretExistsError,
    check_metadata_fits,
    unsupported_capabilities,
)
from secrets_manager.store.names import namespace_of, validate_namespace

MAX_IMPORT_FILE_BYTES = 16 * 1024 * 1024
ON_EXISTING = ("fail", "skip", "overwrite")


@dataclass(frozen=True)
class Entry:
    key: str
    name: str
    value: bytes = field(repr=False)


@cli.command("import")
@click.argument("file", metavar="FILE")
@click.option(
    "--service",
    required=True,
    metavar="NAME",
    help="The namespace to import into: KEY becomes NAME/KEY ('run --service NAME' gives it back).",
)
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["auto", "env", "json"]),
    default="auto",
    show_default=True,
    help="env: KEY=VALUE lines as docker and python-dotenv read them; json: one object. "
    "auto: json for a .json file or one that starts with '{'.",
)
@click.option(
    "--on-existing",
    type=click.Choice(ON_EXISTING),
    default="fail",
    show_default=True,
    help="A name that exists already: fail (write nothing), skip it, or overwrite it (a new version).",
)
@click.option("--allow-empty", is_flag=True, help="Import empty values (refused otherwise).")
@expires_option(
    "When the imported values stop working (ISO 8601 or an age such as 90d): set on every version "
    "this import writes."
)
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON (names, never values).")
@pass_session
def import_command(
    session: Session,
    file: str,
    service: str,
    file_format: str,
    on_existing: str,
    allow_empty: bool,
    expires: str | None,
    as_json: bool,
) -> None:
    """Import the credentials of a .env or JSON FILE ('-': stdin) as secrets SERVICE/KEY, all
    checked before the first write."""
    validate_namespace(service)
    expiry = future_expiry(expires, f"{service}/KEY")
    path = Path(file)
    source = "standard input" if file == "-" else file
    data = (
        _read_stdin() if file == "-" else read_small_file(path, MAX_IMPORT_FILE_BYTES, f"import file {file}")
    )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{source} is not UTF-8 text; nothing was imported") from None
    if file_format == "auto":
        file_format = "json" if path.suffix.lower() == ".json" or text.lstrip().startswith("{") else "env"
    pairs = (
        _parse_json(text, source)
        if file_format == "json"
        else parse_env(text, source, "nothing was imported")
    )
    entries = _checked_entries(pairs, service, source, allow_empty=allow_empty)
    for problem in service_variable_problems([(entry.key, entry.value) for entry in entries])[:3]:
        warning_line(f"'run --service {service}' would refuse the namespace: {problem}")
    done: list[dict[str, object]] = []
    with session.secret_operation("import", f"{service}/", mutating=True) as (store, note):
        existing = {meta.name: meta for meta in store.list(f"{service}/", include_deleted=True)}
        clashes = [entry.name for entry in entries if entry.name in existing]
        deleted = [name for name in clashes if existing[name].deleted is not None]
        if deleted and on_existing != "skip":
            raise ConflictError(
                f"{deleted[0]} is deleted; nothing was imported: 'undelete' it or 'destroy --all' it "
                "first, or pass --on-existing skip"
            )
        if clashes and on_existing == "fail":
            raise ConflictError(
                f"{len(clashes)} of the {counted(len(entries), 'name')} "
                f"{'exists' if len(clashes) == 1 else 'exist'} already ({clashes[0]} first); nothing "
                "was imported: pass --on-existing skip or --on-existing overwrite"
            )
        _refuse_what_the_store_cannot_hold(
            store, [entry for entry in entries if not (entry.name in existing and on_existing == "skip")]
        )
        if isinstance(store, BatchWriter):
            done = _import_at_once(store, entries, existing, on_existing, expiry, note)
        else:
            _import_one_by_one(store, entries, existing, on_existing, expiry, note, done)
    if as_json:
        print_json(done)
    else:
        for item in done:
            detail = "skipped (it exists)" if item["version"] is None else f"version {item['version']}"
            click.echo(f"{item['name']}\t{detail}")
    written = sum(1 for item in done if item["version"] is not None)
    until = f", expiring {timestamp(expiry)}" if expiry is not None and written else ""
    info_line(f"imported {written} of {len(done)} secret(s) into {service}/{until}")
    if written and file != "-" and path.is_file():  # not stdin, nor a pipe such as <(…)
        warning_line(f"{file} still holds these values in plain text: delete it once nothing reads it")


def _import_at_once(
    store: BatchWriter,
    entries: list[Entry],
    existing: dict[str, SecretMetadata],
    on_existing: str,
    expiry: datetime | None,
    note: Note,
) -> list[dict[str, object]]:
    """A store with transactions (our encrypted store, on SQLite or PostgreSQL): every secret in
    one commit, all or none, then one durable append of a record for each (after the operation's
    `pending` record, written first, as for any change)."""
    skipped = {entry.name for entry in entries if entry.name in existing and on_existing == "skip"}
    writes = [(entry.name, entry.value) for entry in entries if entry.name not in skipped]
    try:
        versions = iter(store.put_batch(writes, if_exists=on_existing, expires=expiry))
    except SecretExistsError as exc:
        raise ConflictError(
            f"{exc.name} exists already, though it was not listed before the import (created "
            "meanwhile); nothing was imported: pass --on-existing skip or --on-existing overwrite"
        ) from None
    except KeyboardInterrupt:
        raise OperationInterrupted(
            f"interrupted while the import's one commit ran: it wrote all {len(writes)} secret(s) or "
            f"none ('list {namespace_of(entries[0].name)}/' tells which)"
        ) from None
    done: list[dict[str, object]] = []
    for entry in entries:
        item: dict[str, object] = {"name": entry.name, "key": entry.key, "action": "skipped", "version": None}
        info = None if entry.name in skipped else next(versions)
        if info is not None:
            item["action"] = "overwritten" if entry.name in existing or info.version > 1 else "created"
            item["version"] = info.version
        done.append(item)
    note.wrote_all(
        [
            (entry.name, item["version"], entry.value)
            for entry, item in zip(entries, done, strict=True)
            if isinstance(item["version"], int)
        ]
    )
    return done


def _import_one_by_one(
    store: SecretStore,
    entries: list[Entry],
    existing: dict[str, SecretMetadata],
    on_existing: str,
    expiry: datetime | None,
    note: Note,
    done: list[dict[str, object]],
) -> None:
    """A store without transactions (Vault, AWS, a service): one write after another, each
    audited durably before the next, so a failure part-way leaves those before it written and
    recorded, and says how many (`done` holds them)."""
    try:
        for entry in entries:
            item = _import_one(store, entry, existing, on_existing, expiry)
            done.append(item)  # before its record: a failing append still counts it written
            version = item["version"]
            if isinstance(version, int):
                note.wrote(entry.name, version, entry.value)
    except SecretsManagerError as exc:
        _say_what_was_imported(exc, done, len(entries))
        raise
    except KeyboardInterrupt:
        # Ctrl-C between or during writes: those done are committed and audited; say how far
        # it got, as any failure part-way does.
        raise _interrupted(done, entries) from None


def _refuse_what_the_store_cannot_hold(store: SecretStore, entries: list[Entry]) -> None:
    """Before the first write, what this store's `put` would refuse of an entry to be written: an
    empty value (AWS), a name too long for the backend (AWS's 512 characters with the prefix). Found
    at its write, it left the entries before it imported."""
    if Capability.EMPTY_VALUE in unsupported_capabilities(store):
        empty = [entry.name for entry in entries if not entry.value]
        if empty:
            raise UnsupportedOperationError(
                f"an empty value is not supported by this store ({counted(len(empty), 'key')} of the file "
                f"{'has' if len(empty) == 1 else 'have'} one, {empty[0]} first); nothing was imported"
            )
    for entry in entries:
        try:
            check_metadata_fits(store, entry.name, description=None, tags=None, max_versions=None)
        except InvalidInputError as exc:  # UnsupportedOperationError too, and kept as such
            raise type(exc)(f"{exc}; nothing was imported") from None


def _import_one(
    store: SecretStore,
    entry: Entry,
    existing: dict[str, SecretMetadata],
    on_existing: str,
    expiry: datetime | None,
) -> dict[str, object]:
    """Write one entry (or skip it). A name that turns out to exist when it is written (created
    meanwhile, or not listed to a caller without `list`) counts as existing."""
    item: dict[str, object] = {"name": entry.name, "key": entry.key, "action": "skipped", "version": None}
    if entry.name in existing and on_existing == "skip":
        return item
    overwrite = on_existing == "overwrite"
    try:
        info = store.put(entry.name, entry.value, expect_version=None if overwrite else 0, expires=expiry)
    except ConflictError:
        if on_existing == "skip":
            return item
        if overwrite:
            raise
        raise ConflictError(
            f"{entry.name} exists already, though it was not listed before the import (created "
            "meanwhile, or you may not list it): pass --on-existing skip or --on-existing overwrite"
        ) from None
    item["action"] = "overwritten" if entry.name in existing or info.version > 1 else "created"
    item["version"] = info.version
    return item


def _say_what_was_imported(exc: SecretsManagerError, done: list[dict[str, object]], total: int) -> None:
    """A failure part-way: its message also says how far the import got (each write is audited)."""
    written = [item for item in done if item["version"] is not None]
    if written:
        exc.args = (
            f"{exc}; {len(written)} of {total} secret(s) were imported (the last {written[-1]['name']}): "
            "rerun with --on-existing skip to import the rest",
        )


def _interrupted(done: list[dict[str, object]], entries: list[Entry]) -> OperationInterrupted:
    written = [item for item in done if item["version"] is not None]
    so_far = (
        f"{len(written)} of {len(entries)} secret(s) were imported (the last {written[-1]['name']})"
        if written
        else "no secret was imported"
    )
    if len(done) < len(entries):  # its write may have committed just before the interrupt came
        so_far += f"; {entries[len(done)].name}, being written then, may have been too"
    return OperationInterrupted(f"interrupted; {so_far}: rerun with --on-existing skip to import the rest")


def _read_stdin() -> bytes:
    """FILE '-': standard input, up to the same limit as a file."""
    data = sys.stdin.buffer.read(MAX_IMPORT_FILE_BYTES + 1)
    if len(data) > MAX_IMPORT_FILE_BYTES:
        raise InvalidInputError(
            f"standard input holds more than {MAX_IMPORT_FILE_BYTES} bytes; nothing was imported"
        )
    return data


def _parse_json(text: str, source: str) -> list[tuple[str, str, str]]:
    """One JSON object, key by key: a text value is stored as it is; any other value (an object,
    array, number or boolean) as its exact text in the file, so numbers keep every digit and
    {"db": {"username": …, "password": …}} reads back with `get NAME#password`. The place named
    in an error is the key's position, never its text."""
    decoder = json.JSONDecoder(
        object_pairs_hook=_refuse_duplicate_keys,
        parse_constant=_refuse_constant,
        parse_int=_any_number,  # only the type matters: the text is kept (and 5000 digits are fine)
        parse_float=_any_number,
    )
    pairs: list[tuple[str, str, str]] = []
    try:
        position = _skip_space(text, 0)
        if text[position : position + 1] != "{":
            raise InvalidInputError(f"{source} must hold one JSON object of KEY: value; nothing was imported")
        position = _skip_space(text, position + 1)
        if text[position : position + 1] == "}":
            position += 1
        while text[position - 1 : position] != "}":
            key, position = decoder.raw_decode(text, position)
            number = len(pairs) + 1
            if not isinstance(key, str):
                raise json.JSONDecodeError("a key is not text", text, position)
            position = _skip_space(text, position)
            if text[position : position + 1] != ":":
                raise json.JSONDecodeError("':' expected", text, position)
            start = _skip_space(text, position + 1)
            value, end = decoder.raw_decode(text, start)
            if value is None:
                raise InvalidInputError(f"{source}: key #{number} is null; nothing was imported")
            pairs.append((key, value if isinstance(value, str) else text[start:end], f"key #{number}"))
            position = _skip_space(text, end)
            if text[position : position + 1] not in (",", "}"):
                raise json.JSONDecodeError("',' or '}' expected", text, position)
            position = _skip_space(text, position + 1) if text[position] == "," else position + 1
        after = _skip_space(text, position)
        if after != len(text):
            raise json.JSONDecodeError("text after the object", text, after)
    except RecursionError:
        raise InvalidInputError(f"{source} nests JSON too deeply; nothing was imported") from None
    except _RepeatedKey:
        raise InvalidInputError(f"{source}: an object in it has a key twice; nothing was imported") from None
    except ValueError as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidInputError(f"{source} is not valid JSON{where}; nothing was imported") from None
    if not pairs:
        raise InvalidInputError(f"{source} holds no KEY: value; nothing was imported")
    return pairs


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _any_number(text: str) -> int:
    return 0


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class _RepeatedKey(ValueError):
    """A nested object with a key twice: JSON allows it, but which value would count is unclear."""


def _refuse_duplicate_keys(items: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in items]
    if len(set(keys)) != len(keys):
        raise _RepeatedKey()
    return dict(items)


def _checked_entries(
    pairs: list[tuple[str, str, str]], service: str, source: str, *, allow_empty: bool
) -> list[Entry]:
    """Every name valid, every key once, every value within the limits: or nothing is written.
    Errors name the line (env) or key position (JSON), never a key or value."""
    if not pairs:
        raise InvalidInputError(f"{source} holds no KEY=VALUE; nothing was imported")
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for key, value, place in pairs:
        where = f"{source} {place}"
        if key in seen:
            raise InvalidInputError(
                f"{source}: {seen[key]} and {place} set the same key; nothing was imported"
            )
        seen[key] = place
        name = f"{service}/{key}"
        try:
            validate_name(name)
        except InvalidInputError:
            raise InvalidInputError(
                f"{where}: the key is not a valid secret name (letters, digits, '_', '.', '-' and '/' "
                "between segments); nothing was imported"
            ) from None
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(
                f"{where}: the value is not valid Unicode (a lone surrogate); nothing was imported"
            ) from None
        if not data and not allow_empty:
            raise InvalidInputError(
                f"{where}: the value is empty; nothing was imported (--allow-empty imports empty values)"
            )
        if len(data) > MAX_VALUE_SIZE:
            raise InvalidInputError(
                f"{where}: the value is larger than {MAX_VALUE_SIZE} bytes; nothing was imported"
            )
        entries.append(Entry(key, name, data))
    return entries
