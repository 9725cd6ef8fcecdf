"""No test secret appears in the `repr`, `str`, f-strings or log output of the SDK's objects, with
or without the log redaction filter; with it, even a revealed value is redacted from log records."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import random
import re
import secrets
import time
import timeit
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_manager import install_log_redaction
from secrets_manager.client import AsyncClient, Client, SecretRedactionFilter, _logging
from secrets_manager.client._logging import (
    LIVE_VALUES,
    LiveSecretValues,
    encoded_forms,
    uninstall_log_redaction,
)
from secrets_manager.errors import SecretsManagerError
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.values import REDACTED, SecretValue
from service_fixtures import SEED, Server, client_environ, make_pki, make_store, start_server

SECRET_TEXTS = [value.decode() for value in SEED.values()] + ["ROTATED-SEEKRIT-value"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path)
    make_store(tmp_path)
    running = start_server(tmp_path)
    yield running
    running.stop()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything logged anywhere in the process at DEBUG, formatted as a handler would."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous_level)


@pytest.fixture
def redaction() -> Iterator[None]:
    install_log_redaction()
    yield
    uninstall_log_redaction()


def renderings(thing: object) -> list[str]:
    return [
        repr(thing),
        str(thing),
        f"{thing}",
        f"{thing!r}",
        "%s" % (thing,),  # noqa: UP031 (the %-formatting logging uses)
        "%r" % (thing,),  # noqa: UP031
        format(thing, ""),
    ]


def assert_no_secret(text: str) -> None:
    for secret in SECRET_TEXTS:
        assert secret not in text


def test_sdk_objects_never_render_a_value(server: Server, log_output: io.StringIO) -> None:
    env = client_environ(server.dir, "ops", [server.address])
    with Client(environ=env, stale_if_error=0.5) as client:
        creds = client.credentials()
        secret = client.get("auth/JWT_KEY")
        client.put("auth/JWT_KEY", b"ROTATED-SEEKRIT-value")
        metadata = client.describe("auth/JWT_KEY")
        async_client = AsyncClient(client=client)
        things: list[object] = [
            client,
            async_client,
            creds,
            dict(creds),
            list(creds.items()),
            secret,
            secret.value,
            metadata,
            client.credentials("auth"),
        ]
        texts = [text for thing in things for text in renderings(thing)]
        log = logging.getLogger("an.application")
        for thing in things:
            log.info("object %s / %r", thing, thing)
            log.info(f"object {thing} / {thing!r}")
        server.stop()  # the SDK's own outage and error log lines, and its error messages
        errors: list[SecretsManagerError] = []
        for _ in range(40):
            try:
                client.credentials()
                client.get("auth/DB_PASSWORD")
            except SecretsManagerError as exc:
                errors.append(exc)
                break
            time.sleep(0.05)
        assert errors, "the stale bound of 0.5 s should have run out"
        texts += [str(error) for error in errors] + [repr(error) for error in errors]
    for text in [*texts, log_output.getvalue()]:
        assert_no_secret(text)
    assert REDACTED in log_output.getvalue()


def test_the_filter_redacts_revealed_values_from_log_records(
    server: Server, log_output: io.StringIO, redaction: None
) -> None:
    with Client(environ=client_environ(server.dir, "auth", [server.address])) as client:
        key = client.credentials()["auth/JWT_KEY"]
        log = logging.getLogger("careless.application")
        log.info("jwt key is %s", key.reveal_text())
        log.info(f"jwt key is {key.reveal_text()}")
        log.warning("raw %r", key.reveal())
        log.info("in a structure: %s", {"token": key.reveal_text()})
        try:
            raise ValueError(f"could not use key {key.reveal_text()}")
        except ValueError:
            log.exception("login failed")
        logging.getLogger().info("a later handler and the root logger too: %s", key.reveal_text())
    output = log_output.getvalue()
    assert_no_secret(output)
    assert output.count(REDACTED) == 6
    assert "jwt key is " + REDACTED in output


def test_without_the_filter_only_a_revealed_value_reaches_a_log(
    server: Server, log_output: io.StringIO
) -> None:
    with Client(environ=client_environ(server.dir, "auth", [server.address])) as client:
        key = client.credentials()["auth/JWT_KEY"]
        logging.getLogger("app").info("redacted: %s; revealed on purpose: %s", key, key.reveal_text())
    output = log_output.getvalue()
    assert f"redacted: {REDACTED}; revealed on purpose: {SEED['auth/JWT_KEY'].decode()}" in output


def test_a_filter_on_one_handler_redacts_what_that_handler_writes(server: Server) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretRedactionFilter())
    log = logging.getLogger("one.handler")
    log.addHandler(handler)
    log.propagate = False
    try:
        with Client(environ=client_environ(server.dir, "auth", [server.address])) as client:
            log.warning("db password %s", client.get("auth/DB_PASSWORD").value.reveal_text())
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert stream.getvalue() == f"db password {REDACTED}\n"


# ---- encoded forms and extra fields -----------------------------------------------------------------

AWKWARD = ["pässwörd\tX-1", 'quo"te\\back-2', "naïve-€-3", 'it\'s "both"-4', "plain-hunter2-5"]


class _JsonFormatter(logging.Formatter):
    """A structured-log formatter of the common kind: the message and every extra field, as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {key: value for key, value in record.__dict__.items() if key not in _STANDARD}
        return json.dumps({"msg": record.getMessage(), **fields}, default=str)


_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _encoded_forms(text: str) -> set[str]:
    return {
        text,
        repr(text)[1:-1],
        ascii(text)[1:-1],
        json.dumps(text)[1:-1],
        json.dumps(text, ensure_ascii=False)[1:-1],
        repr(text.encode())[2:-1],
    }


@pytest.mark.parametrize("how", ["install", "handler-filter"])
def test_encoded_forms_and_extra_fields_of_a_value_are_redacted(how: str) -> None:
    """repr (%r, a dict with %s), ascii (%a), JSON with and without ensure_ascii, and `extra=`
    fields a JSON formatter prints: each a way a value with a quote, a backslash, a tab or
    non-ASCII text reaches a log line in another spelling."""
    for text in AWKWARD:
        LIVE_VALUES.remember(SecretValue(text.encode()))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger(f"encoded.{how}")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    if how == "install":
        install_log_redaction()
    else:
        handler.addFilter(SecretRedactionFilter())
    try:
        for text in AWKWARD:
            log.info("repr %r", text)
            log.info("dict %s", {"pw": text})
            log.info("ascii %a", text)
            log.info("json %s", json.dumps({"pw": text}))
            log.info("json %s", json.dumps({"pw": text}, ensure_ascii=False))
            log.info("bytes %r", text.encode())
        handler.setFormatter(_JsonFormatter())
        for text in AWKWARD:
            log.info("login", extra={"password": text, "cfg": {"db": {"pw": [text]}}, "raw": text.encode()})
    finally:
        uninstall_log_redaction()
        log.removeHandler(handler)
        log.propagate = True
    output = stream.getvalue()
    for text in AWKWARD:
        for form in _encoded_forms(text):
            assert form not in output, (form, output)
    assert output.count(REDACTED) == 6 * len(AWKWARD) + 3 * len(AWKWARD)
    assert '"password": "**********"' in output


@pytest.mark.parametrize("text", ["密码1", "Ключ", "€€", "🔑"])
def test_a_value_of_four_bytes_or_more_is_redacted_however_few_characters_it_has(
    text: str, redaction: None
) -> None:
    """The limit is in bytes, as documented: a value of 4+ UTF-8 bytes in 1 to 3 characters is
    redacted in every spelling; only values under 4 bytes are left alone."""
    LIVE_VALUES.remember(SecretValue(text.encode()))
    LIVE_VALUES.remember(SecretValue("é1".encode()))  # 3 bytes: left alone
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("short.non-ascii")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        log.info("s %s r %r a %a j %s", text, text, text, json.dumps(text), extra={"field": text})
        log.info("three bytes %s", "é1")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    output = stream.getvalue()
    for form in _encoded_forms(text):
        assert form not in output, (form, output)
    assert "three bytes é1" in output


# ---- exc_info, broken format strings ----------------------------------------------------------------


class _ExcInfoFormatter(logging.Formatter):
    """Formats `record.exc_info` itself, as python-json-logger's JsonFormatter does (and Sentry's
    and OpenTelemetry's logging handlers read it), falling back to `exc_text` without it."""

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        return json.dumps({"msg": record.getMessage(), "exc_info": exc})


@pytest.mark.parametrize("how", ["install", "handler-filter"])
def test_an_exception_holding_a_value_is_redacted_for_formatters_that_read_exc_info(how: str) -> None:
    """A formatter that formats `exc_info` itself gets no exception holding a value: the record
    carries only the redacted `exc_text`. An exception holding none keeps its `exc_info`."""
    text = f"exc-info-SEEKRIT-{uuid.uuid4()}"
    LIVE_VALUES.remember(SecretValue(text.encode()))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_ExcInfoFormatter())
    records: list[logging.LogRecord] = []
    handler.addFilter(lambda record: records.append(record) or True)
    log = logging.getLogger(f"exc-info.{how}")
    log.addHandler(handler)
    log.propagate = False
    if how == "install":
        install_log_redaction()
    else:
        handler.filters.insert(0, SecretRedactionFilter())
    try:
        for message in (f"could not connect with {text}", "could not connect"):
            try:
                raise ValueError(message)
            except ValueError:
                log.exception("login failed")
    finally:
        uninstall_log_redaction()
        log.removeHandler(handler)
        log.propagate = True
    output = stream.getvalue()
    assert text not in output
    assert f"ValueError: could not connect with {REDACTED}" in output
    assert "ValueError: could not connect" in output.splitlines()[1]
    assert records[0].exc_info is None
    assert records[1].exc_info is not None


def test_a_record_whose_format_string_does_not_fit_its_arguments_is_reported_without_a_value(
    redaction: None,
) -> None:
    """A forgotten %s (or one argument short) makes logging's handleError print the record's
    format string and arguments to stderr: each holds the marker instead of a value, and the
    record's exception text is still redacted."""
    text = f"broken-format-SEEKRIT-{uuid.uuid4()}"
    LIVE_VALUES.remember(SecretValue(text.encode()))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    records: list[logging.LogRecord] = []
    handler.addFilter(lambda record: records.append(record) or True)
    log = logging.getLogger("broken.format")
    log.addHandler(handler)
    log.propagate = False
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            log.warning("connecting with password", text)  # forgot %s
            log.warning("connecting as %s with %s", text)  # one argument short
            log.warning("as %(user)s with %(password)s", {"password": text})  # a missing key
            log.warning("as %s with %d", "alice", {"nested": [text.encode()]})
            log.warning(f"the password {text} and %s %s", "one")  # an f-string, one short
        # logging's report of this one also prints the exception the call was made under, as the
        # context of its TypeError: a traceback no record holds, out of the filter's reach
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                raise ValueError(f"refused {text}")
            except ValueError:
                log.exception("failed with", text)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert records[-1].exc_text is not None and records[-1].exc_info is None
    assert f"ValueError: refused {REDACTED}" in records[-1].exc_text
    assert records[-1].args == (REDACTED,)
    report = stderr.getvalue() + stream.getvalue()
    assert report.count("--- Logging error ---") == 5
    assert text not in report
    assert "Arguments: ('**********',)" in report
    assert "Arguments: ('alice', '**********')" in report
    assert "Arguments: {'password': '**********'}" in report
    assert f"Message: 'the password {REDACTED} and %s %s'" in report


@contextlib.contextmanager
def _own_logger(name: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger `name` that writes only to the stream yielded beside it (not to the root's)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.propagate = False
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)
        log.propagate = True


def test_a_value_read_by_version_or_label_is_redacted(server: Server, redaction: None) -> None:
    """`get(name, version=N)` and `get(name, label=...)` are asked of the service, never cached:
    what they serve is remembered for redaction all the same, by Client and AsyncClient."""
    texts = [f"versioned-SEEKRIT-{n}-{uuid.uuid4()}" for n in range(3)]
    with _own_logger("versioned.reads") as (log, stream):
        writer = server.stub("ops")  # not through the SDK, whose put remembers what it writes
        versions = [
            writer.PutSecret(pb.PutSecretRequest(name="auth/DB_PASSWORD", value=text.encode())).version
            for text in texts
        ]
        with Client(environ=client_environ(server.dir, "ops", [server.address])) as client:
            previous = client.get("auth/DB_PASSWORD", label="previous")
            by_number = client.get("auth/DB_PASSWORD", version=versions[0])
            by_async = asyncio.run(AsyncClient(client=client).get("auth/DB_PASSWORD", version=versions[2]))
            for secret in (previous, by_number, by_async):
                log.warning("value %s, raw %r", secret.value.reveal_text(), secret.value.reveal())
    output = stream.getvalue()
    assert [previous.value.reveal_text(), by_number.value.reveal_text(), by_async.value.reveal_text()] == [
        texts[1],
        texts[0],
        texts[2],
    ]
    for text in texts:
        assert text not in output
    assert output.count(REDACTED) == 6


def test_a_value_the_sdk_writes_is_redacted_even_if_the_write_fails(server: Server, redaction: None) -> None:
    texts = [f"written-SEEKRIT-{n}-{uuid.uuid4()}" for n in range(2)]
    with _own_logger("written.values") as (log, stream):
        with Client(environ=client_environ(server.dir, "ops", [server.address])) as client:
            client.put("auth/DB_PASSWORD", texts[0])
        with (
            Client(environ=client_environ(server.dir, "auth", [server.address])) as client,
            pytest.raises(SecretsManagerError),  # auth may not write
        ):
            client.put("auth/DB_PASSWORD", SecretValue(texts[1].encode()))
        for text in texts:
            log.warning("wrote %s", text)
    assert stream.getvalue() == f"wrote {REDACTED}\n" * 2


# ---- many values ------------------------------------------------------------------------------------


def _alternation_redact(raws: list[bytes], text: str) -> str:
    """What redaction did with one regex alternation of every spelling, longest first: the
    reference the index must agree with."""
    forms = sorted({form for raw in raws for form in encoded_forms(raw)}, key=len, reverse=True)
    return re.sub("|".join(map(re.escape, forms)), REDACTED, text) if forms else text


@pytest.mark.parametrize("regex_up_to", [0, 10**6], ids=["index", "alternation"])
def test_redaction_matches_the_longest_spelling_from_the_left_with_overlaps_and_evictions(
    regex_up_to: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values that overlap, contain one another, share heads, are under the index's head length in
    characters (non-ASCII, 4+ bytes) or have quote and backslash spellings, and the oldest dropped
    past the cap: the index (and the alternation used for few spellings) redacts exactly what one
    alternation of every remembered spelling, longest first, does."""
    monkeypatch.setattr(_logging, "_REGEX_UP_TO", regex_up_to)
    monkeypatch.setattr(_logging, "MAX_REMEMBERED_VALUES", 12)
    rng = random.Random(20261130)
    alphabet = "aab'\"\\é€🔑\tc"
    for _ in range(20):
        values = LiveSecretValues()
        kept: dict[bytes, None] = {}
        for _ in range(rng.randrange(1, 30)):
            batch = ["".join(rng.choices(alphabet, k=rng.randrange(1, 14))).encode() for _ in range(3)]
            values.remember(*map(SecretValue, batch))
            for raw in batch:
                if len(raw) >= 4 and raw not in kept:
                    kept[raw] = None
                    if len(kept) > 12:  # the oldest goes; remembered again later, it is new
                        del kept[next(iter(kept))]
        remembered = list(kept)
        assert len(values) == len(remembered)
        spellings = [form for raw in remembered for form in sorted(encoded_forms(raw))]
        for _ in range(30):
            parts = rng.choices(spellings + list(alphabet) + ["x", "yz "], k=rng.randrange(0, 12))
            text = "".join(part[rng.randrange(len(part)) :] if rng.random() < 0.2 else part for part in parts)
            assert values.redact(text) == _alternation_redact(remembered, text), text


def test_a_record_costs_the_same_however_many_values_are_remembered() -> None:
    """At 10,000 remembered values (the cap; superseded ones count) a record costs about what it
    does at 100, and a newly remembered value stalls no logging call (one alternation of every
    spelling cost about 10 ms per record and a 0.5 s compile after each new value there)."""
    values = LiveSecretValues()
    text = "GET /api/v1/orders?symbol=BTCUSDT&limit=100 200 OK user=alice latency_ms=12 " + "x" * 120
    cost: dict[int, float] = {}
    stall: dict[int, float] = {}
    remembered = 0
    for count in (100, 10_000):
        while remembered < count:
            values.remember(SecretValue(secrets.token_urlsafe(24).encode()))
            remembered += 1
        value = secrets.token_urlsafe(24)
        remembered += 1
        started = time.perf_counter()
        values.remember(SecretValue(value.encode()))
        assert values.redact(f"{text} {value}") == f"{text} {REDACTED}"
        stall[count] = time.perf_counter() - started
        cost[count] = min(timeit.repeat(lambda: values.redact(text), number=20, repeat=5)) / 20
    assert cost[10_000] < 3 * cost[100], cost
    assert stall[10_000] < 10 * stall[100] + 0.02, stall
