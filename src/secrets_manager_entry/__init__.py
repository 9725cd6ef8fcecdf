"""The `secrets-manager` console script's entry point, outside the `secrets_manager` package.

Importing the CLI takes a fifth of a second or more (cryptography, click; grpc too for --server and
serve) before its own error handling is in place: Ctrl-C in that time ends here, with one line and
exit 130, rather than with a Python traceback. This module imports nothing else first, so there
is no such window left; nor for a dependency missing from the environment, which is one line and
exit 1 as in the CLI.
"""

import sys


def main() -> None:
    try:
        from secrets_manager.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("secrets-manager: error: interrupted\n")
        sys.exit(130)
    except ModuleNotFoundError as exc:  # a dependency the CLI imports first (click, rich) is missing
        from secrets_manager.errors import missing_module_line

        sys.stderr.write(f"secrets-manager: error: {missing_module_line(exc.name, sys.prefix)}\n")
        sys.exit(1)
    cli_main()
