"""A TCP proxy on 127.0.0.1 in front of a real server, for tests of what a client does when the
network misbehaves: a subclass decides, chunk by chunk, whether data passes, is swallowed (the
connection stays open, unanswered) or ends the connection (both sides closed)."""

from __future__ import annotations

import contextlib
import enum
import socket
import threading


class Verdict(enum.Enum):
    PASS = "pass"
    SWALLOW = "swallow"  # nothing goes on; the connection stays open
    CUT = "cut"  # both sides are closed


class TcpProxy:
    """Listens on 127.0.0.1 (`address`, `port`) and connects each client to `host:port`."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        """What happens to `data` on its way (overridden: everything passes here)."""
        return Verdict.PASS

    def close(self) -> None:
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:  # closed: the test is over
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:  # the server is gone (the test ends): so is this connection
                downstream.close()
                continue
            self._sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                verdict = self.verdict(data, from_client=from_client)
                if verdict is Verdict.CUT:
                    break
                if verdict is Verdict.PASS:
                    sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                self._end(sock)

    def _end(self, sock: socket.socket) -> None:
        """How a connection's socket ends once either side has ended or been cut."""
        sock.close()


class AnswerCut(TcpProxy):
    """Passes the client's request that holds `trigger` on, then resets the connection when the
    server's answer to it comes back, once (both sockets shut down: the client sees the end at
    once): the request was carried out, its answer lost."""

    def __init__(self, host: str, port: int, trigger: bytes) -> None:
        super().__init__(host, port)
        self._trigger = trigger
        self.armed = self.cut = False

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if from_client and not self.cut and self._trigger in data:
            self.armed = True
        elif not from_client and self.armed and not self.cut:
            self.cut = True
            return Verdict.CUT
        return Verdict.PASS

    def _end(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class SilentServer:
    """A listening socket on 127.0.0.1 that accepts connections, reads nothing and never answers:
    a server that is stopped (SIGSTOP) or hung with its connections open. `accepted` counts them."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self._listener.accept()[0])

    def close(self) -> None:
        for sock in [self._listener, *self.accepted]:
            sock.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AnswersStop(TcpProxy):
    """Passes everything until `stalled` is set, then swallows the server's answers on every
    connection, open or new, which stay open: a stopped server, a proxy or firewall that drops its
    replies, a path gone mid-call. With `trigger`, `stalled` sets itself once the client has sent
    `after` and then `trigger` (which still reaches the server)."""

    def __init__(self, host: str, port: int, trigger: bytes | None = None, *, after: bytes = b"") -> None:
        super().__init__(host, port)
        self._trigger, self._after, self._seen_after = trigger, after, not after
        self.stalled = threading.Event()

    def verdict(self, data: bytes, *, from_client: bool) -> Verdict:
        if from_client and not self._seen_after and self._after in data:
            self._seen_after = True
        if from_client and self._seen_after and self._trigger is not None and self._trigger in data:
            self.stalled.set()
        return Verdict.SWALLOW if self.stalled.is_set() and not from_client else Verdict.PASS
