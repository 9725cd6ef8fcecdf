"""`export --service NAME`: a namespace's secrets out as a .env file or a JSON object, which
`import` reads back to the same names and values; every read audited before anything is written."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from service_fixtures import SCRIPT, SEED, client_environ, make_pki, make_store, start_server
from test_cli import PASSWORD, Cli, assert_one_line_error

# What a .env file makes hard: quotes of both kinds, backslashes (one at the end), a '$' that
# must not expand, '#' that must not start a comment, spaces at both ends, lines, a CR, non-ASCII.
# (A value with both ' and '$' fits no line a shell and python-dotenv read alike: refused below.)
AWKWARD = {
    "DB_PASSWORD": 'pa$$word with "double" quotes # not a comment',
    "QUOTED": "it's 'single' and \"double\" # not a comment",
    "WINDOWS_PATH": "C:\\new\\table\\",
    "ESCAPED": "\\' and \\\\ and \\n as typed",
    "PADDED": "  spaces at both ends  ",
    "PEM": "-----BEGIN KEY-----\nline two\r\nline three\n-----END KEY-----\n",
    "UNICODE": "mot de passe \u00e9t\u00e9 \u5bc6\u7801",
    "jwt/signing-key": "KNOWN-nested",
}


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    assert cli("init", "--kdf-profile", "test").code == 0
    for key, value in AWKWARD.items():
        assert cli("store", f"auth/{key}", "--raw", input=value.encode()).code == 0
    assert cli("store", "authz/NOT_THIS", input=b"KNOWN-other-namespace").code == 0
    return cli


def audit_records(cli: Cli) -> list[dict[str, object]]:
    log = cli.store.parent / "store.audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("file_format", ["env", "json"])
def test_an_export_imported_again_gives_the_same_names_and_values(
    cli: Cli, tmp_path: Path, file_format: str
) -> None:
    exported = tmp_path / f"auth.{file_format}"
    result = cli("export", "--service", "auth", "--format", file_format, "-o", str(exported))
    assert result.code == 0, result.stderr
    assert result.stdout == b""
    assert f"exported 8 secrets under auth/ to {exported}" in result.stderr
    assert "plain text" in result.stderr
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    back = cli("import", str(exported), "--service", "copy", "--format", file_format)
    assert back.code == 0, back.stderr
    for key, value in AWKWARD.items():
        assert cli("get", f"copy/{key}", "--raw").stdout == value.encode(), key
    assert cli("list", "copy/").out.split() == sorted(f"copy/{key}" for key in AWKWARD)


def test_the_env_format_is_key_equals_a_quoted_value_in_name_order(cli: Cli) -> None:
    result = cli("export", "--service", "auth")
    assert result.code == 0, result.stderr
    lines = result.out.splitlines()
    assert lines[0] == "DB_PASSWORD='pa$$word with \"double\" quotes # not a comment'"
    assert 'QUOTED="it\'s \'single\' and \\"double\\" # not a comment"' in lines
    assert 'WINDOWS_PATH="C:\\\\new\\\\table\\\\"' in lines
    assert not any("KNOWN-other-namespace" in line for line in lines)  # authz/ is not auth/


def _sourced(path: Path) -> dict[str, str]:
    """The variables a POSIX shell has after `set -a; . FILE`, as `set -a; . ./app.env` reads a
    .env file into a deployment script: the export's values, or whatever its lines made it run."""
    shown = subprocess.run(
        ["/bin/sh", "-c", 'set -a; . "$1"; exec env -0', "sh", str(path)],
        cwd=path.parent, env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    pairs = (entry.split("=", 1) for entry in shown.stdout.decode().split("\0") if "=" in entry)
    return dict(pairs)


def test_a_shell_sourcing_the_env_file_reads_the_values_and_runs_none_of_them(
    cli: Cli, tmp_path: Path
) -> None:
    """A value was single-quoted with its ' escaped as python-dotenv reads it (\\'), which ends the
    quotes for a shell: a value (a service's own, in its namespace) of `x';touch PWNED;#` made
    every script that sources the export run `touch PWNED`. Each value is now quoted so that a
    shell reads the same text as python-dotenv, or at least runs nothing of it."""
    bait = {
        "CLOSES_QUOTES": "x';touch PWNED;#",  # ' and no '$': double quotes
        "SUBSTITUTES": '$(touch PWNED)`touch PWNED` and \\ then "',  # '$' and \\, no ': single quotes
    }
    for key, value in bait.items():
        assert cli("store", f"auth/{key}", "--raw", input=value.encode()).code == 0
    exported = tmp_path / "auth.env"
    assert cli("export", "--service", "auth", "-o", str(exported)).code == 0
    variables = _sourced(exported)
    assert not (tmp_path / "PWNED").exists()
    for key, value in {**AWKWARD, "CLOSES_QUOTES": bait["CLOSES_QUOTES"]}.items():
        if "/" not in key:  # jwt/signing-key is no shell variable name (python-dotenv takes it)
            assert variables[key] == value, key
    # the one a shell cannot read exactly: its backslashes doubled, and nothing of it run
    assert variables["SUBSTITUTES"] == bait["SUBSTITUTES"].replace("\\", "\\\\")
    back = cli("import", str(exported), "--service", "copy")
    assert back.code == 0, back.stderr
    for key, value in bait.items():
        assert cli("get", f"copy/{key}", "--raw").stdout == value.encode(), key


def test_a_value_with_a_quote_and_a_dollar_is_refused_in_the_env_format_only(
    cli: Cli, tmp_path: Path
) -> None:
    value = "pa$$word with 'single' quotes"
    assert cli("store", "auth/BOTH", "--raw", input=value.encode()).code == 0
    target = tmp_path / "auth.env"
    refused = cli("export", "--service", "auth", "-o", str(target))
    assert_one_line_error(refused, 2, "auth/BOTH", "nothing was written", "--format json")
    assert "pa$$word" not in refused.stderr
    assert not target.exists()
    as_json = cli("export", "--service", "auth", "--format", "json")
    assert as_json.code == 0, as_json.stderr
    assert json.loads(as_json.out)["BOTH"] == value


def test_each_secret_read_is_audited_and_no_value_reaches_the_log(cli: Cli) -> None:
    assert cli("export", "--service", "auth").code == 0
    reads = [r for r in audit_records(cli) if r["operation"] == "export"]
    assert sorted(str(r["name"]) for r in reads) == sorted(f"auth/{key}" for key in AWKWARD)
    assert all(r["outcome"] == "ok" and r["version"] == 1 for r in reads)
    assert len({r["request_id"] for r in reads}) == 1
    fingerprint = cli("audit", "hash", input=b"KNOWN-nested").out.strip()
    assert {r["value_hmac"] for r in reads if r["name"] == "auth/jwt/signing-key"} == {fingerprint}
    assert b"KNOWN" not in (cli.store.parent / "store.audit.jsonl").read_bytes()
    shown = cli("audit", "show", "--read", "--json")
    assert {r["name"] for r in json.loads(shown.out)} >= {f"auth/{key}" for key in AWKWARD}


def test_a_binary_value_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    assert cli("store", "auth/BLOB", "--raw", input=b"\xff\xfe KNOWN").code == 0
    target = tmp_path / "auth.env"
    result = cli("export", "--service", "auth", "-o", str(target))
    assert_one_line_error(result, 2, "auth/BLOB is binary", "nothing was written", "get auth/BLOB --raw")
    assert not target.exists()
    assert list(tmp_path.glob("*auth.env*")) == []  # no temporary file left either


def test_an_existing_out_file_is_replaced_only_with_force_and_before_any_read(
    cli: Cli, tmp_path: Path
) -> None:
    target = tmp_path / "auth.env"
    target.write_text("kept\n")
    refused = cli("export", "--service", "auth", "-o", str(target))
    assert_one_line_error(refused, 7, "already exists", "--force")
    assert target.read_text() == "kept\n"
    assert not [r for r in audit_records(cli) if r["operation"] == "export"]  # nothing was read
    forced = cli("export", "--service", "auth", "-o", str(target), "--force")
    assert forced.code == 0, forced.stderr
    assert target.read_text().startswith("DB_PASSWORD=")


def test_a_namespace_with_nothing_to_read_is_not_found_and_the_stores_files_are_refused(
    cli: Cli, tmp_path: Path
) -> None:
    assert_one_line_error(cli("export", "--service", "nobody"), 3, "no secret under 'nobody/'")
    assert_one_line_error(cli("export", "--service", "auth/"), 2, "namespace")
    store_before = cli.store.read_bytes()
    refused = cli("export", "--service", "auth", "-o", str(cli.store), "--force")
    assert_one_line_error(refused, 2, "is the store itself")
    assert cli.store.read_bytes() == store_before
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    refused = cli(
        "--password-file", str(password_file), "export", "--service", "auth", "-o", str(password_file),
        "--force",
    )  # fmt: skip
    assert_one_line_error(refused, 2, "master password's file")
    assert password_file.read_text() == PASSWORD


def test_through_the_service_only_what_the_certificate_may_read(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth", "market-connector"))
    make_store(tmp_path)
    server = start_server(tmp_path)
    try:
        allowed = subprocess.run(
            [str(SCRIPT), "export", "--service", "auth", "--format", "json"],
            env=client_environ(tmp_path, "auth", [server.address]), capture_output=True, timeout=60,
        )  # fmt: skip
        denied = subprocess.run(
            [str(SCRIPT), "export", "--service", "auth"],
            env=client_environ(tmp_path, "market-connector", [server.address]),
            capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout) == {
        name.removeprefix("auth/"): value.decode() for name, value in SEED.items() if name.startswith("auth/")
    }
    assert denied.returncode == 3, denied.stderr
    assert denied.stdout == b""
    assert b"SEEKRIT" not in denied.stderr
