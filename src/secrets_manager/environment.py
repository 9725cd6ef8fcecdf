"""`SHRIVENQUANT_ENV`: which guard rails are in force (development, staging or production)."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping

from secrets_manager.errors import InvalidInputError

ENV_VARIABLE = "SHRIVENQUANT_ENV"
PASSWORD_FILE_VARIABLE = "MASTER_PASSWORD_FILE"  # noqa: S105 (a variable name)
PASSWORD_VARIABLE = "MASTER_PASSWORD"  # noqa: S105 (a variable name)
# Withheld from every command we start: they must not learn how to unlock the store.
PASSWORD_VARIABLES = (PASSWORD_VARIABLE, PASSWORD_FILE_VARIABLE)


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"

    @property
    def is_production(self) -> bool:
        return self is Environment.PRODUCTION


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
