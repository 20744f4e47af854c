"""The federated core in the field: 64-bit ids, atomic loads, typed refusals, honest replica checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fed_problems import batch_loss, data, mezo, mlp_fn
from zo_optim.federated import FederatedWrapper, ProtocolError, Server, decode, encode, simulate

BIG = [2**64 - 1, 2**63 + 12345, 2**32]  # Flower's node ids are random uint64: every width of id must train


def _federation(ids, rounds=3):
    ms = mlp_fn()
    server = Server(mezo(ms), clients=ids, clients_per_round=len(ids), server_seed=5)
    ds = data(len(ids))
    ws = []
    for c in ids:
        m = mlp_fn()
        w = FederatedWrapper(mezo(m), client_id=c, model=m)
        w.welcome(server.handshake(decode(encode(w.hello()))))
        ws.append((w, m))
    for _ in range(rounds):
        tasks = server.open_round()
        for i, (w, m) in enumerate(ws):
            reply = w.handle(decode(encode(tasks[w.client_id])), lambda s, i=i, m=m: batch_loss(*ds[i])(m, s))
            receipt = server.receive(encode(reply))
            assert receipt.accepted, receipt.reason
        server.close_round()
    return server, ws


def test_64_bit_client_ids_train_end_to_end():
    server, ws = _federation(BIG)
    # every round had all three participants (ids round-tripped through the packed reply header), and after a
    # final sync every replica is the server's, bit for bit
    assert [rec.participants for rec in server.history] == [tuple(sorted(BIG))] * 3
    for w, _ in ws:
        assert server.receive(encode(w.handle(decode(encode(server.sync_task(w.client_id)))))).accepted
        assert w.checksum() == server.checksum()


@pytest.mark.parametrize("bad", [None, [1, 2], object(), 3.5])
def test_receive_refuses_wrong_types_with_a_protocol_error(bad):
    server, _ = _federation([0, 1], rounds=0)
    server.open_round()
    with pytest.raises(ProtocolError, match=f"Server.receive takes a Reply or its encoding.*{type(bad).__name__}"):
        server.receive(bad)
    assert sum(server.rejections.values()) == 0  # raised before any counter moved


def test_receive_refuses_a_reply_object_with_mistyped_fields():
    server, ws = _federation([0, 1], rounds=0)
    tasks = server.open_round()
    w, m = ws[0]
    good = w.handle(tasks[0], lambda s: batch_loss(*data(2)[0])(m, s))
    for kw, what in [({"client_id": "0"}, "client_id"), ({"scalars": [1.0]}, "scalars"),
                     ({"extras": [("a", 1)]}, "extras"), ({"loss": None}, "loss"), ({"status": 1}, "status")]:
        r = server.receive(dataclasses.replace(good, **kw))
        assert not r.accepted and r.reason.startswith("malformed") and what in r.reason, r.reason
    assert server.receive(good).accepted


@pytest.mark.parametrize("drop, match", [
    ("snapshot", "missing \\['snapshot'\\]"), ("local_step_counter", "missing"), ("position", "missing")])
def test_wrapper_load_state_dict_is_atomic(drop, match):
    _, ws = _federation([0, 1], rounds=3)
    w = ws[0][0]
    m = mlp_fn()
    fresh = FederatedWrapper(mezo(m), client_id=1, model=m)  # at position 0: weights that differ from w's
    assert w.position == 2 and fresh.checksum() != w.checksum()
    state = w.state_dict()
    del state[drop]
    # a client that had made progress: a refused load must leave its weights and position exactly as they were
    before = (fresh.checksum(), fresh.position, fresh.local_step_counter)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert (fresh.checksum(), fresh.position, fresh.local_step_counter) == before
    bad = {**w.state_dict(), "server_seed": -1}
    with pytest.raises(ValueError, match="server_seed = -1"):
        fresh.load_state_dict(bad)
    assert (fresh.checksum(), fresh.position, fresh.local_step_counter) == before
    fresh.load_state_dict(w.state_dict())  # the whole one loads
    assert fresh.checksum() == w.checksum()


def test_replicas_identical_says_what_it_could_not_check():
    ds = data(3)
    res = simulate(mlp_fn, mezo, [batch_loss(*d) for d in ds], rounds=2, clients_per_round=2, seed=1)
    check = res.replicas_identical()
    assert check and check.checked == (0, 1, 2) and check.unchecked == ()
    # a client left behind (as when its final sync never arrived) is named as unchecked: the check is not truthy
    # even though every replica it did compare is identical
    w = res.wrappers[2]
    w.replica.position -= 1
    check = res.replicas_identical()
    assert check.identical and not check.complete and not check
    assert check.checked == (0, 1) and check.unchecked[0][0] == 2 and "position 1, server 2" in check.unchecked[0][1]
    assert "not checked: 2 (at position 1, server 2)" in check.describe()
    w.replica.position += 1
    with torch.no_grad():
        next(res.clients[1].parameters()).add_(1e-3)
    check = res.replicas_identical()
    assert not check.identical and check.differing == (1,) and "[1] DIFFER" in check.describe()
