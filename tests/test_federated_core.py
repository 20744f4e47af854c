"""Federated protocol core: messages, log, replica exactness, HiSo's K per round, handshake, server validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import zo_optim
from fed_problems import batch_loss, data, hiso, mezo, mlp_fn, model_fn, rounds_with_replay, server_and_clients
from zo_optim import rng
from zo_optim.federated import (
    PROTOCOL_VERSION,
    FederatedWrapper,
    GapError,
    Hello,
    ProtocolError,
    Replica,
    Reply,
    RoundEntry,
    RoundLog,
    Server,
    Snapshot,
    Task,
    aggregate,
    decode,
    dirichlet_split,
    encode,
    pack_scalars,
    payload_bytes,
    protocol,
    unpack_scalars,
)


def _task(**kw) -> Task:
    base = dict(round=3, client_id=7, server_seed=2**64 - 1, algorithm="hiso", rng_version=rng.RNG_VERSION,
                num_queries=2, local_steps=1, log_start=1)
    return Task(**{**base, **kw})


def test_messages_round_trip_as_plain_data():
    entries = (RoundEntry(1, 2, pack_scalars([1.5, -2.0]), (("curvature", pack_scalars([0.25, 3.0])),)),
               RoundEntry(2, 0))
    msgs = [
        _task(entries=entries, snapshot=Snapshot(1, b"\x00\x01blob")),
        _task(compute=False),
        Reply(round=3, client_id=2**32 - 1, status="ok", position=3, algorithm="hizoo", rng_version=rng.RNG_VERSION,
              n_examples=5, loss=0.5, scalars=pack_scalars([1.0, 2.0]), extras=(("curvature", pack_scalars([3, 4])),)),
        Hello(client_id=1, algorithm="mezo", rng_version="x", num_queries=1, local_steps=2, config_digest="ab"),
    ]
    for m in msgs:
        enc = encode(m)
        assert all(isinstance(v, (int, float, str, bytes)) and not isinstance(v, bool) for v in enc.values())
        assert enc["zo_fed"] == PROTOCOL_VERSION and enc["kind"] == m.kind
        assert decode(enc) == m
    assert unpack_scalars(pack_scalars([1.0, -0.5])).tolist() == [1.0, -0.5]
    assert pack_scalars([1.0]) == b"\x00\x00\x80\x3f"  # little-endian float32


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(zo_fed=PROTOCOL_VERSION + 1), f"protocol version {PROTOCOL_VERSION + 1}"),
    (lambda d: d.pop("round"), "no 'round'"),
    (lambda d: d.update(round="3"), "type str"),
    (lambda d: d.update(round=-1), "outside uint64"),
    (lambda d: d.update(kind="nope"), "unknown message kind"),
    (lambda d: d.update(entries=b"\x01\x02"), "truncated"),
])
def test_decode_refuses_malformed(mutate, match):
    enc = encode(_task(entries=(RoundEntry(1, 1, pack_scalars([1.0, 2.0])),)))
    mutate(enc)
    with pytest.raises(ProtocolError, match=match):
        decode(enc)


def test_payload_bytes_counts_values():
    r = Reply(round=0, client_id=0, status="ok", position=0, algorithm="mezo", rng_version=rng.RNG_VERSION,
              n_examples=1, loss=0.0, scalars=pack_scalars([0.0] * 5))
    enc = encode(r)
    # zo_fed (8) + "reply" (5) + the packed 29 B header + 4 B per scalar; the empty "extras" list adds 0
    assert payload_bytes(enc) == 8 + len("reply") + 29 + 20 == 62
    assert decode(enc) == r


@pytest.mark.parametrize("field, bits", [("round", 32), ("client_id", 64), ("position", 32), ("n_examples", 32)])
def test_reply_header_field_widths(field, bits):
    r = Reply(round=0, client_id=0, status="ok", position=0, algorithm="mezo", rng_version=rng.RNG_VERSION,
              n_examples=1, loss=0.0, scalars=pack_scalars([0.0]))
    top = dataclasses.replace(r, **{field: 2**bits - 1})
    assert decode(encode(top)) == top  # the largest value of the field's width travels
    with pytest.raises(ProtocolError, match=f"reply field '{field}' = {2**bits} is outside uint{bits}"):
        encode(dataclasses.replace(r, **{field: 2**bits}))


def test_reply_from_an_unknown_contract_decodes_as_unknown_and_is_refused():
    r = Reply(round=0, client_id=0, status="ok", position=0, algorithm="mezo", rng_version="philox/v0",
              n_examples=1, loss=0.5, scalars=pack_scalars([1.0]))
    enc = encode(r)
    protocol._CONTRACTS.clear()  # as on a peer that never saw this contract
    back = decode(enc)
    assert back.algorithm == "unknown" and back.rng_version.startswith("unknown contract ")
    assert decode(encode(dataclasses.replace(r, rng_version=rng.RNG_VERSION))).algorithm == "mezo"  # built-ins known
    with pytest.raises(ProtocolError, match="reply header is 3 B, expected 29"):
        decode({**enc, "h": b"abc"})
    with pytest.raises(ProtocolError, match="unknown reply status code 9"):
        decode({**enc, "h": bytes([9]) + enc["h"][1:]})


def test_log_trims_never_past_the_newest_snapshot():
    log = RoundLog(limit=4)
    for r in range(10):
        log.append(RoundEntry(r, 0))
        log.trim()
    assert len(log) == 10 and log.start == 0  # no snapshot: nothing can be trimmed
    log.add_snapshot(Snapshot(7, b"s7"))
    log.trim()
    assert (log.start, log.end, len(log)) == (6, 10, 4)
    snap, tail = log.catch_up(2)
    assert snap.position == 7 and [e.round for e in tail] == [7, 8, 9]
    snap, tail = log.catch_up(8)
    assert snap is None and [e.round for e in tail] == [8, 9]
    with pytest.raises(ValueError, match="appended at position"):
        log.append(RoundEntry(3, 0))


def test_aggregate_median_trimmed_weighted():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, -1e5]])
    w = np.array([1.0, 1.0, 2.0, 0.0])
    assert aggregate(x, w, "mean").tolist() == [2.25, 22.5]
    assert aggregate(x, w, "median").tolist() == [2.5, 15.0]
    assert aggregate(x, w, "trimmed_mean", 0.25).tolist() == [2.5, 15.0]
    # float64 sum rounded once: 1 + 2**-30 is lost in float32 only at the end
    y = np.array([[1.0], [2.0**-25]], dtype=np.float32)
    assert aggregate(y, np.ones(2), "mean")[0] == np.float32((1.0 + 2.0**-25) / 2)


@pytest.mark.parametrize("exact", ["transient", "restore"])
@pytest.mark.parametrize("tau", [1, 3])
def test_clients_that_computed_equal_a_pure_replay(exact, tau):
    ds = data(2)
    server, ws = server_and_clients(
        lambda m: zo_optim.MeZO(m.parameters(), lr=0.05, momentum=0.9, backend="reference"), tau, exact)
    replay = Replica(zo_optim.MeZO(mlp_fn().parameters(), lr=0.05, momentum=0.9, backend="reference"),
                     local_steps=tau, server_seed=99)
    rounds_with_replay(server, ws, ds, replay, rounds=4)
    for w, _ in ws:
        assert w.checksum() == server.checksum() == replay.checksum()
    assert server.optimizer.step_count == 4 * tau


def test_a_round_computed_again_after_a_restart_sends_the_same_reply():
    """A client computes round 1 and saves its state; its reply is lost with a server that restarts from the
    checkpoint it wrote before round 1 closed, and re-sends round 1's task. The client (or its restart from the
    saved state) must reply exactly what it replied the first time: the uninterrupted run's reply. Before, the
    local step counter had moved on by τ, so round 1 was measured on the next batches: another reply, another
    aggregate (the SIGKILL resume test of the CLI failed when the kill landed after a client trained)."""
    from zo_optim.federated import FederatedWrapper

    tau = 2
    server, ws = server_and_clients(mezo, tau)
    ds = data(2)
    closure = [lambda s, m=m, c=c: batch_loss(*ds[c], batch=4)(m, s) for c, (_, m) in enumerate(ws)]
    for c, task in server.open_round().items():  # round 0 closes normally
        assert server.receive(ws[c][0].handle(task, closure[c])).accepted
    server.close_round()
    tasks = server.open_round()  # round 1: the server's checkpoint is from before this round closes
    w = ws[0][0]
    first = w.handle(tasks[0], closure[0])
    saved = w.state_dict()
    again = w.handle(tasks[0], closure[0])  # the restarted server's task for round 1 (the same task)
    assert again.scalars == first.scalars and again.loss == first.loss
    assert w.local_step_counter == 2 * tau  # rounds 0 and 1, each once
    # a client process that restarts from its saved state answers the same
    m2 = mlp_fn()
    w2 = FederatedWrapper(mezo(m2), tau, client_id=0, model=m2)
    w2.load_state_dict(saved)
    reborn = w2.handle(tasks[0], lambda s: batch_loss(*ds[0], batch=4)(m2, s))
    assert reborn.scalars == first.scalars
    # the next round uses the next batches (the counter is not stuck)
    assert server.receive(first).accepted and server.receive(ws[1][0].handle(tasks[1], closure[1])).accepted
    server.close_round()
    nxt = server.open_round()[0]
    assert w.handle(nxt, closure[0]).scalars != first.scalars and w.local_step_counter == 3 * tau


def test_inplace_estimate_is_not_exact_so_the_wrapper_must_restore():
    """Why the wrapper needs transient mode or a copy: a plain in-place estimate moves fp32 weights by ulps."""
    x, y = data(1)[0]
    drift = 0
    for seed in range(20):
        m = mlp_fn()
        before = [p.detach().clone() for p in m.parameters()]
        opt = mezo(m, zo_eps=1e-3)
        opt.estimate(lambda m=m: ((m(x) - y) ** 2).mean(), seed=seed)
        opt.take_estimate()
        drift += sum(int((p != b).sum()) for p, b in zip(m.parameters(), before, strict=True))
        # ... by rounding only: 3 passes (+ε, −2ε, +ε) each round once, by at most ½ float32 spacing at a size
        # below M = |θ| + 6ε (|z| < 6: probability 2e-9 per weight), so at most 1.5 spacings of M; a restore
        # that is skipped or partial leaves a multiple of ε·|z| ≈ 1e-3, thousands of spacings of these weights.
        for p, b in zip(m.parameters(), before, strict=True):
            size = b.abs() + 6 * 1e-3
            spacing = torch.nextafter(size, torch.tensor(float("inf"))) - size
            assert ((p - b).abs() <= 1.5 * spacing).all(), ((p - b).abs() / spacing).max()
    assert drift > 0


def test_hiso_k_frozen_within_a_round_and_updated_once_after_the_weights():
    beta, lr, eps_h, tau = 0.9, 0.1, 1e-8, 2
    m = model_fn()
    opt = hiso(m, lr=lr, beta=beta, hessian_eps=eps_h)
    rep = Replica(opt, local_steps=tau, server_seed=5)
    w = m.weight
    k = opt.state[w]["hessian"] if w in opt.state else None
    assert k is None
    theta0 = w.detach().clone()
    grads = torch.tensor([[0.5], [-0.25]])
    rep.apply_steps(0, grads, {})
    # step 1 (K frozen at 1): θ1 = θ0 − lr·g1·z1; step 2 uses the OLD K = 1 too: θ2 = θ1 − lr·g2·z2
    z1 = _z(5, 0, 1, w)
    z2 = _z(5, 0, 2, w)
    theta1 = theta0 - lr * 0.5 * z1
    assert torch.allclose(w.detach(), theta1 + lr * 0.25 * z2, atol=1e-6)
    ghat2 = -0.25 * z2
    k_expected = beta * 1.0 + (1 - beta) * (ghat2 * ghat2 + eps_h)
    assert torch.allclose(opt.state[w]["hessian"], k_expected, rtol=1e-5)  # only the round's last ĝ, once
    assert opt.freeze_precond is False


def _z(server_seed, r, k, p):
    """z of local step k of round r for the only tensor of the model, from the reference op (u = z when K = 1)."""
    probe = torch.zeros_like(p)
    zo_optim.ops.perturb_([probe], [0], rng.round_seed(server_seed, r, k), 1.0, query=0, backend="reference")
    return probe


def test_hiso_with_k_interval_is_refused():
    with pytest.raises(ValueError, match="k_interval=1"):
        Replica(hiso(model_fn(), k_interval=2))


def test_handshake_refuses_other_contracts():
    server, _ = server_and_clients()
    good = FederatedWrapper(mezo(mlp_fn()), 1, client_id=5).hello()
    assert server.handshake(good).accepted and 5 in server.clients
    cases = {
        "algorithm": FederatedWrapper(hiso(mlp_fn()), 1, client_id=6).hello(),
        "RNG contract": Hello(**{**good.__dict__, "rng_version": "philox/v0"}),
        "protocol version": Hello(**{**good.__dict__, "version": 9}),
        "digest": FederatedWrapper(mezo(mlp_fn(), lr=0.5), 1, client_id=6).hello(),
        "local_steps": FederatedWrapper(mezo(mlp_fn()), 2, client_id=6).hello(),
        "num_queries": FederatedWrapper(mezo(mlp_fn(), num_queries=2), 1, client_id=6).hello(),
    }
    for what, hello in cases.items():
        welcome = server.handshake(encode(hello))
        assert not welcome.accepted and what in welcome.reason, (what, welcome.reason)
    with pytest.raises(ProtocolError, match="refused"):
        FederatedWrapper(hiso(mlp_fn()), 1).welcome(welcome)


def _other_weights() -> torch.nn.Module:
    m = mlp_fn()
    with torch.no_grad():
        m[0].weight[0, 0] = torch.nextafter(m[0].weight[0, 0], torch.tensor(math.inf))  # one ulp, one weight
    return m


def test_handshake_refuses_other_initial_weights_and_names_the_fix():
    server, _ = server_and_clients()
    hello = FederatedWrapper(mezo(_other_weights()), 1, client_id=6).hello()
    welcome = server.handshake(encode(hello))
    assert not welcome.accepted and 6 not in server.clients
    assert "weights or optimizer state at position 0 differ" in welcome.reason and "same seed" in welcome.reason
    # the digest is the replica checksum: equal weights, equal digest; the field travels on the wire
    good = FederatedWrapper(mezo(mlp_fn()), 1, client_id=7).hello()
    assert good.state_digest == server.checksum() and decode(encode(good)).state_digest == good.state_digest
    assert server.handshake(good).accepted
    # a hello without a digest (another engine, or one that chose not to hash) is not checked
    assert server.handshake(dataclasses.replace(hello, client_id=8, state_digest="")).accepted


def test_a_snapshot_does_not_change_the_state_digest():
    """state_dict() creates ZO-Adam's lazily allocated moments; the digest must not tell the two apart (the
    Flower client saves a snapshot before its hello, the server never does)."""
    m = mlp_fn()
    saved = FederatedWrapper(zo_optim.ZOAdam(m.parameters(), lr=1e-2, backend="reference"), 2, model=m)
    saved.state_dict()
    fresh = Replica(zo_optim.ZOAdam(mlp_fn().parameters(), lr=1e-2, backend="reference"), local_steps=2)
    server = Server(zo_optim.ZOAdam(mlp_fn().parameters(), lr=1e-2, backend="reference"), clients=1,
                    clients_per_round=1, local_steps=2, server_seed=1)
    assert saved.hello().state_digest == fresh.checksum() == server.checksum()
    assert server.handshake(saved.hello()).accepted


def test_state_digest_is_checked_at_every_position_the_chain_keeps():
    ds = data(2)
    server, ws = server_and_clients()
    for _ in range(3):
        for c, task in server.open_round().items():
            w, m = ws[c]
            x, y = ds[c]
            server.receive(encode(w.handle(task, lambda step, m=m, x=x, y=y: batch_loss(x, y)(m, step))))
        server.close_round()
    assert server.position == 3
    assert server.checksum() != FederatedWrapper(mezo(mlp_fn()), 1).hello().state_digest  # the weights moved
    # a fresh client (position 0) must hold the server's INITIAL weights, not its current ones
    assert server.handshake(FederatedWrapper(mezo(mlp_fn()), 1, client_id=10).hello()).accepted
    assert not server.handshake(FederatedWrapper(mezo(_other_weights()), 1, client_id=11).hello()).accepted
    # a client that caught up to the server's position carries the server's current state
    w, _ = ws[0]
    w.catch_up(server.sync_task(0))
    assert w.position == 3 and w.hello().state_digest == server.checksum()
    assert server.handshake(w.hello()).accepted
    wrong = dataclasses.replace(w.hello(), state_digest="0" * 64)
    welcome = server.handshake(wrong)
    assert not welcome.accepted and "at position 3 differ" in welcome.reason
    # in between (a client restarted from its own saved state at position 1): the digest chain keeps the server's
    # checksum at every position its log can replay from, so that one is checked too
    assert not server.handshake(dataclasses.replace(wrong, position=1)).accepted
    # a position the server no longer keeps (its log trimmed past it) cannot be checked: accepted
    server.chain.trim(3, [])
    assert server.handshake(dataclasses.replace(wrong, position=1)).accepted


def test_client_refuses_a_task_of_another_contract_and_answers_gaps():
    server, ws = server_and_clients()
    w, _ = ws[0]
    task = server.task_for(0, compute=False)
    for bad in ({"algorithm": "hiso"}, {"rng_version": "x"}, {"local_steps": 2}, {"version": PROTOCOL_VERSION + 1}):
        with pytest.raises(ProtocolError, match="task refused"):
            w.handle(Task(**{**task.__dict__, **bad}))
    # a task whose entries start beyond the client's position: a gap reply, not a crash
    gap = Task(**{**task.__dict__, "round": 5, "log_start": 3, "entries": (RoundEntry(3, 0), RoundEntry(4, 0)),
                  "chain": b""})  # hand-built entries: unverified (a chain of the wrong length is "diverged")
    reply = w.handle(gap, lambda s: 0.0)
    assert reply.status == "gap" and reply.position == 0
    with pytest.raises(GapError):
        w.replica.apply(RoundEntry(2, 0))


def test_server_validates_replies():
    server, ws = server_and_clients()
    ds = data(2)
    tasks = server.open_round()
    w, m = ws[0]
    good = w.handle(tasks[0], lambda s: batch_loss(*ds[0])(m, s), n_examples=3)

    def bad(**kw):
        return Reply(**{**good.__dict__, **kw})

    cases = [
        (bad(version=PROTOCOL_VERSION + 1), "version"), (bad(rng_version="v0"), "rng_version"),
        (bad(algorithm="hiso"), "algorithm"), (bad(round=1), "wrong_round"), (bad(client_id=77), "unknown_client"),
        (bad(scalars=good.scalars[:2]), "shape"), (bad(scalars=pack_scalars([math.nan])), "nonfinite"),
        (bad(scalars=pack_scalars([math.inf])), "nonfinite"), (bad(loss=math.nan), "nonfinite"),
        (bad(scalars=pack_scalars([1e7])), "too_large"), (bad(n_examples=0), "n_examples"),
        (bad(position=0, round=0, extras=(("curvature", b"\0\0\0\0"),)), "shape"),
    ]
    for reply, reason in cases:
        r = server.receive(encode(reply))
        assert not r.accepted and r.reason.startswith(reason), (reason, r.reason)
    # an unknown status cannot even be encoded; a forged status code is refused as malformed
    with pytest.raises(ProtocolError, match="reply status 'maybe' is not one of"):
        encode(bad(status="maybe"))
    forged = encode(good)
    forged["h"] = bytes([7]) + forged["h"][1:]
    assert server.receive(forged).reason.startswith("malformed")
    assert server.receive(encode(good)).accepted
    assert server.receive(encode(good)).reason == "duplicate"
    rec = server.close_round()
    assert rec.participants == (0,) and rec.dropped == (1,)
    assert server.entry(0).scalars == good.scalars  # one valid reply: its scalars, nothing else
    assert server.receive(encode(good)).reason.startswith("late")
    # client 1 owes round 0: not sampled in round 1 (release_after=2)
    assert 1 not in server.open_round()


def test_dirichlet_split_partitions_and_skews():
    labels = torch.arange(1000) % 10
    parts = dirichlet_split(labels, 5, 0.1, seed=3)
    assert sorted(i for p in parts for i in p) == list(range(1000))
    assert parts == dirichlet_split(labels, 5, 0.1, seed=3)
    skewed = [np.bincount(labels[p].numpy(), minlength=10).max() / len(p) for p in parts]
    iid = [np.bincount(labels[p].numpy(), minlength=10).max() / len(p) for p in dirichlet_split(labels, 5, 1e4)]
    assert np.mean(skewed) > 0.4 > 0.15 > np.mean(iid)
    with pytest.raises(ValueError, match="Invalid alpha"):
        dirichlet_split(labels, 5, 0.0)


def test_release_frees_a_client_that_owes_a_reply():
    # engines that learn a task is gone (Flower: an error reply, an expired message) release the client at once
    server, ws = server_and_clients()
    server.open_round()
    assert not server.all_replied
    assert server.release(1) and not server.release(1)  # it owed round 0; now it owes nothing
    w, m = ws[0]
    ds = data(2)
    assert server.receive(w.handle(server.task_for(0), lambda s: batch_loss(*ds[0])(m, s))).accepted
    assert server.all_replied  # the released client counts as answered: the round need not wait for its deadline
    rec = server.close_round()
    assert rec.participants == (0,) and rec.dropped == (1,)
    assert 1 in server.open_round()  # sampled again in the next round (release_after would have waited)


def _corrupt_snapshot(good: Snapshot, how: str) -> Snapshot:
    import io

    if how == "garbage":
        return Snapshot(good.position, b"not a torch.save blob")
    data = torch.load(io.BytesIO(good.payload), weights_only=True)
    if how == "state":
        del data["optimizer"]["zo"]["step"]  # refused by the validated load_state_dict
    elif how == "nan":
        data["params"][0] = torch.full_like(data["params"][0], math.nan)
    elif how == "shape":
        data["params"][0] = data["params"][0][:1]
    buf = io.BytesIO()
    torch.save(data, buf)
    return Snapshot(good.position, buf.getvalue())


@pytest.mark.parametrize("how", ["garbage", "state", "nan", "shape"])
def test_a_refused_snapshot_changes_nothing(how):
    """Weights are copied only after the snapshot's optimizer state passed the (atomic) load."""
    src = Replica(hiso(model_fn()), local_steps=1, server_seed=3)
    with torch.no_grad():
        next(src.optimizer.param_groups[0]["params"].__iter__()).add_(0.5)  # weights that differ from dst's
    src.position = 4
    dst = Replica(hiso(model_fn()), local_steps=1, server_seed=3)
    before = dst.checksum()
    with pytest.raises(ProtocolError, match="snapshot"):
        dst.load_snapshot(_corrupt_snapshot(src.snapshot(), how))
    assert dst.checksum() == before and dst.position == 0 and dst.snapshot_loads == 0
    dst.load_snapshot(src.snapshot())  # the intact one loads
    assert dst.checksum() == src.checksum()
