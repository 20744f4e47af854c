"""Real Flower processes on 127.0.0.1 for ``zo-optim bench flower-round-time``: an insecure SuperLink, SuperNodes
behind byte-counting TCP proxies, ``flwr run``; every process (and every process they start) stopped by its PID.

The proxies count the TCP payload each SuperNode exchanges with the SuperLink (HTTP + protobuf: what Flower's
Fleet API puts on the wire; TCP/IP headers are not counted), with a timestamp per chunk, so bytes can be cut
per round window and per idle interval.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["Cluster", "CountingProxy", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


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
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while chunk := src.recv(65536):
                self.events.append((time.time(), direction, len(chunk)))
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
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


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (by /proc's parent ids), deepest last."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(rest[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


class Cluster:
    """A SuperLink and ``nodes`` SuperNodes (each behind a :class:`CountingProxy`) under ``root``; a context manager
    that stops every process it started, and their children, by PID (SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self, root: Path, nodes: int, env: dict[str, str]) -> None:
        self.root, self.n = root, nodes
        self.env = env
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.proxies: list[CountingProxy] = []
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        home = Path(env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n")

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")  # the child keeps its own copy of the fd
        p = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def __enter__(self) -> Cluster:
        try:
            self._start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                      "--host", "127.0.0.1", "--port", str(self.port)])
            _wait_port(self.port, 60)
            for i in range(self.n):
                proxy = CountingProxy(self.port)
                self.proxies.append(proxy)
                self._start(f"supernode-{i}", [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{proxy.port}",
                    "--node-config", f"partition-id={i} num-partitions={self.n}", "--port", str(free_port())])
            end = time.monotonic() + 120
            while not all(p.events for p in self.proxies):  # every node has talked to the SuperLink
                if time.monotonic() > end:
                    raise TimeoutError("the SuperNodes did not connect within 120 s; see " + str(self.logs))
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flwr_run(self, app: Path, run_config: str, timeout: float) -> float:
        """``flwr run app bench --stream --run-config ...``; returns its wall time (raises on failure)."""
        t = time.monotonic()
        with open(self.logs / f"flwr-run-{app.name}.log", "wb") as out:
            p = subprocess.Popen(["flwr", "run", str(app), "bench", "--stream", "--run-config", run_config],
                                 env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                 start_new_session=True)
            self.procs.append(p)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill(p.pid)
                raise TimeoutError(f"flwr run {app.name} did not finish in {timeout:.0f}s") from None
        if rc != 0:
            raise RuntimeError(f"flwr run {app.name} exited {rc}; see {self.logs}")
        return time.monotonic() - t

    @staticmethod
    def _kill(pid: int) -> None:
        pids = [*_children(pid), pid]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + 10
            while time.monotonic() < end and any(_alive(p) for p in pids):
                time.sleep(0.1)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None or _children(p.pid):
                self._kill(p.pid)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for proxy in self.proxies:
            proxy.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
