"""Secret names for the shell's completion (`get auth/<TAB>`), as pass completes its entries.

Listing names needs the store open, so names complete only where that asks nothing: a password
file or MASTER_PASSWORD, a running agent holding this store's key, a Vault or AWS store, or
`--server`. Never a prompt, never a message on the terminal: where the store cannot be opened so,
nothing completes. Each completion is audited as `complete` (the prefix listed).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import TYPE_CHECKING

import click
from click.shell_completion import CompletionItem

from secrets_manager.agent import AgentClient
from secrets_manager.environment import PASSWORD_VARIABLE

COMPLETION_SECONDS = 3.0  # a TAB that waits longer for the store completes nothing

if TYPE_CHECKING:
    from secrets_manager.cli.app import Session


def complete_secret_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    from secrets_manager.cli.app import Session  # app imports this module for its arguments

    root = ctx.find_root().params
    session = Session(
        store_url=root.get("store_url") or None,
        password_file=root.get("password_file"),
        audit_file=root.get("audit_file") or None,
        environ=os.environ,
        server=root.get("server") or None,
        prompts=False,
    )
    prefix = incomplete[: incomplete.rfind("/") + 1]  # the namespace typed so far: list only it
    names: list[str] = []
    # On a thread of its own, waited for at most COMPLETION_SECONDS: a store that does not answer
    # (a hung --server address, PostgreSQL or agent) must not hold the shell until its own
    # timeouts (10 s and more); past the deadline nothing completes and the process exits.
    lister = threading.Thread(target=_list_names, args=(session, prefix, names), daemon=True)
    lister.start()
    lister.join(COMPLETION_SECONDS)
    if lister.is_alive():
        return []
    return [CompletionItem(name) for name in sorted(names) if name.startswith(incomplete)]


def _list_names(session: Session, prefix: str, names: list[str]) -> None:
    try:
        if not _opens_without_asking(session):
            return  # not even tried: a failed unlock would be audited on every TAB
        with (
            contextlib.redirect_stderr(io.StringIO()),  # a warning would land in the command line
            session.secret_operation("complete", prefix or None) as (store, _),
        ):
            names.extend(secret.name for secret in store.list(prefix))
    except Exception:  # a store that cannot be opened without asking, or any other failure
        names.clear()


def _opens_without_asking(session: Session) -> bool:
    """Whether the store opens with no prompt: a service, a Vault or AWS store, a password file or
    variable, or (outside production, where commands do not use it) an agent holding its key."""
    if session.server or not session.needs_password or session.password_from_file:
        return True
    if PASSWORD_VARIABLE in session.environ:
        return True
    if session.environment.is_production:
        return False
    held = AgentClient.for_user(session.environ).request({"op": "status"})["keys"]
    store = session.agent_store_name()
    return any(entry.get("store") == store and entry.get("expires_in", 0) > 0 for entry in held)
