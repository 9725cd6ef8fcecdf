"""The SDK's parts that need no service: configuration, the cache, `Credentials`, the public names."""

from __future__ import annotations

import pickle
import random
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import secrets_manager
from secrets_manager import client as sdk
from secrets_manager.client import AmbiguousNameError, Client, Credentials
from secrets_manager.client._cache import Reachability, TtlCache
from secrets_manager.client._config import LocalTarget, RemoteTarget, resolve_config
from secrets_manager.errors import InvalidInputError, UnlockError, UnsafeConfigurationError
from secrets_manager.otp import NotATotpSeedError
from secrets_manager.values import REDACTED, SecretValue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the public surface --------------------------------------------------------------------------


def test_public_names_change_only_on_purpose() -> None:
    assert sorted(sdk.__all__) == [
        "AmbiguousNameError",
        "AsyncClient",
        "Client",
        "Credentials",
        "RemoteStore",
        "SecretChanged",
        "SecretRedactionFilter",
        "Subscription",
        "TlsFiles",
        "aclose_default_client",
        "close_default_client",
        "default_client",
        "get_credentials",
        "get_credentials_sync",
        "install_log_redaction",
    ]
    sdk_names = {"AsyncClient", "Client", "Credentials", "get_credentials", "get_credentials_sync"}
    assert sdk_names | {"install_log_redaction"} <= set(secrets_manager.__all__)
    for name in secrets_manager.__all__:
        assert hasattr(secrets_manager, name)


# ---- configuration -------------------------------------------------------------------------------


_TLS = sdk.TlsFiles(Path("c.pem"), Path("k.pem"), Path("ca.pem"))


def test_production_without_an_address_is_an_error_that_names_the_variable() -> None:
    with pytest.raises(UnsafeConfigurationError, match="SECRETS_MANAGER_ADDR is not set"):
        Client(environ={"SHRIVENQUANT_ENV": "production", "MASTER_PASSWORD": "would work in dev"})


def test_several_comma_separated_addresses_are_tried_in_order(tmp_path: Path) -> None:
    env = {
        "SECRETS_MANAGER_ADDR": " a.internal:7443, b.internal:7443 ,",
        "SECRETS_MANAGER_CERT": str(tmp_path / "c.pem"),
        "SECRETS_MANAGER_KEY": str(tmp_path / "k.pem"),
        "SECRETS_MANAGER_CA": str(tmp_path / "ca.pem"),
    }
    target = resolve_config(environ=env).target
    assert isinstance(target, RemoteTarget)
    assert target.addresses == ("a.internal:7443", "b.internal:7443")
    assert target.tls.cert == tmp_path / "c.pem"


def test_the_local_store_description_never_shows_a_database_password() -> None:
    env = {
        "SECRETS_MANAGER_STORE": "postgresql://app:hunter2-db-pass@db.internal:5432/secrets",
        "MASTER_PASSWORD": "dev only",
    }
    description = resolve_config(environ=env).description
    assert description == "local store postgresql://app@db.internal:5432/secrets"
    assert "hunter2" not in description


def test_an_address_without_the_client_certificate_names_what_is_missing() -> None:
    env = {"SECRETS_MANAGER_ADDR": "a:1", "SECRETS_MANAGER_CA": "/ca.pem"}
    with pytest.raises(InvalidInputError, match="SECRETS_MANAGER_CERT, SECRETS_MANAGER_KEY are not"):
        resolve_config(environ=env)


@pytest.mark.parametrize(
    # "\u00b2" (superscript two) passed str.isdigit() and then failed int(): an internal error.
    "address",
    [
        "nohost",
        "host:",
        "host:http",
        ":7443",
        "host:70000",
        "host:\u00b2",
        "host:\u0667\u0664\u0664\u0663",
        "127.0.0.1\x00x:7443",  # gRPC would cut the host at the NUL
        "secrets internal:7443",
    ],
)
def test_a_malformed_address_is_refused(address: str) -> None:
    """Named as where it came from: the argument, or the variable."""
    with pytest.raises(InvalidInputError, match=r"^addresses: .* is not host:port"):
        resolve_config(address, environ={})
    with pytest.raises(InvalidInputError, match=r"^SECRETS_MANAGER_ADDR: .* is not host:port"):
        resolve_config(environ={"SECRETS_MANAGER_ADDR": address})


@pytest.mark.parametrize("address", ["::1:7443", "fd00::5:7443", "[::1:7443", "[not-ipv6]:7443"])
def test_an_ipv6_address_outside_brackets_is_refused_saying_how_to_write_it(address: str) -> None:
    """'::1:7443' passed the host:port check and failed in gRPC's resolver ("Misformatted domain
    name", exit 1), or, as one of several addresses, was passed over as a replica that is down."""
    with pytest.raises(
        InvalidInputError, match=re.escape("an IPv6 address goes in brackets, e.g. [::1]:7443")
    ):
        resolve_config(address, environ={})
    given = "[::1]:7443, [fd00::5]:7443, dns:///secrets.internal:7443"  # a gRPC target too, as before
    assert resolve_config(given, tls=_TLS, environ={}).target.addresses == (  # type: ignore[union-attr]
        "[::1]:7443",
        "[fd00::5]:7443",
        "dns:///secrets.internal:7443",
    )


def test_an_address_given_twice_is_tried_once() -> None:
    """'A,A,B' asked A twice before B: a hung A cost two health checks (two timeouts) per
    command, and `health` listed it twice."""
    target = resolve_config("a.internal:7443, b.internal:7443,a.internal:7443", tls=_TLS, environ={}).target
    assert isinstance(target, RemoteTarget)
    assert target.addresses == ("a.internal:7443", "b.internal:7443")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"addresses": 7443}, "addresses are 'host:port' text or a list of them, not int"),
        ({"addresses": ["a:1", None]}, "addresses are 'host:port' text or a list of them, not NoneType"),
        ({"addresses": "a:1", "ttl": "5"}, "SECRETS_MANAGER_CACHE_TTL must be a number of seconds, not str"),
        (
            {"addresses": "a:1", "timeout": True},
            "SECRETS_MANAGER_TIMEOUT must be a number of seconds, not bool",
        ),
    ],
)
def test_client_options_of_the_wrong_type_are_named(options: dict[str, object], problem: str) -> None:
    """Found by fuzzing the SDK: Python's own words ("'int' object is not iterable", "'NoneType'
    object has no attribute 'strip'", "'<=' not supported between 'float' and 'str'")."""
    with pytest.raises(InvalidInputError, match=re.escape(problem)):
        tls = sdk.TlsFiles(Path("c.pem"), Path("k.pem"), Path("ca.pem"))
        resolve_config(**options, tls=tls, environ={})  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["https://secrets.internal:7443", "HTTP://secrets.internal:7443/"])
def test_a_url_as_the_address_is_refused_saying_what_to_give(address: str) -> None:
    """VAULT_ADDR's habit: 'https://HOST:PORT' passed the host:port check (host 'https://HOST') and
    failed in gRPC's resolver with 'Misformatted domain name'."""
    with pytest.raises(
        InvalidInputError, match=r"is a URL; give host:port without .* \(e\.g\. secrets\.internal:7443\)"
    ):
        resolve_config(address, environ={})


def test_certificate_paths_given_as_text_are_read_as_paths(tmp_path: Path) -> None:
    """Found by fuzzing the SDK: TlsFiles(cert="client.pem", ...) with text paths failed the first
    read with "'str' object has no attribute 'open'" (AttributeError), not the file's problem."""
    tls = sdk.TlsFiles(cert=str(tmp_path / "client.pem"), key="client-key.pem", ca="ca.pem")  # type: ignore[arg-type]
    assert tls.cert == tmp_path / "client.pem" and tls.key == Path("client-key.pem")
    missing = "client.pem (SECRETS_MANAGER_CERT) does not exist"
    with (
        Client("127.0.0.1:1", tls=tls, timeout=1) as client,
        pytest.raises(secrets_manager.errors.NotFoundError, match=re.escape(missing)),
    ):
        client.get("auth/DB_PASSWORD")
    with pytest.raises(TypeError, match="not int"):
        sdk.TlsFiles(cert=1, key="k", ca="c")  # type: ignore[arg-type]


def test_development_without_an_address_or_a_password_says_both_ways_out() -> None:
    with pytest.raises(UnlockError, match=r"set SECRETS_MANAGER_ADDR .* MASTER_PASSWORD_FILE"):
        resolve_config(environ={"SHRIVENQUANT_ENV": "development"})


def test_a_master_password_variable_that_is_not_utf8_is_refused_without_repeating_it() -> None:
    """Bytes that are not UTF-8 in MASTER_PASSWORD (Python decodes them with surrogateescape) made
    resolve_config raise UnicodeEncodeError, which carries the whole password and shows it in its
    repr."""
    with pytest.raises(UnlockError, match="MASTER_PASSWORD is not UTF-8 text") as refused:
        resolve_config(environ={"MASTER_PASSWORD": "hunter2-\udcff-password"})
    for shown in (str(refused.value), repr(refused.value)):
        assert "hunter2" not in shown
    assert refused.value.__cause__ is None and refused.value.__context__ is None


def test_development_fallback_keeps_the_password_out_of_repr(tmp_path: Path) -> None:
    config = resolve_config(
        environ={"MASTER_PASSWORD": "hunter2-password", "SECRETS_MANAGER_STORE": str(tmp_path / "s.db")}
    )
    assert isinstance(config.target, LocalTarget)
    assert config.target.read_password() == b"hunter2-password"
    assert "hunter2" not in repr(config)
    password_file = tmp_path / "pw"
    password_file.write_text("from-a-file\n")
    file_target = resolve_config(environ={"MASTER_PASSWORD_FILE": str(password_file)}).target
    assert isinstance(file_target, LocalTarget) and file_target.read_password() == b"from-a-file"


def test_a_password_file_is_read_up_to_64_kib_as_the_cli_reads_it(tmp_path: Path) -> None:
    """MASTER_PASSWORD_FILE=/dev/zero filled memory: the file was read whole."""
    largest = tmp_path / "largest"
    largest.write_bytes(b"p" * 65536)
    target = resolve_config(environ={"MASTER_PASSWORD_FILE": str(largest)}).target
    assert isinstance(target, LocalTarget) and target.read_password() == b"p" * 65536
    too_large = tmp_path / "too-large"
    too_large.write_bytes(b"p" * 65537)
    target = resolve_config(environ={"MASTER_PASSWORD_FILE": str(too_large)}).target
    assert isinstance(target, LocalTarget)
    with pytest.raises(InvalidInputError, match=f"password file {too_large} is larger than 65536 bytes"):
        target.read_password()


def test_a_password_file_that_never_ends_is_refused_without_filling_memory() -> None:
    """In a child limited to 1 GiB of address space, so the old code fails with MemoryError
    instead of taking the machine's memory."""
    script = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from secrets_manager.client._config import resolve_config\n"
        "from secrets_manager.errors import InvalidInputError\n"
        "target = resolve_config(environ={'MASTER_PASSWORD_FILE': '/dev/zero'}).target\n"
        "try:\n"
        "    target.read_password()\n"
        "except InvalidInputError as exc:\n"
        "    print(exc)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert (
        child.stdout == "password file /dev/zero is larger than 65536 bytes; is /dev/zero the right file?\n"
    )


def test_cache_settings_come_from_arguments_then_the_environment() -> None:
    env = {
        "MASTER_PASSWORD": "x" * 8,
        "SECRETS_MANAGER_CACHE_TTL": "60",
        "SECRETS_MANAGER_STALE_IF_ERROR": "0",
    }
    config = resolve_config(environ=env, stale_if_error=7)
    assert (config.ttl, config.stale_if_error) == (60.0, 7.0)
    with pytest.raises(InvalidInputError, match="SECRETS_MANAGER_CACHE_TTL"):
        resolve_config(environ={**env, "SECRETS_MANAGER_CACHE_TTL": "soon"})


# ---- the cache -----------------------------------------------------------------------------------


def test_ttl_is_jittered_downwards_within_the_bound() -> None:
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(100.0, jitter=0.1, clock=clock, rng=random.Random(7))
    lifetimes = []
    for i in range(200):
        cache.put(f"k{i}", i, started=clock.now)
        entry = cache.get(f"k{i}")
        assert entry is not None
        lifetimes.append(entry.fresh_until - clock.now)
    assert 90.0 <= min(lifetimes) < 92.0 and 98.0 < max(lifetimes) <= 100.0


def test_an_older_fetch_never_overwrites_a_newer_one() -> None:
    clock = FakeClock()
    cache: TtlCache[str, str] = TtlCache(10.0, clock=clock)
    assert cache.put("k", "new", started=5.0)
    assert not cache.put("k", "old", started=4.0)
    entry = cache.get("k")
    assert entry is not None and entry.value == "new"


def test_a_change_event_outdates_fetches_begun_before_it() -> None:
    clock = FakeClock()
    cache: TtlCache[str, str] = TtlCache(10.0, clock=clock)
    began = clock.now
    clock.now += 1
    cache.outdate("k")  # the event arrives while that fetch is in flight
    assert not cache.put("k", "value from before the change", started=began)
    assert cache.put("k", "value after the change", started=clock.now)


def test_a_reader_sees_one_generation_of_a_batch() -> None:
    cache: TtlCache[str, str] = TtlCache(10.0)
    cache.put_many({"key": "v1", "secret": "v1"}, started=1.0)
    before = cache.entries()
    cache.put_many({"key": "v2", "secret": "v2"}, started=2.0, drop=["gone"])
    assert {k: e.value for k, e in before.items()} == {"key": "v1", "secret": "v1"}
    assert {k: e.value for k, e in cache.entries().items()} == {"key": "v2", "secret": "v2"}


def test_expired_values_are_kept_for_stale_serving() -> None:
    clock = FakeClock()
    cache: TtlCache[str, str] = TtlCache(10.0, clock=clock)
    cache.put("k", "v", started=clock.now)
    cache.expire("k")
    entry = cache.get("k")
    assert entry is not None and entry.value == "v" and entry.fresh_until < clock.now


def test_stale_values_may_be_served_only_within_the_bound_from_the_outage_start() -> None:
    clock = FakeClock()
    reach = Reachability(2.0, clock=clock)
    assert not reach.may_serve_stale(clock.now)
    assert reach.failed() and not reach.failed()  # the first failure starts the outage
    clock.now += 1.9
    assert reach.may_serve_stale(clock.now)
    clock.now += 0.2
    assert not reach.may_serve_stale(clock.now)
    assert reach.succeeded() and not reach.succeeded()
    assert reach.outage_since is None


# ---- Credentials ---------------------------------------------------------------------------------


def test_credentials_are_a_read_only_mapping_that_shows_names_only() -> None:
    creds = Credentials({"auth/DB_PASSWORD": SecretValue(b"pa55word-XYZ")}, stale=True)
    assert creds["auth/DB_PASSWORD"].reveal() == b"pa55word-XYZ"
    assert creds.get("missing") is None and len(creds) == 1 and "auth/DB_PASSWORD" in creds
    assert creds.stale
    logged = "%s" % (creds,)  # noqa: UP031 (the %-formatting logging uses)
    for text in (repr(creds), str(creds), f"{creds}", f"{creds!r}", logged, str(dict(creds))):
        assert "pa55word" not in text
    assert repr(creds) == "Credentials(['auth/DB_PASSWORD'], stale=True)"
    assert REDACTED in str(dict(creds))
    with pytest.raises(TypeError):
        creds["auth/DB_PASSWORD"] = SecretValue(b"x")  # type: ignore[index]
    with pytest.raises(TypeError):
        pickle.dumps(creds)


def test_a_name_missing_from_empty_credentials_says_they_are_empty() -> None:
    """get_credentials("typo-ns") returns no secret and no error; the KeyError said only the name."""
    with pytest.raises(KeyError, match="these credentials are empty"):
        Credentials({})["BINANCE_API_KEY"]
    assert Credentials({}).get("BINANCE_API_KEY") is None
    with pytest.raises(KeyError) as caught:
        Credentials({"auth/DB_PASSWORD": SecretValue(b"x")})["BINANCE_API_KEY"]
    assert caught.value.args == ("BINANCE_API_KEY",)


def test_a_name_missing_from_credentials_says_what_they_hold() -> None:
    """market-connector asking for auth's secret (`creds["DB_PASSWORD"]`), or a full name of
    credentials read by namespace (whose keys are short), saw only `KeyError: 'DB_PASSWORD'`."""
    held = {f"market-connector/KEY_{n}": SecretValue(b"value-SEEKRIT") for n in range(7)}
    with pytest.raises(KeyError) as caught:
        Credentials(held)["DB_PASSWORD"]
    assert caught.value.args == ("DB_PASSWORD",)  # as a dict's KeyError
    said = str(caught.value)
    assert said.startswith("'DB_PASSWORD' is not in these credentials, by full name or as the last part")
    assert "they hold 7: market-connector/KEY_0, " in said and "KEY_4, and 2 more" in said
    assert "KEY_5" not in said and "policy explain" in said and "SEEKRIT" not in said
    by_namespace = Credentials({"BINANCE_API_KEY": SecretValue(b"k"), "BINANCE_SECRET": SecretValue(b"s")})
    with pytest.raises(KeyError) as caught:
        by_namespace["market-connector/BINANCE_API_KEY"]
    assert str(caught.value).startswith(
        "'market-connector/BINANCE_API_KEY' is not in these credentials; they hold 2: BINANCE_API_KEY, "
        "BINANCE_SECRET"
    )
    assert pickle.loads(pickle.dumps(caught.value)).args == ("market-connector/BINANCE_API_KEY",)  # noqa: S301 (our own bytes)


def test_a_short_name_finds_the_one_secret_it_ends_and_never_guesses_between_two() -> None:
    creds = Credentials(
        {
            "market-connector/BINANCE_API_KEY": SecretValue(b"mc-key"),
            "auth/DB_PASSWORD": SecretValue(b"auth-db"),
            "reporting/DB_PASSWORD": SecretValue(b"reporting-db"),
            "BINANCE_SECRET": SecretValue(b"default-namespace"),
        }
    )
    assert creds["BINANCE_API_KEY"].reveal() == b"mc-key"  # the seed's creds.get("BINANCE_API_KEY")
    assert creds["BINANCE_SECRET"].reveal() == b"default-namespace"
    assert "BINANCE_API_KEY" in creds and "DB_PASSWORD" not in creds
    assert sorted(creds) == sorted(creds._values)  # iteration: full names only
    with pytest.raises(AmbiguousNameError, match="auth/DB_PASSWORD, reporting/DB_PASSWORD") as caught:
        creds["DB_PASSWORD"]
    assert "auth-db" not in str(caught.value) and "reporting-db" not in str(caught.value)
    with pytest.raises(AmbiguousNameError):
        creds.get("DB_PASSWORD")  # ambiguity is a bug to fix, not an absent secret
    assert creds.get("MISSING") is None
    with pytest.raises(KeyError):
        creds["other/BINANCE_API_KEY"]  # a name with a namespace means exactly that name


def test_a_key_that_is_not_text_is_missing_as_from_a_dict() -> None:
    """`creds.get(os.environ.get("KEY_NAME"))` with the variable unset: a Mapping's get gives the
    default for a key it does not hold (dict does), and `creds[None]` is a KeyError; both raised
    TypeError ("argument of type 'NoneType' is not iterable") from the short-name lookup."""
    creds = Credentials({"auth/DB_PASSWORD": SecretValue(b"x")})
    for key in (None, 5, b"auth/DB_PASSWORD", 1.5):
        assert creds.get(key) is None  # type: ignore[arg-type]
        assert key not in creds
        with pytest.raises(KeyError):
            creds[key]  # type: ignore[index]
    with pytest.raises(KeyError, match="these credentials are empty"):
        Credentials({})[None]  # type: ignore[index]


def test_a_value_that_is_not_text_is_refused_without_carrying_it() -> None:
    """`creds[NAME].reveal_text()` and `creds.totp(NAME)` of bytes that are not UTF-8: the error
    was raised `from None` inside the except block, which only hides the UnicodeDecodeError: it
    stayed its __context__, whose `.object` (and repr) is the whole value, as `put` of a lone
    surrogate once carried it."""
    value = SecretValue(b"\xffnot-text-SEEKRIT")
    with pytest.raises(ValueError, match="not UTF-8") as caught:
        value.reveal_text()
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    with pytest.raises(NotATotpSeedError, match="not text") as refused:
        Credentials({"broker/TOTP": value}).totp("broker/TOTP")
    assert refused.value.__context__ is None and refused.value.__cause__ is None


def test_a_totp_refused_carries_no_frame_holding_the_value() -> None:
    """`creds.totp(NAME)` of a secret that holds no TOTP seed (an API key asked for by mistake, a
    URI with a bad period): the error's traceback held the revealed value in the parser's locals
    (`raw`, `text`, `seed`), which error trackers such as Sentry show, unlike the SDK's other errors."""
    creds = Credentials(
        {
            "svc/API_KEY": SecretValue(b"not-a-seed-SEEKRIT"),
            "svc/LOGIN": SecretValue(b"otpauth://totp/x?secret=SEEKRITSEEDXYZAB&period=x"),
        }
    )
    for name in ("API_KEY", "svc/LOGIN"):
        with pytest.raises(NotATotpSeedError) as caught:
            creds.totp(name)
        shown = "".join(
            traceback.TracebackException.from_exception(caught.value, capture_locals=True).format()
        )
        assert "SEEKRIT" not in shown and "holds no TOTP seed" in shown
        chained = [caught.value, caught.value.__cause__, caught.value.__context__]
        assert all(link is None or link.__traceback__ is None for link in chained[1:])  # nor theirs
        assert not any(
            "SEEKRIT" in repr(frame.f_locals) for frame, _ in traceback.walk_tb(chained[0].__traceback__)
        )
    with pytest.raises(KeyError, match="MISSING"):
        creds.totp("MISSING")


def test_keepalive_pings_stay_within_what_the_service_permits() -> None:
    """The SDK's keepalive (which notices a hung replica) must never ping an idle watch stream more
    often than the service allows, or it would answer GOAWAY too_many_pings and end the stream."""
    from secrets_manager.client import _replicas
    from secrets_manager.wire import MIN_PING_INTERVAL_WITHOUT_DATA_MS

    options = dict(_replicas.CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] > MIN_PING_INTERVAL_WITHOUT_DATA_MS
    assert options["grpc.http2.max_pings_without_data"] == 0  # keep pinging an idle stream
    assert options.get("grpc.keepalive_permit_without_calls", 0) == 0
    assert options["grpc.keepalive_time_ms"] + options["grpc.keepalive_timeout_ms"] <= 20_000
