"""`secrets-manager health`: the grpc.health.v1 status of each service address, for a shell, a
cron job or a container's probe (as grpc_health_probe, with the CLI's own certificate variables).

The service says NOT_SERVING while its store does not answer or its audit log cannot be written
(service/health_probe.py), and while it shuts down. Exit 0 when every address is SERVING, else 1
with one line naming those that are not.
"""

from __future__ import annotations

import click

from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.output import print_json, print_table
from secrets_manager.cli.session import HEALTH_CHECK_SECONDS, SERVER_VARIABLE, Session, quiet_grpc
from secrets_manager.errors import InvalidInputError, StorageError


@cli.command()
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60),
    default=HEALTH_CHECK_SECONDS,
    show_default=True,
    help="Seconds to wait for each address's answer (several are asked at once).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the statuses as JSON.")
@pass_session
def health(session: Session, timeout: float, as_json: bool) -> None:
    """Check the health of the service at --server / SECRETS_MANAGER_ADDR (each of several
    comma-separated addresses). Exit 0 if every one is SERVING, 1 if not (the store down, the
    audit log unwritable, shutting down, or unreachable)."""
    quiet_grpc()  # as remote_store: no gRPC core lines
    from secrets_manager.client import RemoteStore
    from secrets_manager.client._config import parse_addresses
    from secrets_manager.client.remote import health_statuses

    addresses = parse_addresses(session.server or "", f"--server / {SERVER_VARIABLE}")
    if not addresses:
        raise InvalidInputError(
            f"health needs a service: give --server HOST:PORT or set {SERVER_VARIABLE} "
            "(several comma-separated)"
        )
    tls = session.tls_files()
    credentials = tls.credentials()  # read once for every address
    remotes: list[RemoteStore] = []
    try:
        for address in addresses:
            remotes.append(RemoteStore(address, tls, credentials=credentials))
        statuses = health_statuses(remotes, timeout)  # all at once: one timeout, not one each
    finally:
        for remote in remotes:
            remote.close()
    results: list[dict[str, str | None]] = [
        {"address": address, "status": status, "error": error}
        for address, (status, error, _) in zip(addresses, statuses, strict=True)
    ]
    if as_json:
        print_json(results)
    else:
        print_table(
            ["ADDRESS", "STATUS", "ERROR"],
            [[r["address"] or "", r["status"] or "", r["error"] or ""] for r in results],
            free_text={"ERROR"},
        )
    failing = [f"{r['address']} {r['status']}" for r in results if r["status"] != "SERVING"]
    if failing:
        # Why each unreachable one failed, with what to check (a refused connection, a failed
        # handshake): its log cannot say, it never heard of the call. The service's log and metric
        # explain a status it answered (NOT_SERVING: its store or audit log).
        whys = [
            why if address in why else f"{address}: {why}"
            for address, (status, _, why) in zip(addresses, statuses, strict=True)
            if status == "UNREACHABLE" and why
        ]
        answered = any(r["status"] not in ("SERVING", "UNREACHABLE") for r in results)
        log = (
            "see the service's log (event health.check_failed) and its secrets_manager_health_check_ok metric"
        )
        advice = [log] if answered else []
        raise StorageError("; ".join([f"not serving: {', '.join(failing)}", *whys, *advice]))
