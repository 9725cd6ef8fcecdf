"""How long one `secrets-manager` command takes, start to exit, beside the Python interpreter's own
start (the floor for any command written in Python), measured in the same run.

What it runs (the installed console script, a fresh process each time, on an embedded store made
with the cheap `test` KDF profile in a temporary directory, so unlocking is not what is measured):

* get: `secrets-manager get NAME` of a stored secret (unlock, read, audit record, print)
* list: `secrets-manager list`
* help: `secrets-manager --help` (no store opened: import and click alone)
* otp: `secrets-manager otp NAME` of a stored TOTP setup key (a read, pyotp's code)
* inject: `secrets-manager inject -i TEMPLATE` of a template with three references (two secrets)
* get, default KDF: `get` on a second store made with the default profile (Argon2id t=3, 64 MiB,
  p=4), the master password from MASTER_PASSWORD: what every command costs a user at a terminal
  without the agent (each one derives the unlock key again)
* get, default KDF, agent: the same `get` with no password source, the unlock key given by a
  running `secrets-manager agent` (primed once before the rounds): no Argon2id

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
from secrets_manager.agent import AgentClient
from secrets_manager.environment import Environment
from secrets_manager.store.url import open_store, store_identity

SCRIPT = Path(sys.executable).with_name("secrets-manager")
COMMANDS = {"get": ["get", "bench/SECRET"], "list": ["list"], "help": ["--help"]}
DEFAULT_KDF = ("get, default KDF", "get, default KDF, agent")


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
        for name, value in (("bench/SECRET", b"value"), ("bench/TOTP", b"JBSWY3DPEHPK3PXP")):
            subprocess.run(
                [str(SCRIPT), "store", name], env=env, input=value, check=True, capture_output=True
            )
        template = Path(directory) / "config.tpl"
        template.write_text(
            "a: {{ sm://bench/SECRET }}\nb: {{ sm://bench/TOTP }}\nc: {{ sm://bench/SECRET }}\n"
        )
        runs = {op: (words, env) for op, words in COMMANDS.items()}
        runs["otp"] = (["otp", "bench/TOTP"], env)
        runs["inject"] = (["inject", "-i", str(template)], env)
        runs.update(_default_kdf_runs(Path(directory), env))
        baseline: list[float] = []
        ours: dict[str, list[float]] = {op: [] for op in runs}
        try:
            for number in range(rounds):
                print(f"round {number + 1} of {rounds}", file=sys.stderr)
                for op, (words, run_env) in runs.items():
                    baseline.append(_wall([sys.executable, "-c", "pass"], env))
                    ours[op].append(_wall([str(SCRIPT), *words], run_env))
        finally:
            subprocess.run([str(SCRIPT), "agent", "stop"], env=runs[DEFAULT_KDF[1]][1], capture_output=True)
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
            f"{rounds} alternating rounds; fresh process each; embedded store with the test KDF profile "
            "(the last two rows: the default profile, without and with the agent); "
            "ratio = ours / interpreter start (lower is better)."
        ],
    )


def _default_kdf_runs(directory: Path, env: dict[str, str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """A store with the default KDF profile, and an agent (in a runtime directory of the run's)
    that holds its unlock key: `get` with the password, and with the agent (no password source)."""
    store = directory / "default.db"
    with_password = {**env, "SECRETS_MANAGER_STORE": str(store)}
    runtime = directory / "run"
    runtime.mkdir(mode=0o700)
    with_agent = {k: v for k, v in with_password.items() if k != "MASTER_PASSWORD"}
    with_agent["XDG_RUNTIME_DIR"] = str(runtime)
    subprocess.run([str(SCRIPT), "init"], env=with_password, check=True, capture_output=True)
    subprocess.run(
        [str(SCRIPT), "store", "bench/SECRET"],
        env=with_password,
        input=b"value",
        check=True,
        capture_output=True,
    )
    subprocess.run([str(SCRIPT), "agent", "start"], env=with_agent, check=True, capture_output=True)
    opened = open_store(
        str(store), env["MASTER_PASSWORD"].encode(), environment=Environment.DEVELOPMENT, actor="bench"
    )
    key = opened.unlock_key
    opened.close()
    assert key is not None
    if not AgentClient.for_user(with_agent).give(store_identity(str(store)), key.header, key.material):
        raise SystemExit("the agent did not take the unlock key")
    words = COMMANDS["get"]
    subprocess.run([str(SCRIPT), *words], env=with_agent, check=True, capture_output=True)  # it opens
    return {DEFAULT_KDF[0]: (words, with_password), DEFAULT_KDF[1]: (words, with_agent)}


if __name__ == "__main__":
    main()
