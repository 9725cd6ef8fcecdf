"""`run --restart-on-change`: keep COMMAND running on the current values of its secrets.

As Vault Agent's process supervisor mode and envconsul do. `run` stays COMMAND's parent instead of
becoming it, and follows the changes to the secrets it gave (our store's change feed, a Vault or
AWS store's versions polled, a service's Watch stream: names and versions, never values). After a
change to one of them it reads them again (audited as the first read was) and, only if the
environment COMMAND would get is different, stops COMMAND (the stop signal to its process group,
SIGKILL after the stop timeout) and starts it again with the new values. So a rotated credential
reaches a program that reads it once, from its environment, within a second or so of the promote.

COMMAND runs in a process group of its own, so the signals `run` is sent (by a terminal's Ctrl-C,
`kill`, a service manager) reach it once, passed on by `run`: SIGHUP, SIGINT, SIGQUIT, SIGTERM,
SIGUSR1, SIGUSR2, SIGWINCH; those `run` was started ignoring (nohup) stay ignored, by COMMAND
too. After SIGINT, SIGQUIT or SIGTERM no restart follows: `run` waits for COMMAND to end. When
COMMAND ends on its own, `run` ends with its status (128 + N for a signal N), after what COMMAND
left in its group ended too (the stop signal, SIGKILL after the stop timeout).
A read that fails after a change leaves COMMAND running on the values it has, with a warning; it
is tried again every RETRY_SECONDS while the store does not answer, else at the next change.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from secrets_manager.cli.output import info_line, warning_line
from secrets_manager.errors import (
    InvalidInputError,
    ResourceExhaustedError,
    SecretsManagerError,
    StorageError,
    WatchUnsupportedError,
)
from secrets_manager.store import Secret, SecretStore
from secrets_manager.store.changes import ChangeKind, SecretChange

SETTLE_SECONDS = 0.3  # changes that land together (an import, `mv`) are read once, after the last
RETRY_SECONDS = 10.0  # a read that failed after a change is tried again this often
FEED_POLL_SECONDS = 0.2  # our store's change feed is read this often (a Vault or AWS store's
# versions are polled every `watch_poll_seconds` of theirs, as `serve` polls them)
RECONNECT_MAX_SECONDS = 30.0  # a broken Watch stream is opened again after 1, 2, 4 ... s, at most this
HEALTH_CHECK_SECONDS = 3.0  # each address's health check when a broken Watch stream moves (--server A,B)
TICK_SECONDS = 0.2  # how often the supervisor looks at COMMAND and at the changes
FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
ENDING_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})
STOP_SIGNALS = {s.name.removeprefix("SIG"): s for s in (*FORWARDED_SIGNALS, signal.SIGKILL)}
RESYNC = SecretChange(ChangeKind.RESYNC, "", None, 0)
SHELL = "/bin/sh"  # runs a script that has no #! line
T = TypeVar("T")

if TYPE_CHECKING:  # the service package starts gRPC: imported only by `run --restart-on-change`
    from secrets_manager.service.served import ServedStore
    from secrets_manager.service.watch import ChangeFeed


def parse_stop_signal(text: str) -> signal.Signals:
    """`--stop-signal TERM` (or SIGTERM, any case) as the signal."""
    found = STOP_SIGNALS.get(text.upper().removeprefix("SIG"))
    if found is None:
        raise InvalidInputError(
            f"--stop-signal {text!r} is not one of {', '.join(sorted(STOP_SIGNALS))} "
            "(e.g. --stop-signal TERM)"
        )
    return found


class ChangeSource(Protocol):
    """Where changes come from: `follow` calls `changed` with each change, until `stop` is set."""

    def follow(self, changed: Callable[[SecretChange], None], stop: threading.Event) -> None: ...

    def cancel(self) -> None: ...


class FeedSource:
    """A local store's changes: our store's own feed, or a Vault or AWS store's polled versions.
    Opened before the first read of the secrets, so no change after that read is missed."""

    def __init__(self, store: SecretStore) -> None:
        from secrets_manager.service.served import change_feed

        feed = change_feed(cast("ServedStore", store))  # reads only the feed, which any store may have
        if feed is None:
            raise InvalidInputError(
                "--restart-on-change: this store cannot tell when its secrets change; run the "
                "program without it"
            )
        self._feed: ChangeFeed = feed
        self._history = feed.change_history()
        _, self._revision = feed.changes_since(None)

    def follow(self, changed: Callable[[SecretChange], None], stop: threading.Event) -> None:
        failing = False
        while not stop.wait(FEED_POLL_SECONDS):  # a polled feed asks its backend only when due
            try:
                changes, head = self._feed.changes_since(self._revision)
                history = self._feed.change_history()
            except SecretsManagerError as exc:
                if not failing:
                    warning_line(f"cannot read the store's changes ({exc}); trying again")
                failing = True
                stop.wait(RETRY_SECONDS)
                continue
            if failing:
                info_line("reading the store's changes again")
                failing = False
            if history != self._history:  # its database failed over or was restored: read all again
                self._history, changes = history, [RESYNC]
            self._revision = head
            for change in changes:
                changed(change)

    def cancel(self) -> None:
        """Nothing to cancel: `follow` ends at its next poll once `stop` is set."""


class WatchedStore(Protocol):
    address: str

    def watch(
        self, prefix: str = "", since_revision: int | None = None, since_history: str | None = None
    ) -> WatchStream: ...

    def renew_connection(self) -> bool: ...

    def fail_over(self, timeout: float) -> bool: ...

    def move_on(self, timeout: float) -> bool: ...


class WatchStream(Protocol):
    revision: int | None
    history: str | None

    def start(self) -> int | None: ...

    @property
    def resumed(self) -> bool: ...

    def __iter__(self) -> Iterator[SecretChange]: ...

    def cancel(self) -> None: ...


class WatchSource:
    """A service's Watch stream for `prefix`, opened (and live) before the first read; opened
    again where it stopped when it breaks (a RESYNC, so everything is read again, if the service
    cannot resume it). With several addresses (`--server A,B`) it is opened again on another
    that answers its health check when the one in use does not (the reads after a change then go
    there too): the replicas share one store, so it resumes there where it stopped."""

    def __init__(self, remote: WatchedStore, prefix: str) -> None:
        self._remote = remote
        self._prefix = prefix
        tried: set[str] = set()
        while True:
            self._stream = remote.watch(prefix)
            try:
                self._stream.start()  # a service that refuses Watch says so here, before COMMAND starts
                break
            except WatchUnsupportedError:
                raise WatchUnsupportedError(
                    f"--restart-on-change needs the service's Watch stream, and {remote.address} does "
                    "not offer it (its store has no change feed, or watch_poll_seconds = 0 turned it "
                    "off); nothing was run. Run the program without --restart-on-change, or ask for "
                    "Watch to be on"
                ) from None
            except StorageError as exc:  # gone, its store silent, or full: another, if one serves
                tried.add(was := remote.address)
                if not _moved(remote, exc) or remote.address in tried:
                    raise
                info_line(f"{was} {_why_moved(exc)}: watching {remote.address}")
        self._lock = threading.Lock()
        self._cancelled = False

    def follow(self, changed: Callable[[SecretChange], None], stop: threading.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            failure: SecretsManagerError | None = None
            try:
                for change in self._stream:
                    changed(change)
                    delay = 1.0
                problem = "the service ended the watch stream"
            except SecretsManagerError as exc:
                problem, failure = str(exc), exc
            stream = self._stream
            while True:  # until a new stream is live, each failure said as it is
                if stop.is_set():
                    return
                warning_line(f"{problem}; watching again in {delay:.0f} s")
                if stop.wait(delay):
                    return
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                if self._remote.renew_connection():  # its TLS files were renewed meanwhile
                    info_line(f"connecting to {self._remote.address} with the renewed certificate files")
                was = self._remote.address
                if _moved(self._remote, failure):  # gone, its store silent, or no room for the stream
                    info_line(f"{was} {_why_moved(failure)}: moving to {self._remote.address}")
                try:
                    reopened = self._remote.watch(self._prefix, stream.revision, stream.history)
                    reopened.start()
                except SecretsManagerError as exc:
                    problem, failure = str(exc), exc
                    continue
                break
            with self._lock:
                if self._cancelled:
                    reopened.cancel()
                    return
                self._stream = reopened
            info_line(f"watching {self._remote.address} again")
            if not reopened.resumed:  # changes may have been missed: read everything again
                changed(RESYNC)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self._stream.cancel()


def _moved(remote: WatchedStore, failure: BaseException | None) -> bool:
    """Whether `remote` moved to another replica after a watch stream's `failure`: one that refused
    it for want of room (its watch-stream limit) though it serves, or one that no longer serves."""
    if isinstance(failure, ResourceExhaustedError):
        return remote.move_on(HEALTH_CHECK_SECONDS)
    return remote.fail_over(HEALTH_CHECK_SECONDS)


def _why_moved(failure: BaseException | None) -> str:
    if isinstance(failure, ResourceExhaustedError):
        return "has no room for another watch stream"
    return "does not answer"


@dataclass(frozen=True)
class Launch:
    """How to start COMMAND: the program found in run's PATH, its arguments, and the environment
    a set of secrets gives it."""

    command: tuple[str, ...]
    program: str
    environment: Callable[[dict[str, Secret]], dict[bytes, bytes]]
    not_started: Callable[[OSError, dict[str, Secret]], Exception]


def start(launch: Launch, variables: dict[str, Secret]) -> subprocess.Popen[bytes]:
    """COMMAND started in a process group of its own, with `variables` in its environment. A
    script without a #! line is run by the shell, as `run` without supervision does."""
    environment = launch.environment(variables)
    try:
        return with_shell_fallback(
            launch.program,
            launch.command,
            lambda program, argv: subprocess.Popen(
                argv, executable=program, env=environment, process_group=0
            ),
        )
    except OSError as failure:
        raise launch.not_started(failure, variables) from None


def with_shell_fallback(program: str, command: Sequence[str], execute: Callable[[str, list[str]], T]) -> T:
    """`execute(program, argv)` (an execve, a Popen); if the kernel refuses `program` as no
    executable format (ENOEXEC) and it may be a script (one without a #! line), `execute(SHELL,
    [SHELL, program, *arguments])`: sh runs it, as shells and execvp(3) do. The OSError of the
    last attempt propagates."""
    try:
        return execute(program, list(command))
    except OSError as exc:
        if exc.errno != errno.ENOEXEC or not is_text(program):
            raise
    return execute(SHELL, [SHELL, program, *command[1:]])


def is_text(program: str) -> bool:
    """Whether a file exec refused may be a script: no NUL in its first line (bash's test)."""
    try:
        with open(program, "rb") as file:
            start_of_file = file.read(256)
    except OSError:
        return False
    return b"\x00" not in start_of_file.split(b"\n", 1)[0]


def differences(before: dict[str, Secret], after: dict[str, Secret]) -> list[str]:
    """What changed between two readings, per secret, in words (names and versions only). A secret
    changed if a variable it gives holds another value (a NAME#FIELD variable: its field only)."""
    old, new = _by_secret(before), _by_secret(after)
    said = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            said.append(f"{name} is gone")
        elif name not in old:
            said.append(f"{name} was added (version {new[name][0].version})")
        elif old[name][1] != new[name][1]:
            said.append(f"{name} changed (version {old[name][0].version} → {new[name][0].version})")
    return said


def _by_secret(variables: dict[str, Secret]) -> dict[str, tuple[Secret, dict[str, bytes]]]:
    """Each secret's name → (the secret, the variables it gives and their values)."""
    grouped: dict[str, tuple[Secret, dict[str, bytes]]] = {}
    for variable, secret in variables.items():
        grouped.setdefault(secret.name, (secret, {}))[1][variable] = secret.value.reveal()
    return grouped


class ReadAgain:
    """After a reading that failed: when to read again (every RETRY_SECONDS while the store does
    not answer; anything else, a secret deleted or a refused variable, only after the next change,
    not audited as failing every 10 s), each new failure said once."""

    def __init__(self) -> None:
        self.at = 0.0  # not before this (time.monotonic()); math.inf: at the next change
        self._last_failure = ""

    def changed(self) -> None:
        """A new change is read after it settles, whatever failed before."""
        self.at = 0.0

    def failed(self, exc: SecretsManagerError, now: float, warning: str) -> None:
        """`exc` failed a reading at `now`: `warning` is said, with when it is read again, unless
        the last failure said the same (the same error, for the same changes)."""
        self.at = now + RETRY_SECONDS if isinstance(exc, StorageError) else math.inf
        if warning != self._last_failure:
            when = (
                f"trying again in {RETRY_SECONDS:.0f} s"
                if self.at < math.inf
                else "read again at the next change"
            )
            warning_line(f"{warning}; {when}")
        self._last_failure = warning

    def succeeded(self) -> bool:
        """A reading succeeded: whether one had failed before it (so the caller says it is back)."""
        failed, self._last_failure = bool(self._last_failure), ""
        return failed


class Supervisor:
    """COMMAND as a child, restarted on the new values after a change (module docstring)."""

    def __init__(
        self,
        launch: Launch,
        variables: dict[str, Secret],
        read: Callable[[], dict[str, Secret]],
        relevant: Callable[[str], bool],
        *,
        stop_signal: signal.Signals,
        stop_timeout: float,
    ) -> None:
        self._launch = launch
        self._variables = variables
        self._read = read
        self._relevant = relevant
        self._stop_signal = stop_signal
        self._stop_timeout = stop_timeout
        self._changes: queue.SimpleQueue[SecretChange] = queue.SimpleQueue()
        self._ending: signal.Signals | None = None  # the signal that ends supervision, once one came
        self._ended_pid = 0  # the COMMAND it was passed on to
        self._child: subprocess.Popen[bytes] | None = None
        self._reaper = os.getpid() == 1 or _is_subreaper()  # orphans are re-parented to run

    def run(self, source: ChangeSource) -> int:
        """Start COMMAND, follow `source` and restart it after changes; COMMAND's exit status."""
        stop = threading.Event()
        with self._forwarding_signals():
            self._started(start(self._launch, self._variables))
            follower = threading.Thread(
                target=self._follow, args=(source, stop), name="run-changes", daemon=True
            )
            follower.start()
            try:
                return self._supervise()
            finally:
                stop.set()
                source.cancel()

    def _follow(self, source: ChangeSource, stop: threading.Event) -> None:
        """The follower thread: a failure no source expects ends it with one line, not a traceback
        (COMMAND runs on, restarted no more)."""
        try:
            source.follow(self._changed, stop)
        except Exception as exc:  # said in one line: its message could hold data
            warning_line(
                f"stopped following the secrets' changes (internal error {type(exc).__name__}); "
                f"{self._launch.command[0]} runs on without restarts"
            )

    def _changed(self, change: SecretChange) -> None:
        if change.kind is ChangeKind.RESYNC or self._relevant(change.name):
            self._changes.put(change)

    def _supervise(self) -> int:
        child = self._child
        assert child is not None
        names: set[str] = set()
        last_change = 0.0
        again = ReadAgain()
        while True:
            with contextlib.suppress(queue.Empty):
                change = self._changes.get(timeout=TICK_SECONDS)
                names.add(change.name or "the secrets (changes were missed)")
                last_change = time.monotonic()
                again.changed()
            if self._reaper:
                _reap_orphans(child.pid)
            status = child.poll()
            if status is not None:
                return self._ended(child, status)
            now = time.monotonic()
            if self._ending is not None or not names or now - last_change < SETTLE_SECONDS or now < again.at:
                continue
            try:
                variables = self._read()
            except SecretsManagerError as exc:
                again.failed(
                    exc,
                    now,
                    f"{', '.join(sorted(names))} changed, but reading the secrets again failed ({exc}); "
                    f"{self._launch.command[0]} keeps running on the values it has",
                )
                continue
            if self._ending is not None:  # it came during the reading: COMMAND has it, and ends
                continue
            if again.succeeded():
                info_line("read the secrets again")
            names.clear()
            said = differences(self._variables, variables)
            if not said:  # a new version of the same value, a tag: COMMAND has what it needs
                self._variables = variables
                continue
            info_line(
                f"{'; '.join(said)}: restarting {self._launch.command[0]} (pid {child.pid}, "
                f"{self._stop_signal.name})"
            )
            status = self._stop(child)
            if self._ending is not None:
                return exit_status(status)  # it and its group have ended
            self._variables = variables
            child = self._started(start(self._launch, variables))

    def _started(self, child: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """`child` as COMMAND; an ending signal that came while it was starting (when there was no
        COMMAND to pass it on to, or only the one stopped for a restart) is passed on to it now."""
        self._child = child
        if self._ending is not None and self._ended_pid != child.pid:
            self._ended_pid = child.pid
            _signal_group(child, self._ending)
        return child

    def _stop(self, child: subprocess.Popen[bytes]) -> int:
        """Send the stop signal to COMMAND's group; SIGKILL after the stop timeout. Its status.
        SIGCONT follows the stop signal (as systemd sends it): a process stopped (SIGSTOP, a
        debugger) acts on it only once continued."""
        _signal_group(child, self._stop_signal)
        _signal_group(child, signal.SIGCONT)
        return self._wait_group(child)

    def _ended(self, child: subprocess.Popen[bytes], status: int) -> int:
        """COMMAND ended (`status`): what it left in its process group (a child it started in the
        background) gets the stop signal (unless an ending signal reached it already) and SIGKILL
        after the stop timeout, so nothing of it outlives `run`. `status` as a shell reports it."""
        if _group_left(child.pid):
            if self._ending is None:
                _kill_group(child.pid, self._stop_signal)
                _kill_group(child.pid, signal.SIGCONT)
            self._wait_group(child)
        return exit_status(status)

    def _wait_group(self, child: subprocess.Popen[bytes]) -> int:
        """COMMAND's status once it and the rest of its group ended, SIGKILL to all of them if that
        takes longer than the stop timeout."""
        deadline = time.monotonic() + self._stop_timeout
        try:
            status = child.wait(timeout=self._stop_timeout)
            while _group_left(child.pid):
                if time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(self._launch.command, self._stop_timeout)
                time.sleep(0.05)
            return status
        except subprocess.TimeoutExpired:
            what = (
                f"{self._launch.command[0]} (pid {child.pid})"
                if child.returncode is None
                else f"what {self._launch.command[0]} (pid {child.pid}) left in its process group"
            )
            warning_line(
                f"{what} did not end within {self._stop_timeout:g} s of {self._stop_signal.name}: "
                "killed (SIGKILL)"
            )
            _kill_group(child.pid, signal.SIGKILL)
            status = child.wait()
            for _ in range(100):  # SIGKILL cannot be caught: gone as soon as the kernel ends them
                if not _group_left(child.pid):
                    break
                time.sleep(0.05)
            return status

    @contextlib.contextmanager
    def _forwarding_signals(self) -> Iterator[None]:
        def forward(signum: int, frame: FrameType | None) -> None:
            child = self._child
            if signum in ENDING_SIGNALS:
                self._ending = signal.Signals(signum)  # no restart from here: wait for COMMAND to end
                if child is not None and child.returncode is None:
                    self._ended_pid = child.pid
            if child is not None:
                _signal_group(child, signal.Signals(signum))

        # A signal whoever started run ignores (nohup's SIGHUP, a background job's SIGINT and
        # SIGQUIT) stays ignored, by COMMAND too, as after exec: not caught, so not passed on.
        previous = {
            signum: signal.signal(signum, forward)
            for signum in FORWARDED_SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN
        }
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _signal_group(child: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """`signum` to COMMAND's process group (its own children too); to COMMAND alone if the group
    is gone or may not be signalled whole (it holds a process of another user: a setuid helper),
    and to nothing if COMMAND has ended."""
    if child.returncode is not None:
        return
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)


def _is_subreaper() -> bool:
    """Whether orphaned descendants are re-parented to this process (PR_GET_CHILD_SUBREAPER, set
    by a service manager or container runtime that makes `run` their reaper); False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        return bool(libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value)
    except (OSError, AttributeError):
        return False


def _reap_orphans(command_pid: int) -> None:
    """As a container's PID 1 (or a subreaper), the processes COMMAND orphaned (a daemon it
    double-forked, a shell's background job) become `run`'s children: those that ended are waited
    for, as init would, so they leave no zombie. COMMAND itself is left to its Popen."""
    while True:
        try:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if ended is None or ended.si_pid == command_pid:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(ended.si_pid, 0)


def _kill_group(pgid: int, signum: signal.Signals) -> None:
    """`signum` to process group `pgid`, if it has a process left that this user may signal."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_left(pgid: int) -> bool:
    """Whether process group `pgid` (COMMAND's, whose leader has been waited for) still has a
    process. Those of them `run` is the parent of once they are orphaned (`run` as a container's
    PID 1, or a subreaper) are waited for here, so they leave no zombie."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def exit_status(status: int) -> int:
    """Popen's return code as a shell reports it: 128 + N for a process signal N ended."""
    return 128 - status if status < 0 else status


def relevant_names(namespaces: Iterable[str], names: Iterable[str]) -> Callable[[str], bool]:
    """Whether a change to `name` may change what `run` gives COMMAND."""
    prefixes = tuple(f"{namespace}/" for namespace in namespaces)
    exact = frozenset(names)
    return lambda name: name in exact or name.startswith(prefixes)
