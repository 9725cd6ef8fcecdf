"""`.env` files as docker and python-dotenv read them: for `import` (values to store) and
`run --env-file` (variables to give a program, some of them `sm://NAME` references)."""

from __future__ import annotations

import io

from dotenv.parser import parse_stream

from secrets_manager.errors import InvalidInputError


def parse_env(text: str, source: str, nothing_done: str) -> list[tuple[str, str, str]]:
    """(KEY, VALUE, "line N") for each binding (python-dotenv's parser: quotes, `export`, comments,
    multi-line quoted values; no ${VAR} expansion, so a '$' in a password stays). A line it cannot
    parse, or a key without '=', is refused by its line number alone: its text may be part of a
    value (a pasted private key, a stray carriage return). `nothing_done` ends the error line
    ("nothing was imported")."""
    pairs = []
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error or (binding.key is not None and binding.value is None):
            raise InvalidInputError(f"{source} line {line} is not KEY=VALUE; {nothing_done}")
        if binding.key is None:
            continue  # a comment or a blank line
        assert binding.value is not None
        pairs.append((binding.key, binding.value, f"line {line}"))
    return pairs
