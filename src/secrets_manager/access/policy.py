"""Access control: identities → roles → rules (path glob + capabilities, or deny).

The decision for (identity, capability, name), in this order:

1. a name that is not a valid secret name, or an identity with no roles: denied;
2. a matching rule of any of the identity's roles that denies the capability: denied
   (an explicit deny wins over every allow, whichever role it comes from);
3. a matching rule that grants the capability: allowed;
4. otherwise: denied (default deny).

`admin` stands for every capability, in grants and denies alike: granting it grants all six;
`deny = ["admin"]` (or `deny = true`) denies all six; and a request *for* admin on a name is denied
by any deny that matches the name, since it no longer holds every capability there.

A role may be held only from some networks (`bound_cidrs`, as Vault's certificate roles bind
theirs): from any other address, or one not known, the identity does not hold it, so its rules,
grants and denies alike, do not apply there (`Policy.roles_of(identity, address)`). A client
certificate copied off its host is then no use elsewhere.

A `[revoked]` table lists client certificates the service refuses whatever their identity's roles
(`Policy.revocation`): `serials` (hex, as `openssl x509 -serial` or `pki issue` print them) and
`fingerprints` (SHA-256, as `openssl x509 -fingerprint -sha256` prints them), colons and case as
you like. A serial is unique only per CA, so with several CAs in `client_ca` it may cut off another
CA's certificate too; a fingerprint is unique everywhere.

Names are learned three ways. ListSecrets shows the names the caller may `list`. BatchGetSecrets by
prefix and Watch show the names it may `read` (what `get_credentials()` fetches and keeps fresh),
except those on which `list` is explicitly denied (`enumerable_by_read`): a deny of `list` hides a
name from every enumeration, while a named read of it may still be allowed.

Invariant: this module is pure. Only `load_policy` touches the file system, and it reads one file.
A policy that does not parse, names an unknown capability, key or role, or has a malformed glob is
rejected whole with an InvalidInputError naming the file and the place, never half-applied.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from secrets_manager.access.patterns import Glob, GlobError, compile_glob
from secrets_manager.environment import Environment, loose_file_problem, open_in_directory
from secrets_manager.errors import InvalidInputError, file_not_found
from secrets_manager.store.names import validate_name


class Capability(StrEnum):
    READ = "read"
    LIST = "list"
    WRITE = "write"
    DELETE = "delete"
    ROTATE = "rotate"
    ADMIN = "admin"


ALL_CAPABILITIES = frozenset(Capability)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Unchecked(Enum):
    UNCHECKED = "unchecked"


# The address argument of an offline question (`policy explain` without --from, tests): every role
# counts, whatever networks it is bound to. The service always gives its caller's address, or None
# where it cannot tell it, which no bound role admits.
UNCHECKED: Final = _Unchecked.UNCHECKED
Address = IPAddress | None | _Unchecked
MAX_POLICY_BYTES = 1024 * 1024
_DECISIONS_KEPT = 100_000  # a bound on `Policy.allows`'s memory, not a policy
_CAPABILITY_NAMES = ", ".join(c.value for c in Capability)
_MAX_SERIAL_BYTES = 20  # RFC 5280 4.1.2.2
_HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True)
class Rule:
    """One line of a role: which names (`path`), what it grants (`allow`) or denies (`deny`)."""

    path: str
    allow: frozenset[Capability] = frozenset()
    deny: frozenset[Capability] = frozenset()
    pattern: Glob = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", compile_glob(self.path))  # raises GlobError

    def matches(self, name: str) -> bool:
        return self.pattern.matches(name)


@dataclass(frozen=True)
class Role:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    bound_cidrs: tuple[IPNetwork, ...] = ()  # empty: held from anywhere

    def admits(self, address: Address) -> bool:
        """Whether a caller at `address` holds this role: always if it is bound to no network."""
        if not self.bound_cidrs or address is UNCHECKED:
            return True
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's IPv4 caller (::ffff:10.0.0.5)
        return any(address in network for network in self.bound_cidrs)


@dataclass(frozen=True)
class Decision:
    """Why a request was allowed or denied, for the audit log: the deciding role and rule if any."""

    allowed: bool
    identity: str
    capability: Capability
    name: str
    reason: str
    role: str | None = None
    rule: Rule | None = None

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class Policy:
    """A parsed policy file. Build it with `Policy.parse` or `load_policy`."""

    identities: Mapping[str, tuple[str, ...]]
    roles: Mapping[str, Role]
    source: str = "<policy>"
    revoked_serials: frozenset[int] = frozenset()
    revoked_fingerprints: frozenset[bytes] = frozenset()  # SHA-256 of the certificate's DER
    # The SHA-256 (hex) of the file's bytes as `load_policy` read them, as `sha256sum` prints it:
    # the audit records of serve's start and of each reload name the policy in force by it.
    digest: str = field(default="", compare=False)
    # Decisions already made: a policy never changes (a reload builds a new one), so neither do
    # they, and the service asks the same few questions on every request.
    _allowed: dict[tuple[tuple[str, ...], str, str], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _enumerable: dict[tuple[tuple[str, ...], str], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    binds_addresses: bool = field(init=False, repr=False, compare=False)  # a role has bound_cidrs

    def __post_init__(self) -> None:
        object.__setattr__(self, "binds_addresses", any(role.bound_cidrs for role in self.roles.values()))

    @classmethod
    def parse(cls, text: str, source: str = "<policy>") -> Policy:
        """Parse policy TOML; raises InvalidInputError naming `source` and the problem."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"{source}: not valid TOML: {exc}") from None
        return _build(doc, source)

    def roles_of(self, identity: str, address: Address = UNCHECKED) -> tuple[str, ...]:
        """The roles an identity holds, from `address`: () for an identity the policy does not
        name; a role bound to networks that do not hold `address` is not held from there."""
        held = self.identities.get(identity, ())
        if address is UNCHECKED or not self.binds_addresses:
            return held
        return tuple(role for role in held if self.roles[role].admits(address))

    def decide(
        self, identity: str, capability: Capability | str, name: str, address: Address = UNCHECKED
    ) -> Decision:
        """The decision with its reason. Raises only for an unknown capability (a caller bug)."""
        wanted = _capability(capability)

        def verdict(
            allowed: bool, reason: str, role: str | None = None, rule: Rule | None = None
        ) -> Decision:
            return Decision(allowed, identity, wanted, name, reason, role, rule)

        if not _is_valid_name(name):
            return verdict(False, "not a valid secret name")
        roles = self.roles_of(identity, address)
        if not roles:
            if self.roles_of(identity):
                where = "an address it cannot tell" if address is None else str(address)
                return verdict(False, f"its roles are bound to networks that do not hold {where}")
            return verdict(False, "identity has no roles")
        grant: tuple[str, Rule] | None = None
        for role_name in roles:
            for rule in self.roles[role_name].rules:
                if not rule.matches(name):
                    continue
                if wanted in rule.deny or (wanted is Capability.ADMIN and rule.deny):
                    return verdict(False, f"denied by role {role_name} rule {rule.path!r}", role_name, rule)
                if grant is None and wanted in rule.allow:
                    grant = (role_name, rule)
        if grant is None:
            return verdict(False, "no rule grants it")
        role_name, rule = grant
        return verdict(True, f"allowed by role {role_name} rule {rule.path!r}", role_name, rule)

    def allows(
        self, identity: str, capability: Capability | str, name: str, address: Address = UNCHECKED
    ) -> bool:
        """True only if a rule grants `capability` on `name` and no rule denies it."""
        if not (isinstance(identity, str) and isinstance(capability, str) and isinstance(name, str)):
            return self.decide(identity, capability, name, address).allowed  # denied, never cached
        question = (self.roles_of(identity, address), capability, name)  # the roles decide, not who
        allowed = self._allowed.get(question)
        if allowed is None:
            allowed = self.decide(identity, capability, name, address).allowed
            if len(self._allowed) >= _DECISIONS_KEPT:
                self._allowed.clear()
            self._allowed[question] = allowed
        return allowed

    def granted(
        self,
        identity: str,
        name: str,
        address: Address = UNCHECKED,
        capabilities: Iterable[Capability] = tuple(Capability),
    ) -> tuple[Decision, ...]:
        """The decisions that allow `identity` one of `capabilities` on `name`, in that order, each
        naming the role and rule that grant it: `decide`'s, which `allows` (what the service asks
        before every call) caches, so `policy explain` answers with the code that authorises."""
        decisions = (self.decide(identity, capability, name, address) for capability in capabilities)
        return tuple(decision for decision in decisions if decision.allowed)

    def revocation(self, serial: int | None, fingerprint: bytes | None) -> str | None:
        """Why the service refuses a client certificate with this serial number and SHA-256
        fingerprint, whatever its identity may do; None if it is not revoked. A certificate
        not known (None) is refused once anything is revoked: it cannot be checked."""
        if not (self.revoked_serials or self.revoked_fingerprints):
            return None
        if serial is None or fingerprint is None:
            return "the client certificate cannot be checked against the revoked certificates"
        if fingerprint in self.revoked_fingerprints:
            return "certificate revoked (its SHA-256 fingerprint is in the policy's [revoked] list)"
        if serial in self.revoked_serials:
            return "certificate revoked (its serial number is in the policy's [revoked] list)"
        return None

    def filter_names(
        self,
        identity: str,
        capability: Capability | str,
        names: Iterable[str],
        address: Address = UNCHECKED,
    ) -> list[str]:
        """The names (in their order) on which `identity` holds `capability`; invalid names dropped."""
        wanted = _capability(capability)
        if not self.roles_of(identity, address):
            return []
        return [name for name in names if self.allows(identity, wanted, name, address)]

    def enumerable_by_read(self, identity: str, name: str, address: Address = UNCHECKED) -> bool:
        """Whether batch get by prefix and watch may show `name` to `identity`: it may read it and
        no rule explicitly denies it `list` there (a deny wins on every path that reveals names)."""
        if not (isinstance(identity, str) and isinstance(name, str)):
            return False
        question = (self.roles_of(identity, address), name)
        shown = self._enumerable.get(question)
        if shown is None:
            shown = self.allows(identity, Capability.READ, name, address) and not self.denies_explicitly(
                identity, Capability.LIST, name, address
            )
            if len(self._enumerable) >= _DECISIONS_KEPT:
                self._enumerable.clear()
            self._enumerable[question] = shown
        return shown

    def filter_enumerable_by_read(
        self, identity: str, names: Iterable[str], address: Address = UNCHECKED
    ) -> list[str]:
        """The names (in their order) that `enumerable_by_read` lets `identity` see."""
        if not self.roles_of(identity, address):
            return []
        return [name for name in names if self.enumerable_by_read(identity, name, address)]

    def denies_explicitly(
        self, identity: str, capability: Capability | str, name: str, address: Address = UNCHECKED
    ) -> bool:
        """True if a rule denies `capability` on `name` (not merely that no rule grants it)."""
        decision = self.decide(identity, capability, name, address)
        return not decision.allowed and decision.rule is not None


def load_policy(path: str | Path, *, environment: Environment | None = None) -> Policy:
    """Read and parse a policy file (UTF-8 TOML): a regular file of at most 1 MiB, so a wrong
    path (a FIFO, /dev/zero) is refused, not waited on or read without end.

    With `environment` (the service's), a file whose writer could make itself admin (another
    user's, writable by group or others, in a directory they may write) is refused in production
    and a warning elsewhere (`Environment.guard`)."""
    source = str(path)
    try:
        fd, folder = open_in_directory(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise file_not_found("policy file", source) from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read policy file {source}: {exc.strerror}") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise InvalidInputError(f"policy file {source} is not a regular file")
        if environment is not None:
            environment.guard(loose_file_problem(source, found, "policy file", folder=folder))
        data = os.read(fd, MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise InvalidInputError(f"cannot read policy file {source}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_POLICY_BYTES:
        raise InvalidInputError(f"policy file {source} is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{source}: not UTF-8 text") from None
    return replace(Policy.parse(text, source), digest=hashlib.sha256(data).hexdigest())


# ---- parsing --------------------------------------------------------------------------------------


def _build(doc: dict[str, Any], source: str) -> Policy:
    unknown = sorted(set(doc) - {"identities", "roles", "revoked"})
    if unknown:
        raise _problem(
            source,
            unknown[0],
            "unknown key; a policy has only [identities], [roles.NAME] and [revoked] tables",
        )
    serials, fingerprints = _build_revoked(doc.get("revoked", {}), source)

    raw_roles = doc.get("roles", {})
    if not isinstance(raw_roles, dict):
        raise _problem(source, "roles", "must be a table of roles, e.g. [roles.auth-reader]")
    roles: dict[str, Role] = {}
    for role_name, raw_role in raw_roles.items():
        roles[role_name] = _build_role(role_name, raw_role, source)

    raw_identities = doc.get("identities", {})
    if not isinstance(raw_identities, dict):
        raise _problem(source, "identities", 'must be a table: "identity" = ["role", ...]')
    identities: dict[str, tuple[str, ...]] = {}
    for identity, role_names in raw_identities.items():
        where = f'identities."{identity}"'
        if not identity.strip() or identity != identity.strip():
            raise _problem(source, where, "an identity must be non-empty and have no surrounding spaces")
        if not isinstance(role_names, list) or not all(isinstance(r, str) for r in role_names):
            raise _problem(source, where, "must be a list of role names")
        for role_name in role_names:
            if role_name not in roles:
                raise _problem(
                    source, where, f"role {role_name!r} is not defined (add a [roles.{role_name}] table)"
                )
        identities[identity] = tuple(dict.fromkeys(role_names))
    return Policy(MappingProxyType(identities), MappingProxyType(roles), source, serials, fingerprints)


def _build_revoked(raw: Any, source: str) -> tuple[frozenset[int], frozenset[bytes]]:
    if not isinstance(raw, dict):
        raise _problem(source, "revoked", 'must be a table: serials = ["3F2A..."], fingerprints = [...]')
    unknown = sorted(set(raw) - {"serials", "fingerprints"})
    if unknown:
        raise _problem(
            source, f"revoked.{unknown[0]}", "unknown key; [revoked] has 'serials' and 'fingerprints'"
        )
    serials = {
        _serial(text, f"revoked.serials[{i}]", source)
        for i, text in enumerate(_strings(raw.get("serials", []), "revoked.serials", source))
    }
    fingerprints = {
        _fingerprint(text, f"revoked.fingerprints[{i}]", source)
        for i, text in enumerate(_strings(raw.get("fingerprints", []), "revoked.fingerprints", source))
    }
    return frozenset(serials), frozenset(fingerprints)


def _strings(raw: Any, where: str, source: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise _problem(source, where, "must be a list of strings")
    return raw


def hex_digits(text: str, label: str) -> str | None:
    """The hex digits of `text` without colons and an optional `label=` (openssl's
    `serial=…`, `sha256 Fingerprint=…`), or None if that leaves anything else."""
    digits = text.strip()
    if digits.lower().startswith(label):
        digits = digits[len(label) :]
    digits = digits.replace(":", "")
    return digits if _HEX.fullmatch(digits) else None


def _serial(text: str, where: str, source: str) -> int:
    digits = hex_digits(text, "serial=")
    if digits is None:
        raise _problem(source, where, f"{text!r} is not a serial number in hex (like 3F2A... or 3f:2a:...)")
    serial = int(digits, 16)
    if serial.bit_length() > 8 * _MAX_SERIAL_BYTES:
        raise _problem(
            source,
            where,
            f"longer than a serial number (at most {_MAX_SERIAL_BYTES} bytes); "
            "a SHA-256 fingerprint goes in [revoked] fingerprints",
        )
    return serial


def _fingerprint(text: str, where: str, source: str) -> bytes:
    digits = hex_digits(text, "sha256 fingerprint=")
    if digits is None or len(digits) != 64:
        raise _problem(
            source,
            where,
            f"{text!r} is not a SHA-256 fingerprint: 64 hex digits, colons allowed, as "
            "'openssl x509 -noout -fingerprint -sha256 -in CERT' or 'pki issue' print it",
        )
    return bytes.fromhex(digits)


def _problem(source: str, where: str, problem: str) -> InvalidInputError:
    return InvalidInputError(f"{source}: {where}: {problem}")


def _build_role(role_name: str, raw_role: Any, source: str) -> Role:
    where = f"roles.{role_name}"
    if not isinstance(raw_role, dict):
        raise _problem(source, where, "must be a table with a 'rules' list")
    unknown = sorted(set(raw_role) - {"rules", "description", "bound_cidrs"})
    if unknown:
        raise _problem(
            source,
            f"{where}.{unknown[0]}",
            "unknown key; a role has 'rules', and an optional 'description' and 'bound_cidrs'",
        )
    description = raw_role.get("description", "")
    if not isinstance(description, str):
        raise _problem(source, f"{where}.description", "must be a string")
    raw_rules = raw_role.get("rules")
    if not isinstance(raw_rules, list):
        raise _problem(
            source,
            where,
            'needs a \'rules\' list, e.g. rules = [ { path = "auth/*", capabilities = ["read"] } ]',
        )
    rules = tuple(
        _build_rule(raw_rule, f"{where}.rules[{i}]", source) for i, raw_rule in enumerate(raw_rules)
    )
    bound = tuple(
        _network(text, f"{where}.bound_cidrs[{i}]", source)
        for i, text in enumerate(_strings(raw_role.get("bound_cidrs", []), f"{where}.bound_cidrs", source))
    )
    if "bound_cidrs" in raw_role and not bound:
        raise _problem(
            source,
            f"{where}.bound_cidrs",
            "an empty list would bind the role to no network: leave 'bound_cidrs' out to hold it "
            "from anywhere",
        )
    return Role(role_name, rules, description, bound)


def _network(text: str, where: str, source: str) -> IPNetwork:
    """A CIDR block ("10.0.1.0/24", "fd00::/8") or one address (a /32 or /128)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise _problem(
            source,
            where,
            f"{text!r} is not a network: write an address or a CIDR block such as 10.0.1.0/24 ({exc})",
        ) from None


def _build_rule(raw_rule: Any, where: str, source: str) -> Rule:
    if not isinstance(raw_rule, dict):
        raise _problem(source, where, 'must be a table like { path = "auth/*", capabilities = ["read"] }')
    unknown = sorted(set(raw_rule) - {"path", "capabilities", "deny"})
    if unknown:
        raise _problem(
            source, f"{where}.{unknown[0]}", "unknown key; a rule has 'path' and 'capabilities' or 'deny'"
        )
    path = raw_rule.get("path")
    if not isinstance(path, str):
        raise _problem(source, where, "needs a 'path' glob string")
    has_allow, has_deny = "capabilities" in raw_rule, "deny" in raw_rule
    if has_allow == has_deny:
        raise _problem(source, where, "give exactly one of 'capabilities' (grant) or 'deny'")
    allow: frozenset[Capability] = frozenset()
    deny: frozenset[Capability] = frozenset()
    if has_allow:
        allow = _capability_set(raw_rule["capabilities"], f"{where}.capabilities", source)
    else:
        raw_deny = raw_rule["deny"]
        if raw_deny is True:
            deny = ALL_CAPABILITIES
        elif isinstance(raw_deny, bool):
            raise _problem(
                source, f"{where}.deny", "deny = false means nothing; remove the rule or list capabilities"
            )
        else:
            deny = _capability_set(raw_deny, f"{where}.deny", source)
    try:
        return Rule(path, allow, deny)
    except GlobError as exc:
        raise _problem(source, f"{where}.path", str(exc)) from None


def _capability_set(raw: Any, where: str, source: str) -> frozenset[Capability]:
    if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
        raise _problem(source, where, f"must be a non-empty list of capabilities ({_CAPABILITY_NAMES})")
    found = set()
    for name in raw:
        try:
            found.add(Capability(name))
        except ValueError:
            raise _problem(
                source, where, f"unknown capability {name!r} (expected one of {_CAPABILITY_NAMES})"
            ) from None
    return ALL_CAPABILITIES if Capability.ADMIN in found else frozenset(found)


def _capability(value: Capability | str) -> Capability:
    try:
        return Capability(value)
    except ValueError:
        raise InvalidInputError(
            f"unknown capability {value!r} (expected one of {_CAPABILITY_NAMES})"
        ) from None


def _is_valid_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    try:
        validate_name(name)
    except InvalidInputError:
        return False
    return True
