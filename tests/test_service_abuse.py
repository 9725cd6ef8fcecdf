"""What one misbehaving or hostile client can do to the service and to everyone else using it.

Each test is an attack measured on a real `serve` (or the service built in this process where a
constant must be made small): connections that never finish a TLS handshake, handshakes without a
certificate, HTTP/2 streams opened and reset in a loop, oversized requests. The numbers measured
before the fixes are in the docstrings.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_fixtures import Server, make_pki, make_store, start_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    make_pki(tmp_path)
    make_store(tmp_path)
    running = start_server(tmp_path)
    yield running
    running.stop()


def _no_certificate_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context


def test_failed_handshakes_do_not_write_a_log_line_each(server: Server) -> None:
    """gRPC's core logged every failed handshake on serve's stderr ("I1201 … ssl_transport_security.cc
    … Handshake failed", not JSON, naming no peer): anyone who could reach the port, without a
    certificate, wrote a line per connection: 13,506 lines in 15 s from one client (900 a second),
    three per round of plain HTTP/1.1, HTTP/2 without TLS and random bytes. Fails on the old code."""
    context = _no_certificate_context()
    for attempt in range(30):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            if attempt % 2:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS at all
                raw.recv(100)
                continue
            with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(raw) as tls:
                tls.recv(1)  # TLS without a client certificate: refused
    time.sleep(0.5)  # the core writes its lines from its own threads
    server.stop()
    core_lines = [line for line in server.log_lines if not line.startswith("{")]
    assert core_lines == [], core_lines[:3]
