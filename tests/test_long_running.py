"""What a `serve` and an SDK client that run for weeks must give back: each test repeats an action
that happens many times over weeks (a client connecting and leaving, a watch stream dropped, a
reload, a renewal) against a real process, then counts what the process holds in /proc (file
descriptors, threads, sockets) or what PostgreSQL says it holds: back to the level it had, not one
more per cycle. Counts, not memory: they are exact where RSS is noise. bench/soak.py is the long
run that found what these pin."""

from __future__ import annotations

import os
from pathlib import Path

from service_fixtures import make_pki, make_store, start_server


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
