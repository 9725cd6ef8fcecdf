"""`get --clip` (as `pass -c`): the value reaches a real X clipboard (Xvfb) through xclip or xsel,
never a process's arguments or the command's output, and is taken off after
SECRETS_MANAGER_CLIP_TIME seconds, putting back what the clipboard held before."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_cli import KNOWN_VALUE, PASSWORD, SCRIPT, Cli, Result, assert_one_line_error

CLIPBOARD_PROGRAMS = ("Xvfb", "xclip", "xsel")


def _require_clipboard_programs() -> None:
    missing = [program for program in CLIPBOARD_PROGRAMS if shutil.which(program) is None]
    if not missing:
        return
    why = f"{', '.join(missing)} not installed (Debian: apt-get install xvfb xclip xsel)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}, but CI must run the clipboard tests (.ci/run installs them)")
    pytest.skip(why)


@pytest.fixture
def display() -> Iterator[str]:
    """A private X server (Xvfb) on a display number it picks itself. -noreset: by default an X
    server resets when its last client leaves, and a client connecting meanwhile is refused
    ("Can't open display"): the tests' xclip calls come and go, so one could land in a reset
    (seen with several pytest runs at once; 29 of 400 short xclip calls from 4 threads were
    refused so here, none with -noreset). A desktop's server has its session's clients and
    does not reset between them."""
    _require_clipboard_programs()
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-nolisten", "tcp", "-noreset"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        number = os.read(read_end, 64).decode().strip() if ready else ""
        assert number.isdigit(), "Xvfb did not say its display number within 20 s"
        yield f":{number}"
    finally:
        os.close(read_end)
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def desktop(tmp_path: Path, display: str) -> Iterator[Cli]:
    """A store with KNOWN_VALUE at app/KEY, used from a session on `display`. A clearer still
    running at the end is killed: the next test's X server may get the same display number."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    cli = Cli(tmp_path / "vault" / "store.db", tmp_path)
    cli.env.update({"DISPLAY": display, "XDG_RUNTIME_DIR": str(runtime), "SECRETS_MANAGER_CLIP_TIME": "600"})
    assert cli("init", "--kdf-profile", "test").code == 0
    assert cli("store", "app/KEY", input=KNOWN_VALUE.encode()).code == 0
    yield cli
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(clearer_pid_file(cli).read_text()), signal.SIGKILL)


def clipboard(cli: Cli) -> str:
    done = subprocess.run(
        ["xclip", "-selection", "clipboard", "-out"],
        env={"DISPLAY": cli.env["DISPLAY"], "PATH": cli.env["PATH"]},
        capture_output=True,
        timeout=10,
    )
    return done.stdout.decode() if done.returncode == 0 else ""


def copy(cli: Cli, text: str) -> None:
    """Copy `text` as a desktop program would (xclip stays behind to serve it), and wait until the
    clipboard has it: xclip returns once it has forked the process that serves it, which takes the
    clipboard later (right after, 60 of 150 reads here still gave the earlier content), so a copy
    the test makes next would otherwise find the earlier content there."""
    subprocess.run(
        ["xclip", "-selection", "clipboard", "-in"],
        input=text.encode(),
        env={"DISPLAY": cli.env["DISPLAY"], "PATH": cli.env["PATH"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        timeout=10,
        check=True,
    )
    clipboard_becomes(cli, text)


def clipboard_becomes(cli: Cli, text: str, within: float = 10.0) -> None:
    """Until the clipboard holds `text` (what a clipboard program serves once it owns it)."""
    deadline = time.monotonic() + within
    while (held := clipboard(cli)) != text:
        assert time.monotonic() < deadline, f"the clipboard held {held!r} after {within} s"
        time.sleep(0.02)


def xclip_servers(cli: Cli) -> list[int]:
    """The xclip processes left serving the clipboard of `cli`'s display."""
    found = []
    for process in Path("/proc").iterdir():
        try:
            arguments = (process / "cmdline").read_bytes().split(b"\0")
            environment = (process / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments[0].endswith(b"xclip") and f"DISPLAY={cli.env['DISPLAY']}".encode() in environment:
            found.append(int(process.name))
    return found


def clearer_pid_file(cli: Cli) -> Path:
    display_number = cli.env["DISPLAY"].lstrip(":")
    return Path(cli.env["XDG_RUNTIME_DIR"]) / "secrets-manager" / f"clip-x11-_{display_number}.pid"


def take_off_now(cli: Cli) -> None:
    """What the clip time's end does, at once: the clearer's SIGTERM (which a second copy sends
    too). The tests copy with 600 s, so nothing depends on how fast a loaded machine is; one test
    waits for the time itself."""
    os.kill(int(clearer_pid_file(cli).read_text()), signal.SIGTERM)
    wait_for_the_clearer(cli)


def wait_for_the_clearer(cli: Cli, within: float = 20.0) -> None:
    """Until the clearer of `cli`'s display has done its work and ended."""
    pid_file = clearer_pid_file(cli)
    deadline = time.monotonic() + within
    while pid_file.exists():
        assert time.monotonic() < deadline, f"the clearer was still running after {within} s"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by whoever adopted it, does not)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"


def assert_copied(result: Result, shown: str) -> None:
    assert result.code == 0, result.stderr
    assert result.out.startswith(f"Copied {shown} to the clipboard ("), result.out
    assert KNOWN_VALUE not in result.out + result.stderr


def test_get_clip_copies_the_value_and_then_puts_back_what_was_there(desktop: Cli) -> None:
    copy(desktop, "what the user had copied")
    result = desktop("get", "app/KEY", "--clip")
    assert_copied(result, "app/KEY")
    assert "cleared in 600 s" in result.out
    assert clipboard(desktop) == KNOWN_VALUE
    take_off_now(desktop)
    assert clipboard(desktop) == "what the user had copied"


def test_the_value_is_taken_off_when_the_clip_time_ends(desktop: Cli) -> None:
    copy(desktop, "what the user had copied")
    started = time.monotonic()
    assert_copied(desktop("get", "app/KEY", "--clip", env={"SECRETS_MANAGER_CLIP_TIME": "2"}), "app/KEY")
    wait_for_the_clearer(desktop)
    assert time.monotonic() - started >= 2.0
    assert clipboard(desktop) == "what the user had copied"


def test_an_empty_clipboard_is_emptied_again(desktop: Cli) -> None:
    assert_copied(desktop("get", "app/KEY", "-c"), "app/KEY")
    assert clipboard(desktop) == KNOWN_VALUE
    take_off_now(desktop)
    assert clipboard(desktop) == ""


def test_something_copied_meanwhile_is_left_alone(desktop: Cli) -> None:
    assert_copied(desktop("get", "app/KEY", "--clip"), "app/KEY")
    copy(desktop, "copied after the secret")
    take_off_now(desktop)
    assert clipboard(desktop) == "copied after the secret"


def test_a_second_copy_never_brings_the_first_value_back(desktop: Cli) -> None:
    desktop("store", "app/OTHER", input=b"the-other-secret-value")
    copy(desktop, "before both")
    assert_copied(desktop("get", "app/KEY", "--clip"), "app/KEY")
    first_clearer = int(clearer_pid_file(desktop).read_text())
    assert_copied(desktop("get", "app/OTHER", "--clip"), "app/OTHER")
    assert clipboard(desktop) == "the-other-secret-value"
    assert not running(first_clearer), "the first copy's clearer still runs"
    take_off_now(desktop)
    assert clipboard(desktop) == "before both"


def test_one_field_of_a_json_value(desktop: Cli) -> None:
    desktop("store", "db/main", input=json.dumps({"username": "app", "password": KNOWN_VALUE}).encode())
    assert_copied(desktop("get", "db/main#password", "--clip"), "db/main#password")
    assert clipboard(desktop) == KNOWN_VALUE


def test_xsel_serves_where_xclip_is_missing(desktop: Cli, tmp_path: Path) -> None:
    only_xsel = tmp_path / "bin"
    only_xsel.mkdir()
    (only_xsel / "xsel").symlink_to(shutil.which("xsel") or "xsel")
    copy(desktop, "before xsel")
    result = desktop("get", "app/KEY", "--clip", env={"PATH": str(only_xsel)})
    assert_copied(result, "app/KEY")
    assert "(xsel)" in result.out
    assert clipboard(desktop) == KNOWN_VALUE
    take_off_now(desktop)
    assert clipboard(desktop) == "before xsel"


def test_the_value_is_in_no_process_arguments_or_environment(desktop: Cli) -> None:
    assert_copied(desktop("get", "app/KEY", "--clip"), "app/KEY")
    clearer = int(clearer_pid_file(desktop).read_text())
    seen = []
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                seen.append(process.joinpath(part).read_bytes())
            except OSError:
                continue  # ended meanwhile, or not ours to read
    assert any(b"secrets-manager-clip-clearer" in arguments for arguments in seen), "no clearer seen"
    assert not any(KNOWN_VALUE.encode() in arguments for arguments in seen)
    # The clearer and the xclip serving the value outlive the command: not with its master password.
    lasting = [pid for pid in (clearer, *xclip_servers(desktop)) if Path(f"/proc/{pid}").exists()]
    assert len(lasting) >= 2, lasting
    for pid in lasting:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"MASTER_PASSWORD" not in environment and PASSWORD.encode() not in environment
        assert f"DISPLAY={desktop.env['DISPLAY']}".encode() in environment.split(b"\0")
    os.kill(clearer, signal.SIGTERM)  # taken off now, as a second copy would
    wait_for_the_clearer(desktop)
    assert clipboard(desktop) == ""


def test_without_a_clipboard_nothing_is_read_and_the_user_is_told(desktop: Cli) -> None:
    audit = desktop.store.parent / "store.audit.jsonl"
    records_before = audit.read_text().count("\n")
    result = desktop("get", "app/KEY", "--clip", env={"DISPLAY": None})
    assert_one_line_error(result, 1, "no clipboard", "without --clip")
    assert audit.read_text().count("\n") == records_before, "a read that went nowhere was audited"
    result = desktop("get", "app/KEY", "--clip", env={"PATH": "/nonexistent"})
    assert_one_line_error(result, 1, "neither xclip nor xsel is installed")


@pytest.mark.parametrize(
    ("options", "env", "needle"),
    [
        (("--raw",), {}, "--clip and --raw exclude each other"),
        (("--json",), {}, "--clip and --json exclude each other"),
        ((), {"SECRETS_MANAGER_CLIP_TIME": "soon"}, "SECRETS_MANAGER_CLIP_TIME must be a whole number"),
        ((), {"SECRETS_MANAGER_CLIP_TIME": "0"}, "from 1 to 86400"),
        ((), {"SECRETS_MANAGER_CLIP_TIME": "\u00b2"}, "from 1 to 86400"),  # '²': isdigit(), not int()
        ((), {"SECRETS_MANAGER_CLIP_TIME": "\uff14\uff15"}, "from 1 to 86400"),  # full-width 45
    ],
)
def test_bad_requests_exit_2_and_leave_the_clipboard_alone(
    desktop: Cli, options: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    copy(desktop, "untouched")
    assert_one_line_error(desktop("get", "app/KEY", "--clip", *options, env=env), 2, needle)
    assert clipboard(desktop) == "untouched"


def test_store_generate_clip_copies_the_new_value_it_never_prints(desktop: Cli) -> None:
    copy(desktop, "before the new password")
    result = desktop("store", "db/ADMIN", "--generate", "--length", "40", "--clip")
    assert result.code == 0, result.stderr
    assert result.out.splitlines()[0] == "stored db/ADMIN version 1"
    assert result.out.splitlines()[1].startswith("Copied db/ADMIN to the clipboard (")
    generated = desktop("get", "db/ADMIN").out.strip()
    assert len(generated) == 40 and generated not in result.out + result.stderr
    assert clipboard(desktop) == generated
    take_off_now(desktop)
    assert clipboard(desktop) == "before the new password"


def test_store_generate_clip_of_one_field_copies_that_field(desktop: Cli) -> None:
    desktop("store", "db/main", input=json.dumps({"username": "app", "password": "old"}).encode())
    result = desktop("store", "db/main#password", "--generate", "--clip")
    assert result.code == 0, result.stderr
    stored = json.loads(desktop("get", "db/main").out)
    assert stored["username"] == "app" and stored["password"] != "old"
    assert clipboard(desktop) == stored["password"]


def test_store_clip_is_refused_before_anything_is_stored(desktop: Cli) -> None:
    assert_one_line_error(
        desktop("store", "db/NEW", "--clip", input=b"typed"), 2, "--clip copies a generated value"
    )
    assert_one_line_error(desktop("store", "db/NEW", "--generate", "--clip", "--json"), 2, "exclude")
    result = desktop("store", "db/NEW", "--generate", "--clip", env={"DISPLAY": None})
    assert_one_line_error(result, 1, "no clipboard", "without --clip")
    assert desktop("get", "db/NEW").code == 3, "a value nobody could paste was stored"


def slow_xclip(tmp_path: Path, marker: Path) -> Path:
    """A directory with an `xclip` that, the first time it copies, copies (the real xclip stays
    behind serving the value), says so in `marker`, then takes its time, as xsel or wl-copy may
    before they return."""
    directory = tmp_path / "slow-bin"
    directory.mkdir()
    script = directory / "xclip"
    script.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" -in "*)\n'
        f'  {shutil.which("xclip")} "$@" || exit\n'
        f"  if [ ! -e {marker} ]; then : > {marker}; sleep 30; fi; exit 0;;\n"
        "esac\n"
        f'exec {shutil.which("xclip")} "$@"\n'
    )
    script.chmod(0o755)
    return directory


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGTERM, 143)]
)
def test_ctrl_c_while_the_value_is_being_copied_takes_it_off(
    desktop: Cli, tmp_path: Path, signum: int, code: int
) -> None:
    """Ctrl-C (or a closed terminal's SIGHUP, or SIGTERM) after the clipboard program had taken
    the value, before a clearer was started, left the value on the clipboard with nothing to take
    it off."""
    copy(desktop, "what the user had copied")
    marker = tmp_path / "copied"
    path = f"{slow_xclip(tmp_path, marker)}:{desktop.env['PATH']}"
    process = subprocess.Popen(
        [str(SCRIPT), "get", "app/KEY", "--clip"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**desktop.env, "PATH": path, "SECRETS_MANAGER_CLIP_TIME": "600"},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, "xclip was never run"
        time.sleep(0.02)
    # The marker comes once xclip has returned, which may be before its forked server owns the
    # clipboard (the command itself waits for that, but it is asleep in the wrapper meanwhile).
    clipboard_becomes(desktop, KNOWN_VALUE)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert KNOWN_VALUE.encode() not in stdout + stderr
    assert clipboard(desktop) == "what the user had copied"


def test_a_killed_clearers_value_is_not_put_back_by_the_next_copy(desktop: Cli) -> None:
    """A clearer killed before its time (kill -9, the OOM killer) leaves its value on the
    clipboard; the next copy saved it as 'what the clipboard held before' and put it back when
    its own value was taken off."""
    desktop("store", "app/OTHER", input=b"the-other-secret-value")
    copy(desktop, "before both")
    assert_copied(desktop("get", "app/OTHER", "--clip"), "app/OTHER")
    os.kill(int(clearer_pid_file(desktop).read_text()), signal.SIGKILL)
    assert clipboard(desktop) == "the-other-secret-value"
    assert_copied(desktop("get", "app/KEY", "--clip"), "app/KEY")
    assert clipboard(desktop) == KNOWN_VALUE
    take_off_now(desktop)
    assert clipboard(desktop) == ""
    # And the clearer after it, which ended as it should, restores as before.
    copy(desktop, "copied later")
    assert_copied(desktop("get", "app/KEY", "--clip"), "app/KEY")
    take_off_now(desktop)
    assert clipboard(desktop) == "copied later"


def test_an_empty_value_is_not_copied(desktop: Cli) -> None:
    """An empty value (stored with --allow-empty) 'copied' emptied the user's clipboard for
    SECRETS_MANAGER_CLIP_TIME seconds and said 'Copied'; pass -c refuses it too."""
    assert desktop("store", "app/EMPTY", "--allow-empty", input=b"").code == 0
    copy(desktop, "what the user had copied")
    assert_one_line_error(desktop("get", "app/EMPTY", "--clip"), 2, "app/EMPTY is empty")
    assert clipboard(desktop) == "what the user had copied"
    assert not clearer_pid_file(desktop).exists()


def test_without_proc_a_reused_pid_is_not_taken_for_a_clearer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc (macOS), any living process at the pid file's pid was taken for the clearer
    and sent SIGTERM: after a clearer was killed, whatever program got its pid."""
    from secrets_manager.cli import clipboard as module

    real_read_bytes, real_exists = Path.read_bytes, Path.exists

    def read_bytes(self: Path) -> bytes:
        if str(self).startswith("/proc/"):
            raise FileNotFoundError(str(self))
        return real_read_bytes(self)

    def exists(self: Path, **options: bool) -> bool:
        return False if str(self).startswith("/proc/") else real_exists(self, **options)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "exists", exists)
    with (
        subprocess.Popen(["sleep", "60"]) as other,
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", module.CLEARER_MARK]
        ) as clearer,
    ):
        try:
            deadline = time.monotonic() + 10
            while module.CLEARER_MARK.encode() not in real_read_bytes(Path(f"/proc/{clearer.pid}/cmdline")):
                assert time.monotonic() < deadline  # its arguments are there once Python runs
                time.sleep(0.01)
            assert not module._is_clearer(other.pid)
            assert module._is_clearer(clearer.pid)
        finally:
            other.kill()
            clearer.kill()
    assert not module._is_clearer(other.pid)


def test_one_display_spelt_otherwise_is_still_one_clipboard(desktop: Cli) -> None:
    """':N', ':N.0' and 'unix:N' name one X server's clipboard, but each had a clearer of its own:
    a second copy under another spelling saved the first value as what the clipboard held
    before, and put it back when its own was taken off."""
    desktop("store", "app/OTHER", input=b"the-other-secret-value")
    copy(desktop, "before both")
    display = desktop.env["DISPLAY"]
    first = desktop("get", "app/OTHER", "--clip")
    assert_copied(first, "app/OTHER")
    for spelling in (f"{display}.0", f"unix{display}"):
        assert_copied(desktop("get", "app/KEY", "--clip", env={"DISPLAY": spelling}), "app/KEY")
        assert clipboard(desktop) == KNOWN_VALUE
        take_off_now(desktop)
        assert clipboard(desktop) == "before both", spelling


def test_a_pid_file_naming_another_users_process_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pid file left by a killed clearer whose pid another user's process (carrying the mark:
    any user can run one) got since: SIGTERM's PermissionError was an internal error (exit 1) of
    every later copy. The kill is refused here as it would be for that user's process."""
    from secrets_manager.cli import clipboard as module

    real_kill = os.kill

    def kill(pid: int, signum: int) -> None:
        if signum == signal.SIGTERM:
            raise PermissionError(1, "Operation not permitted")
        real_kill(pid, signum)

    with subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", module.CLEARER_MARK]
    ) as other:
        try:
            pid_file = tmp_path / "clip.pid"
            pid_file.write_text(f"{other.pid}\n")
            deadline = time.monotonic() + 10
            while not module._is_clearer(other.pid):  # its arguments are there once Python runs
                assert time.monotonic() < deadline
                time.sleep(0.01)
            monkeypatch.setattr(module.os, "kill", kill)
            started = time.monotonic()
            module._end_running_clearer(pid_file)  # no PermissionError
            assert time.monotonic() - started < module.HANDOVER_TIMEOUT
            assert other.poll() is None
        finally:
            other.kill()


def test_a_clearer_that_ends_at_once_is_a_failed_copy_not_a_silent_success(
    desktop: Cli, tmp_path: Path
) -> None:
    """A clearer that ended before reading its orders (here: a Python that is /bin/true) made
    their write a BrokenPipeError, which the CLI takes for a reader of its output gone away:
    exit 0, nothing said, nothing on the clipboard."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"import sys\nsys.executable = {shutil.which('true')!r}\n")
    before = "x" * 300_000  # more than a pipe holds: the write must wait for a reader
    copy(desktop, before)
    result = desktop("get", "app/KEY", "--clip", env={"PYTHONPATH": str(hook)})
    assert_one_line_error(result, 1, "could not copy app/KEY to the clipboard", "did not start")
    assert clipboard(desktop) == before


def test_one_wayland_compositor_spelt_otherwise_is_one_clipboard(tmp_path: Path) -> None:
    """WAYLAND_DISPLAY 'wayland-0' and '$XDG_RUNTIME_DIR/wayland-0' name one compositor, but got
    a clearer each (as ':0' and ':0.0' did), so a second copy could bring the first value back.
    (wl-copy and wl-paste are stand-ins here: only the choice of clipboard is looked at.)"""
    from secrets_manager.cli.clipboard import find_clipboard

    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("wl-copy", "wl-paste"):
        (tools / name).write_text("#!/bin/sh\n")
        (tools / name).chmod(0o755)
    runtime = str(tmp_path / "runtime")
    spellings = ("wayland-0", f"{runtime}/wayland-0", f"{runtime}//wayland-0")
    keys = {
        find_clipboard({"PATH": str(tools), "XDG_RUNTIME_DIR": runtime, "WAYLAND_DISPLAY": spelling}).display
        for spelling in spellings
    }
    assert len(keys) == 1, keys
    other = find_clipboard({"PATH": str(tools), "XDG_RUNTIME_DIR": runtime, "WAYLAND_DISPLAY": "wayland-1"})
    assert other.display not in keys
