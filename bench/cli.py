"""How long one `secrets-manager` command takes, start to exit, beside the Python interpreter's own
start (the floor for any command written in Python), measured in the same run.

What it runs (the installed console script, a fresh process each time, on an embedded store made
with the cheap `test` KDF profile in a temporary directory, so unlocking is not what is measured):

* get: `secrets-manager get NAME` of a stored secret (unlock, read, audit record, print)
* list: `secrets-manager list`
* help: `secrets-manager --help` (no store opened: import and click alone)

Baseline: `python -c pass` with the same interpreter. Ours and the baseline alternate, and the table
shows the median wall time of each and ratio = ours / baseline (how many interpreter starts one
command costs; lower is better). The machines are noisy: compare ratios, not milliseconds.

    python bench/cli.py              # 15 rounds (about 20 s)
    python bench/cli.py --quick      # 5 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

SCRIPT = Path(sys.executable).with_name("secrets-manager")
COMMANDS = {"get": ["get", "bench/SECRET"], "list": ["list"], "help": ["--help"]}


def _wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds of each command")
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as directory:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": directory,
            "SECRETS_MANAGER_STORE": str(Path(directory) / "bench.db"),
            "MASTER_PASSWORD": "benchmark only",
            # PYTHONPATH=<another checkout>/src measures that code with this environment's packages
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
        }
        subprocess.run(
            [str(SCRIPT), "init", "--kdf-profile", "test"], env=env, check=True, capture_output=True
        )
        subprocess.run(
            [str(SCRIPT), "store", "bench/SECRET"], env=env, input=b"value", check=True, capture_output=True
        )
        baseline: list[float] = []
        ours: dict[str, list[float]] = {op: [] for op in COMMANDS}
        for number in range(rounds):
            print(f"round {number + 1} of {rounds}", file=sys.stderr)
            for op, words in COMMANDS.items():
                baseline.append(_wall([sys.executable, "-c", "pass"], env))
                ours[op].append(_wall([str(SCRIPT), *words], env))
    floor = statistics.median(baseline)
    rows = [
        [
            op,
            f"{statistics.median(times) * 1000:.0f} ms",
            f"{floor * 1000:.0f} ms",
            f"{statistics.median(times) / floor:.1f}",
        ]
        for op, times in ours.items()
    ]
    report.render(
        ["command", "ours (median)", "python -c pass", "ratio"],
        rows,
        f"secrets-manager command wall time, {os.cpu_count()} CPUs",
        [
            f"{rounds} alternating rounds; fresh process each; embedded store with the test KDF profile; "
            "ratio = ours / interpreter start (lower is better)."
        ],
    )


if __name__ == "__main__":
    main()
