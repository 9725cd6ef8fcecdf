"""docs/architecture.md stays true to the tree: every module path it names exists, every module
under src/secrets_manager/ is named in it, and every layer of the import-linter contract is in its
layer table.

A module path is a backticked token ending in `.py` (or a backticked `.md` / `.proto` path): one
that starts with `src/`, `tests/`, `bench/`, `scripts/`, `docs/` or `proto/` is relative to the
repository root, any other `.py` path to `src/secrets_manager/` (`store/encrypted.py`, `wire.py`).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "secrets_manager"
DOC = ROOT / "docs" / "architecture.md"
ROOT_DIRECTORIES = ("src", "tests", "bench", "scripts", "docs", "proto")
PATH_TOKEN = re.compile(r"`([\w./-]+\.(?:py|md|proto))`")


def named_paths(text: str) -> set[str]:
    return set(PATH_TOKEN.findall(text))


def resolved(token: str) -> Path:
    first = token.split("/", 1)[0]
    if first in ROOT_DIRECTORIES or not token.endswith(".py"):
        return ROOT / token
    return PACKAGE / token


def package_modules() -> set[str]:
    """Every module under src/secrets_manager/, as the doc names it, without the generated v1/
    code and the packages' __init__.py."""
    return {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts and path.name != "__init__.py" and path.parts[-2] != "v1"
    }


def test_every_path_the_architecture_doc_names_exists() -> None:
    missing = sorted(token for token in named_paths(DOC.read_text()) if not resolved(token).is_file())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_module_is_named_in_the_architecture_doc() -> None:
    unnamed = sorted(package_modules() - named_paths(DOC.read_text()))
    assert not unnamed, (
        f"modules not in docs/architecture.md: {unnamed}; add each to its package's table "
        "(written as `store/encrypted.py`)"
    )


def test_every_import_linter_layer_is_in_the_layer_table() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(contract["layers"] for contract in contracts if contract["type"] == "layers")
    table = DOC.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(layers), f"the doc's layer table has {len(rows)} rows, pyproject {len(layers)}"
    for row, layer in zip(rows, layers, strict=True):
        for module in (name.strip().removeprefix("secrets_manager.") for name in layer.split("|")):
            written = f"`{module}/`" if (PACKAGE / module).is_dir() else f"`{module}.py`"
            assert written in row, f"layer {layer!r}: {written} is not in the doc's row {row!r}"


def test_the_check_sees_a_missing_and_an_unnamed_module() -> None:
    text = "`store/encrypted.py` `store/no_such_module.py` `tests/conftest.py` `docs/format.md`"
    assert not resolved("store/no_such_module.py").is_file()
    assert resolved("tests/conftest.py").is_file() and resolved("docs/format.md").is_file()
    assert "store/encrypted.py" in named_paths(text)
    assert "store/vault.py" in package_modules() - named_paths(text)
