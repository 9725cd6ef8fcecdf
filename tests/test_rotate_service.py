"""Credential rotation through the service: the StageSecretVersion, PromoteSecretVersion and
DiscardPendingVersion RPCs (capability "rotate"), and `secrets-manager rotate NAME --server …`,
against a real `secrets-manager serve` process with real mutual-TLS certificates and its audit log."""

from __future__ import annotations

import json
import shlex
import string
import subprocess
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from command_recorder import recorder
from secrets_manager.client import RemoteStore
from secrets_manager.errors import (
    ConflictError,
    NotFoundError,
    RotationInProgressError,
    SecretsManagerError,
    UnsupportedOperationError,
)
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.v1 import secrets_pb2_grpc as pb_grpc
from secrets_manager.wire import ERROR_CLASS_KEY, error_for, error_metadata, metadata_from_message, status_for
from service_fixtures import SCRIPT, TD, Server, make_pki, make_store, start_server, tls_files
from test_service import cli_in_process

OLD_VALUE = b"old-db-password-KNOWN-1234"
STAGED_VALUE = b"staged-db-password-SEEKRIT-5678"
SEED = {"db/app": OLD_VALUE}
CLIENTS = ("ops", "rotator", "writer", "reader")
POLICY = f"""
[identities]
"spiffe://{TD}/ops" = ["admin"]
"spiffe://{TD}/rotator" = ["rotator"]
"spiffe://{TD}/writer" = ["writer"]
"spiffe://{TD}/reader" = ["reader"]

[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]

[roles.rotator]
rules = [{{ path = "db/**", capabilities = ["read", "rotate"] }}]

[roles.writer]
rules = [{{ path = "db/**", capabilities = ["read", "write", "list"] }}]

[roles.reader]
rules = [{{ path = "db/**", capabilities = ["read"] }}]
"""
ROTATOR = f"spiffe://{TD}/rotator"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path, CLIENTS)
    make_store(tmp_path, SEED, POLICY)
    running = start_server(tmp_path)
    yield running
    running.stop()


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def labels(server: Server) -> dict[str, int]:
    reply = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="db/app"), timeout=10)
    return dict(metadata_from_message(reply.metadata).labels)


def versions(server: Server) -> list[int]:
    reply = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="db/app"), timeout=10)
    return [v.version for v in reply.metadata.versions]


def value(server: Server, **selector: Any) -> bytes:
    reply = server.stub("ops").GetSecret(pb.GetSecretRequest(name="db/app", **selector), timeout=10)
    return bytes(reply.secret.value)


def stage(server: Server, client: str, data: bytes = STAGED_VALUE) -> Any:
    request = pb.StageSecretVersionRequest(name="db/app", value=data)
    return server.stub(client).StageSecretVersion(request, timeout=10)


def rotate(server: Server, client: str, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[str]:
    """`secrets-manager rotate db/app ARGS` as `client`, through SECRETS_MANAGER_ADDR (Server.cli)."""
    proc = server.cli(client, "rotate", "db/app", *args, input=input)
    result = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8", "replace")
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


# ---- the RPCs ------------------------------------------------------------------------------------


def test_stage_promote_and_discard_through_the_service(server: Server) -> None:
    staged = stage(server, "rotator")
    assert (staged.name, staged.version) == ("db/app", 2)
    described = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="db/app"), timeout=10)
    version_2 = described.metadata.versions[-1]
    assert (version_2.version, version_2.created, version_2.created_by) == (
        2,
        staged.created,
        staged.created_by,
    )
    assert staged.created_by == ROTATOR  # the caller, not the user the service runs as
    assert labels(server) == {"current": 1, "pending": 2}
    assert value(server) == OLD_VALUE

    stub = server.stub("rotator")
    promoted = stub.PromoteSecretVersion(pb.PromoteSecretVersionRequest(name="db/app", version=2), timeout=10)
    assert (promoted.name, promoted.version, promoted.previous) == ("db/app", 2, 1)
    assert labels(server) == {"current": 2, "previous": 1}
    assert value(server) == STAGED_VALUE

    assert stage(server, "rotator", b"never-promoted").version == 3
    discarded = stub.DiscardPendingVersion(pb.DiscardPendingVersionRequest(name="db/app"), timeout=10)
    assert (discarded.name, discarded.version) == ("db/app", 3)
    assert labels(server) == {"current": 2, "previous": 1}
    assert value(server, version=3) == b"never-promoted"  # the version stays, unlabelled


def test_remote_store_rotation_methods_return_what_the_store_protocol_says(server: Server) -> None:
    remote = RemoteStore(server.address, tls_files(server.dir, "rotator"))
    try:
        info = remote.stage("db/app", STAGED_VALUE)
        assert (info.version, info.labels) == (2, ("pending",))
        # As DescribeSecret tells it, though the rotator may not list (DescribeSecret) itself.
        described = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="db/app"), timeout=10)
        assert metadata_from_message(described.metadata).versions[-1] == info
        assert remote.get("db/app", label="pending").value.reveal() == STAGED_VALUE
        assert remote.promote("db/app", 2) == 1  # the old current, now previous
        assert remote.stage("db/app", b"third").version == 3
        assert remote.discard_pending("db/app") == 3
        assert remote.stage("db/app", b"fourth").version == 4
        assert remote.promote("db/app", 4) == 2
        assert remote.stage("db/app", b"fifth").version == 5
        # ABORTED either way; the service names the class, so the client tells a refused rotation
        # from a lost compare-and-set.
        with pytest.raises(RotationInProgressError, match="in progress"):
            remote.stage("db/app", b"sixth")
        with pytest.raises(ConflictError, match="not pending") as lost:
            remote.promote("db/app", 4)
        assert type(lost.value) is ConflictError
        assert remote.discard_pending("db/app") == 5
    finally:
        remote.close()
    assert labels(server) == {"current": 4, "previous": 2}


def test_a_stage_while_a_rotation_is_in_progress_is_aborted_and_changes_nothing(server: Server) -> None:
    first = stage(server, "rotator").version
    with pytest.raises(grpc.RpcError) as caught:
        stage(server, "rotator", b"SECOND-STAGED-VALUE")
    assert caught.value.code() is grpc.StatusCode.ABORTED
    details = str(caught.value.details())
    assert f"a rotation of 'db/app' is in progress (version {first} is pending)" in details
    assert "'secrets-manager rotate db/app --resume' with the --set-command/--test-command of the " in details
    assert "SECOND-STAGED-VALUE" not in details
    assert labels(server) == {"current": 1, "pending": first}
    stages = [r for r in server.audit_records() if r["operation"] == "rotate.stage"]
    assert [r["outcome"] for r in stages][-2:] == ["pending", "conflict"]


def test_a_stage_built_from_a_version_no_longer_current_is_aborted_and_stages_nothing(
    server: Server,
) -> None:
    """`--server rotate NAME#FIELD` reads the current value (GetSecret), rewrites one field and
    stages it: a PutSecret landing in between was undone by the promote (v3 built from v1). The
    request now names the version it was built from (expect_current): ABORTED, nothing staged,
    and the client raises ConflictError (exit 7). Without it, a stage goes over any current."""
    put = pb.PutSecretRequest(name="db/app", value=b"written-meanwhile")
    assert server.stub("writer").PutSecret(put, timeout=10).version == 2
    request = pb.StageSecretVersionRequest(name="db/app", value=STAGED_VALUE, expect_current=1)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub("rotator").StageSecretVersion(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    details = str(caught.value.details())
    assert "'db/app' changed while the rotation read it (version 1; now version 2)" in details
    assert "nothing was staged" in details and STAGED_VALUE.decode() not in details
    assert labels(server) == {"current": 2, "previous": 1} and versions(server) == [1, 2]
    stages = [r for r in server.audit_records() if r["operation"] == "rotate.stage"]
    assert [r["outcome"] for r in stages][-2:] == ["pending", "conflict"]
    remote = RemoteStore(server.address, tls_files(server.dir, "rotator"))
    try:
        with pytest.raises(ConflictError, match="changed while the rotation read it"):
            remote.stage("db/app", STAGED_VALUE, expect_current=1)
        assert remote.stage("db/app", STAGED_VALUE, expect_current=2).version == 3
    finally:
        remote.close()
    assert labels(server) == {"current": 2, "previous": 1, "pending": 3}


def test_promoting_a_version_no_longer_pending_is_aborted_and_changes_nothing(server: Server) -> None:
    first = stage(server, "rotator").version
    stub = server.stub("rotator")
    stub.DiscardPendingVersion(pb.DiscardPendingVersionRequest(name="db/app"), timeout=10)
    assert stage(server, "rotator", b"someone-else-staged").version == 3
    request = pb.PromoteSecretVersionRequest(name="db/app", version=first)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PromoteSecretVersion(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    assert "not pending (version 3 is)" in str(caught.value.details())
    assert labels(server) == {"current": 1, "pending": 3}
    promotes = [r for r in server.audit_records() if r["operation"] == "rotate.promote"]
    assert [(r["outcome"], r["version"]) for r in promotes][-1] == ("conflict", first)


def test_rotation_errors_map_to_status_codes(server: Server) -> None:
    stub = server.stub("rotator")
    missing = pb.StageSecretVersionRequest(name="db/missing", value=b"x")
    assert code_of(lambda: stub.StageSecretVersion(missing, timeout=10)) is grpc.StatusCode.NOT_FOUND
    nothing_pending = pb.DiscardPendingVersionRequest(name="db/app")
    assert (
        code_of(lambda: stub.DiscardPendingVersion(nothing_pending, timeout=10)) is grpc.StatusCode.NOT_FOUND
    )
    promote = pb.PromoteSecretVersionRequest(name="db/app", version=1)
    assert code_of(lambda: stub.PromoteSecretVersion(promote, timeout=10)) is grpc.StatusCode.ABORTED
    too_big = pb.StageSecretVersionRequest(name="db/app", value=b"x" * (64 * 1024 + 1))
    assert code_of(lambda: stub.StageSecretVersion(too_big, timeout=10)) is grpc.StatusCode.INVALID_ARGUMENT
    bad_name = pb.StageSecretVersionRequest(name="db/../x", value=b"x")
    assert code_of(lambda: stub.StageSecretVersion(bad_name, timeout=10)) is grpc.StatusCode.INVALID_ARGUMENT
    assert labels(server) == {"current": 1} and versions(server) == [1]


def test_an_identity_without_rotate_is_denied_and_nothing_changes(server: Server) -> None:
    stage(server, "rotator")  # a pending version 2 that the writer must not promote or discard
    stub = server.stub("writer")  # read, write and list, but not rotate
    request = pb.StageSecretVersionRequest(name="db/app", value=b"writer-value")
    assert code_of(lambda: stub.StageSecretVersion(request, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    promote = pb.PromoteSecretVersionRequest(name="db/app", version=2)
    assert (
        code_of(lambda: stub.PromoteSecretVersion(promote, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    )
    discard = pb.DiscardPendingVersionRequest(name="db/app")
    assert (
        code_of(lambda: stub.DiscardPendingVersion(discard, timeout=10)) is grpc.StatusCode.PERMISSION_DENIED
    )
    assert labels(server) == {"current": 1, "pending": 2} and versions(server) == [1, 2]
    denied = [r for r in server.audit_records() if r["decision"] == "deny"]
    assert [(r["operation"], r["actor"], r["outcome"]) for r in denied] == [
        (operation, f"spiffe://{TD}/writer", "access_denied")
        for operation in ("rotate.stage", "rotate.promote", "rotate.discard")
    ]

    result = rotate(server, "writer")
    assert result.returncode == 5, result.stderr
    assert "may not rotate 'db/app'" in result.stderr
    assert labels(server) == {"current": 1, "pending": 2} and versions(server) == [1, 2]


def test_a_read_only_identity_cannot_stage_but_reads_the_pending_version(server: Server) -> None:
    assert code_of(lambda: stage(server, "reader")) is grpc.StatusCode.PERMISSION_DENIED
    assert rotate(server, "reader", "--stdin", input=b"from-a-reader").returncode == 5
    assert versions(server) == [1]
    stage(server, "rotator")
    reply = server.stub("reader").GetSecret(pb.GetSecretRequest(name="db/app", label="pending"), timeout=10)
    assert (reply.secret.value, reply.secret.version, list(reply.secret.labels)) == (
        STAGED_VALUE,
        2,
        ["pending"],
    )


def test_each_step_is_audited_with_identity_and_fingerprint_never_the_value(server: Server) -> None:
    stage(server, "rotator")
    server.stub("reader").GetSecret(pb.GetSecretRequest(name="db/app", label="pending"), timeout=10)
    stub = server.stub("rotator")
    stub.PromoteSecretVersion(pb.PromoteSecretVersionRequest(name="db/app", version=2), timeout=10)
    stage(server, "rotator", b"discarded-value-SEEKRIT")
    stub.DiscardPendingVersion(pb.DiscardPendingVersionRequest(name="db/app"), timeout=10)

    records = server.audit_records()
    rotation = [r for r in records if str(r["operation"]).startswith("rotate.")]
    assert [(r["operation"], r["outcome"]) for r in rotation] == [
        ("rotate.stage", "pending"),  # the durable request record, before the change
        ("rotate.stage", "ok"),
        ("rotate.promote", "pending"),
        ("rotate.promote", "ok"),
        ("rotate.stage", "pending"),
        ("rotate.stage", "ok"),
        ("rotate.discard", "pending"),
        ("rotate.discard", "ok"),
    ]
    done = [r for r in rotation if r["outcome"] == "ok"]
    assert all(r["actor"] == ROTATOR and r["source"] == "grpc" and r["name"] == "db/app" for r in done)
    assert [r["version"] for r in done] == [2, 2, 3, 3]
    read = next(r for r in records if r["operation"] == "get" and r["version"] == 2)
    assert str(done[0]["value_hmac"]).startswith("hmac-sha256:")
    assert done[0]["value_hmac"] == read["value_hmac"]  # the staged value is identifiable, not shown
    assert done[2]["value_hmac"] not in (None, read["value_hmac"])
    text = (server.dir / "store.audit.jsonl").read_text()
    log = "".join(server.log_lines)
    for secret in (STAGED_VALUE, b"discarded-value-SEEKRIT", OLD_VALUE):
        assert secret.decode() not in text and secret.decode() not in log


def test_an_older_service_without_the_rotation_rpcs_is_reported_as_unsupported(tmp_path: Path) -> None:
    make_pki(tmp_path, ("ops",))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SecretsServicer_to_server(pb_grpc.SecretsServicer(), grpc_server)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "server-key.pem").read_bytes(), (tmp_path / "server.pem").read_bytes())],
        root_certificates=(tmp_path / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    remote = RemoteStore(f"127.0.0.1:{port}", tls_files(tmp_path, "ops"))
    try:
        with pytest.raises(
            UnsupportedOperationError, match="StageSecretVersion is not supported by the service"
        ):
            remote.stage("db/app", STAGED_VALUE)
    finally:
        remote.close()
        grpc_server.stop(0).wait()


# ---- `secrets-manager rotate --server` ----------------------------------------------------------


def test_cli_rotate_generates_and_promotes_through_the_service(server: Server) -> None:
    result = rotate(server, "rotator", "--length", "20", "--alphabet", "hex")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "rotated db/app: version 2 is current (previous: 1)" in result.stderr
    new = value(server).decode()
    assert len(new) == 20 and set(new) <= set("0123456789abcdef")
    assert value(server, label="previous") == OLD_VALUE
    assert labels(server) == {"current": 2, "previous": 1}
    assert new not in "".join(server.log_lines)


def test_cli_rotate_json_output_and_default_value_through_the_service(server: Server) -> None:
    result = rotate(server, "rotator", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "name": "db/app",
        "version": 2,
        "previous": 1,
        "resumed": False,
        "promoted_elsewhere": False,
        "expires": None,
    }
    new = value(server).decode()
    assert len(new) == 32 and set(new) <= set(string.ascii_letters + string.digits)


def test_cli_rotate_from_stdin_through_the_service(server: Server) -> None:
    result = rotate(server, "rotator", "--stdin", input=STAGED_VALUE + b"\n")
    assert result.returncode == 0, result.stderr
    assert value(server) == STAGED_VALUE
    assert STAGED_VALUE.decode() not in result.stdout + result.stderr


def test_cli_set_and_test_commands_run_here_with_the_value_on_stdin_only(
    server: Server, tmp_path: Path
) -> None:
    set_command, set_seen = recorder(tmp_path, "set")
    test_command, test_seen = recorder(tmp_path, "test")
    result = rotate(server, "rotator", "--set-command", set_command, "--test-command", test_command)
    assert result.returncode == 0, result.stderr
    new = value(server).decode()
    for seen in (set_seen(), test_seen()):
        assert seen["stdin"] == new
        assert seen["argv"][1:] == ["--flag"] and not any(new in arg for arg in seen["argv"])
        assert not any(new in v for v in seen["env"].values())
        assert seen["env"]["SECRETS_MANAGER_ROTATE_NAME"] == "db/app"
        assert seen["env"]["SECRETS_MANAGER_ROTATE_VERSION"] == "2"
    assert "set command says hello" in result.stderr and "test command says hello" in result.stderr
    assert new not in result.stdout and new not in result.stderr
    assert new not in "".join(server.log_lines)
    text = (server.dir / "store.audit.jsonl").read_text()
    assert new not in text
    # The service audits its steps; set and test ran on the client, which has no audit log.
    records = server.audit_records()
    done = [r["operation"] for r in records if r["outcome"] == "ok" and r["actor"] == ROTATOR]
    assert done == ["rotate.stage", "rotate.promote"]
    assert not any(r["operation"] in ("rotate.set", "rotate.test") for r in records)


def test_cli_failing_test_command_leaves_current_and_resume_finishes(server: Server, tmp_path: Path) -> None:
    failing, _ = recorder(tmp_path, "failing", exit_code=5)
    result = rotate(server, "rotator", "--test-command", failing)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "test command failed (exit code 5)" in error
    command = shlex.join(shlex.split(failing))  # as it was split, joined again
    shown = shlex.join(["secrets-manager", "rotate", "db/app", "--resume", "--test-command", command])
    assert f"run the same command again with --resume: {shown} (or discard it" in error
    assert value(server) == OLD_VALUE
    assert labels(server) == {"current": 1, "pending": 2}
    staged = value(server, label="pending").decode()
    assert staged not in result.stdout + result.stderr

    passing, seen = recorder(tmp_path, "passing")
    result = rotate(server, "rotator", "--resume", "--test-command", passing)
    assert result.returncode == 0, result.stderr
    assert seen()["stdin"] == staged
    assert value(server).decode() == staged and labels(server) == {"current": 2, "previous": 1}
    assert "rotated db/app: version 2 is current (previous: 1)" in result.stderr
    resumed = [r for r in server.audit_records() if r["operation"] == "get" and r["actor"] == ROTATOR]
    assert [(r["version"], r["outcome"]) for r in resumed] == [(2, "ok")]


def test_cli_resume_without_commands_of_a_version_recording_no_role_is_refused(
    server: Server, tmp_path: Path
) -> None:
    """Through the service too, a bare --resume would promote a value nothing set at the target
    (this one records no PostgreSQL role: set and test commands staged it); it is refused once the
    pending version is read, nothing else called. --promote-only says the target holds it."""
    assert rotate(server, "rotator", "--set-command", "false").returncode == 1
    refused = rotate(server, "rotator", "--resume")
    assert refused.returncode == 2, refused.stderr
    assert "--resume without --set-command would promote a value nothing has set" in refused.stderr
    assert "version 2 of db/app records no PostgreSQL role" in refused.stderr
    assert labels(server) == {"current": 1, "pending": 2} and value(server) == OLD_VALUE
    calls = [r["operation"] for r in server.audit_records() if r["actor"] == ROTATOR]
    assert "get" in calls and calls[calls.index("get") :] == ["get"]  # the read of the pending value only

    result = rotate(server, "rotator", "--resume", "--promote-only")
    assert result.returncode == 0, result.stderr
    assert labels(server) == {"current": 2, "previous": 1}


def test_cli_discard_through_the_service(server: Server) -> None:
    assert rotate(server, "rotator", "--test-command", "false").returncode == 1
    result = rotate(server, "rotator", "--discard", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"name": "db/app", "discarded": 2}
    assert "discarded the pending version 2 of db/app; current is unchanged" in result.stderr
    assert labels(server) == {"current": 1}
    assert rotate(server, "rotator", "--discard").returncode == 3
    assert rotate(server, "rotator", "--resume", "--promote-only").returncode == 3


def test_cli_exits_7_when_the_staged_version_is_no_longer_pending(server: Server) -> None:
    """Someone discards our pending version and stages another while our test command runs: our
    promote must refuse. The nested rotates reach the same service: the commands inherit
    SECRETS_MANAGER_ADDR. (A nested rotate without the discard is refused: in progress.)"""
    nested = shlex.quote(str(SCRIPT))
    restage = f"{nested} rotate db/app --discard; {nested} rotate db/app --test-command false"
    sneaky = f"sh -c {shlex.quote('cat >/dev/null; ' + restage + '; exit 0')}"
    result = rotate(server, "rotator", "--test-command", sneaky)
    assert result.returncode == 7, result.stderr
    assert "not pending" in result.stderr
    assert value(server) == OLD_VALUE and labels(server) == {"current": 1, "pending": 3}


@pytest.mark.parametrize(
    ("code", "named", "expected"),
    [
        (grpc.StatusCode.ABORTED, "RotationInProgressError", RotationInProgressError),
        (grpc.StatusCode.ABORTED, None, ConflictError),
        (grpc.StatusCode.INVALID_ARGUMENT, "UnsupportedOperationError", UnsupportedOperationError),
        # A class that does not refine the status's own is ignored: the status decides the exit code.
        (grpc.StatusCode.NOT_FOUND, "RotationInProgressError", NotFoundError),
        (grpc.StatusCode.ABORTED, "SystemExit", ConflictError),
    ],
)
def test_a_named_error_class_refines_the_status_and_never_overrides_it(
    code: grpc.StatusCode, named: str | None, expected: type[Exception]
) -> None:
    metadata = [] if named is None else [(ERROR_CLASS_KEY, named)]
    error = error_for(code, "what happened", metadata)
    assert type(error) is expected and str(error) == "what happened"


@pytest.mark.parametrize(
    "error",
    [RotationInProgressError("x"), UnsupportedOperationError("x"), ConflictError("x"), NotFoundError("x")],
)
def test_the_client_raises_the_class_the_service_raised(error: SecretsManagerError) -> None:
    assert type(error_for(status_for(error), "x", error_metadata(error))) is type(error)


def test_rotate_expires_denied_to_a_rotator_without_write_says_the_rotation_stands(server: Server) -> None:
    result = rotate(server, "rotator", "--expires", "90d")
    assert result.returncode == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "rotated db/app: version 2 is current, but its expiry was not recorded" in lines[0]
    assert "metadata db/app --expires 20" in lines[0]
    described = server.stub("ops").DescribeSecret(pb.DescribeSecretRequest(name="db/app"), timeout=10)
    assert described.metadata.current_version == 2  # the rotation stands
    assert not described.metadata.HasField("expires")


# ---- the conditional stage: StageSecretVersionIfCurrent -------------------------------------------

JSON_VALUE = b'{"username": "app", "password": "old-json-password-KNOWN-1"}'


def _pending_of(stub: pb_grpc.SecretsStub, name: str) -> dict[str, int]:
    reply = stub.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10)
    return dict(metadata_from_message(reply.metadata).labels)


def test_a_field_rotation_whose_secret_moved_before_its_stage_is_refused_by_the_conditional_stage(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--server rotate NAME#FIELD` reads version 1, and a store lands before its stage: the stage,
    now StageSecretVersionIfCurrent, is ABORTED (exit 7, one line), nothing is staged, and the
    service audits the refusal under that RPC's operation, rotate.stage."""
    ops = server.stub("ops")
    ops.PutSecret(pb.PutSecretRequest(name="db/json", value=JSON_VALUE), timeout=10)
    stage_method = RemoteStore.stage
    methods: list[str] = []
    call = RemoteStore._call

    def recording_call(self: RemoteStore, method: str, *args: Any, **kwargs: Any) -> Any:
        methods.append(method)
        return call(self, method, *args, **kwargs)

    def stage_after_another_store(self: RemoteStore, name: str, value: bytes, **kwargs: Any) -> Any:
        put = pb.PutSecretRequest(name=name, value=b'{"password": "written-meanwhile"}')
        assert server.stub("writer").PutSecret(put, timeout=10).version == 2
        return stage_method(self, name, value, **kwargs)

    monkeypatch.setattr(RemoteStore, "stage", stage_after_another_store)
    monkeypatch.setattr(RemoteStore, "_call", recording_call)
    capsys.readouterr()
    args = ("rotate", "db/json#password", "--stdin", "--set-command", "true")
    code = cli_in_process(
        monkeypatch, server.dir, server.address, "rotator", *args, stdin=b"new-SEEKRIT-password\n"
    )
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert code == 7, message
    assert (
        message.count("\n") == 1
        and "changed while the rotation read it (version 1; now version 2)" in message
    )
    assert "SEEKRIT" not in message
    assert "StageSecretVersionIfCurrent" in methods and "StageSecretVersion" not in methods
    assert _pending_of(ops, "db/json") == {"current": 2, "previous": 1}  # nothing staged
    refused = [
        r for r in server.audit_records() if r["operation"] == "rotate.stage" and r["outcome"] != "pending"
    ]
    assert [(r["name"], r["outcome"]) for r in refused] == [("db/json", "conflict")]


def test_stage_secret_version_if_current_stages_only_over_the_version_named(server: Server) -> None:
    stub = server.stub("rotator")
    moved = pb.StageSecretVersionIfCurrentRequest(name="db/app", value=STAGED_VALUE, expect_current=2)
    assert code_of(lambda: stub.StageSecretVersionIfCurrent(moved, timeout=10)) is grpc.StatusCode.ABORTED
    zero = pb.StageSecretVersionIfCurrentRequest(name="db/app", value=STAGED_VALUE)
    assert (
        code_of(lambda: stub.StageSecretVersionIfCurrent(zero, timeout=10))
        is grpc.StatusCode.INVALID_ARGUMENT
    )
    reader = pb.StageSecretVersionIfCurrentRequest(name="db/app", value=STAGED_VALUE, expect_current=1)
    denied = code_of(lambda: server.stub("reader").StageSecretVersionIfCurrent(reader, timeout=10))
    assert denied is grpc.StatusCode.PERMISSION_DENIED  # it needs rotate, as StageSecretVersion
    assert labels(server) == {"current": 1}
    staged = stub.StageSecretVersionIfCurrent(reader, timeout=10)
    assert (staged.name, staged.version) == ("db/app", 2)
    assert labels(server) == {"current": 1, "pending": 2}


def test_a_service_from_before_the_conditional_stage_is_refused_the_stage_not_asked_an_unconditional_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older `serve` ignores StageSecretVersionRequest's expect_current (it came later) and
    stages over whatever is current, and has no StageSecretVersionIfCurrent (UNIMPLEMENTED). A field
    rotation through it (which must stage only over the version it read) and the SDK's conditional
    stage are refused (exit 2; UnsupportedOperationError), with nothing staged."""
    from secrets_manager.crypto import kdf
    from secrets_manager.service.server import SecretsServicer
    from secrets_manager.storage.sqlite import SqliteStorage
    from secrets_manager.store import EncryptedStore, PasswordUnlock
    from service_fixtures import PASSWORD, in_process_server

    make_pki(tmp_path, CLIENTS)
    make_store(tmp_path, {"db/json": JSON_VALUE}, POLICY)
    newer = SecretsServicer.StageSecretVersion

    def ignoring_expect_current(self: SecretsServicer, request: Any, context: grpc.ServicerContext) -> Any:
        older = pb.StageSecretVersionRequest(name=request.name, value=request.value)  # field unknown to it
        return newer(self, older, context)

    monkeypatch.setattr(SecretsServicer, "StageSecretVersion", ignoring_expect_current)
    generated = pb_grpc.SecretsServicer.StageSecretVersionIfCurrent  # the generated UNIMPLEMENTED answer
    monkeypatch.setattr(SecretsServicer, "StageSecretVersionIfCurrent", generated)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, stub):
            address = f"127.0.0.1:{running.port}"
            capsys.readouterr()
            args = ("rotate", "db/json#password", "--stdin", "--set-command", "true")
            code = cli_in_process(monkeypatch, tmp_path, address, "rotator", *args, stdin=b"new-SEEKRIT\n")
            message = capsys.readouterr().err
            assert code == 2, message
            assert message.count("\n") == 1 and "nothing was staged for db/json" in message, message
            assert "StageSecretVersionIfCurrent is not supported by the service" in message, message
            assert "SEEKRIT" not in message
            remote = RemoteStore(address, tls_files(tmp_path, "rotator"))
            try:
                with pytest.raises(UnsupportedOperationError, match="nothing was staged for db/json"):
                    remote.stage("db/json", b"sdk-SEEKRIT", expect_current=1)
            finally:
                remote.close()
            assert _pending_of(stub("ops"), "db/json") == {"current": 1}
    finally:
        store.close()


# ---- the conditional metadata change: UpdateSecretMetadataIfCurrent ------------------------------

EXPIRY = "2032-01-02T03:04:05+00:00"


def test_schedule_run_through_a_service_from_before_the_conditional_stage_still_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`schedule run --server` stages only while the version it found due is current (nothing is
    read through a service, so that is its only condition). A service from before
    StageSecretVersionIfCurrent cannot take it: the run asked such a service for a plain stage
    before, and still does, saying the check was not made, rather than failing every entry."""
    import time

    from secrets_manager.crypto import kdf
    from secrets_manager.service.server import SecretsServicer
    from secrets_manager.storage.sqlite import SqliteStorage
    from secrets_manager.store import EncryptedStore, PasswordUnlock
    from service_fixtures import PASSWORD, in_process_server

    make_pki(tmp_path, CLIENTS)
    make_store(tmp_path, {"db/app": b"first-app-value"}, POLICY)
    generated = pb_grpc.SecretsServicer.StageSecretVersionIfCurrent  # the generated UNIMPLEMENTED answer
    monkeypatch.setattr(SecretsServicer, "StageSecretVersionIfCurrent", generated)
    schedule = tmp_path / "rotation.toml"
    schedule.write_text('[[rotation]]\nname = "db/app"\nevery = "1s"\n')  # no command to run
    time.sleep(1.1)  # version 1 is due
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, stub):
            address = f"127.0.0.1:{running.port}"
            capsys.readouterr()
            code = cli_in_process(monkeypatch, tmp_path, address, "ops", "schedule", "run", str(schedule))
            message = capsys.readouterr().err
            assert code == 0, message
            assert "the service cannot stage on condition" in message, message
            assert "rotated db/app: version 2 is current (previous: 1)" in message, message
            assert _pending_of(stub("ops"), "db/app") == {"current": 2, "previous": 1}
    finally:
        store.close()


def _expiry_of(stub: pb_grpc.SecretsStub, name: str = "db/app") -> tuple[int, str | None]:
    reply = stub.DescribeSecret(pb.DescribeSecretRequest(name=name), timeout=10)
    meta = reply.metadata
    return meta.current_version, (meta.expires if meta.HasField("expires") else None)


def test_rotate_expires_through_the_service_leaves_a_version_stored_after_its_promote_alone(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--server rotate --expires` promotes version 2, and another client's store (version 3) lands
    before the expiry is recorded: the expiry, now UpdateSecretMetadataIfCurrent held to version 2,
    is ABORTED in the service's store commit (exit 7, one line); version 3 keeps no expiry (the old
    client sent the expiry unconditionally, and it landed on version 3)."""
    ops = server.stub("ops")
    update = RemoteStore.update_metadata

    def update_after_another_store(self: RemoteStore, name: str, **kwargs: Any) -> Any:
        put = pb.PutSecretRequest(name=name, value=b"written-meanwhile-SEEKRIT")
        assert server.stub("writer").PutSecret(put, timeout=10).version == 3
        return update(self, name, **kwargs)

    monkeypatch.setattr(RemoteStore, "update_metadata", update_after_another_store)
    capsys.readouterr()
    args = ("rotate", "db/app", "--stdin", "--expires", "2032-01-02T03:04:05Z")
    code = cli_in_process(monkeypatch, server.dir, server.address, "ops", *args, stdin=b"new-SEEKRIT\n")
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert code == 7, message
    assert message.count("\n") == 1, message
    assert "rotated db/app to version 2, but another version was stored after it" in message
    assert "SEEKRIT" not in message
    assert _expiry_of(ops) == (3, None)  # the newer version has none of the rotation's
    refused = [
        r for r in server.audit_records() if r["operation"] == "metadata" and r["outcome"] != "pending"
    ]
    assert [(r["name"], r.get("version"), r["outcome"]) for r in refused] == [("db/app", 2, "conflict")]


def test_the_sdk_metadata_change_held_to_a_version_is_decided_in_the_services_commit(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RemoteStore.update_metadata(expect_current=1) with a store landing just before its RPC
    reaches the service (after any check the client could make): ConflictError, nothing changed.
    The old client checked with a DescribeSecret first, and its unconditional update then gave
    version 2 the expiry meant for version 1."""
    from datetime import datetime

    call = RemoteStore._call
    methods: list[str] = []

    def store_lands_first(self: RemoteStore, method: str, *args: Any, **kwargs: Any) -> Any:
        methods.append(method)
        if method.startswith("UpdateSecretMetadata"):
            put = pb.PutSecretRequest(name="db/app", value=b"written-meanwhile")
            assert server.stub("writer").PutSecret(put, timeout=10).version == 2
        return call(self, method, *args, **kwargs)

    monkeypatch.setattr(RemoteStore, "_call", store_lands_first)
    remote = RemoteStore(server.address, tls_files(server.dir, "writer"))
    try:
        with pytest.raises(ConflictError, match="is not at version 1 \\(now version 2\\)"):
            remote.update_metadata("db/app", expires=datetime.fromisoformat(EXPIRY), expect_current=1)
    finally:
        remote.close()
        monkeypatch.undo()
    assert methods == ["UpdateSecretMetadataIfCurrent"]  # no describe: `write` is enough
    assert _expiry_of(server.stub("ops")) == (2, None)


def test_update_secret_metadata_if_current_changes_only_the_version_named(server: Server) -> None:
    stub = server.stub("writer")
    moved = pb.UpdateSecretMetadataIfCurrentRequest(name="db/app", expires=EXPIRY, expect_current=2)
    assert code_of(lambda: stub.UpdateSecretMetadataIfCurrent(moved, timeout=10)) is grpc.StatusCode.ABORTED
    zero = pb.UpdateSecretMetadataIfCurrentRequest(name="db/app", expires=EXPIRY)
    assert (
        code_of(lambda: stub.UpdateSecretMetadataIfCurrent(zero, timeout=10))
        is grpc.StatusCode.INVALID_ARGUMENT
    )
    held = pb.UpdateSecretMetadataIfCurrentRequest(name="db/app", expires=EXPIRY, expect_current=1)
    denied = code_of(lambda: server.stub("rotator").UpdateSecretMetadataIfCurrent(held, timeout=10))
    assert denied is grpc.StatusCode.PERMISSION_DENIED  # it needs write, as UpdateSecretMetadata
    assert _expiry_of(server.stub("ops")) == (1, None)
    assert stub.UpdateSecretMetadataIfCurrent(held, timeout=10).expires == "2032-01-02T03:04:05+00:00"
    assert _expiry_of(server.stub("ops")) == (1, "2032-01-02T03:04:05+00:00")
    records = [
        r for r in server.audit_records() if r["operation"] == "metadata" and r["outcome"] != "pending"
    ]
    assert [(r.get("version"), r["outcome"]) for r in records] == [
        (2, "conflict"),
        (None, "invalid_input"),
        (None, "access_denied"),  # refused before the request was read
        (1, "ok"),
    ]


def test_a_service_from_before_the_conditional_metadata_change_is_refused_it_not_asked_an_unconditional_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older `serve` has no UpdateSecretMetadataIfCurrent (UNIMPLEMENTED). `rotate --expires`
    through it rotates (the rotation stands) but does not record the expiry on whatever version is
    current: exit 2, one line; the SDK's conditional change raises UnsupportedOperationError."""
    from datetime import datetime

    from secrets_manager.crypto import kdf
    from secrets_manager.service.server import SecretsServicer
    from secrets_manager.storage.sqlite import SqliteStorage
    from secrets_manager.store import EncryptedStore, PasswordUnlock
    from service_fixtures import PASSWORD, in_process_server

    make_pki(tmp_path, CLIENTS)
    make_store(tmp_path, SEED, POLICY)
    generated = pb_grpc.SecretsServicer.UpdateSecretMetadataIfCurrent  # the generated UNIMPLEMENTED answer
    monkeypatch.setattr(SecretsServicer, "UpdateSecretMetadataIfCurrent", generated)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        with in_process_server(tmp_path, store, watch_tick=30) as (running, stub):
            address = f"127.0.0.1:{running.port}"
            capsys.readouterr()
            args = ("rotate", "db/app", "--stdin", "--expires", "2032-01-02T03:04:05Z")
            code = cli_in_process(monkeypatch, tmp_path, address, "ops", *args, stdin=b"new-SEEKRIT\n")
            message = capsys.readouterr().err
            assert code == 2, message
            assert message.count("\n") == 1, message
            assert "rotated db/app: version 2 is current, but its expiry was not recorded" in message
            assert "UpdateSecretMetadataIfCurrent is not supported by the service" in message
            assert "SEEKRIT" not in message
            remote = RemoteStore(address, tls_files(tmp_path, "writer"))
            try:
                with pytest.raises(UnsupportedOperationError, match="the metadata of db/app was not changed"):
                    remote.update_metadata("db/app", expires=datetime.fromisoformat(EXPIRY), expect_current=2)
                remote.update_metadata("db/app", description="still unconditional")  # the old RPC
            finally:
                remote.close()
            assert _expiry_of(stub("ops")) == (2, None)
    finally:
        store.close()
