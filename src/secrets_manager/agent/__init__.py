"""The unlock agent: a person at a terminal types the master password once per session.

As gpg-agent does for pass, one background process per user keeps what a password gave, for a
while: here the unlock key Argon2id derived from it for one store header (never the password,
which may open other things too; the key opens that store's root key only). The CLI asks it
before it would prompt, and gives it the key after a prompted unlock (cli/session.py).

- Where: a Unix socket at a fixed per-user path, `$XDG_RUNTIME_DIR/secrets-manager/agent.sock`,
  else `<temp dir>/secrets-manager-<uid>/agent.sock`. The directory must be a real directory (no
  symbolic link), ours, mode 0700; the socket 0600 and ours. Every connection's peer uid is read
  with SO_PEERCRED, by both ends: the agent refuses (and logs) another uid, the CLI talks only to an
  agent of its own uid.
- Protocol: one request and one answer per connection, each a 4-byte big-endian length and a JSON
  object (at most 64 KiB). No value of a secret ever goes through it, only unlock keys (base64).
- Keys expire `ttl` after their last use and `max_ttl` after they were given, whichever is first
  (gpg-agent's default-cache-ttl and max-cache-ttl).

The process itself is `process.py` (`python -m secrets_manager.agent`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secrets_manager.environment import user_name
from secrets_manager.errors import SecretsManagerError, StorageError, UnsafeConfigurationError

SOCKET_NAME = "agent.sock"
LOG_NAME = "agent.log"
LOCK_NAME = "agent.lock"
MAX_MESSAGE = 64 * 1024
TIMEOUT = 2.0  # seconds for one request, either end
START_TIMEOUT = 10.0  # seconds for a new agent to say it listens
LOCK_WAIT = START_TIMEOUT + 10.0  # seconds to wait for another `agent start` to finish
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AgentNotRunning(SecretsManagerError):
    """No agent answers at the user's socket."""

    exit_code = 3
    kind = "not_found"


def agent_directory(environ: Mapping[str, str]) -> Path:
    """The user's agent directory: `$XDG_RUNTIME_DIR/secrets-manager` (a per-user directory the
    login manager makes, in memory, removed at logout), else one named with our uid under the
    temporary directory."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "secrets-manager"
    try:
        temporary = tempfile.gettempdir()
    except FileNotFoundError:  # none writable (a read-only root file system): where one would be,
        # so a lookup finds no agent there and `agent start` says it cannot make its directory
        given = environ.get("TMPDIR", "")
        temporary = given if os.path.isabs(given) else "/tmp"  # noqa: S108 (checked: ours, 0700)
    return Path(temporary) / f"secrets-manager-{os.getuid()}"


def socket_path(environ: Mapping[str, str]) -> Path:
    return agent_directory(environ) / SOCKET_NAME


def check_directory(directory: Path, *, create: bool = False) -> bool:
    """Whether `directory` is there (made 0700 first with `create`); UnsafeConfigurationError
    if it is a symbolic link or not a directory, belongs to another user or is not mode 0700:
    another user could then put a socket of theirs where we would give it our keys."""
    try:
        try:
            found = os.lstat(directory)
        except FileNotFoundError:
            if not create:
                return False
            with contextlib.suppress(FileExistsError):  # another `agent start` made it meanwhile
                os.mkdir(directory, 0o700)
            found = os.lstat(directory)
    except OSError as exc:  # XDG_RUNTIME_DIR missing or not ours to search
        raise UnsafeConfigurationError(
            f"cannot use the agent's directory {directory}: {exc.strerror or exc}; set XDG_RUNTIME_DIR "
            "to a private directory of yours, or unset it"
        ) from None
    problem = None
    if stat.S_ISLNK(found.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(found.st_mode):
        problem = "is not a directory"
    elif found.st_uid != os.getuid():
        problem = f"belongs to {user_name(found.st_uid)}, not to you"
    elif stat.S_IMODE(found.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(found.st_mode):04o}, not 0700"
    if problem is not None:
        raise UnsafeConfigurationError(
            f"the agent's directory {directory} {problem}; remove it (or set XDG_RUNTIME_DIR to a "
            "private directory of yours) and start the agent again"
        )
    return True


def check_socket(path: Path) -> bool:
    """Whether a socket of ours is at `path`; UnsafeConfigurationError if something else is."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UnsafeConfigurationError(
            f"cannot use the agent's socket {path}: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISSOCK(found.st_mode) or found.st_uid != os.getuid():
        raise UnsafeConfigurationError(
            f"{path} is not the agent's socket (not a socket of yours); remove it and start the agent again"
        )
    return True


def send_message(sock: socket.socket, doc: Mapping[str, Any]) -> None:
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ValueError("agent message too large")
    sock.sendall(struct.pack(">I", len(data)) + data)


def receive_message(sock: socket.socket) -> dict[str, Any]:
    """One message; ValueError if it is too large or not a JSON object, EOFError if the peer
    closed the connection first."""
    (size,) = struct.unpack(">I", _exactly(sock, 4))
    if size > MAX_MESSAGE:
        raise ValueError("agent message too large")
    doc = json.loads(_exactly(sock, size))
    if not isinstance(doc, dict):
        raise ValueError("agent message is not an object")
    return doc


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the connection was closed")
        data += chunk
    return data


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end, as the kernel recorded it at connect()."""
    pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


class AgentClient:
    """Requests to the user's agent. Connects per request; never starts one."""

    def __init__(self, path: Path, *, timeout: float = TIMEOUT) -> None:
        self.path = path
        self._timeout = timeout
        self.refused: str | None = None  # why `find` or `give` did not use the agent, if unsafe
        self.unanswered = False  # `find` got no answer (a hung or dying agent): `give` does not wait again

    @classmethod
    def for_user(cls, environ: Mapping[str, str]) -> AgentClient:
        return cls(socket_path(environ))

    def present(self) -> bool:
        """Whether an agent's socket is there (nothing is connected to); UnsafeConfigurationError
        if its directory or socket is there but not safely ours."""
        return check_directory(self.path.parent) and check_socket(self.path)

    def request(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The agent's answer to `doc`; AgentNotRunning if none listens (UnsafeConfigurationError
        if its directory or socket is not safely ours), StorageError if it does not answer."""
        if not check_directory(self.path.parent) or not check_socket(self.path):
            raise AgentNotRunning("no agent is running; start one with 'secrets-manager agent start'")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self._timeout)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise AgentNotRunning(
                    "no agent is running (a socket was left by one that ended); start one with "
                    "'secrets-manager agent start'"
                ) from None
            except OSError as exc:
                raise StorageError(f"cannot reach the agent at {self.path}: {exc.strerror or exc}") from None
            pid, uid = peer_uid(sock)
            if uid != os.getuid():
                raise UnsafeConfigurationError(
                    f"the process at {self.path} runs as {user_name(uid)}, not as you; it was not used"
                )
            try:
                send_message(sock, doc)
                answer = receive_message(sock)
            except (OSError, EOFError, ValueError) as exc:
                raise StorageError(
                    f"the agent at {self.path} (pid {pid}) did not answer ({exc}); if it is stuck, end it "
                    f"with 'kill {pid}' and start it again"
                ) from None
        if not answer.get("ok"):
            raise StorageError(f"the agent refused the request: {answer.get('error', 'no reason given')}")
        return answer

    def find(self, store: str, header: str) -> bytes | None:
        """The unlock key kept for `store`'s `header`, or None (none, expired, or no agent)."""
        try:
            answer = self.request({"op": "get", "store": store, "header": header})
        except UnsafeConfigurationError as exc:  # not safely ours: said by the caller (`refused`)
            self.refused = str(exc)
            return None
        except (SecretsManagerError, OSError):  # whatever keeps it from answering: the prompt
            self.unanswered = True
            return None
        key = answer.get("key")
        if not isinstance(key, str):
            return None
        try:
            return base64.b64decode(key, validate=True)
        except ValueError:
            return None

    def give(self, store: str, header: str, key: bytes) -> bool:
        """Keep `key` for `store`'s `header`; False if no agent took it (or `find` got no answer
        from it: a command does not wait twice for an agent that is stopped or hung)."""
        if self.unanswered:
            return False
        try:
            self.request(
                {"op": "put", "store": store, "header": header, "key": base64.b64encode(key).decode()}
            )
        except UnsafeConfigurationError as exc:
            self.refused = str(exc)
            return False
        except (SecretsManagerError, OSError):
            return False
        return True


def start_agent(environ: Mapping[str, str], ttl: float, max_ttl: float) -> tuple[int, bool]:
    """Start the user's agent unless one runs: its pid, and whether it was started now. Returns
    once it listens. Two `agent start` at once start one agent (a lock in its directory)."""
    directory = agent_directory(environ)
    check_directory(directory, create=True)
    path = directory / SOCKET_NAME
    client = AgentClient(path)
    try:
        lock = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a read-only file system (a container's root), a full disk
        raise UnsafeConfigurationError(
            f"cannot use the agent's directory {directory}: {exc.strerror or exc}; set XDG_RUNTIME_DIR "
            "to a private writable directory of yours"
        ) from None
    try:
        _lock(lock, directory / LOCK_NAME)
        with contextlib.suppress(AgentNotRunning):
            return int(client.request({"op": "ping"})["pid"]), False
        if check_socket(path):  # left by an agent that ended without removing it
            os.unlink(path)
        return _spawn(path, directory / LOG_NAME, ttl, max_ttl), True
    finally:
        os.close(lock)


def _lock(fd: int, path: Path) -> None:
    """The start lock, waited for at most LOCK_WAIT: another `agent start` holds it while its agent
    starts (START_TIMEOUT at most), unless that command was stopped (Ctrl-Z, SIGSTOP)."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StorageError(
                    f"another 'secrets-manager agent start' has held {path} for {LOCK_WAIT:g} s (is it "
                    "stopped?); end it and start the agent again"
                ) from None
            time.sleep(0.05)


def _spawn(path: Path, log: Path, ttl: float, max_ttl: float) -> int:
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "secrets_manager.agent",
                "--socket",
                str(path),
                "--log",
                str(log),
                "--ttl",
                repr(ttl),
                "--max-ttl",
                repr(max_ttl),
                "--ready-fd",
                str(write_end),
            ],
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env={"PATH": os.defpath},  # nothing of ours: no MASTER_PASSWORD, no credentials
            start_new_session=True,  # not ended by the terminal's hangup
        )
    finally:
        os.close(write_end)
    try:
        said = _read_until_closed(read_end, START_TIMEOUT)
    finally:
        os.close(read_end)
    if said.startswith("ok"):
        process.returncode = 0  # it runs on, detached: no "still running" warning when we exit
        return process.pid
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    raise StorageError(f"the agent did not start: {said.strip() or 'it ended without saying why'}")


def _read_until_closed(fd: int, timeout: float) -> str:
    data, deadline = b"", time.monotonic() + timeout
    while len(data) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "it did not say it listens within 10 s"
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", errors="replace")


__all__ = [
    "AgentClient",
    "AgentNotRunning",
    "agent_directory",
    "check_directory",
    "check_socket",
    "socket_path",
    "start_agent",
]
