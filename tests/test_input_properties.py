"""Property-based guards (hypothesis) on the parsers of user input: secret names, list prefixes,
the time arguments (`--older-than`, `--since`), a schedule's `every`, and the policy's path globs.
Each holds for any text: accepted input has the documented shape, refused input is one
InvalidInputError line, and a glob never lets `a/../b` or an odd encoding reach another name.
Bounded: 200 examples each, a few seconds in all."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secrets_manager.access import Policy
from secrets_manager.access.patterns import GlobError, compile_glob
from secrets_manager.cli.output import parse_cutoff
from secrets_manager.errors import InvalidInputError
from secrets_manager.rotation import MAX_EVERY, parse_every
from secrets_manager.store.names import MAX_NAME_LENGTH, validate_name, validate_prefix

BOUNDED = settings(max_examples=200, deadline=None)

SEGMENT = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,6}", fullmatch=True)
NAMES = st.lists(SEGMENT, min_size=1, max_size=4).map("/".join)
# Text that looks like a name but is not one: traversal, empty segments, look-alike characters.
ODD_PIECES = [
    "..",
    ".",
    "/",
    "//",
    "\x00",
    "\n",
    "%2e%2e",
    "\u2024\u2024",
    "\uff0e",
    "\u2215",
    "\\",
    " ",
    "é",
    "\u200b",
]
ODD_NAMES = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(SEGMENT, st.sampled_from(ODD_PIECES)), min_size=1, max_size=6).map("".join),
    st.lists(st.one_of(SEGMENT, st.sampled_from(ODD_PIECES)), min_size=1, max_size=6).map("/".join),
)


def _refused_in_one_line(call: object, text: str) -> None:
    assert callable(call)
    with pytest.raises(InvalidInputError) as caught:
        call(text)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert len(message) < 2 * MAX_NAME_LENGTH + 300  # never megabytes of the input


@BOUNDED
@given(ODD_NAMES)
def test_a_name_is_accepted_only_in_the_documented_shape(text: str) -> None:
    try:
        validate_name(text)
    except InvalidInputError as exc:
        assert "\n" not in str(exc)
        return
    assert text.isascii() and text.isprintable() and len(text) <= MAX_NAME_LENGTH
    for segment in text.split("/"):
        assert segment and segment not in (".", "..") and segment[0] not in ".-"


@BOUNDED
@given(st.one_of(ODD_NAMES, st.text(min_size=MAX_NAME_LENGTH + 1, max_size=MAX_NAME_LENGTH + 50)))
def test_a_prefix_is_a_leading_part_of_a_name_or_refused_in_one_line(text: str) -> None:
    try:
        validate_prefix(text)
    except InvalidInputError:
        _refused_in_one_line(validate_prefix, text)
        return
    assert text == "" or (text.isascii() and text.isprintable() and ".." not in text.split("/"))


AGES = st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 10**6), st.sampled_from("smhd"))
TIMES = st.one_of(
    st.text(max_size=30),
    AGES,
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda moment: moment.isoformat()),
    st.from_regex(r"[0-9]{1,30}[smhdwy]?", fullmatch=True),
)


@BOUNDED
@given(TIMES)
def test_a_time_argument_is_an_aware_moment_or_one_line_refusal(text: str) -> None:
    try:
        moment = parse_cutoff(text, "--older-than", "leave it out for all")
    except InvalidInputError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("--older-than ")
        return
    assert moment.tzinfo is not None
    if text.strip() and text.strip()[-1] in "smhd" and text.strip()[:-1].isdigit():
        assert moment <= datetime.now(UTC)  # an age is in the past


@BOUNDED
@given(st.one_of(TIMES, st.integers(), st.none(), st.floats(), st.booleans()))
def test_every_is_within_its_bounds_or_one_line_refusal(value: object) -> None:
    try:
        every = parse_every(value)
    except InvalidInputError as exc:
        assert "\n" not in str(exc)
        return
    assert timedelta(seconds=1) <= every <= MAX_EVERY


GLOB_SEGMENTS = st.one_of(SEGMENT, st.sampled_from(["*", "?", "**", "a*", "*_KEY", "?b", "DB_*"]))
GLOBS = st.lists(GLOB_SEGMENTS, min_size=1, max_size=4).map("/".join)


def _reference(glob: list[str], name: list[str]) -> bool:
    """The documented meaning, segment by segment: `**` as a whole segment is zero or more
    segments (one or more at the end), `*` and `?` stay inside one segment."""
    if not glob:
        return not name
    head, rest = glob[0], glob[1:]
    if head == "**":
        if not rest:
            return len(name) >= 1
        return any(_reference(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _reference(rest, name[1:])


@BOUNDED
@given(GLOBS, NAMES)
def test_a_glob_matches_a_name_as_documented(glob: str, name: str) -> None:
    matched = compile_glob(glob).matches(name)
    assert matched == _reference(glob.split("/"), name.split("/")), (glob, name)


@BOUNDED
@given(st.text(max_size=20))
def test_a_glob_is_compiled_or_refused_as_malformed(glob: str) -> None:
    try:
        compile_glob(glob)
    except GlobError as exc:
        assert "\n" not in str(exc)


ADMIN = Policy.parse(
    '[identities]\n"ops" = ["admin"]\n[roles.admin]\nrules = [\n'
    '  { path = "**", capabilities = ["admin"] },\n  { path = "auth/**", deny = ["read"] },\n]\n'
)


@BOUNDED
@given(ODD_NAMES)
def test_no_odd_name_escapes_a_deny_or_gets_a_grant(name: str) -> None:
    """`x/../auth/KEY`, `auth//KEY`, look-alike dots and slashes: denied by the policy as names
    no secret has, even under a `**` admin grant (so never read around the auth deny)."""
    try:
        validate_name(name)
    except InvalidInputError:
        for capability in ("read", "list", "write", "admin"):
            assert not ADMIN.allows("ops", capability, name)
        return
    assert ADMIN.allows("ops", "read", name) == (not name.startswith("auth/"))
