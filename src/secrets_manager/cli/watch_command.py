"""`watch [PREFIX]`: print each change to the secrets as it happens (names, versions, kinds; never
values), as `consul watch` does, for a script that acts on a rotation: render a file again
(`inject`), reload a program, page someone.

The changes come from where `run --restart-on-change` hears them: the store's own change feed (a
Vault or AWS store's polled versions), or through `--server` the service's Watch stream, which
shows only what the caller may read and moves to another replica if its own goes away.
"""

from __future__ import annotations

import signal
import sys
import threading
from datetime import UTC, datetime

import click

from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.output import info_line, print_json, timestamp
from secrets_manager.cli.rotate_commands import terminate_as_interrupt
from secrets_manager.cli.run_supervisor import ChangeSource, FeedSource, WatchSource
from secrets_manager.cli.session import Session, is_remote_store
from secrets_manager.errors import InvalidInputError, Terminated, WatchUnsupportedError
from secrets_manager.store import SecretStore
from secrets_manager.store.changes import ChangeKind, SecretChange
from secrets_manager.store.names import validate_prefix

WHAT_HAPPENED = {
    ChangeKind.VERSION_ADDED: "new version",
    ChangeKind.METADATA_CHANGED: "changed",  # labels, tags, description, expiry, deleted or back
    ChangeKind.SECRET_DESTROYED: "destroyed",
    ChangeKind.RESYNC: "changes missed: read everything again",
}


@cli.command("watch")
@click.argument("prefix", required=False, default="")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: time, kind, name, version.")
@pass_session
def watch_command(session: Session, prefix: str, as_json: bool) -> None:
    """Print each change to the secrets under PREFIX as it happens (name, version, kind; never a
    value) until interrupted (Ctrl-C, SIGTERM: exit 0): for scripts that act on a rotation."""
    validate_prefix(prefix)
    try:
        # From the start: a store slow to open is no exception. (Left to their default action,
        # SIGTERM ended the process with 143 and Ctrl-C with 130.)
        with terminate_as_interrupt((signal.SIGINT, signal.SIGTERM)):
            _watch(session, prefix, as_json)
    except Terminated:
        return  # SIGINT or SIGTERM, before or after the stream is live: exit 0, quietly


def _watch(session: Session, prefix: str, as_json: bool) -> None:
    with session.held_secret_store("watch") as (store, audited):
        source = change_source(store, prefix, "watch", "read the secrets again when you need them")
        with audited(prefix or None):  # as the service records a Watch: its prefix
            pass  # the watch itself, recorded (with the unlock) once it is live
        info_line(f"watching {prefix or 'every secret'}; Ctrl-C ends")

        def show(change: SecretChange) -> None:
            if change.kind is not ChangeKind.RESYNC and not change.name.startswith(prefix):
                return  # a local feed tells of every secret; the service's only of PREFIX's
            _print(change, as_json)

        stop = threading.Event()
        failed: list[BaseException] = []

        def follow() -> None:
            try:
                source.follow(show, stop)
            except BaseException as exc:  # the reader gone (`| head -1`), a failed write: said by main
                failed.append(exc)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            while follower.is_alive():
                follower.join(0.5)
        finally:
            stop.set()
            source.cancel()
            follower.join(timeout=5)
        if failed:
            raise failed[0]


def change_source(store: SecretStore, prefix: str, command: str, otherwise: str) -> ChangeSource:
    """Where the changes under `prefix` come from (run --restart-on-change's sources), with
    `command`'s own words where there are none: what it needs, and `otherwise` what to do."""
    if is_remote_store(store):
        try:
            return WatchSource(store, prefix)
        except WatchUnsupportedError:
            raise WatchUnsupportedError(
                f"{command} needs the service's Watch stream, and {store.address} does not offer it "
                f"(its store has no change feed, or watch_poll_seconds = 0 turned it off); ask for "
                f"Watch to be on, or {otherwise}"
            ) from None
    try:
        return FeedSource(store)
    except InvalidInputError:
        raise InvalidInputError(
            f"{command}: this store cannot tell when its secrets change; {otherwise}"
        ) from None


def _print(change: SecretChange, as_json: bool) -> None:
    now = timestamp(datetime.now(UTC))
    if as_json:
        print_json(
            {"time": now, "kind": change.kind.value, "name": change.name or None, "version": change.version},
            compact=True,
        )
    else:
        version = f" version {change.version}" if change.version else ""
        click.echo(f"{now}  {WHAT_HAPPENED[change.kind]}  {change.name}{version}".rstrip())
    sys.stdout.flush()  # a pipe to a script: each line as it happens
