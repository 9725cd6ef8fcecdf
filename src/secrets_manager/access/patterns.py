"""Path globs over secret names, compiled to a small automaton that reads a name once.

    *    any run of characters within one segment (never '/')
    ?    exactly one character within one segment (never '/')
    **   as a whole segment: any run of whole segments. As the first or a middle segment it also
         matches no segment at all: `**/KEY` matches `KEY`, `a/**/b` matches `a/b`. As the last
         segment after others it matches one or more: `auth/**` matches every name under `auth/`
         but not the name `auth` itself, which is a different secret. `**` alone matches every name.
    **   inside a segment (`auth**`, `a**b`): any run of characters, '/' included, so `auth**`
         matches `auth/KEY`, `authz/KEY` and `auth-admin/KEY` alike (README, "policy.toml").
    anything else matches itself, case and all.

A match never backtracks without bound. A glob with more than two wildcards that take a run of
characters (`*`, `**`) is matched by following every way through it at once (an NFA): time
proportional to the name's length times the glob's. Before, every glob was a regular expression,
which backtracks: `a*a*a*a*a*b` took 22 s to refuse a 256-character name a caller chose (250
`a`s), holding the service's interpreter meanwhile. A glob with at most two is still a regular
expression (at most 256^2 ways to fail, a few milliseconds), ten times faster on everyday names.

Invariant: a pattern that could never match a valid secret name (an empty segment, a leading or
trailing '/', '.' or '..' segments, characters no name may contain, '***') is rejected when the
policy is loaded, so a typo cannot silently grant or deny nothing. Two more kinds never match
either, a segment that starts with '.' or '-' (`auth/.env`) and more than 256 characters a name
must hold: they were taken by earlier releases, so they still load (README's upgrade promise),
and `unmatchable` says why for `policy check` to warn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from secrets_manager.store.names import MAX_NAME_LENGTH

_PATTERN_CHARACTERS = re.compile(r"[A-Za-z0-9_.\-*?]+")
_BACKTRACKING_BOUND = 2  # wildcards that take a run of characters, past which no regex is used


class GlobError(ValueError):
    """A glob that is malformed; the message says why (the policy loader adds where)."""


@dataclass(frozen=True)
class Glob:
    """A compiled path glob: `matches(name)` says whether it matches the whole of `name`."""

    text: str
    # The glob as an anchored regular expression, where it has at most `_BACKTRACKING_BOUND`
    # wildcards that take a run of characters: then a failed match backtracks through at most
    # 256^2 ways, a few milliseconds, and the regex is ten times faster than the states below on
    # the names and globs of a real policy. None: the states decide.
    _regex: re.Pattern[str] | None = field(repr=False, compare=False)
    # One state per step of the glob: (kind, character). Kinds: "lit" (that character), "one"
    # (a character but '/'), "star" (stays on a character but '/', or moves on without one), "any"
    # (stays on any character, or moves on), "first" (any one character), "segs" (moves on without
    # a character, or starts a segment: a character but '/' to the next state, "seg"), "seg"
    # (stays on a character but '/', and goes back to its "segs" on '/').
    _states: tuple[tuple[str, str], ...] = field(repr=False, compare=False)

    def matches(self, name: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(name) is not None
        states = self._states
        end = len(states)
        current = self._closure({0})
        for char in name:
            following: set[int] = set()
            for index in current:
                if index == end:
                    continue
                kind, literal = states[index]
                if kind == "lit":
                    if char == literal:
                        following.add(index + 1)
                elif kind == "one" or kind == "segs":
                    if char != "/":
                        following.add(index + 1)
                elif kind == "star":
                    if char != "/":
                        following.add(index)
                elif kind == "any":
                    following.add(index)
                elif kind == "first":
                    following.add(index + 1)
                elif char == "/":  # "seg": its segment ends; another may follow
                    following.add(index - 1)
                else:
                    following.add(index)
            if not following:
                return False
            current = self._closure(following)
        return end in current

    def _closure(self, indexes: set[int]) -> set[int]:
        """`indexes` and every state they reach without reading a character."""
        states = self._states
        found = set(indexes)
        pending = list(indexes)
        while pending:
            index = pending.pop()
            if index < len(states):
                kind = states[index][0]
                step = 2 if kind == "segs" else 1 if kind in ("star", "any") else 0
                if step and index + step not in found:
                    found.add(index + step)
                    pending.append(index + step)
        return found


def unmatchable(glob: str) -> str | None:
    """Why the well-formed `glob` matches no valid secret name, or None if it may match one."""
    for segment in glob.split("/"):
        if segment[0] in ".-":
            return f"its segment {segment!r} starts with {segment[0]!r}, and no name's segment does"
    least = len(glob.replace("**", "").replace("*", ""))  # every other character takes one
    if least > MAX_NAME_LENGTH:
        return f"a name it matches has at least {least} characters, and names have at most {MAX_NAME_LENGTH}"
    return None


def compile_glob(glob: str) -> Glob:
    """The compiled `glob`; raises GlobError if it is malformed."""
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
    states: list[tuple[str, str]] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "**":
            if index == last:
                # `a/**`: one or more characters after the slash (names have no empty segments);
                # `**` alone: any name.
                states += [("first", ""), ("any", "")] if index else [("any", "")]
            else:
                # `**/` or `a/**/`: zero or more whole segments, each with its slash.
                states += [("segs", ""), ("seg", "")]
            continue
        states += _segment_states(segment)
        if index != last:
            states.append(("lit", "/"))
    runs = sum(kind in ("star", "any", "segs") for kind, _ in states)
    regex = _regex(segments) if runs <= _BACKTRACKING_BOUND else None
    return Glob(glob, regex, tuple(states))


def _regex(segments: list[str]) -> re.Pattern[str]:
    parts: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "**":
            # as the states: one or more characters after `a/`, any name for `**` alone; zero or
            # more whole segments, each with its slash, for a first or middle `**`.
            parts.append((".+" if index else ".*") if index == last else "(?:[^/]+/)*")
            continue
        i = 0
        while i < len(segment):
            if segment.startswith("**", i):
                parts.append(".*")
                i += 2
                continue
            char = segment[i]
            parts.append("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char))
            i += 1
        if index != last:
            parts.append("/")
    return re.compile("".join(parts), re.ASCII | re.DOTALL)


def _segment_states(segment: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(segment):
        if segment.startswith("**", i):
            out.append(("any", ""))  # `**` inside a segment: any characters, '/' included
            i += 2
            continue
        char = segment[i]
        out.append(("star", "") if char == "*" else ("one", "") if char == "?" else ("lit", char))
        i += 1
    return out
