"""`inject -o FILE --watch [--on-change COMMAND]` (as consul-template and Vault Agent's templates):
FILE written again when a secret it refers to changes and what it holds would differ, COMMAND run
after each such write. Real processes: the CLI in the background, a real `serve`."""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service_fixtures import SCRIPT, SEED, make_pki, make_store, start_server
from test_cli import Cli
from test_run_command import through_service
from test_run_restart import store_in_served_store
from test_watch_command import signals_at_their_defaults

if TYPE_CHECKING:
    from conftest import MadeOnce

TEMPLATE = "user={{ sm://db/main#username }}\npassword={{ sm://db/main#password }}\nkey={{ sm://app/KEY }}\n"
# COMMAND: counts its runs and keeps what FILE held when it ran, and the variables it was given
# (the count written last and whole, so a test that sees it finds seen-N and env-N complete)
ON_CHANGE = (
    'n=$(($(cat runs 2>/dev/null || echo 0) + 1)); cp out.conf "seen-$n"; env > "env-$n"; '
    "echo $n > runs.new && mv runs.new runs"
)


def database(password: str, **more: object) -> bytes:
    return json.dumps({"username": "app", "password": password, **more}).encode()


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A store holding three secrets, made by the CLI (once per worker, then copied), and a template."""

    def make(home: Path) -> None:
        cli = Cli(home / "store.db", home)
        assert cli("init", "--kdf-profile", "test").code == 0
        assert cli("store", "db/main", input=database("first-SEEKRIT")).code == 0
        assert cli("store", "app/KEY", input=b"key-SEEKRIT").code == 0
        assert cli("store", "other/KEY", input=b"other-SEEKRIT").code == 0

    made_once("test_inject_watch cli", make, tmp_path)
    (tmp_path / "out.tpl").write_text(TEMPLATE)
    return Cli(tmp_path / "store.db", tmp_path)


class Watcher:
    """One `inject … --watch` in the background, in `directory`."""

    def __init__(self, directory: Path, env: Mapping[str, str], *args: str) -> None:
        self.directory = directory
        self.stderr_path = directory / "inject.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [str(SCRIPT), "inject", "-i", "out.tpl", "-o", "out.conf", "--watch", *args],
                cwd=directory, env=dict(env), stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,
                # SIGINT at its default, as from a terminal: a suite started in the background (CI)
                # inherits it ignored, and inject keeps an ignored signal ignored, as nohup means
                preexec_fn=signals_at_their_defaults,
            )  # fmt: skip

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def runs(self) -> int:
        path = self.directory / "runs"
        return int(path.read_text()) if path.exists() else 0

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"inject ended ({self.proc.returncode}): {self.stderr()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s: {self.stderr()}"
            time.sleep(0.05)

    def end(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_a_change_to_a_value_in_the_file_rewrites_it_and_runs_the_command_and_no_other_does(
    cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "out.conf"
    watcher = Watcher(tmp_path, cli.env, "--on-change", ON_CHANGE)
    try:
        watcher.wait_for(lambda: watcher.runs() == 1, "first write and command")
        assert out.read_text() == "user=app\npassword=first-SEEKRIT\nkey=key-SEEKRIT\n"
        assert (tmp_path / "seen-1").read_text() == out.read_text()  # run after FILE was complete
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        # Not in the file: another secret, a field the template does not use, a tag, the same value
        assert cli("store", "other/KEY", input=b"changed-SEEKRIT").code == 0
        assert cli("store", "db/main", input=database("first-SEEKRIT", port=5432)).code == 0
        assert cli("metadata", "app/KEY", "--tag", "team=x").code == 0
        assert cli("store", "app/KEY", input=b"key-SEEKRIT").code == 0
        written = out.stat().st_mtime_ns
        time.sleep(2)  # each seen and read (a change is read about 0.3-0.5 s after it lands)
        assert (watcher.runs(), out.stat().st_mtime_ns) == (1, written)
        assert cli("store", "db/main", input=database("second-SEEKRIT", port=5432)).code == 0
        watcher.wait_for(lambda: watcher.runs() == 2, "the command after the change")
        assert out.read_text() == "user=app\npassword=second-SEEKRIT\nkey=key-SEEKRIT\n"
        assert (tmp_path / "seen-2").read_text() == out.read_text()
        assert watcher.end() == 0  # SIGTERM ends it quietly
    finally:
        watcher.kill()
    said = watcher.stderr()
    assert "db/main changed (version 2 → 3): wrote out.conf again" in said, said
    assert "SEEKRIT" not in said and "Traceback" not in said
    assert "MASTER_PASSWORD=" not in (tmp_path / "env-2").read_text()  # withheld from COMMAND
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.conf")) == ["out.conf"]
    log = (tmp_path / "store.audit.jsonl").read_text()
    reads = [json.loads(line)["name"] for line in log.splitlines() if '"operation":"inject"' in line]
    # Each reading (at the start, after each change to db/main or app/KEY that settled) audited
    # whole; never one for a secret the template does not name.
    assert reads.count("db/main") == reads.count("app/KEY") >= 2 and "other/KEY" not in reads
    assert "SEEKRIT" not in log


def test_a_file_that_already_holds_the_result_is_not_followed_by_the_command(
    cli: Cli, tmp_path: Path
) -> None:
    """Restarted (a reboot, a unit restart) over the file it wrote: --force is needed, as without
    --watch, and COMMAND runs only if the file's content changed."""
    once = cli("inject", "-i", str(tmp_path / "out.tpl"), "-o", str(tmp_path / "out.conf"))
    assert once.code == 0, once.stderr
    refused = subprocess.run(
        [str(SCRIPT), "inject", "-i", "out.tpl", "-o", "out.conf", "--watch"],
        cwd=tmp_path, env=cli.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 7 and "already exists; add --force" in refused.stderr
    # refused before any secret was read: no reading audited for a FILE never written
    log = (tmp_path / "store.audit.jsonl").read_text().splitlines()
    assert sum('"operation":"inject"' in line for line in log) == 2  # the first inject's two secrets
    watcher = Watcher(tmp_path, cli.env, "--force", "--on-change", ON_CHANGE)
    try:
        watcher.wait_for(lambda: "watching for changes" in watcher.stderr(), "the first write")
        time.sleep(1)
        assert watcher.runs() == 0
        assert cli("store", "app/KEY", input=b"rotated-SEEKRIT").code == 0
        watcher.wait_for(lambda: watcher.runs() == 1, "the command after the change")
        assert "key=rotated-SEEKRIT\n" in (tmp_path / "out.conf").read_text()
    finally:
        watcher.kill()


def test_a_failed_reading_or_command_leaves_the_file_and_the_watch_goes_on(cli: Cli, tmp_path: Path) -> None:
    watcher = Watcher(tmp_path, cli.env, "--on-change", "test -e fail && exit 3; echo ok >> ran")
    try:
        watcher.wait_for(lambda: (tmp_path / "ran").exists(), "the first command")
        before = (tmp_path / "out.conf").read_text()
        assert cli("delete", "app/KEY").code == 0
        watcher.wait_for(lambda: "could not be read" in watcher.stderr(), "the warning")
        assert (tmp_path / "out.conf").read_text() == before
        assert cli("undelete", "app/KEY").code == 0
        (tmp_path / "fail").touch()
        assert cli("store", "app/KEY", input=b"back-SEEKRIT").code == 0
        watcher.wait_for(lambda: "--on-change exited 3" in watcher.stderr(), "the command's failure")
        assert "key=back-SEEKRIT\n" in (tmp_path / "out.conf").read_text()
        (tmp_path / "fail").unlink()
        assert cli("store", "app/KEY", input=b"again-SEEKRIT").code == 0
        watcher.wait_for(lambda: (tmp_path / "ran").read_text().count("ok") == 2, "the command again")
    finally:
        watcher.kill()
    said = watcher.stderr()
    assert "app/KEY changed, but could not be read (secret 'app/KEY' " in said, said
    assert "out.conf keeps what it had; read again at the next change" in said
    assert "SEEKRIT" not in said


def test_a_file_that_cannot_be_written_is_written_again_without_reading_the_secrets_again(
    cli: Cli, tmp_path: Path
) -> None:
    """A FILE that could not be written (a full disk; here a directory in its place) was retried
    every 10 s by reading every secret again: a day of full disk was thousands of reads in the
    audit log. The write alone is tried again, with what was read."""
    watcher = Watcher(tmp_path, cli.env, "--on-change", ON_CHANGE)
    log = tmp_path / "store.audit.jsonl"

    def reads() -> int:
        return sum('"operation":"inject"' in line for line in log.read_text().splitlines())

    try:
        watcher.wait_for(lambda: watcher.runs() == 1, "the first write")
        (tmp_path / "out.conf").unlink()
        (tmp_path / "out.conf").mkdir()
        assert cli("store", "app/KEY", input=b"rotated-SEEKRIT").code == 0
        watcher.wait_for(lambda: "could not be written again" in watcher.stderr(), "the warning")
        read_once = reads()
        (tmp_path / "out.conf").rmdir()
        watcher.wait_for(lambda: watcher.runs() == 2, "the write tried again", timeout=30)
        assert "key=rotated-SEEKRIT\n" in (tmp_path / "out.conf").read_text()
        assert reads() == read_once  # nothing read again for the write's retry
    finally:
        watcher.kill()
    said = watcher.stderr()
    assert "app/KEY changed, but out.conf could not be written again (" in said, said
    assert "out.conf holds no values meanwhile; trying again in 10 s" in said  # a directory there
    assert "out.conf is up to date again" in said and "SEEKRIT" not in said


def _change_app_key_where_out_conf_cannot_be_written(cli: Cli, tmp_path: Path, watcher: Watcher) -> None:
    """Once `watcher` wrote out.conf: a directory in its place, app/KEY changed, the failed write
    warned of."""
    watcher.wait_for(lambda: "watching for changes" in watcher.stderr(), "the first write")
    (tmp_path / "out.conf").unlink()
    (tmp_path / "out.conf").mkdir()
    assert cli("store", "app/KEY", input=b"rotated-SEEKRIT").code == 0
    watcher.wait_for(lambda: "could not be written again" in watcher.stderr(), "the warning")


def test_ended_while_a_change_is_not_in_the_file_yet_it_says_so(cli: Cli, tmp_path: Path) -> None:
    """SIGTERM while the write after a change was still owed (FILE could not be written) ended
    inject with exit 0 and nothing said: FILE left behind the store without a word."""
    watcher = Watcher(tmp_path, cli.env)
    try:
        _change_app_key_where_out_conf_cannot_be_written(cli, tmp_path, watcher)
        assert watcher.end() == 0
    finally:
        watcher.kill()
    said = watcher.stderr()
    assert said.rstrip("\n").endswith("ended before out.conf was written again after app/KEY changed"), said
    assert "SEEKRIT" not in said


def test_a_write_that_fails_again_after_another_change_names_the_secret_that_changed(
    cli: Cli, tmp_path: Path
) -> None:
    """A failure was said once per error text, so the same failed write after a change to another
    secret said nothing: the warning on stderr still named only the first secret."""
    watcher = Watcher(tmp_path, cli.env)
    try:
        _change_app_key_where_out_conf_cannot_be_written(cli, tmp_path, watcher)
        assert cli("store", "db/main", input=database("second-SEEKRIT")).code == 0
        watcher.wait_for(
            lambda: "app/KEY, db/main changed, but out.conf could not be written again" in watcher.stderr(),
            "the warning naming both",
        )
        time.sleep(11)  # a retry of the same write, for the same changes: not said again
        assert watcher.end() == 0
    finally:
        watcher.kill()
    said = watcher.stderr()
    assert said.count("could not be written again") == 2, said
    assert "SEEKRIT" not in said


def test_a_file_written_again_keeps_its_file_mode_and_group(cli: Cli, tmp_path: Path) -> None:
    daemon = grp.getgrnam("daemon").gr_gid
    watcher = Watcher(tmp_path, cli.env, "--file-mode", "0640", "--file-group", "daemon")
    target = tmp_path / "out.conf"
    try:
        watcher.wait_for(lambda: "watching for changes" in watcher.stderr(), "the first write")
        assert (stat.S_IMODE(target.stat().st_mode), target.stat().st_gid) == (0o640, daemon)
        assert cli("store", "app/KEY", input=b"rotated-SEEKRIT").code == 0
        watcher.wait_for(lambda: "key=rotated-SEEKRIT\n" in target.read_text(), "the new value")
        assert (stat.S_IMODE(target.stat().st_mode), target.stat().st_gid) == (0o640, daemon)
    finally:
        watcher.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--watch",), "--watch writes FILE again on a change: give -o FILE"),
        (("-o", "x.conf", "--on-change", "true"), "--on-change runs after a change: give --watch too"),
    ],
)
def test_watch_options_that_do_not_go_together(
    cli: Cli, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = cli("inject", "-i", str(tmp_path / "out.tpl"), *args)
    assert result.code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_through_a_service_a_change_reaches_the_file_by_its_watch_stream(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    (tmp_path / "out.tpl").write_text("DB_PASSWORD={{ sm://auth/DB_PASSWORD }}\n")
    env = through_service(tmp_path, server.address)
    watcher = Watcher(tmp_path, env, "--on-change", "echo x >> ran")
    out = tmp_path / "out.conf"
    try:
        watcher.wait_for(lambda: (tmp_path / "ran").exists(), "the first write")
        assert out.read_text() == f"DB_PASSWORD={SEED['auth/DB_PASSWORD'].decode()}\n"
        store_in_served_store(tmp_path, "auth/DB_PASSWORD", "rotated-SEEKRIT")
        watcher.wait_for(lambda: out.read_text() == "DB_PASSWORD=rotated-SEEKRIT\n", "the rewrite")
        watcher.wait_for(lambda: (tmp_path / "ran").read_text() == "x\nx\n", "the command")
        assert watcher.end() == 0
    finally:
        watcher.kill()
        server.stop()
    gets = [r["name"] for r in server.audit_records() if r["operation"] == "get" and r["outcome"] == "ok"]
    assert gets.count("auth/DB_PASSWORD") == 2  # the service audited both readings


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_the_command_runs_ends_the_watch_and_the_commands_group(
    cli: Cli, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGHUP (a closed terminal, a session ending) as SIGTERM and Ctrl-C: exit 0, COMMAND's
    process group ended with it (left to its default action, inject died alone and COMMAND ran
    on), no file beside FILE."""
    watcher = Watcher(tmp_path, cli.env, "--on-change", "echo $$ > group; sleep 300 & wait")
    group = 0
    try:
        watcher.wait_for(
            lambda: (
                (tmp_path / "group").read_text().strip() != "" if (tmp_path / "group").exists() else False
            ),
            "COMMAND",
        )
        group = int((tmp_path / "group").read_text())
        watcher.proc.send_signal(signum)
        assert watcher.proc.wait(timeout=20) == 0, watcher.stderr()
        deadline = time.monotonic() + 5
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(group), "COMMAND's process group outlived inject"
    finally:
        watcher.kill()
        if group and _group_alive(group):
            os.killpg(group, signal.SIGKILL)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out.conf", ".out.conf"))) == [
        "out.conf"
    ]
    assert "Traceback" not in watcher.stderr()


def test_a_file_removed_or_replaced_meanwhile_is_written_again_at_the_next_change(
    cli: Cli, tmp_path: Path
) -> None:
    """As consul-template compares with the file on disk: after FILE was removed (or overwritten)
    by someone else, a change that leaves the secrets' values as they were still writes it again,
    and COMMAND runs, rather than leave the program without its file."""
    out = tmp_path / "out.conf"
    watcher = Watcher(tmp_path, cli.env, "--on-change", ON_CHANGE)
    try:
        watcher.wait_for(lambda: watcher.runs() == 1, "first write and command")
        expected = out.read_text()
        out.unlink()
        assert cli("store", "app/KEY", input=b"key-SEEKRIT").code == 0  # the same value again
        watcher.wait_for(lambda: watcher.runs() == 2, "the file written again")
        assert out.read_text() == expected
        out.write_text("stale\n")
        assert cli("store", "db/main", input=database("first-SEEKRIT")).code == 0
        watcher.wait_for(lambda: watcher.runs() == 3, "the file written again")
        assert out.read_text() == expected
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    finally:
        watcher.kill()
    said = watcher.stderr()
    assert "out.conf no longer held what was written (removed or changed meanwhile): wrote" in said, said
    assert "SEEKRIT" not in said
