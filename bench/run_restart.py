"""How soon `run --restart-on-change` has the program running on a changed value, beside starting
the program by hand with plain `run` (what a restart costs anyway), measured in the same run.

* ours, local: `secrets-manager run --restart-on-change --secret bench/KEY -- python CHILD` on an
  embedded store (cheap `test` KDF); each round `secrets-manager store bench/KEY` a new value, and
  the time from that command's exit to the moment the new program has started with the new value
  (it writes a line with the time and its value; the old one was stopped with SIGTERM first).
* ours, service: the same through `secrets-manager serve` (mutual TLS) on the same kind of store, the
  change made by the CLI on the store directly (it reaches `serve` by its change feed, then `run` by
  its Watch stream).
* baseline: `secrets-manager run --secret bench/KEY -- python CHILD` started afresh, from its start to
  the program's line: unlock, read, audit, exec, interpreter start. What a restart by hand (or by a
  deploy) costs before the program runs, without noticing the change at all.

The table shows the median of each and ratio = ours / baseline. Rounds alternate ours and the
baseline. Also: the CPU time the supervising `run` used while idle (no change) for 10 s: the cost of
following the changes (our store's feed is read every 0.2 s).

    python bench/run_restart.py            # 10 rounds
    python bench/run_restart.py --quick    # 4 rounds
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_fixtures import PASSWORD, make_pki, make_store, start_server

SCRIPT = Path(sys.executable).with_name("secrets-manager")
CHILD = """
import os, sys, time
with open(os.environ["CHILD_LOG"], "a") as f:
    f.write(f"{time.time()} {os.environ['DB_PASSWORD']}\\n")
time.sleep(3600)
"""


def _lines(log: Path) -> list[tuple[float, str]]:
    if not log.exists():
        return []
    return [(float(t), v) for t, v in (line.split(" ", 1) for line in log.read_text().splitlines())]


def _wait_for(log: Path, value: str, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for when, seen in _lines(log):
            if seen == value:
                return when
        time.sleep(0.005)
    raise SystemExit(f"the program never started with {value!r}")


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` (schedstat: nanoseconds, finer than stat's ticks)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9


class Supervised:
    def __init__(self, env: dict[str, str], child: Path, log: Path, *selection: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [str(SCRIPT), "run", "--restart-on-change", *selection, "--", sys.executable, str(child)],
            env={**env, "CHILD_LOG": str(log)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="4 rounds")
    args = parser.parse_args()
    rounds = 4 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as directory:
        home = Path(directory)
        child = home / "child.py"
        child.write_text(CHILD)
        make_pki(home, ("auth",))
        store_path = make_store(home)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": directory,
            "SECRETS_MANAGER_STORE": str(store_path),
            "MASTER_PASSWORD": PASSWORD,
        }
        server = start_server(home)
        remote = {
            "PATH": env["PATH"],
            "HOME": directory,
            "SECRETS_MANAGER_ADDR": server.address,
            "SECRETS_MANAGER_CERT": str(home / "auth.pem"),
            "SECRETS_MANAGER_KEY": str(home / "auth-key.pem"),
            "SECRETS_MANAGER_CA": str(home / "ca.pem"),
        }
        local = Supervised(env, child, home / "local.log", "--secret", "auth/DB_PASSWORD=DB_PASSWORD")
        served = Supervised(remote, child, home / "served.log", "--secret", "auth/DB_PASSWORD=DB_PASSWORD")
        times: dict[str, list[float]] = {"ours, local": [], "ours, service": [], "baseline": []}
        try:
            initial = "auth-db-pass-SEEKRIT-1"
            _wait_for(local.log, initial)
            _wait_for(served.log, initial)
            time.sleep(1)
            before = _cpu_seconds(local.proc.pid)
            time.sleep(10)
            idle_cpu = _cpu_seconds(local.proc.pid) - before
            for number in range(rounds):
                print(f"round {number + 1} of {rounds}", file=sys.stderr)
                value = f"rotated-{number}"
                subprocess.run(
                    [str(SCRIPT), "store", "auth/DB_PASSWORD"], env=env, input=value.encode(), check=True,
                    capture_output=True,
                )  # fmt: skip
                written = time.time()
                times["ours, local"].append(_wait_for(local.log, value) - written)
                times["ours, service"].append(_wait_for(served.log, value) - written)
                log = home / f"plain-{number}.log"
                started = time.time()
                plain = subprocess.Popen(
                    [str(SCRIPT), "run", "--secret", "auth/DB_PASSWORD", "--", sys.executable, str(child)],
                    env={**env, "CHILD_LOG": str(log)},
                    stdout=subprocess.DEVNULL,
                )
                times["baseline"].append(_wait_for(log, value) - started)
                plain.kill()
                plain.wait()
                time.sleep(0.5)
        finally:
            local.stop()
            served.stop()
            server.stop()
    floor = statistics.median(times["baseline"])
    rows = [
        [
            label,
            f"{statistics.median(t) * 1000:.0f} ms",
            f"{max(t) * 1000:.0f} ms",
            f"{statistics.median(t) / floor:.2f}",
        ]
        for label, t in times.items()
    ]
    report.render(
        ["from a store to the program on the new value", "median", "max", "ratio"],
        rows,
        f"run --restart-on-change, {os.cpu_count()} CPUs",
        [
            f"{rounds} rounds; ratio = ours / baseline (a fresh `run` of the program, start to its "
            "first line).",
            f"idle supervising run (local store): {idle_cpu * 1000:.1f} ms CPU in 10 s "
            f"({idle_cpu / 10 * 100:.2f} % of one core).",
        ],
    )


if __name__ == "__main__":
    main()
