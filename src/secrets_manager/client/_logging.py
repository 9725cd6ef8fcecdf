"""Redact live secret values from log records: `install_log_redaction()`, one line at start-up.

`SecretValue` already keeps values out of logs unless someone reveals one next to a log call
(`log.info("key=%s", key.reveal_text())`, an f-string, an exception message). This is the net
under that: every value the SDK has handed out in this process is remembered (`LIVE_VALUES`), and
the filter replaces any occurrence of one in a record's message, arguments, exception text or
stack text by the redaction marker before a handler formats it.

Values shorter than `MIN_REDACTED_LENGTH` bytes are not matched: replacing every "1" or "ab" in
all log lines would garble them, and such values are not secrets worth the name.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from secrets_manager.values import REDACTED, SecretValue

MIN_REDACTED_LENGTH = 4
MAX_REMEMBERED_VALUES = 10_000


class LiveSecretValues:
    """Every value the SDK has served in this process (superseded ones too: an old credential is
    still a secret while it may be valid), as one compiled pattern."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[bytes, None] = {}  # insertion-ordered set; oldest dropped past the cap
        self._pattern: re.Pattern[str] | None = None
        self._compiled_for = 0
        self._generation = 0
        os.register_at_fork(after_in_child=self._new_lock)  # one held at a fork stays held

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def remember(self, value: SecretValue) -> None:
        raw = value.reveal()
        if len(raw) < MIN_REDACTED_LENGTH or raw in self._values:
            return
        with self._lock:
            self._values[raw] = None
            while len(self._values) > MAX_REMEMBERED_VALUES:
                del self._values[next(iter(self._values))]
            self._generation += 1

    def pattern(self) -> re.Pattern[str] | None:
        """One alternation of every remembered value, longest first; None when there are none."""
        if self._compiled_for == self._generation:
            return self._pattern
        with self._lock:
            forms: set[str] = set()
            for raw in self._values:
                forms.add(raw.decode("utf-8", "replace"))
                forms.add(repr(raw)[2:-1])  # how the bytes show inside `b'...'` in a %r
            forms = {form for form in forms if len(form) >= MIN_REDACTED_LENGTH}
            ordered = sorted(forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
            self._compiled_for = self._generation
            return self._pattern

    def redact(self, text: str) -> str:
        pattern = self.pattern()
        return text if pattern is None else pattern.sub(REDACTED, text)


LIVE_VALUES = LiveSecretValues()


class SecretRedactionFilter(logging.Filter):
    """A `logging.Filter` that rewrites records holding a live secret value; it never drops one.

    The message is formatted once (`msg % args`) and replaced by its redacted text."""

    def __init__(self, values: LiveSecretValues = LIVE_VALUES) -> None:
        super().__init__()
        self._values = values

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self._values)
        return True


def redact_record(record: logging.LogRecord, values: LiveSecretValues = LIVE_VALUES) -> None:
    if values.pattern() is None:
        return
    try:
        message = record.getMessage()
    except Exception:
        return  # a broken format string is logging's to report, when a handler formats it
    redacted = values.redact(message)
    if redacted != message:
        record.msg, record.args = redacted, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = values.redact(record.exc_text)
    if record.stack_info:
        record.stack_info = values.redact(record.stack_info)


class _RedactingRecordFactory:
    """The record factory `install_log_redaction` puts in force, around the one it found."""

    def __init__(self, wrapped: Callable[..., logging.LogRecord]) -> None:
        self.wrapped = wrapped

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        redact_record(record)
        return record


_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Redact live secret values from every log record this process creates, whatever the logger
    or handler (also those added later). Idempotent; call once at start-up.

    It wraps the logging module's record factory, so the redaction happens when a record is made,
    before any filter, handler or formatter sees it. For one handler only, add a
    `SecretRedactionFilter` to it instead."""
    with _install_lock:
        factory = logging.getLogRecordFactory()
        if not isinstance(factory, _RedactingRecordFactory):
            logging.setLogRecordFactory(_RedactingRecordFactory(factory))


def uninstall_log_redaction() -> None:
    """Undo `install_log_redaction` if its factory is still the one in force (for tests)."""
    with _install_lock:
        factory = logging.getLogRecordFactory()
        if isinstance(factory, _RedactingRecordFactory):
            logging.setLogRecordFactory(factory.wrapped)
