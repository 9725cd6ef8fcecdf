"""A restore through the `SecretStore` protocol (Vault, AWS) undoes only what it created itself.

A name the restore did not see in its list can still exist when it writes: AWS's ListSecrets
"might not reflect changes from the last five minutes", and on any store another writer may come
in between. The restore's first, create-only write then finds it: that secret is another tool's,
never destroyed by the undo, and --on-existing applies to it. A first write whose answer was lost
is read back: undone only if the name holds exactly the one version we sent.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

from secrets_manager.errors import ConflictError, StorageError
from secrets_manager.store.aws import AwsStore
from secrets_manager.store.backup import Backup
from secrets_manager.store.restore import OnExisting, restore_into
from secrets_manager.store.vault import VaultStore
from test_backup import BACKUP_PASSWORD, new_store, take
from test_store_aws import aws_client
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


def test_a_lost_answer_in_doubt_is_left_in_place_and_named(
    aws: tuple[AwsStore, Any, str], backup: Backup, moto_endpoint: str
) -> None:
    _, native, prefix = aws

    class AnotherWriterCameFirst(AwsStore):
        def put(self, name: str, value: bytes, **options: Any) -> Any:
            if name == "svc/K":  # our request timed out; meanwhile another tool created the name
                native.create_secret(Name=f"{prefix}/svc/K", SecretString=FOREIGN.decode())
                raise StorageError("cannot reach AWS Secrets Manager for store svc/K (ReadTimeoutError)")
            return super().put(name, value, **options)

    store = AnotherWriterCameFirst(aws_client(moto_endpoint), prefix, actor="restorer")
    with pytest.raises(StorageError, match=r"svc/K may have been created by it .* left as it is"):
        restore_into(store, backup.secrets)
    assert foreign_value(native, f"{prefix}/svc/K") == FOREIGN
    assert foreign_value(native, f"{prefix}/svc/A") is None


# ---- Vault: another writer between the restore's LIST and its first write -------------------------------


class RacingVault(FakeVault):
    """After the first LIST of the mount, another tool writes `svc/K` (`vault kv put`)."""

    raced = False

    def handle(self, method: str, raw_path: str, token: str | None, body: Any) -> tuple[int, Any]:
        status, answer = super().handle(method, raw_path, token, body)
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
