"""The README's mutual-TLS set-up, pasted as written: its commands, then its server.toml and
policy.toml, end in a service a client certificate of the README's can call. (Pasted literally,
an earlier version failed at `init`, its master-password file not yet made, and at `serve`, its
server.toml naming a rotation schedule that did not exist.)"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from service_fixtures import SCRIPT, free_address

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT = 120


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def the_set_up() -> tuple[list[str], str, str]:
    """The set-up's commands (the `serve` line last), server.toml and policy.toml, as written."""
    (commands,) = [block for block in readme_blocks("sh") if "pki init --dir pki" in block]
    (server_toml,) = [block for block in readme_blocks("toml") if block.startswith("listen =")]
    (policy_toml,) = [block for block in readme_blocks("toml") if block.startswith("[identities]")]
    return [line for line in commands.splitlines() if line.strip()], server_toml, policy_toml


def test_the_readme_mtls_set_up_works_as_pasted(tmp_path: Path) -> None:
    commands, server_toml, policy_toml = the_set_up()
    assert commands[-1].startswith("secrets-manager serve --config server.toml")
    # The README's ports, moved only so that parallel runs do not clash.
    metrics = free_address()
    server_toml = server_toml.replace("127.0.0.1:7443", "127.0.0.1:0").replace("127.0.0.1:9464", metrics)
    (tmp_path / "server.toml").write_text(server_toml)
    (tmp_path / "policy.toml").write_text(policy_toml)
    env = {
        "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
    }
    for command in commands[:-1]:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, timeout=TIMEOUT
        )
        assert done.returncode == 0, (command, done.stderr.decode())
    serve = subprocess.Popen(
        ["bash", "-c", f"exec {commands[-1]}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert serve.stderr is not None
        said = []
        port = None
        for raw in serve.stderr:
            said.append(raw.decode())
            match = re.search(r'"port": (\d+)', said[-1])
            if match:
                port = int(match.group(1))
                break
        assert port, "".join(said)
        client = {
            **env,
            "SECRETS_MANAGER_ADDR": f"127.0.0.1:{port}",
            "SECRETS_MANAGER_CERT": str(tmp_path / "pki" / "auth.pem"),
            "SECRETS_MANAGER_KEY": str(tmp_path / "pki" / "auth-key.pem"),
            "SECRETS_MANAGER_CA": str(tmp_path / "pki" / "ca.pem"),
        }
        for args, exit_code in ((["list", "auth/"], 0), (["get", "market-connector/API_KEY"], 5)):
            done = subprocess.run([str(SCRIPT), *args], env=client, capture_output=True, timeout=TIMEOUT)
            assert done.returncode == exit_code, (args, done.stderr.decode())
    finally:
        serve.terminate()
        serve.wait(timeout=30)
