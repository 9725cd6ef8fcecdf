"""The audit log as an auditor reconstructs the service from it alone (docs/audit.md §2): when a
real `secrets-manager serve` ran and how each run ended (`serve`, `serve.stop`), and one record, with
identity, certificate serial, peer, method and name, for every request that reaches it, refusals
included. Real processes, real mutual TLS certificates, a real SQLite store."""

from __future__ import annotations

import fcntl
import json
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from secrets_manager.cli.audit_commands import serve_periods_of
from secrets_manager.tls import pki
from secrets_manager.tls.identity import serial_text
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import (
    PASSWORD,
    TD,
    Server,
    eventually,
    make_odd_client,
    make_pki,
    make_store,
    start_server,
)

SERVICE = pb.DESCRIPTOR.services_by_name["Secrets"].full_name


def _local(server: Server) -> dict[str, str]:
    return {
        "SECRETS_MANAGER_STORE": str(server.dir / "store.db"),
        "MASTER_PASSWORD": PASSWORD,
        "SECRETS_MANAGER_ADDR": "",
    }


def _verify(server: Server) -> None:
    checked = server.cli("ops", "audit", "verify", env=_local(server))
    assert checked.returncode == 0, checked.stderr


def _records(server: Server) -> list[dict[str, Any]]:
    return server.audit_records()  # type: ignore[return-value]


def test_a_graceful_stop_is_recorded_after_the_last_requests_record_and_a_kill_leaves_none(
    tmp_path: Path,
) -> None:
    """serve's start was recorded, its stop was not: after SIGTERM the log just ended, as it does
    after a crash or a log cut short. Now a graceful stop appends `serve.stop` under the start's
    request id, after the record of the last request it let finish: the signal, the unary calls in
    flight when it began (one here, held by the audit log's lock until after the SIGTERM), the Watch
    streams it ended, how long the drain took, and that the grace period cut none. A SIGKILLed
    serve leaves none, and `audit show --serve-periods` tells the two runs apart. Fails on the old
    code (no serve.stop record; no --serve-periods)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, environment={"SECRETS_MANAGER_AUDIT_TIMEOUT": "30"})
    try:
        auth = server.stub("auth")
        assert auth.GetSecret(pb.GetSecretRequest(name="auth/DB_PASSWORD"), timeout=20).secret.value
        watch = auth.Watch(pb.WatchRequest(prefix="auth/"), timeout=60)
        watch.initial_metadata()  # the stream is live
        answers: list[object] = []
        with open(tmp_path / "store.audit.jsonl.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the next record waits for the log's lock
            held = threading.Thread(
                target=lambda: answers.append(
                    auth.GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY"), timeout=30).secret.version
                )
            )
            held.start()
            time.sleep(1.0)  # the call is in flight, waiting to write its record
            server.process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            fcntl.flock(lock, fcntl.LOCK_UN)
        held.join(timeout=30)
        assert answers == [1]  # it finished within the grace period, and was answered
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    records = _records(server)
    started = [r for r in records if r["operation"] == "serve" and r["outcome"] == "ok"]
    assert len(started) == 1
    last = records[-1]
    assert last["operation"] == "serve.stop" and last["request_id"] == started[0]["request_id"]
    assert last["outcome"] == "ok" and last["decision"] == "allow" and last["source"] == "grpc"
    stop = last["stopped"]
    assert stop["signal"] == "SIGTERM" and stop["in_flight"] == 1 and stop["watch_streams"] == 1
    assert stop["cut"] == 0 and stop["unfinished"] == 0 and stop["grace_seconds"] == 5
    assert 0.5 <= stop["drain_seconds"] < 5
    gets = [r for r in records if r["operation"] == "get" and r["name"] == "auth/JWT_KEY"]
    assert len(gets) == 1 and gets[0]["outcome"] == "ok" and gets[0]["seq"] < last["seq"]
    assert not [r for r in records if r["operation"] != "serve.stop" and "stopped" in r]
    _verify(server)

    killed = start_server(tmp_path)
    killed.kill()
    third = start_server(tmp_path)
    third.stop()
    shown = third.cli("ops", "audit", "show", "--serve-periods", "--json", env=_local(third))
    assert shown.returncode == 0, shown.stderr
    periods = json.loads(shown.stdout)
    assert [p["ended"].split(" (")[0].split(":")[0] for p in periods] == [
        "stopped cleanly",
        "no stop record",
        "stopped cleanly",
    ]
    assert periods[0]["stop"]["in_flight"] == 1 and periods[0]["request_id"] == started[0]["request_id"]
    assert "crashed or killed before the serve that started at" in periods[1]["ended"]
    table = third.cli("ops", "audit", "show", "--serve-periods", env=_local(third))
    assert table.returncode == 0 and "stopped cleanly (SIGTERM)" in table.stdout.decode()
    _verify(third)


def test_a_stop_record_says_how_many_calls_the_grace_period_cut(tmp_path: Path) -> None:
    """A call still running when `shutdown_grace_seconds` (5 s here) ends is cancelled by gRPC;
    its handler still writes its record as it ends, before the stop record, which counts it as
    cut (and not unfinished: it ended within the second given after the grace period)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, environment={"SECRETS_MANAGER_AUDIT_TIMEOUT": "30"})
    codes: list[grpc.StatusCode] = []
    try:
        auth = server.stub("auth")

        def held_get() -> None:
            try:
                auth.GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY"), timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())  # type: ignore[attr-defined]

        with open(tmp_path / "store.audit.jsonl.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = threading.Thread(target=held_get)
            held.start()
            time.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            assert eventually(lambda: any("service.stopping" in line for line in server.log_lines))
            time.sleep(5.3)  # past the grace period: gRPC has cancelled the call
            fcntl.flock(lock, fcntl.LOCK_UN)
        held.join(timeout=30)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    assert codes in ([grpc.StatusCode.CANCELLED], [grpc.StatusCode.UNAVAILABLE])  # never answered
    records = _records(server)
    stop = records[-1]
    assert stop["operation"] == "serve.stop"
    assert stop["stopped"]["in_flight"] == 1 and stop["stopped"]["cut"] == 1
    assert stop["stopped"]["unfinished"] == 0 and stop["stopped"]["drain_seconds"] >= 5
    assert [r["name"] for r in records if r["operation"] == "get"] == ["auth/JWT_KEY"]
    _verify(server)


def test_serve_periods_pair_each_runs_records_by_request_id_when_several_serves_share_one_log() -> None:
    """Two serve processes writing one log interleave their records: each run is its start's
    request id, never the record order. A start with a stop is clean; one followed by a later
    serve on its address without a stop crashed before it; an error after the start ended it;
    one that never listened did not start."""

    def record(
        rid: str, operation: str, outcome: str, time: str, peer: str, **more: object
    ) -> dict[str, Any]:
        return {"request_id": rid, "operation": operation, "outcome": outcome, "time": time, "peer": peer,
                "source": "grpc", "actor": "svc", **more}  # fmt: skip

    a, b = "127.0.0.1:7001", "127.0.0.1:7002"
    stop = {"signal": "SIGINT", "in_flight": 0}
    records = [
        record("r1", "serve", "pending", "2026-01-01T00:00:00+00:00", a),
        record("r2", "serve", "pending", "2026-01-01T00:00:01+00:00", b),
        record("r1", "serve", "ok", "2026-01-01T00:00:02+00:00", a, policy_sha256="p1"),
        record("r2", "serve", "ok", "2026-01-01T00:00:03+00:00", b, policy_sha256="p1"),
        {"request_id": "x", "operation": "get", "outcome": "ok", "source": "grpc", "time": "T"},
        record("r2", "serve.stop", "ok", "2026-01-01T00:00:05+00:00", b, stopped=stop),
        record("r3", "serve", "pending", "2026-01-01T00:01:00+00:00", a),
        record("r3", "serve", "ok", "2026-01-01T00:01:01+00:00", a),
        record("r3", "serve", "storage_error", "2026-01-01T00:02:00+00:00", a),
        record("r4", "serve", "pending", "2026-01-01T00:03:00+00:00", b),
        record("r4", "serve", "storage_error", "2026-01-01T00:03:01+00:00", b),
    ]  # fmt: skip
    periods = serve_periods_of(records)
    assert [(p["request_id"], p["ended"]) for p in periods] == [
        (
            "r1",
            "no stop record: crashed or killed before the serve that started at 2026-01-01T00:01:01+00:00",
        ),
        ("r2", "stopped cleanly (SIGINT)"),
        ("r3", "ended on an error (storage_error)"),
        ("r4", "did not start (storage_error)"),
    ]
    assert periods[1]["stop"] == {"signal": "SIGINT", "in_flight": 0} and periods[0]["policy_sha256"] == "p1"


def _revoked_auth_certificate(directory: Path) -> str:
    """A second certificate of identity auth, written as stolen.pem, whose serial the policy
    revokes (as after a key was stolen and auth's certificate renewed); its serial."""
    ca_cert, ca_key = (directory / "ca.pem").read_bytes(), (directory / "ca-key.pem").read_bytes()
    cert, key = pki.issue(ca_cert, ca_key, "auth")
    (directory / "stolen.pem").write_bytes(cert)
    (directory / "stolen-key.pem").write_bytes(key)
    (directory / "stolen-key.pem").chmod(0o600)
    serial = serial_text(x509.load_pem_x509_certificate(cert).serial_number)
    with open(directory / "policy.toml", "a") as policy:
        policy.write(f'\n[revoked]\nserials = ["{serial}"]\n')
    return serial


def test_a_revoked_certificate_gets_nothing_from_health_or_reflection_and_each_refusal_is_recorded(
    tmp_path: Path,
) -> None:
    """The policy's `[revoked]` was checked only in the Secrets RPCs: a revoked certificate was
    answered SERVING by grpc.health.v1 (Check and Watch) and listed the services through server
    reflection. Now both refuse it UNAUTHENTICATED, naming the revocation, and each refusal is
    recorded where the other refusals are (operation `health` or `reflection`, `deny`,
    `unauthenticated`, the identity, the certificate's serial, the peer); the health checks of
    other certificates are answered as before and not recorded. Fails on the old code (SERVING)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    serial = _revoked_auth_certificate(tmp_path)
    server = start_server(tmp_path)
    try:
        checked = HealthStub(server.channel("auth")).Check(HealthCheckRequest(service=SERVICE), timeout=20)
        assert checked.status == HealthCheckResponse.SERVING
        watched = HealthStub(server.channel("auth")).Watch(HealthCheckRequest(service=""), timeout=20)
        assert next(iter(watched)).status == HealthCheckResponse.SERVING  # Watch still answers the others
        watched.cancel()
        before = len(_records(server))
        stolen = server.channel("stolen")
        with pytest.raises(grpc.RpcError) as raised:
            HealthStub(stolen).Check(HealthCheckRequest(service=SERVICE), timeout=20)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "revoked" in (raised.value.details() or "")  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(HealthStub(stolen).Watch(HealthCheckRequest(service=""), timeout=20)))
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        reflect = reflection_pb2_grpc.ServerReflectionStub(stolen)
        with pytest.raises(grpc.RpcError) as raised:
            list(
                reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20
                )
            )
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        listed = list(
            reflection_pb2_grpc.ServerReflectionStub(server.channel("auth")).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20
            )
        )
        assert SERVICE in {s.name for s in listed[0].list_services_response.service}
        assert eventually(lambda: len(_records(server)) >= before + 3)
    finally:
        server.stop()
    refused = [r for r in _records(server)[before:] if r["operation"] in ("health", "reflection")]
    assert [(r["operation"], r["name"]) for r in refused] == [
        ("health", SERVICE),
        ("health", ""),
        ("reflection", None),
    ]
    for record in refused:
        assert record["actor"] == f"spiffe://{TD}/auth" and record["certificate_serial"] == serial
        assert record["decision"] == "deny" and record["outcome"] == "unauthenticated"
        assert str(record["peer"]).startswith("ipv4:127.0.0.1:") and record["source"] == "grpc"
    assert not [
        r for r in _records(server) if r["operation"] == "health" and r["actor"] != f"spiffe://{TD}/auth"
    ]
    _verify(server)


def test_a_revoked_certificate_is_told_it_is_revoked_when_the_client_chooses_among_replicas(
    tmp_path: Path,
) -> None:
    """The SDK and --server choose a replica by its health check. A revoked certificate refused
    there must still be told what a call tells it (its certificate revoked, exit 5 as with one
    address), not that no replica is serving, which the SDK treats as an outage (and so would
    serve its cache). A valid certificate still reads through two replicas."""
    make_pki(tmp_path)
    make_store(tmp_path)
    _revoked_auth_certificate(tmp_path)
    first, second = start_server(tmp_path), start_server(tmp_path, "second")
    try:
        both = f"{first.address},{second.address}"
        alone = first.cli("stolen", "get", "auth/DB_PASSWORD")
        chosen = first.cli("stolen", "get", "auth/DB_PASSWORD", env={"SECRETS_MANAGER_ADDR": both})
        assert chosen.returncode == alone.returncode != 0, (chosen.stderr, alone.stderr)
        assert b"revoked" in chosen.stderr and b"no secrets-manager service is serving" not in chosen.stderr
        health = first.cli("stolen", "health", "--json", env={"SECRETS_MANAGER_ADDR": both})
        assert health.returncode == 1
        assert [(h["status"], "revoked" in h["error"]) for h in json.loads(health.stdout)] == [
            ("UNREACHABLE", True)
        ] * 2
        good = first.cli("auth", "get", "auth/DB_PASSWORD", env={"SECRETS_MANAGER_ADDR": both})
        assert good.returncode == 0 and good.stdout.strip() == b"auth-db-pass-SEEKRIT-1"
    finally:
        first.stop()
        second.stop()


def _serial_of(directory: Path, client: str) -> str:
    return serial_text(
        x509.load_pem_x509_certificate((directory / f"{client}.pem").read_bytes()).serial_number
    )


def test_every_request_that_reaches_the_service_has_exactly_one_record_with_who_where_and_what(
    tmp_path: Path,
) -> None:
    """An auditor must find, for each request, one record (a change's `pending` request record
    apart) naming the identity, the client certificate's serial, the peer, the operation, the
    name and the outcome, for every RPC and every way a request is refused: a certificate naming
    no usable identity, a revoked one, an identity with no role, a capability not granted, a
    malformed name, a secret not found, a compare-and-set refused, a deadline that passed while
    its record waited for the log, a Watch opened and cancelled. Never a value."""
    make_pki(tmp_path)
    make_odd_client(tmp_path, "odd", cn="auth/evil")  # a CN with '/': no usable identity
    make_store(tmp_path)
    _revoked_auth_certificate(tmp_path)
    server = start_server(tmp_path)
    written = b"matrix-value-SEEKRIT-9"
    checked: list[str] = []
    try:
        stubs = {name: server.stub(name) for name in ("auth", "ops", "writer", "nobody", "stolen", "odd")}

        def expect(
            client: str,
            method: str,
            request: object,
            code: grpc.StatusCode,
            operation: str,
            name: str | None,
            outcome: str,
            decision: str,
            *,
            actor: str | None = None,
            names: list[str] | None = None,
        ) -> None:
            before = len(_records(server))
            try:
                getattr(stubs[client], method)(request, timeout=20)
                got = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                got = exc.code()  # type: ignore[attr-defined]
            assert got is code, (method, client, got)
            assert eventually(lambda: len(_records(server)) > before, 10), method
            time.sleep(0.1)  # a second record of the same request would be written by now
            new = [r for r in _records(server)[before:] if r["outcome"] != "pending"]
            mine = [r for r in new if r["operation"] == operation]
            assert len(mine) == len(names or [name]) == len(new), (method, client, new)
            assert len({r["request_id"] for r in new}) == 1, (method, new)  # nothing else was recorded
            for record, named in zip(mine, names or [name], strict=True):
                assert record["actor"] == (actor or f"spiffe://{TD}/{client}"), (method, record)
                assert record["certificate_serial"] == _serial_of(tmp_path, client), (method, record)
                assert str(record["peer"]).startswith("ipv4:127.0.0.1:"), (method, record)
                assert (record["name"], record["outcome"], record["decision"]) == (
                    named,
                    outcome,
                    decision,
                ), (
                    method,
                    record,
                )
            checked.append(method)

        get = pb.GetSecretRequest(name="auth/DB_PASSWORD")
        ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        expect(
            "odd",
            "GetSecret",
            get,
            unauthenticated,
            "get",
            "auth/DB_PASSWORD",
            "unauthenticated",
            "deny",
            actor="<unidentified>",
        )
        expect(
            "stolen",
            "GetSecret",
            get,
            unauthenticated,
            "get",
            "auth/DB_PASSWORD",
            "unauthenticated",
            "deny",
            actor=f"spiffe://{TD}/auth",
        )
        expect("nobody", "GetSecret", get, denied, "get", "auth/DB_PASSWORD", "access_denied", "deny")
        expect(
            "nobody",
            "ListSecrets",
            pb.ListSecretsRequest(prefix="auth/"),
            denied,
            "list",
            "auth/",
            "access_denied",
            "deny",
        )
        expect(
            "auth",
            "GetSecret",
            pb.GetSecretRequest(name="market-connector/BINANCE_SECRET"),
            denied,
            "get",
            "market-connector/BINANCE_SECRET",
            "access_denied",
            "deny",
        )
        expect(
            "auth",
            "GetSecret",
            pb.GetSecretRequest(name="auth//bad"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "get",
            "auth//bad",
            "invalid_input",
            "deny",
        )
        expect(
            "auth",
            "GetSecret",
            pb.GetSecretRequest(name="auth/NOPE"),
            grpc.StatusCode.NOT_FOUND,
            "get",
            "auth/NOPE",
            "not_found",
            "allow",
        )
        expect("auth", "GetSecret", get, ok, "get", "auth/DB_PASSWORD", "ok", "allow")
        expect(
            "auth",
            "BatchGetSecrets",
            pb.BatchGetSecretsRequest(prefix="auth/"),
            ok,
            "get",
            "auth/",
            "ok",
            "allow",
            names=["auth/DB_PASSWORD", "auth/JWT_KEY"],
        )
        expect(
            "auth", "ListSecrets", pb.ListSecretsRequest(prefix="auth/"), ok, "list", "auth/", "ok", "allow"
        )
        expect(
            "auth",
            "DescribeSecret",
            pb.DescribeSecretRequest(name="auth/JWT_KEY"),
            ok,
            "history",
            "auth/JWT_KEY",
            "ok",
            "allow",
        )
        expect(
            "writer",
            "PutSecret",
            pb.PutSecretRequest(name="auth/NEW", value=written),
            ok,
            "store",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "writer",
            "PutSecret",
            pb.PutSecretRequest(name="auth/NEW", value=written, expect_version=0),
            grpc.StatusCode.ABORTED,
            "store",
            "auth/NEW",
            "conflict",
            "allow",
        )
        expect(
            "auth",
            "PutSecret",
            pb.PutSecretRequest(name="auth/NEW", value=written),
            denied,
            "store",
            "auth/NEW",
            "access_denied",
            "deny",
        )
        expect(
            "ops",
            "UpdateSecretMetadata",
            pb.UpdateSecretMetadataRequest(name="auth/NEW", description="d"),
            ok,
            "metadata",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "UpdateSecretMetadataIfCurrent",
            pb.UpdateSecretMetadataIfCurrentRequest(name="auth/NEW", description="e", expect_current=7),
            grpc.StatusCode.ABORTED,
            "metadata",
            "auth/NEW",
            "conflict",
            "allow",
        )
        expect(
            "ops",
            "StageSecretVersion",
            pb.StageSecretVersionRequest(name="auth/NEW", value=written + b"2"),
            ok,
            "rotate.stage",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "DiscardPendingVersion",
            pb.DiscardPendingVersionRequest(name="auth/NEW"),
            ok,
            "rotate.discard",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "StageSecretVersionIfCurrent",
            pb.StageSecretVersionIfCurrentRequest(name="auth/NEW", value=written + b"3", expect_current=1),
            ok,
            "rotate.stage",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "PromoteSecretVersion",
            pb.PromoteSecretVersionRequest(name="auth/NEW", version=3),
            ok,
            "rotate.promote",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "DeleteSecretIfCurrent",
            pb.DeleteSecretIfCurrentRequest(name="auth/NEW", expect_version=1),
            grpc.StatusCode.ABORTED,
            "delete",
            "auth/NEW",
            "conflict",
            "allow",
        )
        expect(
            "ops",
            "DeleteSecretIfUnchanged",
            pb.DeleteSecretIfUnchangedRequest(name="auth/NEW", expect_version=3),
            ok,
            "delete",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "UndeleteSecret",
            pb.UndeleteSecretRequest(name="auth/NEW"),
            ok,
            "undelete",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "DeleteSecret",
            pb.DeleteSecretRequest(name="auth/NEW"),
            ok,
            "delete",
            "auth/NEW",
            "ok",
            "allow",
        )
        expect(
            "ops",
            "RotateSecret",
            pb.RotateSecretRequest(name="auth/JWT_KEY"),
            grpc.StatusCode.NOT_FOUND,
            "rotate",
            "auth/JWT_KEY",
            "not_found",
            "allow",
        )

        # A deadline that passes while the request's record waits for the log's lock: one record.
        before = len(_records(server))
        with open(tmp_path / "store.audit.jsonl.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with pytest.raises(grpc.RpcError) as raised:
                stubs["auth"].GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY"), timeout=1)
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            fcntl.flock(lock, fcntl.LOCK_UN)
        assert eventually(lambda: len(_records(server)) > before)
        time.sleep(0.3)
        late = [r for r in _records(server)[before:] if r["operation"] == "get"]
        assert len(late) == 1 and late[0]["name"] == "auth/JWT_KEY", late

        # A Watch: one record when it opens, none more when its client cancels it.
        before = len(_records(server))
        watch = stubs["auth"].Watch(pb.WatchRequest(prefix="auth/"), timeout=30)
        watch.initial_metadata()
        watch.cancel()
        time.sleep(0.5)
        opened = [r for r in _records(server)[before:]]
        assert [(r["operation"], r["name"], r["outcome"]) for r in opened] == [("watch", "auth/", "ok")]
        assert opened[0]["certificate_serial"] == _serial_of(tmp_path, "auth")
    finally:
        server.stop()
    text = (tmp_path / "store.audit.jsonl").read_bytes()
    assert b"SEEKRIT" not in text
    assert len(checked) == 25
    _verify(server)


def test_a_damaged_store_and_a_failing_one_each_give_one_record_of_the_refused_read(tmp_path: Path) -> None:
    """DATA_LOSS (a secret's value row gone) and UNAVAILABLE (the store's table gone, as a store
    that fails under a running serve): each GetSecret still has exactly one record, allowed, with
    the store's outcome (`integrity_error`, `storage_error`), its identity, serial and peer."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path)
    auth = server.stub("auth")
    outcomes = []
    try:
        for damage, name, code in (
            (
                "DELETE FROM entries WHERE key = 'data/auth/JWT_KEY#1'",
                "auth/JWT_KEY",
                grpc.StatusCode.DATA_LOSS,
            ),
            ("DROP TABLE entries", "auth/DB_PASSWORD", grpc.StatusCode.UNAVAILABLE),
        ):
            db = sqlite3.connect(tmp_path / "store.db")
            db.execute(damage)
            db.commit()
            db.close()
            before = len(_records(server))
            with pytest.raises(grpc.RpcError) as raised:
                auth.GetSecret(pb.GetSecretRequest(name=name), timeout=20)
            assert raised.value.code() is code  # type: ignore[attr-defined]
            time.sleep(0.2)
            new = _records(server)[before:]
            assert [(r["operation"], r["name"], r["decision"]) for r in new] == [("get", name, "allow")], new
            assert new[0]["certificate_serial"] == _serial_of(tmp_path, "auth")
            assert str(new[0]["peer"]).startswith("ipv4:127.0.0.1:")
            outcomes.append(new[0]["outcome"])
    finally:
        server.stop()
    assert outcomes == ["integrity_error", "storage_error"]
