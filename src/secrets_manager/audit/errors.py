"""The audit log's errors, and the remedies their messages name.

Every caller fails closed on `AuditError`; `AuditTamperError` is an integrity error (exit 6).
"""

from __future__ import annotations

from pathlib import Path

from secrets_manager.errors import IntegrityError, SecretsManagerError


class AuditError(SecretsManagerError):
    """The audit record could not be written in time; the operation must not go ahead.

    `cause` is why, without what follows for the operation ("the operation was refused"): a
    caller whose records report a change already made says that instead."""

    exit_code = 1
    kind = "audit_error"

    def __init__(self, message: str, *, timed_out: bool = False, cause: str | None = None) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.cause = message if cause is None else cause


class AuditTamperError(IntegrityError):
    """The audit chain is broken: a record was edited, removed, reordered or cut off."""


class AuditPartialRecordError(AuditError):
    """The live file ends in a partial record a crash left (every record the store anchored is
    there before it): not tampering. The next authenticated append sets it aside."""


RESET_HINT = "'secrets-manager audit reset --accept-loss' (--share-file too if the password is lost)"
RESTORE_HINT = f"restore the log from a copy, or accept the loss with {RESET_HINT}"


def partial_record(path: Path) -> AuditPartialRecordError:
    return AuditPartialRecordError(
        f"audit log {path} ends in a partial record (a write cut short by a crash?); "
        "the next audited operation sets it aside"
    )


def not_an_audit_log(path: Path) -> AuditTamperError:
    return AuditTamperError(
        f"{path} is not an audit log (its first line is no audit record), so it was left as it is: if "
        "it is the wrong file, give the right one (--audit-file, SECRETS_MANAGER_AUDIT_FILE)"
    )
