"""`inject -i TEMPLATE [-o FILE]` (as `op inject`): references filled in, every secret read and
audited before anything is written, FILE 0600 and replaced only with --force."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from secrets_manager.errors import InvalidInputError
from secrets_manager.tls.files import write_private_file
from service_fixtures import SCRIPT, SEED, client_environ, make_pki, make_store, start_server
from test_cli import KNOWN_VALUE, PASSWORD, Cli, assert_one_line_error

if TYPE_CHECKING:
    from conftest import MadeOnce

TEMPLATE = """\
# market-connector.yaml: {{ not ours }} stays as it is (Helm, Jinja)
binance:
  api_key: "{{ sm://market-connector/BINANCE_API_KEY }}"
  api_secret: "{{sm://market-connector/BINANCE_API_KEY}}"
database:
  user: {{ sm://db/main#username }}
  password: {{ sm://db/main#password }}
"""


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A store holding two secrets, made by the CLI (once per worker, then copied), and a template."""

    def make(home: Path) -> None:
        cli = Cli(home / "vault" / "store.db", home)
        assert cli("init", "--kdf-profile", "test").code == 0
        assert cli("store", "market-connector/BINANCE_API_KEY", input=KNOWN_VALUE.encode()).code == 0
        database = json.dumps({"username": "app", "password": "db-Pa55-SEEKRIT"}).encode()
        assert cli("store", "db/main", input=database).code == 0

    made_once("test_inject cli", make, tmp_path)
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    return Cli(tmp_path / "vault" / "store.db", tmp_path)


def audit_records(cli: Cli) -> list[dict[str, object]]:
    log = cli.store.parent / "store.audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_references_are_filled_in_and_the_rest_is_copied(cli: Cli, tmp_path: Path) -> None:
    result = cli("inject", "-i", str(tmp_path / "template.yaml"))
    assert result.code == 0, result.stderr
    assert result.out == TEMPLATE.replace("{{ sm://market-connector/BINANCE_API_KEY }}", KNOWN_VALUE).replace(
        "{{sm://market-connector/BINANCE_API_KEY}}", KNOWN_VALUE
    ).replace("{{ sm://db/main#username }}", "app").replace("{{ sm://db/main#password }}", "db-Pa55-SEEKRIT")
    assert "{{ not ours }}" in result.out
    reads = [(r["name"], r["outcome"]) for r in audit_records(cli) if r["operation"] == "inject"]
    assert reads == [("market-connector/BINANCE_API_KEY", "ok"), ("db/main", "ok")]  # each read once


def test_the_template_may_come_on_stdin(cli: Cli) -> None:
    result = cli("inject", "-i", "-", input=b"KEY={{ sm://market-connector/BINANCE_API_KEY }}\n")
    assert (result.code, result.out) == (0, f"KEY={KNOWN_VALUE}\n")


def test_out_file_is_private_and_replaced_only_with_force(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "config" / "market-connector.yaml"
    target.parent.mkdir()
    result = cli("inject", "-i", str(tmp_path / "template.yaml"), "-o", str(target))
    assert result.code == 0, result.stderr
    assert result.out == "" and result.stderr == f"secrets-manager: wrote {target} with 3 secret values\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert KNOWN_VALUE in target.read_text()
    target.write_text("edited by hand\n")
    refused = cli("inject", "-i", str(tmp_path / "template.yaml"), "-o", str(target))
    assert_one_line_error(refused, 7, "already exists", "--force")
    assert target.read_text() == "edited by hand\n"
    forced = cli("inject", "-i", str(tmp_path / "template.yaml"), "-o", str(target), "--force")
    assert forced.code == 0, forced.stderr
    assert KNOWN_VALUE in target.read_text()
    assert sorted(path.name for path in target.parent.iterdir()) == ["market-connector.yaml"]


@pytest.mark.parametrize(
    ("template", "code", "needle"),
    [
        # a read refused names the line that refers to it (the first, where several do)
        (
            "a: {{ sm://db/main#password }}\nb: {{ sm://db/missing }}\nc: {{ sm://db/missing }}\n",
            3,
            "secret 'db/missing' not found (the reference on line 2 of the template)",
        ),
        ("a: {{ sm://db/main#password }}\nb: {{ sm:/db/main }}\n", 2, "line 2 of the template"),
        ('a: {{ sm://db/main#password }}\nb: {{ "sm://db/main" }}\n', 2, "line 2 of the template"),
        ("a: {{ sm://db/main#password }}\nb: {{sm://db/main\n", 2, "line 2 of the template"),
        ("a: {{ sm://db/main#nofield }}\n", 3, "nofield"),
        ("a: 1\nb: {{ sm://../etc/passwd }}\n", 2, "line 2 of the template: invalid secret name"),
        ("plain: text\n", 2, "refers to no secret"),
        ("a: {{ sm://bin/ARY }}\n", 2, "binary"),
    ],
)
def test_nothing_is_written_unless_every_reference_resolves(
    cli: Cli, tmp_path: Path, template: str, code: int, needle: str
) -> None:
    cli("store", "bin/ARY", "--file", str(_binary_file(tmp_path)))
    (tmp_path / "bad.yaml").write_text(template)
    target = tmp_path / "out.yaml"
    result = cli("inject", "-i", str(tmp_path / "bad.yaml"), "-o", str(target))
    assert_one_line_error(result, code, needle)
    assert not target.exists()
    assert "db-Pa55-SEEKRIT" not in result.stderr and KNOWN_VALUE not in result.stderr


def _binary_file(tmp_path: Path) -> Path:
    path = tmp_path / "binary.bin"
    path.write_bytes(b"\xff\xfe\x00binary")
    return path


def test_a_template_that_is_not_there_or_too_big(cli: Cli, tmp_path: Path) -> None:
    assert_one_line_error(cli("inject", "-i", str(tmp_path / "nowhere.yaml")), 3, "no template at")
    (tmp_path / "huge.yaml").write_bytes(b"#" * (1024 * 1024 + 1))
    assert_one_line_error(cli("inject", "-i", str(tmp_path / "huge.yaml")), 2, "larger than")
    assert_one_line_error(cli("inject", "-i", "-", input=b"\xff{{ sm://db/main }}"), 2, "not UTF-8")


def test_through_the_service_a_denied_secret_writes_nothing(tmp_path: Path) -> None:
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    server = start_server(tmp_path)
    (tmp_path / "auth.tpl").write_text("DB_PASSWORD={{ sm://auth/DB_PASSWORD }}\n")
    (tmp_path / "mixed.tpl").write_text(
        "A={{ sm://auth/DB_PASSWORD }}\nB={{ sm://market-connector/BINANCE_API_KEY }}\n"
    )
    environment = client_environ(tmp_path, "auth", [server.address])
    try:
        allowed = subprocess.run(
            [str(SCRIPT), "inject", "-i", str(tmp_path / "auth.tpl"), "-o", str(tmp_path / "auth.env")],
            env=environment, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        denied = subprocess.run(
            [str(SCRIPT), "inject", "-i", str(tmp_path / "mixed.tpl"), "-o", str(tmp_path / "mixed.env")],
            env=environment, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "auth.env").read_text() == f"DB_PASSWORD={SEED['auth/DB_PASSWORD'].decode()}\n"
    assert denied.returncode == 5, denied.stderr
    assert "(the reference on line 2 of the template)" in denied.stderr, denied.stderr
    assert not (tmp_path / "mixed.env").exists()
    assert SEED["auth/DB_PASSWORD"].decode() not in denied.stderr


@pytest.mark.parametrize("force", [(), ("--force",)])
def test_a_named_pipe_or_a_device_is_never_replaced_by_a_file(
    cli: Cli, tmp_path: Path, force: tuple[str, ...]
) -> None:
    """--force replaced a named pipe (made so the secrets never touch a disk), or through its
    link a device, by a regular file holding them."""
    pipe = tmp_path / "connector.fifo"
    os.mkfifo(pipe)
    link = tmp_path / "to-null"
    link.symlink_to(os.devnull)
    template = str(tmp_path / "template.yaml")
    for target in (pipe, link):
        result = cli("inject", "-i", template, "-o", str(target), *force)
        assert_one_line_error(result, 2, "not a regular file", "redirect the output")
        assert KNOWN_VALUE not in result.out + result.stderr
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    result = cli("inject", "-i", template, "-o", str(tmp_path), *force)
    assert_one_line_error(result, 2, "is a directory")
    assert not [record for record in audit_records(cli) if record["operation"] == "inject"], (
        "secrets read (and audited) for a FILE that could never be written"
    )


def test_sm_colon_elsewhere_on_a_line_is_not_taken_for_a_reference(cli: Cli) -> None:
    """A line with another tool's {{ … }} and 'sm:' later (a word ending in -sm, a comment) was
    refused as 'a malformed reference', though such text is to be copied unchanged."""
    template = (
        "password: {{ sm://db/main#password }}\n"
        "kafka: {{ .Values.kafka }}  # SASL mechanism: PLAIN\n"
        "{{ organism: x }}\n"
    )
    result = cli("inject", "-i", "-", input=template.encode())
    assert result.code == 0, result.stderr
    assert result.out == template.replace("{{ sm://db/main#password }}", "db-Pa55-SEEKRIT")


def test_an_out_file_in_a_directory_that_does_not_exist_says_to_create_it(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "run" / "connector" / "connector.yaml"
    result = cli("inject", "-i", str(tmp_path / "template.yaml"), "-o", str(target))
    assert_one_line_error(result, 2, f"the directory {target.parent} does not exist; create it first")
    assert not (tmp_path / "run").exists()


TERMINATED_WHILE_WRITING = """\
import os, signal
_fsync = os.fsync
def fsync(fd):
    written = os.readlink(f"/proc/self/fd/{fd}")  # a temporary file, named or not (O_TMPFILE)
    if written.endswith(".tmp") or written.endswith(" (deleted)"):
        os.kill(os.getpid(), signal.SIG%s)
    return _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.parametrize(("signame", "code"), [("TERM", 143), ("HUP", 129)])
def test_a_signal_while_the_out_file_is_written_leaves_no_file_behind(
    cli: Cli, tmp_path: Path, signame: str, code: int
) -> None:
    """SIGTERM or SIGHUP while -o FILE was written (its temporary file holding every secret, not
    yet renamed) ended the command there and then, leaving that file beside FILE."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(TERMINATED_WHILE_WRITING % signame)
    out = tmp_path / "out"
    out.mkdir()
    result = cli(
        "inject", "-i", str(tmp_path / "template.yaml"), "-o", str(out / "connector.yaml"),
        env={"PYTHONPATH": str(hook)},
    )  # fmt: skip
    assert_one_line_error(result, code, "aborted")  # as for Ctrl-C in any command
    assert list(out.iterdir()) == []


def test_sigkill_while_the_out_file_is_written_leaves_no_file_with_the_secrets(
    cli: Cli, tmp_path: Path
) -> None:
    """SIGKILL (the OOM killer, `kill -9`, a timeout's KILL) cannot be caught: the temporary file
    holding every secret stayed beside FILE for good. Now the secrets are written to a file with
    no name, which gets one only once complete."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(TERMINATED_WHILE_WRITING % "KILL")
    out = tmp_path / "out"
    out.mkdir()
    for extra in ([], ["--force"]):
        proc = subprocess.run(
            [str(SCRIPT), "inject", "-i", str(tmp_path / "template.yaml"), "-o", str(out / "c.yaml"), *extra],
            env={**cli.env, "PYTHONPATH": str(hook)},
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == -9, proc.stderr
        assert list(out.iterdir()) == []


def test_a_large_secret_many_times_is_refused_before_it_fills_memory(cli: Cli, tmp_path: Path) -> None:
    """Nothing bounded the filled-in template: a 1 MiB template of one 64 KiB secret could ask for
    6 GB. Past 16 MiB it is refused, exit 2, nothing written; the same secret many times below
    that is filled in each time."""
    large = "L" * 60_000
    assert cli("store", "app/LARGE", input=large.encode()).code == 0
    target = tmp_path / "large.conf"
    result = cli("inject", "-i", "-", "-o", str(target), input=b"{{ sm://app/LARGE }}\n" * 300)
    assert_one_line_error(result, 2, "larger than 16 MiB")
    assert not target.exists()
    result = cli("inject", "-i", "-", input=b"{{ sm://app/LARGE }}\n" * 200)
    assert (result.code, result.out) == (0, f"{large}\n" * 200)


def test_file_mode_and_group_let_a_program_of_that_group_read_the_file(cli: Cli, tmp_path: Path) -> None:
    """As Vault Agent's template perms and consul-template's user/group: pgbouncer, nginx or a
    connector running as another user reads FILE through its group."""
    daemon = grp.getgrnam("daemon").gr_gid
    target = tmp_path / "out.yaml"
    template = str(tmp_path / "template.yaml")
    result = cli("inject", "-i", template, "-o", str(target), "--file-mode", "0640", "--file-group", "daemon")
    assert result.code == 0, result.stderr
    assert (stat.S_IMODE(target.stat().st_mode), target.stat().st_gid) == (0o640, daemon)
    assert KNOWN_VALUE in target.read_text()
    again = cli(
        "inject", "-i", template, "-o", str(target), "--force", "--file-mode", "440", "--file-group", "0"
    )
    assert again.code == 0, again.stderr
    assert (stat.S_IMODE(target.stat().st_mode), target.stat().st_gid) == (0o440, 0)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (("--file-mode", "0644"), "no other user may"),  # every user on the machine
        (("--file-mode", "0604"), "no other user may"),
        (("--file-mode", "0700"), "no other user may"),  # execute
        (("--file-mode", "04640"), "no other user may"),  # setuid
        (("--file-mode", "0040"), "its owner reads"),  # inject compares FILE with what it writes
        (("--file-mode", "rw-r-----"), "give an octal mode"),
        (("--file-mode", "0o6400"), "give an octal mode"),
        (("--file-group", "no-such-group-here"), "no such group on this machine"),
        (("--file-group", "daemon"), "the group may not read FILE; add --file-mode 0640"),  # 0600
        (("--file-group", "daemon", "--file-mode", "0600"), "with mode 0600 the group may not read"),
        # int() took these: not what chmod reads as a mode
        (("--file-mode", "+640"), "give an octal mode"),
        (("--file-mode", " 640"), "give an octal mode"),
        (("--file-mode", "0640\n"), "give an octal mode"),
        (("--file-mode", "6_4_0"), "give an octal mode"),
        (("--file-mode", "0o0o640"), "give an octal mode"),
        (("--file-mode", "\uff10\uff16\uff14\uff10"), "give an octal mode"),  # full-width digits
        # a traceback (str.isdigit, then int), or a number no gid_t holds: fchown's after the read
        (("--file-group", "\u00b2"), "no such group on this machine"),
        (("--file-group", "9" * 5000), "no such group on this machine"),
        (("--file-group", "99999999999"), "no such group on this machine"),
        (("--file-group", "4294967295"), "no such group on this machine"),  # (gid_t)-1: unchanged
    ],
)
def test_a_file_mode_or_group_that_cannot_be_is_refused_before_anything_is_read(
    cli: Cli, tmp_path: Path, options: tuple[str, str], needle: str
) -> None:
    target = tmp_path / "out.yaml"
    result = cli("inject", "-i", str(tmp_path / "template.yaml"), "-o", str(target), *options)
    assert_one_line_error(result, 2, needle)
    assert not target.exists()
    assert not any(record.get("operation") == "inject" for record in audit_records(cli))


@pytest.mark.parametrize(
    ("own", "said"),
    [
        ("store.db", "is the store itself"),
        ("store.db-wal", "is the store itself"),
        ("store.audit.jsonl", "is the store's audit log (or one of its files)"),
        ("store.audit.jsonl.lock", "is the store's audit log (or one of its files)"),
        ("master-password", "is the master password's file"),
    ],
)
def test_the_stores_own_files_are_never_written_over(cli: Cli, tmp_path: Path, own: str, said: str) -> None:
    """`inject -o STORE --force` (a slip of the shell's completion) wrote the filled-in template
    over the store file: every secret lost (and over the audit log: its chain), where `backup`
    refuses those paths. Refused now, with or without --force (not 'add --force'), before any
    secret is read; nothing changes. Fails on the old code (exit 0, the store replaced)."""
    (cli.store.parent / "store.db-wal").touch()
    (cli.store.parent / "master-password").write_text(PASSWORD)
    cli.env["MASTER_PASSWORD_FILE"] = str(cli.store.parent / "master-password")
    target = cli.store.parent / own
    before = {path.name: path.read_bytes() for path in cli.store.parent.iterdir()}
    for force in (["--force"], []):
        result = cli("inject", "-i", str(tmp_path / "template.yaml"), "-o", str(target), *force)
        assert_one_line_error(result, 2, f"{target} {said}; give -o another file; nothing was written")
    assert {path.name: path.read_bytes() for path in cli.store.parent.iterdir()} == before
    assert cli("get", "db/main#username").out == "app\n"


def test_file_mode_without_an_out_file_is_refused(cli: Cli, tmp_path: Path) -> None:
    result = cli("inject", "-i", str(tmp_path / "template.yaml"), "--file-mode", "0640")
    assert_one_line_error(result, 2, "--file-mode and --file-group are FILE's: give -o FILE")


def test_a_group_the_user_does_not_belong_to_is_refused_before_anything_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secrets_manager.cli import inject_command

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 27])
    assert inject_command._file_group("27") == 27
    with pytest.raises(InvalidInputError, match="you do not belong to it"):
        inject_command._file_group("daemon")


def test_a_group_the_kernel_refuses_is_said_and_no_file_is_left(open_directory: Path) -> None:
    """fchown refused (EPERM) at the write itself: one line naming the group, no file named."""
    target = open_directory / "out.conf"
    nobody = pwd.getpwnam("nobody")
    child = os.fork()
    if child == 0:  # pragma: no cover (the child, as nobody)
        code = 2
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            write_private_file(target, b"value-SEEKRIT", overwrite=False, mode=0o640, group=0)
        except InvalidInputError as exc:
            said = str(exc)
            code = (
                0 if said.startswith(f"cannot give {target} to group root: ") and "SEEKRIT" not in said else 3
            )
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.listdir(open_directory) == []


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory `nobody` may write in (pytest's own are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="inject-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
