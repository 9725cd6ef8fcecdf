"""The audit log as an auditor reconstructs the service from it alone (docs/audit.md §2): when a
real `secrets-manager serve` ran and how each run ended (`serve`, `serve.stop`), and one record, with
identity, certificate serial, peer, method and name, for every request that reaches it, refusals
included. Real processes, real mutual TLS certificates, a real SQLite store."""

from __future__ import annotations

import fcntl
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import PASSWORD, Server, make_pki, make_store, start_server


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
