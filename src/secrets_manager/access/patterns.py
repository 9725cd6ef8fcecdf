"""Path globs over secret names, compiled to anchored regular expressions.

    *    any run of characters within one segment (never '/')
    ?    exactly one character within one segment (never '/')
    **   any run of characters across segments. As a whole segment it also matches no segment at
         all: `**/KEY` matches `KEY`, `a/**/b` matches `a/b`. `auth/**` matches every name under
         `auth/` but not the name `auth` itself, which is a different secret.
    anything else matches itself (it is regex-escaped).

Invariant: a pattern that could never match a valid secret name (an empty segment, a leading or
trailing '/', '.' or '..' segments, characters no name may contain, '***') is rejected when the
policy is loaded, so a typo cannot silently grant or deny nothing.
"""

from __future__ import annotations

import re

_PATTERN_CHARACTERS = re.compile(r"[A-Za-z0-9_.\-*?]+")


class GlobError(ValueError):
    """A glob that is malformed; the message says why (the policy loader adds where)."""


def compile_glob(glob: str) -> re.Pattern[str]:
    """The anchored regex for `glob`; raises GlobError if it is malformed."""
    if not isinstance(glob, str) or not glob:
        raise GlobError("the path glob is empty")
    if "***" in glob:
        raise GlobError(f"path glob {glob!r} has '***'; use '*' (one segment) or '**' (any depth)")
    segments = glob.split("/")
    for segment in segments:
        if not segment:
            raise GlobError(f"path glob {glob!r} has an empty segment (a leading, trailing or double '/')")
        if segment in (".", ".."):
            raise GlobError(f"path glob {glob!r} has a {segment!r} segment, which no secret name has")
        if not _PATTERN_CHARACTERS.fullmatch(segment):
            raise GlobError(
                f"path glob {glob!r} has characters no secret name contains; "
                "use letters, digits, '_', '.', '-' and the wildcards '*', '?', '**'"
            )
    parts: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "**":
            if index == last:
                # `a/**`: one or more characters after the slash (names have no empty segments).
                parts.append(".+" if index else ".*")
            else:
                # `**/` or `a/**/`: zero or more whole segments, each followed by its slash.
                parts.append("(?:[^/]+/)*")
            continue
        parts.append(_segment_regex(segment))
        if index != last:
            parts.append("/")
    return re.compile("".join(parts), re.ASCII | re.DOTALL)


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if segment.startswith("**", i):
            out.append(".*")  # `**` inside a segment: any characters, '/' included
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)
