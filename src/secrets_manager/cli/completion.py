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

import click
from click.shell_completion import CompletionItem

from secrets_manager.cli.session import Session

COMPLETION_SECONDS = 3.0  # a TAB that waits longer for the store completes nothing
# Each of several --server addresses' health check: a hung first one must leave the next time to
# answer within COMPLETION_SECONDS (a replica that serves answers in milliseconds).
COMPLETION_HEALTH_CHECK_SECONDS = 1.0


def complete_secret_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    root = ctx.find_root().params
    session = Session(
        store_url=root.get("store_url") or None,
        password_file=root.get("password_file"),
        audit_file=root.get("audit_file") or None,
        environ=os.environ,
        server=root.get("server") or None,
        prompts=False,
        health_check_seconds=COMPLETION_HEALTH_CHECK_SECONDS,
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
        with (
            contextlib.redirect_stderr(io.StringIO()),  # a warning would land in the command line
            session.secret_operation("complete", prefix or None) as (store, _),
        ):
            names.extend(secret.name for secret in store.list(prefix))
    except Exception:  # a store that cannot be opened without asking (PasswordNotAsked: tried,
        names.clear()  # but no password refused, so nothing audited), or any other failure
