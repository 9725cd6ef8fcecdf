"""Watch on a Vault (KV v2 test server) or AWS Secrets Manager (moto) store: the service polls the
store's snapshots (store/polled.py) for its Watch streams. Real serve processes, real mutual TLS,
the SDK's get_credentials and raw Watch streams; the backend's requests are counted where they
arrive (the KV v2 test server's log, the X-Amz-Target of each request through the proxy).

Every test here failed before: Watch was refused on these stores (UNIMPLEMENTED), so the SDK
refreshed by its TTL only."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from secrets_manager import get_credentials_sync
from secrets_manager.client import close_default_client
from secrets_manager.errors import InvalidInputError
from secrets_manager.service.config import load_config
from secrets_manager.v1 import secrets_pb2 as pb
from secrets_manager.wire import WATCH_HISTORY_KEY, WATCH_REVISION_KEY
from service_fixtures import SEED, Server, client_environ, eventually, start_server
from tcp_proxy import Verdict
from test_serve_external_stores import (  # noqa: F401 (fixtures)
    AUDIT,
    Backend,
    Switch,
    make_backend,
    serve,
    service_dir,
)

KINDS = ["vault", "aws"]
_TARGET = re.compile(rb"x-amz-target:\s*secretsmanager\.(\w+)", re.IGNORECASE)


class CountingSwitch(Switch):
    """The backend's proxy, noting each AWS action that passes (the header of each request)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.actions: list[str] = []

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if from_client:
            self.actions.extend(match.decode() for match in _TARGET.findall(data))
        return super().verdict(data, from_client=from_client)


@pytest.fixture
def counted_backend(make_backend: Callable[[str], Backend]) -> Callable[[str], Backend]:  # noqa: F811
    """`make_backend`, with AWS's proxy replaced by one that counts actions."""

    def make(kind: str) -> Backend:
        backend = make_backend(kind)
        if kind == "aws":
            original = backend.proxy
            counting = CountingSwitch(*original._target)
            backend.proxy = counting
            backend.env["AWS_ENDPOINT_URL"] = f"http://{counting.address}"
            original.close()
        return backend

    return make


def snapshot_reads(backend: Backend) -> int:
    """Requests that read the whole store: ListSecrets (AWS), the LIST of the mount's root (Vault)."""
    if backend.vault is not None:
        return sum(
            1
            for method, path in list(backend.vault.requests)
            if method == "LIST" and path.rstrip("/").endswith("/metadata")
        )
    assert isinstance(backend.proxy, CountingSwitch)
    return backend.proxy.actions.count("ListSecrets")


class Watcher:
    """One raw Watch stream, its events read into a queue by a thread."""

    def __init__(self, server: Server, request: pb.WatchRequest) -> None:
        self.call = server.stub("auth").Watch(request, timeout=60)
        metadata = dict(self.call.initial_metadata())
        self.revision = int(metadata[WATCH_REVISION_KEY])
        self.history = str(metadata.get(WATCH_HISTORY_KEY, ""))
        self.events: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as exc:
            self.events.put(exc)

    def next(self, timeout: float) -> Any:
        event = self.events.get(timeout=timeout)
        if isinstance(event, grpc.RpcError):
            raise event
        return event

    def close(self) -> None:
        self.call.cancel()


@contextmanager
def watching(server: Server, prefix: str = "auth/", **resume: Any) -> Iterator[Watcher]:
    watcher = Watcher(server, pb.WatchRequest(prefix=prefix, **resume))
    try:
        yield watcher
    finally:
        watcher.close()


@contextmanager
def sdk_for(server: Server, service_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # noqa: F811
    for name, value in client_environ(service_dir, "auth", [server.address]).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SECRETS_MANAGER_CACHE_TTL", "300")  # only a pushed change explains a refresh
    try:
        yield
    finally:
        close_default_client()


def seen_within(condition: Callable[[], bool], seconds: float) -> float | None:
    """How long `condition` took to hold (None: not within `seconds`)."""
    started = time.monotonic()
    if eventually(condition, seconds):
        return time.monotonic() - started
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_a_change_through_the_service_reaches_the_sdk_at_once_deleted_and_undeleted_too(
    kind: str,
    make_backend: Callable[[str], Backend],  # noqa: F811
    service_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SDK (TTL 300 s) on a service whose feed reads the backend only every 300 s by itself:
    a put, a delete and an undelete through the service reach get_credentials in about a second,
    as the service's poke makes its feed read the backend at once. Before: at the TTL."""
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend, "watch_poll_seconds = 300\n")
    try:
        with sdk_for(server, service_dir, monkeypatch):
            assert get_credentials_sync("auth")["DB_PASSWORD"].reveal() == SEED["auth/DB_PASSWORD"]

            def value() -> bytes | None:
                creds = get_credentials_sync("auth")
                return creds["DB_PASSWORD"].reveal() if "DB_PASSWORD" in creds else None

            written = server.cli("ops", "store", "auth/DB_PASSWORD", input=b"rotated-by-ops")
            assert written.returncode == 0, written.stderr
            took = seen_within(lambda: value() == b"rotated-by-ops", 5)
            assert took is not None and took < 1.5, took
            assert server.cli("ops", "delete", "auth/DB_PASSWORD").returncode == 0
            took = seen_within(lambda: value() is None, 5)
            assert took is not None and took < 1.5, took
            assert server.cli("ops", "undelete", "auth/DB_PASSWORD").returncode == 0
            took = seen_within(lambda: value() == b"rotated-by-ops", 5)
            assert took is not None and took < 1.5, took
    finally:
        server.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_a_change_made_in_the_backend_itself_reaches_a_watcher_within_the_poll_interval(
    kind: str,
    make_backend: Callable[[str], Backend],  # noqa: F811
    service_dir: Path,  # noqa: F811
) -> None:
    """Changes made beside the service (here: our store on the backend directly, as any other tool
    would) are found by the next poll, one second apart here: a new version as VERSION_ADDED with
    its number, a delete and an undelete as METADATA_CHANGED (as our own store's feed sends them),
    destroyed as SECRET_DESTROYED (AWS keeps it until the recovery window ends: Vault only)."""
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend, "watch_poll_seconds = 1\n")
    direct = backend.open()
    try:
        with watching(server) as watcher:
            steps: list[tuple[Callable[[], object], tuple[int, str, int]]] = [
                (
                    lambda: direct.put("auth/DB_PASSWORD", b"from-elsewhere"),
                    (pb.ChangeEvent.VERSION_ADDED, "auth/DB_PASSWORD", 2),
                ),
                (lambda: direct.delete("auth/JWT_KEY"), (pb.ChangeEvent.METADATA_CHANGED, "auth/JWT_KEY", 0)),
                (
                    lambda: direct.undelete("auth/JWT_KEY"),
                    (pb.ChangeEvent.METADATA_CHANGED, "auth/JWT_KEY", 0),
                ),
                (lambda: direct.put("auth/NEW", b"n"), (pb.ChangeEvent.VERSION_ADDED, "auth/NEW", 1)),
            ]
            if kind == "vault":
                steps.append(
                    (
                        lambda: direct.destroy_secret("auth/NEW"),
                        (pb.ChangeEvent.SECRET_DESTROYED, "auth/NEW", 0),
                    )
                )
            for change, expected in steps:
                change()
                started = time.monotonic()
                event = watcher.next(timeout=5)
                assert (event.kind, event.name, event.version) == expected
                assert time.monotonic() - started < 2.5  # one interval (1 s), a 0.2 s tick, a read
                assert event.revision > watcher.revision
            # Nothing else was sent (one event per change, none for other namespaces' secrets).
            direct.put("market-connector/BINANCE_SECRET", b"other")
            with pytest.raises(queue.Empty):
                watcher.next(timeout=2)
    finally:
        direct.close()
        server.stop()
    lines = [json.loads(line) for line in server.log_lines if line.startswith("{")]
    assert (
        next(line for line in lines if line.get("event") == "service.started")["watch"] == "polled every 1 s"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_from_another_serve_process_starts_with_resync(
    kind: str,
    make_backend: Callable[[str], Backend],  # noqa: F811
    service_dir: Path,  # noqa: F811
) -> None:
    """The feed's revisions are its process's own: a client resuming on a restarted service (with
    the history it was given, or without) is told to re-read what it caches."""
    backend = make_backend(kind)
    backend.seed(SEED)
    server = serve(service_dir, backend, "watch_poll_seconds = 1\n")
    try:
        with watching(server) as first:
            revision, history = first.revision, first.history
        assert history
    finally:
        server.stop()
    again = serve(service_dir, backend, "watch_poll_seconds = 1\n")
    try:
        for resume in ({"since_revision": revision, "since_history": history}, {"since_revision": revision}):
            with watching(again, **resume) as resumed:
                assert resumed.history != history
                event = resumed.next(timeout=5)
                assert event.kind == pb.ChangeEvent.RESYNC, resume
        # From its own stream's revision, it resumes without RESYNC.
        with watching(again) as own:
            mine = (own.revision, own.history)
        backend.seed({"auth/DB_PASSWORD": b"changed"})
        with watching(again, since_revision=mine[0], since_history=mine[1]) as resumed:
            event = resumed.next(timeout=5)
            assert (event.kind, event.name) == (pb.ChangeEvent.VERSION_ADDED, "auth/DB_PASSWORD")
    finally:
        again.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_the_backend_is_read_only_while_someone_watches_and_once_per_interval(
    kind: str,
    counted_backend: Callable[[str], Backend],
    service_dir: Path,  # noqa: F811
) -> None:
    """No snapshot while no stream is open; about one per watch_poll_seconds (here 1 s) while
    streams are open, however many (the hub asks the feed every 0.2 s; three streams share one
    poller); none again once they have closed."""
    backend = counted_backend(kind)
    backend.seed(SEED)
    server = start_server(
        service_dir,
        store=backend.url,
        settings=AUDIT + "watch_poll_seconds = 1\n",
        environment=backend.env,
        metrics=True,
    )

    def streams() -> float:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            found = re.search(r"^secrets_manager_watch_streams (\S+)$", answer.read().decode(), re.MULTILINE)
        assert found is not None
        return float(found[1])

    try:
        time.sleep(2)
        assert snapshot_reads(backend) == 0
        with watching(server), watching(server), watching(server, prefix=""):
            time.sleep(4)
        closed = snapshot_reads(backend)
        assert 3 <= closed <= 6, closed  # the baseline and one a second
        # The service learns of the cancellations a moment after the client sends them (CI once
        # saw a read land in that moment; a loaded machine may take longer): from when it has, a
        # read already under way may still land, and then none.
        assert eventually(lambda: streams() == 0)
        left = snapshot_reads(backend)
        time.sleep(1.5)
        reads = snapshot_reads(backend)
        assert reads - left <= 1, (left, reads)
        time.sleep(2.5)  # more than two intervals: a poller still running would have read twice
        assert snapshot_reads(backend) == reads
    finally:
        server.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_is_not_held_by_a_poll_of_a_backend_that_does_not_answer(
    kind: str,
    make_backend: Callable[[str], Backend],  # noqa: F811
    service_dir: Path,  # noqa: F811
) -> None:
    """Vault or AWS accepts connections but answers nothing while the poller reads a snapshot:
    SIGTERM waited 5 s for that read (the poller's join) on top of the grace, 5.4 s here with no
    call in flight. The poller is left to its daemon thread: serve exits at once, exit 0."""
    backend = make_backend(kind)
    backend.seed(SEED)
    # The stop record and the log's last flush wait for the store too, at most the audit timeout
    # and a second (docs/audit.md: serve.stop); 1 s here, so what is measured is the poller's hold.
    backend.env["SECRETS_MANAGER_AUDIT_TIMEOUT"] = "1"
    server = serve(service_dir, backend, "watch_poll_seconds = 1\n")
    with watching(server):
        time.sleep(1.5)  # the baseline is read; the next poll comes within a second
        backend.proxy.verdict = lambda data, *, from_client: Verdict.SWALLOW  # type: ignore[method-assign]
        time.sleep(2.5)  # the poller is inside a read that gets no answer
        started = time.monotonic()
        server.stop()
    took = time.monotonic() - started
    assert server.process.returncode == 0
    assert took < 4.5, took  # the join alone was 5 s; 3.7 s at a load of 20-40 on two cores


@pytest.mark.parametrize(
    ("line", "expected"),
    [("", None), ("watch_poll_seconds = 0", 0.0), ("watch_poll_seconds = 2.5", 2.5)],
)
def test_watch_poll_seconds_is_read_from_the_config(
    tmp_path: Path, line: str, expected: float | None
) -> None:
    assert load_config(_config(tmp_path, line)).watch_poll_seconds == expected


@pytest.mark.parametrize("value", ["0.1", "true", '"10"', "-1", "3601"])
def test_a_watch_poll_seconds_out_of_range_is_refused_in_one_line(tmp_path: Path, value: str) -> None:
    with pytest.raises(
        InvalidInputError, match=r"watch_poll_seconds must be 0 \(no Watch .*\) or 0\.2\.\.3600"
    ):
        load_config(_config(tmp_path, f"watch_poll_seconds = {value}"))


def _config(directory: Path, line: str) -> Path:
    path = directory / "server.toml"
    path.write_text(f'policy = "p.toml"\n{line}\n[tls]\ncert = "c"\nkey = "k"\nclient_ca = "ca"\n')
    return path
