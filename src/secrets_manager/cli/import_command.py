"""`import FILE --service NAME`: move hard-coded credentials from a .env or JSON file into the store.

The inverse of `run --service NAME`: each KEY of the file becomes the secret NAME/KEY, which `run`
hands back to the service as the variable KEY. The whole file is parsed and checked before the
store is opened, and the names it would overwrite are checked before anything is written, so a
mistake in line 40 writes nothing. Each secret written gets its own audit record.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from dotenv.parser import parse_stream

from secrets_manager.cli.app import Session, cli, pass_session
from secrets_manager.cli.output import info_line, print_json, warning_line
from secrets_manager.cli.password import read_small_file
from secrets_manager.errors import ConflictError, InvalidInputError
from secrets_manager.store import MAX_VALUE_SIZE, validate_name
from secrets_manager.store.names import validate_namespace

MAX_IMPORT_FILE_BYTES = 16 * 1024 * 1024
ON_EXISTING = ("fail", "skip", "overwrite")


@dataclass(frozen=True)
class Entry:
    key: str
    name: str
    value: bytes


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
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON (names, never values).")
@pass_session
def import_command(
    session: Session,
    file: str,
    service: str,
    file_format: str,
    on_existing: str,
    allow_empty: bool,
    as_json: bool,
) -> None:
    """Import the credentials of a .env or JSON FILE ('-': stdin) as secrets SERVICE/KEY, all
    checked before the first write."""
    validate_namespace(service)
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
    pairs = _parse_json(text, source) if file_format == "json" else _parse_env(text, source)
    entries = _checked_entries(pairs, service, source, allow_empty=allow_empty)
    done: list[dict[str, object]] = []
    with session.secret_operation("import", f"{service}/", mutating=True) as (store, note):
        existing = {meta.name: meta for meta in store.list(f"{service}/", include_deleted=True)}
        clashes = [entry.name for entry in entries if entry.name in existing]
        deleted = [name for name in clashes if existing[name].deleted is not None]
        if clashes and on_existing == "fail":
            raise ConflictError(
                f"{len(clashes)} of the {len(entries)} names exist already ({clashes[0]} first); nothing "
                "was imported: pass --on-existing skip or --on-existing overwrite"
            )
        if deleted and on_existing == "overwrite":
            raise ConflictError(
                f"{deleted[0]} is deleted; nothing was imported: 'undelete' it or 'destroy --all' it "
                "first, or pass --on-existing skip"
            )
        for entry in entries:
            if entry.name in existing and on_existing == "skip":
                done.append({"name": entry.name, "key": entry.key, "action": "skipped", "version": None})
                continue
            overwrite = entry.name in existing
            info = store.put(entry.name, entry.value, expect_version=None if overwrite else 0)
            note.wrote(entry.name, info.version, entry.value)
            action = "overwritten" if overwrite else "created"
            done.append({"name": entry.name, "key": entry.key, "action": action, "version": info.version})
    if as_json:
        print_json(done)
    else:
        for item in done:
            detail = "skipped (it exists)" if item["version"] is None else f"version {item['version']}"
            click.echo(f"{item['name']}\t{detail}")
    written = sum(1 for item in done if item["version"] is not None)
    info_line(f"imported {written} of {len(done)} secret(s) into {service}/")
    if written and file != "-":
        warning_line(f"{file} still holds these values in plain text: delete it once nothing reads it")


def _read_stdin() -> bytes:
    """FILE '-': standard input, up to the same limit as a file."""
    data = sys.stdin.buffer.read(MAX_IMPORT_FILE_BYTES + 1)
    if len(data) > MAX_IMPORT_FILE_BYTES:
        raise InvalidInputError(
            f"standard input holds more than {MAX_IMPORT_FILE_BYTES} bytes; nothing was imported"
        )
    return data


def _parse_env(text: str, file: str) -> list[tuple[str, str, int]]:
    """KEY=VALUE bindings (python-dotenv's parser: quotes, `export`, comments, multi-line quoted
    values; no ${VAR} expansion, so a '$' in a password stays). A line it cannot parse, or a key
    without '=', is refused with its line number, never its text."""
    pairs = []
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            raise InvalidInputError(f"{file} line {line} is not KEY=VALUE; nothing was imported")
        if binding.key is None:
            continue  # a comment or a blank line
        if binding.value is None:
            raise InvalidInputError(
                f"{file} line {line}: {binding.key!r} has no '=' and no value; nothing was imported"
            )
        pairs.append((binding.key, binding.value, line))
    return pairs


def _parse_json(text: str, file: str) -> list[tuple[str, str, int]]:
    """One JSON object: a text value is stored as it is; an object, array, number or boolean as
    its JSON text (so {"db": {"username": …, "password": …}} reads back with `get NAME#password`)."""
    try:
        doc = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except ValueError as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidInputError(f"{file} is not valid JSON{where}; nothing was imported") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{file} must hold one JSON object of KEY: value; nothing was imported")
    pairs = []
    for position, (key, value) in enumerate(doc.items(), start=1):
        if value is None:
            raise InvalidInputError(f"{file}: {key!r} is null; nothing was imported")
        text_value = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        pairs.append((key, text_value, position))
    return pairs


def _refuse_duplicate_keys(items: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in items]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise InvalidInputError(f"key {repeated!r} appears twice; nothing was imported")
    return dict(items)


def _checked_entries(
    pairs: list[tuple[str, str, int]], service: str, file: str, *, allow_empty: bool
) -> list[Entry]:
    """Every name valid, every key once, every value within the limits: or nothing is written."""
    if not pairs:
        raise InvalidInputError(f"{file} holds no KEY=VALUE; nothing was imported")
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for key, value, line in pairs:
        if key in seen:
            raise InvalidInputError(
                f"{file}: {key!r} is set twice (lines {seen[key]} and {line}); nothing was imported"
            )
        seen[key] = line
        name = f"{service}/{key}"
        validate_name(name)
        data = value.encode("utf-8")
        if not data and not allow_empty:
            raise InvalidInputError(
                f"{file}: {key!r} is empty; nothing was imported (pass --allow-empty to import empty values)"
            )
        if len(data) > MAX_VALUE_SIZE:
            raise InvalidInputError(
                f"{file}: the value of {key!r} is larger than {MAX_VALUE_SIZE} bytes; nothing was imported"
            )
        entries.append(Entry(key, name, data))
    return entries
