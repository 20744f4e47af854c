"""The digest chain: every snapshot and log entry a client applies is verified; a corrupted one is refused, the
client reverted to exactly where it was, and a fresh snapshot heals it."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from fed_problems import batch_loss, data, hiso, mlp_fn
from zo_optim.federated import FederatedWrapper, RoundEntry, Server, Snapshot, decode, encode, payload_bytes
from zo_optim.federated.chain import ChainError


def _run(rounds=5):
    """Clients 0 and 1 train every round; client 2 joins late (position 0, older than the trimmed log)."""
    server = Server(hiso(mlp_fn()), clients=[0, 1], clients_per_round=2, server_seed=11, log_limit=2)
    ds = data(3)
    ws = {}
    for c in (0, 1, 2):
        m = mlp_fn()
        ws[c] = (FederatedWrapper(hiso(m), client_id=c, model=m), m)
        if c < 2:
            ws[c][0].welcome(server.handshake(ws[c][0].hello()))
    for _ in range(rounds):
        for c, task in server.open_round().items():
            w, m = ws[c]
            reply = w.handle(decode(encode(task)), lambda s, m=m, c=c: batch_loss(*ds[c])(m, s))
            assert server.receive(encode(reply)).accepted
        server.close_round()
    ws[2][0].welcome(server.handshake(ws[2][0].hello()))
    return server, {c: w for c, (w, _) in ws.items()}


def _resave(snapshot: Snapshot, edit) -> Snapshot:
    blob = torch.load(io.BytesIO(snapshot.payload), weights_only=True)
    edit(blob)
    buf = io.BytesIO()
    torch.save(blob, buf)
    return Snapshot(snapshot.position, buf.getvalue())


def _flip_weight_bit(blob):
    w = blob["params"][0]
    w.view(torch.int32).reshape(-1)[3] ^= 1 << 2  # one mantissa bit of one weight: finite, plausible, wrong


def _change_lr(blob):
    blob["optimizer"]["param_groups"][0]["lr"] *= 1.5


def _state(w):
    return w.checksum(), w.position, w.replica.snapshot_loads, w.chain_digest


def _assert_refused_then_healed(server, w, bad_task):
    before = _state(w)
    reply = w.handle(decode(encode(bad_task)))
    assert reply.status == "diverged" and reply.position == before[1]
    assert _state(w) == before  # reverted bit for bit: weights, optimizer state, position, chain digest
    receipt = server.receive(encode(reply))
    assert receipt.reason == "diverged" and receipt.retry is not None and receipt.retry.snapshot is not None
    assert w.handle(decode(encode(receipt.retry))).status == "synced"  # the fresh snapshot heals it
    assert w.checksum() == server.checksum() and w.chain_digest == server.chain.at(server.position)[0]


@pytest.mark.parametrize("edit, says", [(_flip_weight_bit, "does not have the server's checksum"),
                                        (_change_lr, "does not have the server's checksum")])
def test_a_corrupted_snapshot_is_refused_and_the_client_unchanged(edit, says):
    server, ws = _run()
    task = server.sync_task(2)
    assert task.snapshot is not None and ws[2].position == 0  # the late joiner needs a snapshot
    bad = dataclasses.replace(task, snapshot=_resave(task.snapshot, edit))
    _assert_refused_then_healed(server, ws[2], bad)
    assert says in ws[2].divergences[0]


def test_a_flipped_bit_in_a_log_scalar_is_refused_and_the_client_unchanged():
    server, ws = _run()
    task = server.sync_task(0)  # client 0 misses the last round: one entry
    assert len(task.entries) == 1 and task.snapshot is None
    e = task.entries[0]
    scalars = bytearray(e.scalars)
    scalars[1] ^= 0x01  # a low mantissa bit of the first aggregated scalar
    bad = dataclasses.replace(task, entries=(RoundEntry(e.round, e.n_participants, bytes(scalars), e.extras),))
    _assert_refused_then_healed(server, ws[0], bad)
    assert "checksum differs" in ws[0].divergences[0]


def test_a_log_that_does_not_extend_the_clients_history_is_refused():
    server, ws = _run()
    task = server.sync_task(0)
    wrong_base = bytes(32)
    bad = dataclasses.replace(task, chain=wrong_base + task.chain[32:])
    _assert_refused_then_healed(server, ws[0], bad)
    assert "does not extend" in ws[0].divergences[0]


def test_the_welcome_commits_to_the_initial_weights():
    server, _ = _run(rounds=1)
    torch.manual_seed(999)
    other = Server(hiso(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 16))),
                   clients=1, clients_per_round=1, server_seed=11)
    m = mlp_fn()
    w = FederatedWrapper(hiso(m), client_id=5, model=m)
    with pytest.raises(ChainError, match="does not commit to our initial weights"):
        w.welcome(other.welcome_for(5, True, "ok", at=0))  # a server whose initial weights are not ours
    w.welcome(server.welcome_for(5, True, "ok", at=0))
    assert w.chain_digest == server.chain.at(0)[0]


def test_the_chain_costs_64_bytes_per_task_in_the_steady_state():
    server, _ = _run()
    task = server.sync_task(0)
    # the base digest + one checksum per entry, 32 B each: O(1) per round, independent of the model size
    assert len(task.entries) == 1 and payload_bytes(task) - payload_bytes(dataclasses.replace(task, chain=b"")) == 64


def test_an_entry_the_optimizer_refuses_is_a_divergence_not_a_crash():
    import zo_optim
    from zo_optim import rng
    from zo_optim.federated import Reply, pack_scalars

    def hizoo(m):
        return zo_optim.HiZOO(m.parameters(), lr=1e-3, backend="reference")

    server = Server(hizoo(mlp_fn()), clients=[0], clients_per_round=1, server_seed=4)
    for r in range(2):
        server.open_round()
        assert server.receive(Reply(round=r, client_id=0, status="ok", position=r, algorithm="hizoo",
                                    rng_version=rng.RNG_VERSION, n_examples=1, loss=0.1, scalars=pack_scalars([0.2]),
                                    extras=(("curvature", pack_scalars([3.0])),))).accepted
        server.close_round()
    m = mlp_fn()
    w = FederatedWrapper(hizoo(m), client_id=0, model=m)
    w.welcome(server.welcome_for(0, True, "ok", at=0))
    task = server.task_for(0, compute=False, position=0)  # the two rounds this fresh client misses
    e = task.entries[1]
    bad = dataclasses.replace(task, entries=(task.entries[0], RoundEntry(e.round, e.n_participants, e.scalars,
                                                                         (("curvature", pack_scalars([-3.0])),))))
    _assert_refused_then_healed(server, w, bad)
    assert "negative curvature" in w.divergences[0]


def test_a_client_whose_own_digest_is_wrong_heals_from_the_fresh_snapshot():
    server, ws = _run()
    w = ws[0]
    assert w.handle(decode(encode(server.sync_task(0)))).status == "synced"  # at the server's position
    w.chain_digest = bytes(32)  # its record of the history is corrupt (the weights are fine)
    reply = w.handle(decode(encode(server.sync_task(0))))  # no entries: only the history check can object
    assert reply.status == "diverged" and "differs from ours" in w.divergences[0]
    receipt = server.receive(encode(reply))
    assert receipt.retry is not None and receipt.retry.snapshot is not None and not receipt.retry.entries
    assert w.handle(decode(encode(receipt.retry))).status == "synced"
    assert w.chain_digest == server.chain.at(server.position)[0] and w.checksum() == server.checksum()
