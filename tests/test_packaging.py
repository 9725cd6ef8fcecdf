"""The package as users get it, not as the editable install the rest of the suite uses: the sdist
and wheel `python -m build` makes from this tree; the wheel installed into a fresh virtual
environment outside the tree and used from another directory (the README's quick start,
`--version`, a user's program that uses the SDK as the README shows, type-checked with
`mypy --strict` against the installed wheel); and the wheel with the lowest version of each runtime
dependency that pyproject.toml allows (the quick start, every module imported, `serve` and the
README's SDK example).

One build per test run, shared by the xdist workers under a lock (about 10 s, no network: the
build's own requirements are the dev environment's, `--no-isolation`). The lowest versions come
from the package index (about 20 s with pip's cache warm). All slow.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from service_fixtures import client_environ, make_pki, make_store, start_server
from test_readme_mtls import readme_blocks

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# what the sdist must hold beside src/: the directories a packager builds, tests and reviews from
SDIST_DIRECTORIES = ("proto", "docs", "tests", "bench", "scripts")
LEFT_BY_BUILDS = (".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache")
# `NAME[EXTRAS]==LOWEST` for each runtime dependency, as scripts/lowest_versions.py makes them
_spec = importlib.util.spec_from_file_location("lowest_versions", ROOT / "scripts" / "lowest_versions.py")
assert _spec is not None and _spec.loader is not None
_lowest_versions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lowest_versions)
LOWEST_PINS: list[str] = _lowest_versions.lowest_pins()
MYPY = [sys.executable, "-m", "mypy", "--strict", "--no-incremental"]

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    log: str


@contextmanager
def _locked(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A directory `name` shared by every xdist worker of this run (not by earlier runs), held
    under a lock: the first worker in makes what is in it, the others find it made."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    shared.mkdir(exist_ok=True)
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield shared


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    with _locked(tmp_path_factory, "packaging-dist") as out:
        log = out / "build.log"
        if not log.exists():
            # from a copy without what earlier builds and installs left here (an egg-info's
            # SOURCES.txt from an old build puts its files in the sdist, whatever MANIFEST.in says)
            tree = out / "tree"
            shutil.rmtree(tree, ignore_errors=True)  # a build that failed before, in this run
            shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*LEFT_BY_BUILDS))
            done = subprocess.run(
                [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            log.write_text(done.stdout + done.stderr)
        return Built(
            sdist=out / f"secrets_manager-{VERSION}.tar.gz",
            wheel=out / f"secrets_manager-{VERSION}-py3-none-any.whl",
            log=log.read_text(),
        )


def _venv(directory: Path) -> Path:
    """A new virtual environment at `directory` (anew, if one is there: an install that failed
    before, in this run), without pip (this environment's installs into it); its python."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", "--without-pip", str(directory)], check=True, timeout=120
    )
    return directory / "bin" / "python"


def _pip_into(python: Path) -> list[str]:
    """This environment's pip, installing into `python`'s environment."""
    return [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]


def _site_packages(python: Path) -> Path:
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(found.stdout.strip())


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Path:
    """The wheel alone (no [dev]) in a fresh virtual environment; its python. Its dependencies
    are the dev environment's, on its path after its own site-packages (a plain path line: the
    editable install's .pth there, which points at src/, is not processed)."""
    with _locked(tmp_path_factory, "packaging-venv") as directory:
        python, made = directory / "bin" / "python", directory / "made"
        if not made.exists():
            _venv(directory)
            own = _site_packages(python)
            (own / "dev-dependencies.pth").write_text(
                "".join(f"{sysconfig.get_paths()[key]}\n" for key in ("purelib", "platlib"))
            )
            subprocess.run(
                [*_pip_into(python), "--no-deps", "--no-index", str(built.wheel)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            made.touch()
        return python


def _user_environ(home: Path, python: Path, **more: str) -> dict[str, str]:
    """A user's environment: nothing of this tree's (no PYTHONPATH), the venv's bin on PATH."""
    return {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(home), **more}


def _run(
    argv: list[str], cwd: Path, env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, input=stdin.decode(), capture_output=True, text=True, timeout=120
    )


def _quick_start(python: Path, directory: Path) -> None:
    """The README's first line's main job (init, store from stdin, get), from `directory`."""
    env = _user_environ(
        directory,
        python,
        SECRETS_MANAGER_STORE=str(directory / "demo.db"),
        MASTER_PASSWORD="demo-only",
    )
    script = str(python.parent / "secrets-manager")
    for argv, stdin in (([script, "init"], b""), ([script, "store", "BINANCE_API_KEY"], b"my-api-key\n")):
        done = _run(argv, directory, env, stdin)
        assert done.returncode == 0, done.stderr
    got = _run([script, "get", "BINANCE_API_KEY"], directory, env)
    assert (got.returncode, got.stdout, got.stderr) == (0, "my-api-key\n", "")


def _where_imported(python: Path, directory: Path, module: str) -> Path:
    done = _run(
        [str(python), "-c", f"import {module}; print({module}.__file__)"],
        directory,
        _user_environ(directory, python),
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def _sdist_names(sdist: Path) -> set[str]:
    prefix = f"secrets_manager-{VERSION}/"
    with tarfile.open(sdist) as archive:
        return {member.name.removeprefix(prefix) for member in archive.getmembers() if member.isfile()}


def _tree_files(top: Path) -> set[str]:
    """The files under `top` (relative to the tree's root) that a build takes: no caches, and no
    store files but the tests' vectors."""
    files = set()
    for path in top.rglob("*"):
        relative = path.relative_to(ROOT)
        if not path.is_file() or "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        if re.search(r"\.db(-wal|-shm)?$", path.name) and relative.parts[:2] != ("tests", "vectors"):
            continue
        files.add(relative.as_posix())
    return files


def test_the_build_uses_nothing_setuptools_deprecated(built: Built) -> None:
    # `license = { text = ... }` drew a SetuptoolsDeprecationWarning: "By 2027-Feb-18, you need to
    # update your project ... or your builds will no longer be supported"
    assert "deprecat" not in built.log.lower(), [
        line for line in built.log.splitlines() if "deprecat" in line.lower()
    ]


def test_the_sdist_holds_the_proto_docs_tests_and_vectors(built: Built) -> None:
    names = _sdist_names(built.sdist)
    wanted = {"README.md", "pyproject.toml", "proto/secrets_manager/v1/secrets.proto"}
    for directory in SDIST_DIRECTORIES:
        wanted |= _tree_files(ROOT / directory)
    # every file the README links to, and the test vectors (a .db among them) and helpers
    readme = (ROOT / "README.md").read_text()
    wanted |= set(re.findall(r"\]\(((?:docs|bench|tests|proto|scripts)/[^)#\s]+)\)", readme))
    assert {"tests/conftest.py", "tests/vectors/upgrade/mixed_store.db"} <= wanted
    assert sorted(wanted - names) == []


def test_the_wheel_holds_the_package_and_nothing_else(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as archive:
        names = {name for name in archive.namelist() if ".dist-info/" not in name}
    expected = _tree_files(ROOT / "src" / "secrets_manager") | _tree_files(
        ROOT / "src" / "secrets_manager_entry"
    )
    assert names == {name.removeprefix("src/") for name in expected}
    # what the code and its users open at run time: the generated gRPC code, its stubs, py.typed
    assert {
        "secrets_manager/py.typed",
        "secrets_manager/v1/secrets_pb2.py",
        "secrets_manager/v1/secrets_pb2.pyi",
        "secrets_manager/v1/secrets_pb2_grpc.py",
        "secrets_manager/agent/__main__.py",
    } <= names


def test_the_installed_wheel_runs_the_quick_start_outside_the_tree(installed: Path, tmp_path: Path) -> None:
    assert _where_imported(installed, tmp_path, "secrets_manager").is_relative_to(installed.parent.parent)
    version = _run(
        [str(installed.parent / "secrets-manager"), "--version"], tmp_path, _user_environ(tmp_path, installed)
    )
    assert (version.returncode, version.stdout) == (0, f"secrets-manager, version {VERSION}\n")
    _quick_start(installed, tmp_path)


USER_PROGRAM = """
from secrets_manager import AsyncClient, Client, Credentials, NotFoundError, SecretValue
from secrets_manager.client import SecretChanged, default_client


def reconnect(key: bytes) -> None: ...


def rotated(change: SecretChanged) -> None:
    if change.name.endswith("BINANCE_API_KEY"):
        reconnect(default_client().get(change.name).value.reveal())


def version_of(client: Client, name: str) -> int:
    try:
        return client.get(name).version
    except NotFoundError as error:
        return -error.exit_code


async def key_of(client: AsyncClient) -> str:
    value: SecretValue = (await client.get("market-connector/BINANCE_API_KEY")).value
    return value.reveal_text()


def staleness(creds: Credentials) -> float | None:
    return creds.staleness("BINANCE_API_KEY")


subscription = default_client().on_change(rotated, prefix="market-connector/")
"""


def test_a_users_program_type_checks_strictly_against_the_installed_wheel(
    installed: Path, tmp_path: Path
) -> None:
    (readme_example,) = [block for block in readme_blocks("python") if "get_credentials_sync(" in block]
    program = tmp_path / "app.py"
    program.write_text(readme_example + USER_PROGRAM)
    checked = _run(
        [*MYPY, "--python-executable", str(installed), "--cache-dir", str(tmp_path / "cache"), str(program)],
        tmp_path,
        {**_user_environ(tmp_path, installed), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("Success")


@pytest.fixture(scope="session")
def lowest(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Path:
    """The wheel with the lowest version of every runtime dependency pyproject.toml allows, from
    the package index (wheels only, as a slim image installs them); its python."""
    with _locked(tmp_path_factory, "packaging-lowest") as directory:
        python, made = directory / "bin" / "python", directory / "made"
        if not made.exists():
            _venv(directory)
            done = subprocess.run(
                [*_pip_into(python), "--only-binary", ":all:", str(built.wheel), *LOWEST_PINS],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"the lowest versions do not install: {done.stderr[-3000:]}"
            made.touch()
        return python


def test_the_lowest_dependency_versions_import_every_module_and_run_the_quick_start(
    lowest: Path, tmp_path: Path
) -> None:
    every_module = (
        "import importlib, pkgutil, secrets_manager\n"
        "for module in pkgutil.walk_packages(secrets_manager.__path__, 'secrets_manager.'):\n"
        "    if not module.name.endswith('__main__'):\n"
        "        importlib.import_module(module.name)\n"
    )
    done = _run([str(lowest), "-c", every_module], tmp_path, _user_environ(tmp_path, lowest))
    assert done.returncode == 0, done.stderr[-3000:]
    _quick_start(lowest, tmp_path)


def test_the_lowest_dependency_versions_serve_the_readme_sdk_example(lowest: Path, tmp_path: Path) -> None:
    (example,) = [block for block in readme_blocks("python") if "get_credentials_sync(" in block]
    (tmp_path / "example.py").write_text(example)
    make_pki(tmp_path, ("market-connector",))
    make_store(tmp_path)
    server = start_server(tmp_path, script=lowest.parent / "secrets-manager")
    try:
        done = _run(
            [str(lowest), str(tmp_path / "example.py")],
            tmp_path,
            {
                **_user_environ(tmp_path, lowest),
                **client_environ(tmp_path, "market-connector", [server.address]),
            },
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "Credentials(['BINANCE_API_KEY', 'BINANCE_SECRET'])\n"
