"""Real `secrets-manager serve` processes for tests and benchmarks that need a running service.

Adapted from the helpers of tests/test_service.py: real mutual-TLS certificates from
`secrets_manager.tls.pki`, a real policy file and a real SQLite store. Several servers may share
one directory (and so one store file and one audit log), each with its own config and port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from secrets_manager.audit import AuditLog
from secrets_manager.audit.append import DEFAULT_TIMEOUT_SECONDS
from secrets_manager.client import TlsFiles
from secrets_manager.crypto import kdf
from secrets_manager.service.config import load_config
from secrets_manager.service.server import PolicyHolder, RunningServer, build_server
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.tls import pki
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "service test password"
TD = "shrivenquant.local"
CLIENT_NAMES = ("auth", "ops", "writer", "nobody", "market-connector")
SEED = {
    "auth/DB_PASSWORD": b"auth-db-pass-SEEKRIT-1",
    "auth/JWT_KEY": b"auth-jwt-key-SEEKRIT-2",
    "market-connector/BINANCE_API_KEY": b"binance-key-SEEKRIT-3",
    "market-connector/BINANCE_SECRET": b"binance-secret-SEEKRIT-4",
}
POLICY = f"""
[identities]
"spiffe://{TD}/auth" = ["auth-reader"]
"spiffe://{TD}/market-connector" = ["mc-reader"]
"spiffe://{TD}/ops" = ["admin"]
"spiffe://{TD}/writer" = ["writer"]

[roles.auth-reader]
rules = [{{ path = "auth/*", capabilities = ["read", "list"] }}]

[roles.mc-reader]
rules = [{{ path = "market-connector/*", capabilities = ["read", "list"] }}]

[roles.writer]
rules = [{{ path = "auth/**", capabilities = ["read", "write", "list"] }}]

[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]
"""


def run_script(
    environ: Mapping[str, str], *args: str, input: bytes = b"", env: Mapping[str, str | None] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The console script with `env` over `environ` (a None value unsets one), with no terminal (a
    prompt fails instead of hanging); a traceback on stderr fails the test."""
    merged = {**environ, **(env or {})}
    proc = subprocess.run(
        [str(SCRIPT), *args],
        input=input,
        capture_output=True,
        env={name: value for name, value in merged.items() if value is not None},
        start_new_session=True,
        timeout=120,
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc


def make_pki(directory: Path, clients: tuple[str, ...] = CLIENT_NAMES) -> None:
    """A CA, a server certificate for 127.0.0.1/localhost and one client certificate per name, plus
    two the server must refuse: `expired` (auth's, expired) and `foreign` (ops's, from another CA)."""
    ca_cert, ca_key = pki.new_ca(trust_domain=TD)
    (directory / "ca.pem").write_bytes(ca_cert)
    (directory / "ca-key.pem").write_bytes(ca_key)
    _write_pair(directory / "server.pem", pki.issue(ca_cert, ca_key, "server", server=True))
    for name in clients:
        _write_pair(directory / f"{name}.pem", pki.issue(ca_cert, ca_key, name))
    long_ago = datetime.now(UTC) - timedelta(days=30)
    _write_pair(directory / "expired.pem", pki.issue(ca_cert, ca_key, "auth", days=1, not_before=long_ago))
    other_cert, other_key = pki.new_ca(trust_domain=TD)
    (directory / "other-ca.pem").write_bytes(other_cert)
    _write_pair(directory / "foreign.pem", pki.issue(other_cert, other_key, "ops"))


def make_odd_client(
    directory: Path,
    name: str,
    *,
    cn: str | None,
    uris: tuple[str, ...] = (),
    ca: bool = False,
    raw_san: bytes | None = None,
) -> x509.Certificate:
    """A client certificate `pki issue` would never make (any CN, these URI SANs, perhaps CA=true,
    or a SAN extension of these DER bytes), signed by the CA in `directory` as a CA that lets
    requesters choose their CN would: written as NAME.pem and NAME-key.pem, so
    `Server.stub(name)` presents it."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    if raw_san is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, raw_san), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_pair(directory / f"{name}.pem", (cert.public_bytes(serialization.Encoding.PEM), key_pem))
    return cert


def _write_pair(path: Path, pair: tuple[bytes, bytes]) -> None:
    path.write_bytes(pair[0])
    key = path.with_name(path.stem + "-key.pem")
    key.write_bytes(pair[1])
    key.chmod(0o600)  # as `pki issue` writes it (serve warns of a key others can read)


def make_store(directory: Path, seed: Mapping[str, bytes] = SEED, policy: str = POLICY) -> Path:
    """A new store at `directory/store.db` (cheap KDF) holding `seed`, and the policy beside it."""
    (directory / "policy.toml").write_text(policy)
    path = directory / "store.db"
    store = EncryptedStore.create(SqliteStorage(path, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        for name, value in seed.items():
            store.put(name, value)
    finally:
        store.close()
    return path


def tls_files(directory: Path, client: str) -> TlsFiles:
    return TlsFiles(
        cert=directory / f"{client}.pem", key=directory / f"{client}-key.pem", ca=directory / "ca.pem"
    )


def client_environ(directory: Path, client: str, addresses: list[str]) -> dict[str, str]:
    """The environment a service using the SDK would have: addresses and its certificate."""
    return {
        "SHRIVENQUANT_ENV": "production",
        "SECRETS_MANAGER_ADDR": ",".join(addresses),
        "SECRETS_MANAGER_CERT": str(directory / f"{client}.pem"),
        "SECRETS_MANAGER_KEY": str(directory / f"{client}-key.pem"),
        "SECRETS_MANAGER_CA": str(directory / "ca.pem"),
    }


@dataclass
class Server:
    dir: Path
    process: subprocess.Popen[bytes]
    port: int
    log_lines: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    reader: threading.Thread | None = None  # reads stderr into log_lines until the process ends

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, name: str | None, *, ca: Path | None = None) -> grpc.Channel:
        """A mutual-TLS channel as client `name` (None: no client certificate at all)."""
        ca_pem = (ca or self.dir / "ca.pem").read_bytes()
        if name is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca_pem,
                private_key=(self.dir / f"{name}-key.pem").read_bytes(),
                certificate_chain=(self.dir / f"{name}.pem").read_bytes(),
            )
        return grpc.secure_channel(self.address, credentials)

    def stub(self, name: str | None) -> pb_grpc.SecretsStub:
        return pb_grpc.SecretsStub(self.channel(name))

    def audit_records(self) -> list[dict[str, object]]:
        path = self.dir / "store.audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def cli(
        self, name: str, *args: str, input: bytes = b"", env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """The real console script against this server, as client `name` (`env` over its own)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "SECRETS_MANAGER_ADDR": self.address,
            "SECRETS_MANAGER_CERT": str(self.dir / f"{name}.pem"),
            "SECRETS_MANAGER_KEY": str(self.dir / f"{name}-key.pem"),
            "SECRETS_MANAGER_CA": str(self.dir / "ca.pem"),
            **(env or {}),
        }
        return subprocess.run(
            [str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env=env,
            timeout=60,
            start_new_session=True,
        )

    def stop(self) -> None:
        """SIGTERM (graceful) and wait, until `log_lines` holds all it said; a no-op if it has
        exited already."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._read_to_the_end()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections are cut."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._read_to_the_end()

    def _read_to_the_end(self) -> None:
        """The process has exited, but the thread reading its stderr may not have read its last
        lines yet (a loaded machine): wait for it (bounded: a child it started may hold the pipe)."""
        if self.reader is not None:
            self.reader.join(timeout=5)


def start_server(
    directory: Path,
    name: str = "server",
    *,
    max_workers: int = 64,
    metrics: bool = False,
    settings: str = "",
    store: str = "store.db",
    environment: Mapping[str, str] | None = None,
    port: int = 0,
    script: Path = SCRIPT,
    wrapper: Sequence[str] = (),
) -> Server:
    """`secrets-manager serve` on `port` (default: a free one; a restart may pass the port it had)
    over `store` (default `directory/store.db`; any store
    URL, with what it needs, e.g. PGPASSWORD, in `environment`); returns once it listens.
    `script`: another installation's `secrets-manager` (tests/test_packaging.py's wheel);
    `wrapper`: a command it runs under (mounts.without_writable_temporary_directory).

    Every watch stream holds one of the server's worker threads (at most `max_workers` - 16 of them
    by default), so tests with many subscribed clients pass a larger `max_workers`."""
    config = directory / f"{name}.toml"
    metrics_port = int(free_address().rpartition(":")[2]) if metrics else None
    metrics_line = f'metrics_listen = "127.0.0.1:{metrics_port}"\n' if metrics else ""
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nstore = "{store}"\npolicy = "policy.toml"\n'
        f"max_workers = {max_workers}\nshutdown_grace_seconds = 5\n{metrics_line}{settings}"
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "MASTER_PASSWORD": PASSWORD,
        **(environment or {}),
    }
    process = subprocess.Popen(
        [*wrapper, str(script), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    port = 0  # the port it listens on, as it says
    while time.monotonic() < deadline:
        line = process.stderr.readline().decode()
        if not line:
            break
        lines.append(line)
        match = re.search(r'"port": (\d+)', line)
        if match:
            port = int(match.group(1))
            break
    if not port:
        process.kill()
        process.wait(timeout=10)
        process.stderr.close()
        raise AssertionError(f"server did not start: {''.join(lines)}")
    reader = threading.Thread(target=_drain, args=(process, lines), daemon=True)
    reader.start()
    return Server(directory, process, port, lines, metrics_port, reader)


@contextmanager
def in_process_server(
    directory: Path,
    store: EncryptedStore,
    *,
    watch_tick: float,
    audit_timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> Iterator[tuple[RunningServer, Callable[[str], pb_grpc.SecretsStub]]]:
    """The service built in this process over `store` (certificates and policy as make_pki and
    make_store leave them in `directory`), its watch poller ticking every `watch_tick` seconds
    (to tell a poke from a tick) and its audit log giving up after `audit_timeout`; yields it and
    `stub(identity)`. Stopped at the end."""
    (directory / "in-process.toml").write_text(
        'listen = "127.0.0.1:0"\npolicy = "policy.toml"\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    config = load_config(directory / "in-process.toml")
    running = build_server(
        config,
        store,
        AuditLog(directory / "in-process.audit.jsonl", timeout=audit_timeout),
        PolicyHolder(config.policy),
    )
    running.servicer.watch_hub._poll_seconds = watch_tick
    channels: list[grpc.Channel] = []

    def stub(identity: str) -> pb_grpc.SecretsStub:
        channels.append(
            grpc.secure_channel(f"127.0.0.1:{running.port}", tls_files(directory, identity).credentials())
        )
        return pb_grpc.SecretsStub(channels[-1])  # type: ignore[no-untyped-call]

    try:
        yield running, stub
    finally:
        for channel in channels:
            channel.close()
        running.stop(1)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition` holds within `timeout` seconds (tried every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _drain(process: subprocess.Popen[bytes], lines: list[str]) -> None:
    """Reads the server's stderr into `lines` until its end, then closes the pipe: left open, it
    outlived the stopped server and was closed only by the garbage collector, with a
    ResourceWarning in whichever test happened to collect it."""
    assert process.stderr is not None
    with process.stderr:
        for raw in process.stderr:
            lines.append(raw.decode())


class SilentListener:
    """A TCP port that accepts connections and never answers: a service that hangs mid-handshake."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"

    def close(self) -> None:
        self._socket.close()


def free_address() -> str:
    """An address where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def assert_moved_to_the_second_audit_key(records: list[dict[str, Any]], new_fingerprint: str) -> None:
    """A log written by a process that held the store open across an `audit rotate-key` made
    elsewhere (one read before, two after the recheck interval): one `audit.rotate_key` record of
    its own, under the old key, naming key 2; every authenticated record after it under key 2; its
    reads fingerprinted under the new key from then on, never the old one's (docs/audit.md §3a)."""
    moved = [i for i, r in enumerate(records) if r["operation"] == "audit.rotate_key"]
    assert len(moved) == 1, records
    assert records[moved[0]]["version"] == 2 and "key_id" not in records[moved[0]]
    before = [r for r in records[: moved[0]] if r["operation"] == "get"]
    after = [r for r in records[moved[0] + 1 :] if r["operation"] == "get"]
    assert len(before) == 1 and len(after) == 2
    assert all(r.get("key_id") == 2 for r in records[moved[0] + 1 :] if r.get("mac") is not None)
    assert before[0]["value_hmac"] != new_fingerprint  # under the old key
    assert after[-1]["value_hmac"] == new_fingerprint
    assert all(r["value_hmac"] in (None, new_fingerprint) for r in after)  # never the old key's
