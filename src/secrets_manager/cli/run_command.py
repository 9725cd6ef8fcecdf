"""`secrets-manager run`: start a program with the secrets it may read as environment variables.

For programs that read their credentials from the environment and know nothing of this tool, as
`chamber exec`, `envconsul` or `doppler run` do. The values go only into the new program's
environment (never its arguments), and this process becomes that program (exec), so its exit
status and signals are the program's own.

The program does not inherit what unlocks or reaches the store (it gets only the secrets it was
given, not the key to every namespace): the master password variables, the store's URL, Vault's
token and AppRole login, PostgreSQL's password, and the credentials `run` itself reached the store
with when they are an identity a program may also hold as its own: AWS's for an AWS store or one
that an AWS KMS key unlocks, the client key for a service (`--server`). COMMAND is looked up in
the PATH `run` was started with (a secret cannot choose which program runs), and `--service`
refuses to set variables that make programs load or run other code or choose whom they trust
(LD_PRELOAD, PATH, PYTHONPATH, https_proxy, SECRETS_MANAGER_CA, …): whoever may write one secret
of a namespace must not gain code execution in the service that reads it, nor send its traffic
elsewhere. `--secret NAME=VAR` names such a variable explicitly, for who really means it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NoReturn

import click

from secrets_manager.cli.agent_commands import parse_duration
from secrets_manager.cli.app import REFERENCE_PATTERN, cli, pass_session, select_field, warn_if_expired
from secrets_manager.cli.env_files import parse_env
from secrets_manager.cli.output import warning_line
from secrets_manager.cli.password import read_small_file
from secrets_manager.cli.run_supervisor import (
    ChangeSource,
    FeedSource,
    Launch,
    Supervisor,
    WatchSource,
    parse_stop_signal,
    relevant_names,
    with_shell_fallback,
)
from secrets_manager.cli.session import STORE_VARIABLE, TLS_VARIABLES, Session, is_remote_store
from secrets_manager.environment import PASSWORD_VARIABLES, VAULT_CREDENTIAL_VARIABLES
from secrets_manager.errors import InvalidInputError, NotFoundError, SecretsManagerError, restated
from secrets_manager.store import EncryptedStore, Secret, SecretStore
from secrets_manager.store.base import BulkReader, CurrentRead, read_current
from secrets_manager.store.kms import AwsKmsUnlock
from secrets_manager.store.names import DEFAULT_NAMESPACE, MAX_NAME_LENGTH, validate_name, validate_namespace
from secrets_manager.store.url import AwsLocation, external_location
from secrets_manager.values import SecretValue

EXIT_CANNOT_EXECUTE = 126  # the shell's codes, as env(1) and nohup(1) use them
EXIT_NOT_FOUND = 127
DEFAULT_STOP_TIMEOUT = "30s"  # as envconsul's kill_timeout: then SIGKILL
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_IN_VARIABLE = re.compile(r"[^A-Za-z0-9_]")
REFERENCE_SCHEME = "sm://"
_REFERENCE = re.compile(REFERENCE_PATTERN)
MAX_ENV_FILE_BYTES = 1024 * 1024
MAX_ARG_STRLEN = 32 * 4096  # Linux: the longest one argument or NAME=VALUE of the environment may be
# Variables through which a value chooses code to run, or whom to trust: the dynamic loader's,
# the command search path, interpreters', shells' and build tools' start-up hooks and option
# variables, the helpers git, less and others start, the proxies and CA bundles TLS and HTTP
# clients trust, and this tool's own: where the SDK connects and what it trusts, which store with
# which password, and the guard rails of SHRIVENQUANT_ENV; GUI toolkits' and media frameworks'
# module paths, R's, Erlang's, Julia's and Deno's start-up and library variables, .NET's and
# Mono's profiler and option variables, the Kerberos, SASL, GSSAPI and LDAP configuration that
# libpq and other clients load plug-ins from, and the compiler and make variables builds run.
# Named ones only: NODE_ENV or GIT_TOKEN stay usable. Proxies and npm's settings are read in
# either case (curl and wget read only `http_proxy`), so those match in any case; the rest are
# read as written.
# Withheld from COMMAND whatever the store: what unlocks a store or reaches one. The Vault ones are
# every credential store/vault.py's connect_vault reads (its ~/.vault-token, like ~/.pgpass and
# ~/.aws, is a file of the same user: no variable hides it); PostgreSQL's are libpq's password,
# password file and service file (which may hold a password) and its client key.
WITHHELD_VARIABLES = (
    *PASSWORD_VARIABLES,
    STORE_VARIABLE,
    *VAULT_CREDENTIAL_VARIABLES,
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICEFILE",
    "PGSSLKEY",
)
# Withheld only when `run` reached the store with them: an AWS Secrets Manager store, or our store
# unlocked by an AWS KMS key. Elsewhere they are most often the program's own identity on this
# host (an instance or task role), and withholding them would push people to keep long-lived keys.
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)
_CLIENT_KEY_VARIABLE = TLS_VARIABLES[1]  # SECRETS_MANAGER_KEY: withheld after `run --server`
_LOADS_CODE = re.compile(
    r"(?i:.*_PROXY|NPM_CONFIG_.*)"
    r"|(LD_|DYLD_|PYTHON|PERL|RUBY|LUA_|DOTNET_|GCONV_|GIT_CONFIG|XDG_CONFIG_|PIP_|SECRETS_MANAGER_).*"
    r"|.*_CA_BUNDLE|.*_SSL_ROOTS_FILE_PATH|GIT_SSL_.*|PGSSL.*|AWS_ENDPOINT_URL.*|SSLKEYLOGFILE"
    r"|NODE_TLS_REJECT_UNAUTHORIZED|NODE_OPTIONS|NODE_PATH|NODE_EXTRA_CA_CERTS"
    r"|PATH|HOME|SHELL|ZDOTDIR|BASH_ENV|ENV|IFS|CDPATH|SHELLOPTS|BASHOPTS|PS4|PROMPT_COMMAND"
    r"|BASH_LOADABLES_PATH|GLIBC_TUNABLES|HOSTALIASES|RES_OPTIONS|LOCPATH|NLSPATH|TZDIR"
    r"|JAVA_HOME|JAVA_TOOL_OPTIONS|_JAVA_OPTIONS|JDK_JAVA_OPTIONS|JAVA_OPTS|MAVEN_OPTS|GRADLE_OPTS"
    r"|CLASSPATH|PHPRC|PHP_INI_SCAN_DIR|GEM_HOME|GEM_PATH|BUNDLE_GEMFILE"
    r"|GOFLAGS|GOPROXY|GONOPROXY|GOPRIVATE|GOINSECURE|GOSUMDB|GONOSUMDB|GONOSUMCHECK|GOROOT|GOPATH"
    r"|GOTOOLCHAIN|GODEBUG|RUSTC_WRAPPER|RUSTC"
    r"|GIT_SSH|GIT_SSH_COMMAND|GIT_EXEC_PATH|GIT_ASKPASS|SSH_ASKPASS|SUDO_ASKPASS|GIT_PROXY_COMMAND"
    r"|GIT_EXTERNAL_DIFF|GIT_DIR|GIT_COMMON_DIR|GIT_TEMPLATE_DIR|GIT_PAGER|GIT_EDITOR"
    r"|GIT_SEQUENCE_EDITOR|EDITOR|VISUAL|PAGER|MANPAGER|BROWSER|LESSOPEN|LESSCLOSE"
    r"|OPENSSL_CONF|OPENSSL_ENGINES|OPENSSL_MODULES|SSL_CERT_FILE|SSL_CERT_DIR|CURL_HOME|WGETRC"
    r"|NETRC|GNUPGHOME|PSQLRC|PGSERVICEFILE|PGSYSCONFDIR|AWS_CONFIG_FILE|AWS_SHARED_CREDENTIALS_FILE"
    r"|AWS_CONTAINER_CREDENTIALS_FULL_URI|KUBECONFIG|DOCKER_HOST|DOCKER_CONFIG|DOCKER_CERT_PATH"
    r"|DOCKER_TLS_VERIFY|VAULT_ADDR|VAULT_AGENT_ADDR|VAULT_CACERT|VAULT_CAPATH|VAULT_SKIP_VERIFY"
    r"|VAULT_CLIENT_CERT|VAULT_CLIENT_KEY|VAULT_TLS_SERVER_NAME|SHRIVENQUANT_ENV"
    r"|GTK_MODULES|GTK_PATH|GTK_IM_MODULE_FILE|QT_PLUGIN_PATH|QT_QPA_PLATFORM_PLUGIN_PATH"
    r"|GIO_MODULE_DIR|GIO_EXTRA_MODULES|GST_PLUGIN_PATH|GST_PLUGIN_SYSTEM_PATH|GST_PLUGIN_SCANNER"
    r"|TCLLIBPATH|R_PROFILE|R_PROFILE_USER|R_ENVIRON|R_ENVIRON_USER|R_LIBS|R_LIBS_USER|R_LIBS_SITE"
    r"|ERL_LIBS|ERL_AFLAGS|ERL_ZFLAGS|ERL_FLAGS|ELIXIR_ERL_OPTIONS|JULIA_LOAD_PATH|JULIA_DEPOT_PATH"
    r"|JULIA_PROJECT|DENO_DIR|DENO_CERT|BUN_INSTALL|CC|CXX|CPP|LD|MAKEFLAGS|MAKEFILES"
    r"|(CORECLR_|COR_|COMPlus_|MONO_).*|KRB5_CONFIG|KRB5_KDC_PROFILE|KRB5_CLIENT_KTNAME|KRB5CCNAME"
    r"|SASL_PATH|SASL_CONF_PATH|GSS_MECH_CONFIG|LDAPCONF|LDAPRC|NSS_CONFIG_DIR|SSL_DIR"
    r"|" + "|".join(PASSWORD_VARIABLES)
)


@dataclass(frozen=True)
class Reference:
    """A variable whose value is to be a secret's, or one field of it: `VAR=sm://NAME[#FIELD]` in
    an --env-file or in run's own environment, as `op run` reads op:// references."""

    variable: str
    name: str
    field: str
    origin: str  # where it is written, for messages: "app.env line 3", "$DB_PASSWORD in the environment"


@dataclass(frozen=True)
class Reading:
    """What one reading gives COMMAND: its secret variables (a NAME#FIELD one holds the field), and
    each secret read, whole, once (what is audited and warned of)."""

    variables: dict[str, Secret]
    secrets: list[Secret]


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--service",
    "namespaces",
    multiple=True,
    metavar="NAMESPACE",
    help="Every secret under NAMESPACE/ that you may read, as the variable named by the rest of its "
    "name ('auth/DB_PASSWORD' → DB_PASSWORD; '/' and other characters become '_'). Repeatable.",
)
@click.option(
    "--secret",
    "singles",
    multiple=True,
    metavar="NAME[=VAR]",
    help="One secret, as VAR (default: the last part of its name). Repeatable.",
)
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    metavar="FILE",
    help="KEY=VALUE lines (as docker and python-dotenv read a .env file) to add to COMMAND's "
    "environment; a VALUE sm://NAME or sm://NAME#FIELD is that secret's value (or field), any "
    "other is passed as it is. Later files win over earlier ones; both over run's environment. "
    "Repeatable.",
)
@click.option(
    "--restart-on-change",
    is_flag=True,
    help="Stay COMMAND's parent: when one of its secrets changes, stop COMMAND and start it again "
    "with the new values (as Vault Agent's process supervisor mode and envconsul do).",
)
@click.option(
    "--stop-signal",
    metavar="SIGNAL",
    help="With --restart-on-change: the signal that stops COMMAND for a restart [default: TERM].",
)
@click.option(
    "--stop-timeout",
    metavar="DURATION",
    help=f"With --restart-on-change: SIGKILL if COMMAND has not ended this long after the stop signal "
    f"[default: {DEFAULT_STOP_TIMEOUT}].",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_session
def run(
    session: Session,
    namespaces: tuple[str, ...],
    singles: tuple[str, ...],
    env_files: tuple[str, ...],
    restart_on_change: bool,
    stop_signal: str | None,
    stop_timeout: str | None,
    command: tuple[str, ...],
) -> int:
    """Run COMMAND with secrets as environment variables; its exit status is run's.

    \b
    secrets-manager run --service auth -- python -m auth
    secrets-manager run --secret market-connector/BINANCE_API_KEY=API_KEY -- ./connector
    secrets-manager run --env-file app.env -- ./connector   # DB_PASSWORD=sm://auth/DB_PASSWORD

    A variable of run's own environment whose whole value is sm://NAME[#FIELD] is replaced by that
    secret's value too, as 'op run' does.

    Locally each secret read is audited ('run', with its version and fingerprint); with --server
    the service audits them and gives only what your certificate may read. Exit 3 if a --secret
    or a reference does not exist or a --service holds no secret you may read; 126/127 if COMMAND
    cannot be executed / is not found; else COMMAND's own status.

    With --restart-on-change run stays COMMAND's parent, passes signals on to it, and when one of
    its secrets changes starts it again with the new values (stop signal, then SIGKILL after the
    stop timeout); only if its environment would differ."""
    wanted = [_single(text) for text in singles]
    for namespace in namespaces:
        validate_namespace(namespace)
    file_values, file_references = _read_env_files(env_files)
    # run's own references, less those an env file sets (the file wins, as with `op run`)
    inherited = [
        reference
        for reference in _environment_references()
        if reference.variable not in file_values and reference.variable not in file_references
    ]
    if not namespaces and not singles and not inherited and not file_references:
        raise InvalidInputError(
            "say which secrets: --service NAMESPACE, --secret NAME[=VAR], or VAR=sm://NAME in an "
            "--env-file or in the environment"
        )
    if not restart_on_change and (stop_signal is not None or stop_timeout is not None):
        raise InvalidInputError("--stop-signal and --stop-timeout go with --restart-on-change")
    if not restart_on_change:
        with session.secret_operation("run") as (store, note):
            withheld = (*WITHHELD_VARIABLES, *credentials_that_reached(session, store))
            references = _references(inherited, file_references, withheld)
            reading = _read_variables(store, namespaces, wanted, references)
            for secret in reading.secrets:
                note.read(secret)
                warn_if_expired(secret)
        base = _base_environment(withheld, file_values, references)
        _exec(command, base, reading.variables)
    signum = parse_stop_signal(stop_signal or "TERM")
    timeout = parse_duration(stop_timeout or DEFAULT_STOP_TIMEOUT, "--stop-timeout")
    launch_of = _launch(command)  # COMMAND found in run's PATH before any secret is read
    with session.held_secret_store("run") as (store, audited):
        withheld = (*WITHHELD_VARIABLES, *credentials_that_reached(session, store))
        references = _references(inherited, file_references, withheld)
        names = [*(name for name, _ in wanted), *(reference.name for reference in references)]
        source = _change_source(store, namespaces, names)  # before the read

        def read(first: bool = False) -> dict[str, Secret]:
            with audited() as note:
                reading = _read_variables(store, namespaces, wanted, references, first=first)
                for secret in reading.secrets:
                    note.read(secret)
                    warn_if_expired(secret)
            return reading.variables

        variables = read(first=True)
        supervisor = Supervisor(
            launch_of(_base_environment(withheld, file_values, references)),
            variables,
            read,
            relevant_names(namespaces, names),
            stop_signal=signum,
            stop_timeout=timeout,
        )
        return supervisor.run(source)


def _read_variables(
    store: SecretStore,
    namespaces: tuple[str, ...],
    wanted: list[tuple[str, str]],
    references: list[Reference],
    *,
    first: bool = True,
) -> Reading:
    """The secrets `run` gives COMMAND, by variable; checked whole (nothing runs on an error), each
    secret read once. `first`: before COMMAND runs (an error says nothing was run); else a reading
    again for a restart, whose error the supervisor says with what COMMAND does meanwhile."""
    nothing_run = "; nothing was run" if first else ""
    read: dict[str, Secret] = {}
    found: list[tuple[str, Secret]] = []
    named = _read_named(store, [name for name, _ in wanted] + [reference.name for reference in references])
    for namespace in namespaces:
        secrets = read_namespace(store, namespace)
        if not secrets:
            unslashed = (
                " (names without '/' are under no NAMESPACE/: take them with --secret NAME)"
                if namespace == DEFAULT_NAMESPACE
                else ""
            )
            raise NotFoundError(f"no secret under '{namespace}/' that you may read{nothing_run}{unslashed}")
        for secret in secrets:
            variable = _variable_for(secret.name[len(namespace) + 1 :])
            if _LOADS_CODE.fullmatch(variable):
                raise InvalidInputError(
                    f"{secret.name} would set ${variable}, which can choose the code programs "
                    f"run or whom they trust{nothing_run}. If you mean it: "
                    f"--secret {secret.name}={variable}"
                )
            found.append((variable, read.setdefault(secret.name, secret)))
    for name, variable in wanted:
        found.append((variable, _read_once(store, read, name, named)))
    variables: dict[str, Secret] = {}
    for variable, secret in found:
        earlier = variables.get(variable)
        if earlier is not None and earlier.name != secret.name:
            raise InvalidInputError(
                f"{earlier.name} and {secret.name} would both be ${variable}; name one with "
                f"--secret {secret.name}=OTHER_NAME"
            )
        variables[variable] = secret
    for reference in references:
        earlier = variables.get(reference.variable)
        if earlier is not None:
            if earlier.name == reference.name and not reference.field:
                continue  # the same secret, both ways
            raise InvalidInputError(
                f"${reference.variable} is given twice: {earlier.name} (--service/--secret) and "
                f"{reference.origin}; leave one out{nothing_run}"
            )
        try:
            secret = _read_once(store, read, reference.name, named)
            if reference.field:
                field = select_field(secret.value.reveal(), secret.name, reference.field)
                secret = replace(secret, value=SecretValue(field))
        except (NotFoundError, InvalidInputError) as exc:  # said with where the reference is written
            raise restated(exc, f"{exc} ({reference.origin}){nothing_run}") from None
        variables[reference.variable] = secret
    for variable, secret in variables.items():
        if b"\0" in secret.value.reveal():
            raise InvalidInputError(
                f"the value of {secret.name} holds a NUL byte: it cannot be an environment variable "
                f"(${variable}){nothing_run}"
            )
    return Reading(variables, list(read.values()))


def _read_named(store: SecretStore, names: list[str]) -> dict[str, CurrentRead]:
    """The secrets `run` is given by name (--secret, references), read at once where the store
    reads many at one instant (our encrypted store): a few reads instead of a `get` each. Each
    read's error is raised where `_read_once` takes it, as its `get` raised it; a name that is
    not valid is left to that `get`, which says so. Elsewhere nothing is read ahead (a service
    audits each read, and a reading that fails earlier reads no further)."""
    if not isinstance(store, BulkReader):
        return {}
    valid = []
    for name in dict.fromkeys(names):
        try:
            valid.append(validate_name(name))
        except InvalidInputError:
            continue
    return {read.name: read for read in store.read_current(valid)} if valid else {}


def _read_once(
    store: SecretStore, read: dict[str, Secret], name: str, named: dict[str, CurrentRead]
) -> Secret:
    """NAME's current version, read from `store` (or taken from `named`, read ahead) only if
    this reading has not read it yet: a secret given twice (a reference and --secret, two fields)
    is one version."""
    if name not in read:
        ahead = named.get(name)
        if ahead is None:
            read[name] = store.get(name)
        elif ahead.error is not None:
            raise ahead.error
        else:
            assert ahead.secret is not None
            read[name] = ahead.secret
    return read[name]


def _read_env_files(paths: Iterable[str]) -> tuple[dict[str, bytes], dict[str, Reference]]:
    """The --env-file FILEs' variables: plain values, and references to secrets (a later file's
    line wins over an earlier one's, as a later line of one file does). Read whole before the
    store is opened: a mistake in any of them runs nothing."""
    values: dict[str, bytes] = {}
    references: dict[str, Reference] = {}
    for path in paths:
        data = read_small_file(Path(path), MAX_ENV_FILE_BYTES, f"--env-file {path}")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInputError(f"--env-file {path} is not UTF-8 text; nothing was run") from None
        for key, value, where in parse_env(text, f"--env-file {path}", "nothing was run"):
            origin = f"{path} {where}"
            if not _VARIABLE.fullmatch(key):
                raise InvalidInputError(
                    f"{origin}: {key!r} is not an environment variable name (letters, digits, '_'); "
                    "nothing was run"
                )
            values.pop(key, None)
            references.pop(key, None)
            reference = _reference(key, value, origin)
            if reference is not None:
                references[key] = reference
                continue
            try:
                encoded = value.encode("utf-8")
            except UnicodeEncodeError:  # an escape in double quotes made an unpaired surrogate
                raise InvalidInputError(f"{origin}: the value is not UTF-8 text; nothing was run") from None
            if b"\0" in encoded:
                raise InvalidInputError(
                    f"{origin}: the value holds a NUL byte, which no environment variable can hold; "
                    "nothing was run"
                )
            values[key] = encoded
    return values, references


def _environment_references() -> list[Reference]:
    """The variables of run's own environment whose whole value is a reference, as `op run`
    resolves them (in a container's or unit's environment: DB_PASSWORD=sm://auth/DB_PASSWORD).
    Never those withheld from COMMAND whatever the store: a master password or token that merely
    starts with sm:// is neither read as a reference nor refused as a malformed one."""
    references = []
    for key, value in os.environ.items():
        if value.startswith(REFERENCE_SCHEME) and key not in WITHHELD_VARIABLES:
            reference = _reference(key, value, f"${key} in the environment")
            assert reference is not None
            references.append(reference)
    return references


def _reference(variable: str, value: str, origin: str) -> Reference | None:
    """`value` as a reference to a secret, None if it is no reference (does not start with sm://);
    InvalidInputError for one that starts so but is malformed (never quoting it: it may be a
    password that happens to start so)."""
    if not value.startswith(REFERENCE_SCHEME):
        return None
    match = _REFERENCE.fullmatch(value)
    if match is None:
        raise InvalidInputError(
            f"{origin}: a value starting with {REFERENCE_SCHEME} must be a reference, "
            f"{REFERENCE_SCHEME}NAME or {REFERENCE_SCHEME}NAME#FIELD; nothing was run"
        )
    try:
        validate_name(match[1])
    except InvalidInputError:  # its message quotes the name, here the value
        raise InvalidInputError(
            f"{origin}: a value starting with {REFERENCE_SCHEME} must be a reference, and what "
            f"follows is no secret name (segments of letters, digits, '_', '.', '-' joined by '/', "
            f"each starting with a letter, digit or '_'; at most {MAX_NAME_LENGTH} characters); "
            "nothing was run"
        ) from None
    return Reference(variable, match[1], match[2] or "", origin)


def _references(
    inherited: list[Reference], from_files: dict[str, Reference], withheld: tuple[str, ...]
) -> list[Reference]:
    """The references `run` resolves: its environment's, less the variables it withholds from
    COMMAND anyway, and the env files'."""
    return [reference for reference in inherited if reference.variable not in withheld] + list(
        from_files.values()
    )


def _base_environment(
    withheld: tuple[str, ...], file_values: dict[str, bytes], references: list[Reference]
) -> dict[bytes, bytes]:
    """COMMAND's environment before its secrets: run's own, less the `withheld` variables and the
    references (their secrets replace them), with the env files' plain values over it."""
    dropped = {name.encode() for name in withheld} | {
        os.fsencode(reference.variable) for reference in references
    }
    environment = {key: value for key, value in os.environb.items() if key not in dropped}
    environment.update((key.encode(), value) for key, value in file_values.items())
    return environment


def _change_source(store: SecretStore, namespaces: tuple[str, ...], names: list[str]) -> ChangeSource:
    """Where `run --restart-on-change` hears of changes: the service's Watch stream (one
    namespace: only its prefix), else the local store's changes."""
    if is_remote_store(store):
        return WatchSource(store, f"{namespaces[0]}/" if len(namespaces) == 1 and not names else "")
    return FeedSource(store)


def credentials_that_reached(session: Session, store: SecretStore) -> tuple[str, ...]:
    """The variables of an identity `run` reached `store` with (beyond WITHHELD_VARIABLES)."""
    if is_remote_store(store):  # its client key reached it
        return (_CLIENT_KEY_VARIABLE,)
    if isinstance(external_location(session.store_url), AwsLocation) or (
        isinstance(store, EncryptedStore) and store.unlock_kind == AwsKmsUnlock.kind
    ):
        return AWS_CREDENTIAL_VARIABLES
    return ()


def service_variable_problems(entries: list[tuple[str, bytes]]) -> list[str]:
    """Why `run --service NS` would refuse secrets NS/KEY with these KEYs and values (it refuses the
    whole namespace for one of them): a variable that loads code, two keys that are one variable,
    a NUL byte. For `import`, which writes what `run --service` reads back."""
    problems = []
    seen: dict[str, str] = {}
    for key, value in entries:
        variable = _variable_for(key)
        if _LOADS_CODE.fullmatch(variable):
            problems.append(
                f"{key} would set ${variable}, which can choose the code programs run or whom they trust"
            )
        if variable in seen:
            problems.append(f"{seen[variable]} and {key} would both be ${variable}")
        seen.setdefault(variable, key)
        if b"\0" in value:
            problems.append(f"the value of {key} holds a NUL byte")
    return problems


def _single(text: str) -> tuple[str, str]:
    """`--secret NAME[=VAR]` as (name, variable)."""
    name, equals, variable = text.partition("=")
    validate_name(name)
    if equals and not variable:
        raise InvalidInputError(f"--secret {text}: give the variable's name after '=', or leave out '='")
    variable = variable or _variable_for(name.rsplit("/", 1)[-1])
    if not _VARIABLE.fullmatch(variable):
        raise InvalidInputError(f"{variable!r} is not an environment variable name (letters, digits, '_')")
    return name, variable


def _variable_for(relative_name: str) -> str:
    """'DB_PASSWORD' → DB_PASSWORD, 'db/password' → db_password, '2fa-seed' → _2fa_seed."""
    variable = _NOT_IN_VARIABLE.sub("_", relative_name)
    return variable if _VARIABLE.fullmatch(variable) else f"_{variable}"


def read_namespace(store: SecretStore, namespace: str) -> list[Secret]:
    """Every current secret under `namespace/` the caller may read: from a service one
    BatchGetSecrets, which its policy filters by `read` (a caller may read what it may not list);
    locally `read_current` of the prefix (our encrypted store: at one instant; Vault, AWS: list
    then get, a secret deleted in between skipped). A damaged record is its IntegrityError."""
    if is_remote_store(store):
        return store.get_many(prefix=f"{namespace}/")
    secrets = []
    for read in read_current(store, prefix=f"{namespace}/"):
        if isinstance(read.error, NotFoundError):
            continue  # no current version to give (or, on Vault or AWS, deleted since the list)
        if read.error is not None:
            raise read.error
        assert read.secret is not None
        secrets.append(read.secret)
    return secrets


def _program(command: tuple[str, ...]) -> str:
    """COMMAND's program, found in this process's PATH before any secret is added."""
    program = command[0] if "/" in command[0] else shutil.which(command[0])
    if program is None:
        raise CommandNotStarted(f"{command[0]}: command not found", EXIT_NOT_FOUND)
    return program


def _environment(
    command: tuple[str, ...], base: dict[bytes, bytes], variables: dict[str, Secret], *, warn: bool = True
) -> dict[bytes, bytes]:
    """`base` (_base_environment) plus the secrets (a secret wins over a variable already set,
    with a warning that names it)."""
    environment = dict(base)
    for variable, secret in variables.items():
        key = os.fsencode(variable)  # an environment's name that is not UTF-8 keeps its bytes
        if key in environment and warn:
            warning_line(f"${variable} was set; {secret.name} replaces it for {command[0]}")
        environment[key] = secret.value.reveal()
    return environment


def _not_started(
    command: tuple[str, ...], environment: dict[bytes, bytes], failure: OSError, variables: dict[str, Secret]
) -> CommandNotStarted:
    if isinstance(failure, FileNotFoundError):
        return CommandNotStarted(f"{command[0]}: command not found", EXIT_NOT_FOUND)
    if failure.errno == errno.E2BIG:
        return CommandNotStarted(_too_big(command[0], variables, environment), EXIT_CANNOT_EXECUTE)
    return CommandNotStarted(f"cannot run {command[0]}: {failure.strerror or failure}", EXIT_CANNOT_EXECUTE)


def _launch(command: tuple[str, ...]) -> Callable[[dict[bytes, bytes]], Launch]:
    """How the supervisor starts COMMAND (found now), given its environment before the secrets."""
    program = _program(command)
    warned: list[bool] = []

    def environment(base: dict[bytes, bytes], variables: dict[str, Secret]) -> dict[bytes, bytes]:
        made = _environment(command, base, variables, warn=not warned)  # warned at the first start
        warned.append(True)
        return made

    def not_started(
        base: dict[bytes, bytes], failure: OSError, variables: dict[str, Secret]
    ) -> CommandNotStarted:
        made = _environment(command, base, variables, warn=False)
        return _not_started(command, made, failure, variables)

    return lambda base: Launch(command, program, partial(environment, base), partial(not_started, base))


# What the Python interpreter sets to SIG_IGN at start-up (restored for a child by subprocess).
_PYTHON_IGNORES = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))


def _exec(command: tuple[str, ...], base: dict[bytes, bytes], variables: dict[str, Secret]) -> NoReturn:
    """Become COMMAND, with the secrets added to `base` (_base_environment)."""
    program = _program(command)
    environment = _environment(command, base, variables)

    def become(path: str, argv: list[str]) -> NoReturn:
        # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: the
        # program would get EPIPE instead of SIGPIPE (`yes | head -1` in it: "Broken pipe"). As
        # subprocess does (restore_signals), and so --restart-on-change, it gets the defaults;
        # if it cannot be run, ours come back (an error line to a closed pipe must not kill us).
        saved = {signum: signal.signal(signum, signal.SIG_DFL) for signum in _PYTHON_IGNORES}
        try:
            os.execve(path, argv, environment)  # noqa: S606  (the caller's own command, no shell)
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with_shell_fallback(program, command, become)
    except OSError as failure:
        raise _not_started(command, environment, failure, variables) from None


def _too_big(program: str, variables: dict[str, Secret], environment: dict[bytes, bytes]) -> str:
    """E2BIG, said as what it is here: the environment larger than the kernel takes (arguments and
    environment together, ARG_MAX), or one variable longer than it takes (MAX_ARG_STRLEN, 128 KiB on
    Linux: a secret is at most 64 KiB, so one from run's environment or an --env-file). Named by
    its variable, never its value."""
    if sys.platform.startswith("linux"):
        too_long = [key for key, value in environment.items() if len(key) + len(value) + 2 > MAX_ARG_STRLEN]
        if too_long:
            key = too_long[0]
            secret = variables.get(os.fsdecode(key))
            whence = (
                f"the value of {secret.name}"
                if secret is not None
                else "from run's environment or an --env-file"
            )
            return (
                f"cannot run {program}: ${os.fsdecode(key)} ({whence}) is "
                f"{(len(key) + len(environment[key]) + 2) / 1024:,.0f} KiB, longer than the "
                f"{MAX_ARG_STRLEN // 1024} KiB the kernel takes for one variable; shorten it or leave it out"
            )
    size = sum(len(secret.value) for secret in variables.values())
    total = sum(len(key) + len(value) + 2 for key, value in environment.items())
    if size * 2 < total:  # mostly not the secrets: run's own environment, the env files' values
        return (
            f"cannot run {program}: its environment of {total / 1024:,.0f} KiB ({len(variables)} "
            f"secret(s) of {size / 1024:,.0f} KiB, the rest from run's environment and any --env-file) "
            "is larger than the kernel takes (arguments and environment together: "
            f"{_arg_max()}); pass fewer variables"
        )
    return (
        f"cannot run {program}: {len(variables)} secret(s) of {size / 1024:,.0f} KiB in all make its "
        f"environment larger than the kernel takes (arguments and environment together: {_arg_max()}); "
        "pass fewer with --secret, or let the program read them itself with the SDK (get_credentials())"
    )


def _arg_max() -> str:
    try:
        return f"{os.sysconf('SC_ARG_MAX') // 1024:,} KiB"
    except (OSError, ValueError):
        return "the system's limit"


class CommandNotStarted(SecretsManagerError):
    """COMMAND did not start: exit with the shell's codes for that (126, 127), not ours."""

    kind = "command_not_started"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
