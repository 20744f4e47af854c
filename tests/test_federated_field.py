"""The federated core in the field: 64-bit ids, atomic loads, typed refusals, honest replica checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import zo_optim
from fed_problems import batch_loss, data, mezo, mlp_fn
from zo_optim import rng
from zo_optim.federated import (
    FederatedWrapper,
    ProtocolError,
    Replica,
    Reply,
    RoundEntry,
    Server,
    decode,
    encode,
    pack_scalars,
    simulate,
)

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


# ---------------------------------------------------------------- semantic validation, refused rounds, quarantine

def _reply(server, c, scalars, **extras):
    return Reply(round=server.current_round, client_id=c, status="ok", position=server.current_round,
                 algorithm=server.optimizer.algorithm, rng_version=rng.RNG_VERSION, n_examples=1, loss=0.5,
                 scalars=pack_scalars(scalars), extras=tuple((n, pack_scalars(v)) for n, v in sorted(extras.items())))


@pytest.mark.parametrize("make, stream", [
    (lambda m: zo_optim.HELENE(m.parameters(), lr=1e-3, backend="reference"), "sq_grad_sum"),
    (lambda m: zo_optim.HiZOO(m.parameters(), lr=1e-3, backend="reference"), "curvature"),
])
def test_impossible_finite_streams_are_refused_and_rounds_keep_closing(make, stream):
    server = Server(make(mlp_fn()), clients=2, clients_per_round=2, server_seed=3, extras=[stream])
    for r in range(3):
        server.open_round()
        # -1e5 is finite and within max_abs_scalar (1e6): only its meaning (a sum of squares, |.|/(2 eps^2)) is wrong
        bad = server.receive(encode(_reply(server, 0, [0.1], **{stream: [-1e5]})))
        assert not bad.accepted and bad.reason.startswith("invalid") and "negative" in bad.reason, bad.reason
        assert server.receive(encode(_reply(server, 1, [0.1], **{stream: [2.0]}))).accepted
        rec = server.close_round()
        assert rec.participants == (1,) and rec.aggregate_refused == "" and server.position == r + 1
    # the server's own state is one its loader accepts: a snapshot of it loads into a fresh replica
    fresh = Replica(make(mlp_fn()), server_seed=3, extras=[stream])
    fresh.load_snapshot(server.replica.snapshot())
    assert fresh.checksum() == server.checksum()


def test_an_aggregate_the_server_would_refuse_is_refused_as_a_round():
    # MeZO with a huge lr: a scalar of 1e6 (in range, finite) moves weights by lr·1e6·z ≈ 1e40: inf in float32.
    # The state check refuses the round: it is logged empty, the replica is restored bit for bit, and the next
    # round closes normally.
    server = Server(mezo(mlp_fn(), lr=1e34), clients=1, clients_per_round=1, server_seed=3)
    server.open_round()
    assert server.receive(_reply(server, 0, [1e6])).accepted
    rec = server.close_round()
    assert "non-finite" in rec.aggregate_refused and server.rejections["aggregate"] == 1
    assert server.entry(0).empty and server.position == 1 and server.replica.applied_rounds == 0
    fresh = Replica(mezo(mlp_fn(), lr=1e34), server_seed=3)
    fresh.apply(server.entry(0))
    assert fresh.checksum() == server.checksum()  # the empty round: position moved, nothing else
    server.open_round()
    assert server.receive(_reply(server, 0, [1e-40])).accepted  # a harmless one applies
    assert server.close_round().aggregate_refused == "" and server.replica.applied_rounds == 1


def test_apply_checked_refuses_negative_curvature_and_changes_nothing():
    from zo_optim.federated.validation import apply_checked

    rep = Replica(zo_optim.HiZOO(mlp_fn().parameters(), lr=1e-3, backend="reference"), server_seed=1)
    before = rep.checksum()
    entry = RoundEntry(0, 1, pack_scalars([0.5]), (("curvature", pack_scalars([-3.0])),))
    why = apply_checked(rep, entry)
    assert "negative curvature" in why and rep.checksum() == before and rep.position == 0


def test_a_client_refused_k_times_is_quarantined_logged_and_released(caplog):
    server = Server(mezo(mlp_fn()), clients=3, clients_per_round=3, server_seed=3, quarantine_after=2,
                    quarantine_window=3, quarantine_rounds=2)
    for _ in range(6):
        tasks = server.open_round()
        if 2 in tasks:
            assert not server.receive(_reply(server, 2, [float("nan")])).accepted
        for c in (0, 1):
            assert server.receive(_reply(server, c, [0.1])).accepted
        server.close_round()
    # refused in rounds 0 and 1 → quarantined in round 1 (2 refusals in a 3-round window); not sampled in round 2;
    # released at the opening of round 3 (quarantine_rounds=2), refused in rounds 3 and 4 → quarantined again
    assert [r.round for r in server.history if r.quarantined == [2]] == [1, 4]
    assert [2 in r.sampled for r in server.history] == [True, True, False, True, True, False]
    assert "client 2 quarantined in round 1" in caplog.text and "client 2 released from quarantine" in caplog.text
    assert server.release_quarantine(2) and 2 not in server.quarantine  # reversible by hand
    assert 2 in server.open_round()


def test_helene_refuses_a_negative_sq_grad_sum_before_writing():
    opt = zo_optim.HELENE(mlp_fn().parameters(), lr=1e-3, backend="reference")
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    with pytest.raises(ValueError, match="negative sq_grad_sum"):
        opt.apply_update(5, torch.tensor([0.3]), sq_grad_sum=torch.tensor([-1e5]))
    assert all(torch.equal(a, p) for a, p in zip(before, (p for g in opt.param_groups for p in g["params"]),
                                                 strict=True))
    opt.apply_update(5, torch.tensor([0.3]), sq_grad_sum=torch.tensor([2.0]))  # a sum of squares applies
