"""The README's and docs/'s links: every `#anchor` names a heading of its file (as GitHub makes
their ids), and every relative file link names a file of the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_id(title: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but '-' and '_' dropped, spaces '-'."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # not a comment in a code block
    return {heading_id(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_link_leads_somewhere(document: Path) -> None:
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in headings(linked)):
            broken.append(target)
    assert broken == [], f"{document.name}: links that lead nowhere: {broken}"


CITED_TEST = re.compile(r"tests/(test_\w+\.py)::(\w+)")


def defined_tests(path: Path) -> set[str]:
    """The names of the test functions `path` defines, at its top level or in a class."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            found.add(node.name)
    return found


def test_every_cited_test_exists() -> None:
    """docs/security.md backs each claim with `tests/FILE.py::TEST`: a test renamed or removed must
    not leave a claim citing nothing."""
    cited = {
        (document.name, file, name)
        for document in DOCUMENTS
        for file, name in CITED_TEST.findall(document.read_text())
    }
    assert len({c for c in cited if c[0] == "security.md"}) >= 50  # the pattern finds the citations
    missing = sorted(
        f"{document}: tests/{file}::{name}"
        for document, file, name in cited
        if not (ROOT / "tests" / file).exists() or name not in defined_tests(ROOT / "tests" / file)
    )
    assert missing == [], f"cited tests that do not exist: {missing}"
