"""A KV version 2 test server: the parts of HashiCorp Vault's HTTP API that `VaultStore` uses.

No Vault binary can be installed on the project's machines, so the Vault tests run against this
threaded HTTP server on 127.0.0.1. It follows Vault's documented endpoints, response shapes and
error codes (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2):

    GET    /v1/MOUNT/data/PATH[?version=N]    200 {"data": {"data": …, "metadata": …}}
                                              404 {"errors": []} when missing; a soft-deleted or
                                              destroyed version: 404 with {"data": {"data": null,
                                              "metadata": {…}}}
    POST   /v1/MOUNT/data/PATH                {"options": {"cas": N}, "data": {…}}; 200 with the new
                                              version's metadata; cas mismatch → 400 "check-and-set
                                              parameter did not match the current version"
    DELETE /v1/MOUNT/data/PATH                soft-delete the latest version
    POST   /v1/MOUNT/delete|undelete|destroy/PATH  {"versions": [..]} → 204
    GET    /v1/MOUNT/metadata/PATH            200 metadata (current_version, versions, custom_metadata…)
    POST   /v1/MOUNT/metadata/PATH            update only the fields given → 204; custom_metadata as
                                              Vault checks it: at most 64 keys, keys of 1-128 and values
                                              of 1-512 UTF-8 bytes (not characters), printable, else 400;
                                              max_versions an integer (else 400), stored only: as in
                                              Vault, nothing is pruned until the next data write
    PATCH  /v1/MOUNT/metadata/PATH            a JSON merge patch (RFC 7396) of the metadata, Content-Type
                                              application/merge-patch+json (else 415): the fields given
                                              replace Vault's, custom_metadata merged key by key (a key
                                              set to null removed) → 204. As Vault's pathMetadataPatch,
                                              the keys the patch sets (its nulls left out) are checked as
                                              a POST's custom_metadata is (400), before the secret is
                                              looked up (404 if it has no metadata); the merged result
                                              is not, so it may hold more than 64 keys. A
                                              FakeVault(metadata_patch=False) answers 405, as a Vault from
                                              before it does (no handler for the method)
    DELETE /v1/MOUNT/metadata/PATH            every version and the metadata → 204
    LIST   /v1/MOUNT/metadata/FOLDER[/]       200 {"data": {"keys": [...]}} ("sub/" for folders), 404 if none
    POST   /v1/auth/approle/login             {"role_id", "secret_id"} → {"auth": {"client_token": …}}:
                                              a token of the role's policies (`add_approle`; else root)
    GET    /v1/auth/token/lookup-self         the calling token's data (the default policy allows it)
    POST   /v1/auth/token/revoke-self         the calling token is no longer honoured → 204
    POST   /v1/auth/token/renew-self          {"increment"?} → {"auth": {"lease_duration": …}}: a
                                              periodic token's TTL is its period again (the increment
                                              ignored), another's the increment or its creation TTL,
                                              never past its explicit max TTL; a token that is not
                                              renewable → 400 "lease is not renewable"

Tokens (api-docs/auth/token): one from `add_token(ttl=…)` or an AppRole login is leased. Its
lookup-self shows the seconds left (`ttl`), `renewable`, `period`, `creation_ttl` and
`explicit_max_ttl`; once its TTL has run out Vault revokes it, and every request with it is 403
"permission denied". A token without a TTL (the root token, `add_token()`) shows ttl 0 and never
expires, as a root token does.
    GET    /v1/sys/internal/ui/mounts/PATH    the mount holding PATH: {"data": {"type": "kv", "path":
                                              "MOUNT/", "options": {"version": "2"}, …}} (what `vault kv`
                                              asks first); 403 for a path in no mount, as Vault answers
                                              (it does not tell which mounts exist), or for every path
                                              with `refuse_mounts_endpoint`

`FakeVault(kv1_mounts=("kv",))` adds KV version 1 mounts (api-docs/secret/kv/kv-v1): GET, POST/PUT,
DELETE and LIST of MOUNT/PATH, no versions or metadata; `kv1[MOUNT]` holds their data.

    GET|POST /v1/MOUNT/config                 the mount's max_versions, cas_required and
                                              delete_version_after (a negative duration disables it)

delete_version_after as Vault applies it (vault-plugin-secrets-kv pathDataWrite, deletionTime): each
write gives the new version deletion_time = created_time + the smaller non-zero of the secret's and
the mount's setting (a secret's can only shorten the mount's; "0s" means unset), unless the mount
disables it. A version is deleted only once that time has passed (pathDataRead:
deletionTime.Before(now)); delete skips versions already past it and undelete applies the expiry
anew from now, as pathUndeleteWrite does. Durations are Go's ("720h", "1h30m", "90s") or seconds.

Every request needs a known X-Vault-Token (else 403 {"errors": ["permission denied"]}).

ACL policies (docs/concepts/policies): a token carries policies (`add_token(policies=[…])`, or
`POST auth/token/create {"policies": […]}`; `add_policy(name, hcl)` or `PUT sys/policies/acl/NAME
{"policy": hcl}`), each `path "PATTERN" { capabilities = [...] }`. A request's path (after /v1/, a
LIST's with a trailing slash) is matched by the exact pattern if there is one, else by the most
specific of the matching patterns as Vault ranks them ("priority matching": a later first `+` or
`*`, then no trailing `*`, fewer `+` segments, longer, lexicographically larger); the rules of one
pattern in several policies are merged, and `deny` there denies everything. GET needs read, LIST
list, DELETE delete, PATCH patch, POST/PUT update, or create where the endpoint has Vault's existence
check and the path does not exist yet (KV v2 data/ and metadata/ of a secret with no metadata, a KV
v1 key; delete/, undelete/, destroy/, config have none: update). A refusal is 403 {"errors": ["1
error occurred:\n\t* permission denied\n\n"]}. Every token but one created with
`no_default_policy` holds Vault's `default` policy (lookup-self read, renew-self and revoke-self
update); the root token and `add_token()` without policies hold `root` (everything);
`add_token(readonly=True)` a policy of read and list on `*`, `patch=False` one without `patch`.
`auth/approle/login` and `sys/internal/ui/mounts/PATH` need no capability; the latter answers a
token with any capability on a path in the mount (Vault's hasMountAccess), else 403.

Namespaces (Vault Enterprise, docs/enterprise/namespaces): `namespace("team-a")` (made on first use,
also by a request naming it) is a FakeVault of its own: mounts, tokens, policies. A request goes to
the one its X-Vault-Namespace header names, and the path may carry the rest ("X-Vault-Namespace:
team-a" and /v1/secret/… are /v1/team-a/secret/… with no header). A token is honoured in the
namespace that made it and in those below it, with its own namespace's policies matched against
the path relative to it (a parent's root token may do everything there); another namespace's
tokens are unknown (403). `seal()` makes every request 503 {"errors": ["Vault is sealed"]};
`fail_next(status, count)` answers the next requests with an error (for retry tests). Versions
beyond max_versions (the larger of the secret's and the mount's, else 10) are removed oldest first
by each data write, as Vault's KeyMetadata.AddVersion does (so a lowered max_versions removes
several at once).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_MAX_VERSIONS = 10
CAS_MISMATCH = "check-and-set parameter did not match the current version"
MERGE_PATCH = "application/merge-patch+json"


def vault_time(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds, as Vault writes times; now, or `ns` nanoseconds since the epoch."""
    ns = time.time_ns() if ns is None else ns
    whole = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{ns % 1_000_000_000:09d}Z"


def vault_time_ns(text: str) -> int:
    """Nanoseconds since the epoch of a time `vault_time` wrote."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    seconds = int(datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((fraction or "0").ljust(9, "0")[:9])


def is_past(deletion_time: str) -> bool:
    """Vault's test for a deleted version: a deletion_time that is set and before now."""
    return bool(deletion_time) and vault_time_ns(deletion_time) < time.time_ns()


_GO_UNITS = {"h": 3600, "m": 60, "s": 1}


def duration_seconds(value: Any) -> int:
    """A TypeDurationSecond field: an integer of seconds, or a Go duration ("720h", "1h30m", "-1s")."""
    if isinstance(value, bool):
        raise VaultError(400, ['error converting input for field "delete_version_after"'])
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    match = re.fullmatch(r"(-?)((?:\d+[hms])+)", text)
    if match is None:
        raise VaultError(400, ['error converting input for field "delete_version_after"'])
    total = sum(int(n) * _GO_UNITS[unit] for n, unit in re.findall(r"(\d+)([hms])", match[2]))
    return -total if match[1] else total


def go_duration(seconds: int) -> str:
    """Go's time.Duration.String() of whole seconds, as Vault shows delete_version_after."""
    if seconds == 0:
        return "0s"
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


@dataclass
class KvVersion:
    data: dict[str, Any] | None
    created_time: str
    deletion_time: str = ""
    destroyed: bool = False

    def metadata(self, number: int, custom: dict[str, str] | None) -> dict[str, Any]:
        return {
            "created_time": self.created_time,
            "custom_metadata": custom,
            "deletion_time": self.deletion_time,
            "destroyed": self.destroyed,
            "version": number,
        }


@dataclass
class KvSecret:
    created_time: str = field(default_factory=vault_time)
    updated_time: str = field(default_factory=vault_time)
    current_version: int = 0
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: str = "0s"
    custom_metadata: dict[str, str] | None = None
    versions: dict[int, KvVersion] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "cas_required": self.cas_required,
            "created_time": self.created_time,
            "current_version": self.current_version,
            "custom_metadata": self.custom_metadata,
            "delete_version_after": go_duration(duration_seconds(self.delete_version_after)),
            "max_versions": self.max_versions,
            "oldest_version": self.oldest_version,
            "updated_time": self.updated_time,
            "versions": {
                str(n): {
                    "created_time": v.created_time,
                    "deletion_time": v.deletion_time,
                    "destroyed": v.destroyed,
                }
                for n, v in sorted(self.versions.items())
            },
        }


@dataclass
class KvConfig:
    """A mount's KV v2 configuration (MOUNT/config); delete_version_after in seconds, -1: disabled."""

    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: int = 0

    def deletion_time(self, secret: KvSecret, now_ns: int) -> str:
        """The deletion_time Vault gives a version written (or undeleted) at `now_ns`."""
        if self.delete_version_after < 0:
            return ""
        settings = [
            d for d in (self.delete_version_after, duration_seconds(secret.delete_version_after)) if d > 0
        ]
        return vault_time(now_ns + min(settings) * 1_000_000_000) if settings else ""


PERMISSION_DENIED = "1 error occurred:\n\t* permission denied\n\n"
ALL_CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list", "sudo"})
# Vault's default policy, the parts a KV client uses (vault/policy_store.go defaultPolicy).
DEFAULT_POLICY = """
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
path "sys/capabilities-self" { capabilities = ["update"] }
"""
_RULE = re.compile(r'path\s+"([^"]*)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}')


def parse_policy(hcl: str) -> list[tuple[str, frozenset[str]]]:
    """The `path "PATTERN" { capabilities = [...] }` blocks of an HCL policy (comments dropped)."""
    text = re.sub(r"(?m)^\s*#.*$", "", hcl)
    rules = [(m[1].lstrip("/"), frozenset(re.findall(r'"([a-z]+)"', m[2]))) for m in _RULE.finditer(text)]
    unknown = {c for _, caps in rules for c in caps} - ALL_CAPABILITIES - {"deny"}
    if unknown or (text.strip() and not rules):
        raise ValueError(f"not a policy this server reads: {sorted(unknown) or hcl!r}")
    return rules


def _pattern_matches(pattern: str, path: str) -> bool:
    """A policy path against a request path: `+` one whole segment, a trailing `*` any rest."""
    glob = pattern.endswith("*")
    want = pattern[:-1] if glob else pattern
    segments, got = want.split("/"), path.split("/")
    if glob:
        if len(got) < len(segments):
            return False
        fixed, last = segments[:-1], segments[-1]
        head = got[: len(fixed)]
        tail = "/".join(got[len(fixed) :])
        return all(s in ("+", g) for s, g in zip(fixed, head, strict=True)) and (
            tail.startswith(last) if last != "+" else bool(got[len(fixed)])
        )
    return len(segments) == len(got) and all(s in ("+", g) for s, g in zip(segments, got, strict=True))


def _priority(pattern: str) -> tuple[int, bool, int, int, str]:
    """Vault's priority of matching policy paths (docs/concepts/policies, "priority matching"):
    the later the first `+` or `*`, then no trailing `*`, then fewer `+` segments, then longer,
    then lexicographically larger wins."""
    marks = [i for i in (pattern.find("+"), pattern.find("*")) if i >= 0]
    return (
        min(marks) if marks else len(pattern) + 1,
        not pattern.endswith("*"),
        -pattern.split("/").count("+"),
        len(pattern),
        pattern,
    )


class VaultError(Exception):
    def __init__(
        self, status: int, errors: list[str] | None = None, body: dict[str, Any] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body if body is not None else {"errors": errors or []}


@dataclass
class TokenLease:
    """A token's TTL as Vault keeps it (times from time.monotonic())."""

    expires: float
    creation_ttl: int
    renewable: bool = True
    period: int = 0
    max_expires: float | None = None  # explicit_max_ttl (or the mount's max TTL) from creation
    created: float = field(default_factory=time.monotonic)

    def left(self, now: float) -> int:
        return max(int(self.expires - now), 0)

    def renew(self, now: float, increment: int) -> int:
        if not self.renewable:
            raise VaultError(400, ["lease is not renewable"])
        ttl = self.period or increment or self.creation_ttl
        expires = now + ttl
        if self.max_expires is not None:
            expires = min(expires, self.max_expires)
        self.expires = max(expires, self.expires)  # never shortened by a renewal
        return self.left(now)


def _check_custom_metadata(custom: Any) -> None:
    """Vault's validateCustomMetadata of a write's custom_metadata: at most 64 keys, each key 1 to
    128 and each value 1 to 512 UTF-8 bytes (Go's len(), not characters), both printable
    (strutil.Printable); 400 otherwise."""
    if not isinstance(custom, dict) or len(custom) > 64:
        raise VaultError(400, ["custom_metadata validation failed: at most 64 keys of strings"])
    for k, v in custom.items():
        if not isinstance(v, str) or not (0 < len(k.encode()) <= 128 and 0 < len(v.encode()) <= 512):
            raise VaultError(
                400,
                [f"custom_metadata validation failed: key {k!r}: keys 1-128 bytes, values 1-512"],
            )
        if not (k.isprintable() and v.isprintable()):
            raise VaultError(
                400, [f"custom_metadata validation failed: key {k!r} or its value is not printable"]
            )


class FakeVault:
    """The server's state and request handling; `start()` serves it on 127.0.0.1."""

    def __init__(
        self,
        *,
        mounts: tuple[str, ...] = ("secret",),
        kv1_mounts: tuple[str, ...] = (),
        root_token: str = "root-token",  # noqa: S107
        metadata_patch: bool = True,
    ) -> None:
        self.root_token = root_token
        self.metadata_patch = metadata_patch
        self.tokens = {root_token}
        self.policies: dict[str, list[tuple[str, frozenset[str]]]] = {
            "default": parse_policy(DEFAULT_POLICY),
            "read-only": parse_policy('path "*" { capabilities = ["read", "list"] }'),
            "no-patch": parse_policy(
                'path "*" { capabilities = ["create", "read", "update", "delete", "list"] }'
            ),
        }
        self.token_policies: dict[str, list[str]] = {root_token: ["root"]}
        self.parent: FakeVault | None = None
        self.path = ""  # the namespace's path, "" for the root namespace
        self.children: dict[str, FakeVault] = {}
        self.leases: dict[str, TokenLease] = {}  # tokens with a TTL
        self.approles: dict[str, str] = {}  # role_id -> secret_id
        # role_id -> the policies its tokens get (`add_approle`); a role not here: `root`
        self.approle_policies: dict[str, list[str]] = {}
        self.mounts: dict[str, dict[str, KvSecret]] = {m: {} for m in mounts}
        self.configs: dict[str, KvConfig] = {m: KvConfig() for m in mounts}
        self.kv1: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in kv1_mounts}
        self.refuse_mounts_endpoint = False
        self.sealed = False
        self.scheme = "http"
        self.requests: list[tuple[str, str]] = []
        self.checks: list[tuple[str, str]] = []  # (capability, ACL path) of each request, in order
        self._failures: list[tuple[int, list[str]]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control ---------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def start(self, *, tls: tuple[str, str] | None = None) -> FakeVault:
        """Serve on 127.0.0.1; `tls`: (certificate, key) PEM files to serve https with."""
        vault = self

        class Handler(_Handler):
            server_state = vault

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-vault", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def seal(self, sealed: bool = True) -> None:
        self.sealed = sealed

    def fail_next(self, status: int, count: int = 1, errors: list[str] | None = None) -> None:
        with self._lock:
            self._failures.extend([(status, errors or [f"injected failure {status}"])] * count)

    def add_token(
        self,
        token: str,
        *,
        readonly: bool = False,
        patch: bool = True,
        ttl: float | None = None,
        renewable: bool = True,
        period: int = 0,
        max_ttl: float | None = None,
        policies: list[str] | None = None,
        no_default_policy: bool = False,
    ) -> str:
        """A token; `policies`: the names of its policies (`add_policy`), beside `default` unless
        `no_default_policy`; without them `root`, or with `readonly` a policy of read and list on
        every path (403 on writes), with `patch=False` one without the `patch` capability (403 on
        PATCH, other writes allowed). With `ttl` (seconds) it lapses then unless renewed
        (`renewable`; `period`: a periodic token; `max_ttl`: its explicit max TTL)."""
        self.tokens.add(token)
        if policies is None:
            policies = ["read-only"] if readonly else ["no-patch"] if not patch else ["root"]
        self.token_policies[token] = sorted({*policies, *(() if no_default_policy else ("default",))})
        if ttl is not None:
            now = time.monotonic()
            self.leases[token] = TokenLease(
                expires=now + ttl,
                creation_ttl=int(ttl),
                renewable=renewable,
                period=period,
                max_expires=None if max_ttl is None else now + max_ttl,
            )
        return token

    def add_approle(
        self, role_id: str, secret_id: str, *, policies: list[str], no_default_policy: bool = False
    ) -> None:
        """An AppRole whose login tokens carry `policies`, beside `default` unless
        `no_default_policy` (the role's `token_policies` and `token_no_default_policy`,
        api-docs/auth/approle). A token without `default` may not look itself up, renew or revoke
        itself."""
        self.approles[role_id] = secret_id
        self.approle_policies[role_id] = sorted({*policies, *(() if no_default_policy else ("default",))})

    def add_policy(self, name: str, rules: str) -> None:
        """An ACL policy in HCL (`path "PATTERN" { capabilities = [...] }` blocks), as `vault policy
        write NAME FILE` stores it; replaces one of that name."""
        self.policies[name] = parse_policy(rules)

    def namespace(self, path: str) -> FakeVault:
        """The child namespace at `path` ("team-a" or "team-a/prod"), made on first use with the
        same mounts as this one's at creation (empty) and no tokens of its own."""
        head, _, rest = path.strip("/").partition("/")
        with self._lock:
            child = self.children.get(head)
            if child is None:
                child = FakeVault(
                    mounts=tuple(self.configs), kv1_mounts=tuple(self.kv1), root_token=f"{head}-root-token"
                )
                child.tokens.clear()
                child.token_policies.clear()
                child.parent, child.path = self, f"{self.path}{head}/"
                child.metadata_patch = self.metadata_patch
                self.children[head] = child
        return child.namespace(rest) if rest else child

    def capabilities(self, token: str, path: str) -> frozenset[str]:
        """The token's capabilities on `path` (relative to this namespace), as Vault's ACL grants
        them: the exact rule, else the most specific matching one; `deny` grants nothing."""
        owner, prefix = self, ""
        while token not in owner.tokens:
            if owner.parent is None:
                return frozenset()
            prefix, owner = owner.path[len(owner.parent.path) :] + prefix, owner.parent
        names = owner.token_policies.get(token, [])
        if "root" in names:
            return ALL_CAPABILITIES
        merged: dict[str, set[str]] = {}
        for name in names:
            for pattern, caps in owner.policies.get(name, []):
                merged.setdefault(pattern, set()).update(caps)
        full = prefix + path
        if full in merged:
            caps = merged[full]
        else:
            matching = [p for p in merged if _pattern_matches(p, full)]
            if not matching:
                return frozenset()
            caps = merged[max(matching, key=_priority)]
        return frozenset() if "deny" in caps else frozenset(caps)

    def _known(self, token: str | None) -> bool:
        owner: FakeVault | None = self
        while owner is not None:
            if token in owner.tokens:
                return True
            owner = owner.parent
        return False

    def _has_mount_access(self, token: str, mount: str) -> bool:
        """Vault's hasMountAccess: any capability on some path in the mount."""
        owner, prefix = self, ""
        while token not in owner.tokens:
            if owner.parent is None:
                return False
            prefix, owner = owner.path[len(owner.parent.path) :] + prefix, owner.parent
        if "root" in owner.token_policies.get(token, []):
            return True
        base = f"{prefix}{mount}/"
        for name in owner.token_policies.get(token, []):
            for pattern, caps in owner.policies.get(name, []):
                if "deny" in caps or not caps:
                    continue
                stem = pattern.rstrip("*")
                if (
                    stem.startswith(base)
                    or _pattern_matches(pattern, base)
                    or ("+" in pattern and _pattern_matches(pattern.split("+")[0] + "+", base + "x"))
                ):
                    return True
        return False

    def _capability_needed(self, method: str, rest: str) -> str:
        """The capability a request needs; POST/PUT: create where the endpoint has an existence
        check and the path does not exist, else update."""
        if method in ("GET", "HEAD"):
            return "read"
        simple = {"LIST": "list", "DELETE": "delete", "PATCH": "patch"}
        if method in simple:
            return simple[method]
        mount = self._mount_of(rest)
        if mount is None or rest == mount:
            return "update"
        if mount in self.kv1:
            return "update" if rest[len(mount) + 1 :].strip("/") in self.kv1[mount] else "create"
        endpoint, _, key = rest[len(mount) + 1 :].partition("/")
        if endpoint in ("data", "metadata") and key.strip("/") not in self.mounts[mount]:
            return "create"
        return "update"

    def _authorize(self, method: str, rest: str, token: str) -> None:
        acl_path = f"{rest}/" if method == "LIST" and not rest.endswith("/") else rest
        needed = self._capability_needed(method, rest)
        self.checks.append((needed, acl_path))
        if needed not in self.capabilities(token, acl_path):
            raise VaultError(403, [PERMISSION_DENIED])

    # ---- request handling --------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, token: str | None, body: Any, content_type: str | None = None
    ) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if method == "GET" and query.get("list") == "true":
            method = "LIST"
        if path.startswith("/v1/"):
            head = path[len("/v1/") :].split("/", 1)[0]
            if head in self.children:  # the namespace in the path (Vault accepts either)
                rest = path[len("/v1/") + len(head) :]
                child = self.children[head]
                query_part = f"?{parts.query}" if parts.query else ""
                with self._lock:
                    self.requests.append((method, path))
                return child.handle(method, f"/v1{rest}{query_part}", token, body, content_type)
        with self._lock:
            self.requests.append((method, path))
            if self._failures:
                status, errors = self._failures.pop(0)
                return status, {"errors": errors}
            if self.sealed:
                return 503, {"errors": ["Vault is sealed"]}
            try:
                if path == "/v1/auth/approle/login" and method in ("POST", "PUT"):
                    return 200, self._approle_login(body)
                now = time.monotonic()
                lease = self.leases.get(token or "")
                if lease is not None and now >= lease.expires:  # Vault revokes a token at its TTL
                    self.tokens.discard(token or "")
                    del self.leases[token or ""]
                if not self._known(token):
                    raise VaultError(403, ["permission denied"])
                assert token is not None
                rest = path[len("/v1/") :]
                if rest.startswith("sys/internal/ui/mounts/") and method == "GET":
                    mount = self._mount_of(rest[len("sys/internal/ui/mounts/") :].strip("/"))
                    if mount is None or not self._has_mount_access(token, mount):
                        raise VaultError(403, ["permission denied"])
                    return 200, self._ui_mount(rest[len("sys/internal/ui/mounts/") :])
                self._authorize(method, rest, token)
                if rest.startswith(("sys/policies/acl/", "sys/policy/")) and method in ("POST", "PUT"):
                    rules = (body or {}).get("policy") or (body or {}).get("rules") or ""
                    self.policies[rest.rsplit("/", 1)[1]] = parse_policy(rules)
                    return 204, None
                if rest == "auth/token/create" and method in ("POST", "PUT"):
                    return 200, self._create_token(token, body or {})
                if path == "/v1/auth/token/lookup-self" and method == "GET":
                    return 200, _envelope(self._token_data(token, lease, now))
                if path == "/v1/auth/token/renew-self" and method in ("POST", "PUT"):
                    if lease is None:  # a token without a TTL (root) has nothing to renew
                        raise VaultError(400, ["lease is not renewable"])
                    increment = duration_seconds((body or {}).get("increment") or 0)
                    left = lease.renew(now, increment)
                    auth = {"client_token": token, "policies": ["default"], "lease_duration": left}
                    return 200, _envelope(None, auth={**auth, "renewable": lease.renewable})
                if path == "/v1/auth/token/revoke-self" and method in ("POST", "PUT"):
                    self.tokens.discard(token)
                    self.token_policies.pop(token, None)
                    self.leases.pop(token, None)
                    return 204, None
                if method == "PATCH" and not self.metadata_patch:
                    raise VaultError(405, [])  # a Vault from before it: no PATCH at all
                if method == "PATCH" and (content_type or "").split(";")[0].strip() != MERGE_PATCH:
                    raise VaultError(415, [f"PATCH requires Content-Type of {MERGE_PATCH}"])
                return self._route(method, path, query, body)
            except VaultError as exc:
                return exc.status, exc.body

    def _create_token(self, creator: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST auth/token/create (api-docs/auth/token): a token of `policies` (beside `default`
        unless `no_default_policy`), with `ttl` if given; a creator that is not root may only give
        policies it holds."""
        policies = [str(p) for p in body.get("policies") or []]
        held = self.token_policies.get(creator, [])
        if "root" not in held and not set(policies) <= set(held):
            raise VaultError(400, ["child policies must be subset of parent"])
        token = f"hvs.{uuid.uuid4().hex}"
        ttl = duration_seconds(body["ttl"]) if body.get("ttl") else None
        self.tokens.add(token)
        self.token_policies[token] = sorted(
            {*policies, *(() if body.get("no_default_policy") else ("default",))}
        )
        if ttl is not None:
            self.leases[token] = TokenLease(expires=time.monotonic() + ttl, creation_ttl=ttl)
        auth = {"client_token": token, "policies": self.token_policies[token], "lease_duration": ttl or 0}
        return _envelope(None, auth={**auth, "renewable": ttl is not None})

    def _token_data(self, token: str, lease: TokenLease | None, now: float) -> dict[str, Any]:
        """lookup-self's data: a root-like token has ttl 0 and is not renewable."""
        policies = self.token_policies.get(token, ["default"])
        data: dict[str, Any] = {"id": token, "policies": policies, "ttl": 0, "renewable": False}
        if lease is not None:
            data.update(
                ttl=lease.left(now),
                renewable=lease.renewable,
                period=lease.period,
                creation_ttl=lease.creation_ttl,
                explicit_max_ttl=0 if lease.max_expires is None else int(lease.max_expires - lease.created),
            )
        return data

    def _approle_login(self, body: Any) -> dict[str, Any]:
        role_id, secret_id = (body or {}).get("role_id"), (body or {}).get("secret_id")
        if not role_id or self.approles.get(role_id) != secret_id:
            raise VaultError(400, ["invalid role or secret ID"])
        token = f"hvs.{uuid.uuid4().hex}"
        self.tokens.add(token)
        policies = self.approle_policies.get(role_id, ["root"])  # a role without: everything
        self.token_policies[token] = list(policies)
        self.leases[token] = TokenLease(expires=time.monotonic() + 3600, creation_ttl=3600)
        return _envelope(None, auth={"client_token": token, "policies": policies, "lease_duration": 3600})

    def _mount_of(self, rest: str) -> str | None:
        for mount in sorted([*self.mounts, *self.kv1], key=len, reverse=True):
            if rest == mount or rest.startswith(f"{mount}/"):
                return mount
        return None

    def _ui_mount(self, rest: str) -> dict[str, Any]:
        mount = None if self.refuse_mounts_endpoint else self._mount_of(rest.strip("/"))
        if mount is None:
            raise VaultError(403, ["permission denied"])
        return _envelope(
            {
                "type": "kv",
                "path": f"{mount}/",
                "description": "",
                "options": {"version": "1" if mount in self.kv1 else "2"},
                "local": False,
                "seal_wrap": False,
                "external_entropy_access": False,
            }
        )

    def _kv1(self, data: dict[str, dict[str, Any]], method: str, key: str, body: Any) -> tuple[int, Any]:
        if method == "GET":
            if key not in data:
                raise VaultError(404, [])
            return 200, _envelope(data[key])
        if method in ("POST", "PUT"):
            if not isinstance(body, dict) or not body:
                raise VaultError(400, ["no data provided"])
            data[key] = body
            return 204, None
        if method == "DELETE":
            data.pop(key, None)
            return 204, None
        if method == "LIST":
            return 200, self._list(data, key)
        raise VaultError(405, ["unsupported operation"])

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if not path.startswith("/v1/"):
            raise VaultError(404, [])
        rest = path[len("/v1/") :]
        if rest.startswith("sys/internal/ui/mounts/") and method == "GET":
            return 200, self._ui_mount(rest[len("sys/internal/ui/mounts/") :])
        mount = self._mount_of(rest)
        if mount is None or rest == mount:
            raise VaultError(404, [f'no handler for route "{rest}". route entry not found.'])
        if mount in self.kv1:
            return self._kv1(self.kv1[mount], method, rest[len(mount) + 1 :].strip("/"), body)
        secrets = self.mounts[mount]
        config = self.configs[mount]
        endpoint, _, key = rest[len(mount) + 1 :].partition("/")
        key = key.strip("/")
        if endpoint == "config" and not key:
            if method == "GET":
                return 200, _envelope(
                    {
                        "max_versions": config.max_versions,
                        "cas_required": config.cas_required,
                        "delete_version_after": go_duration(config.delete_version_after),
                    }
                )
            if method in ("POST", "PUT"):
                self._configure(config, body or {})
                return 204, None
        if endpoint == "data":
            if method == "GET":
                return 200, self._read(secrets, key, query)
            if method in ("POST", "PUT"):
                return 200, self._write(secrets, key, body)
            if method == "DELETE":
                secret = secrets.get(key)
                if secret is not None and secret.current_version in secret.versions:
                    self._mark_deleted(secret, [secret.current_version])
                return 204, None
        if endpoint == "metadata":
            if method == "LIST":
                return 200, self._list(secrets, key)
            if method == "GET":
                secret = secrets.get(key)
                if secret is None:
                    raise VaultError(404, [])
                return 200, _envelope(secret.metadata())
            if method in ("POST", "PUT"):
                self._update_metadata(secrets, key, body or {})
                return 204, None
            if method == "PATCH":
                self._patch_metadata(secrets, key, body)
                return 204, None
            if method == "DELETE":
                secrets.pop(key, None)
                return 204, None
        if endpoint in ("delete", "undelete", "destroy") and method in ("POST", "PUT"):
            versions = (body or {}).get("versions")
            if not versions or not all(isinstance(v, int) for v in versions):
                raise VaultError(400, ["no version number provided"])
            secret = secrets.get(key)
            if secret is not None and endpoint == "undelete":
                self._undelete(secret, versions, config)
            elif secret is not None:
                {"delete": self._mark_deleted, "destroy": self._destroy}[endpoint](secret, versions)
            return 204, None
        raise VaultError(405, ["unsupported operation"])

    def _read(self, secrets: dict[str, KvSecret], key: str, query: dict[str, str]) -> dict[str, Any]:
        secret = secrets.get(key)
        if secret is None:
            raise VaultError(404, [])
        number = int(query.get("version") or 0) or secret.current_version
        version = secret.versions.get(number)
        if version is None:
            raise VaultError(404, [])
        body = _envelope({"data": version.data, "metadata": version.metadata(number, secret.custom_metadata)})
        if is_past(version.deletion_time) or version.destroyed:
            body["data"]["data"] = None
            raise VaultError(404, body=body)
        return body

    @staticmethod
    def _configure(config: KvConfig, body: dict[str, Any]) -> None:
        if "max_versions" in body:
            config.max_versions = int(body["max_versions"])
        if "cas_required" in body:
            config.cas_required = bool(body["cas_required"])
        if "delete_version_after" in body:
            config.delete_version_after = max(duration_seconds(body["delete_version_after"]), -1)

    def _write(self, secrets: dict[str, KvSecret], key: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise VaultError(400, ["no data provided"])
        options = body.get("options") or {}
        secret = secrets.get(key)
        current = secret.current_version if secret is not None else 0
        cas = options.get("cas")
        config = next(self.configs[m] for m, kept in self.mounts.items() if kept is secrets)
        if cas is None and (config.cas_required or (secret is not None and secret.cas_required)):
            raise VaultError(400, ["check-and-set parameter required for this call"])
        if cas is not None and cas != current:
            raise VaultError(400, [CAS_MISMATCH])
        if secret is None:
            secret = secrets[key] = KvSecret()
        number = secret.current_version + 1
        now_ns = time.time_ns()
        now = vault_time(now_ns)
        secret.versions[number] = KvVersion(
            data=body["data"], created_time=now, deletion_time=config.deletion_time(secret, now_ns)
        )
        secret.current_version = number
        secret.updated_time = now
        limit = max(secret.max_versions, config.max_versions) or DEFAULT_MAX_VERSIONS
        while len(secret.versions) > limit:
            del secret.versions[min(secret.versions)]
        secret.oldest_version = min(secret.versions)
        return _envelope(secret.versions[number].metadata(number, secret.custom_metadata))

    def _update_metadata(
        self, secrets: dict[str, KvSecret], key: str, body: dict[str, Any], *, check_custom: bool = True
    ) -> None:
        custom = body.get("custom_metadata")
        if custom is not None and check_custom:
            _check_custom_metadata(custom)
        max_versions = body.get("max_versions")
        # Vault's field is a TypeInt: an integer, or text that parses as one.
        if max_versions is not None and (
            isinstance(max_versions, bool) or not str(max_versions).lstrip("-").isdigit()
        ):
            raise VaultError(400, ['error converting input for field "max_versions"'])
        secret = secrets.setdefault(key, KvSecret())
        if max_versions is not None:
            secret.max_versions = int(max_versions)
        if "cas_required" in body:
            secret.cas_required = bool(body["cas_required"])
        if "delete_version_after" in body:
            seconds = duration_seconds(body["delete_version_after"])
            if seconds < 0:
                raise VaultError(400, ["delete_version_after cannot be negative"])
            secret.delete_version_after = str(body["delete_version_after"])
        if custom is not None:
            secret.custom_metadata = dict(custom)
        secret.updated_time = vault_time()

    def _patch_metadata(self, secrets: dict[str, KvSecret], key: str, patch: Any) -> None:
        """A JSON merge patch of an existing secret's metadata, in one step under the server's lock
        (as Vault applies it in one storage write): custom_metadata merged key by key, a key set to
        null removed (custom_metadata null: all of it), other fields replaced. As Vault's
        pathMetadataPatch does, the custom_metadata the patch sets (its nulls left out) is checked as
        a POST's is, before the secret is looked up; the merged result is not (it may hold more
        than 64 keys: another writer's keys plus the patch's)."""
        if not isinstance(patch, dict):
            raise VaultError(400, ["the merge patch must be a JSON object"])
        changes = patch.get("custom_metadata")
        if changes is not None:
            if not isinstance(changes, dict):
                raise VaultError(400, ["custom_metadata validation failed: at most 64 keys of strings"])
            _check_custom_metadata({k: v for k, v in changes.items() if v is not None})
        secret = secrets.get(key)
        if secret is None:
            raise VaultError(404, [])
        result: dict[str, Any] = {}
        for field_name in ("max_versions", "cas_required", "delete_version_after"):
            if field_name in patch and patch[field_name] is not None:
                result[field_name] = patch[field_name]
        if "custom_metadata" in patch:
            custom = dict(secret.custom_metadata or {})
            for k, v in (changes or {}).items():
                if v is None:
                    custom.pop(k, None)
                else:
                    custom[k] = v
            result["custom_metadata"] = custom if changes is not None else {}
        self._update_metadata(secrets, key, result, check_custom=False)

    def _list(self, secrets: dict[str, Any], folder: str) -> dict[str, Any]:
        prefix = f"{folder}/" if folder else ""
        keys = set()
        for key in secrets:
            if key.startswith(prefix):
                head, sep, _ = key[len(prefix) :].partition("/")
                keys.add(head + sep)
        if not keys:
            raise VaultError(404, [])
        return _envelope({"keys": sorted(keys)})

    @staticmethod
    def _mark_deleted(secret: KvSecret, versions: list[int]) -> None:
        for number in versions:
            version = secret.versions.get(number)
            if version is not None and not version.destroyed and not is_past(version.deletion_time):
                version.deletion_time = vault_time()
        secret.updated_time = vault_time()

    @staticmethod
    def _undelete(secret: KvSecret, versions: list[int], config: KvConfig) -> None:
        for number in versions:
            version = secret.versions.get(number)
            if version is not None and not version.destroyed:
                version.deletion_time = config.deletion_time(secret, time.time_ns())
        secret.updated_time = vault_time()

    @staticmethod
    def _destroy(secret: KvSecret, versions: list[int]) -> None:
        for number in versions:
            version = secret.versions.get(number)
            if version is not None:
                version.destroyed = True
                version.data = None
        secret.updated_time = vault_time()


def _envelope(data: Any, *, auth: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": auth,
        "mount_type": "kv",
    }


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeVault
    protocol_version = "HTTP/1.1"  # keep-alive, as Vault: the store's session reuses connections

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
        # back until the client's delayed ACK, some 40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._answer(400, {"errors": ["failed to parse JSON input"]})
            return
        # The Content-Type matters to a PATCH only (tests that wrap `handle` take four arguments).
        extra = {"content_type": self.headers.get("Content-Type")} if self.command == "PATCH" else {}
        state = self.server_state
        namespace = (self.headers.get("X-Vault-Namespace") or "").strip().strip("/")
        if namespace:
            state = state.namespace(namespace)
        status, answer = state.handle(
            self.command, self.path, self.headers.get("X-Vault-Token"), body, **extra
        )
        self._answer(status, answer)

    def _answer(self, status: int, answer: Any) -> None:
        payload = b"" if answer is None else json.dumps(answer).encode("utf-8")
        self.send_response(status)
        if answer is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass
