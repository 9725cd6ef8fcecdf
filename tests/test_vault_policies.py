"""docs/stores.md's table of Vault policy capabilities, tested: each command runs with a token whose
policy holds exactly the capabilities the table names for it (it must work), and once per
capability with that one taken away (it must fail: exit 5 in one line, the secrets as they were).
The test Vault server enforces ACL policies as Vault documents them
(developer.hashicorp.com/vault/docs/concepts/policies; KV v2's paths:
developer.hashicorp.com/vault/docs/secrets/kv/kv-v2, "ACL rules").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from secrets_manager.errors import AccessDeniedError, ConflictError
from secrets_manager.store.vault import VaultStore, connect_vault
from test_cli_external_stores import Cli, Result, assert_one_line_error
from vault_server import FakeVault

M = "secret"
ANCHOR = f"{M}/data/.secrets-manager/audit-anchor/*"
ANCHOR_META = f"{M}/metadata/.secrets-manager/audit-anchor/*"
AUDIT_KEY = f"{M}/data/.secrets-manager/audit-key"
# docs/stores.md, "every command (the audit log)", once the mount and this log have been used.
AUDIT: dict[str, tuple[str, ...]] = {AUDIT_KEY: ("read",), ANCHOR: ("read", "update"), ANCHOR_META: ("read",)}
DATA, META = f"{M}/data/*", f"{M}/metadata/*"


def merged(*parts: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    rules: dict[str, tuple[str, ...]] = {}
    for part in parts:
        for path, caps in part.items():
            rules[path] = tuple(dict.fromkeys((*rules.get(path, ()), *caps)))
    return rules


@dataclass(frozen=True)
class Row:
    """One command of the table: its arguments, stdin and the capabilities it needs beside AUDIT."""

    args: tuple[str, ...]
    rules: dict[str, tuple[str, ...]]
    input: bytes = b""
    audit: tuple[tuple[str, tuple[str, ...]], ...] = tuple(AUDIT.items())
    # Needed only on a failure path (restore's undo): granted, but neither checked for use nor
    # taken away.
    spare: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def policy(self) -> dict[str, tuple[str, ...]]:
        return merged(dict(self.audit), self.rules)


# The rows of docs/stores.md's table, as commands on app/A (versions 1 and 2, a tag), app/B (one
# version, a description) and app/GONE (soft-deleted).
ROWS: dict[str, Row] = {
    "get": Row(("get", "app/A"), {DATA: ("read",)}),
    "get --version": Row(("get", "app/A", "--version", "1"), {DATA: ("read",), META: ("read",)}),
    "run --secret": Row(("run", "--secret", "app/A=X", "--", "true"), {DATA: ("read",)}),
    "inject": Row(("inject", "-i", "-"), {DATA: ("read",)}, b"key={{ sm://app/A }}\n"),
    "list": Row(("list",), {META: ("list", "read")}),
    "status": Row(("status",), {META: ("list", "read")}),
    "history": Row(("history", "app/A"), {META: ("read",)}),
    "metadata": Row(("metadata", "app/A"), {META: ("read",)}),
    "metadata --tag": Row(("metadata", "app/A", "--tag", "x=y"), {META: ("read", "patch")}),
    "metadata --max-versions": Row(("metadata", "app/A", "--max-versions", "5"), {META: ("read", "update")}),
    "store (new secret)": Row(("store", "app/NEW"), {META: ("read", "patch"), DATA: ("create",)}, b"n1"),
    "import": Row(
        ("import", "-", "--service", "imp", "--format", "env"),
        {META: ("list", "read", "patch"), DATA: ("create",)},
        b"K=v\n",
    ),
    "store (new version)": Row(("store", "app/A"), {META: ("read",), DATA: ("update",)}, b"a3"),
    "store --description": Row(
        ("store", "app/A", "--description", "new"), {META: ("read", "patch"), DATA: ("update",)}, b"a3"
    ),
    "rollback": Row(("rollback", "app/A"), {META: ("read",), DATA: ("read", "update")}),
    "delete": Row(("delete", "app/B"), {META: ("read",), f"{M}/delete/*": ("update",)}),
    "undelete": Row(("undelete", "app/GONE"), {META: ("read",), f"{M}/undelete/*": ("update",)}),
    "destroy --version": Row(
        ("destroy", "app/A", "--version", "1"), {META: ("read",), f"{M}/destroy/*": ("update",)}
    ),
    "destroy --all": Row(("destroy", "app/A", "--all"), {META: ("read", "delete")}),
    "purge": Row(("purge", "--older-than", "0s"), {META: ("list", "read", "delete")}),
    "mv": Row(
        ("mv", "app/B", "app/C"),
        {DATA: ("read", "create"), META: ("read", "patch"), f"{M}/delete/*": ("update",)},
        spare=((f"{M}/undelete/*", ("update",)),),  # OLD's delete undone when NEW's write fails
    ),
    "backup": Row(
        ("backup", "{home}/new.smbackup", "--backup-password-file", "{home}/pw", "--force"),
        {META: ("list", "read"), DATA: ("read",)},
    ),
    "restore --name": Row(
        ("restore", "{home}/n.smbackup", "--backup-password-file", "{home}/pw", "--name", "app/N"),
        {META: ("list", "read", "patch"), DATA: ("create",)},
        spare=((META, ("delete",)),),
    ),
    # Reads the log's anchor and key, writes nothing.
    "cp": Row(("cp", "app/B", "app/C"), {DATA: ("read", "create"), META: ("read", "patch")}),
    "audit verify": Row(
        ("audit", "verify"), {}, audit=((AUDIT_KEY, ("read",)), (ANCHOR, ("read",)), (ANCHOR_META, ("read",)))
    ),
}
# Capabilities a command can do without: the metadata PATCH falls back to the read-and-POST
# (`update`) of docs/stores.md's `metadata` row.
FALLBACK = {"patch": "update"}


def hcl(rules: dict[str, tuple[str, ...]]) -> str:
    return "\n".join(
        f'path "{path}" {{ capabilities = [{", ".join(f"{c!r}" for c in caps)}] }}'.replace("'", '"')
        for path, caps in rules.items()
    )


def secrets_of(vault: FakeVault) -> dict[str, Any]:
    """The user's secrets (not our bookkeeping) in full: metadata and every version's data."""
    return {
        key: (
            secret.metadata(),
            {n: (v.data, v.deletion_time, v.destroyed) for n, v in secret.versions.items()},
        )
        for key, secret in vault.mounts[M].items()
        if not key.startswith(".secrets-manager/")
    }


@dataclass
class Seeded:
    vault: FakeVault
    home: Path
    mount: Any
    log: dict[Path, bytes]

    def cli(self, token: str) -> Cli:
        return Cli(
            {
                "HOME": str(self.home),
                "SECRETS_MANAGER_STORE": self.vault.address.replace("http://", "vault+http://") + f"/{M}",
                "VAULT_TOKEN": token,
            }
        )

    def reset(self) -> None:
        """The mount and the audit log as the seeding left them; no tokens but root."""
        self.vault.mounts[M] = copy.deepcopy(self.mount)
        for path, data in self.log.items():
            path.write_bytes(data)
        self.vault.checks.clear()

    def token_with(self, rules: dict[str, tuple[str, ...]]) -> str:
        name = f"p{len(self.vault.policies)}"
        self.vault.add_policy(name, hcl(rules))
        return self.vault.add_token(f"token-{name}", policies=[name])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    vault = FakeVault().start()
    home = tmp_path_factory.mktemp("home")
    seed = Seeded(vault, home, None, {})
    root = seed.cli(vault.root_token)
    for args, value in [
        (("store", "app/A", "--tag", "k=v"), b"a1"),
        (("store", "app/A"), b"a2"),
        (("store", "app/B", "--description", "b"), b"b1"),
        (("store", "app/GONE"), b"g1"),
        (("delete", "app/GONE"), b""),
        (("store", "app/N"), b"n1"),  # backed up, then destroyed: `restore --name app/N` brings it back
        (("backup", f"{home}/n.smbackup", "--backup-password-file", f"{home}/pw"), b""),
        (("destroy", "app/N", "--all"), b""),
    ]:
        (home / "pw").write_text("backup password\n")
        (home / "pw").chmod(0o600)
        result = root(*args, input=value)
        assert result.code == 0, result.stderr
    seed.mount = copy.deepcopy(vault.mounts[M])
    seed.log = {p: p.read_bytes() for p in home.rglob("*.audit.jsonl")}
    yield seed
    vault.stop()


@pytest.fixture
def used(seeded: Seeded) -> Seeded:
    seeded.reset()
    return seeded


def run(seed: Seeded, row: Row, rules: dict[str, tuple[str, ...]]) -> Result:
    token = seed.token_with(merged(rules, dict(row.spare)))
    return seed.cli(token)(*(a.format(home=seed.home) for a in row.args), input=row.input)


def assert_denied(seed: Seeded, row: Row, rules: dict[str, tuple[str, ...]]) -> None:
    before = secrets_of(seed.vault)
    result = run(seed, row, rules)
    assert_one_line_error(result, 5, "denied")
    assert not result.stdout  # a value is not shown when its read cannot be audited
    after = secrets_of(seed.vault)
    if row.spare:  # a change undone on the failure path (mv's delete of OLD) moves updated_time only
        before, after = _without_updated_time(before), _without_updated_time(after)
    assert after == before


def _without_updated_time(secrets: dict[str, Any]) -> dict[str, Any]:
    return {
        key: ({k: v for k, v in metadata.items() if k != "updated_time"}, versions)
        for key, (metadata, versions) in secrets.items()
    }


@pytest.mark.parametrize("command", ROWS)
def test_the_documented_capabilities_are_enough(used: Seeded, command: str) -> None:
    row = ROWS[command]
    result = run(used, row, row.policy())
    assert result.code == 0, result.stderr
    # ... and each is used: nothing the command asked for was refused, nothing granted is idle.
    granted = row.policy()
    asked = {(cap, path) for cap, path in used.vault.checks}
    for pattern, caps in granted.items():
        for cap in caps:
            assert any(cap == c and _covers(pattern, p, granted) for c, p in asked), (pattern, cap)


def _covers(pattern: str, path: str, rules: dict[str, tuple[str, ...]]) -> bool:
    """Whether `pattern` is the rule Vault applies to `path` among `rules`."""
    vault = FakeVault()
    vault.add_policy("p", hcl({p: (*caps, "sudo") if p == pattern else caps for p, caps in rules.items()}))
    vault.add_token("t", policies=["p"])
    return "sudo" in vault.capabilities("t", path)


def _without_each(rules: dict[str, tuple[str, ...]]) -> Iterator[tuple[str, str, dict[str, tuple[str, ...]]]]:
    for path, caps in rules.items():
        for cap in caps:
            yield path, cap, {**rules, path: tuple(c for c in caps if c != cap)}


# Rows whose capabilities another row's cases already take away one by one.
SAME_AS = {
    "run --secret": "get",
    "inject": "get",
    "status": "list",
    "metadata": "history",
    "cp": "mv",
}
# The audit log's capabilities are every command's: taken away one by one from `get`'s policy only
# (and `audit verify`'s, which needs fewer); the others' own ones from theirs.
CASES = [
    pytest.param(command, path, cap, id=f"{command}-without-{cap}-on-{path}")
    for command, row in ROWS.items()
    for path, cap, _ in _without_each(row.policy() if command in ("get", "audit verify") else row.rules)
    if command not in SAME_AS
]


@pytest.mark.parametrize(("command", "path", "cap"), CASES)
def test_each_documented_capability_is_needed(used: Seeded, command: str, path: str, cap: str) -> None:
    row = ROWS[command]
    full = row.policy()
    fewer = {**full, path: tuple(c for c in full[path] if c != cap)}
    if cap in FALLBACK:
        # Not needed: the command falls back to FALLBACK[cap], which it then needs.
        fallback = {**fewer, path: (*fewer[path], FALLBACK[cap])}
        assert run(used, row, fallback).code == 0
        return
    assert_denied(used, row, fewer)


# docs/stores.md, "every command (the audit log)", the first time: the mount's audit key and this
# log's anchor are created (KV v2 checks `create` on data/ and metadata/ paths that do not exist yet,
# `update` on ones that do: the anchor's metadata, written just after its first version). The
# anchor's `update` is needed from the second record on (AUDIT).
AUDIT_FIRST: dict[str, tuple[str, ...]] = {
    AUDIT_KEY: ("read", "create"),
    ANCHOR: ("read", "create"),
    ANCHOR_META: ("read", "update"),
}
FIRST = Row(("get", "app/X"), {DATA: ("read",)})


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Seeded]:
    """A mount no secrets-manager has used: app/X written by another tool, no audit key or anchor."""
    vault = FakeVault().start()
    assert vault.handle("POST", f"/v1/{M}/data/app/X", vault.root_token, {"data": {"value": "x1"}})[0] == 200
    yield Seeded(vault, tmp_path, None, {})
    vault.stop()


def test_the_first_command_on_a_mount_needs_create_on_the_audit_key_and_anchor(fresh: Seeded) -> None:
    result = run(fresh, FIRST, merged(AUDIT_FIRST, FIRST.rules))
    assert result.code == 0, result.stderr
    assert result.out == "x1\n" and ("create", AUDIT_KEY) in fresh.vault.checks


@pytest.mark.parametrize(("path", "cap"), [(p, c) for p, c, _ in _without_each(AUDIT_FIRST) if c != "read"])
def test_without_a_first_use_capability_the_first_command_is_refused(
    fresh: Seeded, path: str, cap: str
) -> None:
    rules = merged(AUDIT_FIRST, FIRST.rules)
    assert_denied(fresh, FIRST, {**rules, path: tuple(c for c in rules[path] if c != cap)})


# ---- the test server's ACL, against Vault's documentation ------------------------------------------


def test_the_test_server_matches_policy_paths_as_vault_documents() -> None:
    """docs/concepts/policies: an exact path beats every glob; otherwise the most specific of the
    matching patterns ("priority matching": the later first wildcard, no trailing `*`, fewer `+`,
    longer, lexicographically larger); `deny` wins within a path, across the token's policies."""
    vault = FakeVault()
    vault.add_policy(
        "a",
        """
        path "secret/*" { capabilities = ["read"] }
        path "secret/+/bar" { capabilities = ["list"] }
        path "secret/foo/*" { capabilities = ["update"] }
        path "secret/foo/bar" { capabilities = ["create"] }
        path "secret/zip-*" { capabilities = ["delete"] }
        path "secret/locked/*" { capabilities = ["read"] }
        """,
    )
    vault.add_policy("b", 'path "secret/locked/*" { capabilities = ["deny"] }')
    vault.add_token("t", policies=["a", "b"])
    caps = {
        p: vault.capabilities("t", p)
        for p in (
            "secret/foo/bar",
            "secret/x/bar",
            "secret/foo/baz",
            "secret/x",
            "secret/zip-1/2",
            "secret/locked/k",
            "other/x",
        )
    }
    assert caps == {
        "secret/foo/bar": {"create"},  # exact
        "secret/x/bar": {"list"},  # "+" later than "secret/*"'s "*"
        "secret/foo/baz": {"update"},  # the longer glob
        "secret/x": {"read"},
        "secret/zip-1/2": {"delete"},  # a glob is a prefix, not a segment
        "secret/locked/k": set(),  # deny wins
        "other/x": set(),  # deny by default
    }


def test_the_test_server_tells_create_from_update_and_answers_403_as_vault() -> None:
    vault = FakeVault()
    vault.add_policy("w", 'path "secret/data/*" { capabilities = ["update"] }')
    token = vault.add_token("t", policies=["w"])
    write = {"data": {"value": "v"}}
    assert vault.handle("POST", "/v1/secret/data/app/K", token, write) == (
        403,
        {"errors": ["1 error occurred:\n\t* permission denied\n\n"]},
    )
    assert vault.handle("POST", "/v1/secret/data/app/K", vault.root_token, write)[0] == 200
    assert vault.handle("POST", "/v1/secret/data/app/K", token, write)[0] == 200  # it exists: update
    # The default policy: the token looks itself up; nothing else outside its policy.
    assert vault.handle("GET", "/v1/auth/token/lookup-self", token, None)[1]["data"]["policies"] == [
        "default",
        "w",
    ]
    assert vault.handle("GET", "/v1/secret/data/app/K", token, None)[0] == 403


def test_the_test_server_creates_tokens_and_policies_through_vaults_api() -> None:
    vault = FakeVault()
    root = vault.root_token
    policy = 'path "secret/data/*" { capabilities = ["read"] }'
    assert vault.handle("PUT", "/v1/sys/policies/acl/reader", root, {"policy": policy})[0] == 204
    auth = vault.handle("POST", "/v1/auth/token/create", root, {"policies": ["reader"]})[1]["auth"]
    reader = auth["client_token"]
    assert vault.handle("POST", "/v1/secret/data/k", root, {"data": {"value": "v"}})[0] == 200
    assert vault.handle("GET", "/v1/secret/data/k", reader, None)[0] == 200
    assert vault.handle("POST", "/v1/secret/data/k", reader, {"data": {"value": "w"}})[0] == 403
    # A token may only hand on policies it holds; the mounts endpoint answers any capability in the mount.
    assert vault.handle("POST", "/v1/auth/token/create", reader, {"policies": ["root"]})[0] in (400, 403)
    assert vault.handle("GET", "/v1/sys/internal/ui/mounts/secret", reader, None)[0] == 200
    outsider = vault.add_token("o", policies=[])
    assert vault.handle("GET", "/v1/sys/internal/ui/mounts/secret", outsider, None)[0] == 403


# ---- serve: the polled feed behind Watch, and the health check ---------------------------------------


@pytest.mark.parametrize(
    ("call", "rules"),
    [
        pytest.param("version_snapshot", {META: ("list", "read")}, id="watch"),
        pytest.param("probe", {ANCHOR_META: ("read",)}, id="health-check"),
    ],
)
def test_serve_needs_what_the_table_says_for_watch_and_its_health_check(
    seeded: Seeded, call: str, rules: dict[str, tuple[str, ...]]
) -> None:
    """docs/stores.md's Watch and serve rows, on the store serve holds (in-process: its calls are
    the store's, and serve's own requests are the audit log's, checked above)."""
    seeded.reset()

    def store(rules: dict[str, tuple[str, ...]]) -> VaultStore:
        client = connect_vault(seeded.vault.address, environ={"VAULT_TOKEN": seeded.token_with(rules)})
        return VaultStore(client, M, actor="tester")

    answer = getattr(store(rules), call)()
    assert call == "probe" or {"app/A", "app/B"} <= set(answer)
    for _path, _cap, fewer in _without_each(rules):
        with pytest.raises(AccessDeniedError):
            getattr(store(fewer), call)()


PROBE = f"{M}/data/.secrets-manager/kv-version-probe"


def test_where_the_mounts_endpoint_is_refused_the_first_write_needs_create_on_the_probe(used: Seeded) -> None:
    """docs/stores.md: a Vault that refuses sys/internal/ui/mounts (in front of it, a proxy's rule)
    gets the KV v2 probe before the first write: `create` on the probe path, which `create` on
    M/data/* already grants (KV v2 refuses its `cas` and writes nothing, so `delete`, for KV v1's
    stored probe, is not used here). A policy that takes it away is refused before any value is sent."""
    used.vault.refuse_mounts_endpoint = True
    try:
        row = ROWS["store (new secret)"]
        assert run(used, row, row.policy()).code == 0
        assert ("create", PROBE) in used.vault.checks
        used.reset()
        assert_denied(used, row, {**row.policy(), PROBE: ()})
    finally:
        used.vault.refuse_mounts_endpoint = False


def test_a_version_stored_before_its_metadata_was_denied_is_said_to_be_stored(used: Seeded) -> None:
    """`store` writes the version, then its metadata (docs/stores.md: "if the second fails, the
    version is stored without them and the command reports the error"). Without `patch` and
    `update` on M/metadata/* the error said only "Vault denied store metadata of app/NEW" (exit 5),
    so the value looked refused, and storing it again made a second version."""
    row = ROWS["store (new secret)"]
    result = run(used, row, {**row.policy(), META: ("read",)})
    assert_one_line_error(
        result, 5, "version 1 of 'app/NEW' was stored", "denied", "do not store the value again"
    )
    assert secrets_of(used.vault)["app/NEW"][0]["current_version"] == 1


@pytest.mark.parametrize("undelete", [True, False], ids=["with-undelete", "without-undelete"])
def test_a_conditional_delete_overtaken_by_a_write_needs_update_on_undelete(
    seeded: Seeded, undelete: bool
) -> None:
    """docs/stores.md's delete row: `delete --expect-version` (and mv's delete) undoes its delete
    POST when a newer version landed meanwhile, with `update` on M/undelete/*. Without it the
    versions stay soft-deleted, and the one-line error says so and how to restore them."""
    seeded.reset()
    rules = {
        META: ("read",),
        f"{M}/delete/*": ("update",),
        **({f"{M}/undelete/*": ("update",)} if undelete else {}),
    }
    store = VaultStore(
        connect_vault(seeded.vault.address, environ={"VAULT_TOKEN": seeded.token_with(rules)}), M, actor="t"
    )
    root = VaultStore(
        connect_vault(seeded.vault.address, environ={"VAULT_TOKEN": seeded.vault.root_token}), M
    )
    send, written = store._send, []

    def write_before_the_delete(method: str, path: str, **kwargs: Any) -> Any:
        if (method, path) == ("POST", "delete/app/B") and not written:
            written.append(root.put("app/B", b"b2"))
        return send(method, path, **kwargs)

    store._send = write_before_the_delete  # type: ignore[method-assign]
    expected = ConflictError if undelete else AccessDeniedError
    with pytest.raises(expected) as raised:
        store.delete("app/B", expect_version=1)
    version_1 = seeded.vault.mounts[M]["app/B"].versions[1]
    assert written and (version_1.deletion_time == "") == undelete
    if not undelete:
        assert "stayed soft-deleted" in str(raised.value) and "'undelete app/B' restores them" in str(
            raised.value
        )
