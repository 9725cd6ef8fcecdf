"""Choosing a replica among several service addresses (`--server A,B`, SECRETS_MANAGER_ADDR, the
SDK's address list) as RFC 8305 ("happy eyeballs") does: the order given is the preference, but a
blackholed first address (it accepts TCP and never answers) costs a short head start, not its
whole 3 s health-check timeout (client/remote.first_serving). Real `serve` processes, real TLS."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_manager.client import Client, RemoteStore, TlsFiles, _replicas, remote
from secrets_manager.client._config import RemoteTarget
from secrets_manager.errors import StorageError
from service_fixtures import (
    SCRIPT,
    SEED,
    Server,
    client_environ,
    eventually,
    free_address,
    make_pki,
    make_store,
    start_server,
    tls_files,
)
from tcp_proxy import TcpProxy, Verdict

CHECK_SECONDS = 3.0  # the CLI's health-check timeout for each of several addresses


class HungListener:
    """A port that accepts TCP connections and never answers (a blackholed or hung replica): it
    counts the connections made to it, notes when each was first sent something (`asked_at`,
    monotonic: the timings below are taken so, not around a whole command, whose interpreter
    start-up a loaded machine can stretch by seconds), and sees each one's end (the client closed
    its channel)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted = 0
        self.ended = 0
        self.asked_at: list[float] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="hung-listener", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._sockets.append(sock)
            threading.Thread(
                target=self._until_closed, args=(sock,), name="hung-listener", daemon=True
            ).start()

    def _until_closed(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if sock.recv(65536):  # the TLS hello
                with self._lock:
                    self.asked_at.append(time.monotonic())
            while sock.recv(65536):
                pass  # read and never answer
        with self._lock:
            self.ended += 1

    def close(self) -> None:
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def hung() -> Iterator[HungListener]:
    listener = HungListener()
    yield listener
    listener.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path, ("ops", "auth"))
    make_store(tmp_path)
    server = start_server(tmp_path)
    yield server
    server.stop()


def cli(server: Server, addresses: list[str], *args: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """The console script as ops against `addresses`, and how long it took."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(server.dir),
        "SECRETS_MANAGER_ADDR": ",".join(addresses),
        "SECRETS_MANAGER_CERT": str(server.dir / "ops.pem"),
        "SECRETS_MANAGER_KEY": str(server.dir / "ops-key.pem"),
        "SECRETS_MANAGER_CA": str(server.dir / "ca.pem"),
    }
    started = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, env=env, timeout=60, start_new_session=True
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc, time.monotonic() - started


def test_a_get_through_a_blackholed_first_address_pays_a_head_start_not_the_timeout(
    served: Server, hung: HungListener
) -> None:
    """`--server A,B` with A blackholed: every command waited A's whole 3 s health check before it
    asked B. Now B is asked after A's head start: the command takes about the head start more than
    one through B alone. Fails on the old code (3 s more). Measured from A's first bytes to B's,
    inside the command (not against a baseline run of it: its start-up varies by seconds on a
    loaded machine)."""
    b_asked: list[float] = []

    class NotingProxy(TcpProxy):
        def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
            if from_client and not b_asked:
                b_asked.append(time.monotonic())
            return Verdict.PASS

    b = NotingProxy("127.0.0.1", served.port)
    try:
        proc, _ = cli(served, [hung.address, b.address], "get", "auth/JWT_KEY")
    finally:
        b.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == SEED["auth/JWT_KEY"] + b"\n"
    assert hung.accepted >= 1 and hung.asked_at and b_asked  # A was asked first, then B
    waited = b_asked[0] - hung.asked_at[0]
    assert 0 < waited < 1.5, f"B was asked {waited:.2f} s after A"


def test_a_healthy_first_address_is_used_and_the_next_is_never_contacted(
    served: Server, hung: HungListener
) -> None:
    """A answers within its head start: the command runs on A, and B sees no connection at all."""
    before = len(served.audit_records())
    proc, _ = cli(served, [served.address, hung.address], "get", "auth/JWT_KEY")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == SEED["auth/JWT_KEY"] + b"\n"
    records = served.audit_records()[before:]
    assert [r["operation"] for r in records if r.get("name") == "auth/JWT_KEY"] == ["get"], records
    head_start = getattr(remote, "HEAD_START_SECONDS", 0.25)
    time.sleep(head_start)  # a connection the command made to B would have been accepted by now
    assert hung.accepted == 0


def test_a_first_address_that_says_not_serving_moves_to_the_next_at_once(tmp_path: Path) -> None:
    """A says NOT_SERVING (its audit log's lock held by a stuck process): B is asked at once,
    without waiting for A's head start, and serves the command; B's audit log has it."""
    make_pki(tmp_path, ("ops",))
    make_store(tmp_path)
    other = tmp_path / "a"  # A: its own store (a copy) and so its own audit log
    other.mkdir()
    for name in ("ca.pem", "server.pem", "server-key.pem", "policy.toml", "store.db"):
        shutil.copy2(tmp_path / name, other / name)
    (other / "server-key.pem").chmod(0o600)
    first = start_server(other, "a")
    second = start_server(tmp_path, "b")
    lock = os.open(other / "store.audit.jsonl.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        as_ops = {
            "SECRETS_MANAGER_CERT": str(tmp_path / "ops.pem"),
            "SECRETS_MANAGER_KEY": str(tmp_path / "ops-key.pem"),
        }
        assert eventually(lambda: first.cli("ops", "health", env=as_ops).returncode == 1, timeout=20)
        files = tls_files(tmp_path, "ops")
        started = time.monotonic()
        chosen = remote.first_serving(
            [lambda: RemoteStore(first.address, files), lambda: RemoteStore(second.address, files)],
            CHECK_SECONDS,
            head_start=5.0,  # far longer than this test allows: B may not wait for it
        )
        took = time.monotonic() - started
        assert chosen.index == 1 and chosen.store is not None
        assert chosen.store.address == second.address
        chosen.store.close()
        assert took < 3.0, took  # (not 1.5 s: two handshakes and checks on a loaded machine)
        before = len(second.audit_records())
        proc, _ = cli(second, [first.address, second.address], "get", "auth/JWT_KEY")
        assert proc.returncode == 0, proc.stderr
        assert any(r.get("name") == "auth/JWT_KEY" for r in second.audit_records()[before:])
    finally:
        os.close(lock)
        first.stop()
        second.stop()


def test_when_no_address_serves_the_error_names_each_as_before_within_one_timeout(
    served: Server, hung: HungListener
) -> None:
    """Two blackholed addresses and a refused one: the same one-line error and exit 1 as before,
    naming each address and why; their checks overlap, so it comes after about one timeout (3 s)
    rather than one per blackholed address (6 s on the old code)."""
    other = HungListener()
    refused = free_address()
    try:
        proc, _ = cli(served, [hung.address, other.address, refused], "get", "auth/JWT_KEY")
    finally:
        other.close()
    said = proc.stderr.decode()
    assert proc.returncode == 1 and said.count("\n") == 1, said
    assert f"no secrets-manager service is serving at {hung.address}, {other.address}, {refused} (" in said
    for address in (hung.address, other.address):
        assert f"{address} did not answer its health check within 3 s" in said
    assert f"{refused}: failed to connect" in said
    assert said.endswith("; try again\n")
    # The second blackholed address was asked a head start after the first, not a timeout (3 s)
    # after: measured inside the command, whose start-up a loaded machine stretches.
    assert hung.asked_at and other.asked_at
    waited = other.asked_at[0] - hung.asked_at[0]
    assert waited < CHECK_SECONDS - 1.5, f"the second was asked {waited:.2f} s after the first"


def test_health_checks_several_addresses_at_once(served: Server, hung: HungListener) -> None:
    """`health` with two blackholed addresses took one timeout per address; now about one, with
    the same output order and exit code. Fails on the old code (the second blackholed address
    asked after the first's 2 s timeout)."""
    other = HungListener()
    try:
        proc, _ = cli(
            served, [hung.address, served.address, other.address], "health", "--timeout", "2", "--json"
        )
    finally:
        other.close()
    assert proc.returncode == 1
    statuses = json.loads(proc.stdout)
    assert [(s["address"], s["status"]) for s in statuses] == [
        (hung.address, "UNREACHABLE"),
        (served.address, "SERVING"),
        (other.address, "UNREACHABLE"),
    ]
    assert statuses[0]["error"].startswith("DEADLINE_EXCEEDED")
    assert f"not serving: {hung.address} UNREACHABLE, {other.address} UNREACHABLE" in proc.stderr.decode()
    # Both blackholed addresses were asked together, not the second after the first's 2 s
    # timeout: measured inside the command, whose start-up a loaded machine stretches.
    assert hung.asked_at and other.asked_at
    waited = abs(other.asked_at[0] - hung.asked_at[0])
    assert waited < 1.5, f"the two were asked {waited:.2f} s apart"


def test_checks_not_chosen_are_cancelled_and_their_channels_closed(
    served: Server, hung: HungListener
) -> None:
    """first_serving leaves no channel or thread behind: the blackholed address's connection is
    closed (the listener sees its end) once B is chosen, and the threads gRPC started for the
    checks end."""
    files = tls_files(served.dir, "ops")
    warm = RemoteStore(served.address, files)  # gRPC's own lasting threads, started before counting
    assert warm.is_serving(5)
    warm.close()
    ours = {thread for thread in threading.enumerate() if thread.name == "hung-listener"}
    baseline_threads = {t for t in threading.enumerate() if t not in ours}
    for _ in range(3):
        chosen = remote.first_serving(
            [lambda: RemoteStore(hung.address, files), lambda: RemoteStore(served.address, files)],
            CHECK_SECONDS,
        )
        assert chosen.store is not None and chosen.index == 1
        chosen.store.close()
    assert hung.accepted == 3
    assert eventually(lambda: hung.ended == 3, timeout=5), (hung.accepted, hung.ended)

    def leftover() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name != "hung-listener" and t not in baseline_threads}

    assert eventually(lambda: not leftover(), timeout=5), leftover()


def test_a_mid_command_move_pays_a_head_start_for_a_blackholed_replica(
    tmp_path: Path, hung: HungListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read on A, which is gone, moves to the next replica that serves (`_move`): with B
    blackholed it waited B's whole 3 s check before asking C. Now C is asked after B's head start.
    Fails on the old code. (Each check has 10 s here, not 3 s: the bound below can leave a loaded
    machine seconds for the handshakes and still fail a wait for B's whole check.)"""
    monkeypatch.setattr(remote, "FAILOVER_HEALTH_CHECK_SECONDS", 10.0)
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    first = start_server(tmp_path, "a")
    third = start_server(tmp_path, "c")
    addresses = (first.address, hung.address, third.address)
    store = RemoteStore(first.address, tls_files(tmp_path, "auth"), replicas=addresses)
    try:
        assert store.get("auth/JWT_KEY").version == 1
        first.kill()
        started = time.monotonic()
        assert store.get("auth/JWT_KEY").value.reveal() == SEED["auth/JWT_KEY"]
        took = time.monotonic() - started
        assert store.address == third.address
        assert took < 3.0, took
    finally:
        store.close()
        first.kill()
        third.stop()


def test_fail_over_from_a_blackholed_replica_pays_a_head_start(tmp_path: Path, hung: HungListener) -> None:
    """`run --restart-on-change` / `watch` held on A whose stream broke: fail_over asked A for its
    health for the whole 3 s before it looked at B. Now B is asked after A's head start; and A,
    when it serves, stays. Fails on the old code. (A's check has 10 s here, not 3 s: the bound
    below can leave a loaded machine seconds for the handshakes and still fail a wait for it.)"""
    make_pki(tmp_path, ("auth",))
    make_store(tmp_path)
    second = start_server(tmp_path, "b")
    files = tls_files(tmp_path, "auth")
    store = RemoteStore(hung.address, files, replicas=(hung.address, second.address))
    staying = RemoteStore(second.address, files, replicas=(second.address, hung.address))
    try:
        started = time.monotonic()
        assert store.fail_over(10.0)
        took = time.monotonic() - started
        assert store.address == second.address
        assert took < 3.0, took
        assert store.get("auth/JWT_KEY").version == 1
        assert not staying.fail_over(CHECK_SECONDS)  # it serves: no move
        assert staying.address == second.address
    finally:
        store.close()
        staying.close()
        second.stop()


def test_the_sdk_watches_and_reads_through_the_next_address_after_a_head_start(
    served: Server, hung: HungListener
) -> None:
    """The SDK with a blackholed first address and a 3 s timeout: its first read waited for the
    watch stream, opened after the first address's whole health check, then read there first
    too. Now the stream opens on B after A's head start, and the read goes to B. Fails on the old
    code (over the timeout: 10 s here, so that the bound can leave a loaded machine seconds for
    the handshakes)."""
    client = Client(environ=client_environ(served.dir, "auth", [hung.address, served.address]), timeout=10.0)
    try:
        started = time.monotonic()
        value = client.get("auth/JWT_KEY").value.reveal()
        took = time.monotonic() - started
    finally:
        client.close()
    assert value == SEED["auth/JWT_KEY"]
    assert took < 3.0, took


class SlowProxy(TcpProxy):
    """A healthy replica slower to answer than the head start (far away, or loaded): what the
    server sends is held 0.2 s a chunk, so a handshake and a health check take about a second."""

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if not from_client:
            time.sleep(0.2)
        return Verdict.PASS


def test_the_sdk_watches_on_a_slower_replica_rather_than_race_the_one_that_refused_its_stream(
    served: Server,
) -> None:
    """The SDK's watch stream, refused by a replica at its watch-stream limit, is to go to
    another replica next. Raced beside the others after the head start, the refusing replica's
    quick SERVING beat a healthy replica slower than the head start, so the stream went back to
    it (and was refused again, with backoff, for as long as that lasted): the others are now
    asked first, the refusing one only if none serves. Fails on the old code (watched on the
    refusing replica)."""
    slow = SlowProxy("127.0.0.1", int(served.address.rpartition(":")[2]))
    tls = TlsFiles(served.dir / "auth.pem", served.dir / "auth-key.pem", served.dir / "ca.pem")
    replicas = _replicas._ServiceReplicas(RemoteTarget((served.address, slow.address), tls), 3.0)
    try:
        replicas._watch_refused_by = 0  # as the SDK's watcher marks it on RESOURCE_EXHAUSTED
        stream = replicas.open_watch()
        try:
            assert replicas._watching == 1  # the slow replica, not the one that refused
        finally:
            stream.close()
    finally:
        replicas.close()
        slow.close()


def test_the_sdk_says_why_no_replica_could_carry_its_watch_stream(
    served: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Half-way through a CA rotation a replica's new server certificate is not trusted by a client
    that still has only the old CA: the SDK logged "no service is serving at A, B" for its watch
    stream, though A was serving, with nothing that pointed at the certificates. Now the warning
    gives each address's reason, as the CLI does (the failed handshake and the CA file to check).
    Fails on the old code."""
    other = tmp_path / "other-ca"
    other.mkdir()
    make_pki(other, ("auth",))
    refused = free_address()
    environ = client_environ(served.dir, "auth", [served.address, refused])
    environ["SECRETS_MANAGER_CA"] = str(other / "ca.pem")  # trusts another CA than the servers'
    client = Client(environ=environ, timeout=3.0)
    try:
        with caplog.at_level("WARNING", logger="secrets_manager"), pytest.raises(StorageError):
            client.get("auth/JWT_KEY")
    finally:
        client.close()
    warned = [r.getMessage() for r in caplog.records if "no service is serving at" in r.getMessage()]
    assert warned, [r.getMessage() for r in caplog.records]
    assert f"TLS handshake with {served.address} failed" in warned[0]
    assert str(other / "ca.pem") in warned[0]
    assert f"{refused}: " in warned[0]
