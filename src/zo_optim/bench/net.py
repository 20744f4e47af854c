"""127.0.0.1 networking for the benches and the real-process tests: :func:`free_port` and :class:`CountingProxy`.

The proxy counts the TCP payload a client (a Flower SuperNode) exchanges with a server (the SuperLink): for Flower,
HTTP/2 + protobuf (or TLS records), what its Fleet API puts on the wire; TCP/IP headers are not counted. Each chunk
is logged with a timestamp, so bytes can be cut per round window and per idle interval. It forwards bytes as they
are, so TLS through it still verifies against the server's certificate for 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["CountingProxy", "free_port"]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it); a race with another process is possible but unlikely."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingProxy:
    """A TCP proxy 127.0.0.1:``port`` → 127.0.0.1:``target`` that logs (time, direction, bytes) per chunk."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.events: list[tuple[float, str, int]] = []  # list.append is atomic under the GIL
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is down (restarting): refuse this client, keep serving the next
                client.close()
                continue
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while chunk := src.recv(65536):
                self.events.append((time.time(), direction, len(chunk)))
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)  # end of stream: pass the half-close on; the other direction still flows
        except OSError:  # reset or closed: end both directions
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def bytes_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(up, down) payload bytes in [t0, t1)."""
        up = sum(n for t, d, n in list(self.events) if t0 <= t < t1 and d == "up")
        down = sum(n for t, d, n in list(self.events) if t0 <= t < t1 and d == "down")
        return up, down

    def close(self) -> None:
        self._closed = True
        for s in (self._sock, *self._conns):
            try:
                s.close()
            except OSError:
                pass
