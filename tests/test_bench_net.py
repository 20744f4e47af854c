"""``zo_optim.bench.net.CountingProxy``: the byte counts the Flower bench reports come from it.

A real TCP echo server on 127.0.0.1 behind the proxy: every byte sent must arrive unchanged and be counted once
in each direction (an echo sends back exactly what it got, so up == down == the bytes the client sent), also after
the client half-closes (its end of stream reaches the server, the reply still flows back); with the server down a
client is refused and the proxy still serves the next one once the server is back (a restarted SuperLink must not
leave its SuperNodes' proxy dead).
"""

from __future__ import annotations

import socket
import threading
import time

from zo_optim.bench.net import CountingProxy, free_port


def _echo_server(port: int) -> socket.socket:
    srv = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _stop(srv: socket.socket) -> None:
    srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in its thread (a bare close() would not on Linux)
    srv.close()


def _round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read to the end: what came back (b"" if the proxy refused us)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        try:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            while data := c.recv(65536):
                got += data
        except OSError:  # refused: closed by the proxy (reset, broken pipe, not connected)
            pass
    return got


def _wait_counted(proxy: CountingProxy, n: int) -> tuple[int, int]:
    end = time.monotonic() + 10
    while proxy.bytes_between(0, float("inf")) != (n, n) and time.monotonic() < end:
        time.sleep(0.01)
    return proxy.bytes_between(0, float("inf"))


def test_counts_every_byte_once_each_way_and_survives_a_server_restart():
    port = free_port()
    srv = _echo_server(port)
    proxy = CountingProxy(port)
    try:
        payload = bytes(range(256)) * 1000  # 256,000 B: several 64 KiB chunks
        assert _round_trip(proxy.port, payload) == payload
        assert _wait_counted(proxy, len(payload)) == (len(payload), len(payload))
        t_mid = time.time()
        _stop(srv)  # the server goes down: the client is refused (closed without data), nothing counted
        assert _round_trip(proxy.port, b"lost") == b""
        srv = _echo_server(port)  # ... and comes back on the same port: the proxy serves again
        assert _round_trip(proxy.port, b"again") == b"again"
        assert _wait_counted(proxy, len(payload) + 5) == (len(payload) + 5, len(payload) + 5)
        assert proxy.bytes_between(t_mid, float("inf")) == (5, 5)  # the window cut by time
    finally:
        proxy.close()
        _stop(srv)
