"""Per-identity limits of a real `secrets-manager serve` over real mutual TLS (server.toml
[limits], service/limits.py): a request rate per certificate identity, answered RESOURCE_EXHAUSTED
past it while other identities are served; a cap on one identity's Watch streams; throttled
requests summed up in one audit record per identity instead of one record each; the limits taken
again at SIGHUP. Rates are low (a token every 10 s) so that a slow machine cannot refill a bucket
between two calls of a test and fail it spuriously."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from secrets_manager.client.remote import RemoteStore
from secrets_manager.errors import InvalidInputError
from secrets_manager.service.config import load_config
from secrets_manager.tls import pki
from secrets_manager.tls.identity import serial_text
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.wire import WATCH_REVISION_KEY
from service_fixtures import PASSWORD, TD, Server, eventually, make_pki, make_store, start_server, tls_files

SLOW = "[limits]\nrequests_per_second = 0.1\nrequest_burst = {burst}\nthrottled_summary_seconds = 1\n"


def _get(server: Server, stub: object, name: str = "auth/DB_PASSWORD") -> grpc.StatusCode:
    try:
        stub.GetSecret(pb.GetSecretRequest(name=name), timeout=20)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _throttled_records(server: Server) -> list[dict[str, object]]:
    return [record for record in server.audit_records() if record["operation"] == "throttled"]


def _sample(server: Server, line: str) -> float | None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    found = re.search("^" + re.escape(line) + r" (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found[1])


def _verify(server: Server) -> None:
    local = {
        "SECRETS_MANAGER_STORE": str(server.dir / "store.db"),
        "MASTER_PASSWORD": PASSWORD,
        "SECRETS_MANAGER_ADDR": "",
    }
    checked = server.cli("ops", "audit", "verify", env=local)
    assert checked.returncode == 0, checked.stderr


def test_a_throttled_identity_is_refused_while_another_is_served_and_summed_up_in_the_audit_log(
    tmp_path: Path,
) -> None:
    """A certificate with no role sending requests in a loop was refused, and audited, every time:
    1,400 a second wrote about 780 KB/s of audit log, and it held worker threads from every other
    client. Now past its identity's rate it gets RESOURCE_EXHAUSTED ("throttled; retry later",
    ThrottledError in the trailing metadata) before the policy is asked; another identity's calls
    go on succeeding; the throttled ones have no record each but one `throttled` record per
    identity (count, by method) every throttled_summary_seconds; a counter by method; and the log
    still verifies. Fails on the old code (no [limits])."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, metrics=True, settings=SLOW.format(burst=4))
    try:
        nobody, auth = server.stub("nobody"), server.stub("auth")
        codes = []
        for index in range(12):
            codes.append(_get(server, nobody))
            if index % 3 == 0:  # 4 calls of another identity, within its own burst, in between
                assert _get(server, auth) is grpc.StatusCode.OK
        refused = codes.count(grpc.StatusCode.PERMISSION_DENIED)
        throttled = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused + throttled == 12 and 4 <= refused <= 6, codes
        with pytest.raises(grpc.RpcError) as raised:
            nobody.GetSecret(pb.GetSecretRequest(name="auth/JWT_KEY"), timeout=20)
        exc = raised.value
        assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        details = exc.details() or ""  # type: ignore[attr-defined]
        assert "throttling" in details and "retry later" in details and "SEEKRIT" not in details
        assert ("secrets-manager-error", "ThrottledError") in tuple(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        throttled += 1
        assert eventually(lambda: len(_throttled_records(server)) >= 1, timeout=20)
        assert eventually(
            lambda: (
                _sample(server, 'secrets_manager_throttled_requests_total{method="GetSecret"}') == throttled
            )
        )
    finally:
        server.stop()
    records = server.audit_records()
    nobody_id = f"spiffe://{TD}/nobody"
    denied = [r for r in records if r["actor"] == nobody_id and r["outcome"] == "access_denied"]
    assert len(denied) == refused  # each request the policy refused has its own record
    summaries = [r for r in records if r["operation"] == "throttled"]
    assert {r["actor"] for r in summaries} == {nobody_id}
    assert sum(r["throttled"]["count"] for r in summaries) == throttled  # type: ignore[index]
    assert all(r["decision"] == "deny" and r["outcome"] == "throttled" for r in summaries)
    assert all(set(r["throttled"]["methods"]) == {"GetSecret"} for r in summaries)  # type: ignore[index]
    served = [r for r in records if r["actor"] == f"spiffe://{TD}/auth" and r["operation"] == "get"]
    assert len(served) == 4 and all(r["outcome"] == "ok" for r in served)
    assert any('"event": "limits.throttled"' in line for line in server.log_lines)
    _verify(server)


def test_a_throttled_summary_names_the_client_certificate_its_requests_came_with(tmp_path: Path) -> None:
    """Every other record of a request names the serial of the client certificate it came with,
    so the calls of a stolen certificate are told from those of its identity's renewed one; the
    `throttled` summary named the identity alone. Now there is one summary per identity and
    certificate, with its `certificate_serial`: two certificates of one identity throttled give
    two summaries, each with its own serial and count (the rate is still the identity's). Fails
    on the old code (one summary, no certificate_serial)."""
    make_pki(tmp_path)
    make_store(tmp_path)
    ca_cert, ca_key = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()
    renewed_cert, renewed_key = pki.issue(ca_cert, ca_key, "nobody")  # the identity's second certificate
    (tmp_path / "nobody2.pem").write_bytes(renewed_cert)
    (tmp_path / "nobody2-key.pem").write_bytes(renewed_key)
    serials = {
        name: serial_text(
            x509.load_pem_x509_certificate((tmp_path / f"{name}.pem").read_bytes()).serial_number
        )
        for name in ("nobody", "nobody2")
    }
    server = start_server(tmp_path, settings=SLOW.format(burst=2))
    try:
        first, second = server.stub("nobody"), server.stub("nobody2")
        codes = [_get(server, first) for _ in range(4)] + [_get(server, second) for _ in range(3)]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5, codes
        assert eventually(lambda: sum(r["throttled"]["count"] for r in _throttled_records(server)) == 5, 20)  # type: ignore[index]
    finally:
        server.stop()
    summaries = _throttled_records(server)
    counted: dict[object, int] = {}
    for record in summaries:
        assert record["actor"] == f"spiffe://{TD}/nobody"
        counted[record.get("certificate_serial")] = (
            counted.get(record.get("certificate_serial"), 0) + record["throttled"]["count"]
        )  # type: ignore[index]
    assert counted == {serials["nobody"]: 2, serials["nobody2"]: 3}
    _verify(server)


def test_the_sdk_retries_a_throttled_call_and_the_cli_says_in_one_line_that_it_is_throttled(
    tmp_path: Path,
) -> None:
    """A throttled call reached the SDK as an error at once. Now RemoteStore (the SDK's and
    --server's) sends it again with backoff, for a bounded time: a call throttled for a moment
    succeeds; one throttled for longer ends ThrottledError, which the CLI reports in one line
    (exit 1, no traceback). Fails on the old code (no [limits])."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, settings="[limits]\nrequests_per_second = 0.2\nrequest_burst = 1\n")
    try:
        store = RemoteStore(server.address, tls_files(tmp_path, "auth"))
        try:
            assert store.get("auth/DB_PASSWORD").value.reveal() == b"auth-db-pass-SEEKRIT-1"  # the burst
            started = time.monotonic()
            assert store.get("auth/JWT_KEY").value.reveal() == b"auth-jwt-key-SEEKRIT-2"  # after a retry
            assert (
                time.monotonic() - started >= 1.0
            )  # it waited for the bucket to refill (5 s after the first call; retried 6 s)
        finally:
            store.close()
    finally:
        server.stop()
    server = start_server(
        tmp_path, name="slow", settings="[limits]\nrequests_per_second = 0.01\nrequest_burst = 1\n"
    )
    try:
        assert server.cli("auth", "get", "auth/DB_PASSWORD").returncode == 0
        failed = server.cli("auth", "get", "auth/DB_PASSWORD")
    finally:
        server.stop()
    assert failed.returncode == 1
    stderr = failed.stderr.decode()
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "throttling" in stderr and "retry later" in stderr
    assert "SEEKRIT" not in stderr and not failed.stdout


def _watch(server: Server, identity: str) -> tuple[grpc.Channel, object]:
    channel = server.channel(identity)
    call = pb_watch(channel)
    return channel, call


def pb_watch(channel: grpc.Channel) -> object:
    from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc

    stub = pb_grpc.SecretsStub(channel)  # type: ignore[no-untyped-call]
    return stub.Watch(pb.WatchRequest(prefix=""))


def _live(call: object) -> grpc.StatusCode:
    """OK once the stream says it is live (its revision); else the status it was refused with."""
    try:
        metadata = dict(call.initial_metadata() or ())  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    if WATCH_REVISION_KEY in metadata:
        return grpc.StatusCode.OK
    deadline = time.monotonic() + 10  # a refusal shows a moment after its empty metadata
    while time.monotonic() < deadline and not call.done():  # type: ignore[attr-defined]
        time.sleep(0.05)
    return call.code()  # type: ignore[attr-defined,no-any-return]


def test_one_identity_may_hold_only_its_share_of_watch_streams(tmp_path: Path) -> None:
    """Only a global cap bounded Watch streams: one runaway service opening streams in a loop took
    every slot (and the worker threads they hold), and every other client's Watch was refused.
    Now one identity holds at most watch_streams_per_identity; past it RESOURCE_EXHAUSTED naming
    the setting, while another identity still watches, and a closed stream frees its place.
    Fails on the old code (no [limits])."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, settings="[limits]\nwatch_streams_per_identity = 2\n")
    channels = []
    try:
        calls = []
        for _ in range(2):
            channel, call = _watch(server, "auth")
            channels.append(channel)
            calls.append(call)
            assert _live(call) is grpc.StatusCode.OK
        channel, refused = _watch(server, "auth")
        channels.append(channel)
        assert _live(refused) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watch_streams_per_identity" in (refused.details() or "")  # type: ignore[attr-defined]
        channel, other = _watch(server, "ops")
        channels.append(channel)
        assert _live(other) is grpc.StatusCode.OK
        calls[0].cancel()  # type: ignore[attr-defined]

        def reopened() -> bool:
            channel, call = _watch(server, "auth")
            channels.append(channel)
            return _live(call) is grpc.StatusCode.OK

        assert eventually(reopened, timeout=15)
    finally:
        for channel in channels:
            channel.close()
        server.stop()
    refusals = [r for r in server.audit_records() if r["operation"] == "watch" and r["outcome"] != "ok"]
    assert any(r["outcome"] == "resource_exhausted" for r in refusals)


def test_sighup_takes_new_limits_without_a_restart(tmp_path: Path) -> None:
    """Limits are tuned under load, when a restart is the last thing wanted. Now SIGHUP reads
    server.toml's [limits] again (as it reloads the policy), logs limits.reloaded, and does not
    call the edit one that needs a restart; a [limits] that no longer loads keeps what is in force.
    Fails on the old code (no [limits])."""
    make_pki(tmp_path)
    make_store(tmp_path)
    server = start_server(tmp_path, settings="[limits]\nrequests_per_second = 0\n")
    config = tmp_path / "server.toml"
    try:
        auth = server.stub("auth")
        assert [_get(server, auth) for _ in range(6)] == [grpc.StatusCode.OK] * 6  # no rate limit
        config.write_text(config.read_text().replace("requests_per_second = 0\n", SLOW.format(burst=2)[9:]))
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: any("limits.reloaded" in line for line in server.log_lines))
        codes = [_get(server, auth) for _ in range(5)]
        assert codes[:2] == [grpc.StatusCode.OK] * 2
        assert codes[-2:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, codes
        config.write_text(config.read_text().replace("requests_per_second = 0.1", "requests_per_second = 0"))
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: sum("limits.reloaded" in line for line in server.log_lines) == 2)
        assert _get(server, auth) is grpc.StatusCode.OK
        # A [limits] that no longer loads keeps the limits in force (no rate), said as config.invalid.
        config.write_text(
            config.read_text().replace("requests_per_second = 0\n", "requests_per_second = -1\n")
        )
        os.kill(server.process.pid, signal.SIGHUP)
        assert eventually(lambda: any("config.invalid" in line for line in server.log_lines))
        assert [_get(server, auth) for _ in range(4)] == [grpc.StatusCode.OK] * 4
    finally:
        server.stop()
    assert sum("limits.reloaded" in line for line in server.log_lines) == 2
    assert not any("config.restart_required" in line for line in server.log_lines)
    reloaded = [json.loads(line) for line in server.log_lines if "limits.reloaded" in line]
    assert reloaded[0]["request_burst"] == 2 and reloaded[1]["requests_per_second"] == 0
    _verify(server)


@pytest.mark.parametrize(
    ("top", "said"),
    [
        ("throttled_summary_seconds = 5", "it is a [limits] setting: put it under the [limits] line"),
        ("requests_per_second = 5", "it is a [limits] setting: put it under the [limits] line"),
        ('client_ca = "a"', "it is a [tls] setting: put it under the [tls] line"),
    ],
)
def test_a_tables_setting_above_its_table_is_refused_saying_where_it_goes(
    tmp_path: Path, top: str, said: str
) -> None:
    """`throttled_summary_seconds = 5` at the top of server.toml (docs/audit.md named it without
    its table) was refused as "unknown setting", which sent the operator to look for a typo in a
    setting that exists: the refusal now says which table it belongs to."""
    config = tmp_path / "server.toml"
    config.write_text(f'policy = "p.toml"\n{top}\n[tls]\ncert = "c"\nkey = "k"\nclient_ca = "a"\n')
    with pytest.raises(InvalidInputError) as raised:
        load_config(config)
    message = str(raised.value)
    assert f"unknown setting {top.split(' = ')[0]!r}" in message and said in message and "\n" not in message


@pytest.mark.parametrize(
    ("section", "said"),
    [
        ("requests_per_second = -1", "limits.requests_per_second must be 0 (no limit) or 0.01..1000000"),
        ("request_burst = 0", "limits.request_burst must be 1..1000000"),
        ("watch_streams_per_identity = 64", "limits.watch_streams_per_identity must be 1..63"),
        ("throttled_summary_seconds = true", "limits.throttled_summary_seconds must be 1..3600"),
        ("request_rate = 5", "unknown setting 'limits.request_rate'"),
    ],
)
def test_a_bad_limit_is_one_line_naming_the_setting(tmp_path: Path, section: str, said: str) -> None:
    """A bad [limits] value is refused with the setting and its range. Fails on the old code
    ([limits] was an unknown setting)."""
    config = tmp_path / "server.toml"
    config.write_text(
        'policy = "p.toml"\nmax_workers = 64\n[limits]\n'
        f'{section}\n[tls]\ncert = "c"\nkey = "k"\nclient_ca = "a"\n'
    )
    with pytest.raises(InvalidInputError) as raised:
        load_config(config)
    assert said in str(raised.value) and "\n" not in str(raised.value)
