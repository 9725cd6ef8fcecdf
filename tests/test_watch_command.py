"""`watch [PREFIX] [--json]`: each change printed as it happens (never a value), locally from the
store's change feed and through `serve` from its Watch stream (only what the caller may read);
SIGTERM and Ctrl-C end it with exit 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from secrets_manager.client import RemoteStore
from service_fixtures import SCRIPT, SEED, make_pki, make_store, start_server, tls_files
from test_cli import KNOWN_VALUE, Cli, assert_one_line_error
from test_run_restart import _dispositions, store_in_served_store, through_service
from test_serve_external_stores import (  # noqa: F401 (fixtures)
    Backend,
    make_backend,
    serve,
    service_dir,
)


def signals_at_their_defaults() -> None:
    """In the new watch process: SIGINT and SIGTERM at their defaults, as a shell at a terminal
    starts a command. A suite started in the background (`cmd &`, as CI may be) inherits SIGINT
    ignored, and watch keeps a signal ignored at its start ignored (as nohup means it)."""
    _dispositions(())


class Watching:
    """A `watch` process: its stdout lines as they come."""

    def __init__(
        self, args: list[str], env: dict[str, str], said: tuple[str, ...] = ("secrets-manager: watching ",)
    ) -> None:
        """`said`: how the lines it says on stderr before it is live begin."""
        self.process = subprocess.Popen(
            [str(SCRIPT), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=signals_at_their_defaults,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None and self.process.stderr is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        for begins in said:  # "watching …" once the feed or stream is live
            line = self.process.stderr.readline()
            assert line.startswith(begins), line
            self.said = line

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def next(self, timeout: float = 15.0) -> dict[str, object]:
        return dict(json.loads(self.lines.get(timeout=timeout)))

    def end(self, signum: int) -> tuple[int, str]:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=15)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()


@pytest.fixture
def ready(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    assert cli("init", "--kdf-profile", "test").code == 0
    assert cli("store", "app/KEY", input=b"first").code == 0
    return cli


def test_local_changes_under_the_prefix_are_printed_as_they_happen(ready: Cli) -> None:
    watching = Watching(["watch", "app/", "--json"], {**os.environ, **ready.env})
    try:
        ready("store", "other/SECRET", input=b"not under the prefix")
        ready("store", "app/KEY", input=KNOWN_VALUE.encode())
        ready("metadata", "app/KEY", "--description", "rotated today")
        ready("delete", "app/KEY")
        seen = [watching.next() for _ in range(3)]
    finally:
        code, stderr = watching.end(signal.SIGTERM)
    assert [(event["kind"], event["name"], event["version"]) for event in seen] == [
        ("version_added", "app/KEY", 2),
        ("metadata_changed", "app/KEY", None),
        ("metadata_changed", "app/KEY", None),
    ]
    assert all(str(event["time"]).endswith("Z") for event in seen)
    assert code == 0 and "Traceback" not in stderr and KNOWN_VALUE not in stderr
    log = (ready.store.parent / "store.audit.jsonl").read_text()
    watches = [json.loads(line) for line in log.splitlines() if '"operation":"watch"' in line]
    assert len(watches) == 1 and (watches[0]["outcome"], watches[0]["name"]) == ("ok", "app/")


def test_plain_lines_and_ctrl_c_ends_it_with_exit_0(ready: Cli) -> None:
    watching = Watching(["watch"], {**os.environ, **ready.env})
    try:
        ready("store", "app/KEY", input=KNOWN_VALUE.encode())
        line = watching.lines.get(timeout=15)
    finally:
        code, stderr = watching.end(signal.SIGINT)
    assert line.split("  ")[1:] == ["new version", "app/KEY version 2\n"]
    assert KNOWN_VALUE not in line
    assert code == 0 and stderr == "", stderr


def test_through_the_service_only_what_the_caller_may_read_is_shown(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth", "ops"))
    make_store(tmp_path)
    server = start_server(tmp_path)
    ops = RemoteStore(server.address, tls_files(tmp_path, "ops"))
    try:
        watching = Watching(["watch", "--json"], through_service(tmp_path, server.address))
        try:
            ops.put("market-connector/BINANCE_API_KEY", b"not for auth")
            store_in_served_store(tmp_path, "auth/DB_PASSWORD", "rotated-SEEKRIT")
            event = watching.next()
        finally:
            code, _ = watching.end(signal.SIGTERM)
    finally:
        ops.close()
        server.stop()
    assert (event["kind"], event["name"], event["version"]) == ("version_added", "auth/DB_PASSWORD", 2)
    assert watching.lines.empty()
    assert code == 0


def test_a_bad_prefix_is_exit_2(ready: Cli) -> None:
    assert_one_line_error(ready("watch", "../etc"), 2)


def test_a_reader_that_goes_away_ends_it_quietly(ready: Cli) -> None:
    """`watch | head -1`: the line after head has gone finds the pipe closed, and the watch ends
    there, exit 0, with nothing more said (it was a traceback from the printing thread)."""
    process = subprocess.Popen(
        [str(SCRIPT), "watch"],
        env={**os.environ, **ready.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        assert process.stderr.readline().startswith(b"secrets-manager: watching ")
        ready("store", "app/KEY", input=b"second")
        assert b"new version  app/KEY version 2" in process.stdout.readline()
        process.stdout.close()  # head -1 exits
        ready("store", "app/KEY", input=b"third")
        code = process.wait(timeout=30)
    finally:
        process.kill()
    assert (code, process.stderr.read()) == (0, b"")


def test_sigterm_before_the_watch_is_live_ends_it_with_exit_0(ready: Cli, tmp_path: Path) -> None:
    """A signal while the store is still being opened (here: its password file a FIFO nobody
    writes, as a slow unlock or a store that does not answer) ends it as one after: exit 0,
    nothing said. It was the signal's default action (exit 143), or Ctrl-C's 'interrupted' (130)."""
    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    env = {**os.environ, **ready.env, "MASTER_PASSWORD_FILE": str(fifo)}
    env.pop("MASTER_PASSWORD")
    for signum in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen(
            [str(SCRIPT), "watch"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=signals_at_their_defaults,
        )
        try:
            time.sleep(3)  # started, and waiting on the FIFO
            assert process.poll() is None
            process.send_signal(signum)
            code = process.wait(timeout=15)
        finally:
            process.kill()
        assert process.stderr is not None and process.stdout is not None
        assert (signum, code, process.stderr.read(), process.stdout.read()) == (signum, 0, b"", b"")


def test_a_service_that_refuses_watch_is_said_in_watchs_own_words(
    make_backend: Callable[[str], Backend],  # noqa: F811
    service_dir: Path,  # noqa: F811
) -> None:
    """Watch turned off on the service (watch_poll_seconds = 0): one line, exit 2, about `watch`;
    it was run's message ('--restart-on-change needs …; nothing was run. Run the program
    without --restart-on-change')."""
    backend = make_backend("aws")
    backend.seed(SEED)
    server = serve(service_dir, backend, "watch_poll_seconds = 0\n")
    try:
        refused = server.cli("auth", "watch", "auth/")
    finally:
        server.stop()
    said = refused.stderr.decode()
    assert refused.returncode == 2 and len(said.strip().splitlines()) == 1, said
    assert "watch needs the service's Watch stream" in said and "restart-on-change" not in said, said


def test_with_several_addresses_a_replica_at_its_watch_stream_limit_passes_the_stream_to_another(
    tmp_path: Path,
) -> None:
    """`watch --server A,B` (and `run --restart-on-change`, which follows the same source) when A
    serves but refuses one more stream (RESOURCE_EXHAUSTED, at its max_watch_streams): A says
    SERVING, so the stream was not moved and the command failed (exit 1) with B beside it, which
    has room. Now it watches through B, and a change is printed."""
    make_pki(tmp_path, ("auth", "ops"))
    make_store(tmp_path)
    full = start_server(tmp_path, "full", settings="max_watch_streams = 1\n")
    roomy = start_server(tmp_path, "roomy")
    ops = RemoteStore(full.address, tls_files(tmp_path, "ops"))
    held = ops.watch("auth/")
    try:
        held.start()  # A's one stream
        env = through_service(tmp_path, f"{full.address},{roomy.address}")
        moved = (
            f"secrets-manager: {full.address} has no room for another watch stream: watching {roomy.address}"
        )
        watching = Watching(["watch", "--json", "auth/"], env, said=(moved, "secrets-manager: watching "))
        try:
            store_in_served_store(tmp_path, "auth/DB_PASSWORD", "rotated-SEEKRIT")
            event = watching.next()
        finally:
            code, stderr = watching.end(signal.SIGTERM)
    finally:
        held.cancel()
        ops.close()
        full.stop()
        roomy.stop()
    assert (event["kind"], event["name"], event["version"]) == ("version_added", "auth/DB_PASSWORD", 2)
    assert code == 0 and "SEEKRIT" not in stderr
