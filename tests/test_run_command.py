"""`secrets-manager run`: a program started with the secrets it may read as environment variables,
from the local store (each read audited here) and through a service (its policy decides)."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from secrets_manager.cli.run_command import service_variable_problems
from service_fixtures import SEED, make_pki, make_store, start_server
from vault_server import FakeVault

if TYPE_CHECKING:
    from conftest import MadeOnce

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "run-command-test-password"
DB_PASSWORD = "db-password-SEEKRIT"
SIGNING_KEY = "jwt-signing-key-SEEKRIT"
SHOW = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.audit = home / "store.audit.jsonl"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "SECRETS_MANAGER_STORE": str(home / "store.db"),
            "MASTER_PASSWORD": PASSWORD,
        }

    def __call__(
        self, *args: str, input: bytes = b"", env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            input=input.decode(),
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            start_new_session=True,
            timeout=60,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def environment_of(self, *selection: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
        result = self("run", *selection, "--", *SHOW, env=env)
        assert result.returncode == 0, result.stderr
        environment: dict[str, str] = json.loads(result.stdout)
        return environment

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


def through_service(directory: Path, address: str) -> dict[str, str]:
    """The environment of a `run --server` as client `auth` (service_fixtures' certificates)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "SECRETS_MANAGER_ADDR": address,
        "SECRETS_MANAGER_CERT": str(directory / "auth.pem"),
        "SECRETS_MANAGER_KEY": str(directory / "auth-key.pem"),
        "SECRETS_MANAGER_CA": str(directory / "ca.pem"),
    }


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A store holding three secrets, made by the CLI (once per worker, then copied)."""

    def make(home: Path) -> None:
        cli = Cli(home)
        assert cli("init", "--kdf-profile", "test").returncode == 0
        for name, value in {
            "auth/DB_PASSWORD": DB_PASSWORD,
            "auth/jwt/signing-key": SIGNING_KEY,
            "market-connector/BINANCE_API_KEY": "binance-key",
        }.items():
            assert cli("store", name, input=value.encode()).returncode == 0

    made_once("test_run_command cli", make, tmp_path)
    return Cli(tmp_path)


def test_a_namespace_given_with_a_trailing_slash_is_refused_saying_to_drop_it(cli: Cli) -> None:
    """`run --service market-connector/`, as `list` and the README write prefixes: the error
    explained what a namespace is, not that the '/' was the one thing wrong. The same check
    serves import, export, keys and the SDK's get_credentials(NAMESPACE)."""
    for args in (
        ("run", "--service", "market-connector/", "--", "true"),
        ("export", "--service", "auth/"),
        ("import", "-", "--service", "auth/"),
    ):
        refused = cli(*args, input=b"KEY=value\n")
        assert refused.returncode == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        bare = args[args.index("--service") + 1].rstrip("/")
        assert lines[0] == (
            f"secrets-manager: error: invalid namespace '{bare}/': give it without the trailing '/', '{bare}'"
        )
    other = cli("run", "--service", "a/b", "--", "true")  # not a namespace at all: what one is
    assert other.returncode == 2 and "a namespace is the first segment of a name" in other.stderr
    code = "from secrets_manager import get_credentials_sync; get_credentials_sync('auth/')"
    sdk = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli.env, timeout=60
    )
    assert "give it without the trailing '/', 'auth'" in sdk.stderr


def test_a_service_namespace_becomes_variables_named_after_the_rest_of_each_name(cli: Cli) -> None:
    environment = cli.environment_of("--service", "auth")
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    assert environment["jwt_signing_key"] == SIGNING_KEY
    assert "BINANCE_API_KEY" not in environment  # another namespace
    assert environment["PATH"] == cli.env["PATH"]  # the rest of the environment is passed on


@pytest.mark.parametrize("mode", [[], ["--restart-on-change"]], ids=["exec", "supervised"])
def test_the_program_gets_sigpipe_as_from_a_shell(cli: Cli, mode: list[str]) -> None:
    """Python ignores SIGPIPE (and SIGXFSZ), and `run` exec'd COMMAND with them still ignored: a
    pipeline in it got EPIPE ('yes: standard output: Broken pipe'), a writer to a gone reader
    did not end as it does from a shell. --restart-on-change (subprocess) already reset them."""
    script = "grep '^SigIgn:' /proc/self/status; yes | head -1"
    result = cli("run", *mode, "--secret", "auth/DB_PASSWORD", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    ignored = int(result.stdout.split()[1], 16)
    assert not ignored & (1 << (13 - 1) | 1 << (25 - 1)), result.stdout  # SIGPIPE 13, SIGXFSZ 25
    assert result.stdout.splitlines()[1] == "y" and "Broken pipe" not in result.stderr


@pytest.mark.parametrize("mode", [[], ["--restart-on-change"]], ids=["exec", "supervised"])
def test_a_background_run_keeps_sigint_ignored_and_passes_sigterm_on(
    cli: Cli, tmp_path: Path, mode: list[str]
) -> None:
    """`secrets-manager run -- CMD &` in a script: a non-interactive POSIX shell starts a
    background job with SIGINT and SIGQUIT ignored, so that an interrupt meant for the script
    does not reach it. run leaves it so: CMD has SIGINT ignored, as `CMD &` would, and a SIGINT
    sent to run is not passed on; SIGTERM (a stop) reaches CMD and run ends with its 143."""
    said, pid_file = tmp_path / "said", tmp_path / "run.pid"
    program = (
        f"grep '^SigIgn:' /proc/self/status > {said}; trap 'echo TERM >> {said}; exit 143' TERM; "
        "while :; do sleep 0.1; done"
    )
    run = shlex.join([str(SCRIPT), "run", *mode, "--secret", "auth/DB_PASSWORD", "--", "sh", "-c", program])
    script = f'{run} & echo $! > {pid_file}; wait $!; echo "status $?" >> {said}'

    def as_at_a_terminal() -> None:  # whatever this test run was started with
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)

    shell = subprocess.Popen(
        ["/bin/sh", "-c", script], env=cli.env, start_new_session=True, preexec_fn=as_at_a_terminal
    )
    try:
        deadline = time.monotonic() + 30
        while not (said.exists() and said.read_text() and pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and shell.poll() is None, "run did not start its program"
            time.sleep(0.05)
        ignored = int(said.read_text().split()[1], 16)
        assert ignored & 1 << (signal.SIGINT - 1), said.read_text()  # as `CMD &` would have it
        run_pid = int(pid_file.read_text())
        os.kill(run_pid, signal.SIGINT)
        time.sleep(1)
        assert shell.poll() is None and "TERM" not in said.read_text()  # not passed on, not ended
        os.kill(run_pid, signal.SIGTERM)
        assert shell.wait(timeout=30) == 0
        assert said.read_text().splitlines()[1:] == ["TERM", "status 143"]
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()


def test_a_program_not_found_is_127_even_with_standard_error_a_closed_pipe(cli: Cli) -> None:
    """The signals reset for the program come back when it cannot be run: the error line to a
    pipe whose reader has gone must not kill `run` with SIGPIPE (exit -13 instead of 127)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run(
            [str(SCRIPT), "run", "--secret", "auth/DB_PASSWORD", "--", "no-such-program-here"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=writer,
            env=cli.env,
            start_new_session=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert proc.returncode == 127


# What reaches a store, set in `run`'s environment (none of it used by an SQLite store).
STORE_KEYS = {
    "VAULT_TOKEN": "vault-root-token-SEEKRIT",
    "VAULT_ROLE_ID": "role-SEEKRIT",
    "VAULT_SECRET_ID": "secret-id-SEEKRIT",
    "PGPASSWORD": "pg-password-SEEKRIT",
    "PGPASSFILE": "/nonexistent/pgpass",
}


def test_the_program_does_not_inherit_what_unlocks_or_reaches_a_store(cli: Cli, tmp_path: Path) -> None:
    """It gets the secrets it was given, not the key that opens every namespace: not the master
    password variables, the store's URL, Vault's or PostgreSQL's credentials."""
    environment = cli.environment_of("--service", "auth", env=STORE_KEYS)
    assert "MASTER_PASSWORD" not in environment and "SECRETS_MANAGER_STORE" not in environment
    assert not set(STORE_KEYS) & set(environment)
    password_file = tmp_path / "password.txt"
    password_file.write_text(PASSWORD)
    from_file = {"MASTER_PASSWORD": "", "MASTER_PASSWORD_FILE": str(password_file), **STORE_KEYS}
    environment = cli.environment_of("--service", "auth", env=from_file)
    assert "MASTER_PASSWORD_FILE" not in environment and "MASTER_PASSWORD" not in environment
    assert not set(STORE_KEYS) & set(environment)
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    # AWS credentials are withheld only where they reach the store; here they may be the program's
    aws = {"AWS_ACCESS_KEY_ID": "program-own", "AWS_PROFILE": "program-own"}
    environment = cli.environment_of("--service", "auth", env=aws)
    assert {k: environment[k] for k in aws} == aws


def test_the_withheld_variables_cover_every_credential_the_vault_store_reads() -> None:
    from secrets_manager.cli.run_command import WITHHELD_VARIABLES
    from secrets_manager.store import vault

    read = {vault.TOKEN_VARIABLE, vault.ROLE_ID_VARIABLE, vault.SECRET_ID_VARIABLE}
    assert read <= set(WITHHELD_VARIABLES)


def test_on_a_vault_store_the_program_gets_no_vault_token(tmp_path: Path) -> None:
    vault = FakeVault().start()
    try:
        cli = Cli(tmp_path)
        del cli.env["MASTER_PASSWORD"]
        cli.env["SECRETS_MANAGER_STORE"] = vault.address.replace("http://", "vault+http://") + "/secret"
        cli.env["VAULT_TOKEN"] = vault.root_token
        assert cli("store", "auth/DB_PASSWORD", input=DB_PASSWORD.encode()).returncode == 0
        result = cli("run", "--service", "auth", "--", "sh", "-c", 'echo "$DB_PASSWORD/${VAULT_TOKEN-unset}"')
    finally:
        vault.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{DB_PASSWORD}/unset\n"
    assert vault.root_token not in result.stdout


def test_on_a_postgresql_store_the_program_gets_no_database_password(
    tmp_path: Path, postgres_cluster: Any
) -> None:
    cli = Cli(tmp_path)
    cli.env["SECRETS_MANAGER_STORE"] = f"{postgres_cluster.url()}?schema={postgres_cluster.new_schema()}"
    cli.env.update(postgres_cluster.env())
    assert cli("init", "--kdf-profile", "test").returncode == 0
    assert cli("store", "auth/DB_PASSWORD", input=DB_PASSWORD.encode()).returncode == 0
    environment = cli.environment_of("--service", "auth")
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    assert "PGPASSWORD" not in environment and "SECRETS_MANAGER_STORE" not in environment
    assert postgres_cluster.env()["PGPASSWORD"] not in json.dumps(environment)


def aws_variables(endpoint: str, home: Path) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-SEEKRIT",
        "AWS_SESSION_TOKEN": "session-SEEKRIT",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


AWS_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def test_on_an_aws_store_the_program_gets_no_aws_credentials(tmp_path: Path, moto_endpoint: str) -> None:
    cli = Cli(tmp_path)
    del cli.env["MASTER_PASSWORD"]
    cli.env["SECRETS_MANAGER_STORE"] = f"aws-secretsmanager://us-east-1/run-{secrets.token_hex(4)}"
    cli.env.update(aws_variables(moto_endpoint, tmp_path))
    assert cli("store", "auth/DB_PASSWORD", input=DB_PASSWORD.encode()).returncode == 0
    environment = cli.environment_of("--service", "auth")
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    assert not set(AWS_CREDENTIALS) & set(environment), environment
    assert not [k for k, v in environment.items() if "SEEKRIT" in v and k != "DB_PASSWORD"]
    assert environment["AWS_DEFAULT_REGION"] == "us-east-1"  # not a credential: passed on


def test_on_a_store_an_aws_kms_key_unlocks_the_program_gets_no_aws_credentials(
    tmp_path: Path, moto_endpoint: str
) -> None:
    kms = boto3.client(
        "kms",
        region_name="us-east-1",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key_arn = kms.create_key(Description="run test")["KeyMetadata"]["Arn"]
    cli = Cli(tmp_path)
    del cli.env["MASTER_PASSWORD"]
    cli.env.update(aws_variables(moto_endpoint, tmp_path))
    created = cli("init", "--kms-key", key_arn)
    assert created.returncode == 0, created.stderr
    assert cli("store", "auth/DB_PASSWORD", input=DB_PASSWORD.encode()).returncode == 0
    environment = cli.environment_of("--service", "auth")
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    assert not set(AWS_CREDENTIALS) & set(environment), environment


def test_a_namespace_secret_may_not_set_a_variable_that_runs_code(cli: Cli, tmp_path: Path) -> None:
    """Whoever may write one secret of auth/ must not choose code for the service to run."""
    marker = tmp_path / "ran"
    refused = ("LD_PRELOAD", "PATH", "PYTHONSTARTUP", "BASH_ENV", "SSL_CERT_FILE", "GIT_SSH_COMMAND")
    for name in (*refused, "PERLLIB", "SSLKEYLOGFILE", "HTTPS_PROXY", "AWS_CA_BUNDLE", "KUBECONFIG"):
        assert cli("store", f"auth/{name}", input=str(tmp_path).encode()).returncode == 0
        refused = cli("run", "--service", "auth", "--", "touch", str(marker))
        assert refused.returncode == 2, refused.stderr
        assert f"auth/{name} would set ${name}" in refused.stderr
        assert f"--secret auth/{name}={name}" in refused.stderr
        assert not marker.exists()
        assert cli("destroy", f"auth/{name}", "--all").returncode == 0
    for name in ("NODE_ENV", "GIT_TOKEN"):  # ordinary names that only look alike
        assert cli("store", f"auth/{name}", input=b"fine").returncode == 0
    environment = cli.environment_of("--service", "auth")
    assert environment["NODE_ENV"] == environment["GIT_TOKEN"] == "fine"


def test_the_command_is_found_in_runs_own_path_not_one_a_secret_sets(cli: Cli, tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "env").write_text("#!/bin/sh\necho decoy ran\n")
    (decoy / "env").chmod(0o755)
    assert cli("store", "auth/SEARCH", input=str(decoy).encode()).returncode == 0
    result = cli("run", "--secret", "auth/SEARCH=PATH", "--", "env")  # named explicitly: allowed
    assert result.returncode == 0, result.stderr
    assert "decoy ran" not in result.stdout
    assert f"PATH={decoy}" in result.stdout.splitlines()  # the program itself gets the secret


def test_single_secrets_take_the_variable_they_are_given(cli: Cli) -> None:
    environment = cli.environment_of(
        "--secret", "market-connector/BINANCE_API_KEY=EXCHANGE_KEY", "--secret", "auth/DB_PASSWORD"
    )
    assert environment["EXCHANGE_KEY"] == "binance-key" and environment["DB_PASSWORD"] == DB_PASSWORD
    assert "BINANCE_API_KEY" not in environment


def test_the_program_replaces_run_keeps_its_pid_and_passes_its_exit_status(cli: Cli) -> None:
    process = subprocess.Popen(
        [str(SCRIPT), "run", "--service", "auth", "--", "sh", "-c", "echo $$; exit 42"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
        text=True,
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 42, err
    assert int(out) == process.pid  # exec: no process of ours stays between the program and its parent


def test_every_secret_read_is_audited_by_version_and_fingerprint_never_by_value(cli: Cli) -> None:
    cli.environment_of("--service", "auth")
    records = cli.records()
    runs = [r for r in records if r["operation"] == "run"]
    assert sorted((r["name"], r["version"], r["outcome"]) for r in runs) == [
        ("auth/DB_PASSWORD", 1, "ok"),
        ("auth/jwt/signing-key", 1, "ok"),
    ]
    assert len({r["request_id"] for r in runs}) == 1 and all(
        str(r["value_hmac"]).startswith("hmac-sha256:") for r in runs
    )
    fingerprint = cli("audit", "hash", input=DB_PASSWORD.encode()).stdout.strip()
    assert next(r for r in runs if r["name"] == "auth/DB_PASSWORD")["value_hmac"] == fingerprint
    log = cli.audit.read_text()
    assert DB_PASSWORD not in log and SIGNING_KEY not in log
    assert cli("audit", "verify").returncode == 0


def test_a_variable_already_set_is_replaced_with_a_warning_that_shows_no_value(cli: Cli) -> None:
    result = cli("run", "--service", "auth", "--", *SHOW, env={"DB_PASSWORD": "from-the-shell"})
    assert json.loads(result.stdout)["DB_PASSWORD"] == DB_PASSWORD
    assert "$DB_PASSWORD was set; auth/DB_PASSWORD replaces it" in result.stderr
    assert DB_PASSWORD not in result.stderr and "from-the-shell" not in result.stderr


@pytest.mark.parametrize(
    ("selection", "code", "message"),
    [
        ((), 2, "say which secrets"),
        (("--service", "nothing-here"), 3, "no secret under 'nothing-here/' that you may read"),
        (("--service", "default"), 3, "names without '/' are under no NAMESPACE/: take them with --secret"),
        (("--secret", "auth/MISSING"), 3, "not found"),
        (("--secret", "auth/DB_PASSWORD=2BAD"), 2, "is not an environment variable name"),
        (("--secret", "auth/DB_PASSWORD="), 2, "give the variable's name after '='"),
        (
            ("--service", "auth", "--secret", "market-connector/BINANCE_API_KEY=DB_PASSWORD"),
            2,
            "would both be",
        ),
        (("--service", "../auth"), 2, ""),
    ],
)
def test_a_bad_selection_runs_nothing(
    cli: Cli, tmp_path: Path, selection: tuple[str, ...], code: int, message: str
) -> None:
    marker = tmp_path / "ran"
    result = cli("run", *selection, "--", "touch", str(marker))
    assert result.returncode == code, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not marker.exists()


def test_a_secret_whose_value_row_is_gone_fails_the_run_and_runs_nothing(cli: Cli, tmp_path: Path) -> None:
    db = sqlite3.connect(cli.home / "store.db")
    db.execute("DELETE FROM entries WHERE key = 'data/auth/DB_PASSWORD#1'")
    db.commit()
    db.close()
    marker = tmp_path / "ran"
    result = cli("run", "--service", "auth", "--", "touch", str(marker))
    assert result.returncode == 6, result.stderr
    assert "version 1 of 'auth/DB_PASSWORD' is missing" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not marker.exists()  # not started without DB_PASSWORD


def test_a_value_with_a_nul_byte_cannot_be_a_variable(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "nul").write_bytes(b"a\0b")
    assert cli("store", "auth/BINARY", "--file", str(tmp_path / "nul")).returncode == 0
    result = cli("run", "--service", "auth", "--", "true")
    assert result.returncode == 2 and "auth/BINARY holds a NUL byte" in result.stderr


def test_a_command_that_cannot_start_gets_the_shells_exit_codes(cli: Cli, tmp_path: Path) -> None:
    missing = cli("run", "--service", "auth", "--", "no-such-command-anywhere")
    assert missing.returncode == 127 and "no-such-command-anywhere: command not found" in missing.stderr
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    denied = cli("run", "--service", "auth", "--", str(tmp_path / "not-executable"))
    assert denied.returncode == 126 and "Permission denied" in denied.stderr
    binary = tmp_path / "not-a-program"  # neither a #! line nor a format exec knows: sh cannot run it
    binary.write_bytes(b"\x7fELF\x00garbage")
    binary.chmod(0o755)
    refused = cli("run", "--service", "auth", "--", str(binary))
    assert refused.returncode == 126 and "cannot run" in refused.stderr


def test_a_script_without_a_shebang_line_is_run_by_sh_as_a_shell_runs_it(cli: Cli, tmp_path: Path) -> None:
    script = tmp_path / "no-shebang"
    script.write_text('printf "%s %s" "$1" "${DB_PASSWORD:+set}"\n')
    script.chmod(0o755)
    result = cli("run", "--service", "auth", "--", str(script), "argument")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "argument set"


def test_through_a_service_the_policy_decides_what_the_program_gets(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    try:
        env = through_service(tmp_path, server.address)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(SCRIPT), "run", *args], capture_output=True, text=True, env=env, timeout=60
            )

        allowed = run("--service", "auth", "--", *SHOW)
        assert allowed.returncode == 0, allowed.stderr
        environment = json.loads(allowed.stdout)
        expected = {
            name.split("/", 1)[1]: value.decode() for name, value in SEED.items() if name.startswith("auth/")
        }
        assert expected and {k: environment[k] for k in expected} == expected
        assert "SECRETS_MANAGER_KEY" not in environment  # the key that read them
        other = run("--service", "market-connector", "--", "true")
        assert (
            other.returncode == 3 and "no secret under 'market-connector/' that you may read" in other.stderr
        )
        denied = run("--secret", next(n for n in SEED if n.startswith("market-connector/")), "--", "true")
        assert denied.returncode == 5, denied.stderr
    finally:
        server.stop()
    records = [r for r in server.audit_records() if str(r["actor"]).endswith("/auth")]
    gets = [str(r["name"]) for r in records if r["operation"] == "get" and r["outcome"] == "ok"]
    assert sorted(gets) == sorted(n for n in SEED if n.startswith("auth/"))
    refused = [r for r in records if r["decision"] == "deny"]
    assert [r["name"] for r in refused] == [next(n for n in SEED if n.startswith("market-connector/"))]


def test_proxies_in_either_case_and_the_sdks_own_trust_variables_are_refused(
    cli: Cli, tmp_path: Path
) -> None:
    """curl and wget read only `https_proxy`, and a secret choosing SECRETS_MANAGER_CA or _ADDR picks
    whom the service's own SDK trusts: a namespace writer must not redirect its traffic."""
    marker = tmp_path / "ran"
    for name in ("https_proxy", "SECRETS_MANAGER_CA"):
        assert cli("store", f"auth/{name}", input=b"http://attacker.example:3128").returncode == 0
        refused = cli("run", "--service", "auth", "--", "touch", str(marker))
        assert refused.returncode == 2, refused.stderr
        assert (
            f"auth/{name} would set ${name}, which can choose the code programs run or whom" in refused.stderr
        )
        assert not marker.exists()
        assert cli("destroy", f"auth/{name}", "--all").returncode == 0


@pytest.mark.parametrize(
    "variable",
    [
        *("http_proxy", "HTTPS_PROXY", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy", "Http_Proxy"),
        *("SECRETS_MANAGER_ADDR", "SECRETS_MANAGER_CA", "SECRETS_MANAGER_CERT", "SECRETS_MANAGER_KEY"),
        *("SECRETS_MANAGER_STORE", "SECRETS_MANAGER_AUDIT_FILE", "MASTER_PASSWORD", "MASTER_PASSWORD_FILE"),
        *("SHRIVENQUANT_ENV", "PYTHONSTARTUP", "PERL5OPT", "RUBYOPT", "NODE_OPTIONS", "LD_AUDIT"),
        *("DYLD_INSERT_LIBRARIES", "BASH_ENV", "ENV", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"),
        *("CURL_CA_BUNDLE", "GIT_SSH_COMMAND", "JAVA_TOOL_OPTIONS", "npm_config_registry", "SHELL"),
        *("CURL_HOME", "WGETRC", "GIT_TEMPLATE_DIR", "OPENSSL_MODULES", "PGSSLROOTCERT", "VAULT_CACERT"),
        *("VAULT_ADDR", "VAULT_SKIP_VERIFY", "AWS_ENDPOINT_URL", "DOCKER_HOST", "GOPROXY", "GODEBUG"),
        *("GTK_MODULES", "QT_PLUGIN_PATH", "GST_PLUGIN_PATH", "GIO_EXTRA_MODULES", "R_PROFILE_USER"),
        *("ERL_AFLAGS", "ELIXIR_ERL_OPTIONS", "JULIA_LOAD_PATH", "TCLLIBPATH", "CC", "MAKEFLAGS"),
        *("CORECLR_PROFILER_PATH", "CORECLR_ENABLE_PROFILING", "COR_PROFILER_PATH", "MONO_ENV_OPTIONS"),
        *("KRB5_CONFIG", "KRB5CCNAME", "SASL_PATH", "GSS_MECH_CONFIG", "LDAPCONF"),
    ],
)
def test_variables_that_choose_code_or_trust_are_named_by_the_check(variable: str) -> None:
    """The check `run --service` refuses by and `import` warns by: one list, tried name by name."""
    problems = service_variable_problems([(variable, b"x")])
    assert problems == [
        f"{variable} would set ${variable}, which can choose the code programs run or whom they trust"
    ]


@pytest.mark.parametrize("variable", ["NODE_ENV", "GIT_TOKEN", "DB_PASSWORD", "proxy_user", "VAULT_TOKEN"])
def test_ordinary_variables_pass_the_check(variable: str) -> None:
    assert service_variable_problems([(variable, b"x")]) == []


def test_secrets_too_large_for_an_environment_are_named_as_such(cli: Cli, tmp_path: Path) -> None:
    """40 values of 64 KiB are over the kernel's limit on arguments and environment (2 MiB on
    Linux): exec's E2BIG read "cannot run true: Argument list too long"."""
    big = tmp_path / "big.json"
    big.write_text(json.dumps({f"K{i:02d}": "x" * 65_536 for i in range(40)}))
    assert cli("import", str(big), "--service", "big").returncode == 0
    result = cli("run", "--service", "big", "--", "true")
    assert result.returncode == 126, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot run true: 40 secret(s) of 2,560 KiB in all make its environment larger" in result.stderr
    assert "pass fewer with --secret" in result.stderr and "Argument list too long" not in result.stderr


# --env-file and sm:// references in run's environment, as `op run` reads op:// references.
DB_JSON = {"username": "app", "password": "db-json-password-SEEKRIT", "port": 5432}


@pytest.fixture
def with_json(cli: Cli) -> Cli:
    assert cli("store", "db/main", input=json.dumps(DB_JSON).encode()).returncode == 0
    return cli


def test_an_env_file_gives_plain_values_and_the_secrets_and_fields_it_refers_to(
    with_json: Cli, tmp_path: Path
) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text(
        "# the connector's settings\n"
        "export DB_USER=sm://db/main#username\n"
        'DB_PASSWORD="sm://db/main#password"\n'
        "DB_PORT=sm://db/main#port\n"
        "JWT=sm://auth/jwt/signing-key\n"
        "LOG_LEVEL='debug $HOME'\n"  # a plain value, passed as written (no expansion)
        "REGION=eu-west-1\n"
    )
    environment = with_json.environment_of("--env-file", str(env_file), env={"REGION": "from-the-shell"})
    assert {k: environment[k] for k in ("DB_USER", "DB_PASSWORD", "DB_PORT", "JWT")} == {
        "DB_USER": "app",
        "DB_PASSWORD": DB_JSON["password"],
        "DB_PORT": "5432",  # a field that is not text: its JSON
        "JWT": SIGNING_KEY,
    }
    assert environment["LOG_LEVEL"] == "debug $HOME"
    assert environment["REGION"] == "eu-west-1"  # the file wins over run's environment, as op run's
    # Each secret read once, audited with the whole value's fingerprint (not a field's)
    runs = [r for r in with_json.records() if r["operation"] == "run"]
    assert sorted((r["name"], r["version"]) for r in runs) == [("auth/jwt/signing-key", 1), ("db/main", 1)]
    whole = with_json("audit", "hash", input=json.dumps(DB_JSON).encode()).stdout.strip()
    assert next(r for r in runs if r["name"] == "db/main")["value_hmac"] == whole
    assert DB_JSON["password"] not in with_json.audit.read_text()


def test_a_later_env_file_wins_and_both_add_to_the_selected_secrets(cli: Cli, tmp_path: Path) -> None:
    first, second = tmp_path / "base.env", tmp_path / "prod.env"
    first.write_text("A=one\nB=sm://auth/DB_PASSWORD\nC=sm://auth/DB_PASSWORD\n")
    second.write_text("A=sm://market-connector/BINANCE_API_KEY\nB=two\n")
    environment = cli.environment_of(
        "--env-file", str(first), "--env-file", str(second), "--secret", "auth/jwt/signing-key=JWT"
    )
    assert (environment["A"], environment["B"], environment["C"]) == ("binance-key", "two", DB_PASSWORD)
    assert environment["JWT"] == SIGNING_KEY


def test_a_reference_in_runs_environment_is_replaced_by_the_secret_without_a_warning(cli: Cli) -> None:
    result = cli(
        "run",
        "--",
        *SHOW,
        env={"DB_PASSWORD": "sm://auth/DB_PASSWORD", "OTHER": "not sm://a reference", "URL": "sm:/x"},
    )
    assert result.returncode == 0, result.stderr
    environment = json.loads(result.stdout)
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    assert (environment["OTHER"], environment["URL"]) == ("not sm://a reference", "sm:/x")
    assert result.stderr == ""  # no "$DB_PASSWORD was set": the reference is what it replaces
    assert [r["name"] for r in cli.records() if r["operation"] == "run"] == ["auth/DB_PASSWORD"]


def test_a_reference_in_a_variable_run_withholds_is_neither_read_nor_passed_on(cli: Cli) -> None:
    """VAULT_TOKEN is withheld from every program: a reference there is not a way to read a secret
    into it (nor to fail the run)."""
    environment = cli.environment_of(
        "--secret", "auth/DB_PASSWORD", env={"VAULT_TOKEN": "sm://auth/jwt/signing-key"}
    )
    assert "VAULT_TOKEN" not in environment
    assert [r["name"] for r in cli.records() if r["operation"] == "run"] == ["auth/DB_PASSWORD"]


@pytest.mark.parametrize(
    ("content", "env", "code", "message"),
    [
        ("K=sm://auth/MISSING\n", {}, 3, "secret 'auth/MISSING' not found (app.env line 1); nothing was run"),
        ("K=sm://db/main#nofield\n", {}, 3, "has no field 'nofield'"),
        ("K=sm://auth/DB_PASSWORD#field\n", {}, 2, "is not a JSON object"),
        ("K=sm://\n", {}, 2, "app.env line 1: a value starting with sm:// must be a reference"),
        ("K=sm://../auth/DB_PASSWORD\n", {}, 2, "app.env line 1: "),
        ("2K=sm://auth/DB_PASSWORD\n", {}, 2, "app.env line 1: '2K' is not an environment variable name"),
        ("K\n", {}, 2, "app.env line 1 is not KEY=VALUE; nothing was run"),
        ("DB_PASSWORD=sm://auth/jwt/signing-key\n", {}, 2, "$DB_PASSWORD is given twice"),
        ("K=v\n", {"PASSWORDISH": "sm://has a space-SEEKRIT"}, 2, "$PASSWORDISH in the environment: a value"),
        ("K=v\n", {"X": "sm://auth/NOPE"}, 3, "secret 'auth/NOPE' not found ($X in the environment)"),
    ],
)
def test_a_bad_env_file_or_reference_runs_nothing_and_says_where_it_is(
    with_json: Cli, tmp_path: Path, content: str, env: dict[str, str], code: int, message: str
) -> None:
    (tmp_path / "app.env").write_text(content)
    marker = tmp_path / "ran"
    result = subprocess.run(  # in tmp_path: the messages name the file as it was given
        [str(SCRIPT), "run", "--service", "auth", "--env-file", "app.env", "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        env={**with_json.env, **env},
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert "SEEKRIT" not in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_an_env_file_that_cannot_be_read_runs_nothing(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "binary.env").write_bytes(b"K=\xff\xfe\n")
    for path, message in (
        (tmp_path / "missing.env", "does not exist"),
        (tmp_path, "is a directory"),
        (tmp_path / "binary.env", "is not UTF-8 text"),
    ):
        result = cli("run", "--env-file", str(path), "--", "true")
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_through_a_service_references_are_read_with_the_callers_certificate(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    own = next(n for n in SEED if n.startswith("auth/"))
    other = next(n for n in SEED if n.startswith("market-connector/"))
    try:
        env = through_service(tmp_path, server.address)
        allowed = subprocess.run(
            [str(SCRIPT), "run", "--", *SHOW],
            capture_output=True,
            text=True,
            env={**env, "MINE": f"sm://{own}"},
            timeout=60,
        )
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout)["MINE"] == SEED[own].decode()
        denied = subprocess.run(
            [str(SCRIPT), "run", "--", "true"],
            capture_output=True,
            text=True,
            env={**env, "THEIRS": f"sm://{other}"},
            timeout=60,
        )
        assert denied.returncode == 5, denied.stderr
    finally:
        server.stop()


def test_a_withheld_variable_that_merely_starts_with_the_scheme_is_no_reference(tmp_path: Path) -> None:
    """The master password (or a Vault token) may start with sm:// without being a reference: `run`
    withholds it from COMMAND, so it is not read as one, nor refused as a malformed one."""
    password = "sm://not a reference, a pass phrase SEEKRIT"
    cli = Cli(tmp_path)
    cli.env["MASTER_PASSWORD"] = password
    assert cli("init", "--kdf-profile", "test").returncode == 0
    assert cli("store", "auth/DB_PASSWORD", input=DB_PASSWORD.encode()).returncode == 0
    result = cli("run", "--secret", "auth/DB_PASSWORD", "--", *SHOW, env={"VAULT_TOKEN": "sm://x y"})
    assert result.returncode == 0, result.stderr
    environment = json.loads(result.stdout)
    assert environment["DB_PASSWORD"] == DB_PASSWORD
    assert "MASTER_PASSWORD" not in environment and "VAULT_TOKEN" not in environment
    assert "SEEKRIT" not in result.stderr


def test_a_reference_in_a_variable_whose_name_is_not_utf8_is_given_under_that_name(cli: Cli) -> None:
    """The environment's names are bytes: one that is not UTF-8 keeps its bytes (no internal error)."""
    result = subprocess.run(
        [
            str(SCRIPT),
            "run",
            "--",
            sys.executable,
            "-c",
            "import os, sys; sys.stdout.buffer.write(os.environb[b'K\\xff'])",
        ],
        capture_output=True,
        env={
            **{os.fsencode(k): os.fsencode(v) for k, v in cli.env.items()},
            b"K\xff": b"sm://auth/DB_PASSWORD",
        },
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == DB_PASSWORD.encode()


def test_an_environment_too_large_for_other_variables_than_the_secrets_says_so(
    cli: Cli, tmp_path: Path
) -> None:
    """exec's E2BIG blamed the secrets ('1 secret(s) of 0 KiB in all make its environment larger
    …; pass fewer with --secret') when it was an --env-file value longer than one variable may be
    (128 KiB on Linux), or the env files' values that made the environment too large."""
    long_line = tmp_path / "long.env"
    long_line.write_text("CERT_BUNDLE=" + "x" * 200_000 + "\nP=sm://auth/DB_PASSWORD\n")
    result = cli("run", "--env-file", str(long_line), "--", "true")
    assert result.returncode == 126, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        "cannot run true: $CERT_BUNDLE (from run's environment or an --env-file) is 195 KiB" in result.stderr
    )
    assert "longer than the 128 KiB the kernel takes for one variable" in result.stderr
    assert "--secret" not in result.stderr and "xxxx" not in result.stderr
    (tmp_path / "p.env").write_text("P=sm://auth/DB_PASSWORD\n")
    files = ["--env-file", str(tmp_path / "p.env")]
    for n in range(3):  # 2.8 MiB of plain values in all, each under 128 KiB
        path = tmp_path / f"part{n}.env"
        path.write_text("".join(f"V{n}_{i}={'y' * 120_000}\n" for i in range(8)))
        files += ["--env-file", str(path)]
    many = cli("run", *files, "--", "true")
    assert many.returncode == 126, many.stderr
    assert "cannot run true: its environment of 2,8" in many.stderr
    assert "(1 secret(s) of 0 KiB, the rest from run's environment and any --env-file)" in many.stderr
    assert "pass fewer variables" in many.stderr and "--secret" not in many.stderr


@pytest.mark.parametrize(
    "value", ["sm://-pass-SEEKRIT", "sm://a//pass-SEEKRIT", "sm://.pass-SEEKRIT", "sm://" + "SEEKRIT" * 40]
)
def test_a_value_that_starts_with_the_scheme_but_names_no_secret_is_not_quoted(
    cli: Cli, tmp_path: Path, value: str
) -> None:
    """A password that merely starts with sm:// and is no valid secret name: refused (exit 2) by
    where it is written, never quoted (the name check's own message quoted it: "invalid secret
    name '-pass-…'")."""
    (tmp_path / "app.env").write_text(f"PASSWORD={value}\n")
    for args, env, where in (
        (("--env-file", str(tmp_path / "app.env")), {}, "app.env line 1: "),
        (("--secret", "auth/DB_PASSWORD"), {"PASSWORD": value}, "$PASSWORD in the environment: "),
    ):
        result = cli("run", *args, "--", "true", env=env)
        assert result.returncode == 2, result.stderr
        assert where in result.stderr and "is no secret name" in result.stderr, result.stderr
        assert "SEEKRIT" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
