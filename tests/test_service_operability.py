"""What an operator alerts on, read from a real `secrets-manager serve`'s /metrics while the test
breaks things: reloads rejected on SIGHUP or at a schedule pass, and (below) certificate expiry,
the build and the process. Each test starts a real server (service_fixtures) and stops it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from mounts import without_writable_temporary_directory
from secrets_manager import __version__
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.tls import pki
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import (
    PASSWORD,
    SCRIPT,
    TD,
    Server,
    eventually,
    free_address,
    in_process_server,
    make_pki,
    make_store,
    start_server,
)


def scrape(server: Server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


def sample(server: Server, name: str, **labels: str) -> float | None:
    """The value of one sample (labels given exactly as the exposition sorts them), or None."""
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = "^" + re.escape(name + (f"{{{inner}}}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern, scrape(server), re.MULTILINE)
    return None if found is None else float(found[1])


def test_a_rejected_policy_or_tls_reload_shows_in_the_metrics_until_one_is_taken(tmp_path: Path) -> None:
    """A SIGHUP whose policy does not parse kept the old policy and said so only in a log line:
    nothing to alert on. Now secrets_manager_config_last_reload_successful{file} is 0 and
    secrets_manager_config_reload_failures_total{file} counts it, for the policy and the TLS
    files each; a good reload sets the gauge back to 1. Fails on the old code (no such metrics)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, metrics=True)
    try:
        for file in ("policy", "tls"):
            assert sample(server, "secrets_manager_config_last_reload_successful", file=file) == 1
            assert sample(server, "secrets_manager_config_reload_failures_total", file=file) == 0
        policy = (tmp_path / "policy.toml").read_text()
        (tmp_path / "policy.toml").write_text("[identities\n")
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(
            lambda: sample(server, "secrets_manager_config_last_reload_successful", file="policy") == 0
        )
        assert sample(server, "secrets_manager_config_reload_failures_total", file="policy") == 1
        assert sample(server, "secrets_manager_config_last_reload_successful", file="tls") == 1
        rejected = [line for line in server.log_lines if '"event": "policy.reload_rejected"' in line]
        assert len(rejected) == 1 and "not valid TOML" in rejected[0]

        (tmp_path / "policy.toml").write_text(policy)
        cert = (tmp_path / "server.pem").read_text()
        (tmp_path / "server.pem").write_text("not a certificate\n")
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(
            lambda: sample(server, "secrets_manager_config_last_reload_successful", file="tls") == 0
        )
        assert sample(server, "secrets_manager_config_last_reload_successful", file="policy") == 1
        assert sample(server, "secrets_manager_config_reload_failures_total", file="tls") == 1
        reloaded = [line for line in server.log_lines if '"event": "policy.reloaded"' in line]
        assert reloaded and '"identities": 4' in reloaded[-1] and '"roles": 4' in reloaded[-1]

        (tmp_path / "server.pem").write_text(cert)
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(
            lambda: sample(server, "secrets_manager_config_last_reload_successful", file="tls") == 1
        )
        assert sample(server, "secrets_manager_config_reload_failures_total", file="tls") == 1
    finally:
        server.stop()


def test_an_edited_server_config_at_sighup_is_said_to_need_a_restart(tmp_path: Path) -> None:
    """SIGHUP reloads the policy and the [tls] files at the paths in force, not server.toml's
    settings. An SRE who pointed client_ca at a new CA bundle in server.toml and sent SIGHUP got
    "TLS certificate reloaded" for the old file and nothing else: the new CA's clients were then
    refused. Now the reload logs config.restart_required naming the settings that changed (never
    their values), and secrets_manager_config_last_reload_successful{file="config"} is 0 until
    the file says what is in force again (or a restart takes it). Fails on the old code."""
    make_pki(tmp_path)
    make_store(tmp_path)
    shutil.copy(tmp_path / "ca.pem", tmp_path / "ca-bundle.pem")
    server = start_server(tmp_path, metrics=True)
    gauge = "secrets_manager_config_last_reload_successful"
    config = tmp_path / "server.toml"
    try:
        assert sample(server, gauge, file="config") == 1
        original = config.read_text()
        edited = original.replace('client_ca = "ca.pem"', 'client_ca = "ca-bundle.pem"')
        edited = edited.replace("shutdown_grace_seconds = 5", "shutdown_grace_seconds = 7")
        assert edited != original
        config.write_text(edited)
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: sample(server, gauge, file="config") == 0)
        lines = [json.loads(line) for line in server.log_lines if "config.restart_required" in line]
        assert len(lines) == 1
        assert sorted(lines[0]["changed"]) == ["shutdown_grace_seconds", "tls.client_ca"]
        assert lines[0]["level"] == "warning" and "restart serve" in lines[0]["message"]
        assert lines[0]["config"] == str(config.resolve())
        assert sample(server, "secrets_manager_config_reload_failures_total", file="config") == 1

        config.write_text("listen = [\n")  # a restart would not start: said as such
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: any("config.invalid" in line for line in server.log_lines))
        assert sample(server, gauge, file="config") == 0

        config.write_text(original)  # back to what is in force
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: sample(server, gauge, file="config") == 1)
        assert sum("config.restart_required" in line for line in server.log_lines) == 1
    finally:
        server.stop()


def test_a_rejected_schedule_file_shows_in_the_metrics_until_it_parses_again(tmp_path: Path) -> None:
    """The schedule file is re-read at every pass; one that stops parsing keeps the old schedule
    with one log line. Now the gauge for rotation_schedule is 0 meanwhile and the failure is counted
    once per new error. Fails on the old code (no such metrics)."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT"})
    schedule = tmp_path / "rotation.toml"
    good = '[[rotation]]\nname = "db/app"\nevery = "3650d"\nset_command = "true"\n'
    schedule.write_text(good)
    server = start_server(
        tmp_path,
        metrics=True,
        settings='rotation_schedule = "rotation.toml"\nrotation_check_seconds = 0.2\n',
    )
    gauge = "secrets_manager_config_last_reload_successful"
    try:
        assert sample(server, gauge, file="rotation_schedule") == 1
        schedule.write_text('[[rotation]]\nname = "db/app"\nevery = "whenever"\n')
        assert eventually(lambda: sample(server, gauge, file="rotation_schedule") == 0)
        assert eventually(lambda: any("schedule.reload_rejected" in line for line in server.log_lines))
        failures = "secrets_manager_config_reload_failures_total"
        assert sample(server, failures, file="rotation_schedule") == 1
        schedule.write_text(good)
        assert eventually(lambda: sample(server, gauge, file="rotation_schedule") == 1)
        assert sample(server, failures, file="rotation_schedule") == 1
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_the_client_ca_expiry_is_a_metric_and_a_warning_and_follows_a_reload(tmp_path: Path) -> None:
    """Past the client CA's end every client certificate it signed is refused: an outage that
    only the server certificate's expiry metric did not show. Now
    secrets_manager_tls_client_ca_expiry_timestamp_seconds is the end of the first CA in
    client_ca to expire (here one added with 3 days left, beside the long one), start and reload
    log tls.client_ca_expiring within 7 days, and a SIGHUP after the old CA is removed moves the
    metric to the remaining one's end. Fails on the old code (no such metric, no warning)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    long_ca = (tmp_path / "ca.pem").read_bytes()
    short_ca, _ = pki.new_ca(common_name="old CA", days=3, trust_domain=TD)
    (tmp_path / "ca.pem").write_bytes(long_ca + short_ca)
    server = start_server(tmp_path, metrics=True)
    name = "secrets_manager_tls_client_ca_expiry_timestamp_seconds"
    try:
        short_end = x509.load_pem_x509_certificate(short_ca).not_valid_after_utc.timestamp()
        long_end = x509.load_pem_x509_certificate(long_ca).not_valid_after_utc.timestamp()
        assert sample(server, name) == short_end
        warned = [line for line in server.log_lines if '"event": "tls.client_ca_expiring"' in line]
        assert len(warned) == 1 and '"hours_left": 7' in warned[0]  # 3 days: 71.9 or 72.0 hours
        (tmp_path / "ca.pem").write_bytes(long_ca)
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: sample(server, name) == long_end)
        assert sum('"event": "tls.client_ca_expiring"' in line for line in server.log_lines) == 1
    finally:
        server.stop()


def test_the_build_the_process_and_the_watch_stream_limit_are_in_the_metrics(tmp_path: Path) -> None:
    """The server's own registry left out what the default one has: no process_open_fds or
    process_max_fds (a process near its fd limit refuses connections unannounced), no version to
    tell which replica runs what, and the Watch stream gauge without the limit it is refused at.
    Fails on the old code (none of these series)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, metrics=True, max_workers=40)
    try:
        assert sample(server, "secrets_manager_build_info", version=__version__) == 1
        assert sample(server, "secrets_manager_watch_streams_limit") == 40 - 16
        assert (sample(server, "process_open_fds") or 0) > 0
        assert (sample(server, "process_max_fds") or 0) > 0
        assert sample(server, "process_start_time_seconds") is not None
        assert "python_info{" in scrape(server)
    finally:
        server.stop()


def test_a_failing_scheduled_rotation_is_a_gauge_until_it_succeeds(tmp_path: Path) -> None:
    """A failed set command leaves its version pending, and nothing is tried again until it is
    stale (three command timeouts): the failed-outcome counter then stays still while the
    rotation is still broken, and rate() of it goes quiet. Now
    secrets_manager_scheduled_rotations_failing says how many entries are failing after each
    pass (0 again once one succeeds), and secrets_manager_schedule_last_pass_timestamp_seconds
    when the last pass ended. Fails on the old code (no such metrics)."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path, {"db/app": b"first-app-value-SEEKRIT", "db/other": b"other-value-SEEKRIT"})
    schedule = tmp_path / "rotation.toml"
    entry = '[[rotation]]\nname = "{}"\nevery = "{}"\nset_command = "{}"\n'
    other = entry.format("db/other", "3650d", "true")
    schedule.write_text(entry.format("db/app", "1s", "false") + other)
    server = start_server(
        tmp_path,
        metrics=True,
        settings='rotation_schedule = "rotation.toml"\nrotation_check_seconds = 0.2\n',
    )
    failing = "secrets_manager_scheduled_rotations_failing"
    last_pass = "secrets_manager_schedule_last_pass_timestamp_seconds"
    try:
        assert eventually(lambda: sample(server, failing) == 1)
        time.sleep(1)  # passes go on, the entry waits for its pending version to be stale
        assert sample(server, failing) == 1
        assert time.time() - (sample(server, last_pass) or 0) < 5
        schedule.write_text(entry.format("db/app", "1s", "true") + other)
        store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
        try:
            store.discard_pending("db/app")  # what the failure's message says to do
        finally:
            store.close()
        assert eventually(lambda: sample(server, failing) == 0)
        assert (sample(server, "secrets_manager_scheduled_rotations_total", outcome="rotated") or 0) >= 1
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_start_and_stop_log_what_is_in_force(tmp_path: Path) -> None:
    """The start's line said only the listen address and port: not which config, store, policy,
    certificates or version a replica runs, which an operator needs first when two replicas
    disagree. The stop did not say which signal. Fails on the old code (none of these fields)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, metrics=True)
    server.stop()
    lines = [json.loads(line) for line in server.log_lines if line.startswith("{")]
    started = next(line for line in lines if line.get("event") == "service.started")
    assert started["config"] == str(tmp_path / "server.toml")
    assert started["store"] == str(tmp_path / "store.db") and started["store_kind"] == "sqlite"
    assert started["policy"] == str(tmp_path / "policy.toml")
    assert (started["identities"], started["roles"], started["revoked"]) == (4, 4, 0)
    assert started["audit_file"] == str(tmp_path / "store.audit.jsonl")
    assert started["version"] == __version__ and started["environment"] == "development"
    assert started["tls_not_valid_after"] and started["client_ca_not_valid_after"]
    assert started["max_watch_streams"] == 48 and started["metrics_listen"].startswith("127.0.0.1:")
    assert started["watch"] == "change feed"
    stopping = next(line for line in lines if line.get("event") == "service.stopping")
    assert stopping["signal"] == "SIGTERM"
    assert lines[-1]["event"] == "service.stopped"
    assert PASSWORD not in "".join(server.log_lines)


def test_the_start_line_names_absolute_paths_for_a_relative_config(tmp_path: Path) -> None:
    """`serve --config server.toml`, run in the config's directory (as the README's set-up does):
    the start line said "audit_file": "log/audit.jsonl", "policy": "policy.toml", relative to a
    directory it does not name, so no log shipper could be pointed at the audit log from it. Now
    every file it names is absolute. Fails on the old code (relative paths)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    (tmp_path / "log").mkdir(mode=0o700)
    (tmp_path / "server.toml").write_text(
        'listen = "127.0.0.1:0"\nstore = "store.db"\npolicy = "policy.toml"\naudit_file = "log/audit.jsonl"\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MASTER_PASSWORD": PASSWORD,
    }
    process = subprocess.Popen(
        [str(SCRIPT), "serve", "--config", "server.toml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stderr is not None
    try:
        started: dict[str, object] = {}
        for line in iter(process.stderr.readline, b""):
            doc = json.loads(line)
            if doc.get("event") == "service.started":
                started = doc
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert started, "serve did not start"
    assert started["audit_file"] == str(tmp_path / "log" / "audit.jsonl")
    assert started["policy"] == str(tmp_path / "policy.toml")
    assert started["store"] == str(tmp_path / "store.db")
    assert started["tls_cert"] == str(tmp_path / "server.pem")
    assert started["client_ca"] == str(tmp_path / "ca.pem")


def test_every_line_serve_writes_is_json_with_an_event_and_failures_do_not_flood(tmp_path: Path) -> None:
    """A log pipeline keys on a stable field: the lines had none (only free text), and a warning
    while serve read its config (here one in a directory others may write) was a plain
    'secrets-manager: warning:' line, not JSON. And each failed request was a line of its own, so
    a client looping on a name it may not read flooded the log. Now every line is JSON with time,
    level and event; failures are logged at most once per method and code every 10 s (the metric
    counts each). Fails on the old code (a plain line, no event, one line per failure)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    tmp_path.chmod(0o777)  # others may replace the config (or any file here): a warning at the start
    server = start_server(tmp_path, metrics=True)
    try:
        stub = server.stub("auth")
        for _ in range(30):
            with pytest.raises(grpc.RpcError):
                stub.GetSecret(pb.GetSecretRequest(name="auth/MISSING"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.GetSecret(pb.GetSecretRequest(name="market-connector/BINANCE_API_KEY"), timeout=10)
        counted = sample(server, "secrets_manager_requests_total", code="NOT_FOUND", method="GetSecret")
        assert counted == 30
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log_lines]  # every line: JSON
    assert all(line.get("event") and line.get("level") and line.get("time") for line in lines)
    loose = [line for line in lines if line["event"] == "environment.warning"]
    assert loose and "chmod go-w" in loose[0]["message"] and loose[0]["level"] == "warning"
    failed = [line for line in lines if line["event"] == "request.failed"]
    assert [(line["code"], line["level"]) for line in failed] == [
        ("NOT_FOUND", "info"),
        ("PERMISSION_DENIED", "info"),
    ]
    assert failed[0]["secret"] == "auth/MISSING" and failed[0]["suppressed"] == 0


def test_a_failure_left_out_is_counted_on_the_next_line(caplog: pytest.LogCaptureFixture) -> None:
    """The rate limit of 'request failed' lines: the next line after the interval says how many
    like it were left out; a failure on the service's side (UNAVAILABLE) is a warning."""
    from secrets_manager.service.server import _FailureLog

    failures = _FailureLog(interval=0.2)
    caplog.set_level(logging.INFO, logger="secrets_manager")
    for _ in range(5):
        failures.log("GetSecret", grpc.StatusCode.UNAVAILABLE, secret="a/b")
    time.sleep(0.25)
    failures.log("GetSecret", grpc.StatusCode.UNAVAILABLE, secret="a/b")
    lines = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert [r.__dict__["suppressed"] for r in lines] == [0, 4]
    assert all(r.levelno == logging.WARNING for r in lines)


def test_health_from_a_shell_says_serving_not_serving_or_unreachable_with_its_exit_code(
    tmp_path: Path,
) -> None:
    """There was no documented way to probe health from a shell (no grpc_health_probe here, and
    the CLI had no command for it). `secrets-manager health` checks every address with the CLI's
    certificate variables: exit 0 when each is SERVING; 1, naming the others, when one is
    NOT_SERVING (here its audit log's lock is held by another process) or unreachable. Fails on
    the old code (no such command: exit 2)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path)
    try:
        ok = server.cli("ops", "health", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == [{"address": server.address, "status": "SERVING", "error": None}]
        lock = os.open(tmp_path / "store.audit.jsonl.lock", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a stuck writer: the service cannot audit, so cannot serve
            assert eventually(lambda: server.cli("ops", "health").returncode == 1, timeout=20)
            down = server.cli("ops", "health")
            assert down.stdout.decode().split("\t")[:2] == [server.address, "NOT_SERVING"]
            line = down.stderr.decode()
            assert line.count("\n") == 1 and f"not serving: {server.address} NOT_SERVING" in line
        finally:
            os.close(lock)
        assert eventually(lambda: server.cli("ops", "health").returncode == 0, timeout=20)
        nowhere = free_address()
        both = server.cli("ops", "health", env={"SECRETS_MANAGER_ADDR": f"{server.address},{nowhere}"})
        assert both.returncode == 1 and f"{nowhere} UNREACHABLE" in both.stderr.decode()
        assert f"{server.address}\tSERVING" in both.stdout.decode()
    finally:
        server.stop()


def test_a_request_the_stuck_audit_log_refuses_is_answered_within_one_audit_timeout(tmp_path: Path) -> None:
    """With the audit log's lock held by a stuck process, a request is refused (UNAVAILABLE) once
    its record has waited the audit timeout. Before, the service then tried to record the refusal
    too, waiting as long again: the caller had its answer after twice the timeout (past a 10 s
    deadline with the default 5 s, so DEADLINE_EXCEEDED while the metric counted UNAVAILABLE)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, environment={"SECRETS_MANAGER_AUDIT_TIMEOUT": "1.5"})
    try:
        server.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        lock = os.open(tmp_path / "store.audit.jsonl.lock", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for call in (
                lambda: server.stub("auth").GetSecret(
                    pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=20
                ),
                lambda: server.stub("ops").PutSecret(
                    pb.PutSecretRequest(name="auth/NEW", value=b"v"), timeout=20
                ),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                waited = time.monotonic() - started
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
                assert 1.4 < waited < 2.6, f"answered after {waited:.1f} s with a 1.5 s audit timeout"
        finally:
            os.close(lock)
        assert any('"event": "audit.write_skipped"' in line for line in server.log_lines)
    finally:
        server.stop()


def test_audit_prune_beside_a_running_service_keeps_one_chain_that_verifies(tmp_path: Path) -> None:
    """The retention job runs from cron while `serve` answers calls and rotates the same log: the
    prune takes the writers' lock only to record itself and remove files, the service's records go
    on chaining onto it, and the log verifies afterwards, beginning where the prune record says."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(
        tmp_path,
        environment={"SECRETS_MANAGER_AUDIT_MAX_BYTES": "4000"},
        settings="[limits]\nrequests_per_second = 0\n",  # the reader loops: past the default rate
    )
    stop = threading.Event()
    failures: list[str] = []

    def read_all_the_while() -> None:
        stub = server.stub("auth")
        while not stop.is_set():
            try:
                stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    local = {
        "SECRETS_MANAGER_STORE": str(tmp_path / "store.db"),
        "MASTER_PASSWORD": PASSWORD,
        "SECRETS_MANAGER_ADDR": "",  # the local store the service serves, not the service
    }
    reader = threading.Thread(target=read_all_the_while)
    reader.start()
    try:
        assert eventually(lambda: len(list(tmp_path.glob("store.audit.jsonl.0*"))) >= 4, timeout=30)
        pruned = server.cli("ops", "audit", "prune", "--keep-files", "1", "--json", env=local)
        assert pruned.returncode == 0, pruned.stderr
        begins = json.loads(pruned.stdout)["chain_begins_at"]
        assert begins > 1
        time.sleep(0.5)  # the service goes on appending after the prune record
    finally:
        stop.set()
        reader.join(timeout=20)
        server.stop()
    assert not failures, failures[:3]
    checked = server.cli("ops", "audit", "verify", env=local)
    assert checked.returncode == 0, checked.stderr
    assert f"records {begins} on; those before were pruned".encode() in checked.stdout


def test_a_client_certificate_near_its_end_is_warned_of_once_on_the_service_side(tmp_path: Path) -> None:
    """Only the SDK warned of its certificate's end, in the client's own log; past it the client
    is refused with nothing in the service's log or metrics to show why. Now a call with a
    certificate ending within 7 days logs tls.client_certificate_expiring (identity, serial,
    date, hours left, peer) and counts it, once a day per certificate. Fails on the old code."""
    make_pki(tmp_path)
    make_store(tmp_path)
    cert, key = pki.issue(
        (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes(), "auth", days=2
    )
    (tmp_path / "soon.pem").write_bytes(cert)
    (tmp_path / "soon-key.pem").write_bytes(key)
    server = start_server(tmp_path, metrics=True)
    counter = "secrets_manager_client_certificate_expiry_warnings_total"
    try:
        server.stub("auth").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        assert sample(server, counter) == 0  # a certificate of a year: nothing
        for _ in range(3):
            server.stub("soon").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        assert sample(server, counter) == 1
    finally:
        server.stop()
    warned = [json.loads(line) for line in server.log_lines if "tls.client_certificate_expiring" in line]
    assert len(warned) == 1
    serial = format(x509.load_pem_x509_certificate(cert).serial_number, "X")
    assert warned[0]["identity"] == f"spiffe://{TD}/auth" and warned[0]["serial"].lstrip("0") == serial
    assert 47 <= warned[0]["hours_left"] <= 48 and warned[0]["peer"].startswith("ipv4:127.0.0.1:")


def test_an_audit_anchor_that_cannot_move_shows_as_a_growing_lag(tmp_path: Path) -> None:
    """The store's anchor pins the audit log's tail; while the store is busy (another writer
    holds its lock) a deferred flush cannot move it and the sink worker retries, silently: a
    crash then leaves records verify cannot vouch for. Now
    secrets_manager_audit_anchor_lag_seconds grows while records wait, and is 0 once the anchor
    moves. Fails on the old code (no such metric)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, stub):
            registry = running.metrics.registry

            def lag() -> float:
                return float(registry.get_sample_value("secrets_manager_audit_anchor_lag_seconds") or 0)

            stub("ops").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
            assert eventually(lambda: lag() == 0)
            other = sqlite3.connect(tmp_path / "store.db", timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")  # the store's write lock, held as a long restore would
                stub("ops").GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
                assert eventually(lambda: lag() > 1.0)
            finally:
                other.rollback()
                other.close()
            assert eventually(lambda: lag() == 0)
    finally:
        store.close()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of its own (mounting needs root, as CI runs): a disk that fills up."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        reason = f"cannot mount a small tmpfs here ({made.stderr.decode().strip()}): needs root"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_audit_disk_is_a_metric_and_keeps_health_not_serving_until_freed(
    tmp_path: Path, small_filesystem: Path
) -> None:
    """A full disk refuses every request (each writes an audit record), but the health check's
    append of no record needs no room: health said SERVING again 5 s after each refusal, so a load
    balancer kept sending traffic to a replica that refused all of it, and nothing showed the disk
    filling. Now /metrics has the free space, and health stays NOT_SERVING while under 64 KiB is
    free, SERVING again once there is room. Fails on the old code (no metric; health SERVING)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    audit_file = small_filesystem / "audit.jsonl"
    server = start_server(tmp_path, metrics=True, settings=f'audit_file = "{audit_file}"\n')
    try:
        free = sample(server, "secrets_manager_audit_disk_free_bytes")
        assert free is not None and 1_000_000 < free <= 2 * 1024 * 1024
        filler = small_filesystem / "filler"
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # the disk fills up (another writer, a log gone wild)
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * 4096)
        finally:
            os.close(descriptor)
        assert (sample(server, "secrets_manager_audit_disk_free_bytes") or 0) < 64 * 1024
        assert eventually(lambda: server.cli("ops", "health").returncode == 1, timeout=20)
        # (The log's last page may hold a few more records: requests are refused once it is full.)
        stub = server.stub("ops")
        with pytest.raises(grpc.RpcError) as refused:
            for _ in range(200):
                stub.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "no space left on its device" in (refused.value.details() or "")
        time.sleep(7)  # past the 5 s a refusal holds NOT_SERVING: still NOT_SERVING, not flapping
        down = server.cli("ops", "health", "--json")
        assert json.loads(down.stdout)[0]["status"] == "NOT_SERVING", down.stdout
        assert sample(server, "secrets_manager_health_check_ok", check="audit") == 0
        filler.unlink()
        assert eventually(lambda: server.cli("ops", "health").returncode == 0, timeout=20)
        assert server.cli("ops", "get", "auth/DB_PASSWORD").stdout == b"auth-db-pass-SEEKRIT-1\n"
    finally:
        server.stop()


def test_watch_poll_seconds_on_a_store_with_its_own_change_feed_is_said_to_be_ignored(tmp_path: Path) -> None:
    """watch_poll_seconds is for Vault and AWS stores (a feed polled from their snapshots); on our
    store, whose change feed Watch reads every 0.2 s, it was ignored without a word. Fails on the
    old code (no warning)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, settings="watch_poll_seconds = 5\n")
    server.stop()
    lines = [json.loads(line) for line in server.log_lines if line.startswith("{")]
    ignored = [line for line in lines if line.get("event") == "config.ignored"]
    assert len(ignored) == 1 and ignored[0]["level"] == "warning", lines
    assert ignored[0]["setting"] == "watch_poll_seconds" and "Vault and AWS" in ignored[0]["message"]
    assert next(line for line in lines if line.get("event") == "service.started")["watch"] == "change feed"


@pytest.fixture
def disk_with_reserved_blocks() -> Iterator[Path]:
    """A 4 MiB ext4 filesystem of its own, half of it reserved for root (mkfs -m 50), mounted
    from a loop file (root, as CI runs), with a directory anyone may fill."""
    image_dir = Path(tempfile.mkdtemp(prefix="reserved-disk-"))
    image_dir.chmod(0o755)
    image, mount_point = image_dir / "ext4.img", image_dir / "mnt"
    mount_point.mkdir()
    with image.open("wb") as handle:
        handle.truncate(4 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-m", "50", str(image)], capture_output=True, check=False)
    if made.returncode == 0:
        made = subprocess.run(
            ["mount", "-o", "loop", str(image), str(mount_point)], capture_output=True, check=False
        )
    if made.returncode != 0:
        shutil.rmtree(image_dir, ignore_errors=True)
        reason = f"cannot make and mount an ext4 loop file here ({made.stderr.decode().strip()}): needs root"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        (mount_point / "shared").mkdir(mode=0o1777)
        (mount_point / "shared").chmod(0o1777)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        shutil.rmtree(image_dir, ignore_errors=True)


def test_a_root_serve_on_a_disk_others_filled_counts_the_blocks_kept_for_root(
    tmp_path: Path, disk_with_reserved_blocks: Path
) -> None:
    """Users other than root filled the disk (ext4 keeps its last blocks for root): serve, running
    as root, still writes its records there, so health stays SERVING and the gauge shows the room
    it has. It counted only the blocks of unprivileged users: NOT_SERVING (and under 64 KiB on the
    gauge) while every request was served. Fails on the old code."""
    if os.geteuid() != 0:
        pytest.skip("serve must run as root here")
    make_pki(tmp_path)
    make_store(tmp_path)
    audit_file = disk_with_reserved_blocks / "audit.jsonl"
    server = start_server(tmp_path, metrics=True, settings=f'audit_file = "{audit_file}"\n')
    try:
        filler = disk_with_reserved_blocks / "shared" / "filler"
        # As nobody, until the disk is full for users (dd then fails: ENOSPC).
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=4096"], user=65534, capture_output=True, timeout=60
        )
        status = os.statvfs(disk_with_reserved_blocks)
        assert status.f_bavail * status.f_frsize < 64 * 1024  # full for everyone but root
        assert (sample(server, "secrets_manager_audit_disk_free_bytes") or 0) > 512 * 1024
        time.sleep(6)  # a health probe ran since (every 5 s)
        up = server.cli("ops", "health", "--json")
        assert json.loads(up.stdout)[0]["status"] == "SERVING", up.stdout
        assert server.cli("ops", "get", "auth/DB_PASSWORD").stdout == b"auth-db-pass-SEEKRIT-1\n"
    finally:
        server.stop()


class _StartStopped(Exception):
    pass


def test_no_call_is_served_before_the_start_is_recorded(tmp_path: Path) -> None:
    """serve writes its start's audit record ("serve", ok) once its port is bound; a call taken
    before that record was written would be recorded before the start (a test that called at once
    found the "serve" record last: CI), or served by a process whose start could not be recorded
    at all. Here the record's write is held until a health check has had its chance: it gets no
    answer. Before, the server took calls first (SERVING)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from secrets_manager.audit import AuditLog
    from secrets_manager.service.config import load_config
    from secrets_manager.service.server import run_server
    from service_fixtures import tls_files

    make_pki(tmp_path)
    make_store(tmp_path)
    (tmp_path / "in-process.toml").write_text(
        'listen = "127.0.0.1:0"\npolicy = "policy.toml"\n'
        '[tls]\ncert = "server.pem"\nkey = "server-key.pem"\nclient_ca = "ca.pem"\n'
    )
    answers: list[object] = []

    def recording_the_start(port: int, _policy_sha256: str) -> None:
        def check() -> None:
            channel = grpc.secure_channel(f"127.0.0.1:{port}", tls_files(tmp_path, "ops").credentials())
            try:
                stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
                answers.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
            except grpc.RpcError as exc:
                answers.append(exc.code())
            finally:
                channel.close()

        checker = threading.Thread(target=check)
        checker.start()
        checker.join()
        raise _StartStopped  # as if the record could not be written

    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    handlers = {number: signal.getsignal(number) for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(_StartStopped):
            run_server(
                load_config(tmp_path / "in-process.toml"),
                store,
                AuditLog(tmp_path / "in-process.audit.jsonl"),
                ready=recording_the_start,
            )
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        store.close()
    assert answers in ([grpc.StatusCode.UNAVAILABLE], [grpc.StatusCode.DEADLINE_EXCEEDED]), answers


def _replica_with_certificate(base: Path, kind: str, pair: tuple[bytes, bytes]) -> Server:
    """Another serve over base's store and policy, presenting the server certificate `pair`."""
    directory = base / kind
    directory.mkdir()
    for name in ("ca.pem", "policy.toml"):
        shutil.copy(base / name, directory / name)
    (directory / "server.pem").write_bytes(pair[0])
    (directory / "server-key.pem").write_bytes(pair[1])
    (directory / "server-key.pem").chmod(0o600)
    return start_server(directory, store=str(base / "store.db"))


def test_health_names_each_replicas_certificate_problem_while_another_serves(tmp_path: Path) -> None:
    """The on-call's view of `--server A,B,C,D`: one replica serves; one presents a certificate
    from another CA, one a certificate for another host name, one a certificate that expired
    while it served. Each is UNREACHABLE with its own cause in the one error line, exit 1. The
    expired one was "check the certificate files (is the server's certificate signed by the CA …
    and issued for this address?)", which sent them to the CA and the address, not to a renewal:
    that part fails on the old code."""
    make_pki(tmp_path)
    make_store(tmp_path)
    ca_cert, ca_key = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()
    other_cert, other_key = pki.new_ca(trust_domain=TD)
    servers = [start_server(tmp_path)]
    try:
        for kind, pair in (
            ("foreign", pki.issue(other_cert, other_key, "server", server=True)),
            ("elsewhere", pki.issue(ca_cert, ca_key, "server", server=True, dns=["elsewhere.example"])),
        ):
            servers.append(_replica_with_certificate(tmp_path, kind, pair))
        # valid for as long as a start takes on a loaded machine (serve refuses an expired one)
        expires = datetime.now(UTC) + timedelta(seconds=15)
        last_day = expires - timedelta(days=1)
        pair = pki.issue(ca_cert, ca_key, "server", server=True, days=1, not_before=last_day)
        servers.append(_replica_with_certificate(tmp_path, "expiring", pair))
        good, foreign, elsewhere, expiring = (server.address for server in servers)
        addresses = ",".join((good, foreign, elsewhere, expiring))
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)
        checked = servers[0].cli("ops", "health", "--json", env={"SECRETS_MANAGER_ADDR": addresses})
        said = checked.stderr.decode()
        assert checked.returncode == 1 and said.count("\n") == 1, said
        statuses = {r["address"]: r["status"] for r in json.loads(checked.stdout)}
        assert statuses == {
            good: "SERVING",
            foreign: "UNREACHABLE",
            elsewhere: "UNREACHABLE",
            expiring: "UNREACHABLE",
        }
        assert said.startswith(
            f"secrets-manager: error: not serving: {foreign} UNREACHABLE, {elsewhere} UNREACHABLE, "
            f"{expiring} UNREACHABLE; "
        ), said
        assert f"TLS handshake with {foreign} failed: check the certificate files" in said
        assert f"the server at {elsewhere} presented a certificate not issued for 127.0.0.1" in said
        assert (
            f"TLS handshake with {expiring} failed: the server's certificate has expired: renew it "
            "('pki issue NAME --server --force') and send serve SIGHUP, or check this host's clock"
        ) in said
    finally:
        for server in servers:
            server.stop()


def test_health_says_why_an_address_is_unreachable_not_to_read_a_log_it_never_wrote(tmp_path: Path) -> None:
    """`health` against an address where nothing listens, or with a CA that did not sign the
    server's certificate, ended "UNREACHABLE; see the service's log (event health.check_failed)
    and its secrets_manager_health_check_ok metric": a service never reached logs nothing about
    it. The line now says why and what to check, as any command's error does; the --json error
    column stays gRPC's. Fails on the old code."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path)
    try:
        nowhere = free_address()
        down = server.cli("ops", "health", env={"SECRETS_MANAGER_ADDR": nowhere})
        said = down.stderr.decode()
        assert down.returncode == 1 and said.count("\n") == 1, said
        assert said == (
            f"secrets-manager: error: not serving: {nowhere} UNREACHABLE; {nowhere}: failed to "
            "connect (Connection refused): is the service running there, and is this its address?\n"
        )
        foreign_ca = server.cli(
            "ops", "health", "--json", env={"SECRETS_MANAGER_CA": str(tmp_path / "other-ca.pem")}
        )
        said = foreign_ca.stderr.decode()
        assert foreign_ca.returncode == 1 and said.count("\n") == 1, said
        assert (
            f"not serving: {server.address} UNREACHABLE; TLS handshake with {server.address} failed" in said
        )
        assert "service's log" not in said
        assert json.loads(foreign_ca.stdout)[0]["error"].startswith("UNAVAILABLE: failed to connect")
    finally:
        server.stop()


def test_serve_starts_and_serves_with_no_writable_temporary_directory(tmp_path: Path) -> None:
    """A container whose root file system is read-only and that mounts no /tmp: the store's
    directory is all `serve` may write. It held gRPC's bind messages in a temporary file, and so
    failed to start with "internal error (FileNotFoundError)"."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, wrapper=without_writable_temporary_directory(tmp_path))
    try:
        got = server.cli("market-connector", "get", "market-connector/BINANCE_API_KEY")
        assert (got.returncode, got.stdout) == (0, b"binance-key-SEEKRIT-3\n"), got.stderr
    finally:
        server.stop()
    assert server.process.returncode == 0, "".join(server.log_lines)
