"""Names an operator keys on, read from the source and looked for in the docs.

docs/audit.md's `operation` row names every operation the code records, and its `outcome` row
every error kind a record's outcome can be (an operation's error's `kind`): a reader filtering
`audit show --operation` (or a SIEM rule) learns the names there. The operations are read from the
source, where a literal name is handed to what records it (`Session.secret_operation("otp", ...)`,
`AuditEvent("audit.repair", ...)`, the service's `_call(context, "GetSecret", "get", ...)`).

The README's list of `serve`'s log `event`s (families such as `health.*`, or single names) covers
every `"event": "..."` a log line of the code carries: alerts and dashboards are keyed on them."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import click

import secrets_manager
from secrets_manager.cli.audit_commands import VALUE_READS
from secrets_manager.errors import SecretsManagerError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "secrets_manager"
# What takes the operation as its first argument (the CLI's Session, the schedule, the log itself).
FIRST_ARGUMENT = {
    "event",
    "secret_operation",
    "operation",
    "recovery_operation",
    "held_secret_store",
    "unlock_encrypted",
    "_audited",
    "AuditEvent",
}


def recorded_operations() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            called = (
                node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            )
            candidates = [keyword.value for keyword in node.keywords if keyword.arg == "operation"]
            if called in FIRST_ARGUMENT and node.args:
                candidates.append(node.args[0])
            if called == "_call" and path.parent.name == "service" and len(node.args) > 2:
                candidates.append(node.args[2])  # _call(context, method, operation, name, capability)
            for candidate in candidates:
                if isinstance(candidate, ast.Constant) and isinstance(candidate.value, str):
                    found.setdefault(candidate.value, set()).add(str(path.relative_to(ROOT)))
    return found


def documented(field: str) -> set[str]:
    text = (ROOT / "docs" / "audit.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith(f"| `{field}` |")]
    return set(re.findall(r"`([a-z][a-z_.*-]*)`", row))


def documented_operations() -> set[str]:
    return documented("operation")


def error_kinds() -> set[str]:
    """Every `kind` of an error class: what an operation that fails with it records as its outcome."""
    for module in pkgutil.walk_packages(secrets_manager.__path__, "secrets_manager."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    kinds, classes = set(), [SecretsManagerError]
    while classes:
        cls = classes.pop()
        kinds.add(cls.kind)
        classes.extend(cls.__subclasses__())
    return kinds


def test_the_source_scan_finds_the_operations_it_should() -> None:
    # Guard against a scan that silently finds nothing (a helper renamed): known names from each kind.
    found = recorded_operations()
    for known in ("store", "otp", "audit.repair", "batch_get", "rotate.promote", "keys.rewrap"):
        assert known in found, known


def test_every_recorded_operation_is_named_in_docs_audit_md() -> None:
    documented = documented_operations()
    undocumented = {
        operation: sorted(paths)
        for operation, paths in recorded_operations().items()
        if operation not in documented and not (operation.startswith("keys.") and "keys.*" in documented)
    }
    assert undocumented == {}, (
        f"operations recorded but not in docs/audit.md's `operation` row: {undocumented}"
    )


def test_audit_show_read_selects_operations_the_code_records() -> None:
    """`audit show --read` keys on operation names: one misspelt there would quietly leave its
    reads out of "who read this secret"."""
    assert VALUE_READS - set(recorded_operations()) == set()


def test_every_error_kind_is_an_outcome_docs_audit_md_names() -> None:
    # `run`'s COMMAND that cannot start fails after its records are written: never an outcome.
    kinds = error_kinds() - {"command_not_started"}
    assert {"not_found", "unauthenticated"} <= kinds  # the scan found the classes
    assert kinds - documented("outcome") == set(), (
        "outcomes recorded but not in docs/audit.md's `outcome` row"
    )


def logged_events() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        for event in re.findall(r'"event": "([a-z_]+\.[a-z_]+)"', path.read_text()):
            found.setdefault(event, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_logged_event_is_named_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("stable `event` to key alerts and dashboards on")
    listed = readme[start : readme.index(";", readme.index("`request.internal_error`", start))]
    names = set(re.findall(r"`([a-z_]+\.[a-z_*]+)`", listed))
    assert {"health.*", "request.failed"} <= names  # the list was found
    unnamed = {
        event: sorted(paths)
        for event, paths in logged_events().items()
        if event not in names and f"{event.split('.')[0]}.*" not in names
    }
    assert unnamed == {}, f"log events the README's list of serve's events leaves out: {unnamed}"


def _leaf_commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        context = click.Context(command)
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            assert sub is not None
            yield from _leaf_commands(sub, (*path, name))
    elif path:
        yield " ".join(path), command


def test_the_readme_command_tables_show_every_option_of_every_command() -> None:
    """Each command has a row in a README table (`| `store NAME … [--file PATH] …` | …`) whose forms
    show every option it takes (its long or short spelling): an option the tables leave out is
    found only by reading --help, and a form the code lost shows here too."""
    from secrets_manager.cli.app import cli

    commands = dict(_leaf_commands(cli))
    aliases = {"backup": "backup create"}  # `backup FILE` is `backup create FILE`
    shown: dict[str, set[str]] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        current = None
        for form in re.findall(r"`([^`]*)`", line.split(" | ")[0]):  # `keys rotate NS` / `--all`
            words = form.split()
            for length in (2, 1):
                named = aliases.get(" ".join(words[:length]), " ".join(words[:length]))
                if named in commands:
                    current = named
                    break
            if current is not None:
                shown.setdefault(current, set()).update(re.findall(r"(?<![\w-])-{1,2}[a-z][\w-]*", form))
    assert set(commands) - set(shown) == set(), "commands with no row in the README's tables"
    unshown = {
        f"{name} {'/'.join(option.opts)}"
        for name, command in commands.items()
        for option in command.params
        if isinstance(option, click.Option) and option.name != "help" and not set(option.opts) & shown[name]
    }
    assert unshown == set(), "options the README's command tables do not show"
    taken = {
        name: {spelling for option in command.params for spelling in option.opts + option.secondary_opts}
        for name, command in commands.items()
    }
    unknown = {f"{name} {option}" for name, options in shown.items() for option in options - taken[name]}
    assert unknown == set(), "options the README's command tables show that the command does not take"


def test_the_readme_global_options_line_shows_every_option_before_the_command() -> None:
    from secrets_manager.cli.app import cli

    readme = (ROOT / "README.md").read_text()
    start = readme.index("Global options come before the command:")
    line = readme[start : readme.index("\n\n", start)]
    unshown = {
        option.opts[0]
        for option in cli.params
        if isinstance(option, click.Option) and option.name != "help" and option.opts[0] not in line
    }
    assert unshown == set(), "options before the command that the README's global options line leaves out"


def test_the_readme_gives_the_sdks_defaults_as_the_sdk_has_them() -> None:
    from secrets_manager.client import _config

    (row,) = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith(
            "| `SECRETS_MANAGER_CACHE_TTL`, `SECRETS_MANAGER_STALE_IF_ERROR`, `SECRETS_MANAGER_TIMEOUT` |"
        )
    ]
    defaults = (
        _config.DEFAULT_TTL_SECONDS,
        _config.DEFAULT_STALE_IF_ERROR_SECONDS,
        _config.DEFAULT_TIMEOUT_SECONDS,
    )
    assert "(defaults {:g}, {:g} and {:g})".format(*defaults) in row


def test_the_readme_names_every_setting_of_server_toml_and_of_a_schedule_entry() -> None:
    """serve refuses a setting it does not know, so one the README leaves out is one nobody finds;
    the schedule's example block is where an operator copies an entry from."""
    from secrets_manager import rotation
    from secrets_manager.service import config

    readme = (ROOT / "README.md").read_text()
    settings = config._KNOWN | config._TLS_KNOWN
    assert "watch_poll_seconds" in settings and "client_ca" in settings
    unnamed = {setting for setting in settings if not re.search(rf"\b{setting}\b", readme)}
    assert unnamed == set(), "server.toml settings the README never names"
    (schedule,) = [
        block for block in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[[rotation]]" in block
    ]
    entry_keys = set(re.findall(r"^#? ?(\w+) =", schedule, re.M)) | set(re.findall(r"(\w+) = ", schedule))
    assert rotation._KNOWN - entry_keys == set(), (
        "schedule entry settings the README's rotation.toml leaves out"
    )


def rpc_capabilities() -> dict[str, str | None]:
    """Each RPC's capability, as the servicer asks it of `_call(context, method, operation, name,
    capability, ...)` (None: the call filters what it shows), following one `self._helper(...)`."""
    tree = ast.parse((SOURCE / "service" / "server.py").read_text())
    (servicer,) = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(f.name == "GetSecret" for f in node.body if isinstance(f, ast.FunctionDef))
    ]
    methods = {f.name: f for f in servicer.body if isinstance(f, ast.FunctionDef)}

    def asked(function: ast.FunctionDef, depth: int = 0) -> list[str | None]:
        found: list[str | None] = []
        for node in ast.walk(function):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr == "_call" and len(node.args) > 4:
                capability = node.args[4]
                assert isinstance(capability, ast.Constant)
                found.append(capability.value)
            elif node.func.attr in methods and node.func.attr.startswith("_") and depth == 0:
                found.extend(asked(methods[node.func.attr], depth + 1))
        return found

    rpcs = re.findall(
        r"^\s*rpc (\w+)\(", (ROOT / "proto" / "secrets_manager" / "v1" / "secrets.proto").read_text(), re.M
    )
    capabilities = {}
    for rpc in rpcs:
        (capability,) = set(asked(methods[rpc]))
        capabilities[rpc] = capability
    return capabilities


def test_the_readme_rpc_table_gives_the_capability_the_service_asks() -> None:
    capabilities = rpc_capabilities()
    assert capabilities["GetSecret"] == "read" and capabilities["ListSecrets"] is None  # the scan works
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| RPC | capability |")
    rows = readme[start : readme.index("\n\n", start)].splitlines()[2:]
    said = {}
    for row in rows:
        rpcs_cell, capability_cell = row.strip("|").split("|")[:2]
        for rpc in re.findall(r"`(\w+)`", rpcs_cell):
            said[rpc] = capability_cell.strip()
    assert set(said) == set(capabilities), "RPCs the README's table leaves out, or that do not exist"
    wrong = {
        rpc: said[rpc]
        for rpc, capability in capabilities.items()
        if not ("filtered" in said[rpc] if capability is None else said[rpc].startswith(f"`{capability}`"))
    }
    assert wrong == {}, f"the service asks otherwise: {capabilities}"


def test_every_variable_of_ours_the_code_reads_is_documented() -> None:
    """A SECRETS_MANAGER_*, MASTER_PASSWORD* or VAULT_* variable the code names is in the README
    (Environment variables, or where its feature is) or docs/stores.md (Vault's)."""
    variables: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        variables |= set(
            re.findall(
                r'"((?:SECRETS_MANAGER|MASTER_PASSWORD|VAULT|SHRIVENQUANT)_?[A-Z_]*)"', path.read_text()
            )
        )
    assert {"SECRETS_MANAGER_ADDR", "VAULT_TOKEN", "MASTER_PASSWORD_FILE"} <= variables
    documents = (ROOT / "README.md").read_text() + (ROOT / "docs" / "stores.md").read_text()
    assert {v for v in variables if not re.search(rf"\b{v}\b", documents)} == set()
