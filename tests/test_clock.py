"""Time and clocks: what a command makes of the times and ages it is given (offsets, zones, the
ends of the calendar), and that waits and rate limits do not follow a wall clock that is stepped."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from secrets_manager.environment import Environment
from secrets_manager.rotation import Due, load_schedule, plan
from secrets_manager.store import EncryptedStore
from test_cli import Cli, assert_one_line_error, run_in_process
from test_schedule import write_schedule


@pytest.fixture
def ready(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    assert cli("init", "--kdf-profile", "test").code == 0
    return cli


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-01:00"])
def test_a_cutoff_whose_offset_leaves_the_calendar_is_a_one_line_error(ready: Cli, moment: str) -> None:
    """purge printed the cutoff in UTC, which overflowed: 'internal error (OverflowError)', exit 1."""
    assert ready("store", "svc/A", input=b"a").code == 0
    assert ready("delete", "svc/A").code == 0
    for args in (
        ("purge", "--older-than", moment, "--dry-run"),
        ("purge", "--older-than", moment),
        ("list", "--older-than", moment),
        ("audit", "show", "--since", moment),
    ):
        assert_one_line_error(ready(*args), 2, repr(moment), "years 1 to 9999 in UTC")
    assert ready("undelete", "svc/A").code == 0  # purge erased nothing


def test_a_cutoff_with_an_offset_or_none_is_taken_in_utc(ready: Cli) -> None:
    assert ready("store", "svc/A", input=b"a").code == 0
    # 2999-01-01T05:30+05:30 is 2999-01-01T00:00Z; a naive time is UTC whatever TZ says.
    for moment in ("2999-01-01T05:30:00+05:30", "2999-01-01T00:00:00Z", "2999-01-01"):
        for zone in ("Asia/Kolkata", "America/New_York"):
            result = ready("purge", "--older-than", moment, "--dry-run", env={"TZ": zone})
            assert result.code == 0, result.stderr
            assert "deleted before 2999-01-01T00:00:00Z" in result.stderr, result.stderr


class SteppedClock:
    """`time` for a module under test: a wall clock an operator or NTP steps, and a monotonic
    one that only runs forward."""

    def __init__(self, wall: float) -> None:
        self.wall, self.mono = wall, 1000.0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    perf_counter = monotonic


def test_client_certificate_expiry_notices_are_a_day_apart_on_the_monotonic_clock(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The day between two notices of one certificate was counted on the wall clock: stepped
    back two days, the next notice came three days later; stepped forward a day, it came again
    at the next call."""
    from secrets_manager.service import server
    from secrets_manager.service.metrics import Metrics
    from secrets_manager.tls.identity import Caller

    clock = SteppedClock(2_000_000_000.0)
    monkeypatch.setattr(server, "time", clock)
    caller = Caller(
        "spiffe://test/auth", serial=7, fingerprint=b"f" * 32, not_valid_after=clock.wall + 5 * 86400
    )
    notices = server._ClientExpiryNotices(Metrics(None))

    def warned() -> int:
        return sum(1 for r in caplog.records if getattr(r, "event", "") == "tls.client_certificate_expiring")

    with caplog.at_level("WARNING", logger=server.log.name):
        notices.check(caller, "ipv4:127.0.0.1:1")
        assert warned() == 1
        clock.wall += 86400  # stepped forward a day, a minute later: no second notice yet
        clock.run(60)
        notices.check(caller, "ipv4:127.0.0.1:1")
        assert warned() == 1
        clock.wall -= 3 * 86400  # then back three days; a day later the next notice is due
        clock.run(86400)
        notices.check(caller, "ipv4:127.0.0.1:1")
        assert warned() == 2


def test_status_never_says_a_value_was_stored_minus_one_days_ago(
    ready: Cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value stored, or a secret deleted, by a host whose clock is ahead (a replica on a shared
    store, or this host before its clock was stepped back) was "(-1 days ago)" in status."""
    from secrets_manager.cli import status_command

    assert ready("store", "svc/A", input=b"a").code == 0
    assert ready("store", "svc/B", input=b"b").code == 0
    assert ready("delete", "svc/B").code == 0

    class Behind(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Behind:  # type: ignore[override]
            return cls.fromtimestamp(datetime.now(UTC).timestamp() - 3600, UTC)

    capsys.readouterr()
    monkeypatch.setattr(status_command, "datetime", Behind)
    assert run_in_process(ready, monkeypatch, "status") == 0
    shown = capsys.readouterr().out
    assert shown.count("(0 days ago") == 2 and "-1 days" not in shown, shown
    monkeypatch.setattr(status_command, "datetime", Behind)
    assert run_in_process(ready, monkeypatch, "status", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["oldest_value"]["days"] == 0 and doc["oldest_deleted"]["days"] == 0, doc


# The clearer as `get --clip` starts it, but on a clock whose CLOCK_BOOTTIME has gained an hour
# (the machine slept; its monotonic clock stood still meanwhile) once the file RESUMED exists.
_SLEEPING_CLEARER = """
import os, runpy, sys, time
real = time.clock_gettime
def clock_gettime(clock):
    asleep = clock == getattr(time, "CLOCK_BOOTTIME", None) and os.path.exists(os.environ["RESUMED"])
    return real(clock) + (3600 if asleep else 0)
time.clock_gettime = clock_gettime
sys.argv = [sys.argv[1], "secrets-manager-clip-clearer"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _clearer_orders(board: Path, *, seconds: int) -> dict[str, object]:
    """What `get --clip` hands its detached clearer, for a clipboard of files (`board`, holding
    the copied value) standing in for X's: clear it after `seconds`."""
    board.write_bytes(b"the copied value")
    write = f"import sys; open({str(board)!r}, 'wb').write(sys.stdin.buffer.read())"
    return {
        "tool": {
            "name": "files",
            "display": "test",
            "copy": [sys.executable, "-c", write],
            "paste": ["cat", str(board)],
            "clear": None,
        },
        "digest": hashlib.sha256(b"the copied value").hexdigest(),
        "before": base64.b64encode(b"what was there before").decode(),
        "seconds": seconds,
        "pid_file": str(board.parent / "clip.pid"),
    }


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's CLOCK_BOOTTIME")
def test_the_clipboard_is_cleared_on_waking_from_a_sleep_longer_than_the_clip_time(tmp_path: Path) -> None:
    """The clearer waited on the monotonic clock, which stops while the machine sleeps: a value
    copied just before an hour's suspend stayed on the clipboard for the rest of its 45 s (here
    600 s) after the wake-up. A clipboard of files stands in for X's."""
    from secrets_manager.cli import clipboard

    board, resumed = tmp_path / "clipboard", tmp_path / "resumed"
    orders = _clearer_orders(board, seconds=600)
    clearer = subprocess.Popen(
        [sys.executable, "-c", _SLEEPING_CLEARER, clipboard.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RESUMED": str(resumed)},
    )
    try:
        assert clearer.stdin is not None and clearer.stdout is not None
        clearer.stdin.write(json.dumps(orders).encode())
        clearer.stdin.close()
        assert clearer.stdout.readline() == b"ready\n"
        time.sleep(0.5)
        assert board.read_bytes() == b"the copied value"  # awake: its 600 s run
        resumed.touch()  # the machine wakes up an hour later
        deadline = time.monotonic() + 10
        while board.read_bytes() != b"what was there before" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert board.read_bytes() == b"what was there before"
        assert clearer.wait(timeout=10) == 0
    finally:
        clearer.kill()
        clearer.wait()


def test_a_pending_version_dated_ahead_of_the_clock_by_more_than_its_stale_time_is_resumed(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """A rotation staged while the clock was a day ahead (then stepped back), whose runner died
    after its set command, was 'in progress' to every runner for that day and its three command
    timeouts: the new value at the target, the old one current, nothing resumed it. Dated ahead
    by less than the stale time (replicas' clocks a little apart) it is still left alone."""
    schedule = write_schedule(tmp_path / "r.toml", {"name": "db/app", "every": "1h", "timeout": 10})
    (rule,) = load_schedule(schedule, environment=Environment.DEVELOPMENT)
    encrypted_store.put("db/app", b"one")
    staged = encrypted_store.stage("db/app", b"two")
    meta = encrypted_store.describe("db/app")
    assert plan(rule, meta, staged.created - timedelta(seconds=29)).state is Due.IN_PROGRESS
    stepped_back = plan(rule, meta, staged.created - timedelta(days=1))
    assert (stepped_back.state, stepped_back.pending) == (Due.RESUME, 2)


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-01:00", "99999999999d", "9" * 5000 + "d"])
def test_an_expiry_past_year_9999_is_said_to_be_so(ready: Cli, moment: str) -> None:
    """An ISO 8601 time, or an age, past year 9999 once in UTC was told to 'give an ISO 8601 time
    … or an age from now like 12h, 90d', which it was."""
    for args in (("store", "svc/A", "--expires", moment), ("list", "--expiring", moment)):
        result = ready(*args, input=b"a")
        assert_one_line_error(result, 2, "outside years 1 to 9999 in UTC")
        assert "like 12h" not in result.stderr
    assert ready("get", "svc/A").code == 3  # nothing stored


def test_an_audit_log_whose_times_go_backwards_still_verifies(
    encrypted_store: EncryptedStore, tmp_path: Path
) -> None:
    """The clock stepped back an hour, forward a day, back two days, and to 1970 and before: the
    chain is its seq and hashes, never its times (docs/audit.md), so the log verifies."""
    from secrets_manager.audit import AuditEvent, AuditLog

    now = 1_800_000_000.0
    ticks = iter([now, now - 3600, now + 86_400, now - 2 * 86_400, 0.0, -1.5])
    log = AuditLog(tmp_path / "lib.audit.jsonl", clock=lambda: next(ticks))
    written = [log.append([AuditEvent("get", "svc")], encrypted_store)[0] for _ in range(6)]
    assert [r["time"][:19] for r in written][-2:] == ["1970-01-01T00:00:00", "1969-12-31T23:59:58"]
    assert log.verify(encrypted_store.audit_key(), encrypted_store.audit_anchor()) == 6


def test_the_service_log_time_is_utc_whatever_tz_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's JSON log lines had the host's local time ('2026-11-30T20:00:00-0500' in a
    container with TZ=America/New_York), while the audit log and every time inside the lines are
    UTC."""
    import logging

    from secrets_manager.service.server import JsonLogFormatter

    record = logging.makeLogRecord({"msg": "started", "event": "service.started"})
    record.created = 1_804_000_000.25  # 2027-03-02T15:06:40.250Z
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        line = json.loads(JsonLogFormatter().format(record))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line["time"] == "2027-03-02T15:06:40.250+00:00"


_CLEARER_WITHOUT_BOOTTIME = """
import errno, os, runpy, sys, time
real = time.clock_gettime
def clock_gettime(clock):
    if clock == getattr(time, "CLOCK_BOOTTIME", None):  # a kernel or sandbox that refuses it
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    return real(clock)
time.clock_gettime = clock_gettime
sys.argv = [sys.argv[1], "secrets-manager-clip-clearer"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's CLOCK_BOOTTIME")
def test_the_clipboard_is_cleared_where_the_kernel_refuses_clock_boottime(tmp_path: Path) -> None:
    """Python names CLOCK_BOOTTIME from the headers it was built with; a kernel or sandbox that
    refuses it (EINVAL) made the detached clearer die at its first reading of the clock, and the
    value stayed on the clipboard for good. There it counts on the monotonic clock."""
    from secrets_manager.cli import clipboard

    board = tmp_path / "clipboard"
    orders = _clearer_orders(board, seconds=1)
    clearer = subprocess.Popen(
        [sys.executable, "-c", _CLEARER_WITHOUT_BOOTTIME, clipboard.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        assert clearer.stdin is not None and clearer.stdout is not None
        clearer.stdin.write(json.dumps(orders).encode())
        clearer.stdin.close()
        assert clearer.stdout.readline() == b"ready\n"
        assert clearer.wait(timeout=10) == 0
        assert board.read_bytes() == b"what was there before"
    finally:
        clearer.kill()
        clearer.wait()


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's CLOCK_BOOTTIME")
def test_the_agent_keeps_and_expires_keys_where_the_kernel_refuses_clock_boottime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent read CLOCK_BOOTTIME without trying it first: where a kernel or sandbox refuses it
    (EINVAL) the first key given to it ended the agent with OSError. There it counts on the
    monotonic clock, as the clipboard's clearer does."""
    import errno

    from secrets_manager import clocks
    from secrets_manager.agent.process import KeyCache

    real = time.clock_gettime

    def clock_gettime(clock: int) -> float:
        if clock == time.CLOCK_BOOTTIME:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(clock)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    clocks.awake_or_asleep_clock_id.cache_clear()
    try:
        cache = KeyCache(ttl=0.2, max_ttl=60)
        cache.put("store", "header", bytes(range(32)))
        assert cache.get("store", "header") == bytes(range(32))
        time.sleep(0.3)
        assert cache.get("store", "header") is None  # its time ran out on the monotonic clock
    finally:
        clocks.awake_or_asleep_clock_id.cache_clear()
