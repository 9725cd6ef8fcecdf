"""`SHRIVENQUANT_ENV`: which guard rails are in force (development, staging or production)."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping

from secrets_manager.errors import InvalidInputError, UnsafeConfigurationError

ENV_VARIABLE = "SHRIVENQUANT_ENV"
PASSWORD_FILE_VARIABLE = "MASTER_PASSWORD_FILE"  # noqa: S105 (a variable name)
PASSWORD_VARIABLE = "MASTER_PASSWORD"  # noqa: S105 (a variable name)
# Withheld from every command we start: they must not learn how to unlock the store.
PASSWORD_VARIABLES = (PASSWORD_VARIABLE, PASSWORD_FILE_VARIABLE)
PRODUCTION_MIN_PASSWORD_LENGTH = 12  # characters: NIST SP 800-63B's 8 for a user, more for a key to all


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"

    @property
    def is_production(self) -> bool:
        return self is Environment.PRODUCTION

    def check_new_password(self, password: bytes, what: str = "the master password") -> bytes:
        """`password` if this environment accepts it as a new one: production refuses one shorter
        than PRODUCTION_MIN_PASSWORD_LENGTH characters (it opens every secret, or a backup of them)."""
        length = len(password.decode("utf-8", errors="replace"))
        if self.is_production and length < PRODUCTION_MIN_PASSWORD_LENGTH:
            raise UnsafeConfigurationError(
                f"{what} is {length} characters; production needs at least "
                f"{PRODUCTION_MIN_PASSWORD_LENGTH} (a passphrase of several words is easiest)"
            )
        return password


def current_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """The environment named by SHRIVENQUANT_ENV; development when unset."""
    raw = (os.environ if environ is None else environ).get(ENV_VARIABLE, "").strip().lower()
    if not raw:
        return Environment.DEVELOPMENT
    try:
        return Environment(raw)
    except ValueError:
        raise InvalidInputError(
            f"{ENV_VARIABLE}={raw!r} is not one of development, staging, production"
        ) from None
