"""Every place the service applies the policy agrees with the decision function, through a real
`serve` (real mutual TLS, a real SQLite store), for generated policies.

One server runs for the module; each generated policy (tests/test_policy_model.py's generators,
over the identities the certificates below present) is written and put in force by SIGHUP. Then,
for each client certificate (SPIFFE IDs auth and ops, a CN-only `svc-cn`, and market-connector,
which no policy names) and each name (stored ones, missing ones, invalid ones):

- GetSecret, BatchGetSecrets by names, DescribeSecret, PutSecret, UpdateSecretMetadata(IfCurrent),
  DeleteSecret(+Undelete), DeleteSecretIfCurrent/IfUnchanged, StageSecretVersion(IfCurrent),
  PromoteSecretVersion, DiscardPendingVersion and RotateSecret are PERMISSION_DENIED exactly when
  `Policy.allows` denies the RPC's capability (README's table), and an invalid name is
  INVALID_ARGUMENT whatever the policy (names are validated before it). Writes are made so that
  an allowed one changes nothing lasting (a version that is not current, an undelete after the
  delete);
- ListSecrets (paged, 2 a page) shows exactly the stored names it may `list`; BatchGetSecrets by
  prefix "" (paged) and Watch (replayed from revision 0) exactly those `enumerable_by_read`;
- `policy explain --json` (the CLI, in this process) says the same per capability and `shown`;
- a ListSecrets page token issued under the previous policy, sent under the new one, gives only
  names the new policy lets it list (or PERMISSION_DENIED once it holds no role).

The decision function is itself checked against the reference in test_policy_model.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import signal
import subprocess
import threading
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secrets_manager.access import Policy
from secrets_manager.cli import run
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.v1 import secrets_pb2 as pb
from service_fixtures import (
    PASSWORD,
    SCRIPT,
    TD,
    Server,
    eventually,
    make_odd_client,
    make_pki,
    make_store,
    start_server,
)
from test_policy_model import PolicyModel, RoleModel, rules

AUTH = f"spiffe://{TD}/auth"
OPS = f"spiffe://{TD}/ops"
CLIENTS = {
    "auth": AUTH,
    "ops": OPS,
    "svc-cn": "svc-cn",
    "market-connector": f"spiffe://{TD}/market-connector",
}
# In the policies: three the certificates present, and a look-alike none does.
POLICY_IDENTITIES = [AUTH, OPS, "svc-cn", f"spiffe://{TD}/Auth"]
HERE = ipaddress.ip_address("127.0.0.1")  # where the test's calls come from

STORED = [
    "auth/KEY",
    "auth/API_KEY",
    "auth/a/KEY",
    "auth-admin/KEY",
    "authz/KEY",
    "AUTH/KEY",
    "Auth/KEY",
    "KEY",
    "a/b",
    "x.y/k-1",
]
MISSING = ["auth/missing", "auth-admin/missing"]
NFD_E = unicodedata.normalize("NFD", "\u00e9")
INVALID = [
    "auth/../auth-admin/KEY",
    "auth/KEY/",
    "auth//KEY",
    "auth/%2e%2e/KEY",
    "\u0430uth/KEY",
    f"auth/caf{NFD_E}",
    "auth/*",
    "auth/KEY\x00",
    "auth/" + "A" * 260,
]

E2E = settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def served_policies(draw: st.DrawFn) -> PolicyModel:
    role_names = [f"r{i}" for i in range(draw(st.integers(1, 3)))]
    roles = {
        name: RoleModel(
            tuple(draw(st.lists(rules(tuple(STORED)), min_size=1, max_size=4))),
            draw(st.sampled_from([(), (), (), ("127.0.0.0/8",), ("10.0.1.0/24",)])),
        )
        for name in role_names
    }
    identities = {
        who: tuple(draw(st.lists(st.sampled_from(role_names), min_size=1, max_size=3, unique=True)))
        for who in POLICY_IDENTITIES
        if draw(st.integers(0, 3))
    }
    return PolicyModel(roles, identities)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("policy-serve")
    make_pki(directory, ("auth", "ops", "market-connector"))
    make_odd_client(directory, "svc-cn", cn="svc-cn")
    make_store(directory, {name: f"value of {name}".encode() for name in STORED})
    server = start_server(directory, settings="[limits]\nrequests_per_second = 0\n")
    stubs = {client: server.stub(client) for client in CLIENTS}
    try:
        yield server, stubs
    finally:
        server.stop()


def _code(call: Callable[..., Any], *args: Any) -> grpc.StatusCode:
    try:
        call(*args)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _put_in_force(server: Server, text: str) -> Policy:
    path = server.dir / "policy.toml"
    path.write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if not any(digest in line for line in server.log_lines):
        seen = len(server.log_lines)
        server.process.send_signal(signal.SIGHUP)
        assert eventually(
            lambda: any(digest in line and "policy.reloaded" in line for line in server.log_lines[seen:])
        ), server.log_lines[seen:]
    return Policy.parse(text)


def _rpcs(stub: Any, name: str) -> list[tuple[str, str, Callable[[], Any]]]:
    """(method, capability, call) for every RPC that names one secret; an allowed call changes
    nothing lasting (conditions that do not hold, an undelete after the delete)."""
    far = 10_000
    return [
        ("GetSecret", "read", lambda: stub.GetSecret(pb.GetSecretRequest(name=name))),
        ("BatchGetSecrets", "read", lambda: stub.BatchGetSecrets(pb.BatchGetSecretsRequest(names=[name]))),
        ("DescribeSecret", "list", lambda: stub.DescribeSecret(pb.DescribeSecretRequest(name=name))),
        (
            "PutSecret",
            "write",
            lambda: stub.PutSecret(pb.PutSecretRequest(name=name, value=b"v", expect_version=far)),
        ),
        (
            "UpdateSecretMetadata",
            "write",
            lambda: stub.UpdateSecretMetadata(pb.UpdateSecretMetadataRequest(name=name)),
        ),
        (
            "UpdateSecretMetadataIfCurrent",
            "write",
            lambda: stub.UpdateSecretMetadataIfCurrent(
                pb.UpdateSecretMetadataIfCurrentRequest(name=name, expect_current=far, description="d")
            ),
        ),
        (
            "DeleteSecretIfCurrent",
            "delete",
            lambda: stub.DeleteSecretIfCurrent(
                pb.DeleteSecretIfCurrentRequest(name=name, expect_version=far)
            ),
        ),
        (
            "DeleteSecretIfUnchanged",
            "delete",
            lambda: stub.DeleteSecretIfUnchanged(
                pb.DeleteSecretIfUnchangedRequest(name=name, expect_version=far)
            ),
        ),
        ("DeleteSecret", "delete", lambda: stub.DeleteSecret(pb.DeleteSecretRequest(name=name))),
        ("UndeleteSecret", "delete", lambda: stub.UndeleteSecret(pb.UndeleteSecretRequest(name=name))),
        (
            "StageSecretVersion",
            "rotate",
            lambda: stub.StageSecretVersion(
                pb.StageSecretVersionRequest(name=name, value=b"v", expect_current=far)
            ),
        ),
        (
            "StageSecretVersionIfCurrent",
            "rotate",
            lambda: stub.StageSecretVersionIfCurrent(
                pb.StageSecretVersionIfCurrentRequest(name=name, value=b"v", expect_current=far)
            ),
        ),
        (
            "PromoteSecretVersion",
            "rotate",
            lambda: stub.PromoteSecretVersion(pb.PromoteSecretVersionRequest(name=name, version=far)),
        ),
        (
            "DiscardPendingVersion",
            "rotate",
            lambda: stub.DiscardPendingVersion(pb.DiscardPendingVersionRequest(name=name)),
        ),
        ("RotateSecret", "rotate", lambda: stub.RotateSecret(pb.RotateSecretRequest(name=name))),
    ]


def _listed(stub: Any, token: str = "") -> list[str]:
    names: list[str] = []
    while True:
        page = stub.ListSecrets(pb.ListSecretsRequest(page_size=2, page_token=token))
        names += [meta.name for meta in page.secrets]
        token = page.next_page_token
        if not token:
            return names


def _batch_all(stub: Any) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page = stub.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix="", page_size=2, page_token=token))
        names += [secret.name for secret in page.secrets]
        token = page.next_page_token
        if not token:
            return names


def _watched(stub: Any, expected: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """The names of the changes a Watch from revision 0 replays: read until `expected` came, then
    for a moment more, so a name it should not show, replayed in the same batch, is seen too."""
    names: set[str] = set()
    stream = stub.Watch(pb.WatchRequest(prefix="", since_revision=0), timeout=20)
    timer = None
    try:
        if not expected:
            timer = threading.Timer(0.5, stream.cancel)
            timer.start()
        for event in stream:
            if event.name:
                names.add(event.name)
            if timer is None and names >= expected:
                timer = threading.Timer(0.3, stream.cancel)
                timer.start()
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.CANCELLED:
            raise
    finally:
        if timer is not None:
            timer.cancel()
    return names


def _explained(
    policy_file: Path, identity: str, name: str, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    assert run(["policy", "explain", str(policy_file), identity, name, "--from", str(HERE), "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


FIVE = ("read", "list", "write", "delete", "rotate")
REFUSALS_NOT_EXPECTED = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAUTHENTICATED,
)


def _check_named_calls(model: PolicyModel, stub: Any, client: str, identity: str) -> None:
    """Every RPC that names a secret, for every name: PERMISSION_DENIED exactly when the model
    denies its capability; an invalid name INVALID_ARGUMENT; a batch of names denied if one is."""
    for name in STORED + MISSING:
        allowed = {c: model.allows(identity, c, name, HERE) for c in FIVE}
        for method, capability, call in _rpcs(stub, name):
            code = _code(call)
            context = (client, method, name, code, model.toml())
            if allowed[capability]:
                assert code not in REFUSALS_NOT_EXPECTED, context
            else:
                assert code is grpc.StatusCode.PERMISSION_DENIED, context
    for name in INVALID:  # refused before the policy is asked, whatever it says
        for method, _, call in _rpcs(stub, name)[:4]:
            assert _code(call) is grpc.StatusCode.INVALID_ARGUMENT, (client, method, repr(name))
    every = _code(stub.BatchGetSecrets, pb.BatchGetSecretsRequest(names=STORED))
    if all(model.allows(identity, "read", n, HERE) for n in STORED):
        assert every is grpc.StatusCode.OK, (client, every)
    else:
        assert every is grpc.StatusCode.PERMISSION_DENIED, (client, every)


@E2E
@given(st.lists(served_policies(), min_size=2, max_size=2))
def test_every_rpc_list_batch_get_watch_and_explain_agree_with_the_decision_function(
    served: tuple[Server, dict[str, Any]], capsys: pytest.CaptureFixture[str], models: list[PolicyModel]
) -> None:
    server, stubs = served
    earlier_tokens: dict[str, str] = {}
    for model in models:
        policy = _put_in_force(server, model.toml())
        for client, identity in CLIENTS.items():
            stub = stubs[client]
            held = bool(policy.roles_of(identity, HERE))
            assert held is model.holds_a_role(identity, HERE)

            # A page token from the previous policy: only what this one lets it list.
            if client in earlier_tokens:
                if held:
                    rest = _listed(stub, earlier_tokens[client])
                    assert all(policy.allows(identity, "list", name, HERE) for name in rest), (
                        model.toml(),
                        rest,
                    )
                else:
                    assert _code(_listed, stub, earlier_tokens[client]) is grpc.StatusCode.PERMISSION_DENIED

            if not held:  # refused every call, the enumerations included
                for enumeration in (_listed, _batch_all, _watched):
                    assert _code(enumeration, stub) is grpc.StatusCode.PERMISSION_DENIED, (
                        client,
                        model.toml(),
                    )
            else:
                listed = _listed(stub)
                assert listed == sorted(n for n in STORED if policy.allows(identity, "list", n, HERE)), client
                assert listed == sorted(n for n in STORED if model.allows(identity, "list", n, HERE)), client
                shown = sorted(n for n in STORED if model.enumerable_by_read(identity, n, HERE))
                assert sorted(_batch_all(stub)) == shown, (client, model.toml())
                assert sorted(_watched(stub, set(shown))) == shown, (client, model.toml())
                first = stub.ListSecrets(pb.ListSecretsRequest(page_size=1))
                earlier_tokens[client] = first.next_page_token

        # The named calls of the four clients at once (the enumerations above are done: a
        # delete and its undelete may now overlap another client's reads, which accept NOT_FOUND).
        with ThreadPoolExecutor(len(CLIENTS)) as pool:
            for done in [pool.submit(_check_named_calls, model, stubs[c], c, i) for c, i in CLIENTS.items()]:
                done.result()
        for identity in CLIENTS.values():
            held = model.holds_a_role(identity, HERE)
            for name in (STORED[0], STORED[3], MISSING[0]) if held else (STORED[0],):
                allowed = {c: model.allows(identity, c, name, HERE) for c in FIVE}
                said = _explained(server.dir / "policy.toml", identity, name, capsys)
                assert {c: d["allowed"] for c, d in said["decisions"].items() if c != "admin"} == allowed
                assert said["shown"] == {
                    "list": allowed["list"],
                    "batch_get_and_watch": model.enumerable_by_read(identity, name, HERE),
                }
    # Nothing an allowed call did lasted: every stored name is there, not deleted, at version 1.
    store = EncryptedStore.open(SqliteStorage(server.dir / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        assert {(meta.name, meta.current_version) for meta in store.list("")} == {(n, 1) for n in STORED}
    finally:
        store.close()


def test_a_page_token_serves_no_other_identity_and_no_name_a_reloaded_policy_denies(
    served: tuple[Server, dict[str, Any]],
) -> None:
    """A ListSecrets or BatchGetSecrets page token of auth's, sent by ops (who may list and read
    everything), is refused: it cannot continue another's listing. Sent by auth after a reload
    that denies it `list` on every name (a grant of `list` on auth/a/** beside the deny does not
    outweigh it), the rest of its listing and of its batch read by prefix is empty; after a reload
    that takes its last role, PERMISSION_DENIED. The installed `secrets-manager policy explain`
    says the same of auth/KEY."""
    server, stubs = served
    grant = f"""[identities]
"{AUTH}" = ["reader"]
"{OPS}" = ["admin"]
[roles.reader]
rules = [{{ path = "**", capabilities = ["read", "list"] }}]
[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]
"""
    _put_in_force(server, grant)
    auth, ops = stubs["auth"], stubs["ops"]
    listing = auth.ListSecrets(pb.ListSecretsRequest(page_size=2))
    batch = auth.BatchGetSecrets(pb.BatchGetSecretsRequest(prefix="", page_size=2))
    assert [m.name for m in listing.secrets] == sorted(STORED)[:2] and listing.next_page_token
    for call, request in (
        (ops.ListSecrets, pb.ListSecretsRequest(page_size=2, page_token=listing.next_page_token)),
        (
            ops.BatchGetSecrets,
            pb.BatchGetSecretsRequest(prefix="", page_size=2, page_token=batch.next_page_token),
        ),
    ):
        assert _code(call, request) is grpc.StatusCode.INVALID_ARGUMENT
    narrowed = grant.replace(
        'rules = [{ path = "**", capabilities = ["read", "list"] }]',
        'rules = [{ path = "**", capabilities = ["read", "list"] }, { path = "**", deny = ["list"] },'
        ' { path = "auth/a/**", capabilities = ["list"] }]',
    )
    assert narrowed != grant
    _put_in_force(server, narrowed)
    assert _listed(auth, listing.next_page_token) == []  # the deny wins over the later grant too
    rest = auth.BatchGetSecrets(
        pb.BatchGetSecretsRequest(prefix="", page_size=100, page_token=batch.next_page_token)
    )
    assert [s.name for s in rest.secrets] == []  # list denied: not enumerable by read either
    proc = subprocess.run(
        [str(SCRIPT), "policy", "explain", str(server.dir / "policy.toml"), AUTH, "auth/KEY", "--json"],
        capture_output=True,
        timeout=60,
    )
    said = json.loads(proc.stdout)
    assert said["decisions"]["read"]["allowed"] is True and said["decisions"]["list"]["allowed"] is False
    assert said["shown"] == {"list": False, "batch_get_and_watch": False}
    _put_in_force(server, grant.replace(f'"{AUTH}" = ["reader"]\n', ""))
    assert _code(_listed, auth, listing.next_page_token) is grpc.StatusCode.PERMISSION_DENIED
