"""The service's own TLS files: checked at start, reloaded on SIGHUP (a renewed certificate, a new
client CA) without dropping connections, a bad reload rejected. Real `serve` processes, real
certificates, and a plain TLS handshake to see which certificate the server presents."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from secrets_manager.errors import InvalidInputError
from secrets_manager.service import server as server_module
from secrets_manager.service.certificates import ServerCertificates
from secrets_manager.service.server import PolicyHolder
from secrets_manager.tls import files as tls_files
from secrets_manager.tls import pki
from secrets_manager.tls.identity import serial_text
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from service_fixtures import PASSWORD, Server, eventually, make_pki, make_store, run_script, start_server

READ = pb.GetSecretRequest(name="auth/DB_PASSWORD")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path)
    make_store(tmp_path)
    running = start_server(tmp_path, metrics=True)
    yield running
    running.stop()


def presented_serial(server: Server) -> int:
    """The serial number of the certificate the server presents to a new connection (as `auth`)."""
    context = ssl.create_default_context(cafile=str(server.dir / "ca.pem"))
    context.check_hostname = False
    context.load_cert_chain(server.dir / "auth.pem", server.dir / "auth-key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def replace_file(path: Path, data: bytes) -> None:
    """As a renewal job writes: a new file beside it, then a rename over it."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    os.chmod(staged, 0o600)
    os.replace(staged, path)


def renew_server_certificate(directory: Path, *, key_too: bool = True) -> int:
    """A new server certificate (and key) from the test CA in place of the old; its serial."""
    cert, key = pki.issue(
        (directory / "ca.pem").read_bytes(), (directory / "ca-key.pem").read_bytes(), "server", server=True
    )
    replace_file(directory / "server.pem", cert)
    if key_too:
        replace_file(directory / "server-key.pem", key)
    else:
        (directory / "renewed-key.pem").write_bytes(key)
    return x509.load_pem_x509_certificate(cert).serial_number


def sighup_and_wait_for(server: Server, message: str) -> None:
    seen = sum(message in line for line in server.log_lines)
    server.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: sum(message in line for line in server.log_lines) > seen), server.log_lines


def test_a_server_certificate_for_another_name_is_said_so_with_the_fix(server: Server) -> None:
    """gRPC's 'Hostname Verification Check failed' reached the user as it was, with no hint."""
    cert, key = pki.issue(
        (server.dir / "ca.pem").read_bytes(),
        (server.dir / "ca-key.pem").read_bytes(),
        "server",
        server=True,
        dns=["secrets.elsewhere.test"],
    )
    replace_file(server.dir / "server.pem", cert)
    replace_file(server.dir / "server-key.pem", key)
    sighup_and_wait_for(server, "TLS certificate reloaded")
    listed = server.cli("auth", "list")
    assert listed.returncode == 1
    assert listed.stderr.decode().splitlines() == [
        f"secrets-manager: error: the server at {server.address} presented a certificate not issued for "
        "127.0.0.1: connect with a name or address the certificate holds, or issue the server's "
        "certificate again with it ('pki issue NAME --server --ip 127.0.0.1')"
    ]


def test_sighup_serves_a_renewed_certificate_and_keeps_open_connections(server: Server) -> None:
    old_serial = serial_of(server.dir / "server.pem")
    assert presented_serial(server) == old_serial
    open_stub = server.stub("auth")
    assert open_stub.GetSecret(READ, timeout=10).secret.name == READ.name  # the connection is up

    new_serial = renew_server_certificate(server.dir)
    sighup_and_wait_for(server, "TLS certificate reloaded")
    # The log names it as pki issue and openssl print it (it was lower-case hex, unlike them).
    reloaded = [json.loads(line) for line in server.log_lines if '"tls.reloaded"' in line]
    assert reloaded[-1]["serial"] == new_serial.to_bytes((new_serial.bit_length() + 7) // 8).hex().upper()

    assert presented_serial(server) == new_serial  # a new connection gets the renewed certificate
    assert open_stub.GetSecret(READ, timeout=10).secret.name == READ.name  # the open one still works
    assert server.stub("auth").GetSecret(READ, timeout=10).secret.name == READ.name  # and new channels
    assert server.process.poll() is None
    expiry = x509.load_pem_x509_certificate((server.dir / "server.pem").read_bytes()).not_valid_after_utc
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        scraped = answer.read().decode()
    line = next(
        x for x in scraped.splitlines() if x.startswith("secrets_manager_tls_certificate_expiry_timestamp")
    )
    assert float(line.split()[-1]) == expiry.timestamp()


def test_a_half_written_renewal_is_rejected_and_the_certificate_in_force_stays(server: Server) -> None:
    old_serial = serial_of(server.dir / "server.pem")
    new_serial = renew_server_certificate(server.dir, key_too=False)  # the key is not there yet
    sighup_and_wait_for(server, "TLS reload rejected")
    rejected = next(line for line in server.log_lines if "TLS reload rejected" in line)
    assert "does not match the certificate" in rejected
    assert "PRIVATE KEY" not in rejected
    assert presented_serial(server) == old_serial
    assert server.stub("auth").GetSecret(READ, timeout=10).secret.name == READ.name

    replace_file(server.dir / "server-key.pem", (server.dir / "renewed-key.pem").read_bytes())
    sighup_and_wait_for(server, "TLS certificate reloaded")
    assert presented_serial(server) == new_serial
    assert server.stub("auth").GetSecret(READ, timeout=10).secret.name == READ.name


def test_a_renewal_not_valid_yet_is_used_once_it_is_valid_without_another_sighup(server: Server) -> None:
    """An issuer that does not backdate (or this clock a little behind): the reload refuses the
    certificate until its notBefore, keeps the one in force, then takes it on its own."""
    ca = ((server.dir / "ca.pem").read_bytes(), (server.dir / "ca-key.pem").read_bytes())
    starts = datetime.now(UTC) + timedelta(seconds=2)
    cert, key = pki.issue(*ca, "server", server=True, not_before=starts)
    old_serial = serial_of(server.dir / "server.pem")
    replace_file(server.dir / "server-key.pem", key)
    replace_file(server.dir / "server.pem", cert)
    sighup_and_wait_for(
        server, "TLS reload rejected; the certificate in force stays until the new one is valid"
    )
    assert presented_serial(server) == old_serial
    assert eventually(
        lambda: any("TLS certificate reloaded" in line for line in server.log_lines), timeout=15
    )
    renewed = x509.load_pem_x509_certificate(cert)
    assert datetime.now(UTC) >= renewed.not_valid_before_utc  # not before it was valid
    assert presented_serial(server) == renewed.serial_number


def test_sighup_trusts_a_client_ca_added_to_the_file(server: Server) -> None:
    """CA rotation: the new CA is added beside the old one; its clients are accepted after SIGHUP."""
    foreign = server.channel("foreign")  # ops's certificate from another CA
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.SecretsStub(foreign).GetSecret(READ, timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    foreign.close()

    both = (server.dir / "ca.pem").read_bytes() + (server.dir / "other-ca.pem").read_bytes()
    replace_file(server.dir / "ca.pem", both)
    sighup_and_wait_for(server, "TLS certificate reloaded")
    answer = server.stub("foreign").GetSecret(READ, timeout=10)
    assert answer.secret.name == READ.name  # ops administers everything
    assert server.audit_records()[-1]["actor"] == "spiffe://shrivenquant.local/ops"
    assert server.stub("auth").GetSecret(READ, timeout=10).secret.name == READ.name  # the old CA still


def test_sighup_that_takes_a_client_ca_out_cuts_off_connections_made_before_it(server: Server) -> None:
    """The answer to a leaked client CA key: a new CA in tls.client_ca, the old one out, SIGHUP.
    gRPC checks a certificate against the client CA at the handshake only, so a connection made
    before the reload, with a certificate the old CA signed, went on being served (reads, and an
    open Watch stream) for as long as its client kept it. Now its next call is refused
    UNAUTHENTICATED (audited, naming the CA) and the stream ends; the new CA's clients get in."""
    (server.dir / "server-ca.pem").write_bytes((server.dir / "ca.pem").read_bytes())  # the server's own
    before = server.channel("auth")
    stub = pb_grpc.SecretsStub(before)
    assert stub.GetSecret(READ, timeout=10).secret.name == READ.name
    watch = stub.Watch(pb.WatchRequest(prefix="auth/"))
    assert watch.initial_metadata() is not None  # the stream is live

    replace_file(server.dir / "ca.pem", (server.dir / "other-ca.pem").read_bytes())
    sighup_and_wait_for(server, "no longer trusted")
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetSecret(READ, timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "a client CA the service no longer trusts" in (refused.value.details() or "")
    record = server.audit_records()[-1]
    assert (record["outcome"], record["decision"]) == ("unauthenticated", "deny")
    assert record["certificate_serial"] == serial_text(serial_of(server.dir / "auth.pem"))
    with pytest.raises(grpc.RpcError) as ended:
        next(iter(watch))
    assert ended.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "Watch ended" in (ended.value.details() or "")
    before.close()
    newcomer = pb_grpc.SecretsStub(server.channel("foreign", ca=server.dir / "server-ca.pem"))
    assert newcomer.GetSecret(READ, timeout=10).secret.name == READ.name  # ops, from the new CA


def test_serve_refuses_an_expired_server_certificate(tmp_path: Path) -> None:
    make_pki(tmp_path)
    make_store(tmp_path)
    long_ago = datetime.now(UTC) - timedelta(days=30)
    ca_cert, ca_key = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()
    cert, key = pki.issue(ca_cert, ca_key, "server", server=True, days=1, not_before=long_ago)
    (tmp_path / "server.pem").write_bytes(cert)
    (tmp_path / "server-key.pem").write_bytes(key)
    (tmp_path / "server.toml").write_text(
        'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": PASSWORD,
    }
    proc = run_script(environ, "serve", "--config", str(tmp_path / "server.toml"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "server certificate" in lines[0] and "expired on" in lines[0]
    assert "secrets-manager pki issue server --server --force" in lines[0]


def test_a_certificate_ending_soon_is_logged_at_start_and_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_pki(tmp_path)
    ca_cert, ca_key = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()
    paths = (tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem")
    caplog.set_level(logging.INFO, logger="secrets_manager")
    certificates = ServerCertificates(*paths)  # make_pki's lasts the default term: no warning
    assert not [r for r in caplog.records if "expires soon" in r.getMessage()]

    ending = datetime.now(UTC) - timedelta(days=1) + timedelta(hours=5)  # one day long, 5 h left
    cert, key = pki.issue(ca_cert, ca_key, "server", server=True, days=1, not_before=ending)
    replace_file(paths[0], cert)
    replace_file(paths[1], key)
    assert certificates.reload()
    warnings = [r for r in caplog.records if "expires soon" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].__dict__["hours_left"] == pytest.approx(5, abs=0.1)
    assert (
        certificates.not_valid_after() == x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()
    )
    caplog.clear()
    ServerCertificates(*paths)  # and at start
    assert [r for r in caplog.records if "expires soon" in r.getMessage()]


def test_a_reload_that_raises_is_logged_and_the_next_one_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP's handler runs on serve's main thread: an exception escaping it would end the service."""
    make_pki(tmp_path)
    make_store(tmp_path)
    certificates = ServerCertificates(
        tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem"
    )
    policy = PolicyHolder(tmp_path / "policy.toml")

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a bug that quotes -----BEGIN PRIVATE KEY-----")

    monkeypatch.setattr("secrets_manager.service.certificates.read_server_tls", broken)
    caplog.set_level(logging.INFO, logger="secrets_manager")
    server_module._reload([certificates, policy])
    failed = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
    assert len(failed) == 1 and failed[0].__dict__["error_type"] == "RuntimeError"
    assert "PRIVATE KEY" not in caplog.text
    assert any(r.getMessage() == "policy reloaded" for r in caplog.records)  # the next one ran


def test_a_burst_of_sighups_reloads_without_a_logging_error(server: Server) -> None:
    """A handler that logged ran between two bytecodes of the main thread: a SIGHUP arriving while
    that thread wrote a log line (its own reload's, here) failed with "--- Logging error ---"
    (reentrant call inside stderr's writer). Now the handler only asks; the main loop reloads."""
    for _ in range(200):
        server.process.send_signal(signal.SIGHUP)
        time.sleep(0.001)
    assert eventually(lambda: any("TLS certificate reloaded" in line for line in server.log_lines))
    time.sleep(0.5)  # the last reload's lines are out
    assert server.process.poll() is None
    assert not [line for line in server.log_lines if "Logging error" in line or "Traceback" in line]
    assert server.stub("auth").GetSecret(READ, timeout=10).secret.name == READ.name


def test_a_client_tls_file_that_never_ends_is_refused_not_read_into_memory(tmp_path: Path) -> None:
    """`SECRETS_MANAGER_KEY=/dev/zero` (a slip of the finger, or a file that never ends) was read
    whole into memory by the CLI and the SDK; now it is a one-line error at 4 MiB. A pipe
    (`<(command)`) still works: the client's files need not be regular ones."""
    from secrets_manager.tls.files import MAX_TLS_FILE_BYTES, read_tls_file

    with pytest.raises(InvalidInputError, match=f"larger than {MAX_TLS_FILE_BYTES} bytes"):
        read_tls_file(Path("/dev/zero"), "SECRETS_MANAGER_KEY")
    read, write = os.pipe()
    os.write(write, b"-----BEGIN CERTIFICATE-----\n")
    os.close(write)
    assert read_tls_file(Path(f"/dev/fd/{read}"), "SECRETS_MANAGER_CA").startswith(b"-----BEGIN")
    os.close(read)


@pytest.mark.parametrize("role", ["client", "server"])
def test_a_process_starting_while_its_certificate_is_renewed_reads_the_renewed_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    """`pki issue --force` renames the new key, then the new certificate. A client or serve
    starting then reads the old certificate beside the new key (bench/soak.py: 11 of about 17,000
    client starts failed so, 'the TLS key … does not match the certificate'): the pair is read
    again, and the renewed one used. The renewal here lands right after the certificate was read."""
    make_pki(tmp_path)
    name = "server" if role == "server" else "auth"
    cert, key, ca = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem", tmp_path / "ca.pem"
    reading = tls_files.read_tls_file
    renewals: list[tls_files.WrittenCertificate] = []

    def read_then_renew(path: Path, setting: str, *args: Any, **kwargs: Any) -> bytes:
        data = reading(path, setting, *args, **kwargs)
        if path == cert and not renewals:
            renewals.append(tls_files.issue_certificate(tmp_path, name, server=role == "server", force=True))
        return data

    monkeypatch.setattr(tls_files, "read_tls_file", read_then_renew)
    if role == "server":
        files = tls_files.read_server_tls(cert, key, ca)
        assert files.serial_number == x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    else:
        files = tls_files.read_client_tls(
            (cert, "SECRETS_MANAGER_CERT"), (key, "SECRETS_MANAGER_KEY"), (ca, "SECRETS_MANAGER_CA")
        )
    assert len(renewals) == 1
    assert (files.cert, files.key) == (cert.read_bytes(), key.read_bytes())


def test_a_key_that_is_not_the_certificates_is_still_refused_after_the_reads_again(tmp_path: Path) -> None:
    """The pair read again a few times is for a renewal half seen; a wrong key stays wrong."""
    make_pki(tmp_path)
    started = time.monotonic()
    with pytest.raises(
        InvalidInputError, match=r"ops-key.pem \(SECRETS_MANAGER_KEY\) does not match the certificate"
    ):
        tls_files.read_client_tls(
            (tmp_path / "auth.pem", "SECRETS_MANAGER_CERT"),
            (tmp_path / "ops-key.pem", "SECRETS_MANAGER_KEY"),
            (tmp_path / "ca.pem", "SECRETS_MANAGER_CA"),
        )
    assert time.monotonic() - started < 5
