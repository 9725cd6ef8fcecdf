"""Run the console script on a new pseudo-terminal and answer its prompts, as a person would.

The master password prompt (getpass) reads from the terminal, not stdin, so tests of prompting
(the agent, `edit`, odd bytes typed) drive a real pty. One driver for all of them."""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("secrets-manager")
TIMEOUT_SECONDS = 60

# What to type after each read: given everything the command wrote so far, bytes or None.
Responder = Callable[[bytes], bytes | None]


def on_a_terminal(
    args: Sequence[str], env: Mapping[str, str], respond: Responder, timeout: float = TIMEOUT_SECONDS
) -> tuple[int, str]:
    """`secrets-manager ARGS` on a new terminal, `respond` typing after each read; its exit code
    and everything it wrote to the terminal (bounded by `timeout`)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.execve(str(SCRIPT), [str(SCRIPT), *args], dict(env))  # noqa: S606
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child has ended
                break
            if not data:
                break
            out += data
            keys = respond(out)
            if keys:
                os.write(fd, keys)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", errors="replace")


def typing_once(keys: bytes, after: bytes) -> Responder:
    """Type `keys` once, when the output first holds `after` (a prompt's end)."""
    typed = False

    def respond(out: bytes) -> bytes | None:
        nonlocal typed
        if typed or after not in out:
            return None
        typed = True
        return keys

    return respond


class AnsweringEach:
    """Type `keys` at each new `prompt` in the output; `count` says how many were asked."""

    def __init__(self, keys: bytes, prompt: bytes) -> None:
        self.keys, self.prompt, self.count = keys, prompt, 0

    def __call__(self, out: bytes) -> bytes | None:
        if out.count(self.prompt) <= self.count:
            return None
        self.count += 1
        return self.keys
