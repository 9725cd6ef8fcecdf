"""The README's first SDK example, pasted into a file as written and run as market-connector
against a real `serve`. (Pasted literally, it was a SyntaxError: `await` outside a function.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service_fixtures import client_environ, make_pki, make_store, start_server
from test_readme_mtls import readme_blocks


def test_the_readme_sdk_example_runs_as_pasted(tmp_path: Path) -> None:
    (example,) = [block for block in readme_blocks("python") if "get_credentials_sync(" in block]
    script = tmp_path / "example.py"
    script.write_text(example)
    make_pki(tmp_path, ("market-connector",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            env={**client_environ(tmp_path, "market-connector", [server.address]), "HOME": str(tmp_path)},
            capture_output=True,
            timeout=60,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"Credentials(['BINANCE_API_KEY', 'BINANCE_SECRET'])\n"
