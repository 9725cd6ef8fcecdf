"""Credential rotation: the store's stage / promote / discard_pending, and `secrets-manager rotate`
through the real console script on a real SQLite store."""

from __future__ import annotations

import codecs
import json
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from command_recorder import recorder
from secrets_manager.errors import ConflictError, NotFoundError, UnsupportedOperationError
from secrets_manager.rotation import new_value_for
from secrets_manager.store import CURRENT, PENDING, PREVIOUS, EncryptedStore
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.changes import ChangeKind
from secrets_manager.store.testing import run_check
from secrets_manager.store.vault import VaultStore, connect_vault, retrying_session
from secrets_manager.values import SecretValue
from vault_server import FakeVault

if TYPE_CHECKING:
    from conftest import MadeOnce

SCRIPT = Path(sys.executable).with_name("secrets-manager")
PASSWORD = "correct horse battery staple"
OLD_VALUE = "old-db-password-KNOWN-1234"


# ---- the store API -------------------------------------------------------------------------------


def test_stage_promote_and_discard_on_the_encrypted_store(encrypted_store: EncryptedStore) -> None:
    store = encrypted_store
    store.put("db/app", b"one")
    store.put("db/app", b"two")
    staged = store.stage("db/app", b"three")
    assert (staged.version, staged.labels) == (3, (PENDING,))
    assert store.describe("db/app").labels == {CURRENT: 2, PREVIOUS: 1, PENDING: 3}
    store.promote("db/app", 3)
    assert store.describe("db/app").labels == {CURRENT: 3, PREVIOUS: 2}
    assert store.get("db/app").value.reveal() == b"three"
    store.stage("db/app", b"four")
    store.discard_pending("db/app")
    assert store.describe("db/app").labels == {CURRENT: 3, PREVIOUS: 2}
    assert store.get("db/app", version=4).value.reveal() == b"four"


def test_promote_and_discard_return_what_their_own_commit_changed(encrypted_store: EncryptedStore) -> None:
    store = encrypted_store
    store.put("db/app", b"one")
    store.put("db/app", b"two")
    assert store.promote("db/app", store.stage("db/app", b"three").version) == 2
    with pytest.raises(NotFoundError, match="no version labelled 'pending'"):
        store.discard_pending("db/app")
    store.stage("db/app", b"four")
    assert store.discard_pending("db/app") == 4
    assert store.describe("db/app").labels == {CURRENT: 3, PREVIOUS: 2}


def _interleave_with_next_commit(store: EncryptedStore, work: Callable[[], object], *, after: bool) -> None:
    """Make `store`'s next storage commit run `work` (another handle's) just before or just after
    it, once."""
    storage = store._storage
    real_commit = storage.commit

    def commit(*args: Any, **kwargs: Any) -> int:
        storage.commit = real_commit  # type: ignore[method-assign]
        if not after:
            work()
        revision = real_commit(*args, **kwargs)
        if after:
            work()
        return revision

    storage.commit = commit  # type: ignore[method-assign]


def test_promote_reports_its_own_previous_when_another_rotation_follows_at_once(
    open_store: Callable[..., EncryptedStore], encrypted_store: EncryptedStore
) -> None:
    """A second rotation lands between A's promote commit and A's return: A still reports version 1
    (what its commit replaced), not 2 (what a describe afterwards shows)."""
    encrypted_store.put("db/app", b"one")
    a, b = open_store(), open_store()
    staged = a.stage("db/app", b"two").version
    _interleave_with_next_commit(
        a, lambda: b.promote("db/app", b.stage("db/app", b"three").version), after=True
    )
    assert a.promote("db/app", staged) == 1
    assert encrypted_store.describe("db/app").labels == {CURRENT: 3, PREVIOUS: 2}


def test_promote_retried_after_losing_to_a_newer_write_refuses_to_demote_it(
    open_store: Callable[..., EncryptedStore], encrypted_store: EncryptedStore
) -> None:
    """B writes a new current version while A's promote is about to commit: A's commit loses the
    race and is retried on fresh metadata, where the pending version is older than current now.
    It used to promote it anyway (B's write became previous); it refuses instead, nothing moves."""
    encrypted_store.put("db/app", b"one")
    a, b = open_store(), open_store()
    staged = a.stage("db/app", b"two").version
    _interleave_with_next_commit(a, lambda: b.put("db/app", b"three"), after=False)
    with pytest.raises(ConflictError, match="version 3 of 'db/app' was written after the rotation staged"):
        a.promote("db/app", staged)
    assert encrypted_store.describe("db/app").labels == {CURRENT: 3, PREVIOUS: 1, PENDING: 2}


def test_discard_reports_the_version_its_own_commit_unlabelled(
    open_store: Callable[..., EncryptedStore], encrypted_store: EncryptedStore
) -> None:
    """B discards version 2 and stages version 3 just before A's discard commits: the retried
    discard takes the label from version 3 and says so."""
    encrypted_store.put("db/app", b"one")
    a, b = open_store(), open_store()
    a.stage("db/app", b"two")
    _interleave_with_next_commit(
        a, lambda: (b.discard_pending("db/app"), b.stage("db/app", b"three")), after=False
    )
    assert a.discard_pending("db/app") == 3
    assert encrypted_store.describe("db/app").labels == {CURRENT: 1}


def test_a_second_stage_is_refused_while_a_rotation_is_in_progress(encrypted_store: EncryptedStore) -> None:
    """As AWS's RotateSecret refuses: two rotations at once would each set their own value at the
    target, and the one whose promote loses would leave the target on a value that is not current."""
    encrypted_store.put("db/app", b"one")
    first = encrypted_store.stage("db/app", b"two")
    with pytest.raises(
        ConflictError, match=r"a rotation of 'db/app' is in progress \(version 2 is pending\)"
    ):
        encrypted_store.stage("db/app", b"three")
    assert encrypted_store.describe("db/app").labels == {CURRENT: 1, PENDING: 2}
    assert [v.version for v in encrypted_store.history("db/app")] == [1, 2]
    assert encrypted_store.promote("db/app", first.version) == 1
    assert encrypted_store.stage("db/app", b"three").version == 3  # the rotation is over


def test_of_two_stagers_racing_one_commits_and_the_other_is_refused(
    open_store: Callable[..., EncryptedStore], encrypted_store: EncryptedStore
) -> None:
    """B stages just before A's stage commits: A's commit loses the race, and its retry, on fresh
    metadata, sees B's rotation in progress instead of taking its pending label."""
    encrypted_store.put("db/app", b"one")
    a, b = open_store(), open_store()
    _interleave_with_next_commit(a, lambda: b.stage("db/app", b"B's value"), after=False)
    with pytest.raises(ConflictError, match="in progress"):
        a.stage("db/app", b"A's value")
    assert encrypted_store.describe("db/app").labels == {CURRENT: 1, PENDING: 2}
    assert encrypted_store.get("db/app", label=PENDING).value.reveal() == b"B's value"
    assert [v.version for v in encrypted_store.history("db/app")] == [1, 2]


def test_stage_needs_an_existing_secret(encrypted_store: EncryptedStore) -> None:
    with pytest.raises(NotFoundError):
        encrypted_store.stage("db/missing", b"x")


def test_a_pending_version_is_never_pruned(encrypted_store: EncryptedStore) -> None:
    encrypted_store.put("db/app", b"v1")
    staged = encrypted_store.stage("db/app", b"pending")
    for n in range(15):
        encrypted_store.put("db/app", f"later {n}".encode())
    assert encrypted_store.get("db/app", label=PENDING).version == staged.version


def test_rotation_goes_through_the_change_feed_without_values(encrypted_store: EncryptedStore) -> None:
    encrypted_store.put("db/app", b"one")
    _, revision = encrypted_store.changes_since(None)
    encrypted_store.stage("db/app", b"SECRET-STAGED")
    staged, revision = encrypted_store.changes_since(revision)
    assert [(c.kind, c.name, c.version) for c in staged] == [(ChangeKind.VERSION_ADDED, "db/app", 2)]
    encrypted_store.promote("db/app", 2)
    promoted, revision = encrypted_store.changes_since(revision)
    assert [(c.kind, c.name) for c in promoted] == [(ChangeKind.METADATA_CHANGED, "db/app")]
    encrypted_store.stage("db/app", b"x")
    encrypted_store.changes_since(revision)
    encrypted_store.discard_pending("db/app")
    discarded, _ = encrypted_store.changes_since(revision)
    assert ChangeKind.METADATA_CHANGED in [c.kind for c in discarded]
    assert "SECRET-STAGED" not in repr(staged + promoted + discarded)


def test_the_vault_store_refuses_rotation_cleanly() -> None:
    vault = FakeVault().start()
    try:

        def make() -> VaultStore:
            environ = {"VAULT_TOKEN": vault.root_token}
            client = connect_vault(vault.address, environ=environ, session=retrying_session(attempts=3))
            return VaultStore(client, "secret", actor="tester")

        run_check(make, "pending-rotation")
        store = make()
        store.put("db/app", b"one")
        for action in (
            lambda: store.stage("db/app", b"two"),
            lambda: store.promote("db/app", 1),
            lambda: store.discard_pending("db/app"),
        ):
            with pytest.raises(UnsupportedOperationError, match="not supported by this store"):
                action()
        store.close()
    finally:
        vault.stop()


def test_the_aws_store_rotates_with_its_staging_labels(moto_endpoint: str) -> None:
    def make() -> AwsStore:
        client = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("secretsmanager", endpoint_url=moto_endpoint, config=Config(retries={"max_attempts": 2}))
        return AwsStore(client, f"rotate-{os.getpid()}", actor="tester")

    run_check(make, "pending-rotation")
    store = make()
    store.put("db/app", b"one")
    staged = store.stage("db/app", b"two")
    with pytest.raises(ConflictError, match="--set-command/--test-command of the rotation that started it"):
        store.stage("db/app", b"three")
    raw = store._client.describe_secret(SecretId=store.aws_name("db/app"))["VersionIdsToStages"]
    assert ["AWSPENDING"] in raw.values()
    store.promote("db/app", staged.version)
    assert store.get("db/app").value.reveal() == b"two"
    assert store.get("db/app", label=PREVIOUS).value.reveal() == b"one"
    store.close()


# ---- the command line ----------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.store = home / "store.db"
        self.audit = home / "audit.jsonl"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "SECRETS_MANAGER_STORE": str(self.store),
            "SECRETS_MANAGER_AUDIT_FILE": str(self.audit),
            "MASTER_PASSWORD": PASSWORD,
        }

    def __call__(self, *args: str, input: bytes = b"", env: Mapping[str, str] | None = None) -> Result:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            input=input,
            capture_output=True,
            env={**self.env, **(env or {})},
            start_new_session=True,
            timeout=60,
        )
        stderr = proc.stderr.decode("utf-8", errors="replace")
        assert "Traceback" not in stderr, stderr
        return Result(proc.returncode, proc.stdout.decode("utf-8"), stderr)

    def value(self, *args: str) -> str:
        result = self("get", "db/app", *args)
        assert result.code == 0, result.stderr
        return result.stdout.rstrip("\n")

    def labels(self) -> dict[str, int]:
        history = self("history", "db/app", "--json")
        assert history.code == 0, history.stderr
        labels: dict[str, int] = json.loads(history.stdout)["labels"]
        return labels


@pytest.fixture
def cli(tmp_path: Path, made_once: MadeOnce) -> Cli:
    """A store holding db/app, made by the CLI (once per worker, then copied)."""

    def make(home: Path) -> None:
        cli = Cli(home)
        assert cli("init", "--kdf-profile", "test").code == 0
        assert cli("store", "db/app", input=OLD_VALUE.encode()).code == 0

    made_once("test_rotate cli", make, tmp_path)
    return Cli(tmp_path)


def test_get_json_shows_what_a_pending_version_was_staged_for(cli: Cli) -> None:
    """A pending version records its rotation's target (the PostgreSQL role a resume sets it at),
    and nothing showed it: `get --json` has it as `target`, null where none was recorded."""
    from secrets_manager.crypto import kdf
    from secrets_manager.storage.sqlite import SqliteStorage
    from secrets_manager.store import PasswordUnlock

    store = EncryptedStore.open(SqliteStorage(cli.store), PasswordUnlock(PASSWORD, kdf.TEST))
    try:
        store.stage("db/app", b"staged-SEEKRIT", target="postgres-role:app")
    finally:
        store.close()
    pending = cli("get", "db/app", "--label", "pending", "--json")
    assert pending.code == 0, pending.stderr
    assert json.loads(pending.stdout)["target"] == "postgres-role:app"
    current = cli("get", "db/app", "--json")
    assert current.code == 0 and json.loads(current.stdout)["target"] is None


def test_rotate_generates_and_promotes(cli: Cli) -> None:
    result = cli("rotate", "db/app", "--length", "20", "--alphabet", "hex")
    assert result.code == 0, result.stderr
    assert "rotated db/app: version 2 is current (previous: 1)" in result.stderr
    assert result.stdout == ""
    new = cli.value()
    assert len(new) == 20 and set(new) <= set("0123456789abcdef")
    assert cli.value("--label", "previous") == OLD_VALUE
    assert cli.labels() == {"current": 2, "previous": 1}
    assert cli("get", "db/app", "--label", "pending").code == 3


@pytest.mark.parametrize("timeout", ["nan", "NaN", "inf", "-inf", "0", "-1", "3601", "1e400", "soon"])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused_before_anything_changes(
    cli: Cli, timeout: str
) -> None:
    """`--timeout nan` staged a version and then failed with internal error (ValueError), leaving it
    pending (the next rotate exited 7); without --set-command it was accepted silently."""
    history = cli("history", "db/app", "--json").stdout
    for commands in ([], ["--set-command", "true"]):
        result = cli("rotate", "db/app", "--timeout", timeout, *commands)
        assert result.code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("secrets-manager: error: "), result.stderr
        assert "--timeout" in lines[0] and "seconds above 0" in lines[0]
        assert cli("history", "db/app", "--json").stdout == history
    assert cli("rotate", "db/app", "--timeout", "30").code == 0


def test_rotate_default_value_is_32_alphanumerics_and_json_output(cli: Cli) -> None:
    result = cli("rotate", "db/app", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "name": "db/app",
        "version": 2,
        "previous": 1,
        "resumed": False,
        "promoted_elsewhere": False,
        "expires": None,
    }
    new = cli.value()
    assert len(new) == 32 and set(new) <= set(string.ascii_letters + string.digits)


def test_the_commands_get_no_credential_that_unlocks_a_store(cli: Cli, tmp_path: Path) -> None:
    """A Vault store's token or AppRole login opens every namespace in it, as the master password
    opens ours: a set or test command gets neither (as `run` and `edit` withhold them). What the
    target's administrator may need (PGPASSWORD) and the store's address stay."""
    set_command, set_seen = recorder(tmp_path, "set")
    test_command, test_seen = recorder(tmp_path, "test")
    credentials = {
        "VAULT_TOKEN": "hvs.vault-token-MARKER",
        "VAULT_ROLE_ID": "role-id-MARKER",
        "VAULT_SECRET_ID": "secret-id-MARKER",
    }
    result = cli(
        "rotate",
        "db/app",
        "--set-command",
        set_command,
        "--test-command",
        test_command,
        env={**credentials, "PGPASSWORD": "the-target-admins"},
    )
    assert result.code == 0, result.stderr
    for seen in (set_seen(), test_seen()):
        assert not any("MARKER" in value for value in seen["env"].values()), seen["env"]
        assert not {"VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "MASTER_PASSWORD"} & set(seen["env"])
        assert seen["env"]["PGPASSWORD"] == "the-target-admins"
        assert seen["env"]["SECRETS_MANAGER_STORE"] == str(cli.store)


def test_rotate_from_stdin(cli: Cli) -> None:
    result = cli("rotate", "db/app", "--stdin", input=b"chosen-new-value\n")
    assert result.code == 0, result.stderr
    assert cli.value() == "chosen-new-value"


def test_the_set_command_gets_the_value_on_stdin_only(cli: Cli, tmp_path: Path) -> None:
    set_command, set_seen = recorder(tmp_path, "set")
    test_command, test_seen = recorder(tmp_path, "test")
    result = cli("rotate", "db/app", "--set-command", set_command, "--test-command", test_command)
    assert result.code == 0, result.stderr
    new = cli.value()
    for seen in (set_seen(), test_seen()):
        assert seen["stdin"] == new
        assert seen["argv"][1:] == ["--flag"] and not any(new in arg for arg in seen["argv"])
        assert not any(new in value for value in seen["env"].values())
        assert seen["env"]["SECRETS_MANAGER_ROTATE_NAME"] == "db/app"
        assert seen["env"]["SECRETS_MANAGER_ROTATE_VERSION"] == "2"
        assert "MASTER_PASSWORD" not in seen["env"]
    assert "set command says hello" in result.stderr and "test command says hello" in result.stderr
    assert new not in result.stdout and new not in result.stderr
    audit = cli.audit.read_text()
    assert new not in audit and OLD_VALUE not in audit
    records = [json.loads(line) for line in audit.splitlines()]
    done = [r["operation"] for r in records if r["operation"].startswith("rotate.") and r["outcome"] == "ok"]
    # rotate.read: the current value, read to see it is no JSON object a generated value would replace
    assert done == ["rotate.read", "rotate.stage", "rotate.set", "rotate.test", "rotate.promote"]
    started = [r["operation"] for r in records if r["outcome"] == "pending"]
    assert "rotate.set" in started  # durably before the command ran: a kill leaves it on record


def test_a_failing_test_command_leaves_current_and_can_be_resumed(cli: Cli, tmp_path: Path) -> None:
    failing, _ = recorder(tmp_path, "failing", exit_code=5)
    result = cli("rotate", "db/app", "--test-command", failing)
    assert result.code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "test command failed (exit code 5)" in error
    assert "secrets-manager rotate db/app --resume" in error and "--discard" in error
    assert cli.value() == OLD_VALUE
    assert cli.labels() == {"current": 1, "pending": 2}
    staged = cli.value("--label", "pending")
    assert staged not in result.stderr and staged not in result.stdout
    records = [json.loads(line) for line in cli.audit.read_text().splitlines()]
    failed = [r for r in records if r["operation"] == "rotate.test"]
    assert [(r["outcome"], r["version"]) for r in failed] == [("rotation_step_failed", 2)]

    passing, seen = recorder(tmp_path, "passing")
    result = cli("rotate", "db/app", "--resume", "--test-command", passing)
    assert result.code == 0, result.stderr
    assert seen()["stdin"] == staged
    assert cli.value() == staged and cli.labels() == {"current": 2, "previous": 1}


def test_a_resume_never_undoes_a_write_made_after_the_rotation_staged(cli: Cli, tmp_path: Path) -> None:
    """Someone stores a new value while a failed rotation's version is pending: resuming must not
    set the stale pending value at the target and then demote the newer one."""
    failing, _ = recorder(tmp_path, "failing", exit_code=5)
    assert cli("rotate", "db/app", "--test-command", failing).code == 1
    assert cli.labels() == {"current": 1, "pending": 2}
    assert cli("store", "db/app", input=b"written-by-a-person").code == 0
    assert cli.labels() == {"current": 3, "previous": 1, "pending": 2}
    setter, _ = recorder(tmp_path, "setter")
    result = cli("rotate", "db/app", "--resume", "--set-command", setter)
    assert result.code == 7, result.stderr
    assert "version 3 of 'db/app' was written after the rotation staged version 2" in result.stderr
    assert "--discard" in result.stderr
    assert not (tmp_path / "setter.json").exists()  # the target was never touched
    assert cli.value() == "written-by-a-person"
    assert cli.labels() == {"current": 3, "previous": 1, "pending": 2}
    assert cli("rotate", "db/app", "--discard").code == 0
    assert cli("rotate", "db/app").code == 0 and cli.labels() == {"current": 4, "previous": 3}


def test_a_set_command_that_cannot_start_or_times_out_fails_cleanly(cli: Cli, tmp_path: Path) -> None:
    result = cli("rotate", "db/app", "--set-command", str(tmp_path / "no-such-command"))
    assert result.code == 1 and "set command failed (could not start" in result.stderr
    slow = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(30)'"
    result = cli("rotate", "db/app", "--resume", "--set-command", slow, "--timeout", "0.5")
    assert result.code == 1 and "set command failed (timed out after 0.5 s)" in result.stderr
    assert cli.value() == OLD_VALUE and cli.labels() == {"current": 1, "pending": 2}


def test_discard_clears_pending(cli: Cli) -> None:
    assert cli("rotate", "db/app", "--test-command", "false").code == 1
    result = cli("rotate", "db/app", "--discard")
    assert result.code == 0, result.stderr
    assert cli.labels() == {"current": 1}
    assert cli("get", "db/app", "--label", "pending").code == 3
    assert cli("rotate", "db/app", "--discard").code == 3
    assert cli("rotate", "db/app", "--resume", "--promote-only").code == 3


def _target_commands(target: Path) -> tuple[str, str]:
    """A set command that writes the new value to `target` (the database, say) and a test
    command that checks `target` holds it."""
    return (
        f"sh -c {shlex.quote(f'cat > {shlex.quote(str(target))}')}",
        f"sh -c {shlex.quote(f'cmp -s - {shlex.quote(str(target))}')}",
    )


@pytest.mark.parametrize("failing", ["set", "test"])
def test_a_resume_without_its_commands_is_refused_and_promotes_nothing(
    cli: Cli, tmp_path: Path, failing: str
) -> None:
    """'rotate NAME --resume' alone used to promote the pending value without running any command:
    the store then served a value the target never got (a failed set), or one its test had just
    refused, and every reader of the credential broke. It is refused once the pending version is
    read (a resume naming no target rotates the PostgreSQL role a version records; one staged by
    set and test commands records none): only that read is audited, nothing changes."""
    target = tmp_path / "target"
    target.write_text(OLD_VALUE)
    set_command, test_command = _target_commands(target)
    if failing == "set":
        set_command = "false"
    else:
        test_command = "false"
    assert cli("rotate", "db/app", "--set-command", set_command, "--test-command", test_command).code == 1
    assert cli.labels() == {"current": 1, "pending": 2}
    records_before = cli.audit.read_text()

    refused = cli("rotate", "db/app", "--resume")
    assert refused.code == 2, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert (
        "--resume without --set-command would promote a value nothing has set at the target; give the "
        "rotation's --set-command/--test-command (or --postgres-role), or --promote-only if the target "
        "already holds the pending value (set by hand)"
    ) in refused.stderr
    added = cli.audit.read_text()[len(records_before) :].splitlines()
    assert records_before and cli.audit.read_text().startswith(records_before)
    assert {json.loads(line)["operation"] for line in added} <= {"unlock", "rotate.resume"}  # a read
    assert cli.value() == OLD_VALUE and cli.labels() == {"current": 1, "pending": 2}

    set_command, test_command = _target_commands(target)
    result = cli("rotate", "db/app", "--resume", "--set-command", set_command, "--test-command", test_command)
    assert result.code == 0, result.stderr
    assert cli.value() == target.read_text() != OLD_VALUE and cli.labels() == {"current": 2, "previous": 1}


@pytest.mark.parametrize("failing", ["set", "test"])
def test_a_failure_shows_the_same_command_with_resume_and_that_command_finishes_the_rotation(
    cli: Cli, tmp_path: Path, failing: str
) -> None:
    """The advice used to be 'rotate NAME --resume', which promoted the pending value without
    setting it at the target. It is now the command that was run, its set and test commands (and
    --timeout) included, with --resume: run as shown, it sets, tests and promotes."""
    target, broken = tmp_path / "the target", tmp_path / "broken"
    set_command, test_command = _target_commands(target)
    unless_broken = f"test ! -e {shlex.quote(str(broken))} && "
    if failing == "set":
        set_command = f"sh -c {shlex.quote(unless_broken + f'cat > {shlex.quote(str(target))}')}"
    else:
        test_command = f"sh -c {shlex.quote(unless_broken + f'cmp -s - {shlex.quote(str(target))}')}"
    broken.touch()
    args = ("--set-command", set_command, "--test-command", test_command, "--timeout", "30")
    result = cli("rotate", "db/app", *args)
    assert result.code == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert f"the {failing} command failed (exit code 1); version 2 stays pending" in error
    shown = error.partition("run the same command again with --resume: ")[2].partition(" (or discard it: ")
    assert shown[2] == "secrets-manager rotate db/app --discard)", error
    assert shlex.split(shown[0]) == ["secrets-manager", "rotate", "db/app", "--resume", *args], error
    staged = cli.value("--label", "pending")
    assert staged not in result.stderr + result.stdout

    broken.unlink()
    finished = cli(*shlex.split(shown[0])[1:])
    assert finished.code == 0, finished.stderr
    assert "resumed and rotated db/app: version 2 is current (previous: 1)" in finished.stderr
    assert cli.value() == staged == target.read_text() and cli.labels() == {"current": 2, "previous": 1}


def test_the_suggested_commands_keep_the_global_options_given_on_the_command_line(
    cli: Cli, tmp_path: Path
) -> None:
    """With the store given as --store (not the environment, which a pasted command inherits), the
    suggested --resume and --discard named no store: pasted, they acted on the default store,
    whose own pending version was then set at this rotation's target."""
    other = tmp_path / "team store.db"
    options = ("--store", str(other), "--audit-file", str(tmp_path / "team.audit.jsonl"))
    assert cli(*options, "init", "--kdf-profile", "test").code == 0
    assert cli(*options, "store", "db/app", input=b"team-old").code == 0
    result = cli(*options, "rotate", "db/app", "--set-command", "false", "--timeout", "12.345678")
    assert result.code == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    suggested = error.partition("run the same command again with --resume: ")[2]
    shown, _, discard = suggested.partition(" (or discard it: ")
    assert shlex.split(shown) == [
        *("secrets-manager", *options, "rotate", "db/app", "--resume"),
        *("--set-command", "false", "--timeout", "12.345678"),
    ], error
    discard_argv = shlex.split(discard.removesuffix(")"))
    assert discard_argv == ["secrets-manager", *options, "rotate", "db/app", "--discard"], error
    assert cli(*discard_argv[1:]).code == 0
    assert "pending" not in cli(*options, "history", "db/app").stdout


def test_the_suggested_resume_reproduces_arguments_that_are_not_utf_8(cli: Cli, tmp_path: Path) -> None:
    """A store path and a set command with bytes that are not UTF-8 (a directory named in Latin-1)
    were shown as Python's surrogates ('caf\\udce9'): the command pasted named another file and
    ran another command. They are now in bash's $'...' form, which gives back the same bytes."""
    place = tmp_path / "caf\udce9"  # the byte 0xE9, as a Latin-1 name holds it
    place.mkdir()
    store, target, broken = place / "store.db", place / "target", place / "broken"
    options = ("--store", str(store), "--audit-file", str(place / "audit.jsonl"))
    assert cli(*options, "init", "--kdf-profile", "test").code == 0
    assert cli(*options, "store", "db/app", input=b"old").code == 0
    script = place / "set\udcff"
    line = f"#!/bin/sh\ntest ! -e {shlex.quote(str(broken))} && cat > {shlex.quote(str(target))}\n"
    script.write_bytes(os.fsencode(line))
    script.chmod(0o755)
    broken.touch()
    result = cli(*options, "rotate", "db/app", "--set-command", shlex.join([str(script)]))
    assert result.code == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "\\udc" not in error and "\ufffd" not in error, error
    shown, _, discard = error.partition("run the same command again with --resume: ")[2].partition(
        " (or discard it: "
    )
    assert "$'" in shown and "\\xe9" in shown, error
    broken.unlink()
    pasted = subprocess.run(
        ["bash", "-c", shown],
        capture_output=True,
        env={
            **cli.env,
            "PATH": f"{SCRIPT.parent}:{cli.env['PATH']}",
            "SECRETS_MANAGER_STORE": str(tmp_path / "none.db"),
        },
        timeout=60,
    )
    assert pasted.returncode == 0, pasted.stderr
    got = cli(*options, "get", "db/app")
    assert got.code == 0 and got.stdout.rstrip("\n") == target.read_text() != "old"
    assert discard.removesuffix(")").startswith("secrets-manager --store $'"), error


def test_resume_promote_only_promotes_a_value_set_by_hand_without_running_anything(
    cli: Cli, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    assert cli("rotate", "db/app", "--set-command", "false").code == 1
    for wrong, message in (
        (("--promote-only",), "--promote-only goes with --resume"),
        (("--resume", "--promote-only", "--set-command", "true"), "--promote-only runs no command"),
        (("--resume", "--promote-only", "--test-command", "true"), "--promote-only runs no command"),
        # --postgres alone goes with a bare --resume (refused once read, naming the role the version
        # records): with
        # --promote-only the refusal named only options not given (fails on the old code)
        (("--resume", "--promote-only", "--postgres", "host=db"), "--postgres-role, --postgres)"),
    ):
        result = cli("rotate", "db/app", *wrong)
        assert result.code == 2 and message in result.stderr, result.stderr
    assert cli.labels() == {"current": 1, "pending": 2}

    target.write_text(cli.value("--label", "pending"))  # the operator sets it by hand
    result = cli("rotate", "db/app", "--resume", "--promote-only", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["resumed"] is True
    assert cli.value() == target.read_text() and cli.labels() == {"current": 2, "previous": 1}
    records = [json.loads(line) for line in cli.audit.read_text().splitlines()]
    resumed_at = max(i for i, r in enumerate(records) if r["operation"] == "rotate.resume")
    steps = [r for r in records[resumed_at:] if r["operation"].startswith("rotate.")]
    assert [r["operation"] for r in steps if r["outcome"] == "ok"] == [
        "rotate.resume",
        "rotate.check",
        "rotate.promote",
    ]


def _nested_rotate(arguments: str) -> str:
    """A shell command line for a `--test-command` that runs `secrets-manager rotate ARGUMENTS`
    while the outer rotation is between its set and promote steps (the password variables are
    withheld from our commands: it brings its own)."""
    return f"MASTER_PASSWORD={shlex.quote(PASSWORD)} {shlex.quote(str(SCRIPT))} rotate {arguments}"


def test_a_rotation_started_while_another_is_in_progress_exits_7_and_runs_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    """The second rotation is refused before it stages or runs its set command, and the first
    one finishes: two rotations at once would each have set their own value at the target."""
    marker, inner_exit = tmp_path / "inner-set-ran", tmp_path / "inner-exit"
    inner = _nested_rotate(f"db/app --set-command {shlex.quote(f'touch {marker}')}")
    script = f"cat >/dev/null; {inner} 2>{tmp_path / 'inner-stderr'}; echo $? >{inner_exit}"
    result = cli("rotate", "db/app", "--test-command", f"sh -c {shlex.quote(script)}")
    assert result.code == 0, result.stderr
    assert inner_exit.read_text().strip() == "7"
    inner_stderr = (tmp_path / "inner-stderr").read_text()
    assert inner_stderr.count("\n") == 1 and "a rotation of 'db/app' is in progress" in inner_stderr
    # Not a bare --resume, which would promote a value nothing has set at the target.
    assert (
        "finish it by running 'secrets-manager rotate db/app --resume' with the "
        "--set-command/--test-command of the rotation that started it (or its --postgres-role and "
        "--postgres; a schedule resumes its own), "
        "or drop it with 'secrets-manager rotate db/app --discard'"
    ) in inner_stderr
    assert not marker.exists()
    assert cli.labels() == {"current": 2, "previous": 1}
    assert [v["version"] for v in json.loads(cli("history", "db/app", "--json").stdout)["versions"]] == [1, 2]


def test_promoting_a_version_no_longer_pending_exits_7(cli: Cli, tmp_path: Path) -> None:
    """Someone discards our pending version and stages another while our test command runs: our
    promote must refuse."""
    restage = f"{_nested_rotate('db/app --discard')}; {_nested_rotate('db/app --test-command false')}"
    sneaky = f"sh -c {shlex.quote('cat >/dev/null; ' + restage + '; exit 0')}"
    result = cli("rotate", "db/app", "--test-command", sneaky)
    assert result.code == 7, result.stderr
    assert "not pending" in result.stderr
    assert cli.value() == OLD_VALUE and cli.labels() == {"current": 1, "pending": 3}


def test_a_rotation_someone_else_resumed_and_promoted_first_is_done_not_a_conflict(
    cli: Cli, tmp_path: Path
) -> None:
    """While our test command runs, another runner (here: `rotate --resume`, as the schedule does
    when a person's commands run long) resumes our pending version and promotes it. The value is
    ours, so our refused promote is the rotation done: exit 0, said so, not exit 7."""
    other = _nested_rotate("db/app --resume --promote-only")  # its commands would be ours: done
    resume = f"sh -c {shlex.quote('cat >/dev/null; ' + other + ' 2>/dev/null')}"
    result = cli("rotate", "db/app", "--test-command", resume, "--json")
    assert result.code == 0, result.stderr
    assert "rotated db/app: version 2 is current (another runner that resumed it promoted it first)" in (
        result.stderr
    )
    assert json.loads(result.stdout)["promoted_elsewhere"] is True
    assert cli.labels() == {"current": 2, "previous": 1}
    checks = [
        r for r in map(json.loads, cli.audit.read_text().splitlines()) if r["operation"] == "rotate.check"
    ]
    # The resuming runner reads current (1) before its commands run; ours after its refused promote (2).
    assert [(r["outcome"], r["version"]) for r in checks] == [("ok", 1), ("ok", 2)]


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_command_that_times_out_is_ended_with_everything_it_started(cli: Cli, tmp_path: Path) -> None:
    """A `sh -c` whose child is still busy when the timeout comes: the child must not go on (and,
    say, set a value at the target after the step was reported failed)."""
    pidfile = tmp_path / "grandchild.pid"
    script = f"cat >/dev/null; sleep 60 & echo $! > {shlex.quote(str(pidfile))}; wait"
    result = cli("rotate", "db/app", "--set-command", f"sh -c {shlex.quote(script)}", "--timeout", "1")
    assert result.code == 1 and "timed out after 1 s" in result.stderr
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild)
    assert cli.labels() == {"current": 1, "pending": 2}


def test_rotate_refuses_bad_option_combinations_and_a_server_without_certificates(cli: Cli) -> None:
    assert cli("rotate", "db/app", "--stdin", "--generate").code == 2
    assert cli("rotate", "db/app", "--resume", "--stdin").code == 2
    assert cli("rotate", "db/app", "--discard", "--resume").code == 2
    assert cli("rotate", "db/app", "--set-command", "").code == 2
    assert cli("rotate", "db/missing").code == 3
    # Rotation works through the service (tests/test_rotate_service.py); it needs a client certificate.
    result = cli("--server", "localhost:1", "rotate", "db/app")
    assert result.code == 2 and "needs a client certificate" in result.stderr
    assert cli.labels() == {"current": 1}


def test_rotate_help_explains_the_steps(cli: Cli) -> None:
    result = cli("rotate", "--help")
    assert result.code == 0
    for words in ("--set-command", "--test-command", "--resume", "--discard", "stdin", "pending"):
        assert words in result.stdout


# ---- one field of a JSON object (database credentials as AWS keeps them) ----------------------------

CREDENTIALS = {"engine": "postgres", "host": "db.internal", "password": OLD_VALUE, "username": "app"}


def test_a_generated_value_never_replaces_a_json_object_whole(cli: Cli) -> None:
    assert cli("store", "db/json", input=json.dumps(CREDENTIALS).encode()).code == 0
    result = cli("rotate", "db/json")
    assert result.code == 2, result.stderr
    assert "db/json holds a JSON object (fields engine, host, password, username)" in result.stderr
    assert "rotate db/json#FIELD" in result.stderr and OLD_VALUE not in result.stderr
    history = json.loads(cli("history", "db/json", "--json").stdout)
    assert history["labels"] == {"current": 1}  # nothing staged
    whole = {**CREDENTIALS, "password": "given-whole"}
    assert cli("rotate", "db/json", "--stdin", input=json.dumps(whole).encode()).code == 0  # on purpose
    assert json.loads(cli("get", "db/json").stdout) == whole


def test_rotating_one_field_keeps_the_others_and_the_commands_get_the_whole_object(
    cli: Cli, tmp_path: Path
) -> None:
    assert cli("store", "db/json", input=json.dumps(CREDENTIALS).encode()).code == 0
    setter, seen = recorder(tmp_path, "setter")
    result = cli("rotate", "db/json#password", "--set-command", setter, "--length", "40")
    assert result.code == 0, result.stderr
    rotated = json.loads(cli("get", "db/json").stdout)
    assert {k: v for k, v in rotated.items() if k != "password"} == {
        k: v for k, v in CREDENTIALS.items() if k != "password"
    }
    assert len(rotated["password"]) == 40 and rotated["password"] != OLD_VALUE
    assert json.loads(seen()["stdin"]) == rotated  # the set command sees the whole new object
    assert json.loads(cli("get", "db/json", "--label", "previous").stdout) == CREDENTIALS
    assert cli("rotate", "db/json#password", "--stdin", input=b"typed-new-password").code == 0
    assert cli("get", "db/json#password").stdout == "typed-new-password\n"


def test_json_objects_too_deep_or_with_huge_numbers_are_still_never_replaced_whole(cli: Cli) -> None:
    deep = b'{"password": "old", "n": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    huge = b'{"password": "old", "n": ' + b"9" * 5000 + b"}"
    for value in (deep, huge):
        assert cli("store", "db/odd", "--file", "/dev/stdin", input=value).code == 0
        whole = cli("rotate", "db/odd")
        assert whole.code == 2 and "holds a JSON object" in whole.stderr, whole.stderr
        field = cli("rotate", "db/odd#password")
        if value is deep:
            assert field.code == 2 and "cannot be rewritten exactly" in field.stderr, field.stderr
            assert cli("get", "db/odd", "--raw").stdout == value.decode()
        else:  # its numbers are kept as written, however long: the field is rotated, the rest exact
            assert field.code == 0, field.stderr
            new = json.loads(cli("get", "db/odd").stdout, parse_int=str)["password"]
            kept = '{"password": "' + new + '", "n": ' + "9" * 5000 + "}"
            assert cli("get", "db/odd", "--raw").stdout == kept
        assert cli("destroy", "db/odd", "--all").code == 0


def test_a_field_rewrite_keeps_the_other_fields_numbers_as_written(cli: Cli) -> None:
    """store/rotate/edit NAME#FIELD read the object with json.loads and wrote it back with
    json.dumps: 1.50 became 1.5, 1E2 100.0, and 1e400 Infinity, which is no JSON (a strict reader,
    an AWS rotation function's, refuses the whole secret). The other fields are kept as written."""
    numbers = '"port": 5432, "ratio": 1.50, "scale": 1E2, "big": 1e400, "tiny": 0.10000000000000000555'
    stored = '{"password": "old", ' + numbers + ', "list": [-0.0, 2.5e-3], "n": NaN}'
    assert cli("store", "db/json", "--file", "/dev/stdin", input=stored.encode()).code == 0
    assert cli("store", "db/json#password", input=b"stored-new").code == 0
    assert cli("rotate", "db/json#password", "--stdin", input=b"rotated-new").code == 0
    expected = stored.replace('"old"', '"rotated-new"')
    assert cli("get", "db/json", "--raw").stdout == expected
    assert cli("get", "db/json", "--label", "previous", "--raw").stdout == stored.replace(
        '"old"', '"stored-new"'
    )
    refused = cli("store", "db/json#ratio", input=b"2")  # a number is no text field, as before
    assert refused.code == 2 and "no text field 'ratio'" in refused.stderr, refused.stderr


def test_a_field_rotation_keeps_a_byte_order_mark_and_the_whitespace_around_the_object(cli: Cli) -> None:
    # A value saved by a Windows editor: a UTF-8 BOM before the object, a final newline after it.
    stored = codecs.BOM_UTF8 + json.dumps(CREDENTIALS).encode() + b"\r\n"
    assert cli("store", "db/json", "--file", "/dev/stdin", input=stored).code == 0
    result = cli("rotate", "db/json#password", "--stdin", input=b"new-password")
    assert result.code == 0, result.stderr
    raw = cli("get", "db/json", "--raw").stdout.encode()
    assert raw.startswith(codecs.BOM_UTF8) and raw.endswith(b"}\r\n"), raw[:8]
    assert json.loads(raw) == {**CREDENTIALS, "password": "new-password"}
    assert cli("get", "db/json#password").stdout == "new-password\n"
    assert cli("get", "db/json", "--label", "previous", "--raw").stdout.encode() == stored


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32-le", "utf-32"])
def test_a_rewritten_object_keeps_the_encoding_json_read_it_in(encoding: str) -> None:
    stored = (" " + json.dumps(CREDENTIALS, indent=2) + "\n").encode(encoding)
    value = new_value_for(
        "db/json", SecretValue(stored), SecretValue(b"new"), field="password", generated=False
    ).reveal()
    assert value.startswith(" ".encode(encoding))  # the same byte-order mark (or none), the space
    assert value.decode(encoding) == " " + json.dumps({**CREDENTIALS, "password": "new"}) + "\n"


def test_a_field_rotation_keeps_an_escaped_unpaired_surrogate_in_another_field(cli: Cli) -> None:
    stored = b'{"password": "old", "note": "\\ud800 and \\udc00\\ud83d"}'  # valid JSON, not text
    assert cli("store", "db/json", "--file", "/dev/stdin", input=stored).code == 0
    result = cli("rotate", "db/json#password", "--stdin", input=b"new")
    assert result.code == 0, result.stderr
    raw = cli("get", "db/json", "--raw").stdout.encode()
    assert raw == b'{"password": "new", "note": "\\ud800 and \\udc00\\ud83d"}'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("db/json#nope",),
            "has no text field 'nope' (it has 4 fields; 'secrets-manager get db/json' shows them)",
        ),
        (("db/json#",), "give the field after '#'"),
        (("db/app#password",), "the value of db/app is not a JSON object"),
        (("db/json#password", "--resume"), "NAME#FIELD goes with a new value"),
    ],
)
def test_a_field_rotation_that_cannot_be_is_refused_before_anything_is_staged(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    assert cli("store", "db/json", input=json.dumps(CREDENTIALS).encode()).code == 0
    result = cli("rotate", *args)
    assert result.code == 2 and message in result.stderr, result.stderr
    assert OLD_VALUE not in result.stderr
    for name in ("db/app", "db/json"):
        assert "pending" not in json.loads(cli("history", name, "--json").stdout)["labels"]


def _wait_for_audit(cli: Cli, operation: str, name: str, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cli.audit.exists():
            for line in cli.audit.read_text().splitlines():
                record = json.loads(line)
                if record.get("operation") == operation and record.get("name", record.get("secret")) == name:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no {operation} record for {name} in {timeout} s")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace holds the rotation between its steps")
@pytest.mark.parametrize("what", ["field", "generated"])
def test_a_store_between_the_rotations_read_and_its_stage_is_not_undone(
    cli: Cli, tmp_path: Path, what: str
) -> None:
    """field_race.sh: `rotate db/json#password` read version 1, a `store` wrote version 2 (a new
    host), then the rotation staged and promoted version 3 built from version 1: both exited 0 and
    current had the old host again. The stage is now conditional on the version read (exit 7,
    nothing staged, no command run). A generated whole value is read first too (is it a JSON
    object?), and a JSON object stored meanwhile must not be replaced whole either."""
    first = json.dumps(CREDENTIALS) if what == "field" else "plain-old-value"
    assert cli("store", "db/json", input=first.encode()).code == 0
    setter, _ = recorder(tmp_path, "setter")
    target = "db/json#password" if what == "field" else "db/json"
    # strace holds the rotation's second open of the store file (its stage step) for 4 s.
    rotation = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(cli.store), "-e", "trace=openat",
         "-e", "inject=openat:delay_enter=4000000:when=2", str(SCRIPT), "rotate", target,
         "--set-command", setter],
        env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_audit(cli, "rotate.read", "db/json")
        changed = json.dumps({**CREDENTIALS, "host": "db-NEW.example"})
        assert cli("store", "db/json", input=changed.encode()).code == 0
        _, err = rotation.communicate(timeout=60)
    finally:
        if rotation.poll() is None:
            rotation.kill()
            rotation.wait()
    stderr = err.decode()
    assert rotation.returncode == 7, stderr
    assert "'db/json' changed while the rotation read it (version 1; now version 2)" in stderr
    assert "nothing was staged" in stderr and "run the rotation again" in stderr
    assert json.loads(cli("get", "db/json").stdout) == json.loads(changed)
    history = cli("history", "db/json", "--json")
    assert json.loads(history.stdout)["labels"] == {"current": 2, "previous": 1}
    assert not (tmp_path / "setter.json").exists()  # the set command never ran
    # Run again, it rotates the value as it is now.
    assert cli("rotate", "db/json#password", "--set-command", setter).code == 0
    assert json.loads(cli("get", "db/json").stdout)["host"] == "db-NEW.example"


def test_a_step_failing_after_the_set_command_ran_says_the_version_is_pending_and_how_to_finish(
    cli: Cli, tmp_path: Path
) -> None:
    """rotate_vs_passwd.sh: `passwd` ran while the set command did. Each step opens the store with
    the password read at the start, so the test step failed with exit 4 'wrong master password'
    and nothing said that the target now held version 2, that it was pending, or how to finish.
    The error keeps its exit code and now says all three."""
    target = tmp_path / "target"
    target.write_text(OLD_VALUE)
    old_file, new_file = tmp_path / "old-password", tmp_path / "new-password"
    old_file.write_text(PASSWORD)
    new_file.write_text("the NEW master password")
    passwd = shlex.join(
        [str(SCRIPT), "--password-file", str(old_file), "passwd", "--new-password-file", str(new_file)]
    )
    set_command, test_command = _target_commands(target)
    setter = f"sh -c {shlex.quote(f'cat > {shlex.quote(str(target))} && {passwd} >/dev/null 2>&1')}"
    result = cli("rotate", "db/app", "--set-command", setter, "--test-command", test_command)
    assert result.code == 4, result.stderr  # the unlock error's own code
    message = result.stderr
    assert message.count("\n") == 1
    assert "rotating db/app: the set command ran (the target now has version 2's value)" in message
    assert "version 2 stays pending and current is unchanged" in message
    assert "finish it with the current master password by running the same command again with --resume:" in (
        message
    )
    assert "secrets-manager rotate db/app --resume --set-command" in message
    assert "secrets-manager rotate db/app --discard" in message
    new = {"MASTER_PASSWORD": "the NEW master password"}
    assert cli("history", "db/app", "--json", env=new).code == 0
    finished = cli("rotate", "db/app", "--resume", "--set-command", set_command, "--test-command",
                   test_command, env=new)  # fmt: skip
    assert finished.code == 0, finished.stderr
    assert cli("get", "db/app", env=new).stdout.rstrip("\n") == target.read_text() != OLD_VALUE


def test_a_test_command_failing_after_the_set_ran_says_the_set_ran(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "target"
    set_command, _ = _target_commands(target)
    result = cli("rotate", "db/app", "--set-command", set_command, "--test-command", "false")
    assert result.code == 1, result.stderr
    assert "rotating db/app: the set command ran, then the test command failed (exit code 1); version 2 " in (
        result.stderr
    )
    assert "--resume" in result.stderr and "--discard" in result.stderr


def test_a_rotation_whose_version_was_discarded_after_its_set_ran_says_the_target_is_not_current(
    cli: Cli, tmp_path: Path
) -> None:
    """discard_race.sh: rotation A's slow set command runs, someone discards A's version and
    rotation B finishes, then A's set lands at the target. A's exit 7 said only 'version 2 ... is
    not pending; nothing was promoted': not that its set had run, so the target holds version 2's
    value while current is B's version 3, nor what fixes it. It says both now, and the command it
    suggests sets a current value at the target."""
    target = tmp_path / "target"
    target.write_text(OLD_VALUE)
    set_command, _ = _target_commands(target)
    b = _nested_rotate(f"db/app --set-command {shlex.quote(set_command)}")
    discard = _nested_rotate("db/app --discard")
    lands_late = (
        f"cat > {tmp_path / 'A'}; {discard} 2>/dev/null && {b} 2>/dev/null && cp {tmp_path / 'A'} {target}"
    )
    a_set = f"sh -c {shlex.quote(lands_late)}"
    result = cli("rotate", "db/app", "--set-command", a_set)
    assert result.code == 7, result.stderr
    message = result.stderr
    assert "version 2 of 'db/app' is not pending (no version is); nothing was promoted" in message
    assert (
        "but this rotation's set command had already run: the target now holds version 2's value, not "
        "current's (version 3). If no other rotation of db/app is running, rotate it again: "
    ) in message
    assert cli.labels() == {"current": 3, "previous": 1}
    assert target.read_text() != cli.value()
    suggested, _, piped = message.split("rotate it again: ", 1)[1].partition(", or give the set command ")
    assert shlex.split(suggested) == ["secrets-manager", "rotate", "db/app", "--set-command", a_set]
    assert piped.startswith(f"the current value: secrets-manager get db/app | {a_set}")
    # Its own set command plays the discarding rotation here: the plain one rotates again.
    again = cli("rotate", "db/app", "--set-command", set_command)
    assert again.code == 0, again.stderr
    assert target.read_text() == cli.value()


def test_the_loser_of_two_rotations_started_together_is_not_told_to_discard_a_running_one(
    encrypted_store: EncryptedStore,
) -> None:
    """rotate_pair.sh: the rotation whose stage loses is told how to finish or drop 'the rotation in
    progress', which is the winner, still running: a --discard then would break it. It says so."""
    encrypted_store.put("db/app", b"one")
    encrypted_store.stage("db/app", b"winner")
    with pytest.raises(ConflictError) as refused:
        encrypted_store.stage("db/app", b"loser")
    assert "may still be running; if no other rotation of 'db/app' is running, finish it" in str(
        refused.value
    )
    encrypted_store.put("db/app", b"written meanwhile")
    with pytest.raises(ConflictError) as demoting:
        encrypted_store.promote("db/app", 2)
    assert "If no other rotation of 'db/app' is running, drop it with" in str(demoting.value)


@pytest.mark.parametrize(
    ("signum", "name", "code"),
    [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGHUP, "SIGHUP", 129), (signal.SIGINT, "Ctrl-C", 130)],
)
def test_a_signal_during_the_set_command_ends_it_and_says_what_stays_pending(
    cli: Cli, tmp_path: Path, signum: int, name: str, code: int
) -> None:
    """sigterm_orphan.sh: `timeout -s TERM 3 secrets-manager rotate ...` (or systemd stop, a closed
    terminal) ended rotate alone; its set command, in a session of its own, ran on and changed the
    target after rotate had exited. SIGTERM and SIGHUP now end the command's process group as
    Ctrl-C does, and every one of them says what stays pending and how to finish."""
    target, started = tmp_path / "target", tmp_path / "started"
    target.write_text(OLD_VALUE)
    slow_set = f"cat > {tmp_path / 'new'}; touch {started}; sleep 3; cp {tmp_path / 'new'} {target}"
    rotation = subprocess.Popen(
        [str(SCRIPT), "rotate", "db/app", "--set-command", f"sh -c {shlex.quote(slow_set)}"],
        env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        # Ctrl-C's SIGINT as at a terminal: a runner that started the suite as a background job
        # (`… &`) has it ignored, exec passes that on, and Python would leave it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        rotation.send_signal(signum)
        _, err = rotation.communicate(timeout=30)
    finally:
        if rotation.poll() is None:
            rotation.kill()
            rotation.wait()
    stderr = err.decode()
    assert "Traceback" not in stderr, stderr
    assert rotation.returncode == code, stderr
    assert f"rotating db/app: interrupted ({name}) while its set command ran" in stderr
    assert "version 2 stays pending and current is unchanged" in stderr
    assert "secrets-manager rotate db/app --resume --set-command" in stderr
    time.sleep(4)  # the set command would have written the target by now
    assert target.read_text() == OLD_VALUE
    steps = [(r["operation"], r["outcome"]) for r in map(json.loads, cli.audit.read_text().splitlines())]
    assert steps[-1] == ("rotate.set", "error" if signum == signal.SIGINT else "interrupted")
    assert cli.labels() == {"current": 1, "pending": 2}


def test_an_empty_stdin_is_refused_without_naming_an_option_rotate_lacks(cli: Cli) -> None:
    """`true | rotate NAME --stdin` said "nothing was stored. To store an empty value, give
    --allow-empty", store's advice: rotate has no --allow-empty (click then refuses it, exit 2)."""
    history = cli("history", "db/app", "--json").stdout
    result = cli("rotate", "db/app", "--stdin", "--set-command", "true", input=b"")
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secrets-manager: error: the value is empty"), lines
    assert "--allow-empty" not in lines[0] and "nothing was staged" in lines[0]
    assert cli("history", "db/app", "--json").stdout == history


@pytest.mark.parametrize("alphabet", ["alnum", "urlsafe", "printable"])
def test_a_generated_password_holds_every_class_of_its_alphabet(alphabet: str) -> None:
    """As AWS's get-random-password (RequireEachIncludedType): at the shortest length, where a
    plain draw misses a class about a quarter (alnum) to half (printable) of the time."""
    from secrets_manager.rotation import ALPHABETS, REQUIRED_CLASSES, generated_value

    classes = REQUIRED_CLASSES[alphabet]
    assert classes, alphabet
    seen: set[str] = set()
    for _ in range(300):
        value = generated_value(8, alphabet).reveal().decode("ascii")
        assert len(value) == 8 and set(value) <= set(ALPHABETS[alphabet])
        for group in classes:
            assert any(character in group for character in value), (alphabet, group)
        seen.update(value)
    assert seen == set(ALPHABETS[alphabet]), "some characters never came up in 2,400 draws"


def test_store_generate_printable_uses_punctuation(cli: Cli) -> None:
    assert cli("store", "db/ADMIN", "--generate", "--alphabet", "printable", "--length", "64").code == 0
    value = cli("get", "db/ADMIN").stdout.rstrip("\n")
    assert len(value) == 64 and any(character in string.punctuation for character in value)
    assert not any(character.isspace() for character in value)
