"""No test secret appears in the `repr`, `str`, f-strings or log output of the SDK's objects, with
or without the log redaction filter; with it, even a revealed value is redacted from log records."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_manager import install_log_redaction
from secrets_manager.client import AsyncClient, Client, SecretRedactionFilter
from secrets_manager.client._logging import uninstall_log_redaction
from secrets_manager.errors import SecretsManagerError
from secrets_manager.values import REDACTED
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
