"""Credential expiry through the real console script on a SQLite store: `store --expires`,
`metadata --expires/--no-expiry`, what `metadata`, `history`, `list --expiring`, `status` and
`get` show, and the semantics (a new version or a rotation's promote has no expiry)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from secrets_manager.store import EncryptedStore
from test_cli import Cli, Result, run_in_process

SOON = "2031-05-06T07:08:09Z"
NAME = "market-connector/BINANCE_API_KEY"


@pytest.fixture
def ready(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    assert cli("init", "--kdf-profile", "test").code == 0
    return cli


def ok(result: Result) -> Result:
    assert result.code == 0, result.stderr
    return result


def meta(cli: Cli, name: str = NAME) -> dict[str, object]:
    return dict(json.loads(ok(cli("metadata", name, "--json")).out))


def test_store_with_an_expiry_shows_it_and_the_next_version_has_none(ready: Cli) -> None:
    stored = ok(ready("store", NAME, "--expires", SOON, "--json", input=b"key-1"))
    assert json.loads(stored.out) == {"name": NAME, "version": 1, "expires": SOON}
    assert meta(ready)["expires"] == SOON
    shown = ok(ready("metadata", NAME)).out
    assert f"expires:         {SOON} (in " in shown, shown
    assert json.loads(ok(ready("history", NAME, "--json")).out)["expires"] == SOON
    assert SOON in ok(ready("history", NAME)).out
    ok(ready("store", NAME, input=b"key-2"))
    assert meta(ready)["expires"] is None
    assert "expires:         -" in ok(ready("metadata", NAME)).out
    assert SOON not in ok(ready("history", NAME)).out  # version 1's, no longer current: not shown


def test_an_age_from_now_is_a_time_in_the_future(ready: Cli) -> None:
    before = datetime.now(UTC)
    ok(ready("store", NAME, "--expires", "90d", input=b"key"))
    expires = datetime.fromisoformat(str(meta(ready)["expires"]))
    assert timedelta(days=90) - timedelta(seconds=5) <= expires - before <= timedelta(days=90, seconds=5)


def test_store_refuses_a_past_or_unreadable_expiry_and_writes_nothing(ready: Cli) -> None:
    for bad, words in (("2020-01-01", "already past"), ("next tuesday", "ISO 8601")):
        result = ready("store", NAME, "--expires", bad, input=b"key")
        assert result.code == 2, result.stderr
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ready("metadata", NAME).code == 3  # nothing was stored


def test_metadata_sets_and_clears_the_current_versions_expiry(ready: Cli) -> None:
    ok(ready("store", NAME, "--tag", "owner=desk", input=b"key"))
    changed = ok(ready("metadata", NAME, "--expires", SOON))
    assert f"expiry set to {SOON}" in changed.stderr and "no new version" in changed.stderr
    assert meta(ready)["expires"] == SOON and meta(ready)["current_version"] == 1
    again = ok(ready("metadata", NAME, "--expires", SOON))
    assert "(already so)" in again.stderr
    ok(ready("metadata", NAME, "--tag", "team=x"))  # other metadata changes keep it
    assert meta(ready)["expires"] == SOON and meta(ready)["tags"] == {"owner": "desk", "team": "x"}
    cleared = ok(ready("metadata", NAME, "--no-expiry"))
    assert "expiry cleared" in cleared.stderr
    assert meta(ready)["expires"] is None
    both = ready("metadata", NAME, "--expires", SOON, "--no-expiry")
    assert both.code == 2 and "not both" in both.stderr


def test_metadata_takes_a_past_expiry_learnt_late_and_warns(ready: Cli) -> None:
    ok(ready("store", NAME, input=b"key"))
    late = ok(ready("metadata", NAME, "--expires", "2020-01-02T03:04:05Z"))
    assert "warning: 2020-01-02T03:04:05Z is past" in late.stderr
    assert f"'secrets-manager store {NAME} --expires TIME'" in late.stderr
    assert meta(ready)["expires"] == "2020-01-02T03:04:05Z"
    missing = ready("metadata", "auth/NOPE", "--expires", SOON)
    assert missing.code == 3, missing.stderr


def test_get_of_an_expired_version_prints_the_value_and_one_warning(ready: Cli) -> None:
    ok(ready("store", NAME, input=b"sk-live-EXPIRED-key"))
    ok(ready("metadata", NAME, "--expires", "2020-01-02T03:04:05Z"))
    got = ok(ready("get", NAME))
    assert got.out == "sk-live-EXPIRED-key\n"
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "version 1 of " + NAME + " expired at 2020-01-02T03:04:05Z" in lines[0]
    assert f"secrets-manager store {NAME} --expires TIME" in lines[0]
    assert "sk-live" not in got.stderr
    ok(ready("metadata", NAME, "--expires", SOON))  # not expired: no warning
    assert ok(ready("get", NAME)).stderr == ""


def test_otp_inject_and_run_warn_of_an_expired_value_as_get_does(ready: Cli, tmp_path: Path) -> None:
    """They gave an expired credential without a word: a service started by `run` on a key the
    exchange no longer takes fails later, far from the cause."""
    ok(ready("store", "broker/TOTP", input=b"JBSWY3DPEHPK3PXP"))
    ok(ready("store", NAME, input=b"sk-live-EXPIRED-key"))
    for name in ("broker/TOTP", NAME):
        ok(ready("metadata", name, "--expires", "2020-01-02T03:04:05Z"))
    (tmp_path / "config.tpl").write_text(f"key: {{{{ sm://{NAME} }}}}\n")
    said = {
        "otp": ok(ready("otp", "broker/TOTP")).stderr,
        "inject": ok(ready("inject", "-i", str(tmp_path / "config.tpl"))).stderr,
        "run": ok(ready("run", "--secret", f"{NAME}=KEY", "--", sys.executable, "-c", "pass")).stderr,
    }
    for command, stderr in said.items():
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "expired at 2020-01-02T03:04:05Z" in lines[0], (command, stderr)
        assert "sk-live" not in stderr and "JBSWY3DP" not in stderr


def test_list_expiring_names_the_expired_and_the_soon_expiring_only(ready: Cli) -> None:
    soon = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ok(ready("store", "a/EXPIRED", input=b"x"))
    ok(ready("metadata", "a/EXPIRED", "--expires", "2020-01-01T00:00:00Z"))
    ok(ready("store", "a/SOON", "--expires", soon, input=b"x"))
    ok(ready("store", "a/LATER", "--expires", "2099-01-01T00:00:00Z", input=b"x"))
    ok(ready("store", "a/NEVER", input=b"x"))
    ok(ready("store", "a/ROTATED", "--expires", soon, input=b"x"))
    ok(ready("store", "a/ROTATED", input=b"y"))  # the new value's expiry is not known
    assert ok(ready("list", "--expiring", "14d")).out.splitlines() == ["a/EXPIRED", "a/SOON"]
    listed = json.loads(ok(ready("list", "--expiring", "14d", "--json")).out)
    assert [(m["name"], m["expires"]) for m in listed] == [
        ("a/EXPIRED", "2020-01-01T00:00:00Z"),
        ("a/SOON", soon),
    ]
    long = ok(ready("list", "--expiring", "14d", "-l")).out.splitlines()
    assert long[0].endswith("2020-01-01T00:00:00Z (expired)"), long
    assert soon in long[1] and "(in 2 days)" in long[1], long
    everything = json.loads(ok(ready("list", "--json")).out)
    assert {m["name"]: m["expires"] for m in everything}["a/LATER"] == "2099-01-01T00:00:00Z"
    bad = ready("list", "--expiring", "soon")
    assert bad.code == 2 and "--expiring 'soon'" in bad.stderr


def test_an_expiry_a_day_and_a_half_away_is_in_1_day(ready: Cli) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(hours=36)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ok(ready("store", "a/TOMORROW", "--expires", tomorrow, input=b"x"))
    (line,) = [
        line for line in ok(ready("list", "--expiring", "14d", "-l")).out.splitlines() if "a/TOMORROW" in line
    ]
    assert f"{tomorrow} (in 1 day)" in line, line


def test_status_counts_the_expired_and_those_expiring_within_14_days(ready: Cli) -> None:
    soon = (datetime.now(UTC) + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ok(ready("store", "a/EXPIRED", input=b"x"))
    ok(ready("metadata", "a/EXPIRED", "--expires", "2020-01-01T00:00:00Z"))
    ok(ready("store", "a/SOON", "--expires", soon, input=b"x"))
    ok(ready("store", "a/LATER", "--expires", "60d", input=b"x"))
    doc = json.loads(ok(ready("status", "--json")).out)
    assert (doc["expired"], doc["expiring_14d"]) == (1, 1)
    assert "1 expired, 1 expires within 14 days" in ok(ready("status")).out


def test_a_rotations_promote_does_not_inherit_the_expiry(ready: Cli) -> None:
    ok(ready("store", NAME, "--expires", SOON, input=b"old-key"))
    command = f"{sys.executable} -c 'import sys; sys.stdin.read()'"
    rotated = ready("rotate", NAME, "--set-command", command, "--test-command", "true")
    assert rotated.code == 0, rotated.stderr
    assert meta(ready)["current_version"] == 2
    assert meta(ready)["expires"] is None


def test_rollback_and_copy_carry_the_expiry_of_the_value_they_write_again(ready: Cli) -> None:
    ok(ready("store", NAME, "--expires", SOON, input=b"key-1"))
    ok(ready("store", NAME, input=b"key-2"))
    ok(ready("rollback", NAME))  # version 3 holds version 1's value: the same credential
    assert meta(ready)["current_version"] == 3 and meta(ready)["expires"] == SOON
    ok(ready("cp", NAME, "market-connector/COPY"))
    assert meta(ready, "market-connector/COPY")["expires"] == SOON


def test_rollback_cp_and_mv_of_an_expired_value_write_it_and_warn_once(ready: Cli) -> None:
    """They write the same credential again with its expiry; one already past is written (exit 0,
    it may work yet) with one warning, as get gives, not silently."""
    ok(ready("store", NAME, input=b"key-1"))
    ok(ready("metadata", NAME, "--expires", "2020-01-01"))
    ok(ready("store", NAME, input=b"key-2"))
    rolled = ok(ready("rollback", NAME))
    lines = rolled.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("secrets-manager: rolled back"), rolled.stderr
    assert lines[1].startswith("secrets-manager: warning: version 3 of " + NAME), rolled.stderr
    assert "expired at 2020-01-01T00:00:00Z" in lines[1] and "--expires TIME" in lines[1], rolled.stderr
    for verb, new in (("cp", "svc/COPY"), ("mv", "svc/MOVED")):
        written = ok(ready(verb, NAME, new))
        assert f"warning: version 1 of {new} holds the value of version 3 of {NAME}" in written.stderr
        assert written.stderr.count("\n") == 2 and "key-1" not in written.stderr, written.stderr
    fresh = ok(ready("store", "svc/FRESH", "--expires", SOON, input=b"key-3"))
    assert "warning" not in ok(ready("cp", "svc/FRESH", "svc/FRESH2")).stderr, fresh.stderr


def test_edit_with_expires_records_it_for_the_saved_value_and_without_says_it_has_none(ready: Cli) -> None:
    ok(ready("store", NAME, "--expires", SOON, input=b"old-key"))
    sed = {"EDITOR": "sed -i s/old/new/"}
    edited = ok(ready("edit", NAME, "--expires", "2032-01-02T03:04:05Z", env=sed))
    assert "stored market-connector/BINANCE_API_KEY version 2, expires 2032-01-02T03:04:05Z" in edited.stderr
    assert ready("get", NAME).out == "new-key\n"
    assert meta(ready)["expires"] == "2032-01-02T03:04:05Z"
    # Without --expires the saved value has none, and the edit says so (the old one's was known).
    plain = ok(ready("edit", NAME, env={"EDITOR": "sed -i s/new/newer/"}))
    assert meta(ready)["expires"] is None
    assert "version 2 was to expire at 2032-01-02T03:04:05Z; version 3 has no expiry" in plain.stderr
    # A past time is refused before the editor runs: nothing stored.
    past = ready("edit", NAME, "--expires", "2020-01-01", env={"EDITOR": "sed -i s/newer/never/"})
    assert past.code == 2 and "already past" in past.stderr, past.stderr
    assert meta(ready)["current_version"] == 3 and ready("get", NAME).out == "newer-key\n"


def test_import_with_expires_sets_it_on_every_value_it_writes(ready: Cli, tmp_path: Path) -> None:
    env_file = tmp_path / "exchange.env"
    env_file.write_text("BINANCE_API_KEY=k1\nBINANCE_API_SECRET=s1\n")
    imported = ok(ready("import", str(env_file), "--service", "market-connector", "--expires", SOON))
    assert f"imported 2 of 2 secret(s) into market-connector/, expiring {SOON}" in imported.stderr
    assert meta(ready)["expires"] == SOON
    assert meta(ready, "market-connector/BINANCE_API_SECRET")["expires"] == SOON
    past = ready("import", str(env_file), "--service", "other", "--expires", "2020-01-01")
    assert past.code == 2 and "already past" in past.stderr, past.stderr
    assert json.loads(ok(ready("list", "other/", "--json")).out) == []


def test_rotate_with_expires_records_it_for_the_version_it_made_current(ready: Cli) -> None:
    ok(ready("store", NAME, "--expires", SOON, input=b"old-key"))
    command = f"{sys.executable} -c 'import sys; sys.stdin.read()'"
    rotated = ok(
        ready(
            "rotate", NAME, "--set-command", command, "--test-command", "true", "--expires", "90d", "--json"
        )
    )
    report = json.loads(rotated.out)
    expires = datetime.fromisoformat(report["expires"])
    assert report["version"] == 2 and meta(ready)["current_version"] == 2
    assert meta(ready)["expires"] == report["expires"]
    assert timedelta(days=89) < expires - datetime.now(UTC) <= timedelta(days=90)
    assert f"version 2 is current, expires {report['expires']}" in rotated.stderr
    records = json.loads(ok(ready("audit", "show", "--json")).out)
    steps = [
        (r["operation"], r["outcome"], r["version"]) for r in records if r["operation"].startswith("rotate")
    ]
    assert steps[-3:] == [
        ("rotate.promote", "ok", 2),
        ("rotate.expiry", "pending", None),
        ("rotate.expiry", "ok", 2),
    ]
    # Refused before anything is staged: a past time, and --discard (which makes no value).
    past = ready("rotate", NAME, "--set-command", command, "--expires", "2020-01-01")
    assert past.code == 2 and "already past" in past.stderr, past.stderr
    discard = ready("rotate", NAME, "--discard", "--expires", "90d")
    assert discard.code == 2 and "--expires goes with a new value" in discard.stderr, discard.stderr
    assert meta(ready)["current_version"] == 2 and meta(ready)["labels"] == {"current": 2, "previous": 1}


def test_rotate_expires_is_not_recorded_for_a_version_another_process_stored_after_its_promote(
    ready: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rotate --expires` records the expiry only if the version it made current still is: a
    `store` by another process landing between that check and the update (here exactly there: the
    update waits for the other process to finish) must keep its own expiry, none, not get the
    rotation's. The check was a describe before the update, so the store's version got it."""
    ok(ready("store", NAME, input=b"old-key"))
    update = EncryptedStore.update_metadata
    landed: list[int] = []

    def after_a_concurrent_store(self: EncryptedStore, name: str, **changes: object) -> None:
        if not landed:
            landed.append(ready("store", NAME, input=b"stored-meanwhile").code)
        update(self, name, **changes)  # type: ignore[arg-type]

    monkeypatch.setattr(EncryptedStore, "update_metadata", after_a_concurrent_store)
    command = f"{sys.executable} -c 'import sys; sys.stdin.read()'"
    code = run_in_process(ready, monkeypatch, "rotate", NAME, "--set-command", command, "--expires", "90d")
    assert landed == [0]
    assert code == 7  # the rotation stands; its expiry was not recorded, and the error says so
    history = json.loads(ok(ready("history", NAME, "--json")).out)
    assert history["current_version"] == 3 and history["expires"] is None, history
    assert ok(ready("get", NAME)).out == "stored-meanwhile\n"


def test_rotate_resume_with_expires_records_it_once_the_resumed_version_is_current(ready: Cli) -> None:
    ok(ready("store", NAME, input=b"old-key"))
    failed = ready("rotate", NAME, "--set-command", "false", "--expires", SOON)
    assert failed.code != 0 and meta(ready)["expires"] is None  # nothing current changed
    resumed = ok(ready("rotate", NAME, "--resume", "--set-command", "true", "--expires", SOON))
    assert f"resumed and rotated {NAME}: version 2 is current, expires {SOON}" in resumed.stderr
    assert meta(ready)["current_version"] == 2 and meta(ready)["expires"] == SOON


def test_times_print_with_a_four_digit_year(ready: Cli) -> None:
    ok(ready("store", NAME, input=b"key"))
    late = ok(ready("metadata", NAME, "--expires", "0227-03-01"))
    assert "0227-03-01T00:00:00Z is past" in late.stderr, late.stderr
    assert meta(ready)["expires"] == "0227-03-01T00:00:00Z"


def test_get_json_has_the_expiry_of_the_version_it_prints(ready: Cli) -> None:
    """README: `metadata`, `history` and every `--json` show the current version's expiry (or null);
    `get --json` had none, so a script reading a credential could not see when it stops working."""
    ok(ready("store", NAME, "--expires", SOON, input=b"key-1"))
    doc = json.loads(ok(ready("get", NAME, "--json")).out)
    assert (doc["value"], doc["version"], doc["expires"]) == ("key-1", 1, SOON)
    ok(ready("store", NAME, input=b"key-2"))
    doc = json.loads(ok(ready("get", NAME, "--json")).out)
    assert (doc["value"], doc["version"], doc["expires"]) == ("key-2", 2, None)
