"""A deployed Flower ClientApp runs every message in a fresh ``flwr-clientapp`` process (flwr 1.42), so whatever
``import zo_optim.federated.flower`` and one client message (build, restore from ``context.state``, catch-up,
compute, save) import is paid on every round. Measured with ``zo-optim bench flower-round-time``
(docs/federated.md, *Deployment*): ``torch._dynamo`` (pulled by ``torch.optim.Optimizer``'s
``_disable_dynamo``-wrapped ``add_param_group`` / ``state_dict`` / ``load_state_dict``, with Triton) and
``torch.distributed.tensor`` (DTensor, with sympy) cost 1-3 s and 0.5-0.75 s per message on the 2-core machine, for
a client that uses neither. These tests keep them out, and check that the shortcut is exact: the plain method runs
only while ``torch._dynamo`` is absent, and gives the wrapped method's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import zo_optim
from zo_optim.optim._eager import eager

SRC = str(Path(__file__).resolve().parents[1] / "src")
# what a client message must not import (each was measured on the per-message path before the cut)
HEAVY = ("torch._dynamo", "torch.distributed.tensor", "sympy", "triton", "transformers", "matplotlib")

# One client's life across two "processes" in one interpreter that never imported anything else: a new client
# answers the handshake and saves to context.state; then the process cache is dropped (a fresh flwr-clientapp
# process) and the client is restored from context.state, catches up with round 0's entry and computes round 1.
CLIENT_MESSAGES = r"""
import json, sys
import torch
from flwr.app import Context, RecordDict
import zo_optim
from zo_optim.federated import Server, decode, encode
from zo_optim.federated.flower import make_client_app  # the package a ClientApp module imports
from zo_optim.federated.flower import client_app as impl

def model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 2)

def opt(m):
    return zo_optim.HiSo(m.parameters(), lr=0.05, num_queries=5)

x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(16, dtype=torch.long)
data = lambda context: (lambda m, step: torch.nn.functional.cross_entropy(m(x), y))
make_client_app(model, opt, data)
server = Server(opt(model()), clients=1, clients_per_round=1, local_steps=1, server_seed=3)
node = impl._ClientNode(model, opt, data, 1, (), None, None)
ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
p = node.participant(ctx)
p.wrapper.welcome(server.handshake(decode(encode(p.wrapper.hello()))))
node.save(ctx, p)
for rnd in range(2):
    impl._PARTICIPANTS.clear()            # a fresh process: only context.state survives
    p = node.participant(ctx)
    task = decode(encode(server.open_round()[0]))
    reply = p.wrapper.handle(task, lambda step: p.loss(p.model, step))
    node.save(ctx, p)
    assert server.receive(encode(reply)).accepted, reply
    server.close_round()
assert p.wrapper.checksum() != "" and p.wrapper.position == 1
print(json.dumps(sorted(m for m in sys.argv[1:] if m in sys.modules)))
"""


def test_a_client_message_imports_neither_dynamo_nor_dtensor():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CLIENT_MESSAGES, *HEAVY], env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_eager_uses_torch_wrapper_once_dynamo_is_imported(monkeypatch):
    import torch._dynamo  # present: the state of any process that compiles (binds torch here)

    opt = zo_optim.MeZO(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    bound = torch.optim.Optimizer.state_dict.__get__(opt)  # torch's _disable_dynamo wrapper, bound
    assert eager(bound) is bound  # torch._dynamo imported: torch's wrapper runs, untouched
    want = bound()
    monkeypatch.delitem(sys.modules, "torch._dynamo")  # restored after the test
    got = eager(bound)  # absent: torch's own body (functools.wraps kept it), bound to the same optimizer
    assert got.__func__ is torch.optim.Optimizer.state_dict.__wrapped__ and got.__self__ is opt
    assert got() == want

    class Plain:
        def method(self) -> int:
            return 1

    obj = Plain()
    assert eager(obj.method) == obj.method  # nothing to unwrap: called as it is
