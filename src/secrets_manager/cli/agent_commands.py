"""`secrets-manager agent start|status|forget|stop`: the unlock agent (secrets_manager/agent), so a
person at a terminal types the master password once per session, as pass users do with gpg-agent."""

from __future__ import annotations

import re
import time

import click

from secrets_manager.agent import AgentClient, AgentNotRunning, start_agent
from secrets_manager.cli.app import cli, pass_session
from secrets_manager.cli.output import info_line, print_json, printable
from secrets_manager.cli.session import Session
from secrets_manager.errors import InvalidInputError, UnsafeConfigurationError

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smh]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
MAX_TTL_SECONDS = 7 * 24 * 3600
STOP_WAIT_SECONDS = 5.0
DEFAULT_TTL_SECONDS = 600.0


def parse_duration(text: str, option: str) -> float:
    """Seconds from `90s`, `10m`, `2h` or a plain number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InvalidInputError(f"{option} {text!r} is not a duration; write e.g. 90s, 10m or 2h")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise InvalidInputError(f"{option} must be more than 0 and at most 7 days (168h)")
    return seconds


def duration_text(seconds: float) -> str:
    whole = round(seconds)
    if seconds < 60 and seconds != whole:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


@cli.group()
def agent() -> None:
    """Type the master password once per session, as with gpg-agent.

    \b
    The agent keeps the unlock key the password derived for each store you open at a terminal
    (never the password), for 10 minutes after its last use and at most 2 hours; commands that
    would prompt for the password ask it first. Start it from your shell profile:
        secrets-manager agent start --quiet
    Refused in production (services unlock with a password file or AWS KMS)."""


@agent.command("start")
@click.option(
    "--ttl",
    default=None,
    help="Forget a key this long after its last use.  [default: 10m, or --max-ttl if shorter]",
)
@click.option("--max-ttl", default="2h", show_default=True, help="Forget a key this long after it was given.")
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Say nothing unless it fails (for a shell profile: every shell runs it).",
)
@pass_session
def start(session: Session, ttl: str | None, max_ttl: str, quiet: bool) -> None:
    """Start your agent in the background (returns once it listens); one already running is fine."""
    if session.environment.is_production:
        raise UnsafeConfigurationError(
            "the agent is refused in production: services unlock with a password file or AWS KMS, "
            "and no command there asks an agent"
        )
    max_seconds = parse_duration(max_ttl, "--max-ttl")
    # a --max-ttl shorter than the default ttl is a shorter ttl too, as in gpg-agent
    ttl_seconds = min(DEFAULT_TTL_SECONDS, max_seconds) if ttl is None else parse_duration(ttl, "--ttl")
    if ttl_seconds > max_seconds:
        raise InvalidInputError("--ttl must not be longer than --max-ttl")
    pid, started = start_agent(session.environ, ttl_seconds, max_seconds)
    if quiet:
        return
    if started:
        info_line(
            f"agent started (pid {pid}): keys kept {duration_text(ttl_seconds)} after their last use, "
            f"at most {duration_text(max_seconds)}"
        )
    else:
        info_line(f"agent already running (pid {pid}); 'agent stop' first to start it with other times")


@agent.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_session
def status(session: Session, as_json: bool) -> None:
    """Whether your agent runs, its pid, and the stores it holds a key for, with the time left
    (never a key). Exit 3 if none runs."""
    client = AgentClient.for_user(session.environ)
    answer = client.request({"op": "status"})
    if as_json:
        print_json(
            {
                "running": True,
                "pid": answer["pid"],
                "socket": str(client.path),
                "ttl": answer["ttl"],
                "max_ttl": answer["max_ttl"],
                "memory_locked": answer["locked"],
                "stores": answer["keys"],
            }
        )
        return
    click.echo(f"agent running (pid {answer['pid']}) at {client.path}")
    click.echo(
        f"keys kept {duration_text(answer['ttl'])} after their last use, at most "
        f"{duration_text(answer['max_ttl'])}; memory locked: {'yes' if answer['locked'] else 'no'}"
    )
    if not answer["keys"]:
        click.echo("no store unlocked")
    for entry in answer["keys"]:
        click.echo(f"{printable(str(entry['store']))}: {duration_text(entry['expires_in'])} left")


@agent.command("forget")
@click.option("--store", "only_store", is_flag=True, help="Only the key of the store --store names.")
@pass_session
def forget(session: Session, only_store: bool) -> None:
    """Drop the keys your agent holds (all, or with --store only this store's): the next command
    asks for the password again."""
    client = AgentClient.for_user(session.environ)
    store = session.agent_store_name() if only_store else None
    try:
        answer = client.request({"op": "forget", "store": store})
    except AgentNotRunning:
        info_line("no agent is running: no key is kept")
        return
    info_line(f"forgot {answer['forgot']} key{'s' if answer['forgot'] != 1 else ''}")


@agent.command("stop")
@pass_session
def stop(session: Session) -> None:
    """Stop your agent: its keys are wiped from memory. None running is fine."""
    client = AgentClient.for_user(session.environ)
    try:
        answer = client.request({"op": "stop"})
    except AgentNotRunning:
        info_line("no agent is running")
        return
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while client.path.exists() and time.monotonic() < deadline:  # it removes its socket last
        time.sleep(0.05)
    info_line(f"agent stopped (pid {answer['pid']})")
