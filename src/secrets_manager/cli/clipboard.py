"""`get --clip`: put a value on the desktop's clipboard and take it off again, as `pass -c` does.

The value goes to the clipboard tool (wl-copy, xclip, xsel or pbcopy) on its standard input, never
in its arguments. A detached clearer process waits SECRETS_MANAGER_CLIP_TIME seconds (45, pass's
default), then, if the clipboard still holds the value, puts back what it held before (or empties
it); if the user copied something else meanwhile, it leaves that alone. The clearer keeps only a
SHA-256 digest of the value, and gets everything on its standard input. Its time runs while the
machine sleeps: a laptop opened after an hour has the value taken off at once.

One clearer per display: a second copy first ends the running clearer, which puts back what it
had saved at once, so the second one saves the clipboard as it was before either value and the
first value can never come back when the second is taken off. The copy and that hand-over run
under a lock in the agent's private directory, where the clearer's pid file lives too.

Run as a script (`python -I clipboard.py`), this module is the clearer: it imports only the
standard library before it reads its orders, so it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLIP_TIME_VARIABLE = "SECRETS_MANAGER_CLIP_TIME"
DEFAULT_CLIP_SECONDS = 45
MAX_CLIP_SECONDS = 24 * 3600
TOOL_TIMEOUT = 5.0  # seconds: an unanswering clipboard owner must not hang `get`
READY_TIMEOUT = 10.0  # seconds for a new clearer to say it has taken over
HANDOVER_TIMEOUT = 5.0  # seconds for the running clearer to put the old content back and end
CLEARER_MARK = "secrets-manager-clip-clearer"  # in the clearer's argv, to recognise it by pid
# All the clipboard programs and the clearer get of our environment: they outlive the command (the
# X and Wayland ones serve the clipboard until something else is copied), and MASTER_PASSWORD,
# VAULT_TOKEN or AWS keys have no business in them.
TOOL_VARIABLES = (
    "PATH", "HOME", "DISPLAY", "XAUTHORITY", "WAYLAND_DISPLAY", "XDG_RUNTIME_DIR",
    "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR",
)  # fmt: skip


@dataclass(frozen=True)
class ClipboardTool:
    """How to write, read and empty one kind of clipboard; `display` names the clipboard (one
    clearer per display)."""

    name: str
    display: str
    copy: tuple[str, ...]
    paste: tuple[str, ...]
    clear: tuple[str, ...] | None  # None: copy an empty input
    environment: Mapping[str, str]  # TOOL_VARIABLES only


class ClipboardUnavailable(Exception):
    """No clipboard this process can reach (the CLI turns it into a one-line error)."""


class ClipboardFailed(Exception):
    """The clipboard tool failed; the message names the tool and its own error, never the value."""


def clip_seconds(environ: Mapping[str, str]) -> int:
    """SECRETS_MANAGER_CLIP_TIME as a whole number of seconds (1 to a day); ValueError naming the
    variable and what it takes."""
    text = environ.get(CLIP_TIME_VARIABLE, "").strip()
    if not text:
        return DEFAULT_CLIP_SECONDS
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_CLIP_SECONDS:  # not '²'
        raise ValueError(
            f"{CLIP_TIME_VARIABLE} must be a whole number of seconds from 1 to {MAX_CLIP_SECONDS}, "
            f"not {text[:20]!r}"
        )
    return int(text)


def find_clipboard(environ: Mapping[str, str]) -> ClipboardTool:
    """The clipboard of this session: Wayland's (wl-copy) if WAYLAND_DISPLAY is set, else X's
    (xclip, else xsel) if DISPLAY is, else macOS's pasteboard; ClipboardUnavailable saying what is
    missing."""
    path = environ.get("PATH", os.defpath)
    wayland = environ.get("WAYLAND_DISPLAY", "")
    x_display = environ.get("DISPLAY", "")
    tool_environment = {name: environ[name] for name in TOOL_VARIABLES if name in environ}
    if wayland and shutil.which("wl-copy", path=path) and shutil.which("wl-paste", path=path):
        return ClipboardTool(
            "wl-copy",
            _wayland_clipboard(wayland, environ.get("XDG_RUNTIME_DIR", "")),
            ("wl-copy",),
            ("wl-paste", "--no-newline"),
            ("wl-copy", "--clear"),
            tool_environment,
        )
    if x_display and shutil.which("xclip", path=path):
        return ClipboardTool(
            "xclip",
            _x11_clipboard(x_display),
            ("xclip", "-selection", "clipboard", "-in"),
            ("xclip", "-selection", "clipboard", "-out"),
            None,
            tool_environment,
        )
    if x_display and shutil.which("xsel", path=path):
        return ClipboardTool(
            "xsel",
            _x11_clipboard(x_display),
            ("xsel", "--clipboard", "--input"),
            ("xsel", "--clipboard", "--output"),
            ("xsel", "--clipboard", "--clear"),
            tool_environment,
        )
    if sys.platform == "darwin" and shutil.which("pbcopy", path=path):
        return ClipboardTool("pbcopy", "macos", ("pbcopy",), ("pbpaste",), None, tool_environment)
    if wayland:
        missing = "WAYLAND_DISPLAY is set but wl-copy/wl-paste are not installed (package wl-clipboard)"
    elif x_display:
        missing = "DISPLAY is set but neither xclip nor xsel is installed"
    else:
        missing = "no graphical session (neither WAYLAND_DISPLAY nor DISPLAY is set)"
    raise ClipboardUnavailable(f"no clipboard to copy to: {missing}")


def _wayland_clipboard(display: str, runtime_directory: str) -> str:
    """The compositor that WAYLAND_DISPLAY names: 'wayland-0' is a socket in XDG_RUNTIME_DIR, so
    '/run/user/1000/wayland-0' is the same one, with one clearer."""
    if runtime_directory and not display.startswith("/"):
        display = os.path.join(runtime_directory, display)
    return f"wayland-{os.path.normpath(display)}"


def _x11_clipboard(display: str) -> str:
    """The X clipboard that DISPLAY names: ':0', ':0.0' and 'unix:0' are one server's, whose
    screens share the selections, so one clearer must serve them all (else a second copy spelt
    otherwise saved the first value as what to put back). 'localhost:10' (TCP, an ssh -X
    forwarding) is another server than ':10'."""
    host, colon, rest = display.rpartition(":")
    if not colon:
        return f"x11-{display}"
    return f"x11-{'' if host == 'unix' else host}:{rest.partition('.')[0]}"


def copy_for_a_while(tool: ClipboardTool, data: bytes, seconds: int, state_directory: Path) -> None:
    """Put `data` on the clipboard and start the clearer that takes it off after `seconds`."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", tool.display)
    if len(key) > 100:  # a Wayland socket's path: file names stay short
        key = f"{key[:40]}-{hashlib.sha256(tool.display.encode()).hexdigest()[:16]}"
    with _locked(state_directory / f"clip-{key}.lock"):
        pid_file = state_directory / f"clip-{key}.pid"
        _end_running_clearer(pid_file)
        # A clearer that ended has removed its pid file. One still there is a clearer killed (or
        # stuck) before it took its value off: the clipboard may hold that value still, which must
        # not be put back when this one is taken off, so the clipboard is emptied then instead.
        before = b"" if pid_file.exists() else _read(tool)
        try:
            # The tool may own the clipboard before it returns (or before _write has seen the
            # value there): a Ctrl-C or a failure from here on must take the value off too.
            _write(tool, data)
            _start_clearer(tool, data, before, seconds, pid_file)
        except BaseException:  # no clearer (or Ctrl-C meanwhile): the value must not stay
            with contextlib.suppress(ClipboardFailed):
                _write(tool, before)
            raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _end_running_clearer(pid_file: Path) -> None:
    """Ask the clearer of an earlier copy, if one runs, to put back what it saved now, and wait
    for it to end: what the clipboard holds afterwards is what it held before either copy."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if pid <= 0 or not _is_clearer(pid):  # 0 and -1 would signal a process group, or everything
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:  # another user's, at a pid reused since: not ours to wait for either
        return
    deadline = time.monotonic() + HANDOVER_TIMEOUT
    while time.monotonic() < deadline and _is_clearer(pid):
        time.sleep(0.02)


def _is_clearer(pid: int) -> bool:
    """Whether `pid` is a clearer of ours (a pid file can outlive its process, and the pid be
    reused by another program we must not signal)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # Linux: no such process
        # No /proc (macOS): ps shows its arguments. A pid that merely lives may be any program
        # of the user's that got the pid of a clearer killed meanwhile; it must not be signalled.
        try:
            done = subprocess.run(
                ["ps", "-ww", "-p", str(pid), "-o", "command="],  # -ww: never cut to COLUMNS
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=TOOL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0 and CLEARER_MARK.encode() in done.stdout.split()
    except OSError:
        return False
    return CLEARER_MARK.encode() in arguments.split(b"\0")


def _read(tool: ClipboardTool) -> bytes:
    """What the clipboard holds; empty if it holds nothing, or nothing as text."""
    try:
        done = subprocess.run(
            tool.paste,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TOOL_TIMEOUT,
            check=False,
            env=dict(tool.environment),
        )
    except (OSError, subprocess.TimeoutExpired):
        return b""
    return done.stdout if done.returncode == 0 else b""


def _write(tool: ClipboardTool, data: bytes) -> None:
    """Give `data` to the tool on its standard input. The tool leaves a process behind that
    serves the clipboard (X and Wayland have no clipboard without an owner), so its output goes
    to a file, not a pipe we would wait on for ever."""
    command = tool.clear if not data and tool.clear else tool.copy
    with tempfile.TemporaryFile() as errors:
        try:
            done = subprocess.run(
                command,
                input=data,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                timeout=TOOL_TIMEOUT,
                check=False,
                env=dict(tool.environment),
                start_new_session=True,  # its clipboard server outlives us, away from our terminal
            )
        except subprocess.TimeoutExpired:
            raise ClipboardFailed(f"{tool.name} did not finish within {TOOL_TIMEOUT:g} s") from None
        except OSError as exc:
            raise ClipboardFailed(f"cannot run {tool.name}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            errors.seek(0)
            said = errors.read(500).decode("utf-8", "replace").strip().splitlines()
            raise ClipboardFailed(
                f"{tool.name} failed (exit {done.returncode}): {said[0] if said else 'no message'}"
            )
    # xsel (and wl-copy) hand the clipboard to a process they fork and may return before it owns
    # it: until it does, a paste gives the old content, or nothing.
    deadline = time.monotonic() + TOOL_TIMEOUT
    while _read(tool) != data:
        if time.monotonic() > deadline:
            raise ClipboardFailed(
                f"{tool.name} ran, but the clipboard did not take the value within {TOOL_TIMEOUT:g} s"
            )
        time.sleep(0.01)


def _start_clearer(tool: ClipboardTool, data: bytes, before: bytes, seconds: int, pid_file: Path) -> None:
    orders = {
        "tool": {
            "name": tool.name,
            "display": tool.display,
            "copy": tool.copy,
            "paste": tool.paste,
            "clear": tool.clear,
        },
        "digest": hashlib.sha256(data).hexdigest(),
        "before": base64.b64encode(before).decode("ascii"),
        "seconds": seconds,
        "pid_file": str(pid_file),
    }
    try:
        clearer = subprocess.Popen(
            [sys.executable, "-I", __file__, CLEARER_MARK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(tool.environment),
            start_new_session=True,  # outlives this command and the terminal it ran in
        )
    except OSError as exc:
        raise ClipboardFailed(
            f"cannot start the process that clears the clipboard: {exc.strerror or exc}"
        ) from None
    assert clearer.stdin is not None and clearer.stdout is not None
    try:
        clearer.stdin.write(json.dumps(orders).encode())
        clearer.stdin.close()
    except OSError:  # it ended first (BrokenPipeError, which the CLI takes for a closed stdout)
        ready = b""
    else:
        ready = _read_line_within(clearer.stdout, READY_TIMEOUT)
    clearer.stdout.close()
    if ready != b"ready\n":
        clearer.kill()
        raise ClipboardFailed("the process that clears the clipboard did not start; the value was taken off")


def _read_line_within(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return b""
    return stream.readline()


def _clear_later() -> None:
    """The clearer: wait, then put back what the clipboard held unless the user copied since."""
    orders = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    spec = orders["tool"]
    tool = ClipboardTool(
        spec["name"],
        spec["display"],
        tuple(spec["copy"]),
        tuple(spec["paste"]),
        None if spec["clear"] is None else tuple(spec["clear"]),
        dict(os.environ),  # TOOL_VARIABLES: how copy_for_a_while started us
    )
    pid_file = Path(orders["pid_file"])
    ended = False

    def end_now(signum: int, frame: object) -> None:
        nonlocal ended
        ended = True

    signal.signal(signal.SIGTERM, end_now)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    temporary = pid_file.with_name(f"{pid_file.name}.{os.getpid()}")
    temporary.write_text(f"{os.getpid()}\n")
    os.replace(temporary, pid_file)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_RDWR), 1)  # the command that started us reads no further
    from secrets_manager.clocks import awake_or_asleep_clock  # after "ready": a quick start

    clock = awake_or_asleep_clock()  # the machine's sleep counts: a laptop opened clears at once
    deadline = clock() + float(orders["seconds"])
    while not ended and clock() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - clock())))
    if hashlib.sha256(_read(tool)).hexdigest() == orders["digest"]:
        with contextlib.suppress(ClipboardFailed):
            _write(tool, base64.b64decode(orders["before"]))
    with contextlib.suppress(FileNotFoundError, ValueError):
        if int(pid_file.read_text().strip()) == os.getpid():
            pid_file.unlink()


if __name__ == "__main__":
    _clear_later()
