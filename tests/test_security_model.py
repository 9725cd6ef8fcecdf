"""Claims of docs/security.md that no other test showed: what a network attacker, another local
user and someone who can read the PostgreSQL database cannot do. Each test drives the real thing
(a `serve` process with real certificates, files the CLI wrote, a PostgreSQL cluster) and would
fail if the claim stopped holding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from agent_fixtures import require_root
from postgres_cluster import PostgresCluster
from secrets_manager.client import Client
from secrets_manager.crypto import kdf
from secrets_manager.storage.postgres import PostgresStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from service_fixtures import (
    PASSWORD,
    SCRIPT,
    SEED,
    Server,
    eventually,
    make_pki,
    make_store,
    run_script,
    start_server,
)
from tcp_proxy import TcpProxy, Verdict


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path)
    make_store(tmp_path)
    running = start_server(tmp_path)
    yield running
    running.stop()


def spellings(material: bytes) -> list[bytes]:
    """Raw, hex and base64 forms of key material, as they might land somewhere."""
    return [material, material.hex().encode(), base64.b64encode(material)]


# ---- a compromised service ---------------------------------------------------------------------


def test_a_revoked_certificate_gets_no_health_answer_and_no_secret_call(server: Server) -> None:
    """What docs/security.md says a revoked certificate gets: nothing. Every Secrets call is
    refused, and so is grpc.health (it was answered SERVING before; reflection likewise,
    tests/test_audit_completeness.py), each refusal audited with the certificate's serial."""
    serial = format(x509.load_pem_x509_certificate((server.dir / "auth.pem").read_bytes()).serial_number, "X")
    policy = server.dir / "policy.toml"
    policy.write_text(policy.read_text() + f'\n[revoked]\nserials = ["{serial}"]\n')
    server.process.send_signal(signal.SIGHUP)
    stub = server.stub("auth")

    def refused() -> bool:
        try:
            stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        except grpc.RpcError as error:
            return error.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined,no-any-return]
        return False

    assert eventually(refused)
    health = health_pb2_grpc.HealthStub(server.channel("auth"))  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as raised:
        health.Check(health_pb2.HealthCheckRequest(service="secrets_manager.v1.Secrets"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    refusals = [r for r in server.audit_records() if r["operation"] == "health"]
    assert [(r["outcome"], int(str(r["certificate_serial"]), 16)) for r in refusals] == [
        ("unauthenticated", int(serial, 16))
    ]


# ---- someone who can write the audit log ------------------------------------------------------


def _append_forged_record(log: Path, **fields: object) -> None:
    """A record appended as anyone who may write the log could: chained to the last line, its
    hash computed (SHA-256 of the canonical line without `hash` and `mac`), no MAC (no audit key)."""
    last = json.loads(log.read_text().splitlines()[-1])
    record: dict[str, object] = {
        "actor": "alice", "decision": "deny", "name": None, "operation": "unlock",
        "outcome": "unlock_failed", "peer": None, "prev": last["hash"], "request_id": str(uuid.uuid4()),
        "seq": last["seq"] + 1, "source": "cli", "time": "2026-12-02T12:00:00.000000+00:00",
        "value_hmac": None, "version": None, **fields,
    }  # fmt: skip
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    record["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    record["mac"] = None
    with log.open("a") as out:
        out.write(json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n")


def _store_holding(tmp_path: Path, value: bytes) -> dict[str, str]:
    """The CLI's environment on a new store under tmp_path/store that holds auth/KEY = `value`
    (its log: secrets.audit.jsonl beside it)."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": str(tmp_path / "store" / "secrets.db"),
        "MASTER_PASSWORD": PASSWORD,
    }
    for args, stdin in ((["init", "--kdf-profile", "test"], b""), (["store", "auth/KEY"], value)):
        assert run_script(environ, *args, input=stdin).returncode == 0
    return environ


def test_who_may_write_the_log_alone_can_append_failed_unlocks_and_no_other_record(tmp_path: Path) -> None:
    """A failed unlock is recorded by a process that could not open the store, so without the
    audit key: it has no MAC, and anyone who may write the log can append one that `audit verify`
    accepts (a failed attempt of their making, here in alice's name). Any other record without a
    MAC is refused; so the forger can add failed unlocks, not reads or changes."""
    environ = _store_holding(tmp_path, b"v")
    log = tmp_path / "store" / "secrets.audit.jsonl"
    kept = log.read_bytes()
    _append_forged_record(log)
    verified = run_script(environ, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert run_script(environ, "get", "auth/KEY").returncode == 0  # and the next writer chains on
    assert run_script(environ, "audit", "verify").returncode == 0
    denied = [json.loads(line) for line in log.read_text().splitlines() if '"unlock_failed"' in line]
    assert [r["actor"] for r in denied] == ["alice"]

    log.write_bytes(kept)
    _append_forged_record(log, actor=pwd.getpwuid(os.geteuid()).pw_name, decision="allow", operation="get",
                          outcome="ok", name="auth/KEY", version=1)  # fmt: skip
    refused = run_script(environ, "audit", "verify")
    assert refused.returncode == 6 and b"lacks its MAC" in refused.stderr, refused.stderr


def test_who_may_write_the_log_alone_can_cut_failed_unlocks_from_its_end_but_no_anchored_record(
    tmp_path: Path,
) -> None:
    """Failed unlocks move no anchor (their process holds no key): cut from the end of the log,
    they go unseen (docs/audit.md §6), and the next writer chains on. A record the store anchored
    cannot be cut so."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": str(tmp_path / "store" / "secrets.db"),
        "MASTER_PASSWORD": PASSWORD,
    }
    for args, stdin in ((["init", "--kdf-profile", "test"], b""), (["store", "auth/KEY"], b"v")):
        assert run_script(environ, *args, input=stdin).returncode == 0
    assert run_script(environ, "get", "auth/KEY").returncode == 0
    log = tmp_path / "store" / "secrets.audit.jsonl"
    anchored = log.read_text().splitlines()
    for guess in ("guess-1", "guess-2"):
        assert run_script(environ, "get", "auth/KEY", env={"MASTER_PASSWORD": guess}).returncode == 4
    assert len(log.read_text().splitlines()) == len(anchored) + 2
    log.write_text("\n".join(anchored) + "\n")  # the two failed unlocks cut
    assert run_script(environ, "audit", "verify").returncode == 0
    assert run_script(environ, "get", "auth/KEY").stdout == b"v\n"
    assert run_script(environ, "audit", "verify").returncode == 0
    assert '"unlock_failed"' not in log.read_text()

    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")  # the anchored get cut
    cut = run_script(environ, "audit", "verify")
    assert cut.returncode == 6 and b"missing at the end" in cut.stderr, cut.stderr


def test_the_sdks_development_local_mode_reads_without_an_audit_record(tmp_path: Path) -> None:
    """What docs/security.md lists as not protected: with no service address (development), the
    SDK reads the store file directly, and nothing is appended to the store's audit log."""
    environ = _store_holding(tmp_path, b"local-value")
    log = tmp_path / "store" / "secrets.audit.jsonl"
    before = log.read_bytes()
    with Client(environ={**environ, "SHRIVENQUANT_ENV": "development"}) as client:
        assert client.credentials()["auth/KEY"].reveal() == b"local-value"
    assert log.read_bytes() == before
    # The same read through the CLI is recorded.
    assert run_script(environ, "get", "auth/KEY").returncode == 0
    assert log.read_bytes() != before


# ---- a network attacker ------------------------------------------------------------------------


def test_a_server_config_without_tls_is_refused_there_is_no_plaintext_port(tmp_path: Path) -> None:
    make_store(tmp_path)
    config = tmp_path / "server.toml"
    config.write_text('listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\n')
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": PASSWORD,
    }
    done = run_script(environ, "serve", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert b"[tls] with cert, key and client_ca is required (mutual TLS only)" in done.stderr


def test_a_client_without_tls_reaches_no_rpc_and_leaves_no_record(server: Server) -> None:
    log = server.dir / "store.audit.jsonl"
    before = log.read_bytes() if log.exists() else b""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SecretsStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert (log.read_bytes() if log.exists() else b"") == before
    # The same call over mutual TLS is answered: the refusal above was the missing TLS.
    reply = server.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
    assert reply.secret.value == SEED["auth/DB_PASSWORD"]


class RecordingProxy(TcpProxy):
    """Passes everything on, keeping a copy of what went each way."""

    def __init__(self, host: str, port: int) -> None:
        self.seen: dict[bool, bytearray] = {True: bytearray(), False: bytearray()}
        self._seen_lock = threading.Lock()
        super().__init__(host, port)

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        with self._seen_lock:
            self.seen[from_client] += data
        return Verdict.PASS


def test_a_network_observer_sees_neither_values_nor_names_on_the_wire(server: Server) -> None:
    proxy = RecordingProxy("127.0.0.1", server.port)
    written = b"written-through-the-wire-SEEKRIT-5"
    try:
        ca = (server.dir / "ca.pem").read_bytes()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(server.dir / "ops-key.pem").read_bytes(),
            certificate_chain=(server.dir / "ops.pem").read_bytes(),
        )
        with grpc.secure_channel(proxy.address, credentials) as channel:
            stub = pb_grpc.SecretsStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
            assert reply.secret.value == SEED["auth/DB_PASSWORD"]
            stub.PutSecret(pb.PutSecretRequest(name="auth/WIRE_TEST", value=written), timeout=10)
            everything = stub.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix="", page_size=100), timeout=10)
            assert {s.name for s in everything.secrets} >= set(SEED)
    finally:
        proxy.close()
    to_server, to_client = bytes(proxy.seen[True]), bytes(proxy.seen[False])
    assert to_server[:1] == b"\x16" and to_client[:1] == b"\x16"  # TLS handshake records, both ways
    wire = to_server + to_client
    assert len(wire) > 1000  # the calls went through this proxy
    leaked = [v for v in [*SEED.values(), written, b"auth/DB_PASSWORD", b"auth/WIRE_TEST"] if v in wire]
    assert leaked == []


def test_the_metrics_endpoint_shows_no_secret_name_or_value(tmp_path: Path) -> None:
    """`metrics_listen` is plain HTTP for whoever reaches it: it counts by method, code and state,
    never by secret."""
    make_pki(tmp_path)
    make_store(tmp_path)
    running = start_server(tmp_path, metrics=True)
    try:
        stub = running.stub("ops")
        for name in SEED:
            stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10)
        with pytest.raises(grpc.RpcError):
            running.stub("auth").GetSecret(
                pb.GetSecretRequest(name="market-connector/BINANCE_SECRET"), timeout=10
            )
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read()
    finally:
        running.stop()
    assert b'secrets_manager_requests_total{code="OK",method="GetSecret"} 4.0' in body  # counted
    shown = [v for v in [*SEED.values(), *(name.encode() for name in SEED), b"SEEKRIT"] if v in body]
    assert shown == []


# ---- another local user ------------------------------------------------------------------------


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory that `nobody` may enter (pytest's own are root's 0700). Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="security-model-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_as_nobody(path: Path, count: int = 1) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["head", "-c", str(count), str(path)],
        user="nobody",
        group="nogroup" if _group_exists("nogroup") else "nobody",
        extra_groups=[],
        capture_output=True,
        timeout=30,
    )


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_another_local_user_can_read_none_of_the_files_the_cli_writes(open_tmp: Path) -> None:
    """Store, audit log, backup, export and PKI keys are 0600: even in a directory others may enter
    (here every directory is opened to 0755 after the CLI made it 0700) another user reads none."""
    require_root("reading as another user needs setuid")
    (open_tmp / "password").write_text("a master password for this test\n")
    (open_tmp / "password").chmod(0o600)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(open_tmp),
        "SECRETS_MANAGER_STORE": str(open_tmp / "store" / "secrets.db"),
        "MASTER_PASSWORD_FILE": str(open_tmp / "password"),
    }
    steps = [
        (["init", "--kdf-profile", "test"], b""),
        (["store", "auth/DB_PASSWORD"], b"a-value-others-must-not-read"),
        (["backup", str(open_tmp / "backups" / "nightly.smbackup")], b""),
        (["export", "--service", "auth", "-o", str(open_tmp / "exports" / "auth.env")], b""),
        (["pki", "init", "--dir", str(open_tmp / "pki")], b""),
        (["pki", "issue", "server", "--server", "--dir", str(open_tmp / "pki")], b""),
        (["pki", "issue", "auth", "--dir", str(open_tmp / "pki")], b""),
    ]
    (open_tmp / "backups").mkdir(mode=0o700)
    (open_tmp / "exports").mkdir(mode=0o700)
    for args, stdin in steps:
        done = run_script(environ, *args, input=stdin)
        assert done.returncode == 0, (args, done.stderr)
    made = {
        "store": open_tmp / "store" / "secrets.db",
        "audit log": open_tmp / "store" / "secrets.audit.jsonl",
        "backup": open_tmp / "backups" / "nightly.smbackup",
        "export": open_tmp / "exports" / "auth.env",
        "CA key": open_tmp / "pki" / "ca-key.pem",
        "server key": open_tmp / "pki" / "server-key.pem",
        "client key": open_tmp / "pki" / "auth-key.pem",
    }
    for directory in {path.parent for path in made.values()}:
        directory.chmod(0o755)  # the directory no longer keeps anyone out: the file's mode must
    readable = {
        what: oct(path.stat().st_mode & 0o777) for what, path in made.items() if path.stat().st_mode & 0o077
    }
    assert readable == {}
    read = {what: read_as_nobody(path) for what, path in made.items()}
    assert {what: done.returncode for what, done in read.items() if done.returncode == 0} == {}
    assert all(b"Permission denied" in done.stderr for done in read.values()), read
    # The check can fail: a file of the same directories that others may read is read.
    control = open_tmp / "store" / "readable-by-all"
    control.write_bytes(b"x")
    control.chmod(0o644)
    assert read_as_nobody(control).stdout == b"x"


NOBODY_WRAPPER = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def _cannot_run_here(why: str) -> None:
    """Skip, saying why; under CI, where the test must run, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this: {why}")
    pytest.skip(why)


@pytest.mark.parametrize(("environment", "readable"), [("staging", False), ("development", True)])
def test_outside_development_other_processes_of_serves_user_cannot_read_its_memory(
    environment: str, readable: bool
) -> None:
    """PR_SET_DUMPABLE 0 outside development: /proc/PID/mem and /proc/PID/environ (which holds
    MASTER_PASSWORD where that is how serve was given it) become root's, so another process of the
    user serve runs as (here nobody) cannot read them; development keeps them readable for a
    developer's own debugger, which shows the check can fail."""
    require_root("serve as another user, and a process of that user, need setuid")
    if shutil.which("setpriv") is None:
        _cannot_run_here("setpriv (util-linux) runs serve as nobody")
    probe = subprocess.run([*NOBODY_WRAPPER, str(SCRIPT), "--version"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        _cannot_run_here(
            f"nobody cannot run this checkout's secrets-manager: {probe.stderr.decode().strip()}"
        )
    directory = Path(tempfile.mkdtemp(prefix="security-model-serve-"))
    try:
        directory.chmod(0o755)
        make_pki(directory, ("auth",))
        make_store(directory)
        (directory / "server.toml").write_text("")  # start_server writes it: nobody's, as the rest
        subprocess.run(["chown", "-R", "nobody:nogroup", str(directory)], check=True, timeout=30)
        running = start_server(
            directory, environment={"SHRIVENQUANT_ENV": environment}, wrapper=NOBODY_WRAPPER
        )
        try:
            reply = running.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
            assert reply.secret.value == SEED["auth/DB_PASSWORD"]  # it serves, as nobody
            pid = running.process.pid
            (uids,) = [
                line.split()[1:]
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:")
            ]
            assert set(uids) == {str(pwd.getpwnam("nobody").pw_uid)}  # it runs as nobody
            environ = read_as_nobody(Path(f"/proc/{pid}/environ"), count=100_000)
            mem = read_as_nobody(Path(f"/proc/{pid}/mem"))
        finally:
            running.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert (PASSWORD.encode() in environ.stdout) is readable, environ.stderr
    assert (b"Permission denied" in mem.stderr) is not readable, mem.stderr


# ---- someone who can read the database ---------------------------------------------------------


def test_the_postgresql_database_holds_no_value_and_no_key_material(
    postgres_cluster: PostgresCluster,
) -> None:
    schema = postgres_cluster.new_schema()
    storage = PostgresStorage(postgres_cluster.url(with_password=True), schema=schema, create=True)
    store = EncryptedStore.create(storage, PasswordUnlock(PASSWORD, kdf.TEST))
    values = [b"pg-binance-key-SEEKRIT-6", b"pg-db-password-SEEKRIT-7"]
    try:
        store.put("market-connector/BINANCE_API_KEY", values[0])
        store.put("auth/DB_PASSWORD", values[1])
        store.put("auth/DB_PASSWORD", values[1] + b"-rotated")
        forbidden = [*values, PASSWORD.encode(), *spellings(store._root.material)]
        for namespace in ("market-connector", "auth"):
            for key in store._keyset_for_read(namespace).keys:
                forbidden += spellings(key.material)
    finally:
        store.close()
    dumped = bytearray()
    with postgres_cluster.connect() as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
        assert tables
        for (table,) in tables:
            query = sql.SQL("COPY (SELECT * FROM {}.{}) TO STDOUT (FORMAT binary)")
            with connection.cursor().copy(
                query.format(sql.Identifier(schema), sql.Identifier(str(table)))
            ) as copy:
                for chunk in copy:
                    dumped += bytes(chunk)
    assert b"market-connector/BINANCE_API_KEY" in dumped  # names are not secret: we read the rows
    assert [needle for needle in forbidden if needle in dumped] == []


# ---- someone who can read the audit log --------------------------------------------------------


def test_a_value_fingerprint_cannot_be_checked_against_a_guess_without_the_stores_audit_key(
    tmp_path: Path,
) -> None:
    """The log holds `hmac-sha256:` of each value read, under a key sealed in the store: the same
    value has another fingerprint in another store, and none is a plain digest a reader of the log
    could compute from a guess."""
    value = b"a-guessable-value-SEEKRIT-8"
    fingerprints = []
    for name in ("one", "two"):
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "SECRETS_MANAGER_STORE": str(tmp_path / name / "secrets.db"),
            "MASTER_PASSWORD": PASSWORD,
        }
        for args, stdin in ((["init", "--kdf-profile", "test"], b""), (["store", "auth/KEY"], value)):
            assert run_script(environ, *args, input=stdin).returncode == 0
        assert run_script(environ, "get", "auth/KEY").stdout == value + b"\n"
        log = (tmp_path / name / "secrets.audit.jsonl").read_text().splitlines()
        (read,) = [json.loads(line) for line in log if json.loads(line)["operation"] == "get"]
        assert read["value_hmac"] == run_script(environ, "audit", "hash", input=value).stdout.decode().strip()
        fingerprints.append(str(read["value_hmac"]).removeprefix("hmac-sha256:"))
        assert value not in (tmp_path / name / "secrets.audit.jsonl").read_bytes()
    assert fingerprints[0] != fingerprints[1]
    plain = {
        hashlib.sha256(value).hexdigest(),
        hashlib.sha512(value).hexdigest()[:64],
        hmac.new(b"", value, "sha256").hexdigest(),
    }
    assert plain.isdisjoint(fingerprints)
