"""`python -m secrets_manager`: the console script, for an environment whose scripts directory is
not on PATH (a venv not activated, `pipx run`, a container's bare interpreter). The same entry
point, so the same exit codes and one-line errors."""

from secrets_manager_entry import main

main()
