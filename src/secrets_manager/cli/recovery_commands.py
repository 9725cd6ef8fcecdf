"""`secrets-manager recovery …`: shares that open the store when its password or KMS key is lost.

    recovery init --shares N --threshold K --out-dir DIR [--replace]
    recovery status [--json]
    recovery remove
    recovery unlock-with password|kms [KMS_KEY] [--share-file F]... [--new-password-file P]

Like Vault's recovery keys: `init` splits a recovery key among N people (any K of them rebuild it)
as SLIP-0039 word lists, one file each; `unlock-with` later takes K of them instead of the lost
password and sets a new password or KMS key. Audited as `recovery.init`, `recovery.status`,
`recovery.remove`, `recovery.unlock-with`. The work is in `store/recovery.py`.
"""

from __future__ import annotations

import getpass
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from secrets_manager.cli.app import cli, kdf_profile_option, pass_session
from secrets_manager.cli.output import info_line, print_json, print_table, timestamp, warning_line
from secrets_manager.cli.password import read_small_file, terminal_available
from secrets_manager.cli.session import Session
from secrets_manager.cli.unlock_commands import (
    new_unlock_arguments,
    new_unlock_source,
    unlocked_by,
    warn_if_not_scrubbed,
)
from secrets_manager.environment import Environment, refuse_open_directory
from secrets_manager.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    UnsafeConfigurationError,
)
from secrets_manager.store.recovery import (
    MAX_SHARES,
    NewShares,
    RecoverySetup,
    install_recovery,
    make_recovery_shares,
    recovery_header_problem,
    recovery_setup,
    remove_recovery,
    share_set_of,
)
from secrets_manager.store.url import store_location
from secrets_manager.tls.files import make_private_directory, move_private_file, write_private_file

SHARE_FILE = "recovery-share-{index}-of-{shares}.txt"
INCOMPLETE = ".incomplete"  # a share file's suffix until the store has its set
MAX_SHARE_FILE_SIZE = 4096  # a share is 33 words; anything much larger is not a share file


@cli.group()
def recovery() -> None:
    """Recovery shares: open the store when its master password or KMS key is lost.

    \b
    secrets-manager recovery init --shares 5 --threshold 3 --out-dir shares/
        hand each file to a different person, then delete them here
    secrets-manager recovery unlock-with password --share-file a.txt --share-file b.txt ...
        any 3 of the 5 set a new master password (or 'kms KEY': a new KMS key)
    """


@recovery.command("init")
@click.option(
    "--shares", type=click.IntRange(1, MAX_SHARES), required=True, help="How many shares to make (1-16)."
)
@click.option(
    "--threshold",
    type=click.IntRange(1, MAX_SHARES),
    required=True,
    help="How many shares open the store (2 or more, unless --shares is 1).",
)
@click.option(
    "--out-dir",
    metavar="DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one file per share here (created 0700 if missing; files 0600, never overwritten; "
    "named *.incomplete until the store has the set).",
)
@click.option("--replace", is_flag=True, help="Replace the store's share set: the old shares stop working.")
@pass_session
def init(session: Session, shares: int, threshold: int, out_dir: Path, replace: bool) -> None:
    """Make recovery shares for the store: any THRESHOLD of the SHARES files open it instead of
    its master password or KMS key. No secret is re-encrypted; root key rotations keep them valid."""
    session.require_local("recovery init")
    if threshold > shares:
        raise InvalidInputError(f"--threshold {threshold} is more than --shares {shares}")
    if threshold == 1 and shares > 1:  # SLIP-0039 refuses it; say so before the store is opened
        raise InvalidInputError("--threshold 1 would make every share the whole key; use 2 or more")
    paths = [out_dir / SHARE_FILE.format(index=i, shares=shares) for i in range(1, shares + 1)]
    try:
        refuse_open_directory(out_dir, "--out-dir", session.environment)
        taken = [p.name for p in paths if p.exists()]
        # A run killed while it renamed its files left some named and the rest *.incomplete: those
        # are finished (or removed) below, once the store says whose set they are.
        interrupted = out_dir.is_dir() and any(out_dir.glob(f"recovery-share-*-of-*.txt{INCOMPLETE}"))
    except OSError as exc:  # a directory on the way this user may not search (EACCES)
        raise InvalidInputError(
            f"cannot use --out-dir {out_dir}: {exc.strerror or type(exc).__name__} (a directory on the "
            "way this user may not enter?); choose a directory you can write to"
        ) from None
    if taken and not interrupted:
        raise _taken_error(out_dir, taken)
    with session.operation("recovery.init", mutating=True) as (store, _):
        current = recovery_setup(store)
        _finish_interrupted_init(out_dir, current, session.environment)
        if current is not None and not replace:
            raise InvalidInputError(
                "this store has recovery shares already; give --replace to make a new set (the old "
                "shares then stop working)"
            )
        taken = [p.name for p in paths if p.exists()]
        if taken:
            raise _taken_error(out_dir, taken)
        new = make_recovery_shares(threshold=threshold, shares=shares)
        # Written under names that say they are not shares yet, renamed once the store has the set:
        # a run killed in between leaves no set of valid-looking files the store does not have.
        incomplete = [path.with_name(path.name + INCOMPLETE) for path in paths]
        _write_share_files(new, incomplete, store_location(session.store_url))  # never a URL's password
        try:
            install_recovery(store, new, replace=replace, expected=current)
        except BaseException:
            for path in incomplete:  # shares of a set the store does not have must not circulate
                path.unlink(missing_ok=True)
            raise
        for source, target in zip(incomplete, paths, strict=True):
            move_private_file(source, target)
    info_line(
        f"wrote {shares} recovery shares (set {new.setup.identifier:05d}) to {out_dir}: any {threshold} "
        "open the store. Give each file to a different person, keep them offline, and delete them here"
    )


@recovery.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the share set as JSON.")
@pass_session
def status(session: Session, as_json: bool) -> None:
    """Show the store's recovery share set: how many shares, how many open it, when made."""
    session.require_local("recovery status")
    with session.operation("recovery.status") as (store, _):
        setup = recovery_setup(store)
        problem = None if setup is None else recovery_header_problem(store, setup)
    if problem is not None:
        raise IntegrityError(
            f"{problem}: the shares cannot open the store until 'secrets-manager keys rotate --root' "
            "writes it again from the store's own record"
        )
    if as_json:
        print_json(None if setup is None else _setup_doc(setup))
    elif setup is None:
        info_line("this store has no recovery shares (make them with 'secrets-manager recovery init')")
    else:
        print_table(
            ["set", "threshold", "shares", "created", "public key (SHA-256)"],
            [
                [
                    f"{setup.identifier:05d}",
                    str(setup.threshold),
                    str(setup.shares),
                    _created(setup),
                    setup.fingerprint,
                ]
            ],
            free_text=["public key (SHA-256)"],
        )


@recovery.command("remove")
@pass_session
def remove(session: Session) -> None:
    """Drop the store's recovery shares: every share of the set stops working."""
    session.require_local("recovery remove")
    with session.operation("recovery.remove", mutating=True) as (store, _):
        setup = remove_recovery(store)
    if setup is None:  # damaged: its record was missing or did not open
        info_line(
            "removed the store's damaged recovery share set: no shares open the store; make a new set "
            "with 'secrets-manager recovery init'"
        )
    else:
        info_line(f"removed recovery share set {setup.identifier:05d}: its shares no longer open the store")


@recovery.command("unlock-with")
@click.argument("source", type=click.Choice(["password", "kms"]))
@click.argument("kms_key", metavar="[KMS_KEY]", required=False)
@click.option(
    "--share-file",
    "share_files",
    multiple=True,
    metavar="PATH",
    help="A recovery share file (repeat for each). Without it: one share per line on stdin, or asked "
    "for on the terminal.",
)
@click.option("--new-password-file", metavar="PATH", help="Read the new master password from this file.")
@kdf_profile_option("Argon2id cost of the new password ('test' is for test suites only).")
@pass_session
def unlock_with(
    session: Session,
    source: str,
    kms_key: str | None,
    share_files: tuple[str, ...],
    new_password_file: str | None,
    kdf_profile: str,
) -> None:
    """Set what unlocks the store, opening it with recovery shares instead of the lost password
    or KMS key: 'password' (a new master password) or 'kms KMS_KEY'. The shares stay valid."""
    session.require_local("recovery unlock-with")
    new_password = new_unlock_arguments("recovery unlock-with", source, kms_key, new_password_file, session)
    mnemonics = (
        [read_share_file(Path(p), session.environment) for p in share_files]
        if share_files
        else _shares_from_input()
    )
    with session.recovery_operation("recovery.unlock-with", mnemonics) as (store, _):
        old = unlocked_by(store)
        scrubbed = store.change_unlock(new_unlock_source(session, kms_key, new_password, kdf_profile))
        can_scrub = store.can_scrub
    session.forget_in_agent()
    info_line(
        f"the store is now unlocked by {f'AWS KMS key {kms_key}' if kms_key else 'the new password'}; "
        "the recovery shares still open it"
    )
    warn_if_not_scrubbed(scrubbed, can_scrub, old)


def _taken_error(out_dir: Path, taken: list[str]) -> InvalidInputError:
    return InvalidInputError(
        f"{out_dir} already holds {', '.join(taken)}; move the old shares away or pick another --out-dir"
    )


def _finish_interrupted_init(out_dir: Path, current: RecoverySetup | None, environment: Environment) -> None:
    """Share files a killed `recovery init` left in `out_dir` (named *.incomplete): renamed into
    place if they are of the set the store has (it was killed after the commit), else removed."""
    if not out_dir.is_dir():
        return
    for leftover in sorted(out_dir.glob(f".recovery-share-*-of-*.txt{INCOMPLETE}.*.tmp")):
        leftover.unlink(missing_ok=True)  # a half-written file (write_private_file's temporary)
    leftovers = sorted(out_dir.glob(f"recovery-share-*-of-*.txt{INCOMPLETE}"))
    if not leftovers:
        return
    try:
        sets = {share_set_of(read_share_file(path, environment)).identifier for path in leftovers}
    except InvalidInputError:
        sets = set()
    if current is not None and sets == {current.identifier}:
        for path in leftovers:
            target = path.with_name(path.name[: -len(INCOMPLETE)])
            if not target.exists():
                move_private_file(path, target)
            elif target.read_bytes() == path.read_bytes():  # killed between the link and the unlink
                path.unlink()
        warning_line(
            f"an interrupted 'recovery init' had installed set {current.identifier:05d}: its share files in "
            f"{out_dir} now have their final names"
        )
        return
    for path in leftovers:
        path.unlink(missing_ok=True)
    warning_line(
        f"removed {len(leftovers)} share file{'s' if len(leftovers) != 1 else ''} in {out_dir} of an "
        "interrupted 'recovery init': the store never had their set"
    )


def _write_share_files(new: NewShares, paths: list[Path], store: str) -> None:
    """One 0600 file per share, written atomically and durably in a 0700 directory; all or none."""
    make_private_directory(paths[0].parent)
    made = datetime.fromtimestamp(new.setup.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    written: list[Path] = []
    try:
        for index, (path, mnemonic) in enumerate(zip(paths, new.mnemonics, strict=True), 1):
            text = (
                f"# secrets-manager recovery share {index} of {new.setup.shares}: any "
                f"{new.setup.threshold} open the store\n"
                f"# set {new.setup.identifier:05d}, made {made} for {store}\n"
                "# Keep it offline and apart from the other shares and from the store.\n"
                f"{mnemonic}\n"
            )
            try:
                write_private_file(path, text.encode("ascii"), overwrite=False)
            except ConflictError:  # made meanwhile (another recovery init into the same directory)
                raise InvalidInputError(
                    f"{path} appeared while the shares were written; move it away or pick another --out-dir"
                ) from None
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def read_share_file(path: Path, environment: Environment) -> str:
    """The share in a share file (its one line of words; comment lines are skipped). Production
    refuses one that group or others can read, as it refuses such a password file."""
    try:
        text = read_small_file(path, MAX_SHARE_FILE_SIZE, f"share file {path}").decode("ascii")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not a recovery share file (not plain text)") from None
    if environment.is_production and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise UnsafeConfigurationError(
            f"share file {path} can be read by group or others; run 'chmod 600 {path}'"
        )
    words = _share_lines(text)
    if len(words) != 1:
        raise InvalidInputError(f"{path} is not a recovery share file: it should hold one line of words")
    return words[0]


def _shares_from_input() -> list[str]:
    """Shares piped on stdin (one per line), or typed at the terminal without echo."""
    if not sys.stdin.isatty():
        data = sys.stdin.read(MAX_SHARES * MAX_SHARE_FILE_SIZE)
        shares = _share_lines(data)
        if not shares:
            raise InvalidInputError(
                "no recovery shares: give --share-file (repeatable) or one share per line on stdin"
            )
        return shares
    if not terminal_available():
        raise InvalidInputError("no recovery shares: give --share-file (repeatable)")
    first = getpass.getpass("Recovery share 1: ")
    needed = share_set_of(first).threshold
    shares = [first]
    while len(shares) < needed:
        shares.append(getpass.getpass(f"Recovery share {len(shares) + 1} of {needed}: "))
    return shares


def _share_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _setup_doc(setup: RecoverySetup) -> dict[str, object]:
    return {
        "set": setup.identifier,
        "threshold": setup.threshold,
        "shares": setup.shares,
        "created": _created(setup),
        "fingerprint": setup.fingerprint,
    }


def _created(setup: RecoverySetup) -> str:
    return timestamp(datetime.fromtimestamp(setup.created, UTC))
