"""Makes mixed_store.db (and the backups beside it): a SQLite store written in turn by three
builds, as a rolling upgrade and a roll-back leave one. Run as README.md beside it says: each step
with the python of a venv holding that build (`make_mixed_store.py STEP`), in order new, old,
older, new. Values are test values; the master password is PASSWORD (KDF: kdf.TEST)."""

import sys
from datetime import UTC, datetime

from secrets_manager.crypto import kdf
from secrets_manager.storage.sqlite import SqliteStorage
from secrets_manager.store import EncryptedStore, PasswordUnlock

PASSWORD = "upgrade vectors password"
PATH = "mixed_store.db"
step = sys.argv[1]
if step == "new":
    store = EncryptedStore.create(SqliteStorage(PATH, create=True), PasswordUnlock(PASSWORD, kdf.TEST))
    store.put("a/X", b"x-1 by new", description="by new", tags={"t": "1"})
    store.put("a/X", b"x-2 by new")
    store.stage("a/X", b"x-3 staged by new")
    store.put("b/Y", b"y-1 by new", expires=datetime(2030, 1, 1, tzinfo=UTC))
    store.put("d/GONE", b"gone-1 by new")
else:
    store = EncryptedStore.open(SqliteStorage(PATH), PasswordUnlock(PASSWORD))
    if step == "old":  # 0327c92: metadata rewritten, a version of its own, the new one's pending promoted
        store.update_metadata("a/X", description="edited by old 0327c92")
        store.put("a/X", b"x-4 by old")
        store.put("c/Z", b"z-1 by old")
        store.update_metadata("b/Y", set_tags={"by": "old"})
    elif step == "older":  # 9d97724: a version destroyed, tags, a secret erased and stored again
        store.destroy("a/X", [1])
        store.update_metadata("b/Y", set_tags={"by": "older"}, remove_tags=["nothing"])
        store.destroy_secret("d/GONE")
        store.put("d/GONE", b"gone-1 again by older")
    else:
        raise SystemExit(f"unknown step {step}")
store.close()
