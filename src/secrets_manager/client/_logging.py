"""Redact live secret values from log records: `install_log_redaction()`, one line at start-up.

`SecretValue` already keeps values out of logs unless someone reveals one next to a log call
(`log.info("key=%s", key.reveal_text())`, an f-string, an exception message). This is the net
under that: every value the SDK has handed out in this process is remembered (`LIVE_VALUES`), and
any occurrence of one in a record's message, arguments, exception text, stack text or `extra=`
fields is replaced by the redaction marker before a handler formats it. A value is matched as
written and in the spellings logging and JSON give it: `repr` (`%r`, a dict or list logged with
`%s`), `ascii` (`%a`), `json.dumps` with and without `ensure_ascii`, and the `repr` of its bytes.

What it cannot catch: a value split up or transformed before it is logged (a part of it, base64,
hex, URL-encoding, upper case, a hash), one written by an object's own `__str__` inside an extra
field, one printed without `logging` (print, a traceback on stderr), and values shorter than
`MIN_REDACTED_LENGTH` bytes (counted in bytes: "密码1", 7 bytes in 3 characters, is matched):
replacing every "1" or "ab" in all log lines would garble them, and such values are not secrets
worth the name. It is a net, not a licence to log values.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from secrets_manager.values import REDACTED, SecretValue

MIN_REDACTED_LENGTH = 4
MAX_REMEMBERED_VALUES = 10_000
_MAX_EXTRA_DEPTH = 8  # how deep into an extra field's dicts and lists values are looked for


def encoded_forms(raw: bytes) -> frozenset[str]:
    """The spellings of `raw` that a log line may hold: computed once per value, when it is
    remembered, never per record. None under `MIN_REDACTED_LENGTH` bytes; from there on every
    spelling, however few characters it has ("密码1" is 7 bytes in 3 characters)."""
    if len(raw) < MIN_REDACTED_LENGTH:
        return frozenset()
    text = raw.decode("utf-8", "replace")
    forms = {
        text,
        repr(text)[1:-1],  # %r, and str() of a dict, list or tuple holding it
        ascii(text)[1:-1],  # %a
        json.dumps(text)[1:-1],  # json.dumps: \" \\ \uXXXX
        json.dumps(text, ensure_ascii=False)[1:-1],
        repr(raw)[2:-1],  # how the bytes show inside `b'...'` in a %r
    }
    return frozenset(forms)


_HEAD = 8  # a spelling is indexed by its first _HEAD characters (the whole of a shorter one)
_REGEX_UP_TO = 32  # spellings: up to so many, one compiled alternation of them is faster


class LiveSecretValues:
    """Every value the SDK has served in this process (superseded ones too: an old credential is
    still a secret while it may be valid), and its spellings, ready to be redacted from text.

    Up to `_REGEX_UP_TO` spellings (a few dozen values) they are one compiled regex alternation,
    longest first, the fastest way for a few. Past that an alternation costs time per record and
    per compile in proportion to their number (1 ms per record and 70 ms per compile at 1,000
    values), so the spellings are indexed by head instead: their first `_HEAD` characters, or all
    of a shorter one. `redact` then looks the text's own slices of those widths up, one dict lookup
    per position and width in use (one width unless a spelling is shorter than `_HEAD`), and checks
    the few spelling lengths under a head that matched: a record costs the same however many values
    are remembered. The index is always kept; `remember` updates it in place and compiles a
    pattern (only while there are few spellings) under a lock that `redact` never takes: it reads
    the pattern or single index entries, so serving a value never stalls a logging thread. A
    spelling two values share (raw bytes that decode alike) is counted, so dropping the oldest value
    past `MAX_REMEMBERED_VALUES` keeps the other's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[bytes, frozenset[str]] = {}  # insertion-ordered; oldest dropped past the cap
        self._forms: dict[str, int] = {}  # spelling -> how many remembered values have it
        self._heads: dict[str, tuple[int, ...]] = {}  # head -> lengths of its spellings, longest first
        self._head_lengths: dict[tuple[str, int], int] = {}  # (head, length) -> spellings with both
        self._width_counts: dict[int, int] = {}  # a head's length -> how many heads have it
        self._widths: tuple[int, ...] = ()  # the heads' lengths, longest first; () when empty
        self._pattern: re.Pattern[str] | None = None  # while there are 1 to _REGEX_UP_TO spellings
        # a fork while another thread updates the index would leave the child's half-updated
        os.register_at_fork(
            before=self._hold_lock, after_in_parent=self._release_lock, after_in_child=self._new_lock
        )

    def _hold_lock(self) -> None:
        self._lock.acquire()

    def _release_lock(self) -> None:
        self._lock.release()

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def remember(self, *values: SecretValue) -> None:
        """Remember `values` (several at once: one pattern compile for them all)."""
        new: dict[bytes, frozenset[str]] = {}  # in order, once each
        for value in values:
            raw = value.reveal()
            if len(raw) >= MIN_REDACTED_LENGTH and raw not in self._values and raw not in new:
                new[raw] = encoded_forms(raw)
        if not new:
            return
        with self._lock:
            for raw, forms in new.items():
                if raw in self._values:
                    continue
                self._values[raw] = forms
                for form in forms:
                    self._index(form)
                while len(self._values) > MAX_REMEMBERED_VALUES:
                    for form in self._values.pop(next(iter(self._values))):
                        self._unindex(form)
            if len(self._forms) <= _REGEX_UP_TO:
                ordered = sorted(self._forms, key=len, reverse=True)
                self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
            else:
                self._pattern = None  # after the index is complete: redact falls back to it

    def _index(self, form: str) -> None:
        count = self._forms.get(form, 0)
        self._forms[form] = count + 1
        if count:
            return
        head, length = form[:_HEAD], len(form)
        self._head_lengths[head, length] = self._head_lengths.get((head, length), 0) + 1
        lengths = self._heads.get(head)
        if lengths is None:
            self._width_counts[len(head)] = self._width_counts.get(len(head), 0) + 1
            self._widths = tuple(sorted(self._width_counts, reverse=True))
        if lengths is None or length not in lengths:
            self._heads[head] = tuple(sorted({*(lengths or ()), length}, reverse=True))

    def _unindex(self, form: str) -> None:
        count = self._forms.pop(form)
        if count > 1:
            self._forms[form] = count - 1
            return
        head, length = form[:_HEAD], len(form)
        left = self._head_lengths.pop((head, length)) - 1
        if left:
            self._head_lengths[head, length] = left
            return
        lengths = tuple(other for other in self._heads[head] if other != length)
        if lengths:
            self._heads[head] = lengths
            return
        del self._heads[head]
        self._width_counts[len(head)] -= 1
        if not self._width_counts[len(head)]:
            del self._width_counts[len(head)]
            self._widths = tuple(sorted(self._width_counts, reverse=True))

    def redact(self, text: str) -> str:
        """`text` with every remembered spelling replaced by the marker: at each position from the
        left, the longest spelling that starts there, then on from its end (what the alternation,
        longest first, does; the index gives the same)."""
        pattern = self._pattern
        if pattern is not None:
            return pattern.sub(REDACTED, text)
        widths = self._widths
        if not widths:
            return text
        heads, forms = self._heads, self._forms
        starts = {i for width in widths for i in range(len(text) - width + 1) if text[i : i + width] in heads}
        if not starts:
            return text
        pieces: list[str] = []
        done = 0
        for start in sorted(starts):
            if start < done:
                continue
            longest = 0
            for width in widths:
                for length in heads.get(text[start : start + width], ()):
                    if length <= longest:
                        break
                    if text[start : start + length] in forms:
                        longest = length
                        break
            if longest:
                pieces += (text[done:start], REDACTED)
                done = start + longest
        if not pieces:
            return text
        pieces.append(text[done:])
        return "".join(pieces)


LIVE_VALUES = LiveSecretValues()

# The attributes every LogRecord has; any other is an `extra=` field (or a filter's addition).
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class SecretRedactionFilter(logging.Filter):
    """A `logging.Filter` that rewrites records holding a live secret value; it never drops one.

    The message is formatted once (`msg % args`) and replaced by its redacted text."""

    def __init__(self, values: LiveSecretValues = LIVE_VALUES) -> None:
        super().__init__()
        self._values = values

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self._values)
        redact_fields(record, [key for key in record.__dict__ if key not in _RECORD_ATTRIBUTES], self._values)
        return True


def redact_record(record: logging.LogRecord, values: LiveSecretValues = LIVE_VALUES) -> None:
    """Redact the record's message, exception text and stack text.

    An exception is formatted once into `exc_text` and redacted there. If that text held a value,
    `exc_info` is set to None as well: formatters and handlers that format `exc_info` themselves
    (python-json-logger's JsonFormatter, Sentry's and OpenTelemetry's logging handlers) would
    otherwise print the exception, and the value in it, in clear. Without `exc_info` the stdlib
    Formatter and JsonFormatter print `exc_text` as it is; the exception object itself is lost to
    such a record, which is the price of keeping its value out. An exception without a served value
    keeps its `exc_info`."""
    if not values:
        return
    try:
        message = record.getMessage()
    except Exception:  # a format string its arguments do not fit: logging reports it when a
        _redact_unformattable(record, values)  # handler formats it, printing msg and args
    else:
        redacted = values.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        exc_text = values.redact(record.exc_text)
        if exc_text != record.exc_text:
            record.exc_text, record.exc_info = exc_text, None
    if record.stack_info:
        record.stack_info = values.redact(record.stack_info)


def _redact_unformattable(record: logging.LogRecord, values: LiveSecretValues) -> None:
    """A record whose `msg % args` fails is left unformatted (logging's `handleError` reports the
    mistake with `Message: %r` and `Arguments: %s`), but without a value: the format string is
    redacted, and each argument whose `str` or `repr` holds one is replaced by the marker."""
    record.msg = _redacted_shown(record.msg, values)
    args = record.args
    if isinstance(args, tuple):
        record.args = tuple(_redacted_shown(arg, values, whole=True) for arg in args)
    elif isinstance(args, dict):
        record.args = {key: _redacted_shown(arg, values, whole=True) for key, arg in args.items()}


def _redacted_shown(thing: Any, values: LiveSecretValues, *, whole: bool = False) -> Any:
    """`thing` if neither its `str` nor its `repr` holds a value; else its redacted text, or with
    `whole` the marker alone."""
    try:
        shown = [str(thing), repr(thing)]
    except Exception:
        return thing  # nor can logging's report show it
    for text in shown:
        redacted = values.redact(text)
        if redacted != text:
            return REDACTED if whole else redacted
    return thing


def redact_fields(
    record: logging.LogRecord, keys: Iterable[str], values: LiveSecretValues = LIVE_VALUES
) -> None:
    """Redact the record's `extra=` fields `keys`: text, bytes, and text inside dicts, lists,
    tuples and sets (rebuilt only where a value was found, so a formatter still sees structure)."""
    if not values:
        return
    for key in keys:
        value = record.__dict__.get(key)
        redacted = _redacted(value, values, _MAX_EXTRA_DEPTH)
        if redacted is not value:
            record.__dict__[key] = redacted


def _redacted(value: Any, values: LiveSecretValues, depth: int) -> Any:
    if isinstance(value, str):
        text = values.redact(value)
        return value if text == value else text
    if isinstance(value, bytes):
        shown = repr(value)
        text = values.redact(shown)
        return value if text == shown else text
    if depth == 0:
        return value
    if isinstance(value, dict):
        old_items = [item for pair in value.items() for item in pair]
        new_items = [_redacted(item, values, depth - 1) for item in old_items]
        if _same(new_items, old_items):
            return value
        return dict(zip(new_items[::2], new_items[1::2], strict=True))
    if isinstance(value, list | tuple | set | frozenset):
        old_items = list(value)
        new_items = [_redacted(item, values, depth - 1) for item in old_items]
        return value if _same(new_items, old_items) else new_items
    return value


def _same(new: list[Any], old: list[Any]) -> bool:
    return all(a is b for a, b in zip(new, old, strict=True))


class _RedactingRecordFactory:
    """The record factory `install_log_redaction` puts in force, around the one it found."""

    def __init__(self, wrapped: Callable[..., logging.LogRecord]) -> None:
        self.wrapped = wrapped

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        redact_record(record)
        return record


_original_make_record = logging.Logger.makeRecord


def _make_record_redacting_extra(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
    """`Logger.makeRecord`, then its `extra=` fields redacted: logging sets them on the record
    after the record factory has run, so the factory alone never sees them."""
    record = _original_make_record(self, *args, **kwargs)
    extra = kwargs.get("extra", args[8] if len(args) > 8 else None)
    if extra:
        redact_fields(record, list(extra))
    return record


_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Redact live secret values from every log record this process creates, whatever the logger
    or handler (also those added later). Idempotent; call once at start-up.

    It wraps the logging module's record factory, so the redaction happens when a record is made,
    before any filter, handler or formatter sees it, and `Logger.makeRecord` for the `extra=`
    fields (a logger class that overrides makeRecord is not covered). For one handler only, add a
    `SecretRedactionFilter` to it instead. See the module doc for what it cannot catch."""
    with _install_lock:
        factory = logging.getLogRecordFactory()
        if not isinstance(factory, _RedactingRecordFactory):
            logging.setLogRecordFactory(_RedactingRecordFactory(factory))
        logging.Logger.makeRecord = _make_record_redacting_extra  # type: ignore[method-assign]


def uninstall_log_redaction() -> None:
    """Undo `install_log_redaction` if its factory is still the one in force (for tests)."""
    with _install_lock:
        factory = logging.getLogRecordFactory()
        if isinstance(factory, _RedactingRecordFactory):
            logging.setLogRecordFactory(factory.wrapped)
        if logging.Logger.makeRecord is _make_record_redacting_extra:
            logging.Logger.makeRecord = _original_make_record  # type: ignore[method-assign]
