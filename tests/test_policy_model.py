"""The access decision against a reference written from the documented semantics, over generated
policies, identities, addresses and names (hypothesis).

The reference (`Reference` below) is written from README.md's "policy.toml" section and
access/patterns.py's and access/policy.py's docstrings, not from their code: names are checked
character by character, globs are matched by a memoised walk over glob tokens and name
characters (no regular expressions), and the decision is the documented order: an invalid name or
an identity holding no role from the address is denied; a matching rule that denies the capability
(`admin` or `deny = true` deny all six; a request for `admin` is denied by any matching deny) wins
over every allow; a matching rule that grants it (`admin` grants all six) allows; else denied.

Every public question the service asks of a `Policy` (`decide`, `allows` with its cache, `granted`,
`filter_names`, `enumerable_by_read`, `filter_enumerable_by_read`, `denies_explicitly`) is compared
with it, and `compile_glob`'s refusals with the reference's idea of a malformed glob. Names include
`..`, `.`, `//`, a trailing or leading `/`, percent-encoding, look-alikes, NFC/NFD forms, control
characters, glob metacharacters and names at and past the 256-character limit.
"""

from __future__ import annotations

import ipaddress
import json
import string
import unicodedata
from dataclasses import dataclass, replace
from functools import cache, lru_cache

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from secrets_manager.access import Capability, Policy
from secrets_manager.access.patterns import GlobError, compile_glob
from secrets_manager.access.policy import UNCHECKED, Address

MODEL = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CAPABILITIES = ("read", "list", "write", "delete", "rotate", "admin")
FIVE = frozenset(CAPABILITIES) - {"admin"}

# ---- the reference ----------------------------------------------------------------------------

_FIRST = frozenset(string.ascii_letters + string.digits + "_")
_REST = _FIRST | frozenset(".-")
_GLOB_CHARACTERS = _REST | frozenset("*?")


def reference_valid_name(name: object) -> bool:
    """README "Names": segments joined by '/', each starting with an ASCII letter, digit or '_'
    and going on with those, '.' and '-'; at most 256 characters."""
    if not isinstance(name, str) or not name or len(name) > 256:
        return False
    for segment in name.split("/"):
        if not segment or segment[0] not in _FIRST or any(c not in _REST for c in segment[1:]):
            return False
    return True


def reference_valid_glob(glob: str) -> bool:
    """patterns.py: refused if empty, with '***', an empty segment, a '.' or '..' segment, or a
    character no name holds (other than the wildcards '*' and '?')."""
    if not glob or "***" in glob:
        return False
    for segment in glob.split("/"):
        if not segment or segment in (".", "..") or any(c not in _GLOB_CHARACTERS for c in segment):
            return False
    return True


# Glob tokens: a literal character, or one of these.
ONE = "?"  # exactly one character other than '/'
RUN = "*"  # any run of characters other than '/'
ANY = "**"  # `**` inside a segment: any run of characters, '/' included
SEGMENTS = "**/"  # a whole-segment `**` that is not the last: zero or more whole segments
TAIL = "/**"  # a last whole-segment `**` after a '/': one or more whole segments
EVERYTHING = "(**)"  # the glob `**` alone: every name


def _tokens(glob: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    segments = glob.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            if last:
                out.append(("op", TAIL if index else EVERYTHING))
            else:
                out.append(("op", SEGMENTS))  # its own '/' is part of it
            continue
        i = 0
        while i < len(segment):
            if segment.startswith("**", i):
                out.append(("op", ANY))
                i += 2
            elif segment[i] == "*":
                out.append(("op", RUN))
                i += 1
            elif segment[i] == "?":
                out.append(("op", ONE))
                i += 1
            else:
                out.append(("lit", segment[i]))
                i += 1
        if not last:
            out.append(("lit", "/"))
    return tuple(out)


@lru_cache(maxsize=100_000)
def reference_matches(glob: str, name: str) -> bool:
    """Whether `glob` matches the valid name `name` as the docs describe, by a walk over
    (token, position) pairs, each decided once."""
    tokens = _tokens(glob)

    @cache
    def walk(t: int, p: int) -> bool:
        if t == len(tokens):
            return p == len(name)
        kind, value = tokens[t]
        if kind == "lit":
            return p < len(name) and name[p] == value and walk(t + 1, p + 1)
        if value == ONE:
            return p < len(name) and name[p] != "/" and walk(t + 1, p + 1)
        if value == RUN:
            q = p
            while True:
                if walk(t + 1, q):
                    return True
                if q == len(name) or name[q] == "/":
                    return False
                q += 1
        if value in (ANY, EVERYTHING):
            return any(walk(t + 1, q) for q in range(p, len(name) + 1))
        if value == SEGMENTS:
            # zero segments, or one whole segment with its '/' and then again
            if walk(t + 1, p):
                return True
            slash = name.find("/", p)
            return slash > p and walk(t, slash + 1)
        if value == TAIL:
            # one or more whole segments to the end of the (valid) name: anything but nothing
            return p < len(name)
        raise AssertionError(value)

    return walk(0, 0)


@dataclass(frozen=True)
class RuleModel:
    glob: str
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()
    deny_all: bool = False  # `deny = true`

    def toml(self) -> str:
        if self.deny_all:
            return f"{{ path = {json.dumps(self.glob)}, deny = true }}"
        key, caps = ("capabilities", self.allow) if self.allow else ("deny", self.deny)
        return f"{{ path = {json.dumps(self.glob)}, {key} = {json.dumps(sorted(caps))} }}"

    def grants(self, capability: str) -> bool:
        return capability in self.allow or "admin" in self.allow

    def denies(self, capability: str) -> bool:
        if self.deny_all or "admin" in self.deny:
            return True
        if capability == "admin":
            return bool(self.deny)  # admin is every capability: any deny takes it away
        return capability in self.deny


@dataclass(frozen=True)
class RoleModel:
    rules: tuple[RuleModel, ...]
    bound: tuple[str, ...] = ()

    def held_from(self, address: Address) -> bool:
        if not self.bound or address is UNCHECKED:
            return True
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in ipaddress.ip_network(block) for block in self.bound)


@dataclass(frozen=True)
class PolicyModel:
    roles: dict[str, RoleModel]
    identities: dict[str, tuple[str, ...]]

    def toml(self) -> str:
        lines = ["[identities]"]
        lines += [f"{json.dumps(who)} = {json.dumps(list(roles))}" for who, roles in self.identities.items()]
        for role_name, role in self.roles.items():
            lines.append(f"[roles.{role_name}]")
            if role.bound:
                lines.append(f"bound_cidrs = {json.dumps(list(role.bound))}")
            lines.append("rules = [" + ", ".join(rule.toml() for rule in role.rules) + "]")
        return "\n".join(lines) + "\n"

    def matching_rules(self, identity: str, name: str, address: Address) -> list[RuleModel]:
        held = [self.roles[r] for r in self.identities.get(identity, ()) if self.roles[r].held_from(address)]
        return [rule for role in held for rule in role.rules if reference_matches(rule.glob, name)]

    def holds_a_role(self, identity: str, address: Address) -> bool:
        return any(self.roles[r].held_from(address) for r in self.identities.get(identity, ()))

    def allows(self, identity: str, capability: str, name: str, address: Address = UNCHECKED) -> bool:
        if not reference_valid_name(name) or not self.holds_a_role(identity, address):
            return False
        rules = self.matching_rules(identity, name, address)
        if any(rule.denies(capability) for rule in rules):
            return False
        return any(rule.grants(capability) for rule in rules)

    def denies_explicitly(self, identity: str, capability: str, name: str, address: Address) -> bool:
        if not reference_valid_name(name) or not self.holds_a_role(identity, address):
            return False
        return any(rule.denies(capability) for rule in self.matching_rules(identity, name, address))

    def enumerable_by_read(self, identity: str, name: str, address: Address = UNCHECKED) -> bool:
        """README: BatchGetSecrets by prefix and Watch show the names it may `read`; a deny of
        `list` hides a name from them."""
        return self.allows(identity, "read", name, address) and not self.denies_explicitly(
            identity, "list", name, address
        )


# ---- generators -------------------------------------------------------------------------------

# Pieces chosen to meet each other: prefixes of one another (`auth`, `auth-admin`, `authz`), case
# variants, and the characters the wildcards must not cross.
WORDS = ["auth", "auth-admin", "authz", "AUTH", "Auth", "a", "b", "ab", "KEY", "API_KEY", "x.y", "_", "k-1"]
GLOB_SEGMENTS = [
    *WORDS,
    "*",
    "?",
    "**",
    "a*",
    "*KEY",
    "*_KEY",
    "auth*",
    "auth**",
    "a?",
    "?b",
    "a**b",
    "**KEY",
    "*.*",
    "k-?",
]
# Segments no name has: the globs that hold them must be refused when the policy is read.
BAD_GLOB_SEGMENTS = ["", ".", "..", "***", "a***", "[ab]", "{a,b}", "a b", "\u0430uth", "%2e", "a\x00"]

NFC_E = "\u00e9"  # é as one code point
NFD_E = unicodedata.normalize("NFD", NFC_E)  # e + COMBINING ACUTE ACCENT
ODD_SEGMENTS = [
    "..",
    ".",
    "",
    "%2e%2e",
    "%2F",
    "auth%2fKEY",
    "\u0430uth",  # CYRILLIC SMALL LETTER A
    "\uff41uth",  # fullwidth a
    "auth\u2215KEY",  # division slash
    "AUTH\u212a",  # KELVIN SIGN, which case-folds to 'k'
    f"caf{NFC_E}",
    f"caf{NFD_E}",
    "KEY\x00",
    "KEY\n",
    "\x7f",
    "\t",
    "K EY",
    "*",
    "**",
    "?",
    "[a]",
    "a*",
    "-KEY",
    ".KEY",
    "KEY.",
    "\\",
    "\u200bKEY",
    "\u0130",  # I WITH DOT ABOVE: lower() makes two code points
]

words = st.sampled_from(WORDS)
segments = st.one_of(words, words, words, st.sampled_from(ODD_SEGMENTS))
valid_names = st.lists(words, min_size=1, max_size=4).map("/".join)
NEAR = ("auth/KEY", "auth/API_KEY", "auth-admin/KEY", "authz/a/b", "AUTH/x.y", "a/b/KEY", "k-1")


@st.composite
def names(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        return draw(valid_names)
    if kind <= 7:
        name = "/".join(draw(st.lists(segments, min_size=1, max_size=5)))
        if draw(st.booleans()):
            name = draw(st.sampled_from(["/", "//", "./", "../"])) + name
        if draw(st.booleans()):
            name += draw(st.sampled_from(["/", "//", "/.", "/..", "%00", "\x00"]))
        return name
    if kind == 8:  # about the length limit: 255 to 258 characters
        head = draw(valid_names)
        length = draw(st.integers(255, 258))
        return (head + "/" + "A" * length)[:length] if len(head) + 2 <= length else head
    return draw(st.text(max_size=12))


@st.composite
def globs_near(draw: st.DrawFn, name: str) -> str:
    """A glob made from `name`, so that it matches it or just misses it: each segment kept, made a
    wildcard, cut to a prefix with `*` or `**`, a character made `?`; perhaps cut short with `**`."""
    out = []
    for segment in name.split("/"):
        kind = draw(st.integers(0, 6))
        if kind <= 2:
            out.append(segment)
        elif kind == 3:
            out.append(draw(st.sampled_from(["*", "**"])))
        elif kind == 4:
            out.append(segment[: draw(st.integers(0, len(segment)))] + draw(st.sampled_from(["*", "**"])))
        elif kind == 5:
            i = draw(st.integers(0, len(segment) - 1))
            out.append(segment[:i] + "?" + segment[i + 1 :])
        else:
            out.append(segment.swapcase() if segment.swapcase() != segment else segment + "x")
    if len(out) > 1 and draw(st.booleans()):
        out = [*out[: draw(st.integers(1, len(out) - 1))], "**"]
    return "/".join(out)


@st.composite
def globs(draw: st.DrawFn, near: tuple[str, ...] = ()) -> str:
    if near and draw(st.booleans()):
        return draw(globs_near(draw(st.sampled_from(near))))
    return "/".join(draw(st.lists(st.sampled_from(GLOB_SEGMENTS), min_size=1, max_size=4)))


@st.composite
def rules(draw: st.DrawFn, near: tuple[str, ...] = ()) -> RuleModel:
    glob = draw(globs(near))
    kind = draw(st.integers(0, 5))
    capabilities = st.frozensets(st.sampled_from(CAPABILITIES), min_size=1, max_size=3)
    if kind <= 3:
        return RuleModel(glob, allow=draw(capabilities))
    if kind == 4:
        return RuleModel(glob, deny=draw(capabilities))
    return RuleModel(glob, deny_all=True)


IDENTITIES = [
    "spiffe://shrivenquant.local/auth",
    "spiffe://shrivenquant.local/ops",
    "svc-cn",  # a CN identity
]
# Identities that are not in any policy but look like one that is.
LOOKALIKES = [
    "spiffe://shrivenquant.local/Auth",
    "spiffe://SHRIVENQUANT.local/auth",
    "spiffe://shrivenquant.local/auth/",
    "spiffe://shrivenquant.local/auth ",
    "spiffe://shrivenquant.local/\u0430uth",
    "SVC-CN",
    "svc-cn.",
    "",
]
ADDRESSES: list[Address] = [
    UNCHECKED,
    None,
    ipaddress.ip_address("10.0.1.5"),
    ipaddress.ip_address("10.0.2.5"),
    ipaddress.ip_address("::ffff:10.0.1.5"),
    ipaddress.ip_address("fd00:1::5"),
]


@st.composite
def policies(draw: st.DrawFn) -> PolicyModel:
    role_names = [f"r{i}" for i in range(draw(st.integers(1, 3)))]
    roles = {
        name: RoleModel(
            tuple(draw(st.lists(rules(NEAR), min_size=1, max_size=4))),
            draw(st.sampled_from([(), (), ("10.0.1.0/24",), ("fd00:1::/64", "10.0.2.5")])),
        )
        for name in role_names
    }
    identities = {
        who: tuple(draw(st.lists(st.sampled_from(role_names), max_size=3, unique=True)))
        for who in IDENTITIES
        if draw(st.booleans()) or who == IDENTITIES[0]
    }
    return PolicyModel(roles, identities)


# ---- the properties ---------------------------------------------------------------------------


def _check(model: PolicyModel, policy: Policy, identity: str, name: str, address: Address) -> None:
    for capability in CAPABILITIES:
        expected = model.allows(identity, capability, name, address)
        decision = policy.decide(identity, capability, name, address)
        context = (model.toml(), identity, capability, name, address, decision.reason)
        assert decision.allowed is expected, context
        assert policy.allows(identity, capability, name, address) is expected, context  # cached
        assert policy.allows(identity, capability, name, address) is expected, context  # from the cache
        assert policy.denies_explicitly(identity, capability, name, address) is model.denies_explicitly(
            identity, capability, name, address
        ), context
        if expected:  # the granting rule named really grants it and matches
            assert decision.rule is not None and decision.rule.path in {
                r.glob for r in model.matching_rules(identity, name, address) if r.grants(capability)
            }
    granted = {d.capability.value for d in policy.granted(identity, name, address)}
    assert granted == {c for c in CAPABILITIES if model.allows(identity, c, name, address)}
    enumerable = model.enumerable_by_read(identity, name, address)
    assert policy.enumerable_by_read(identity, name, address) is enumerable, (model.toml(), identity, name)
    assert policy.filter_enumerable_by_read(identity, [name, name], address) == [name, name] * enumerable
    listable = model.allows(identity, "list", name, address)
    assert policy.filter_names(identity, Capability.LIST, [name], address) == [name] * listable


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policies(),
    st.lists(
        st.tuples(st.sampled_from(IDENTITIES + LOOKALIKES), names(), st.sampled_from(ADDRESSES)), max_size=8
    ),
)
def test_the_decision_is_the_references_over_generated_policies_and_names(
    model: PolicyModel, questions: list[tuple[str, str, Address]]
) -> None:
    policy = Policy.parse(model.toml())
    for identity, name, address in questions:
        _check(model, policy, identity, name, address)


@MODEL
@given(st.lists(st.sampled_from(GLOB_SEGMENTS + BAD_GLOB_SEGMENTS), min_size=1, max_size=4).map("/".join))
@example("auth/")
@example("/auth")
@example("auth/**/")
def test_a_glob_is_refused_exactly_when_the_reference_calls_it_malformed(glob: str) -> None:
    if reference_valid_glob(glob):
        compile_glob(glob)
    else:
        with pytest.raises(GlobError):
            compile_glob(glob)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(globs(NEAR), names())
@example("auth/*", "auth-admin/KEY")
@example("auth**", "auth-admin/KEY")
@example("auth/**", "auth")
@example("**/KEY", "KEY")
@example("a/**/b", "a/b")
@example("a/*", "a/" + "A" * 254)
def test_a_glob_matches_a_name_exactly_when_the_reference_says(glob: str, name: str) -> None:
    """Both ways patterns.py matches (a regex for at most two run wildcards, else the NFA) are
    asked, whichever this glob would get."""
    if reference_valid_name(name):  # an invalid name is denied before any glob is asked
        compiled = compile_glob(glob)
        expected = reference_matches(glob, name)
        assert compiled.matches(name) is expected
        assert replace(compiled, _regex=None).matches(name) is expected, "the NFA"
        if compiled._regex is not None:
            assert (compiled._regex.fullmatch(name) is not None) is expected, "the regex"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), valid_names, st.sampled_from(IDENTITIES))
def test_no_other_spelling_of_a_name_is_decided_as_the_name(
    model: PolicyModel, name: str, identity: str
) -> None:
    """Case, Unicode normalisation and look-alikes: a policy decides the name as given, and every
    other spelling the store could be asked for is either the same decision on a name the store
    keeps apart (store names are case-sensitive, compared as code points) or an invalid name."""
    policy = Policy.parse(model.toml())
    for spelling in {
        name.upper(),
        name.lower(),
        name.swapcase(),
        name.casefold(),
        unicodedata.normalize("NFKC", name.replace("a", "\uff41")),
        name.replace("a", "\u0430"),
        name.replace("/", "\u2215"),
        name.replace("/", "%2F"),
    }:
        for capability in CAPABILITIES:
            assert policy.allows(identity, capability, spelling) is model.allows(
                identity, capability, spelling
            )
        if spelling != name and reference_valid_name(spelling):
            assert spelling.lower() == name.lower()  # only case differs: a different secret
