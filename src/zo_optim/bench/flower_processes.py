"""A Flower deployment on real processes: a SuperLink, SuperNodes and ``flwr run``, all on 127.0.0.1.

The one harness behind ``zo-optim bench flower-round-time`` (insecure, a byte-counting
:class:`~zo_optim.bench.net.CountingProxy` in front of each SuperNode, several apps run with ``flwr run --stream``
one after the other) and ``tests/test_federated_flower_chaos.py`` (a SuperLink with a database, TLS + SuperNode
authentication, SuperNodes killed and restarted, a late joiner).

Every process is started here, in its own session (``start_new_session``: its process group holds most of the
children it spawns: ``flwr-clientapp``, a SuperNode's ``flower-superexec``), and stopped by that group's id plus the
pids of its descendants (the SuperLink starts its ``flower-superexec``, which starts ``flwr-serverapp``, in a new
session) — ``kill -9`` of one process and its children, never a search by name. :meth:`Federation.close` (call it in
a ``finally``) kills every one still alive, :meth:`Federation.leftovers` checks that none is. Ports are chosen
free at run time; ``FLWR_HOME`` is ``root/flwr-home`` (Flower's config and installed apps never touch
``~/.flwr``); runtime dependency installation is off (no network). Each process logs to its own file;
:meth:`Federation.logs` returns their tails for a failure message. Flower's executables are the ones beside this
interpreter (``flwr``'s scripts in the same environment as ``zo_optim``), whatever ``PATH`` holds.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .net import CountingProxy, free_port

__all__ = ["BIN", "EXECUTABLES", "Federation", "descendants", "free_port", "missing_executables"]

BIN = Path(sys.executable).parent
EXECUTABLES = ("flower-superlink", "flower-supernode", "flwr")


def missing_executables() -> list[str]:
    """Those of Flower's executables the harness runs that are not in :data:`BIN` (``zo-optim[flower]`` absent)."""
    return [name for name in EXECUTABLES if not (BIN / name).exists()]


def _processes() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state, start time) of every process, from ``/proc``."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        f = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
        out[int(stat.parent.name)] = (int(f[1]), int(f[2]), f[0], int(f[19]))
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (by ``/proc``'s parent ids), children before grandchildren. Flower starts
    some children in a new session (the SuperLink's ``flower-superexec``, detached), outside the group a kill of the
    parent's group reaches; they are found here, by ancestry, and killed by pid. Only for a ``pid`` that is still
    ours (alive, not reaped): pids are reused (pid_max may be 32768)."""
    children: dict[int, list[int]] = {}
    for c, (ppid, *_) in _processes().items():
        children.setdefault(ppid, []).append(c)
    out, todo = [], list(children.get(pid, []))
    while todo:
        c = todo.pop(0)
        out.append(c)
        todo += children.get(c, [])
    return out


class Federation:
    """SuperLink + SuperNodes + ``flwr run`` of Flower apps on 127.0.0.1: insecure, or TLS + SuperNode auth; with
    ``proxies``, each SuperNode reaches the SuperLink through a :class:`~zo_optim.bench.net.CountingProxy`
    (``self.proxies[partition]``, kept across restarts of that SuperNode). A context manager: leaving it calls
    :meth:`close`. Failures raise ``RuntimeError`` (``TimeoutError`` for a wait) with every log's tail."""

    def __init__(self, root: Path, app: Path | None = None, env: dict[str, str] | None = None,
                 database: bool = False, tls: bool = False, proxies: bool = False) -> None:
        self.root = Path(root)
        self.app = Path(app) if app is not None else None
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    **(env or {})}
        # tls: a throw-away CA and server certificate for 127.0.0.1 (openssl), TLS everywhere, and SuperNode
        # authentication: each SuperNode gets a P-384 key pair (ssh-keygen) registered with `flwr supernode register`
        # before it starts (so a restarted SuperNode keeps its node id)
        self.tls = tls
        self.certs = self.root / "certs"
        if tls:
            self._make_certificates()
        connection = f'root-certificates = "{self.certs / "ca.crt"}"' if tls else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            f"{connection}\n")
        # database: the SuperLink keeps its state (nodes, runs) in a file, so a restarted SuperLink still knows its
        # SuperNodes (in memory, a restarted SuperLink answers their heartbeats 401 and they exit)
        self.database = self.root / "superlink.db" if database else None
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process of each name
        self._all: list[subprocess.Popen] = []  # every process started, for close() and leftovers()
        self.log_files: dict[str, Path] = {}
        self._starts: dict[str, int] = {}
        self._killed: set[tuple[int, int]] = set()  # (pid, start time) of every process killed, for leftovers()
        self.counting = proxies
        self.proxies: dict[int, CountingProxy] = {}  # partition -> its SuperNode's proxy, with counting
        self.run_ids: list[int] = []  # every run flwr_run started, in order

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ TLS and SuperNode keys

    def _tool(self, *cmd: str) -> None:
        out = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")

    def _make_certificates(self) -> None:
        c = self.certs
        c.mkdir(parents=True, exist_ok=True)
        self._tool("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(c / "ca.key"),
                   "-out", str(c / "ca.crt"), "-days", "2", "-subj", "/CN=test CA")
        self._tool("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(c / "server.key"),
                   "-out", str(c / "server.csr"), "-subj", "/CN=localhost")
        (c / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        self._tool("openssl", "x509", "-req", "-in", str(c / "server.csr"), "-CA", str(c / "ca.crt"), "-CAkey",
                   str(c / "ca.key"), "-CAcreateserial", "-out", str(c / "server.pem"), "-days", "2", "-extfile",
                   str(c / "san.ext"))

    def node_key(self, partition: int) -> Path:
        """SuperNode ``partition``'s private key, created and registered with the running SuperLink once."""
        key = self.certs / f"supernode_{partition}"
        if not key.exists():
            self._tool("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key))
            self._tool(str(BIN / "flwr"), "supernode", "register", str(key) + ".pub", "local")
        return key

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        if name in self.procs:
            if self.procs[name].poll() is None:
                raise RuntimeError(f"{name} is still running (pid {self.procs[name].pid})")
            self.kill(name)  # it exited; what it spawned in its group may not have (a SuperNode's SuperExec)
        n = self._starts[name] = self._starts.get(name, 0) + 1
        log = self.root / "logs" / f"{name}.{n}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **(env or {})}, cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        self._all.append(proc)
        self.log_files[f"{name}.{n}"] = log
        return proc

    def start_superlink(self, timeout: float = 60.0) -> subprocess.Popen:
        """Start the SuperLink and wait until its port accepts connections (``flwr run`` fails before)."""
        security = (["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                     "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
                    if self.tls else ["--insecure"])
        proc = self._start("superlink", [str(BIN / "flower-superlink"), *security,
                                         "--disable-runtime-dependency-installation",
                                         "--host", "127.0.0.1", "--port", str(self.port),
                                         *(["--database", str(self.database)] if self.database else [])])

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        self.wait_for("the SuperLink's port", listening, timeout, watch=("superlink",))
        return proc

    def start_supernode(self, partition: int, partitions: int, env: dict[str, str] | None = None,
                        ) -> subprocess.Popen:
        """Start SuperNode ``partition`` of ``partitions`` (its ``--node-config``); it connects in the background."""
        security = (["--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key",
                     str(self.node_key(partition))] if self.tls else ["--insecure"])
        port = self.port
        if self.counting:
            if partition not in self.proxies:
                self.proxies[partition] = CountingProxy(self.port)
            port = self.proxies[partition].port
        return self._start(f"supernode{partition}", [
            str(BIN / "flower-supernode"), *security, "--superlink", f"127.0.0.1:{port}",
            "--node-config", f"partition-id={partition} num-partitions={partitions}",
            "--host", "127.0.0.1", "--port", str(free_port())], env)

    def restart_supernode(self, partition: int, partitions: int, timeout: float = 180.0) -> subprocess.Popen:
        """Start SuperNode ``partition`` again until it is connected, as a supervisor's restart policy would: with
        SuperNode authentication, a node restarted right after it died is refused activation (ApiError 2004, exit
        code 305) until its old session has missed its heartbeats (2 x 30 s by flwr 1.42's defaults)."""
        end = time.monotonic() + timeout
        while True:
            proc = self.start_supernode(partition, partitions)
            log = self.log_files[f"supernode{partition}.{self._starts[f'supernode{partition}']}"]
            while proc.poll() is None and "SuperNode ID:" not in log.read_text(errors="replace"):
                time.sleep(0.5)
            if proc.poll() is None:
                return proc
            if time.monotonic() > end:
                raise TimeoutError(f"SuperNode {partition} did not reconnect within {timeout:.0f}s\n{self.logs()}")
            time.sleep(5.0)

    def node_ids(self, name: str) -> list[str]:
        """The node ids the SuperLink gave ``name`` (one per start that connected), from its logs."""
        return [i for key, path in self.log_files.items() if key.rsplit(".", 1)[0] == name
                for i in re.findall(r"SuperNode ID: (\d+)", path.read_text(errors="replace"))]

    def flwr_run(self, run_config: str, timeout: float = 60.0, app: Path | None = None, stream: bool = False,
                 ) -> float:
        """``flwr run <app> local --run-config ...`` (``app``: the one given at construction if None): it builds
        the app, submits the run and returns (the ServerApp then runs under the SuperLink); with ``stream``
        (``--stream``) it returns only when the run has finished. Returns its wall seconds; RuntimeError with the
        logs if it fails, TimeoutError (after killing it) if it runs past ``timeout``."""
        app = Path(app) if app is not None else self.app
        if app is None:
            raise ValueError("Invalid app: None (give the Flower app's directory here or to Federation)")
        t0 = time.monotonic()
        proc = self._start("flwr-run", [str(BIN / "flwr"), "run", str(app), "local", *(["--stream"] if stream else []),
                                        "--run-config", run_config])
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill("flwr-run")
            raise TimeoutError(f"flwr run {app.name} did not finish in {timeout:.0f}s\n{self.logs()}") from None
        if rc != 0:
            raise RuntimeError(f"flwr run {app.name} exited with {rc}\n{self.logs()}")
        started = re.findall(r"Successfully started run (\d+)", self.log_files[f"flwr-run.{self._starts['flwr-run']}"]
                             .read_text(errors="replace"))
        self.run_ids += [int(i) for i in started[:1]]
        return time.monotonic() - t0

    def flwr_stop(self, run_id: int, timeout: float = 60.0) -> bool:
        """``flwr stop <run_id> local``: True if the SuperLink stopped the run, False if it had already finished
        (Flower refuses to stop a finished run; the wanted state holds). RuntimeError with the output otherwise.

        Why a harness needs it: after a SuperLink restart a run whose ServerApp was killed is still RUNNING until
        its task misses its heartbeats, and a SuperNode that pulled that run's last message (its content lost with
        the ServerApp) retries the pull, serving nothing else, until then (flwr 1.42: up to 2 h, or until the run
        is no longer running). Stopping the dead run frees it at its next retry (≤ 10 s)."""
        out = subprocess.run([str(BIN / "flwr"), "stop", str(run_id), "local"], cwd=self.root, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
        if out.returncode == 0 and "successfully stopped" in text:
            return True
        if "already finished" in text:
            return False
        raise RuntimeError(f"flwr stop {run_id} exited with {out.returncode}:\n{text}\n{self.logs()}")

    def kill(self, name: str) -> None:
        """``kill -9`` ``name``'s process group and every descendant (detached ones too), then reap it."""
        self._kill(self.procs[name])

    def _kill(self, proc: subprocess.Popen) -> None:
        procs = _processes()
        if proc.poll() is None:  # alive and not reaped, so its pid and group id are still ours
            targets = [proc.pid, *descendants(proc.pid)]
            targets += [p for p, (_, group, *_) in procs.items() if group == proc.pid]
        else:
            # the leader exited and was reaped: its group's remaining members (a SuperNode's SuperExec) still hold
            # the group id, which the kernel does not reuse while they do; a process whose pid is the old leader's
            # is a new one (the group is then empty): never touch it
            targets = [p for p, (_, group, *_) in procs.items() if group == proc.pid and p != proc.pid]
        for pid in dict.fromkeys(targets):
            if pid in procs:
                self._killed.add((pid, procs[pid][3]))  # (pid, start time): who it was, for leftovers()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        """Kill every process started here, with its group and descendants (also where the leader already exited:
        its group's remaining members), then close the proxies."""
        for proc in reversed(self._all):
            self._kill(proc)
        for proxy in self.proxies.values():
            proxy.close()

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    # ------------------------------------------------------------------ waiting and logs

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float, watch: tuple[str, ...] = ()) -> float:
        """Poll ``cond()`` every 0.2 s; returns the seconds waited. With every log's tail: RuntimeError if a process
        in ``watch`` exited, TimeoutError if ``cond()`` is not true within ``timeout``."""
        t0 = time.monotonic()
        while not cond():
            dead = [n for n in watch if not self.alive(n)]
            if dead:
                raise RuntimeError(f"waiting for {what}: exited: {dead}\n{self.logs()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"waiting for {what}: not within {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def leftovers(self, timeout: float = 10.0) -> list[int]:
        """Processes killed here that still run after ``timeout`` s (a zombie is dead, only not reaped yet; a pid
        with another start time is a new process that reused the number)."""
        end = time.monotonic() + timeout
        while True:
            procs = _processes()
            left = [pid for pid, start in self._killed
                    if pid in procs and procs[pid][3] == start and procs[pid][2] != "Z"]
            if not left or time.monotonic() > end:
                return left
            time.sleep(0.2)

    def logs(self, tail: int = 40) -> str:
        """The tail of every process's log, and of the ServerApps' own logs (``serverapp.*.log`` under the root)."""
        out = []
        files = {**self.log_files, **{p.name: p for p in sorted(self.root.rglob("serverapp.*.log"))}}
        for name, path in files.items():
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            head = f"----- {name} (last {min(tail, len(lines))} of {len(lines)} lines)"
            out.append("\n".join([head, *lines[-tail:]]))
        return "\n".join(out)
