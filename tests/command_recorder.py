"""A stand-in for rotation's --set-command / --test-command that records what it was given."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def recorder(tmp_path: Path, tag: str, *, exit_code: int = 0) -> tuple[str, Callable[[], dict[str, Any]]]:
    """A command that records its stdin, argv and environment, then exits with `exit_code`."""
    out = tmp_path / f"{tag}.json"
    script = tmp_path / f"{tag}.py"
    script.write_text(
        "import json, os, sys\n"
        "data = sys.stdin.read()\n"
        f"json.dump({{'stdin': data, 'argv': sys.argv, 'env': dict(os.environ)}}, open({str(out)!r}, 'w'))\n"
        f"print('{tag} command says hello')\n"
        f"sys.exit({exit_code})\n"
    )
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} --flag"
    return command, lambda: json.loads(out.read_text())
