"""`secrets-manager keys …`: the lifecycle of the data keys of each namespace and of the root key.

    keys status [NAMESPACE] [--json]         every key: state, creation, uses, records under it
    keys rotate NAMESPACE | --all | --root   a new primary key (or a new root key)
    keys rewrap NAMESPACE | --all            re-encrypt old records under the primary key
    keys disable | enable | destroy KEY_ID   retire a key no record uses; erase it for good
    keys policy [--max-uses N] [--max-age-days D] [--json]

Every command is audited (operations `keys.status`, `keys.rotate`, `keys.rotate_root`,
`keys.rewrap`, `keys.disable`, `keys.enable`, `keys.destroy`, `keys.policy`; the namespace in
`name`, a key id in `version`). The work itself is in `store/keys.py`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.output import (
    counted,
    info_line,
    print_json,
    print_table,
    progress_bars,
    suggested,
    timestamp,
    warning_line,
)
from secrets_manager.cli.session import Session
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SecretsManagerError,
    restated,
)
from secrets_manager.store.keys import (
    DEFAULT_REWRAP_BATCH,
    ROTATE_AFTER_USES,
    KeyInfo,
    RewrapResult,
    RotationPolicy,
    destroy_key,
    disable_key,
    enable_key,
    key_status,
    namespaces,
    rewrap,
    rotate_key,
    rotate_root_key,
    update_key_policy,
)
from secrets_manager.store.names import validate_namespace
from secrets_manager.store.unlock import PasswordUnlock

KEY_ID = click.IntRange(1, 2**32 - 1)
SECONDS_PER_DAY = 86_400
NOT_SCRUBBED = (
    "another process kept the store's write-ahead log busy, so older copies may remain in it until "
    "the next checkpoint; run 'secrets-manager keys {command}' again to erase them now"
)
CANNOT_SCRUB = (
    "this store's database keeps superseded copies (old row versions, its WAL, replicas and backups) "
    "that no client can erase; older sealed copies remain there until they age out"
)
namespace_option = click.option(
    "--namespace",
    metavar="NAMESPACE",
    help="The namespace the key belongs to (needed only if two namespaces have a key with this id).",
)


@cli.group()
def keys() -> None:
    """Encryption keys: status, rotate, rewrap, disable, enable, destroy, policy.

    \b
    Retiring a key, step by step (nothing ever becomes unreadable):
      secrets-manager keys rotate auth          new writes use a new primary key
      secrets-manager keys rewrap auth          old records re-encrypted under it
      secrets-manager keys disable OLD_KEY_ID   refused while any record still uses the key
      secrets-manager keys destroy OLD_KEY_ID   its material is erased from the store file
    """


@keys.command()
@click.argument("namespace", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the keys and the key policy as JSON.")
@pass_session
def status(session: Session, namespace: str | None, as_json: bool) -> None:
    """Show every key of NAMESPACE (default: of all namespaces) and how many records use it."""
    session.require_local("keys status")
    if namespace is not None:
        validate_namespace(namespace)
    with session.operation("keys.status", namespace) as (store, _):
        infos = key_status(store, namespace)
        policy = store.key_policy()
    if as_json:
        print_json({"policy": policy_doc(policy), "keys": [key_doc(info) for info in infos]})
        return
    print_table(
        ["NAMESPACE", "KEY ID", "STATE", "CREATED", "USES", "RECORDS"],
        [
            [
                info.namespace,
                str(info.id),
                info.state,
                timestamp(info.created),
                str(info.uses),
                str(info.records),
            ]
            for info in infos
        ],
    )
    info_line(policy_line(policy))


@keys.command()
@click.argument("namespace", required=False)
@click.option("--all", "every", is_flag=True, help="Rotate the key of every namespace.")
@click.option(
    "--root",
    is_flag=True,
    help="Rotate the root key (rewraps the keysets only; password or KMS key unchanged).",
)
@pass_session
def rotate(session: Session, namespace: str | None, every: bool, root: bool) -> None:
    """Give NAMESPACE a new primary key (or every namespace with --all, or a new root key with
    --root). Everything written before stays readable."""
    session.require_local("keys rotate")
    if [namespace is not None, every, root].count(True) != 1:
        raise InvalidInputError("give one of NAMESPACE, --all or --root")
    if root:
        with session.operation("keys.rotate_root", mutating=True) as (store, event):
            result = rotate_root_key(store)
            event.version = result.new_id
            can_scrub = store.can_scrub
            by_password = store.unlock_kind == PasswordUnlock.kind
            unchanged = "the master password" if by_password else "the AWS KMS key"
        session.forget_in_agent()
        info_line(
            f"new root key {result.new_id}: {result.namespaces} keyset{_s(result.namespaces)} rewrapped "
            f"under it; {unchanged} is unchanged"
        )
        if not result.scrubbed:
            warning_line(NOT_SCRUBBED.format(command="rotate --root") if can_scrub else CANNOT_SCRUB)
        return
    if namespace is not None:
        validate_namespace(namespace)
        with session.operation("keys.rotate", namespace, mutating=True) as (store, event):
            key_id = rotate_key(store, namespace)
            event.version = key_id
        info_line(
            f"namespace {namespace}: new primary key {key_id}; re-encrypt older records with "
            f"'{suggested('keys', 'rewrap', namespace)}'"
        )
        return
    rotated: list[tuple[str, int]] = []
    with session.operation("keys.rotate", mutating=True) as (store, _):
        every_namespace = namespaces(store)
        for ns in every_namespace:
            try:
                rotated.append((ns, rotate_key(store, ns)))
            except SecretsManagerError as exc:
                # Each namespace's rotation is its own commit: those before this one stay made.
                raise restated(exc, partial_rotation_message(exc, rotated, every_namespace)) from None
    for ns, key_id in rotated:
        info_line(f"namespace {ns}: new primary key {key_id}")
    if rotated:
        info_line(f"re-encrypt older records with '{suggested('keys', 'rewrap', '--all')}'")
    else:
        info_line("no namespace has keys yet; nothing to rotate")


@keys.command("rewrap")
@click.argument("namespace", required=False)
@click.option("--all", "every", is_flag=True, help="Rewrap every namespace.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_REWRAP_BATCH,
    show_default=True,
    metavar="N",
    help="Records re-encrypted per commit; smaller batches hold the store's lock for less time.",
)
@pass_session
def rewrap_command(session: Session, namespace: str | None, every: bool, batch_size: int) -> None:
    """Re-encrypt every record of NAMESPACE (or of all, --all) that is not under its primary key,
    keeping versions, labels and metadata. Safe to interrupt: run it again to finish."""
    session.require_local("keys rewrap")
    if (namespace is not None) == every:
        raise InvalidInputError("give a NAMESPACE or --all")
    if namespace is not None:
        validate_namespace(namespace)
    with session.operation("keys.rewrap", namespace, mutating=True) as (store, _):
        targets = [namespace] if namespace is not None else namespaces(store)
        with progress_bars("rewrapping") as report:
            results = [rewrap(store, ns, progress=report, batch_size=batch_size) for ns in targets]
        failed = [result for result in results if result.unreadable]
        if failed:
            raise IntegrityError(unreadable_message(failed))
        outrun = [result for result in results if result.left]
        if outrun:
            raise ConflictError(outrun_message(outrun[0]))
    for result in results:
        info_line(
            f"namespace {result.namespace}: rewrapped {result.rewrapped} record{_s(result.rewrapped)}; "
            f"every record is under key {result.primary_id}"
        )


@keys.command()
@click.argument("key_id", type=KEY_ID)
@namespace_option
@pass_session
def disable(session: Session, key_id: int, namespace: str | None) -> None:
    """Stop KEY_ID from decrypting. Refused while records still use it (rewrap first)."""
    session.require_local("keys disable")
    if namespace is not None:
        validate_namespace(namespace)
    with session.operation("keys.disable", namespace, mutating=True) as (store, event):
        event.version = key_id
        event.name = disable_key(store, key_id, namespace)
    info_line(
        f"disabled key {key_id} of namespace {event.name}; erase it with "
        f"'{suggested('keys', 'destroy', str(key_id))}' (or undo with 'keys enable {key_id}')"
    )


@keys.command()
@click.argument("key_id", type=KEY_ID)
@namespace_option
@pass_session
def enable(session: Session, key_id: int, namespace: str | None) -> None:
    """Let a disabled KEY_ID decrypt again."""
    session.require_local("keys enable")
    if namespace is not None:
        validate_namespace(namespace)
    with session.operation("keys.enable", namespace, mutating=True) as (store, event):
        event.version = key_id
        event.name = enable_key(store, key_id, namespace)
    info_line(f"enabled key {key_id} of namespace {event.name}")


@keys.command()
@click.argument("key_id", type=KEY_ID)
@namespace_option
@pass_session
def destroy(session: Session, key_id: int, namespace: str | None) -> None:
    """Erase a disabled KEY_ID's material from the store for good (no record may use it)."""
    session.require_local("keys destroy")
    if namespace is not None:
        validate_namespace(namespace)
    with session.operation("keys.destroy", namespace, mutating=True) as (store, event):
        event.version = key_id
        result = destroy_key(store, key_id, namespace)
        event.name = result.namespace
        can_scrub = store.can_scrub
    if can_scrub:
        info_line(
            f"destroyed key {key_id} of namespace {result.namespace}: its material is erased from the store"
        )
        if not result.scrubbed:
            warning_line(NOT_SCRUBBED.format(command=f"destroy {key_id}"))
    else:
        info_line(
            f"destroyed key {key_id} of namespace {result.namespace}: its material is gone from the keyset"
        )
        warning_line(CANNOT_SCRUB)


@keys.command()
@click.option(
    "--max-uses",
    type=click.IntRange(1, ROTATE_AFTER_USES),
    metavar="N",
    help=f"Rotate a primary key once it has encrypted N records (at most {ROTATE_AFTER_USES}, the default).",
)
@click.option(
    "--max-age-days",
    type=click.IntRange(0, 100 * 365),
    metavar="D",
    help="Rotate a primary key once it is D days old (0: no age limit, the default).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the policy as JSON.")
@pass_session
def policy(session: Session, max_uses: int | None, max_age_days: int | None, as_json: bool) -> None:
    """Show or set when primary keys rotate on their own (at the first write past the limit)."""
    session.require_local("keys policy")
    changes: dict[str, Any] = {}
    if max_uses is not None:
        changes["max_uses"] = max_uses
    if max_age_days is not None:
        changes["max_age_seconds"] = max_age_days * SECONDS_PER_DAY or None
    with session.operation("keys.policy", mutating=bool(changes)) as (store, _):
        current = update_key_policy(store, lambda p: replace(p, **changes)) if changes else store.key_policy()
    if as_json:
        print_json(policy_doc(current))
    else:
        click.echo(policy_line(current))


def key_doc(info: KeyInfo) -> dict[str, Any]:
    return {
        "namespace": info.namespace,
        "id": info.id,
        "state": info.state,
        "created": timestamp(info.created),
        "uses": info.uses,
        "records": info.records,
    }


def policy_doc(policy: RotationPolicy) -> dict[str, Any]:
    return {"max_uses": policy.max_uses, "max_age_days": _days(policy.max_age_seconds)}


def policy_line(policy: RotationPolicy) -> str:
    days = _days(policy.max_age_seconds)
    age = "no age limit" if days is None else f"or once {counted(days, 'day')} old"
    return f"key policy: a primary key rotates after {counted(policy.max_uses, 'encryption')}, {age}"


def partial_rotation_message(
    error: SecretsManagerError, rotated: list[tuple[str, int]], every_namespace: list[str]
) -> str:
    """`keys rotate --all` stopped by `error`: which namespaces got a new primary key and which not."""
    done = [ns for ns, _ in rotated]
    rotated_part = (
        "rotated " + ", ".join(f"{ns} (new primary key {key_id})" for ns, key_id in rotated)
        if rotated
        else "no namespace was rotated"
    )
    left = [ns for ns in every_namespace if ns not in done]
    return (
        f"{error}; {rotated_part}; not rotated: {', '.join(left)} "
        f"(once the cause is fixed, run '{suggested('keys', 'rotate', 'NAMESPACE')}' for each)"
    )


def unreadable_message(failed: list[RewrapResult]) -> str:
    count = sum(len(result.unreadable) for result in failed)
    first_result = failed[0]
    first = first_result.unreadable[0]
    where = f"{first.name} {'metadata' if first.version == 0 else f'version {first.version}'}"
    key = "" if first.key_id is None else f" under key {first.key_id}"
    return (
        f"{count} record{_s(count)} could not be opened and were left as they are (integrity check "
        f"failed), first {where}{key} in namespace {first_result.namespace}; if the key is disabled, "
        "run 'secrets-manager keys enable KEY_ID' and rewrap again, else destroy the damaged version"
    )


def outrun_message(result: RewrapResult) -> str:
    return (
        f"namespace {result.namespace}: {counted(result.left, 'record')} still under older keys: its "
        "primary key was rotated during every pass of the rewrap (another process's 'keys rotate', or "
        "the key policy at other writers' writes); run "
        f"'{suggested('keys', 'rewrap', result.namespace)}' again once that stops"
    )


def _days(seconds: int | None) -> float | int | None:
    if seconds is None:
        return None
    return seconds // SECONDS_PER_DAY if seconds % SECONDS_PER_DAY == 0 else seconds / SECONDS_PER_DAY


def _s(count: int) -> str:
    return "" if count == 1 else "s"


__all__ = ["keys"]
