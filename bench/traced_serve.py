"""`secrets-manager` under tracemalloc, for the soak (bench/soak.py --trace DIR): where serve's
Python memory goes, a snapshot every SOAK_TRACE_EVERY seconds (default 60) written to
SOAK_TRACE_DIR/snapshot-NNN.pickle by a daemon thread; and a comparison of two of them.

    python -X tracemalloc=25 bench/traced_serve.py SCRIPT serve --config server.toml   # as soak runs it
    python bench/traced_serve.py --compare DIR/snapshot-002.pickle DIR/snapshot-030.pickle

A debugging aid of the bench only: serve itself has no such hook.
"""

from __future__ import annotations

import os
import sys
import threading
import tracemalloc
from pathlib import Path

IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
)


def snapshots(directory: Path, every: float) -> None:
    for number in range(1_000_000):
        threading.Event().wait(every)
        snapshot = tracemalloc.take_snapshot().filter_traces(IGNORED)
        path = directory / f"snapshot-{number:03d}.pickle"
        snapshot.dump(str(path) + ".part")
        os.replace(str(path) + ".part", path)


def compare(old: str, new: str, top: int = 15) -> None:
    before = tracemalloc.Snapshot.load(old)
    after = tracemalloc.Snapshot.load(new)
    total = sum(s.size for s in after.statistics("filename")) - sum(
        s.size for s in before.statistics("filename")
    )
    print(f"traced Python memory: {total / 1024:+,.0f} KiB from {old} to {new}")
    for group in ("lineno", "traceback"):
        print(f"\ntop {top} by {group}:")
        for stat in after.compare_to(before, group)[:top]:
            print(f"{stat.size_diff / 1024:+10,.1f} KiB {stat.count_diff:+7,d} blocks")
            frames = stat.traceback.format(limit=25 if group == "traceback" else 1, most_recent_first=True)
            for line in frames[: 12 if group == "traceback" else 2]:
                print("    " + line.strip())


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:
        compare(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 15)
        return
    if not tracemalloc.is_tracing():
        tracemalloc.start(25)
    directory = Path(os.environ["SOAK_TRACE_DIR"])
    every = float(os.environ.get("SOAK_TRACE_EVERY", "60"))
    threading.Thread(target=snapshots, args=(directory, every), daemon=True, name="soak-trace").start()
    sys.argv = ["secrets-manager", *sys.argv[2:]]  # argv[1]: the console script, replaced by its main
    from secrets_manager_entry import main as entry

    entry()


if __name__ == "__main__":
    main()
