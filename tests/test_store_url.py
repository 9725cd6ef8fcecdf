"""Store URLs as they are shown: no credential from the user part or the query string, whatever
the scheme, however the option's name is spelled (case, percent-encoding), in any error, in
`display_url` (status, messages) or in a printed command (`url_without_password`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secrets_manager.errors import InvalidInputError
from secrets_manager.store.url import (
    default_audit_path,
    display_url,
    external_location,
    postgres_location,
    sqlite_path,
    url_without_password,
)

SECRET = "SUPERSECRET-7f3a"

# URLs that name a store but carry a credential in their query string: each is refused (an
# option the store does not take) and must not show it.
REFUSED = [
    f"vault://vault.example:8200/secret?token=hvs.{SECRET}",
    f"vault://vault.example:8200/secret?namespace=ns&X-Vault-Token=hvs.{SECRET}",
    f"vault+http://vault.example:8200/secret?TOKEN={SECRET}",
    f"vault://vault.example:8200/secret?secret_id={SECRET}&namespace=ns",
    f"vault://vault.example:8200/secret?colour={SECRET}",  # any unknown option's value
    f"vault://vault.example:8200/secret?{SECRET}",  # a bare secret, no name=
    f"vault://vault.example:8200/secret#{SECRET}",
    f"aws-secretsmanager://eu-west-1/trading#{SECRET}",
    f"aws-secretsmanager://eu-west-1/trading?aws_secret_access_key={SECRET}",
    f"aws-secretsmanager://eu-west-1/trading?kms=alias/k&AWS_SESSION_TOKEN={SECRET}",
    f"aws-secretsmanager://eu-west-1/trading?aws%5Fsecret%5Faccess%5Fkey={SECRET}",
    f"aws-secretsmanager://eu-west-1/trading?recovery_window_days=3&aws_secret_access_key={SECRET}",
    f"postgresql://app@db.example:5432/trading?pass%77ord={SECRET}&schema=Bad",
    f"postgresql://app@db.example:5432/trading?pass%77ord={SECRET}&bogus=1",
    f"postgresql://app@db.example:5432/trading?password={SECRET}&max_connections=0",
    f"postgresql://app:{SECRET}@db.example:5432/trading?schema=Bad",
    f"postgresql://app@db.example:5432/trading?sslmode=verify-full&sslpassword={SECRET}",
    f"postgresql://app@db.example:5432/trading?sslmode=verify-full&SSLPassword={SECRET}",
    f"postgres://app@db.example:5432/trading?colour={SECRET}",
    f"postgres://app@db.example:5432/trading?{SECRET}",
]


def _parse(url: str) -> None:
    postgres_location(url)
    external_location(url)


@pytest.mark.parametrize("url", REFUSED)
def test_a_refused_store_url_is_shown_without_its_credentials(url: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        _parse(url)
    message = str(caught.value)
    assert SECRET not in message and "***" in message, message
    assert "\n" not in message
    assert SECRET not in display_url(url) and SECRET not in url_without_password(url)


@pytest.mark.parametrize(
    ("url", "shown", "command"),
    [
        (
            f"postgresql://app@db:5432/trading?pass%77ord={SECRET}&schema=desk_a&sslmode=require",
            "postgresql://app@db:5432/trading?pass%77ord=***&schema=desk_a&sslmode=require",
            "postgresql://app@db:5432/trading?schema=desk_a&sslmode=require",
        ),
        (
            f"postgresql://app:{SECRET}@db:5432/trading?Password={SECRET}&passfile=/home/app/.pgpass",
            "postgresql://app:***@db:5432/trading?Password=***&passfile=/home/app/.pgpass",
            "postgresql://app@db:5432/trading?passfile=/home/app/.pgpass",
        ),
        (
            "vault://vault.example:8200/secret?namespace=desk",
            "vault://vault.example:8200/secret?namespace=desk",
            "vault://vault.example:8200/secret?namespace=desk",
        ),
        (
            f"vault://hvs.{SECRET}@vault.example:8200/secret",
            "vault://***@vault.example:8200/secret",
            "vault://vault.example:8200/secret",
        ),
        (
            "aws-secretsmanager://eu-west-1/trading?kms=alias/k&kms.auth=alias/a&recovery_window_days=7",
            "aws-secretsmanager://eu-west-1/trading?kms=alias/k&kms.auth=alias/a&recovery_window_days=7",
            "aws-secretsmanager://eu-west-1/trading?kms=alias/k&kms.auth=alias/a&recovery_window_days=7",
        ),
        (
            f"aws-secretsmanager://eu-west-1/trading?kms=alias/k&aws_session_token={SECRET}",
            "aws-secretsmanager://eu-west-1/trading?kms=alias/k&aws_session_token=***",
            "aws-secretsmanager://eu-west-1/trading?kms=alias/k",
        ),
        ("sqlite:///tmp/store.db", "sqlite:///tmp/store.db", "sqlite:///tmp/store.db"),
        (
            f"sqlite:///tmp/store.db?token={SECRET}",
            "sqlite:///tmp/store.db?token=***",
            "sqlite:///tmp/store.db",
        ),
    ],
)
def test_display_and_printed_commands_keep_all_but_credentials(url: str, shown: str, command: str) -> None:
    assert display_url(url) == shown
    assert url_without_password(url) == command


def test_a_postgres_store_found_by_a_percent_encoded_password_option_never_shows_it() -> None:
    url = f"postgresql://app@db:5432/trading?pass%77ord={SECRET}&schema=desk_a"
    location = postgres_location(url)
    assert location is not None and location.password_in_url  # what libpq would connect with
    assert SECRET not in location.display and SECRET not in repr(location)
    with pytest.raises(InvalidInputError) as caught:
        sqlite_path(url)
    assert SECRET not in str(caught.value)


def test_default_audit_log_names_are_bounded_and_short_ones_unchanged(tmp_path: Path) -> None:
    assert default_audit_path(str(tmp_path / "store.db")) == tmp_path / "store.audit.jsonl"
    assert (
        default_audit_path("vault://v.example:8200/secret").name == "vault-v.example-8200-secret.audit.jsonl"
    )
    pg = "postgresql://app@db:5432/trading?schema=desk_a"
    assert default_audit_path(pg).name == "postgresql-db-5432-trading-desk_a.audit.jsonl"
    # A store file whose name fits (with its -journal) but whose log's would not.
    names = set()
    for last in "ab":
        log = default_audit_path(str(tmp_path / f"{'s' * 240}{last}.db"))
        assert log.parent == tmp_path and len(log.name) <= 223 and log.name.endswith(".audit.jsonl")
        log.write_text("")  # the file system takes it
        names.add(log.name)
    mount = "/".join(["m" * 60] * 5)
    vault = default_audit_path(f"vault://v.example:8200/{mount}").name
    assert len(vault) <= 223 and vault.startswith("vault-v.example-8200-mmm")
    hosts = ",".join(f"db{i}.example" for i in range(40))
    assert len(default_audit_path(f"postgresql://app@{hosts}/trading").name) <= 223
    assert len(names) == 2


@pytest.mark.parametrize(
    "url", ["vault://[::1/secret", "vault+http://[vault.example/secret", "aws-secretsmanager://[eu-west-1/x"]
)
def test_an_unbalanced_ipv6_bracket_is_invalid_input(url: str) -> None:
    """Found by fuzzing --store: urlsplit's ValueError ('Invalid IPv6 URL') for a Vault or AWS
    URL was 'internal error (ValueError)' (the PostgreSQL parser already caught it)."""
    with pytest.raises(InvalidInputError, match="write "):
        external_location(url)


_SCHEMES = ["vault://", "vault+http://", "aws-secretsmanager://", "postgresql://", "postgres://", "sqlite://"]
_PIECES = ["[", "]", "::1", "@", ":", "/", "?", "#", "%", "%5B", "=", "&", "127.0.0.1", "8200", "eu-west-1"]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(_SCHEMES),
    st.one_of(st.text(max_size=30), st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)),
)
def test_any_store_url_is_a_location_or_one_line_invalid_input(scheme: str, rest: str) -> None:
    for parse in (postgres_location, external_location, sqlite_path, display_url, url_without_password):
        try:
            parse(scheme + rest)
        except InvalidInputError as exc:
            assert "\n" not in str(exc)
