"""How long `secrets-manager policy explain POLICY IDENTITY` (no NAME: every secret of the store the
identity may reach, each decided by the policy) takes beside `secrets-manager list` of the same
store, measured in the same run: the incident runbook's "what could this identity read?".

What it runs (the installed console script, a fresh process each time, on an embedded store made
with the cheap `test` KDF profile in a temporary directory, holding N secrets over four
namespaces; the README's policy for the seed's services plus a role of two rules, one a deny):

* explain: `policy explain POLICY IDENTITY` (every capability of every name)
* explain --capability read: the same, only `read`
* explain --json: the same as JSON
* per name, before: one `policy explain POLICY IDENTITY NAME --capability read`, the way the
  runbook had it done for each name; the table also gives that times N

And in this process, on the same store: the policy's decisions for every name
(`Policy.granted`, six capabilities each) beside the store's `list(include_deleted=True)`, which
is what the command adds to `list` and what it shares with it (the rest is start-up: the
command's module imports the certificate parser, about 0.2 s).

Baseline: `secrets-manager list` of the same store. Ours and the baseline alternate, and the
table shows the median wall time of each and ratio = ours / baseline (lower is better; 1.0 = as
long as `list`). The machines are noisy: compare ratios, not seconds.

    python bench/access.py              # 2,000 secrets, 7 rounds (about a minute on 2 cores)
    python bench/access.py --quick      # 2,000 secrets, 3 rounds
    python bench/access.py --secrets 10000
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
from secrets_manager.access import load_policy
from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "benchmark only"  # noqa: S105 - throwaway store
IDENTITY = "spiffe://shrivenquant.local/market-connector"
NAMESPACES = ("auth", "market-connector", "shared", "ops")
POLICY = f"""
[identities]
"spiffe://shrivenquant.local/auth" = ["auth"]
"{IDENTITY}" = ["market-connector", "shared-reader"]
"spiffe://shrivenquant.local/ops" = ["ops"]

[roles.auth]
rules = [{{ path = "auth/*", capabilities = ["read", "list"] }}]

[roles.market-connector]
rules = [{{ path = "market-connector/*", capabilities = ["read", "list"] }}]

[roles.shared-reader]
rules = [
  {{ path = "shared/**", capabilities = ["read", "list"] }},
  {{ path = "shared/admin-*", deny = ["read"] }},
]

[roles.ops]
rules = [{{ path = "**", capabilities = ["admin"] }}]
"""


def _wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of each command")
    parser.add_argument("--secrets", type=int, default=2000, help="secrets in the store")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as directory:
        store_path = Path(directory) / "bench.db"
        policy = Path(directory) / "policy.toml"
        policy.write_text(POLICY)
        print(f"storing {args.secrets:,} secrets", file=sys.stderr)
        store = EncryptedStore.create(
            SqliteStorage(store_path, create=True), PasswordUnlock(PASSWORD, kdf.TEST)
        )
        try:
            for number in range(args.secrets):
                store.put(f"{NAMESPACES[number % len(NAMESPACES)]}/KEY_{number:06d}", b"value")
        finally:
            store.close()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": directory,
            "SECRETS_MANAGER_STORE": str(store_path),
            "MASTER_PASSWORD": PASSWORD,
            # PYTHONPATH=<another checkout>/src measures that code with this environment's packages
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
        }
        explain = [str(SCRIPT), "policy", "explain", str(policy), IDENTITY]
        runs = {
            "explain": explain,
            "explain --capability read": [*explain, "--capability", "read"],
            "explain --json": [*explain, "--json"],
            "per name, before": [*explain, "market-connector/KEY_000001", "--capability", "read"],
        }
        in_process = _in_process(store_path, policy, rounds)
        baseline: list[float] = []
        ours: dict[str, list[float]] = {op: [] for op in runs}
        for number in range(rounds):
            print(f"round {number + 1} of {rounds}", file=sys.stderr)
            for op, argv in runs.items():
                baseline.append(_wall([str(SCRIPT), "list"], env))
                ours[op].append(_wall(argv, env))
    floor = statistics.median(baseline)
    rows = [
        [op, f"{statistics.median(times):.2f} s", f"{floor:.2f} s", f"{statistics.median(times) / floor:.2f}"]
        for op, times in ours.items()
    ]
    one = statistics.median(ours["per name, before"])
    rows.append(
        [
            f"per name, before, x {args.secrets:,}",
            f"{one * args.secrets:.0f} s",
            f"{floor:.2f} s",
            f"{one * args.secrets / floor:.0f}",
        ]
    )
    decisions, listing = (statistics.median(times) for times in in_process)
    rows.append(
        ["in process: decisions", f"{decisions:.2f} s", f"{listing:.2f} s", f"{decisions / listing:.2f}"]
    )
    report.render(
        ["command", "ours (median)", "list (median)", "ratio"],
        rows,
        f"policy explain of every secret vs list, {args.secrets:,} secrets, {os.cpu_count()} CPUs",
        [
            f"{rounds} alternating rounds; fresh process each; embedded store with the test KDF profile; "
            "ratio = ours / list (lower is better). 'x N': one per-name run times the secrets. "
            "'in process': Policy.granted of every name vs the store's list(include_deleted=True)."
        ],
    )


def _in_process(store_path: Path, policy: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds for the policy's decisions on every name, and for the store's listing from a fresh
    handle (as a command lists: no listing kept from before), per round."""
    parsed = load_policy(policy)
    decisions: list[float] = []
    listings: list[float] = []
    for _ in range(rounds):
        store = EncryptedStore.open(SqliteStorage(store_path), PasswordUnlock(PASSWORD, kdf.TEST))
        try:
            started = time.perf_counter()
            listed = store.list("", include_deleted=True)
            listings.append(time.perf_counter() - started)
        finally:
            store.close()
        started = time.perf_counter()
        for meta in listed:
            parsed.granted(IDENTITY, meta.name)
        decisions.append(time.perf_counter() - started)
    return decisions, listings


if __name__ == "__main__":
    main()
