"""The two Flower apps ``zo-optim bench flower-round-time`` runs with ``flwr run`` (written to a temporary directory).

* ``zo``: our engine on a tiny model (``nn.Linear(8, 2)``, HiSo P = 5, τ = 1): ``ZOStrategy`` in the ServerApp,
  ``make_client_app`` in the ClientApp. The ClientApp module times its own imports and wraps the client's
  phases (model build, restore from ``context.state``, catch-up with its digest checks, compute, save) with
  timers before ``make_client_app`` binds them; the ServerApp records when each task is pushed and each reply
  pulled.
* ``torch``: the same with a ClientApp that imports torch and runs the tiny model's forward (a plain torch
  app's floor).
* ``bare``: Flower's floor on the same processes: a ServerApp that pushes one tiny ``ConfigRecord`` per node and
  round and pulls at the same 0.05 s interval as ``ZOStrategy``, and a ClientApp that imports nothing beyond
  Flower and answers at once.

Every process appends JSON lines to ``$ZO_RT_TRACE/trace-<pid>.jsonl`` (wall-clock ``time.time()``: all processes
run on one machine, so their clocks agree). A ClientApp process also records its own start, from
``/proc/self/stat`` (10 ms ticks), so the time from the task's push to the process start — the SuperNode's poll
(3 s when idle in flwr 1.42) plus the SuperExec's (1 s) plus the launch — is measured, not inferred.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["KINDS", "write_app"]

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "zo-rt-{kind}"
version = "0.1.0"
description = "zo-optim bench flower-round-time: the {kind} app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["zo_rt_{kind}"]

[tool.flwr.app]
publisher = "zo-optim"

[tool.flwr.app.components]
serverapp = "zo_rt_{kind}.server_app:app"
clientapp = "zo_rt_{kind}.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 5
min-nodes = 3
"""

_TRACE = '''\
"""Trace lines for the round-time bench (see zo_optim.bench._flower_rt_app)."""
import atexit
import json
import os
import time


def process_start() -> float:
    """This process's start as a wall-clock time (from /proc/self/stat's start time in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(rest[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def emit(**rec) -> None:
    folder = os.environ.get("ZO_RT_TRACE")
    if not folder:
        return
    rec.setdefault("pid", os.getpid())
    with open(os.path.join(folder, f"trace-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\\n")


def on_exit(side: str) -> None:
    atexit.register(lambda: emit(side=side, event="exit", t=time.time()))
'''

_ZO_CLIENT = '''\
"""ClientApp: make_client_app on a tiny model, every phase timed (the bench's instrumentation, not the library's)."""
import time

T_TOP = time.time()
from . import rt_trace  # noqa: E402

T_START = rt_trace.process_start()
rt_trace.on_exit("client")
import torch  # noqa: E402

T_TORCH = time.time()
from zo_optim.federated.client import FederatedWrapper  # noqa: E402
from zo_optim.federated.flower import client_app as impl  # noqa: E402
from zo_optim.federated.flower import make_client_app  # noqa: E402

T_ZO = time.time()
from . import task  # noqa: E402

T_TASK = time.time()
PHASES = {}


def _timed(cls, name, key):
    inner = getattr(cls, name)

    def timed(*a, **k):
        t = time.time()
        try:
            return inner(*a, **k)
        finally:
            PHASES[key] = PHASES.get(key, 0.0) + time.time() - t

    setattr(cls, name, timed)


def _traced(name):
    inner = getattr(impl._ClientNode, name)

    def handler(self, msg, context):
        t0 = time.time()
        reply = inner(self, msg, context)
        rt_trace.emit(side="client", event="message", kind=msg.metadata.message_type, round=msg.metadata.group_id,
                      node=context.node_id, start=T_START, top=T_TOP, torch=T_TORCH, zo=T_ZO, task=T_TASK,
                      h0=t0, h1=time.time(), phases=dict(PHASES))
        return reply

    setattr(impl._ClientNode, name, handler)


_timed(impl._ClientNode, "build", "build")
_timed(impl._ClientNode, "participant", "participant")
_timed(impl._ClientNode, "save", "save")
_timed(FederatedWrapper, "hello", "hello_digest")
_timed(FederatedWrapper, "catch_up", "catch_up")
_timed(FederatedWrapper, "compute", "compute")
_traced("hello")
_traced("handle")

app = make_client_app(task.model, task.optimizer, task.data)
'''

_ZO_TASK = '''\
"""The tiny model, optimizer and data every participant builds identically."""
import torch


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 2)


def optimizer(m):
    import os

    from zo_optim import HiSo

    # every participant (ServerApp, ClientApps) reads the same variable: the backend must be the same everywhere
    return HiSo(m.parameters(), lr=0.05, num_queries=5, backend=os.environ.get("ZO_RT_BACKEND", "auto"))


def data(context):
    g = torch.Generator().manual_seed(int(context.node_config.get("partition-id", 0)))
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)

    def loss(m, step):
        i = (torch.arange(16) + 16 * step) % 64
        return torch.nn.functional.cross_entropy(m(x[i]), y[i])

    return loss
'''

_ZO_SERVER = '''\
"""ServerApp: a ZOStrategy over the tiny model; records each push and each pulled reply."""
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from zo_optim.federated.flower import ZOStrategy

from . import rt_trace, task

app = ServerApp()


@app.main()
def server_main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["min-nodes"])
    strategy = ZOStrategy(task.optimizer(task.model()), clients_per_round=n, local_steps=1, server_seed=0,
                          min_nodes=n, round_timeout=60.0, handshake_timeout=300.0)
    push, on_reply = strategy._push, strategy._on_reply

    def timed_push(grid, messages, kind=None):
        messages = list(messages)
        for m in messages:
            rt_trace.emit(side="server", event="push", kind=m.metadata.message_type, round=m.metadata.group_id,
                          node=m.metadata.dst_node_id, t=time.time())
        return push(grid, messages, kind)

    def timed_reply(msg):
        rt_trace.emit(side="server", event="reply", round=msg.metadata.group_id, node=msg.metadata.src_node_id,
                      t=time.time())
        return on_reply(msg)

    strategy._push, strategy._on_reply = timed_push, timed_reply
    strategy.start(grid, num_rounds=int(context.run_config["num-server-rounds"]))
    check = strategy.replicas_identical()
    rt_trace.emit(side="server", event="done", t=time.time(), identical=bool(check), check=check.describe(),
                  wire_up={str(k): v for k, v in strategy.wire_up.items()},
                  wire_down={str(k): v for k, v in strategy.wire_down.items()},
                  payload=[[r.round, r.bytes_up, r.bytes_down, len(r.participants)] for r in strategy.server.history])
'''

_BARE_CLIENT = '''\
"""ClientApp: Flower only: answers every message with one tiny ConfigRecord."""
import time

T_TOP = time.time()
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from . import rt_trace  # noqa: E402

T_START = rt_trace.process_start()
rt_trace.on_exit("client")
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    reply = Message(RecordDict({"zo": ConfigRecord({"ok": 1})}), reply_to=msg)
    rt_trace.emit(side="client", event="message", kind=msg.metadata.message_type, round=msg.metadata.group_id,
                  node=context.node_id, start=T_START, top=T_TOP, torch=T_TOP, zo=T_TOP, task=T_TOP, h0=t0,
                  h1=time.time(), phases={})
    return reply
'''

_BARE_SERVER = '''\
"""ServerApp: Flower only: one tiny message per node and round, pulled every 0.05 s (as ZOStrategy pulls)."""
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import rt_trace

app = ServerApp()


@app.main()
def server_main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["min-nodes"])
    end = time.time() + 300
    while len(nodes := sorted(grid.get_node_ids())) < n and time.time() < end:
        time.sleep(0.5)
    for rnd in range(1, int(context.run_config["num-server-rounds"]) + 1):
        pending = set()
        for node in nodes:
            m = Message(RecordDict({"zo": ConfigRecord({"round": rnd})}), node, "train", group_id=str(rnd))
            rt_trace.emit(side="server", event="push", kind="train", round=str(rnd), node=node, t=time.time())
            pending.update(grid.push_messages([m]))
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                rt_trace.emit(side="server", event="reply", round=reply.metadata.group_id,
                              node=reply.metadata.src_node_id, t=time.time())
            time.sleep(0.05)
    rt_trace.emit(side="server", event="done", t=time.time())
'''


_TORCH_CLIENT = '''\
"""ClientApp: Flower + torch: imports torch, runs the tiny model's forward on a batch, answers (a plain torch app's
floor: what a bare Flower app pays once it imports torch)."""
import time

T_TOP = time.time()
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from . import rt_trace  # noqa: E402

T_START = rt_trace.process_start()
rt_trace.on_exit("client")
import torch  # noqa: E402

T_TORCH = time.time()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    torch.manual_seed(0)
    loss = torch.nn.functional.cross_entropy(torch.nn.Linear(8, 2)(torch.randn(16, 8)), torch.zeros(16).long())
    t1 = time.time()
    reply = Message(RecordDict({"zo": ConfigRecord({"loss": float(loss)})}), reply_to=msg)
    rt_trace.emit(side="client", event="message", kind=msg.metadata.message_type, round=msg.metadata.group_id,
                  node=context.node_id, start=T_START, top=T_TOP, torch=T_TORCH, zo=T_TORCH, task=T_TORCH, h0=t0,
                  h1=time.time(), phases={"compute": t1 - t0})
    return reply
'''

KINDS = ("bare", "torch", "zo")


def write_app(root: Path, kind: str) -> Path:
    """Write the ``kind`` app (:data:`KINDS`) under ``root``; returns its directory (for ``flwr run``)."""
    if kind not in KINDS:
        raise ValueError(f"Invalid app kind: {kind!r} (one of {KINDS})")
    app = root / f"app-{kind}"
    pkg = app / f"zo_rt_{kind}"
    pkg.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(_PYPROJECT.format(kind=kind))
    files = {"__init__.py": "", "rt_trace.py": _TRACE}
    if kind == "zo":
        files |= {"client_app.py": _ZO_CLIENT, "server_app.py": _ZO_SERVER, "task.py": _ZO_TASK}
    else:  # "torch" reuses the bare ServerApp
        files |= {"client_app.py": _BARE_CLIENT if kind == "bare" else _TORCH_CLIENT, "server_app.py": _BARE_SERVER}
    for name, text in files.items():
        (pkg / name).write_text(text)
    return app
