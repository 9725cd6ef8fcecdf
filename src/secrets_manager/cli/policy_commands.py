"""`secrets-manager policy check|explain`: test an access policy before the service loads it, and
say what an identity may reach.

Like `nginx -t` for the file and Vault's `token capabilities` for a decision. `check` and
`explain` of one NAME read the policy file (and a certificate) only: no store, no password, no
audit record. `explain` without NAME answers "what can this identity read?" during an incident,
as AWS's IAM policy simulator does: it also reads the store's names (a `list` of the store, so
audited as one), and decides each with `Policy.decide`, the code the service's `allows` asks
before every call, so the answer is what `serve` would let the identity do.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from secrets_manager.access import Capability, Decision, Policy, load_policy
from secrets_manager.access.patterns import unmatchable
from secrets_manager.access.policy import UNCHECKED, Address
from secrets_manager.cli.app import cli
from secrets_manager.cli.output import (
    counted,
    info_line,
    print_json,
    print_table,
    printable,
    timestamp,
    warning_line,
)
from secrets_manager.cli.password import read_small_file
from secrets_manager.cli.session import Session
from secrets_manager.errors import AccessDeniedError, InvalidInputError
from secrets_manager.store.names import validate_name
from secrets_manager.tls import Caller, IdentityError, caller_from_certificate, unpresentable_identity

MAX_CERTIFICATE_BYTES = 64 * 1024
_POLICY_FILE = click.Path(dir_okay=False, path_type=Path)


@cli.group()
def policy() -> None:
    """Check an access policy file, and explain what it lets an identity do.

    \b
    secrets-manager policy check policy.toml
    secrets-manager policy explain policy.toml spiffe://shrivenquant.local/auth auth/DB_PASSWORD
    secrets-manager policy explain policy.toml --cert auth.pem auth/DB_PASSWORD --capability read
    secrets-manager --store URL policy explain policy.toml --cert stolen.pem --capability read
    """


@policy.command("check")
@click.argument("policy_file", metavar="POLICY_FILE", type=_POLICY_FILE)
def check(policy_file: Path) -> None:
    """Parse POLICY_FILE as `serve` and SIGHUP would: exit 0 with a summary, 2 naming the problem,
    3 if the file does not exist.

    Roles no identity holds are warned about (often a typo in [identities]), identities no
    client certificate can present, and rules whose path no secret name can match. [revoked]
    entries must be serial numbers or SHA-256 fingerprints in hex (colons and case as you like)."""
    parsed = load_policy(policy_file)
    held = {role for roles in parsed.identities.values() for role in roles}
    for role in sorted(set(parsed.roles) - held):
        warning_line(f"{policy_file}: role {role!r} is held by no identity")
    for identity, roles in parsed.identities.items():
        problem = unpresentable_identity(identity)
        if problem is not None:
            warning_line(f"{policy_file}: identity '{printable(identity)}' is {problem}: it grants nothing")
        elif not roles:
            warning_line(f"{policy_file}: identity '{printable(identity)}' holds no role")
    for role_name, defined in parsed.roles.items():
        for index, rule in enumerate(defined.rules):
            reason = unmatchable(rule.path)
            if reason is not None:
                verb = "grants" if rule.allow else "denies"
                warning_line(
                    f"{policy_file}: roles.{role_name}.rules[{index}]: path {rule.path!r} matches no "
                    f"secret name ({reason}): it {verb} nothing"
                )
    rules = sum(len(role.rules) for role in parsed.roles.values())
    revoked = len(parsed.revoked_serials) + len(parsed.revoked_fingerprints)
    info_line(
        f"{policy_file}: valid: {counted(len(parsed.identities), 'identity', 'identities')}, "
        f"{counted(len(parsed.roles), 'role')}, {counted(rules, 'rule')}"
        + (f", {counted(revoked, 'revoked certificate')}" if revoked else "")
    )


@policy.command("explain")
@click.argument("policy_file", metavar="POLICY_FILE", type=_POLICY_FILE)
@click.argument("identity_and_name", metavar="(IDENTITY | --cert PEM) [NAME]", nargs=-1)
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PEM",
    help="Take the identity from this client certificate, as the service does (SPIFFE ID, else CN), "
    "and deny everything if the policy revokes it (without NAME: say so, and list what it could do "
    "before).",
)
@click.option(
    "--capability",
    type=click.Choice([c.value for c in Capability]),
    help="Decide only this one: exit 0 if allowed, 5 if denied. Without NAME: only the secrets it "
    "holds this one on.",
)
@click.option(
    "--from",
    "from_address",
    metavar="ADDRESS",
    help="Decide for a call from this IP address, which a role's bound_cidrs must hold "
    "[default: every role counts, whatever networks it is bound to].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
def explain(
    policy_file: Path,
    identity_and_name: tuple[str, ...],
    cert_file: Path | None,
    capability: str | None,
    from_address: str | None,
    as_json: bool,
) -> None:
    """What IDENTITY (or the holder of --cert) may do to the secret NAME, and which rule decides.

    The last line says where NAME shows up unasked: ListSecrets shows the names IDENTITY may
    `list`; BatchGetSecrets by prefix (get_credentials, run --service) and Watch show those it may
    `read`, so `read` alone reveals a name there. A deny of `list` hides it from all of them.

    Without NAME: every secret of the store (the global --store, any kind; deleted ones too) on
    which IDENTITY holds a capability, with its capabilities and the role and rule granting each,
    decided as `serve` decides: with `--capability read`, what to rotate after its certificate
    leaked. An identity that holds no role is one line, exit 5. A revoked --cert is said, and what
    it could do before is listed. Audited as a `list` of the store; not with --server."""
    caller, name = _caller_and_name(identity_and_name, cert_file)
    address = _address(from_address)
    if name is None:
        _explain_store(policy_file, caller, cert_file, capability, address, as_json)
        return
    try:
        validate_name(name)
    except InvalidInputError as exc:  # IDENTITY and NAME swapped, most often
        order = "--cert PEM NAME" if cert_file is not None else "IDENTITY NAME"
        raise InvalidInputError(
            f"{exc}; the service denies every request for it (the arguments are {order})"
        ) from None
    identity = caller.identity
    parsed = load_policy(policy_file)
    problem = unpresentable_identity(identity)
    if problem is not None:
        warning_line(f"'{printable(identity)}' is {problem}: the service never sees a caller with it")
    revoked = parsed.revocation(caller.serial, caller.fingerprint) if cert_file is not None else None
    wanted = [Capability(capability)] if capability else list(Capability)
    decisions = [parsed.decide(identity, c, name, address) for c in wanted]
    shown = _shown(parsed, identity, name, address)
    if revoked is not None:  # the service refuses the certificate before it asks the rules
        decisions = [Decision(False, identity, d.capability, name, revoked) for d in decisions]
        shown = (False, False)
    if as_json:
        print_json(
            {
                "identity": identity,
                "roles": list(parsed.roles_of(identity, address)),
                "address": None if address is UNCHECKED else str(address),
                "bound_cidrs": {
                    role: [str(network) for network in parsed.roles[role].bound_cidrs]
                    for role in parsed.roles_of(identity)
                    if parsed.roles[role].bound_cidrs
                },
                "name": name,
                "certificate": _certificate_json(caller, cert_file, revoked),
                "decisions": {
                    d.capability.value: {"allowed": d.allowed, "reason": d.reason, "role": d.role}
                    for d in decisions
                },
                "shown": {"list": shown[0], "batch_get_and_watch": shown[1]},
            }
        )
    else:
        _print_decisions(parsed, caller if cert_file is not None else None, name, decisions, revoked, address)
        where = (
            "nowhere: the certificate is revoked"
            if revoked
            else _shown_line(parsed, identity, name, shown, address)
        )
        click.echo(f"shown     {printable(where)}")
    if capability and not decisions[0].allowed:
        raise AccessDeniedError(f"{identity} may not {capability} {name!r}: {decisions[0].reason}")


def _address(text: str | None) -> Address:
    """--from ADDRESS as an IP address; UNCHECKED without it."""
    if text is None:
        return UNCHECKED
    try:
        return ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        raise InvalidInputError(f"--from {text!r} is not an IP address (e.g. 10.0.1.5 or ::1)") from None


def _roles_line(parsed: Policy, identity: str, address: Address) -> str:
    """The roles IDENTITY holds, each bound one with its networks (and, for --from, whether they
    hold that address)."""
    roles = []
    for role in parsed.roles_of(identity):
        networks = parsed.roles[role].bound_cidrs
        if not networks:
            roles.append(role)
            continue
        bound = ", ".join(map(str, networks))
        if address is UNCHECKED:
            roles.append(f"{role} (only from {bound})")
        elif parsed.roles[role].admits(address):
            roles.append(f"{role} (from {bound}, which holds {address})")
        else:
            roles.append(f"{role} (not held: only from {bound})")
    if not roles:
        hint = _named_otherwise(parsed, identity)
        return "none: every request is denied" + (f" ({hint})" if hint else "")
    if not parsed.roles_of(identity, address):
        return ", ".join(roles) + f": none held from {address}, every request is denied"
    return ", ".join(roles)


def _named_otherwise(parsed: Policy, identity: str) -> str | None:
    """Where the policy most likely meant `identity`, which holds no role, or None. Both pass
    `policy check` (valid TOML, a valid identity), so they are named where the caller is seen to
    hold none: its CN (`"market-connector" = [...]`: a certificate with a SPIFFE ID, as every one
    `pki issue` makes, is known by the ID alone, so that entry never applies to it), or a
    misspelling (market-conector)."""
    last = identity.rsplit("/", 1)[-1]
    if identity.startswith("spiffe://") and last in parsed.identities:
        return (
            f"the policy names {last}, a CN: a certificate with a SPIFFE ID is known by it, so "
            f'write "{identity}" there'
        )
    near = _misspelt_as(identity, parsed.identities)
    return f"the policy names {near}: a typo of this identity?" if near else None


def _misspelt_as(identity: str, named: Iterable[str]) -> str | None:
    """The identity of the policy's that `identity` is most likely a typo of, or None. Compared on
    the last part (a SPIFFE path's, which shares its trust domain with the others: on the whole
    ID every service's looked alike) and on the whole (a trust domain misspelt)."""
    best, best_ratio = None, 0.0
    for other in named:
        last = difflib.SequenceMatcher(None, identity.rsplit("/", 1)[-1], other.rsplit("/", 1)[-1]).ratio()
        whole = difflib.SequenceMatcher(None, identity, other).ratio()
        if last >= 0.8 and whole >= 0.85 and last + whole > best_ratio:
            best, best_ratio = other, last + whole
    return best


def _caller_and_name(arguments: tuple[str, ...], cert_file: Path | None) -> tuple[Caller, str | None]:
    """The caller and NAME (None: every secret of the store)."""
    if cert_file is None:
        if len(arguments) not in (1, 2):
            raise InvalidInputError(
                "give IDENTITY and NAME, IDENTITY alone (every secret it may reach), or --cert PEM"
            )
        if len(arguments) == 1 and _a_name_not_an_identity(arguments[0]):
            raise InvalidInputError(
                f"{arguments[0]!r} is a secret name, not an identity a certificate can carry: give "
                "IDENTITY NAME, or IDENTITY alone for every secret it may reach"
            )
        return Caller(arguments[0]), arguments[1] if len(arguments) == 2 else None
    if len(arguments) > 1:
        raise InvalidInputError("with --cert give only NAME, or nothing: the certificate names the identity")
    pem = read_small_file(cert_file, MAX_CERTIFICATE_BYTES, f"certificate file {cert_file}")
    try:
        return caller_from_certificate(pem), arguments[0] if arguments else None
    except IdentityError as exc:
        raise InvalidInputError(f"{cert_file}: {exc}") from None


def _a_name_not_an_identity(text: str) -> bool:
    """Whether `text`, given as IDENTITY alone, is a secret name (`auth/DB_PASSWORD`) that no
    certificate can carry: IDENTITY left out before NAME, most often."""
    if unpresentable_identity(text) is None:
        return False
    try:
        validate_name(text)
    except InvalidInputError:
        return False
    return "/" in text


def _print_decisions(
    parsed: Policy,
    caller: Caller | None,
    name: str,
    decisions: list[Decision],
    revoked: str | None,
    address: Address,
) -> None:
    identity = decisions[0].identity
    click.echo(f"identity  {printable(identity)}")
    if address is not UNCHECKED:
        click.echo(f"from      {address}")
    click.echo(f"roles     {printable(_roles_line(parsed, identity, address))}")
    if caller is not None:
        click.echo(f"serial    {caller.serial_text}")
        click.echo(f"sha256    {caller.fingerprint_text}")
        click.echo(f"revoked   {'yes: every request is refused' if revoked else 'no'}")
    click.echo(f"name      {printable(name)}")
    for decision in decisions:
        verdict = "allowed" if decision.allowed else "denied"
        click.echo(f"{decision.capability.value:<9} {verdict:<8} {printable(decision.reason)}")


def _shown(parsed: Policy, identity: str, name: str, address: Address) -> tuple[bool, bool]:
    """Whether NAME shows up in (ListSecrets, BatchGetSecrets by prefix and Watch)."""
    return (
        parsed.allows(identity, Capability.LIST, name, address),
        parsed.enumerable_by_read(identity, name, address),
    )


def _shown_line(parsed: Policy, identity: str, name: str, shown: tuple[bool, bool], address: Address) -> str:
    listed, by_read = shown
    line = f"in ListSecrets: {'yes' if listed else 'no'}; in BatchGetSecrets by prefix and Watch: "
    if by_read:
        return line + "yes (read allows it)"
    if not parsed.allows(identity, Capability.READ, name, address):
        return line + "no (read is not allowed)"
    return line + f"no (list is {parsed.decide(identity, Capability.LIST, name, address).reason})"


def _explain_store(
    policy_file: Path,
    caller: Caller,
    cert_file: Path | None,
    capability: str | None,
    address: Address,
    as_json: bool,
) -> None:
    """`policy explain POLICY (IDENTITY | --cert PEM)`: every secret of the store on which the
    identity holds a capability. The policy is read (and the identity checked) before the store
    is opened, so a policy that does not parse or an identity with no role asks no password."""
    identity = caller.identity
    parsed = load_policy(policy_file)
    problem = unpresentable_identity(identity)
    if problem is not None:
        warning_line(f"'{printable(identity)}' is {problem}: the service never sees a caller with it")
    roles = parsed.roles_of(identity, address)
    if not roles:
        raise AccessDeniedError(_no_role(parsed, identity, address))
    revoked = parsed.revocation(caller.serial, caller.fingerprint) if cert_file is not None else None
    if revoked is not None:
        warning_line(
            f"{cert_file} (serial {caller.serial_text}) is refused by the service: {revoked}. It can "
            f"read nothing now; listed is what it could do before, as {identity}'s other "
            "certificates still can"
        )
    elif cert_file is not None:  # what to put under [revoked] if it leaked
        info_line(
            f"{cert_file}: serial {caller.serial_text}, sha256 {caller.fingerprint_text}; "
            f"not revoked in {policy_file}"
        )
    session = click.get_current_context().find_object(Session)
    assert session is not None  # the `cli` group made it
    session.environment  # noqa: B018  (an invalid SHRIVENQUANT_ENV is an error here, as for `list`)
    session.require_local("policy explain POLICY_FILE IDENTITY")
    with session.store_operation("list") as (store, _):
        listed = store.list("", include_deleted=True)
    wanted = (Capability(capability),) if capability else tuple(Capability)
    reached = [
        (meta, granted)
        for meta in listed
        if (granted := parsed.granted(identity, meta.name, address, wanted))
    ]
    if as_json:
        print_json(
            {
                "identity": identity,
                "roles": list(roles),
                "address": None if address is UNCHECKED else str(address),
                "certificate": _certificate_json(caller, cert_file, revoked),
                "capability": capability,
                "secrets_in_store": len(listed),
                "secrets": [
                    {
                        "name": meta.name,
                        "deleted": timestamp(meta.deleted) or None,  # as `list --json` says it
                        "capabilities": {
                            d.capability.value: {
                                "reason": d.reason,
                                "role": d.role,
                                "rule": d.rule.path if d.rule is not None else None,
                            }
                            for d in granted
                        },
                        "shown": dict(
                            zip(
                                ("list", "batch_get_and_watch"),
                                _shown(parsed, identity, meta.name, address),
                                strict=True,
                            )
                        ),
                    }
                    for meta, granted in reached
                ],
            }
        )
        return
    what = f"may {capability}" if capability else "holds a capability on"
    info_line(
        f"{identity} ({_roles_line(parsed, identity, address)}) {what} {len(reached)} of the "
        f"{counted(len(listed), 'secret')} in the store"
        + (" (deleted ones serve nothing until undeleted)" if any(m.deleted for m, _ in reached) else "")
    )
    print_table(
        ["NAME", "STATE", "CAPABILITIES", "GRANTED BY"],
        [
            [
                meta.name,
                "deleted" if meta.deleted else "active",
                ", ".join(d.capability.value for d in granted),
                _granted_by(granted),
            ]
            for meta, granted in reached
        ],
        free_text=["GRANTED BY"],
    )


def _certificate_json(caller: Caller, cert_file: Path | None, revoked: str | None) -> dict[str, Any] | None:
    """--json's `certificate`: what `[revoked]` takes of a --cert, and whether it is; None without."""
    if cert_file is None:
        return None
    return {
        "serial": caller.serial_text,
        "sha256_fingerprint": caller.fingerprint_text,
        "revoked": revoked is not None,
    }


def _granted_by(granted: tuple[Decision, ...]) -> str:
    """Which role and rule grant which capabilities: "read, list: role auth rule 'auth/*'"."""
    grants: dict[tuple[str | None, str | None], list[str]] = {}
    for decision in granted:
        rule = decision.rule.path if decision.rule is not None else None
        grants.setdefault((decision.role, rule), []).append(decision.capability.value)
    return "; ".join(
        f"{', '.join(capabilities)}: role {role} rule {rule!r}"
        for (role, rule), capabilities in grants.items()
    )


def _no_role(parsed: Policy, identity: str, address: Address) -> str:
    """Why `identity` holds no role (from `address`), in one line, with the identities a short
    name may mean (the service knows a SPIFFE ID whole)."""
    if parsed.roles_of(identity):
        return (
            f"{identity}'s roles are bound to networks that do not hold {address}: the service "
            "refuses it every call from there, so it can read nothing"
        )
    meant = sorted(known for known in parsed.identities if known.endswith("/" + identity))
    otherwise = None if meant or identity in parsed.identities else _named_otherwise(parsed, identity)
    hint = f" (did you mean {' or '.join(meant)}?)" if meant else f" ({otherwise})" if otherwise else ""
    named = "holds no role in" if identity in parsed.identities else "is not an identity of"
    return (
        f"{identity} {named} {parsed.source}: the service refuses it every call, so it can read nothing{hint}"
    )
