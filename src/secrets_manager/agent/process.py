"""The agent process (`python -m secrets_manager.agent`, started by `secrets-manager agent start`).

It holds unlock keys in memory only, and guards them as gpg-agent and ssh-agent do:

- not dumpable (PR_SET_DUMPABLE 0): no core dump through a core_pattern pipe, and no ptrace or
  /proc/PID/mem read by other processes of the same user (root still can); RLIMIT_CORE 0;
- the keys in one anonymous page of their own, locked in memory (mlock, so never swapped out;
  if RLIMIT_MEMLOCK does not allow it the log says so and the agent runs on), excluded from
  dumps (MADV_DONTFORK/DONTDUMP), zeroed when a key expires, is forgotten or the agent stops. The
  copies Python makes while decoding a request and encoding an answer are freed, not zeroed;
- its own directory "/", stdin, stdout and stderr on /dev/null, a session of its own, an empty
  environment; a log of events (never a key) beside the socket, 0600, kept under MAX_LOG_BYTES:
  past it, at the start or after a line, it becomes agent.log.1 (the one before goes) and a new
  file begins, as logrotate's `rotate 1` would.

SIGTERM, SIGINT, `agent stop` and the removal or replacement of its socket (as at logout) wipe the
keys and end it; SIGHUP forgets every key, as gpg-agent's does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from secrets_manager.agent import MAX_MESSAGE, TIMEOUT, peer_uid
from secrets_manager.clocks import awake_or_asleep_clock_id
from secrets_manager.core_dumps import dumpable, keep_secrets_out_of_core_dumps

KEY_SIZE = 32
SLOTS = mmap.PAGESIZE // KEY_SIZE  # keys held at once (128 with 4 KiB pages): the oldest goes first
MAX_STORE_LENGTH = 4096
SWEEP = 0.5  # seconds: expiry and signals are seen at least this often
MAX_LOG_BYTES = 1024 * 1024  # the log past this is moved to <log>.1 and begun anew (module docstring)


def now() -> float:
    """Seconds on a clock that also runs while the machine sleeps (a laptop closed for an hour
    has let its keys expire)."""
    return time.clock_gettime(awake_or_asleep_clock_id())


@dataclass
class _Entry:
    store: str
    header: str
    slot: int
    given: float
    used: float


class KeyCache:
    """Unlock keys by store (one header each), in one locked page; expiry by `ttl` since the
    last use and `max_ttl` since the key was given."""

    def __init__(self, ttl: float, max_ttl: float) -> None:
        self.ttl, self.max_ttl = ttl, max_ttl
        self._page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for advice in ("MADV_DONTDUMP", "MADV_DONTFORK"):
            with contextlib.suppress(AttributeError, OSError):
                self._page.madvise(getattr(mmap, advice))
        self.locked = _mlock(self._page)
        self._entries: dict[str, _Entry] = {}

    def expires(self, entry: _Entry) -> float:
        return min(entry.used + self.ttl, entry.given + self.max_ttl)

    def put(self, store: str, header: str, key: bytes) -> None:
        self.forget(store)
        if len(self._entries) >= SLOTS:
            oldest = min(self._entries.values(), key=lambda e: e.given)
            self.forget(oldest.store)
        slot = min(set(range(SLOTS)) - {e.slot for e in self._entries.values()})
        self._page[slot * KEY_SIZE : (slot + 1) * KEY_SIZE] = key
        at = now()
        self._entries[store] = _Entry(store, header, slot, at, at)

    def get(self, store: str, header: str) -> bytes | None:
        entry = self._entries.get(store)
        if entry is None or entry.header != header:
            return None
        at = now()
        if at >= self.expires(entry):
            self.forget(store)
            return None
        entry.used = at
        return bytes(self._page[entry.slot * KEY_SIZE : (entry.slot + 1) * KEY_SIZE])

    def expired(self) -> list[str]:
        """Forget every key past its time; the stores whose keys went."""
        at = now()
        gone = [e.store for e in self._entries.values() if at >= self.expires(e)]
        for store in gone:
            self.forget(store)
        return gone

    def forget(self, store: str | None = None) -> int:
        """Zero and drop the key of `store` (every key if None); how many went."""
        stores = list(self._entries) if store is None else [store] if store in self._entries else []
        for name in stores:
            entry = self._entries.pop(name)
            self._page[entry.slot * KEY_SIZE : (entry.slot + 1) * KEY_SIZE] = bytes(KEY_SIZE)
        return len(stores)

    def listing(self) -> list[dict[str, Any]]:
        """The stores whose keys are kept now: not one past its time that no sweep forgot yet."""
        at = now()
        return [
            {
                "store": e.store,
                "expires_in": round(max(0.0, self.expires(e) - at), 1),
                "max_expires_in": round(max(0.0, e.given + self.max_ttl - at), 1),
            }
            for e in sorted(self._entries.values(), key=lambda e: e.store)
            if at < self.expires(e)
        ]

    def wipe(self) -> None:
        self.forget()
        self._page[:] = bytes(len(self._page))


def _mlock(page: mmap.mmap) -> bool:
    """Lock `page` in memory (never swapped out); False where RLIMIT_MEMLOCK or the platform
    does not allow it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        view = ctypes.c_char.from_buffer(page)
        address = ctypes.addressof(view)
        del view  # the page may be closed later
        return int(libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(len(page)))) == 0
    except (OSError, AttributeError, TypeError):
        return False


MAX_CONNECTIONS = 64  # served at once; past it the oldest is dropped for the newest


@dataclass
class _Connection:
    """One client: what it sent so far, the answer to send, and when it must be done."""

    sock: socket.socket
    deadline: float
    received: bytes = field(default=b"", repr=False)  # may hold a key being given
    answer: bytes = field(default=b"", repr=False)  # may hold a key being handed out


class Agent:
    """Serves every connection at once (one thread, a selector): a client that sends nothing, a
    byte at a time or too much is dropped at its deadline (TIMEOUT after it connected) or at once,
    and never keeps the others waiting."""

    def __init__(self, listener: socket.socket, cache: KeyCache, log: EventLog | None) -> None:
        self.listener, self.cache, self._log = listener, cache, log
        self.stopping = False
        self.forget_requested = False  # set by SIGHUP, acted on by the loop (not mid-request)
        self._selector = selectors.DefaultSelector()
        self._connections: dict[int, _Connection] = {}
        self._wakeup: socket.socket | None = None
        self._socket: tuple[Path, int] | None = None  # our socket's path and inode, once watched

    def log(self, event: str, **fields: Any) -> None:
        if self._log is None:
            return
        extra = "".join(f" {key}={_log_value(value)}" for key, value in fields.items())
        with contextlib.suppress(OSError):
            self._log.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {event}{extra}\n")

    def wake_on_signals(self) -> None:
        """A signal ends the wait at once (its handler only sets a flag)."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup, self._wakeup_writer = reader, writer
        self._selector.register(reader, selectors.EVENT_READ, "wakeup")

    def run(self) -> None:
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, "listener")
        try:
            while not self.stopping:
                self._sweep()
                wait = min([SWEEP, *(c.deadline - monotonic() for c in self._connections.values())])
                for handle, events in self._selector.select(max(0.0, wait)):
                    if handle.data == "listener":
                        self._accept()
                    elif handle.data == "wakeup":
                        with contextlib.suppress(OSError):
                            handle.fileobj.recv(64)  # type: ignore[union-attr]
                    else:
                        self._step(handle.data, events)
        finally:
            for connection in list(self._connections.values()):
                self._close(connection)
            self._selector.close()

    def watch_socket(self, path: Path, inode: int) -> None:
        """Stop (wiping the keys) once `path` is no longer our socket: removed (the login session's
        runtime directory went at logout, `rm`) or replaced by another agent's. No client can reach
        this agent then, and its keys would stay in memory for nothing (gpg-agent does the same)."""
        self._socket = (path, inode)

    def _socket_gone(self) -> bool:
        if self._socket is None:
            return False
        path, inode = self._socket
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return found.st_ino != inode or not stat.S_ISSOCK(found.st_mode)

    def _sweep(self) -> None:
        if self._socket_gone():
            self.log("socket gone", why="removed or replaced; stopping")
            self.stopping = True
        if self.forget_requested:
            self.forget_requested = False
            self.log("forgot", store="(all)", keys=self.cache.forget(), why="SIGHUP")
        for store in self.cache.expired():
            self.log("expired", store=store)
        at = monotonic()
        for connection in [c for c in self._connections.values() if at >= c.deadline]:
            self._close(connection)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the others are still served
                self.log("error", what=type(exc).__name__)
                return
            try:
                pid, uid = peer_uid(sock)
            except OSError:
                sock.close()
                continue
            if uid != os.getuid():
                self.log("refused", uid=uid, pid=pid, why="another user")
                sock.close()
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                self._close(min(self._connections.values(), key=lambda c: c.deadline))
            sock.setblocking(False)
            connection = _Connection(sock, monotonic() + TIMEOUT)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _step(self, connection: _Connection, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not connection.answer:
                self._read(connection)
            if connection.answer:
                sent = connection.sock.send(connection.answer)
                connection.answer = connection.answer[sent:]
                if not connection.answer:
                    self._close(connection)
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionError:  # the client went (killed, or gave up waiting): nothing to say
            self._close(connection)
        except Exception as exc:  # one bad connection must not end the agent (and its keys)
            self.log("error", what=type(exc).__name__)
            self._close(connection)

    def _read(self, connection: _Connection) -> None:
        chunk = connection.sock.recv(MAX_MESSAGE + 4 - len(connection.received))
        if not chunk:  # closed before a whole request: nothing to answer
            self._close(connection)
            return
        connection.received += chunk
        if len(connection.received) < 4:
            return
        (size,) = struct.unpack(">I", connection.received[:4])
        if size > MAX_MESSAGE:
            self._reply(connection, {"ok": False, "error": "bad request (too large)"})
        elif len(connection.received) >= 4 + size:
            self._reply(connection, self.handle(connection.received[4 : 4 + size]))

    def _reply(self, connection: _Connection, answer: dict[str, Any]) -> None:
        data = json.dumps(answer, separators=(",", ":")).encode("utf-8")
        connection.answer = struct.pack(">I", len(data)) + data
        connection.received = b""
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)

    def _close(self, connection: _Connection) -> None:
        if self._connections.pop(connection.sock.fileno(), None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(connection.sock)
        connection.sock.close()

    def handle(self, body: bytes) -> dict[str, Any]:
        """The answer to one request's JSON body."""
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise TypeError("not an object")
            return self.answer(request)
        except (ValueError, KeyError, TypeError, RecursionError, binascii.Error) as exc:
            return {"ok": False, "error": f"bad request ({type(exc).__name__})"}

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "get":
            key = self.cache.get(_text(request["store"]), _text(request["header"]))
            return {"ok": True, "key": None if key is None else base64.b64encode(key).decode()}
        if op == "put":
            key = base64.b64decode(_text(request["key"]), validate=True)
            if len(key) != KEY_SIZE:
                raise ValueError("an unlock key is 32 bytes")
            store = _text(request["store"])
            self.cache.put(store, _text(request["header"]), key)
            self.log("cached", store=store)
            return {"ok": True}
        if op == "status":
            return {
                "ok": True,
                "pid": os.getpid(),
                "ttl": self.cache.ttl,
                "max_ttl": self.cache.max_ttl,
                "locked": self.cache.locked,
                "dumpable": dumpable(),
                "keys": self.cache.listing(),
            }
        if op == "forget":
            only = request.get("store")
            count = self.cache.forget(None if only is None else _text(only))
            self.log("forgot", store=only or "(all)", keys=count)
            return {"ok": True, "forgot": count}
        if op == "stop":
            self.stopping = True
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown request {str(op)[:40]!r}"}


def monotonic() -> float:
    """Seconds for connection deadlines (not key expiry: `now`)."""
    return time.monotonic()


class EventLog:
    """The agent's log file, 0600, appended to a line at a time. A long-running agent must not
    fill its runtime directory (often a small tmpfs): once the file is past `limit` bytes (at the
    start, or after a line) it is renamed `<name>.1`, replacing the one before, and a new file is
    begun. A rotation that fails leaves the agent writing where it was."""

    def __init__(self, path: Path, limit: int = MAX_LOG_BYTES) -> None:
        self.path, self.limit = path, limit
        self._file = self._open()
        self._rotate_if_full()

    def _open(self) -> TextIO:
        return open(self.path, "a", encoding="utf-8", opener=_private)

    def write(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()
        self._rotate_if_full()

    def _rotate_if_full(self) -> None:
        with contextlib.suppress(OSError):
            if os.fstat(self._file.fileno()).st_size <= self.limit:
                return
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))  # its mode goes with it
            fresh = self._open()
            self._file.close()
            self._file = fresh

    def close(self) -> None:
        self._file.close()


def _log_value(value: object) -> str:
    """A log field's value on one line: a store name with a space, a newline or another control
    character is quoted and escaped (JSON), so no request can forge a line of the log."""
    text = str(value)
    if text and all(c.isprintable() and not c.isspace() and c != '"' for c in text):
        return text
    return json.dumps(text)


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_STORE_LENGTH:
        raise TypeError("not a short string")
    return value


def _harden() -> None:
    """Before any key arrives: no core dumps, no same-user ptrace, cwd /, a private umask."""
    keep_secrets_out_of_core_dumps(development=False)
    os.chdir("/")
    os.umask(0o077)


def _listen(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secrets-manager-agent")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--log")
    parser.add_argument("--ttl", type=float, required=True)
    parser.add_argument("--max-ttl", type=float, required=True)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    ready = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None
    _harden()
    path = Path(args.socket)
    log = None
    try:
        if args.log:
            log = EventLog(Path(args.log))
        cache = KeyCache(args.ttl, args.max_ttl)
        listener = _listen(path)
    except OSError as exc:
        _say(ready, f"error: {exc.strerror or exc} ({exc.filename or path})")
        return 1
    agent = Agent(listener, cache, log)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        agent.stopping = True

    def forget_all(_signum: int, _frame: FrameType | None) -> None:
        agent.forget_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forget_all)
    agent.wake_on_signals()
    inode = os.lstat(path).st_ino
    agent.watch_socket(path, inode)
    agent.log(
        "started",
        pid=os.getpid(),
        ttl=args.ttl,
        max_ttl=args.max_ttl,
        mlock="yes" if cache.locked else "no (RLIMIT_MEMLOCK)",
        dumpable=dumpable(),
    )
    _say(ready, f"ok {os.getpid()}")
    try:
        agent.run()
    finally:
        cache.wipe()
        listener.close()
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:  # still ours, not a newer agent's
                os.unlink(path)
        agent.log("stopped", pid=os.getpid())
        if log is not None:
            log.close()
    return 0


def _say(ready: TextIO | None, line: str) -> None:
    """Tell `agent start` how the start went; it may have gone (Ctrl-C): the agent runs on."""
    if ready is None:
        return
    with contextlib.suppress(OSError):
        ready.write(f"{line}\n")
        ready.flush()
    with contextlib.suppress(OSError):
        ready.close()


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


if __name__ == "__main__":  # pragma: no cover (run as `python -m secrets_manager.agent`)
    sys.exit(main())
