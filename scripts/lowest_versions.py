"""Run tests with the lowest version of each runtime dependency that pyproject.toml allows.

    python scripts/lowest_versions.py VENV [PYTEST ARGS ...]   # e.g. tests/test_storage_postgres.py
    python scripts/lowest_versions.py --pins                   # print the pins only

Makes (or reuses) the virtual environment VENV with this tree installed editable with [dev], each
runtime dependency held at its lower bound by a pip constraints file (wheels only, as a slim image
installs them; [dev]'s own packages take what they need beside them), then runs pytest there with
the arguments given (`-n 2 -q` before them). A bound that does not hold shows as a failing test:
raise it in pyproject.toml and say what broke. `lowest_pins` is also what tests/test_packaging.py
installs the wheel with. Needs the package index: about 45 s to install, then the tests' own time.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def lowest_pins(*, extras: bool = True) -> list[str]:
    """`NAME[EXTRAS]==LOWEST` for each runtime dependency, from its `>=` bound (without the extras
    for a constraints file, which may not name them)."""
    pins = []
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        (lowest,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        named = f"[{','.join(sorted(requirement.extras))}]" if extras and requirement.extras else ""
        pins.append(f"{requirement.name}{named}=={lowest}")
    return pins


def main(argv: list[str]) -> int:
    if argv == ["--pins"]:
        print("\n".join(lowest_pins()))
        return 0
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    venv, pytest_args = Path(argv[0]).resolve(), argv[1:]
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "lowest-constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in lowest_pins(extras=False)))
    install = [str(python), "-m", "pip", "install", "--quiet", "--only-binary", ":all:"]
    subprocess.run([*install, "-c", str(constraints), "-e", f"{ROOT}[dev]"], check=True)
    return subprocess.run([str(python), "-m", "pytest", "-n", "2", "-q", *pytest_args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
