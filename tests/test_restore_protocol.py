"""A restore through the `SecretStore` protocol (Vault, AWS) undoes only what it created itself.

A name the restore did not see in its list can still exist when it writes: AWS's ListSecrets
"might not reflect changes from the last five minutes", and on any store another writer may come
in between. The restore's first, create-only write then finds it: that secret is another tool's,
never destroyed by the undo, and --on-existing applies to it. A first write whose answer was lost
is read back: undone only if the name holds exactly the one version we sent.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

from secrets_manager.errors import ConflictError, StorageError, Terminated
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.backup import Backup
from secrets_manager.store.restore import OnExisting, restore_into
from secrets_manager.store.vault import VaultStore
from test_backup import BACKUP_PASSWORD, new_store, take
from test_store_aws import REGION, aws_client
from vault_server import FakeVault

FOREIGN = b"PRODUCTION-VALUE-written-by-terraform"


@pytest.fixture
def backup(tmp_path: Path) -> Backup:
    source = new_store(tmp_path / "source.db")
    try:
        source.put("svc/A", b"from-backup-a")
        source.put("svc/K", b"from-backup-k")
        source.put("svc/Z", b"from-backup-z")
        return take(source, tmp_path / "b.smbackup", password=BACKUP_PASSWORD)
    finally:
        source.close()


# ---- AWS: ListSecrets lags --------------------------------------------------------------------------


@pytest.fixture
def lagging_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's ListSecrets as AWS documents it: a secret created in the last five minutes may be
    missing from the answer (here: always)."""
    from moto.secretsmanager.models import SecretsManagerBackend

    listed = SecretsManagerBackend.list_secrets

    def lagging(self: Any, *args: Any, **kwargs: Any) -> Any:
        page, token = listed(self, *args, **kwargs)
        return [s for s in page if time.time() - s["CreatedDate"] > 300], token

    monkeypatch.setattr(SecretsManagerBackend, "list_secrets", lagging)


@pytest.fixture
def aws(moto_endpoint: str) -> Iterator[tuple[AwsStore, Any, str]]:
    prefix = f"restore-{secrets.token_hex(4)}"
    native = aws_client(moto_endpoint)
    store = AwsStore(aws_client(moto_endpoint), prefix, actor="restorer")
    yield store, native, prefix
    store.close()


def foreign_value(native: Any, secret_id: str) -> bytes | None:
    try:
        return str(native.get_secret_value(SecretId=secret_id)["SecretString"]).encode()
    except native.exceptions.ResourceNotFoundException:
        return None


@pytest.mark.usefixtures("lagging_list")
def test_a_skip_restore_into_aws_skips_a_secret_its_list_did_not_show(
    aws: tuple[AwsStore, Any, str], backup: Backup
) -> None:
    store, native, prefix = aws
    native.create_secret(Name=f"{prefix}/svc/K", SecretString=FOREIGN.decode())
    result = restore_into(store, backup.secrets, on_existing=OnExisting.SKIP)
    assert result.skipped == ("svc/K",)
    assert foreign_value(native, f"{prefix}/svc/K") == FOREIGN
    assert store.get("svc/A").value.reveal() == b"from-backup-a"
    assert store.get("svc/Z").value.reveal() == b"from-backup-z"


@pytest.mark.usefixtures("lagging_list")
@pytest.mark.parametrize("on_existing", [OnExisting.FAIL, None])
def test_a_refusing_restore_into_aws_undoes_its_own_names_and_leaves_the_other_tools(
    aws: tuple[AwsStore, Any, str], backup: Backup, on_existing: OnExisting | None
) -> None:
    store, native, prefix = aws
    native.create_secret(Name=f"{prefix}/svc/K", SecretString=FOREIGN.decode())
    with pytest.raises(ConflictError, match=r"svc/K appeared in the target store.*left as it is"):
        restore_into(store, backup.secrets, on_existing=on_existing)
    assert foreign_value(native, f"{prefix}/svc/K") == FOREIGN
    assert foreign_value(native, f"{prefix}/svc/A") is None  # written before it, undone
    names = [s["Name"] for s in native.list_secrets(IncludePlannedDeletion=True)["SecretList"]]
    assert f"{prefix}/svc/Z" not in names


@pytest.mark.usefixtures("lagging_list")
def test_an_overwriting_restore_into_aws_copies_a_late_name_aside_and_puts_it_back_on_failure(
    aws: tuple[AwsStore, Any, str], backup: Backup, moto_endpoint: str
) -> None:
    store, native, prefix = aws
    native.create_secret(Name=f"{prefix}/svc/K", SecretString=FOREIGN.decode())
    result = restore_into(store, backup.secrets, on_existing=OnExisting.OVERWRITE)
    assert result.overwritten == ("svc/K",)
    assert store.get("svc/K").value.reveal() == b"from-backup-k"

    class FailsOnZ(AwsStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            if name == "svc/Z":
                raise StorageError("the backend went away")
            return super().put(name, value, **options)

    native.delete_secret(SecretId=f"{prefix}/svc/K", ForceDeleteWithoutRecovery=True)
    native.create_secret(Name=f"{prefix}/svc/K", SecretString=FOREIGN.decode())
    failing = FailsOnZ(aws_client(moto_endpoint), prefix, actor="restorer")
    with pytest.raises(StorageError, match="went away"):
        restore_into(failing, backup.secrets, on_existing=OnExisting.OVERWRITE)
    assert store.get("svc/K").value.reveal() == FOREIGN  # put back from the copy read aside


# ---- another writer during the restore: the undo never destroys its write ------------------------------


def test_the_undo_of_a_failed_restore_into_vault_keeps_what_another_writer_wrote_meanwhile(
    backup: Backup,
) -> None:
    """A restore through the protocol that fails part-way undoes itself by destroying what it
    created (and writing back what it overwrote). A name it had written that another writer wrote
    again before the failure was destroyed with that writer's value, acknowledged to it: the
    rule that concurrent writers are never clobbered broke in the undo. Here another writer stores
    svc/A after the restore wrote it, then the store fails at svc/Z."""
    vault = FakeVault().start()
    client = hvac.Client(url=vault.address, token=vault.root_token)
    other = VaultStore(client, "secret", actor="other-writer")

    class FailsOnZ(VaultStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            if name == "svc/Z":
                other.put("svc/A", b"written-meanwhile")  # acknowledged to its writer
                raise StorageError("the backend went away")
            return super().put(name, value, **options)

    store = FailsOnZ(client, "secret", actor="restorer")
    try:
        with pytest.raises(
            StorageError, match=r"except for svc/A: it holds a version the restore did not write"
        ):
            restore_into(store, backup.secrets)
        assert other.get("svc/A").value.reveal() == b"written-meanwhile"
        assert [meta.name for meta in other.list("", include_deleted=True)] == ["svc/A"]  # svc/K undone
    finally:
        store.close()
        vault.stop()


def test_the_undo_keeps_the_write_that_made_a_restore_into_aws_fail(
    aws: tuple[AwsStore, Any, str], tmp_path: Path, moto_endpoint: str
) -> None:
    """Each version after a name's first is written on condition that the one before is current, so
    another writer landing in between makes the restore fail rather than interleave, and the undo
    then destroyed the name: that writer's value with it."""
    source = new_store(tmp_path / "two.db")
    try:
        source.put("svc/M", b"backup-v1")
        source.put("svc/M", b"backup-v2")
        two_versions = take(source, tmp_path / "two.smbackup", password=BACKUP_PASSWORD)
    finally:
        source.close()
    _, _, prefix = aws
    other = AwsStore(aws_client(moto_endpoint), prefix, actor="other-writer")

    class RacedOnM(AwsStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            if name == "svc/M" and options.get("expect_version") == 1:
                other.put("svc/M", b"written-meanwhile")  # lands between the restore's two writes
            return super().put(name, value, **options)

    store = RacedOnM(aws_client(moto_endpoint), prefix, actor="restorer")
    try:
        with pytest.raises(
            StorageError, match=r"except for svc/M: it holds a version the restore did not write"
        ):
            restore_into(store, two_versions.secrets)
        assert other.get("svc/M").value.reveal() == b"written-meanwhile"
    finally:
        store.close()
        other.close()


@pytest.mark.parametrize("kind", ["vault", "aws"])
def test_an_overwriting_restore_never_destroys_a_version_stored_after_its_copy_aside(
    kind: str, backup: Backup, moto_endpoint: str
) -> None:
    """Every secret to overwrite is copied aside before the first write; svc/K is destroyed only
    when its turn comes. Another writer stores svc/K while the restore writes svc/A: destroying
    svc/K then erased that acknowledged version for good, and when the restore failed later (at
    svc/Z) the undo wrote svc/K back from the older copy. svc/K is checked against its copy just
    before it is destroyed: the restore is refused (exit 7), undone, and svc/K keeps the write."""
    vault = None
    if kind == "vault":
        vault = FakeVault().start()
        client = hvac.Client(url=vault.address, token=vault.root_token)
        other: Any = VaultStore(client, "secret", actor="other-writer")
        base: Any = VaultStore

        def restorer(cls: Any) -> Any:
            return cls(client, "secret", actor="restorer")
    else:
        prefix = f"restore-{secrets.token_hex(4)}"
        other = AwsStore(aws_client(moto_endpoint), prefix, actor="other-writer")
        base = AwsStore

        def restorer(cls: Any) -> Any:
            return cls(aws_client(moto_endpoint), prefix, actor="restorer")

    class RacedThenFails(base):  # type: ignore[misc, valid-type]
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            if name == "svc/A":
                other.put("svc/K", b"written-meanwhile")  # after the copy aside, before K's turn
            if name == "svc/Z":
                raise StorageError("the backend went away")
            return super().put(name, value, **options)

    other.put("svc/K", FOREIGN)
    store = restorer(RacedThenFails)
    try:
        with pytest.raises(
            ConflictError, match=r"svc/K was written by another writer after .*nothing was restored"
        ):
            restore_into(store, backup.secrets, on_existing=OnExisting.OVERWRITE)
        assert other.get("svc/K").value.reveal() == b"written-meanwhile"
        assert [v.version for v in other.describe("svc/K").versions] == [1, 2]
        assert [m.name for m in other.list("", include_deleted=True)] == ["svc/K"]  # svc/A undone
    finally:
        store.close()
        other.close()
        if vault is not None:
            vault.stop()


# ---- a first write whose answer was lost --------------------------------------------------------------


def test_a_lost_answer_whose_write_landed_is_undone(
    aws: tuple[AwsStore, Any, str], backup: Backup, moto_endpoint: str
) -> None:
    _, native, prefix = aws

    class LandsThenTimesOut(AwsStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            answer = super().put(name, value, **options)
            if name == "svc/K":
                raise StorageError("cannot reach AWS Secrets Manager for store svc/K (ReadTimeoutError)")
            return answer

    store = LandsThenTimesOut(aws_client(moto_endpoint), prefix, actor="restorer")
    with pytest.raises(StorageError, match="ReadTimeoutError"):
        restore_into(store, backup.secrets)
    names = [s["Name"] for s in native.list_secrets(IncludePlannedDeletion=True)["SecretList"]]
    assert not [n for n in names if n.startswith(f"{prefix}/svc/")]


@pytest.mark.parametrize(
    ("failure", "said", "exit_code"),
    [
        (
            StorageError("cannot reach AWS Secrets Manager for store svc/K (ReadTimeoutError)"),
            r"svc/K may have been created by it .* left as it is",
            1,
        ),
        (Terminated(signal.SIGTERM), r"^the restore was interrupted \(SIGTERM\) and was undone, except", 143),
    ],
    ids=["lost answer", "interrupted"],
)
def test_a_first_write_in_doubt_is_left_in_place_and_named(
    aws: tuple[AwsStore, Any, str],
    backup: Backup,
    moto_endpoint: str,
    failure: BaseException,
    said: str,
    exit_code: int,
) -> None:
    """The first write of svc/K timed out (or was interrupted) while another tool created the
    name: it may not be ours, so the undo leaves it and the error names it. After an
    interruption the error keeps the interruption's exit code (it was 1)."""
    _, native, prefix = aws

    class AnotherWriterCameFirst(AwsStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            if name == "svc/K":
                native.create_secret(Name=f"{prefix}/svc/K", SecretString=FOREIGN.decode())
                raise failure
            return super().put(name, value, **options)

    store = AnotherWriterCameFirst(aws_client(moto_endpoint), prefix, actor="restorer")
    with pytest.raises(StorageError, match=said) as raised:
        restore_into(store, backup.secrets)
    assert raised.value.exit_code == exit_code
    assert foreign_value(native, f"{prefix}/svc/K") == FOREIGN
    assert foreign_value(native, f"{prefix}/svc/A") is None


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), Terminated(signal.SIGTERM)])
def test_an_interruption_during_a_first_write_that_landed_is_undone(
    aws: tuple[AwsStore, Any, str], backup: Backup, moto_endpoint: str, interruption: KeyboardInterrupt
) -> None:
    """Ctrl-C (or SIGTERM, turned into one by the CLI) while the create-only write of svc/K was in
    flight, after AWS had stored it: the name was never journalled (only `except Exception` read
    it back), so the undo left svc/K holding its oldest value while the restore said it was
    aborted. It is read back and undone as a lost answer is."""
    _, native, prefix = aws

    class LandsThenInterrupted(AwsStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            answer = super().put(name, value, **options)
            if name == "svc/K":
                raise interruption
            return answer

    store = LandsThenInterrupted(aws_client(moto_endpoint), prefix, actor="restorer")
    with pytest.raises(KeyboardInterrupt):
        restore_into(store, backup.secrets)
    names = [s["Name"] for s in native.list_secrets(IncludePlannedDeletion=True)["SecretList"]]
    assert not [n for n in names if n.startswith(f"{prefix}/svc/")]


# ---- Vault: another writer between the restore's LIST and its first write -------------------------------


class RacingVault(FakeVault):
    """After the first LIST of the mount, another tool writes `svc/K` (`vault kv put`)."""

    raced = False

    def handle(
        self, method: str, raw_path: str, token: str | None, body: Any, content_type: str | None = None
    ) -> tuple[int, Any]:
        status, answer = super().handle(method, raw_path, token, body, content_type)
        listing = method == "LIST" or "list=true" in raw_path
        if not self.raced and listing and "/metadata" in raw_path:
            self.raced = True
            super().handle("POST", "/v1/secret/data/svc/K", token, {"data": {"value": FOREIGN.decode()}})
        return status, answer


@pytest.fixture
def racing_vault() -> Iterator[RacingVault]:
    vault = RacingVault().start()
    yield vault
    vault.stop()


@pytest.mark.parametrize("on_existing", [OnExisting.SKIP, OnExisting.FAIL])
def test_a_restore_into_vault_never_destroys_a_name_another_writer_created_meanwhile(
    racing_vault: RacingVault, backup: Backup, on_existing: OnExisting
) -> None:
    client = hvac.Client(url=racing_vault.address, token=racing_vault.root_token)
    store = VaultStore(client, "secret", actor="restorer")
    try:
        if on_existing is OnExisting.SKIP:
            assert restore_into(store, backup.secrets, on_existing=on_existing).skipped == ("svc/K",)
            assert store.get("svc/A").value.reveal() == b"from-backup-a"
        else:
            with pytest.raises(ConflictError, match="svc/K appeared"):
                restore_into(store, backup.secrets, on_existing=on_existing)
            assert "svc/A" not in racing_vault.mounts["secret"]
        assert store.get("svc/K").value.reveal() == FOREIGN
    finally:
        store.close()


def test_overwriting_a_deleted_name_in_vault_is_refused_saying_nothing_was_restored(
    backup: Backup,
) -> None:
    """docs/backup-format.md section 10: a soft-deleted name cannot be copied aside, so the restore
    is refused before its first write. It said what to do but not that nothing was restored; a
    conflict (exit 7), as any write to a deleted secret is."""
    vault = FakeVault().start()
    store = VaultStore(hvac.Client(url=vault.address, token=vault.root_token), "secret", actor="t")
    try:
        store.put("svc/K", FOREIGN)
        store.delete("svc/K")
        with pytest.raises(
            ConflictError, match=r"svc/K is deleted .*; nothing was restored: run 'undelete"
        ) as refused:
            restore_into(store, backup.secrets, on_existing=OnExisting.OVERWRITE)
        assert refused.value.exit_code == 7
        assert [(m.name, m.deleted is not None) for m in store.list("", include_deleted=True)] == [
            ("svc/K", True)
        ]
    finally:
        store.close()
        vault.stop()


# ---- SIGTERM, SIGHUP and Ctrl-C part-way through `secrets-manager restore` ------------------------------

# `restore` whose store's put (VaultStore or AwsStore) stops after its second write until its stdin
# closes: the point where a signal finds one secret restored and another replaced.
HELD_RESTORE = """
import os
import sys
from secrets_manager.cli import main
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.vault import VaultStore

writes = 0
held = False  # the hold is over: what follows is the undo

def holding(original):
    def put(self, *args, **kwargs):
        global writes
        info = original(self, *args, **kwargs)
        writes += 1
        if writes == 2:
            try:  # a signal can come while "wrote" is flushed (and flush it again at exit)
                print("wrote", flush=True)
                sys.stdin.read()
            finally:
                global held
                held = True
        return info
    return put

VaultStore.put = holding(VaultStore.put)
AwsStore.put = holding(AwsStore.put)
if os.environ.get("HOLD") == "check":  # stop while the file is checked, before anything is written
    from secrets_manager.cli import backup_commands
    checking = backup_commands.read_backup

    def read_backup(*args, **kwargs):
        print("wrote", flush=True)
        sys.stdin.read()
        return checking(*args, **kwargs)

    backup_commands.read_backup = read_backup
if os.environ.get("HOLD") == "undo":  # the undo's first step says so and takes a second
    import time

    def slow(original):
        def destroy_secret(self, *args, **kwargs):
            if held:
                print("undoing", flush=True)
                time.sleep(1.0)
            return original(self, *args, **kwargs)
        return destroy_secret

    VaultStore.destroy_secret = slow(VaultStore.destroy_secret)
    AwsStore.destroy_secret = slow(AwsStore.destroy_secret)
sys.exit(main(sys.argv[1:]))
"""


def interrupted_restore(
    url: str, env: dict[str, str], tmp_path: Path, signum: int, *, then: signal.Signals | None = None
) -> tuple[int, str]:
    """`restore b.smbackup --store URL --on-existing overwrite`, sent `signum` once it has restored
    svc/A and replaced svc/K (and `then` once its undo has begun, with HOLD=undo): its exit code
    and stderr."""
    (tmp_path / "backup-password").write_bytes(BACKUP_PASSWORD)
    restore = subprocess.Popen(
        [sys.executable, "-c", HELD_RESTORE, "restore", str(tmp_path / "b.smbackup"), "--store", url,
         "--backup-password-file", str(tmp_path / "backup-password"), "--on-existing", "overwrite"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env},
        # the signals at their defaults, as at a terminal (a suite run in the background ignores SIGINT)
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in SIGNALS],
    )  # fmt: skip
    try:
        assert restore.stdout is not None and restore.stdout.readline() == b"wrote\n"
        restore.send_signal(signum)
        if then is not None:
            assert b"undoing\n" in iter(restore.stdout.readline, b"")  # after a "wrote" flushed twice
            restore.send_signal(then)
        _, err = restore.communicate(timeout=60)
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.wait()
    return restore.returncode, err.decode()


SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
HOW = {signal.SIGTERM: ("SIGTERM", 143), signal.SIGHUP: ("SIGHUP", 129), signal.SIGINT: ("Ctrl-C", 130)}


def assert_undone_and_said(code: int, stderr: str, signum: int, home: Path, *, audited: bool = True) -> None:
    name, exit_code = HOW[signum]
    assert code == exit_code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0] == (
        f"secrets-manager: error: restore interrupted ({name}); nothing was restored: the target "
        "store is as it was"
    )
    if not audited:
        return
    (log,) = home.glob(".local/share/secrets-manager/*.audit.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["operation"], r["outcome"]) for r in records[-2:]] == [
        ("restore", "pending"),
        ("restore", "interrupted"),
    ]


@pytest.mark.parametrize(
    ("signum", "then"),
    [*((signum, None) for signum in SIGNALS), (signal.SIGTERM, signal.SIGINT)],
    ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGINT during the undo"],
)
def test_a_signal_during_a_restore_into_vault_undoes_it(
    backup: Backup, tmp_path: Path, signum: int, then: signal.Signals | None
) -> None:
    """SIGTERM and SIGHUP (timeout, systemd stop, a closed terminal) ended the restore at once: no
    undo, no message, exit -15 / -1, the target keeping what was written. They now end it as
    Ctrl-C does: undone, one line, 143 / 129 (130), the audit record's outcome 'interrupted'.
    A Ctrl-C after SIGTERM (an impatient user, a supervisor) stopped the undo part-way: svc/K was
    destroyed and not written back while the command said the target was as it was. The undo now
    finishes; the first signal decides the exit code."""
    vault = FakeVault().start()
    try:
        store = VaultStore(hvac.Client(url=vault.address, token=vault.root_token), "secret", actor="t")
        try:
            store.put("svc/K", FOREIGN)
            url = vault.address.replace("http://", "vault+http://") + "/secret"
            env = {"VAULT_TOKEN": vault.root_token, **({"HOLD": "undo"} if then else {})}
            code, stderr = interrupted_restore(url, env, tmp_path, signum, then=then)
            assert_undone_and_said(code, stderr, signum, tmp_path)
            assert [meta.name for meta in store.list("", include_deleted=True)] == ["svc/K"]
            assert store.get("svc/K").value.reveal() == FOREIGN  # written back from its copy
        finally:
            store.close()
    finally:
        vault.stop()


def test_a_signal_while_the_file_is_checked_says_nothing_was_restored(backup: Backup, tmp_path: Path) -> None:
    """Before any write (the file checked, the store opened) SIGTERM ended it with no word
    (exit -15), and Ctrl-C said only 'aborted'."""
    vault = FakeVault().start()
    try:
        url = vault.address.replace("http://", "vault+http://") + "/secret"
        env = {"VAULT_TOKEN": vault.root_token, "HOLD": "check"}
        code, stderr = interrupted_restore(url, env, tmp_path, signal.SIGTERM)
        assert_undone_and_said(code, stderr, signal.SIGTERM, tmp_path, audited=False)
        assert vault.mounts["secret"] == {}
    finally:
        vault.stop()


def test_sigterm_during_a_restore_into_aws_undoes_it(
    backup: Backup, tmp_path: Path, moto_endpoint: str
) -> None:
    prefix = f"restore-{secrets.token_hex(4)}"
    store = AwsStore(aws_client(moto_endpoint), prefix, actor="t")
    try:
        store.put("svc/K", FOREIGN)
        env = {
            "AWS_ENDPOINT_URL": moto_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        url = f"aws-secretsmanager://{REGION}/{prefix}"
        code, stderr = interrupted_restore(url, env, tmp_path, signal.SIGTERM)
        assert_undone_and_said(code, stderr, signal.SIGTERM, tmp_path)
        assert [meta.name for meta in store.list("", include_deleted=True)] == ["svc/K"]
        assert store.get("svc/K").value.reveal() == FOREIGN
    finally:
        store.close()
