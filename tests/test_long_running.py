"""What a `serve` and an SDK client that run for weeks must give back: each test repeats an action
that happens many times over weeks (a client connecting and leaving, a watch stream dropped, a
reload, a renewal) against a real process, then counts what the process holds in /proc (file
descriptors, threads, sockets) or what PostgreSQL says it holds: back to the level it had, not one
more per cycle. Counts, not memory: they are exact where RSS is noise. bench/soak.py is the long
run that found what these pin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from secrets_manager.client import Client
from service_fixtures import SCRIPT, client_environ, eventually, make_pki, make_store, start_server


def _descriptors_to(target: str) -> list[int]:
    """This process's descriptors that point at `target` (a /proc/self/fd link such as pipe:[N])."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.append(int(name))
        except OSError:  # the listing's own descriptor, gone by now
            continue
    return found


def test_a_stopped_server_leaves_no_pipe_open_in_the_process_that_started_it(tmp_path: Path) -> None:
    """start_server's pipe from the server's stderr stayed open after stop(), until the garbage
    collector closed it with a ResourceWarning in some later test (test_sdk's
    test_async_callbacks_of_a_closed_loop_are_dropped…, which calls gc.collect())."""
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    assert server.process.stderr is not None
    pipe = os.readlink(f"/proc/self/fd/{server.process.stderr.fileno()}")
    assert pipe.startswith("pipe:")
    server.stop()
    assert _descriptors_to(pipe) == []
    assert server.process.stderr.closed


# A channel whose close never returns, as one left by an interrupt inside gRPC's own code waits:
# the soak's stuck `watch` was in grpc/_channel.py's _close, waiting on a condition for good.
_CLOSE_NEVER_RETURNS = """
import threading
import grpc._channel

def _close_waits_for_good(self):
    threading.Event().wait()

grpc._channel.Channel.close = _close_waits_for_good
"""


def test_watch_stopped_by_sigterm_ends_even_when_its_channel_never_finishes_closing(tmp_path: Path) -> None:
    """SIGTERM ends `watch --server` (exit 0), though the channel's close hangs: the signal's
    exception can land inside gRPC's own code and leave its lock held, and then the close waited
    for good; the handler had already set SIGTERM to be ignored, so only SIGKILL ended the process,
    and the service held its Watch stream (a worker thread, a socket) until then. bench/soak.py
    met it twice in about 280 watches stopped so. On the old code the process is still there 20 s
    after the SIGTERM."""
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CLOSE_NEVER_RETURNS)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(hooks),
        **client_environ(tmp_path, "auth", [server.address]),
    }
    watcher = subprocess.Popen(
        [str(SCRIPT), "--server", server.address, "watch", "auth/"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert watcher.stderr is not None
        assert b"watching auth/" in watcher.stderr.readline()
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=20) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=10)
        assert watcher.stderr is not None
        watcher.stderr.close()
        server.stop()


def _held_by(pid: int) -> tuple[int, int]:
    """`pid`'s open descriptors and, of them, sockets (/proc/PID/fd)."""
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return len(links), sum(link.startswith("socket:") for link in links)


def test_clients_that_come_and_go_leave_serve_holding_what_it_held(tmp_path: Path) -> None:
    """Test only (bench/soak.py's churn, counted): 40 SDK clients that connect, read (each opens
    its Watch stream) and close, and 10 SDK processes killed with SIGKILL while their stream is
    open (no goodbye), leave serve with the descriptors and sockets it had after the first client:
    each connection's socket, and its stream's, is given back."""
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    environ = client_environ(tmp_path, "auth", [server.address])
    pid = server.process.pid
    try:
        with Client(environ=environ) as first:  # gRPC's and the service's lasting set-up, done once
            first.credentials("auth")
        assert eventually(lambda: _held_by(pid)[1] <= 1)  # the listener alone
        level = _held_by(pid)
        for _ in range(40):
            with Client(environ=environ) as client:
                client.credentials("auth")
        child = (
            "import sys, time\nfrom secrets_manager.client import Client\n"
            "Client().credentials('auth'); print('read', flush=True); time.sleep(600)\n"
        )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **environ}
        for _ in range(10):
            killed = subprocess.Popen(
                [sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, start_new_session=True
            )
            assert killed.stdout is not None
            assert killed.stdout.readline() == b"read\n"
            killed.kill()
            killed.wait(timeout=10)
            killed.stdout.close()
        assert eventually(lambda: _held_by(pid) == level, timeout=30), (_held_by(pid), level)
    finally:
        server.stop()
