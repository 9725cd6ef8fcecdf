"""`secrets-manager serve` on a Vault (KV v2 test server) or AWS Secrets Manager (moto) store: real
serve processes with real mutual-TLS certificates, the real console script with --server and the
SDK. The same verbs, output and exit codes as the CLI on the store itself; access control and
audit (the anchor kept in the backend); Watch refused where watch_poll_seconds = 0 turned the
polled feed off, while the SDK refreshes by TTL (the polled feed itself: test_serve_external_watch.py);
health that follows the backend; password_file refused.

Each backend sits behind a TCP proxy that can cut every connection (`down`): from the service's
side Vault or AWS then stops answering, without stopping the session's shared moto server."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
from botocore.config import Config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secrets_manager import get_credentials_sync
from secrets_manager.client import close_default_client
from secrets_manager.errors import WatchUnsupportedError
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.base import AUDIT_KEYS_RECHECK_SECONDS
from secrets_manager.store.external import DEFAULT_AUDIT_SCOPE, audit_scope_for
from secrets_manager.store.vault import VaultStore, connect_vault
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.wire import error_for
from service_fixtures import (
    POLICY,
    SCRIPT,
    SEED,
    Server,
    assert_moved_to_the_second_audit_key,
    client_environ,
    eventually,
    make_pki,
    start_server,
)
from tcp_proxy import TcpProxy, Verdict
from vault_server import FakeVault

REGION = "us-east-1"
OPS = "spiffe://shrivenquant.local/ops"
AUDIT = 'audit_file = "store.audit.jsonl"\n'


class Switch(TcpProxy):
    """A proxy that passes everything until `down`, then cuts every connection that sends."""

    down = False

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        return Verdict.CUT if self.down else Verdict.PASS


@dataclass
class Backend:
    """One Vault mount or AWS prefix behind a `Switch`: its store URL and the environment that
    opens it (for serve and for the CLI on the store itself)."""

    kind: str
    url: str
    env: dict[str, str]
    proxy: Switch
    opened: list[Any] = field(default_factory=list)
    vault: FakeVault | None = None  # the Vault test server behind the proxy (its request log)

    def seed(self, values: dict[str, bytes]) -> None:
        store = self.open()
        try:
            for name, value in values.items():
                store.put(name, value)
        finally:
            store.close()

    def open(self, audit_log: Path | None = None) -> VaultStore | AwsStore:
        """The store itself (with the anchor of `audit_log`, a log of this host)."""
        scope = DEFAULT_AUDIT_SCOPE if audit_log is None else audit_scope_for(audit_log)
        if self.kind == "vault":
            client = connect_vault(f"http://{self.proxy.address}", environ=self.env)
            return VaultStore(client, "secret", actor="seeder", audit_scope=scope)
        client = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        ).client("secretsmanager", endpoint_url=self.env["AWS_ENDPOINT_URL"], config=Config())
        return AwsStore(client, self.url.rsplit("/", 1)[1], actor="seeder", audit_scope=scope)

    def cli(self, home: Path, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        """The console script on the store itself (no service)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "SECRETS_MANAGER_STORE": self.url,
            **self.env,
        }
        return subprocess.run(
            [str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env=env,
            timeout=60,
            start_new_session=True,
        )


@pytest.fixture
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Backend]]:
    """`make_backend("vault" | "aws")`: a new, empty store of that kind."""
    cleanup: list[Callable[[], None]] = []

    def make(kind: str) -> Backend:
        if kind == "vault":
            vault = FakeVault().start()
            cleanup.append(vault.stop)
            proxy = Switch("127.0.0.1", int(vault.address.rsplit(":", 1)[1]))
            cleanup.append(proxy.close)
            url = f"vault+http://{proxy.address}/secret"
            return Backend(kind, url, {"VAULT_TOKEN": vault.root_token}, proxy, vault=vault)
        endpoint = request.getfixturevalue("moto_endpoint")
        proxy = Switch("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))
        cleanup.append(proxy.close)
        env = {
            "AWS_ENDPOINT_URL": f"http://{proxy.address}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }
        return Backend(kind, f"aws-secretsmanager://{REGION}/serve-{secrets.token_hex(4)}", env, proxy)

    yield make
    for step in reversed(cleanup):
        step()


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "srv"
    directory.mkdir()
    make_pki(directory)
    (directory / "policy.toml").write_text(POLICY)
    return directory


def serve(directory: Path, backend: Backend, settings: str = "") -> Server:
    return start_server(directory, store=backend.url, settings=AUDIT + settings, environment=backend.env)


def audit_records(server: Server) -> list[dict[str, Any]]:
    return server.audit_records()


# The CLI's verbs, run on the store itself and through the service: (arguments, stdin).
VERBS: list[tuple[tuple[str, ...], bytes]] = [
    (("store", "auth/K", "--description", "the key", "--tag", "team=auth"), b"v1"),
    (("store", "auth/K"), b"v2"),
    (("get", "auth/K", "--version", "1"), b""),
    (("get", "auth/K", "--label", "pending"), b""),  # Vault: not supported (2); AWS: none (3)
    (("store", "auth/K", "--expect-version", "1"), b"v3"),  # 7: it is at version 2
    (("list",), b""),
    (("history", "auth/K", "--json"), b""),
    (("metadata", "auth/K", "--tag", "tier=1", "--description", "rotated monthly"), b""),
    (("metadata", "auth/K", "--json"), b""),
    (("delete", "auth/K"), b""),
    (("get", "auth/K"), b""),  # 3: deleted
    (("undelete", "auth/K"), b""),
    (("get", "auth/K"), b""),
]
_TIMES = re.compile(rb'"(created|updated|deleted)": "[^"]*"')


def _comparable(result: subprocess.CompletedProcess[bytes]) -> tuple[int, bytes, bytes]:
    """Exit code, stdout without times and creators, and stderr for a success (an error's text may
    name the service)."""
    out = _TIMES.sub(rb'"\1": "T"', result.stdout)
    out = re.sub(rb'"created_by": "[^"]*"', b'"created_by": "X"', out)
    return result.returncode, out, result.stderr if result.returncode == 0 else b""


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_the_cli_through_serve_answers_as_on_the_store_itself(
    kind: str, make_backend: Callable[[str], Backend], service_dir: Path, tmp_path: Path
) -> None:
    """Every verb with --server: the same output and exit codes as the CLI on a store of the same
    kind, the secret attributed to the caller's certificate. Failed before: serve refused the
    store ("serve runs on an encrypted store ... only for now")."""
    local, served = make_backend(kind), make_backend(kind)
    server = serve(service_dir, served)
    try:
        started = json.loads(server.log_lines[0])
        assert started["store_kind"] == ("vault+http" if kind == "vault" else "aws-secretsmanager")
        with ThreadPoolExecutor(2) as pool:  # two stores: the sequences run side by side
            here_run = pool.submit(lambda: [local.cli(tmp_path, *args, input=data) for args, data in VERBS])
            there_run = pool.submit(lambda: [server.cli("ops", *args, input=data) for args, data in VERBS])
            here, there = here_run.result(), there_run.result()
    finally:
        server.stop()
    for (args, _), mine, theirs in zip(VERBS, here, there, strict=True):
        assert _comparable(theirs) == _comparable(mine), (args, theirs, mine)
    assert [r.returncode for r in there[2:5]] == [0, 2 if kind == "vault" else 3, 7]
    assert (there[-3].returncode, there[-1].stdout) == (3, b"v2\n")
    # The secret is the caller's, as the CLI makes it the local user's.
    assert json.loads(there[8].stdout)["created_by"] == OPS
    assert json.loads(here[8].stdout)["created_by"] not in ("", OPS)


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_access_is_decided_by_the_policy_and_audited_under_the_certificate(
    kind: str, make_backend: Callable[[str], Backend], service_dir: Path, tmp_path: Path
) -> None:
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend)
    try:
        read = server.cli("auth", "get", "auth/DB_PASSWORD")
        assert (read.returncode, read.stdout) == (0, SEED["auth/DB_PASSWORD"] + b"\n")
        denied = server.cli("auth", "get", "market-connector/BINANCE_SECRET")
        assert denied.returncode == 5, denied.stderr
        assert server.cli("auth", "store", "auth/NEW", input=b"x").returncode == 5  # read-only role
        assert server.cli("nobody", "list").returncode == 5  # no role at all
        assert server.cli("writer", "store", "auth/NEW", input=b"written").returncode == 0
        # Rotation RPCs where the store has a `pending` label (AWS); Vault's refusal is the CLI's.
        rotated = server.cli("ops", "rotate", "auth/JWT_KEY")
        if kind == "vault":
            assert rotated.returncode == 2 and b"not supported by this store" in rotated.stderr, (
                rotated.stderr
            )
        else:
            assert rotated.returncode == 0, rotated.stderr
            now = server.cli("ops", "get", "auth/JWT_KEY").stdout
            assert now.strip() and now != SEED["auth/JWT_KEY"] + b"\n"
            previous = server.cli("ops", "get", "auth/JWT_KEY", "--label", "previous").stdout
            assert previous == SEED["auth/JWT_KEY"] + b"\n"
    finally:
        server.stop()
    records = audit_records(server)
    by_op = [(r["operation"], r["actor"], r["decision"], r["outcome"]) for r in records]
    assert ("get", "spiffe://shrivenquant.local/auth", "allow", "ok") in by_op
    assert ("get", "spiffe://shrivenquant.local/auth", "deny", "access_denied") in by_op
    assert ("store", "spiffe://shrivenquant.local/auth", "deny", "access_denied") in by_op
    assert ("store", "spiffe://shrivenquant.local/writer", "allow", "ok") in by_op
    rotation = [(op, outcome) for op, actor, _, outcome in by_op if op.startswith("rotate.") and actor == OPS]
    assert rotation == (
        [("rotate.stage", "pending"), ("rotate.stage", "invalid_input")]
        if kind == "vault"
        else [
            ("rotate.stage", "pending"),
            ("rotate.stage", "ok"),
            ("rotate.promote", "pending"),
            ("rotate.promote", "ok"),
        ]
    )
    get = next(r for r in records if r["operation"] == "get" and r["outcome"] == "ok")
    assert str(get["value_hmac"]).startswith("hmac-sha256:")
    log = (service_dir / "store.audit.jsonl").read_bytes()
    assert b"SEEKRIT" not in log and b"written" not in log
    # The anchor is in the backend, under this log's scope: the CLI verifies the log against it.
    verify = backend.cli(tmp_path, "--audit-file", str(service_dir / "store.audit.jsonl"), "audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(f"audit log verified: {len(records)} records".encode()), verify.stdout
    # The written value's fingerprint is the one the CLI computes on the store itself.
    hashed = backend.cli(
        tmp_path, "--audit-file", str(tmp_path / "own.jsonl"), "audit", "hash", "--raw", input=b"written"
    )
    assert hashed.returncode == 0, hashed.stderr
    store = next(r for r in records if r["operation"] == "store" and r["outcome"] == "ok")
    assert store["value_hmac"] == hashed.stdout.decode().strip()


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_watch_turned_off_is_refused_and_the_sdk_serves_by_ttl_without_a_reconnect_storm(
    kind: str,
    make_backend: Callable[[str], Backend],
    service_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Watch on a store without a change feed (here: the polled one turned off, as a service from
    before it answered, and the SDK must still handle): UNIMPLEMENTED at once, saying clients refresh by
    TTL, which the client raises as WatchUnsupportedError. The SDK (get_credentials) then serves
    from its cache and picks up a change at the TTL, with one Watch attempt and one warning. Before,
    it reconnected with backoff (0.1 s up to 5 s), a warning and an audited Watch each time."""
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend, "watch_poll_seconds = 0\n")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(server.stub("auth").Watch(pb.WatchRequest(prefix="auth/"), timeout=10)))
        error = refused.value
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "TTL" in str(error.details())
        assert isinstance(error_for(error.code(), str(error.details())), WatchUnsupportedError)

        for name, value in client_environ(service_dir, "auth", [server.address]).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("SECRETS_MANAGER_CACHE_TTL", "1")
        caplog.set_level(logging.DEBUG, logger="secrets_manager.client")
        try:
            creds = get_credentials_sync("auth")
            assert creds["DB_PASSWORD"].reveal() == SEED["auth/DB_PASSWORD"]
            rotated = server.cli("ops", "store", "auth/DB_PASSWORD", input=b"rotated-by-ops")
            assert rotated.returncode == 0, rotated.stderr
            # Served from the cache until the TTL, then refreshed (no push: no Watch).
            assert eventually(
                lambda: get_credentials_sync("auth")["DB_PASSWORD"].reveal() == b"rotated-by-ops", 10
            )
            time.sleep(3)  # the watcher had time to retry a few times, had it looped
        finally:
            close_default_client()
    finally:
        server.stop()
    watches = [r for r in audit_records(server) if r["operation"] == "watch"]
    assert [(r["actor"], r["decision"], r["outcome"]) for r in watches][1:] == [
        ("spiffe://shrivenquant.local/auth", "allow", "unsupported")
    ]  # the first is the stub's above; the SDK's watcher asked once
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "watch" in r.getMessage().lower()
    ]
    assert len(warnings) == 1 and "refresh by TTL" in warnings[0].getMessage(), [
        r.getMessage() for r in warnings
    ]


def started_and_anchored(server: Server, backend: Backend) -> bool:
    """Whether serve's record of its start (`serve`, ok) is in its log and its anchor in the backend."""
    started = [r["seq"] for r in audit_records(server) if (r["operation"], r["outcome"]) == ("serve", "ok")]
    if not started:
        return False
    store = backend.open(server.dir / "store.audit.jsonl")
    try:
        anchor = store.audit_anchor()
    finally:
        store.close()
    return anchor is not None and anchor.seq >= int(started[0])


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_health_says_not_serving_while_the_backend_does_not_answer(
    kind: str, make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """The store check needs no change feed (it read one before): the store's own cheap read.
    NOT_SERVING while Vault or AWS does not answer, SERVING again once it does."""
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend)
    try:
        health = health_pb2_grpc.HealthStub(server.channel("ops"))

        def status() -> int:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            except grpc.RpcError:
                return -1
            return int(answer.status)

        assert eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 10), "at start"
        # serve's own start record is written and anchored in the backend once it listens: a
        # backend gone before then stops the start, as any audit record that cannot be written does.
        assert eventually(lambda: started_and_anchored(server, backend), 20), "start record anchored"
        backend.proxy.down = True
        assert eventually(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 30), "".join(
            server.log_lines
        )
        backend.proxy.down = False
        # A probe may be inside the store's retries (up to 30 s), or a request that got no answer
        # holds the next ones back for the client's timeout (10 s on Vault): bounded, if slow.
        assert eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 45), "when up"
        assert server.cli("auth", "get", "auth/JWT_KEY").stdout == SEED["auth/JWT_KEY"] + b"\n"
    finally:
        server.stop()
    assert any('"check": "store"' in line for line in server.log_lines), "".join(server.log_lines)


def refused_serve(backend: Backend, directory: Path, settings: str, *options: str, **env: str) -> list[str]:
    """`serve` on `backend` with `settings` added to its config, which must refuse to start (exit
    2) before anything is written: its stderr lines."""
    config = directory / "server.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nstore = "{backend.url}"\npolicy = "policy.toml"\n{AUDIT}{settings}'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    config.chmod(0o600)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    result = subprocess.run(
        [str(SCRIPT), *options, "serve", "--config", str(config)],
        capture_output=True,
        env={"PATH": path, "HOME": str(directory), **backend.env, **env},
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert not (directory / "store.audit.jsonl").exists()
    assert backend.open().list() == []
    return result.stderr.decode().strip().splitlines()


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_a_password_file_is_refused_with_nothing_written(
    kind: str, make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """A Vault or AWS store has no master password: password_file would be ignored, so it is
    refused in one line, before anything is opened or written."""
    backend = make_backend(kind)
    (service_dir / "master-password").write_text("not used")
    (service_dir / "master-password").chmod(0o600)
    lines = refused_serve(backend, service_dir, 'password_file = "master-password"\n')
    assert len(lines) == 1 and "password_file in" in lines[0] and "remove it" in lines[0], lines
    assert "not supported by this store" in lines[0]
    lines = refused_serve(backend, service_dir, "", "--password-file", str(service_dir / "master-password"))
    assert len(lines) == 1 and "--password-file is not supported by this store" in lines[0], lines


def test_plain_http_vault_is_refused_in_production_as_the_cli_refuses_it(
    make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    lines = refused_serve(make_backend("vault"), service_dir, "", SHRIVENQUANT_ENV="production")
    assert lines[-1].startswith("secrets-manager: error: ") and "plain http" in lines[-1], lines


def test_a_rotation_schedule_is_refused_on_vault_which_cannot_stage(
    make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """Vault has no `pending` label: every scheduled rotation would fail at its stage, so the
    schedule is refused at the start, in one line, rather than failing at every check."""
    (service_dir / "rotation.toml").write_text('[[rotation]]\nname = "auth/DB_PASSWORD"\nevery = "30d"\n')
    lines = refused_serve(make_backend("vault"), service_dir, 'rotation_schedule = "rotation.toml"\n')
    assert len(lines) == 1 and "rotation_schedule (in" in lines[0] and "'pending' label" in lines[0], lines


def test_the_schedule_rotates_on_aws_when_asked_through_the_service(
    make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """AWS has AWS's own staging labels: RotateSecret runs the schedule's entry on the service,
    every step audited under the caller's identity."""
    backend = make_backend("aws")
    backend.seed(SEED)
    (service_dir / "rotation.toml").write_text('[[rotation]]\nname = "auth/JWT_KEY"\nevery = "30d"\n')
    server = serve(service_dir, backend, 'rotation_schedule = "rotation.toml"\n')
    try:
        rotated = server.cli("ops", "rotate", "auth/JWT_KEY", "--on-server")
        assert rotated.returncode == 0, rotated.stderr
        assert (
            server.cli("ops", "get", "auth/JWT_KEY", "--label", "previous").stdout
            == SEED["auth/JWT_KEY"] + b"\n"
        )
    finally:
        server.stop()
    steps = [(r["operation"], r["outcome"]) for r in audit_records(server) if r["actor"] == OPS]
    assert ("rotate.stage", "ok") in steps and ("rotate.promote", "ok") in steps and ("rotate", "ok") in steps


def test_on_aws_the_schedule_resumes_its_own_failed_rotation_once_stale(
    make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """AWS records no author per version, so the schedule cannot tell its own stale pending
    version from one a caller staged, and leaves both alone: its own failed rotation (a set
    command that failed) stayed pending for good. The version this process staged is resumed
    once stale, as on our stores."""
    backend = make_backend("aws")
    backend.seed(SEED)
    set_unless_broken = "sh -c 'test ! -e broken && cat > target'"
    (service_dir / "rotation.toml").write_text(
        f'[[rotation]]\nname = "auth/JWT_KEY"\nevery = "30d"\nset_command = "{set_unless_broken}"\n'
        "timeout = 1\n"
    )
    (service_dir / "broken").touch()
    server = serve(
        service_dir, backend, 'rotation_schedule = "rotation.toml"\nrotation_check_seconds = 0.2\n'
    )
    try:
        failed = server.cli("ops", "rotate", "auth/JWT_KEY", "--on-server")
        assert failed.returncode == 1 and b"the set command failed" in failed.stderr, failed.stderr
        (service_dir / "broken").unlink()
        # Three timeouts of 1 s later a pass resumes it: set, test, promote.
        assert eventually(lambda: (service_dir / "target").exists(), 20), "".join(server.log_lines)
        assert eventually(
            lambda: (
                server.cli("ops", "get", "auth/JWT_KEY").stdout
                == (service_dir / "target").read_bytes() + b"\n"
            ),
            10,
        )
    finally:
        server.stop()


def test_the_expiry_gauge_lists_a_vault_store_at_most_every_five_minutes(
    make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """Vault lists with a request per secret: the expiry gauge, asked at every Prometheus scrape,
    listed the whole store each time (it was written for our store, which keeps its listing while
    nothing changes). A Vault or AWS store is now listed again only every 5 minutes."""
    backend = make_backend("vault")
    backend.seed({f"auth/KEY_{index}": b"v" for index in range(5)})
    assert backend.vault is not None
    server = start_server(
        service_dir, store=backend.url, settings=AUDIT, environment=backend.env, metrics=True
    )
    try:

        def scrape() -> str:
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as answer:
                return str(answer.read().decode())

        def metadata_reads() -> int:
            requests = list(backend.vault.requests)  # type: ignore[union-attr]
            return sum(1 for _, path in requests if "/metadata/auth" in path)  # the secrets, not the anchor

        assert 'secrets_manager_secrets_expiring{state="expired"} 0.0' in scrape()
        listed = metadata_reads()
        for _ in range(3):
            time.sleep(0.6)  # past the 0.5 s one scrape's two states share
            assert 'secrets_manager_secrets_expiring{state="expired"} 0.0' in scrape()
        assert metadata_reads() == listed
    finally:
        server.stop()


def test_serve_works_under_a_vault_namespace_with_that_namespaces_token(
    make_backend: Callable[[str], Backend], service_dir: Path
) -> None:
    """VAULT_NAMESPACE (Vault Enterprise) in serve's environment: every request it makes (its
    clients' calls, the audit anchor, the health check's probe) goes to that namespace, whose token
    the root namespace does not know (developer.hashicorp.com/vault/docs/enterprise/namespaces)."""
    backend = make_backend("vault")
    assert backend.vault is not None
    team = backend.vault.namespace("team-a")
    team.add_policy(
        "kv", 'path "secret/*" { capabilities = ["create", "read", "update", "patch", "delete", "list"] }'
    )
    backend.env = {
        "VAULT_TOKEN": team.add_token("team-a-token", policies=["kv"]),
        "VAULT_NAMESPACE": "team-a",
    }
    backend.seed(SEED)
    server = serve(service_dir, backend)
    try:
        assert server.cli("ops", "store", "auth/NEW", input=b"x").returncode == 0
        assert server.cli("auth", "get", "auth/NEW").stdout == b"x\n"
        assert server.cli("ops", "list").stdout.decode().split() == sorted([*SEED, "auth/NEW"])
    finally:
        server.stop()
    assert "auth/NEW" in team.mounts["secret"] and backend.vault.requests == []
    probes = [p for m, p in team.requests if m == "GET" and "/metadata/.secrets-manager/audit-anchor/" in p]
    assert probes  # the health check's, in team-a too


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_a_serve_on_vault_or_aws_moves_to_the_new_audit_key_after_a_cli_rotation(
    kind: str, make_backend: Callable[[str], Backend], service_dir: Path, tmp_path: Path
) -> None:
    """The serve's log is not the CLI's: the serve reads the store's audit keys again every
    AUDIT_KEYS_RECHECK_SECONDS, records the rotation in its own log (under the old key), and
    MACs and fingerprints its later reads under key 2; both logs verify."""
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend)
    try:
        assert server.cli("auth", "get", "auth/DB_PASSWORD").returncode == 0
        rotated = backend.cli(tmp_path, "audit", "rotate-key")
        assert rotated.returncode == 0, rotated.stderr
        time.sleep(AUDIT_KEYS_RECHECK_SECONDS + 1)
        for _ in range(2):
            assert server.cli("auth", "get", "auth/DB_PASSWORD").returncode == 0
    finally:
        server.stop()
    candidate = backend.cli(tmp_path, "audit", "hash", input=SEED["auth/DB_PASSWORD"])
    assert candidate.returncode == 0, candidate.stderr
    new_fingerprint = candidate.stdout.decode().strip()
    records = audit_records(server)
    assert_moved_to_the_second_audit_key(records, new_fingerprint)
    log = str(service_dir / "store.audit.jsonl")
    verified = backend.cli(tmp_path, "--audit-file", log, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert backend.cli(tmp_path, "audit", "verify").returncode == 0
