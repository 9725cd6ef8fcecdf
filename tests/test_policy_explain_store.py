"""`secrets-manager policy explain POLICY (IDENTITY | --cert PEM)` without NAME: every secret of the
store an identity may reach, with the role and rule granting each capability, on every kind of
store, and checked against what a real `serve` lets that identity's certificate do."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from secrets_manager.client import RemoteStore
from secrets_manager.crypto import kdf
from secrets_manager.errors import AccessDeniedError, NotFoundError
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock
from secrets_manager.tls import pki
from service_fixtures import PASSWORD, TD, make_pki, make_store, run_script, start_server, tls_files

AUTH = f"spiffe://{TD}/auth"
MC = f"spiffe://{TD}/market-connector"
POLICY = f"""
[identities]
"{AUTH}" = ["auth-reader"]
"{MC}" = ["mc-reader", "janitor"]
"spiffe://{TD}/ops" = ["admin"]
"spiffe://{TD}/writer" = ["writer"]
"spiffe://{TD}/nobody" = []

[roles.auth-reader]
rules = [
  {{ path = "auth/*", capabilities = ["read", "list"] }},
  {{ path = "auth/admin-*", deny = ["read"] }},
  {{ path = "auth/hidden-*", deny = ["list"] }},
]

[roles.mc-reader]
rules = [{{ path = "market-connector/*", capabilities = ["read"] }}]

[roles.janitor]
rules = [
  {{ path = "shared/**", capabilities = ["delete", "list"] }},
  {{ path = "shared/keys/*", capabilities = ["read"] }},
]

[roles.writer]
rules = [{{ path = "auth/**", capabilities = ["write"] }}]

[roles.admin]
rules = [{{ path = "**", capabilities = ["admin"] }}]
"""
SEED = {
    "auth/DB_PASSWORD": b"db-SEEKRIT",
    "auth/admin-token": b"admin-SEEKRIT",
    "auth/hidden-key": b"hidden-SEEKRIT",
    "market-connector/BINANCE_API_KEY": b"binance-SEEKRIT",
    "market-connector/BINANCE_SECRET": b"binance-secret-SEEKRIT",
    "shared/keys/SIGNING": b"signing-SEEKRIT",
    "shared/notes": b"notes-SEEKRIT",
    "other/X": b"x-SEEKRIT",
}
DELETED = "market-connector/BINANCE_SECRET"
# What market-connector holds, as the table prints it in a pipe: NAME, STATE, CAPABILITIES, GRANTED BY.
MC_ROWS = [
    ["market-connector/BINANCE_API_KEY", "active", "read", "read: role mc-reader rule 'market-connector/*'"],
    ["market-connector/BINANCE_SECRET", "deleted", "read", "read: role mc-reader rule 'market-connector/*'"],
    [
        "shared/keys/SIGNING",
        "active",
        "read, list, delete",
        "read: role janitor rule 'shared/keys/*'; list, delete: role janitor rule 'shared/**'",
    ],
    ["shared/notes", "active", "list, delete", "list, delete: role janitor rule 'shared/**'"],
]
REGION = "us-east-1"


def rows(out: bytes) -> list[list[str]]:
    return [line.split("\t") for line in out.decode().splitlines()]


def explain(environ: Mapping[str, str], policy: Path, *args: str) -> Any:
    """`policy explain POLICY ARGS… --json`, its document (exit 0 required)."""
    proc = run_script(environ, "policy", "explain", str(policy), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def local(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A SQLite store holding SEED (DELETED deleted), the policy beside it, and the environment."""
    make_store(tmp_path, SEED, POLICY)
    store = EncryptedStore.open(SqliteStorage(tmp_path / "store.db"), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        store.delete(DELETED)
    finally:
        store.close()
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": str(tmp_path / "store.db"),
        "MASTER_PASSWORD": PASSWORD,
    }
    return environ, tmp_path / "policy.toml"


def test_every_secret_an_identity_reaches_is_listed_with_the_rules_granting_it(
    local: tuple[dict[str, str], Path],
) -> None:
    environ, policy = local
    proc = run_script(environ, "policy", "explain", str(policy), MC)
    assert proc.returncode == 0, proc.stderr
    assert rows(proc.stdout) == MC_ROWS
    assert proc.stderr.decode().splitlines() == [
        f"secrets-manager: {MC} (mc-reader, janitor) holds a capability on 4 of the 8 secrets in the "
        "store (deleted ones serve nothing until undeleted)"
    ]
    assert b"SEEKRIT" not in proc.stdout + proc.stderr


def test_capability_read_keeps_the_secrets_it_may_read_and_json_says_why_and_where_shown(
    local: tuple[dict[str, str], Path],
) -> None:
    environ, policy = local
    proc = run_script(environ, "policy", "explain", str(policy), MC, "--capability", "read")
    assert proc.returncode == 0, proc.stderr
    assert [row[0] for row in rows(proc.stdout)] == [
        "market-connector/BINANCE_API_KEY",
        DELETED,
        "shared/keys/SIGNING",
    ]
    assert all(row[2] == "read" for row in rows(proc.stdout))
    doc = explain(environ, policy, AUTH, "--capability", "read")
    assert (doc["identity"], doc["roles"], doc["capability"]) == (AUTH, ["auth-reader"], "read")
    assert doc["secrets_in_store"] == 8 and doc["certificate"] is None
    # auth/admin-token: read denied by a rule. auth/hidden-key: read, but a deny of list keeps it
    # out of every listing (a read by name still works).
    assert doc["secrets"] == [
        {
            "name": "auth/DB_PASSWORD",
            "deleted": None,
            "capabilities": {
                "read": {
                    "reason": "allowed by role auth-reader rule 'auth/*'",
                    "role": "auth-reader",
                    "rule": "auth/*",
                }
            },
            "shown": {"list": True, "batch_get_and_watch": True},
        },
        {
            "name": "auth/hidden-key",
            "deleted": None,
            "capabilities": {
                "read": {
                    "reason": "allowed by role auth-reader rule 'auth/*'",
                    "role": "auth-reader",
                    "rule": "auth/*",
                }
            },
            "shown": {"list": False, "batch_get_and_watch": False},
        },
    ]
    deleted = explain(environ, policy, MC)["secrets"][1]
    listed = json.loads(run_script(environ, "list", "--deleted", "--json").stdout)
    assert deleted["name"] == DELETED and deleted["deleted"] is not None
    assert deleted["deleted"] == next(meta["deleted"] for meta in listed if meta["name"] == DELETED)


def test_from_an_address_leaves_out_what_roles_bound_elsewhere_grant(
    local: tuple[dict[str, str], Path],
) -> None:
    environ, policy = local
    policy.write_text(
        POLICY.replace("[roles.mc-reader]\n", '[roles.mc-reader]\nbound_cidrs = ["10.0.1.0/24"]\n')
    )
    proc = run_script(environ, "policy", "explain", str(policy), MC)
    assert rows(proc.stdout) == MC_ROWS  # without --from every role counts, the bound one said
    assert f"{MC} (mc-reader (only from 10.0.1.0/24), janitor) holds" in proc.stderr.decode()
    proc = run_script(environ, "policy", "explain", str(policy), MC, "--from", "10.0.2.7")
    assert proc.returncode == 0, proc.stderr
    assert rows(proc.stdout) == MC_ROWS[2:]
    assert "mc-reader (not held: only from 10.0.1.0/24), janitor) holds a capability on 2 of" in (
        proc.stderr.decode()
    )
    assert explain(environ, policy, MC, "--from", "10.0.1.7")["roles"] == ["mc-reader", "janitor"]


def test_an_identity_with_no_role_is_one_line_exit_5_without_opening_the_store(tmp_path: Path) -> None:
    """No store and no password here: the policy alone answers, before any password is asked."""
    (tmp_path / "policy.toml").write_text(POLICY)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SECRETS_MANAGER_STORE": str(tmp_path / "absent.db"),
    }
    policy = str(tmp_path / "policy.toml")
    for identity, said in (
        (f"spiffe://{TD}/nobody", f"spiffe://{TD}/nobody holds no role in {policy}"),
        ("stranger", f"stranger is not an identity of {policy}"),
        ("market-connector", f"(did you mean {MC}?)"),
        (f"spiffe://{TD}/market-conector", f"(the policy names {MC}: a typo of this identity?)"),
    ):
        proc = run_script(environ, "policy", "explain", policy, identity)
        assert (proc.returncode, proc.stdout) == (5, b"")
        err = proc.stderr.decode()
        assert err.count("\n") == 1 and err.startswith("secrets-manager: error: ") and said in err, err
        assert "the service refuses it every call, so it can read nothing" in err
    assert not (tmp_path / "absent.db").exists()
    only_bound = tmp_path / "only-bound.toml"
    only_bound.write_text(
        POLICY.replace("[roles.auth-reader]\n", '[roles.auth-reader]\nbound_cidrs = ["10.0.1.0/24"]\n')
    )
    proc = run_script(environ, "policy", "explain", str(only_bound), AUTH, "--from", "10.0.2.7")
    assert proc.returncode == 5
    assert "roles are bound to networks that do not hold 10.0.2.7" in proc.stderr.decode()


def test_a_policy_that_does_not_parse_is_one_line_exit_2_and_no_store_is_opened(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text('[roles.r]\nrules = [{ path = "a/*", capabilities = ["fly"] }]\n')
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    proc = run_script(
        environ,
        "--store",
        str(tmp_path / "absent.db"),
        "policy",
        "explain",
        str(tmp_path / "broken.toml"),
        MC,
    )
    assert (proc.returncode, proc.stdout) == (2, b"")
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "unknown capability 'fly'" in err
    proc = run_script(environ, "policy", "explain", str(tmp_path / "missing.toml"), MC)
    assert proc.returncode == 3 and "does not exist" in proc.stderr.decode()


def test_a_secret_name_alone_is_refused_as_the_arguments_in_the_wrong_order(
    local: tuple[dict[str, str], Path],
) -> None:
    environ, policy = local
    proc = run_script(environ, "policy", "explain", str(policy), "auth/DB_PASSWORD")
    assert proc.returncode == 2
    assert "'auth/DB_PASSWORD' is a secret name, not an identity" in proc.stderr.decode()


def test_with_server_it_is_refused_the_service_filters_by_the_callers_own_identity(
    local: tuple[dict[str, str], Path],
) -> None:
    environ, policy = local
    proc = run_script(environ, "--server", "127.0.0.1:1", "policy", "explain", str(policy), MC)
    assert proc.returncode == 2
    assert "works on a local store only; drop --server" in proc.stderr.decode()


def issue_client(directory: Path, file_name: str, identity_name: str) -> int:
    """Another client certificate for `identity_name` from the CA in `directory`; its serial."""
    cert, key = pki.issue(
        (directory / "ca.pem").read_bytes(), (directory / "ca-key.pem").read_bytes(), identity_name
    )
    (directory / f"{file_name}.pem").write_bytes(cert)
    (directory / f"{file_name}-key.pem").write_bytes(key)
    (directory / f"{file_name}-key.pem").chmod(0o600)
    return x509.load_pem_x509_certificate(cert).serial_number


def test_a_revoked_certificate_is_said_and_what_it_could_read_before_is_listed(
    local: tuple[dict[str, str], Path],
) -> None:
    environ, policy = local
    directory = policy.parent
    make_pki(directory, ("market-connector",))
    serial = issue_client(directory, "stolen", "market-connector")
    policy.write_text(POLICY + f'\n[revoked]\nserials = ["{serial:X}"]\n')
    proc = run_script(environ, "policy", "explain", str(policy), "--cert", str(directory / "stolen.pem"))
    assert proc.returncode == 0, proc.stderr
    assert rows(proc.stdout) == MC_ROWS
    err = proc.stderr.decode()
    assert "certificate revoked (its serial number is in the policy's [revoked] list)" in err
    assert "It can read nothing now; listed is what it could do before" in err
    doc = explain(environ, policy, "--cert", str(directory / "stolen.pem"), "--capability", "read")
    assert doc["certificate"]["revoked"] is True and int(doc["certificate"]["serial"], 16) == serial
    assert len(doc["secrets"]) == 3
    doc = explain(environ, policy, "--cert", str(directory / "market-connector.pem"))
    assert doc["certificate"]["revoked"] is False and doc["identity"] == MC
    own = x509.load_pem_x509_certificate((directory / "market-connector.pem").read_bytes())
    proc = run_script(
        environ, "policy", "explain", str(policy), "--cert", str(directory / "market-connector.pem")
    )
    assert rows(proc.stdout) == MC_ROWS
    said = proc.stderr.decode().splitlines()[0]  # what to list under [revoked], were it stolen
    assert said.startswith(f"secrets-manager: {directory / 'market-connector.pem'}: serial ")
    assert int(said.split("serial ")[1].split(",")[0].replace(":", ""), 16) == own.serial_number
    assert said.endswith(f"not revoked in {policy}")


# ---- every store -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql", "vault", "aws"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a new, empty store of each kind, given by its URL."""
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    if request.param == "sqlite":
        environ |= {"SECRETS_MANAGER_STORE": str(tmp_path / "s.db"), "MASTER_PASSWORD": PASSWORD}
        assert run_script(environ, "init", "--kdf-profile", "test").returncode == 0
        yield environ
    elif request.param == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        environ |= {
            "SECRETS_MANAGER_STORE": f"{cluster.url()}?schema={cluster.new_schema()}",
            "MASTER_PASSWORD": PASSWORD,
            **cluster.env(),
        }
        assert run_script(environ, "init", "--kdf-profile", "test").returncode == 0
        yield environ
    elif request.param == "vault":
        vault = request.getfixturevalue("fake_vault")
        environ |= {
            "SECRETS_MANAGER_STORE": vault.address.replace("http://", "vault+http://") + "/secret",
            "VAULT_TOKEN": vault.root_token,
        }
        yield environ
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        environ |= {
            "SECRETS_MANAGER_STORE": f"aws-secretsmanager://{REGION}/access-{secrets.token_hex(4)}",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield environ


def test_the_answer_is_the_same_on_every_store(any_store: dict[str, str], tmp_path: Path) -> None:
    for name, value in SEED.items():
        assert run_script(any_store, "store", name, input=value).returncode == 0
    assert run_script(any_store, "delete", DELETED).returncode == 0
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    proc = run_script(any_store, "policy", "explain", str(policy), MC)
    assert proc.returncode == 0, proc.stderr
    assert rows(proc.stdout) == MC_ROWS
    doc = explain(any_store, policy, AUTH, "--capability", "read")
    assert [entry["name"] for entry in doc["secrets"]] == ["auth/DB_PASSWORD", "auth/hidden-key"]
    assert doc["secrets_in_store"] == len(SEED)


# ---- against a real `serve` ------------------------------------------------------------------------


def test_what_it_lists_is_what_serve_lets_each_certificate_do(local: tuple[dict[str, str], Path]) -> None:
    """For each identity, with its real client certificate: the secrets the command says it may
    read are those GetSecret serves it; those it says BatchGetSecrets by prefix shows are what
    that returns (get_credentials' read of everything), and those it may list what ListSecrets
    shows. A revoked certificate of market-connector is listed as its identity, and refused."""
    environ, policy = local
    tmp_path = policy.parent
    clients = ("auth", "market-connector", "ops", "writer", "nobody")
    make_pki(tmp_path, clients)
    stolen = issue_client(tmp_path, "stolen", "market-connector")
    (tmp_path / "policy.toml").write_text(POLICY + f'\n[revoked]\nserials = ["{stolen:X}"]\n')
    server = start_server(tmp_path)
    try:
        for client in (*clients, "stolen"):
            cert = str(tmp_path / f"{client}.pem")
            remote = RemoteStore(server.address, tls_files(tmp_path, client))
            try:
                if client == "nobody":
                    proc = run_script(environ, "policy", "explain", str(policy), "--cert", cert)
                    assert proc.returncode == 5 and "holds no role" in proc.stderr.decode()
                    with pytest.raises(AccessDeniedError):
                        remote.get_many(prefix="")
                    continue
                said = explain(environ, policy, "--cert", cert)["secrets"]
                active = [entry for entry in said if entry["deleted"] is None]
                readable = {entry["name"] for entry in active if "read" in entry["capabilities"]}
                batch = {entry["name"] for entry in active if entry["shown"]["batch_get_and_watch"]}
                listed = {entry["name"] for entry in said if "list" in entry["capabilities"]}
                if client == "stolen":
                    assert readable == {"market-connector/BINANCE_API_KEY", "shared/keys/SIGNING"}
                    with pytest.raises(AccessDeniedError, match="revoked"):
                        remote.get_many(prefix="")
                    continue
                assert {secret.name for secret in remote.get_many(prefix="")} == batch, client
                served = set()
                for name in SEED:
                    try:
                        remote.get(name)
                        served.add(name)
                    except AccessDeniedError:
                        pass
                    except NotFoundError:  # the deleted one, asked by one that may read it
                        assert name == DELETED and name in {e["name"] for e in said}, client
                assert served == readable, client
                assert {meta.name for meta in remote.list(include_deleted=True)} == listed, client
            finally:
                remote.close()
    finally:
        server.stop()
