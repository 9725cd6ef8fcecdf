"""A known value never shows in repr/str/format/logs/errors; values and key material refuse pickling.

DESIGN.md section 9: no secret value in logs, exceptions, tracebacks or repr.
"""

from __future__ import annotations

import base64
import copy
import logging
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from secrets_manager.crypto import DataKey, Keyset, kdf
from secrets_manager.errors import SecretsManagerError
from secrets_manager.store import MAX_VALUE_SIZE, EncryptedStore, PasswordUnlock
from secrets_manager.tls.files import read_client_tls, read_server_tls
from secrets_manager.values import REDACTED, SecretValue, read_exact_json_object
from service_fixtures import make_pki

KNOWN = "sk-live-KNOWN-TEST-VALUE-1c9e5f0a"
KNOWN_BYTES = KNOWN.encode()


def shows(obj: object, needle: str) -> bool:
    return any(needle in text for text in (repr(obj), str(obj), f"{obj}", "%s" % (obj,), "%r" % (obj,)))  # noqa: UP031


def material_spellings(material: bytes) -> list[str]:
    return [repr(material), material.hex(), base64.b64encode(material).decode(), str(list(material))]


@pytest.fixture
def populated(encrypted_store: EncryptedStore) -> EncryptedStore:
    encrypted_store.put("svc/key", KNOWN_BYTES, description="exchange key", tags={"team": "trading"})
    encrypted_store.put("svc/key", KNOWN_BYTES + b"-2")
    return encrypted_store


# ---- repr and str -------------------------------------------------------------------------------


def test_secret_value_repr_str_and_format_are_redacted() -> None:
    value = SecretValue(KNOWN_BYTES)
    assert not shows(value, KNOWN)
    assert str(value) == REDACTED and f"{value:>40}" == REDACTED
    assert value.reveal() == KNOWN_BYTES and value.reveal_text() == KNOWN


def test_a_json_value_read_to_show_or_replace_one_field_never_shows_it() -> None:
    """`get NAME#FIELD`, `store NAME#FIELD` and field rotations read the value as an
    ExactJsonObject, whose dataclass repr showed every field (a traceback's locals, a debugger)."""
    document = read_exact_json_object(b'{"username": "app", "password": "hunter2-KNOWN", "port": 5432}')
    assert document is not None and document.fields["password"] == "hunter2-KNOWN"
    for shown in (repr(document), str(document), f"{document}"):
        assert "hunter2" not in shown and "5432" not in shown, shown
        assert "username" in shown and "password" in shown  # the field names are not secret


def test_reveal_text_of_bytes_that_are_not_utf8_raises_a_plain_value_error() -> None:
    """As its docstring says: a ValueError, not the UnicodeDecodeError that holds the bytes."""
    with pytest.raises(ValueError, match="not UTF-8") as failure:
        SecretValue(b"\xffsecret-bytes").reveal_text()
    assert type(failure.value) is ValueError
    assert failure.value.__context__ is None and failure.value.__cause__ is None  # nothing holds the bytes
    assert "secret-bytes" not in repr(failure.value) and "xff" not in str(failure.value)


def test_returned_objects_never_show_the_value(populated: EncryptedStore) -> None:
    secret = populated.get("svc/key")
    meta = populated.describe("svc/key")
    returned: list[object] = [
        secret,
        secret.value,
        populated.get("svc/key", version=1),
        meta,
        *meta.versions,
        *populated.list("svc/"),
        *populated.history("svc/key"),
        populated.put("svc/other", KNOWN_BYTES),
        populated,
    ]
    assert [type(obj).__name__ for obj in returned if shows(obj, KNOWN)] == []
    assert secret.value.reveal() == KNOWN_BYTES + b"-2"


def test_logging_a_secret_does_not_log_its_value(
    populated: EncryptedStore, caplog: pytest.LogCaptureFixture
) -> None:
    secret = populated.get("svc/key")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("got %s / %r / value=%s", secret, secret, secret.value)
    assert "svc/key" in caplog.text
    assert KNOWN not in caplog.text


def test_keys_never_show_their_material(populated: EncryptedStore) -> None:
    keyset = populated._keyset_for_read("svc")
    root = populated._root
    objects: list[object] = [keyset, *keyset.keys, root]
    secrets_in_them = [m for key in (*keyset.keys, root) for m in material_spellings(key.material)]
    leaks = [(type(obj).__name__, s) for obj in objects for s in secrets_in_them if shows(obj, s)]
    assert leaks == []
    assert str(keyset.primary_id) in repr(keyset)  # the repr is still useful


def test_tls_files_read_never_show_the_private_key(tmp_path: Path) -> None:
    """The server's and the SDK's checked TLS files hold the private key's PEM: their dataclass
    repr showed it whole."""
    make_pki(tmp_path, clients=("auth",))
    server = read_server_tls(tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem")
    client = read_client_tls(
        (tmp_path / "auth.pem", "SECRETS_MANAGER_CERT"),
        (tmp_path / "auth-key.pem", "SECRETS_MANAGER_KEY"),
        (tmp_path / "ca.pem", "SECRETS_MANAGER_CA"),
    )
    for files, key_file in ((server, "server-key.pem"), (client, "auth-key.pem")):
        body = b"".join((tmp_path / key_file).read_bytes().splitlines()[1:-1]).decode()
        assert body and files.key
        for shown in (repr(files), str(files)):
            assert "PRIVATE KEY" not in shown and body[:32] not in shown, shown


def test_an_import_entry_never_shows_its_value() -> None:
    from secrets_manager.cli.import_command import Entry

    entry = Entry("DB_PASSWORD", "auth/DB_PASSWORD", KNOWN_BYTES)
    assert not shows(entry, KNOWN)
    assert "auth/DB_PASSWORD" in repr(entry)


def test_a_cli_session_never_shows_the_environment_or_a_typed_password() -> None:
    """Every command's Session (and a rotation's or edit's, which keeps the master password typed
    once) showed, in its dataclass repr, the whole environment (MASTER_PASSWORD, VAULT_TOKEN, ...),
    the password typed at the prompt and a store URL's password."""
    from secrets_manager.cli.rotate_commands import _OnePasswordSession
    from secrets_manager.cli.session import Session

    environ = {"MASTER_PASSWORD": KNOWN, "VAULT_TOKEN": KNOWN + "-token"}
    url = f"postgresql://app:{KNOWN}-url@db.internal/trading"
    session = Session(store_url=url, password_file=None, audit_file=None, environ=environ)
    typed = _OnePasswordSession(
        store_url=url, password_file=None, audit_file=None, environ=environ, cached_password=KNOWN_BYTES
    )
    for each in (session, typed):
        assert not shows(each, KNOWN), repr(each)
        assert "db.internal" in repr(each)  # where the store is, without its password


def test_the_sdks_and_the_services_configuration_never_show_a_store_urls_password() -> None:
    """A postgresql:// URL with a password (warned against, refused in production) was shown
    whole by the dataclass repr of the SDK's local target and of serve's configuration."""
    from secrets_manager.client._config import LocalTarget
    from secrets_manager.environment import Environment
    from secrets_manager.service.config import ServerConfig

    url = f"postgresql://app:{KNOWN}@db.internal/trading"
    local = LocalTarget(url, Environment.DEVELOPMENT)
    served = ServerConfig("127.0.0.1:0", url, Path("p.toml"), Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    for each in (local, served):
        assert not shows(each, KNOWN), repr(each)


def test_a_rotations_commands_never_show_the_environment_they_were_given() -> None:
    """`Commands` keeps the environment its set and test commands start from (the caller's:
    MASTER_PASSWORD, PGPASSWORD, ...), which its dataclass repr showed whole."""
    from secrets_manager.rotation import Commands

    commands = Commands(("set-it",), None, 30.0, {"MASTER_PASSWORD": KNOWN, "PGPASSWORD": KNOWN})
    assert not shows(commands, KNOWN), repr(commands)
    assert "set-it" in repr(commands)


def test_password_unlock_never_shows_the_password() -> None:
    unlock = PasswordUnlock(KNOWN, kdf.TEST)
    assert not shows(unlock, KNOWN)


# ---- errors -------------------------------------------------------------------------------------


def error_text(exc: BaseException) -> str:
    return str(exc) + repr(exc) + "".join(traceback.format_exception(exc))


def bad_calls(store: EncryptedStore) -> dict[str, Callable[[], object]]:
    store.put("svc/deleted", KNOWN_BYTES)
    store.delete("svc/deleted")
    return {
        "over-size value": lambda: store.put(
            "svc/big", KNOWN_BYTES * (MAX_VALUE_SIZE // len(KNOWN_BYTES) + 1)
        ),
        "value given as str": lambda: store.put("svc/text", cast(Any, KNOWN)),
        "invalid name": lambda: store.put("bad name!", KNOWN_BYTES),
        "stale expect_version": lambda: store.put("svc/key", KNOWN_BYTES, expect_version=1),
        "create-only on an existing secret": lambda: store.put("svc/key", KNOWN_BYTES, expect_version=0),
        "put to a deleted secret": lambda: store.put("svc/deleted", KNOWN_BYTES),
        "negative expect_version": lambda: store.put("svc/key", KNOWN_BYTES, expect_version=-1),
        "unknown label": lambda: store.get("svc/key", label="latest"),
        "missing version": lambda: store.get("svc/key", version=99),
    }


def test_errors_for_bad_input_never_contain_the_value(populated: EncryptedStore) -> None:
    calls = bad_calls(populated)
    leaked = []
    for what, call in calls.items():
        with pytest.raises(SecretsManagerError) as caught:
            call()
        if KNOWN in error_text(caught.value):
            leaked.append(what)
    assert leaked == []


def test_wrong_password_error_shows_neither_password(
    populated: EncryptedStore, open_store: Callable[..., EncryptedStore], store_password: str
) -> None:
    with pytest.raises(SecretsManagerError) as caught:
        open_store(password=KNOWN)
    text = error_text(caught.value)
    assert KNOWN not in text and store_password not in text


# ---- pickling -----------------------------------------------------------------------------------


def test_secret_value_refuses_pickling_and_copying() -> None:
    value = SecretValue(KNOWN_BYTES)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(value)
    with pytest.raises(TypeError):
        copy.deepcopy(value)


def test_secret_refuses_pickling(populated: EncryptedStore) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(populated.get("svc/key"))


def test_key_material_refuses_pickling(populated: EncryptedStore) -> None:
    keyset: Keyset = populated._keyset_for_read("svc")
    key: DataKey = keyset.primary
    for obj in (key, keyset, populated._root):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(obj)
