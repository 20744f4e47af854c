"""Chaos: 1000 rounds with dropouts, late joiners past the trimmed log, a restarted client, server kills (a new
server from the last checkpoint) and every kind of bad reply.

Checked every round: the logged aggregate is exactly the n_examples-weighted float64 mean (rounded once to
float32) of the honest replies delivered in time — so nothing invalid is applied and nothing is applied twice —
and the log stays within its limit. At the end every replica is bit-identical to the server, and to a fresh
replica replaying the full sequence of entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections import Counter

import numpy as np
import pytest

import zo_optim
from fed_problems import batch_loss, data, full_loss, model_fn
from zo_optim.federated import (
    PROTOCOL_VERSION,
    FederatedWrapper,
    Replica,
    Reply,
    Server,
    decode,
    encode,
    pack_scalars,
    reply_client_id,
)

M, m, ROUNDS, LOG_LIMIT, SNAPSHOT_EVERY, SEED = 10, 4, 1000, 40, 20, 2024
LATE_JOINERS, JOIN_AT = (8, 9), 600
RESTART_CLIENT, RESTART_AT = 3, 300
CHECKPOINT_EVERY, SERVER_KILLS = 50, (250, 650, 900)  # kills land on checkpointed rounds: nothing is lost


def opt_fn(model):
    # momentum: optimizer state that must match bit for bit too; the numba backend keeps 1000 rounds in seconds
    return zo_optim.MeZO(model.parameters(), lr=0.005, momentum=0.5, backend="cpu")


def _client(c):
    model = model_fn()
    return FederatedWrapper(opt_fn(model), 1, client_id=c, model=model), model


def _expected(replies):
    x = np.stack([np.frombuffer(r.scalars, dtype="<f4").astype(np.float64) for r in replies])
    w = np.array([r.n_examples for r in replies], dtype=np.float64)
    return pack_scalars(((w[:, None] * x).sum(0) / w.sum()).astype(np.float32))


def test_chaos_thousand_rounds(tmp_path):
    t0 = time.perf_counter()
    ds = data(M, seed=SEED)
    losses = [batch_loss(*d) for d in ds]

    def new_server():
        return Server(opt_fn(model_fn()), clients=[c for c in range(M) if c not in LATE_JOINERS], clients_per_round=m,
                      server_seed=SEED, log_limit=LOG_LIMIT, snapshot_every=SNAPSHOT_EVERY, release_after=2,
                      checkpoint_dir=tmp_path, checkpoint_every=CHECKPOINT_EVERY)

    server = new_server()
    clients = {}
    for c in range(M):
        if c not in LATE_JOINERS:
            clients[c] = _client(c)
            clients[c][0].welcome(server.handshake(encode(clients[c][0].hello())))
    chaos = random.Random(SEED)
    expected_rejections: Counter[str] = Counter()
    stale: list[tuple[int, dict]] = []  # honest replies held back and delivered in a later round
    all_entries = []
    owed: dict[int, int] = {}
    initial = full_loss(model_fn(), ds)

    def reply_of(c, task):
        w, model = clients[c]
        return w.handle(decode(encode(task)), lambda s: losses[c](model, s), n_examples=1 + c)

    for r in range(ROUNDS):
        if r in SERVER_KILLS:  # the server process dies; a new one (fresh model) continues from its checkpoint
            before = server.checksum()
            server = new_server()
            server.load_checkpoint(tmp_path)
            assert server.position == r and server.checksum() == before
        if r == JOIN_AT:
            for c in LATE_JOINERS:  # join after the log was trimmed: snapshot + tail
                clients[c] = _client(c)
                clients[c][0].welcome(server.handshake(clients[c][0].hello()))
        if r == RESTART_AT:  # a client loses its state; the server still believes its old position
            clients[RESTART_CLIENT] = _client(RESTART_CLIENT)
        owed = {c: since for c, since in owed.items() if r - since <= 2}  # release_after=2
        tasks = server.open_round()
        assert 1 <= len(tasks) <= m and not set(tasks) & set(owed)  # never one that still owes a reply
        assert len(tasks) == min(m, len(server.clients) - len(owed))
        deliveries: list[tuple[dict, str | None]] = []  # (encoded message, expected rejection or None)
        honest = {}
        for c, task in tasks.items():
            if chaos.random() < 0.3:  # dropout: never answers (or only much later)
                owed[c] = r
                if chaos.random() < 0.3:
                    stale.append((r, encode(reply_of(c, task))))
                continue
            reply = reply_of(c, task)
            while reply.status == "gap":  # the restarted client reports its real position
                receipt = server.receive(encode(reply))
                expected_rejections["gap"] += 1
                assert receipt.retry is not None and receipt.retry.snapshot is not None
                reply = reply_of(c, receipt.retry)
            assert reply.status == "ok"
            honest[c] = reply
            enc = encode(reply)
            bad = chaos.random()
            if bad < 0.5:  # a faulty copy arrives (before or after the good one); it must not count
                kind = chaos.choice(["nan", "inf", "shape", "too_large", "wrong_round", "version", "algorithm",
                                     "rng_version", "not_sampled", "n_examples", "position"])
                fake, reason = _fault(reply, enc, kind, r, server)
                deliveries.append((fake, reason))
            deliveries.append((enc, None))
            if chaos.random() < 0.15:
                deliveries.append((enc, "duplicate"))
        for item in stale[:]:
            if item[0] < r and chaos.random() < 0.5:
                deliveries.append((item[1], "late"))
                if owed.get(reply_client_id(item[1])) == item[0]:
                    del owed[reply_client_id(item[1])]  # it answered (late): it may be sampled again
                stale.remove(item)
        chaos.shuffle(deliveries)  # out of order within the round
        seen_good = set()
        for msg, reason in deliveries:
            receipt = server.receive(msg)
            cid = reply_client_id(msg)
            # the duplicate check comes after the header checks (version ... not_sampled) and before the content ones
            if cid in seen_good and reason in (None, "nonfinite", "shape", "too_large", "n_examples", "position"):
                reason = "duplicate"
            if reason is None:
                assert receipt.accepted, receipt
                seen_good.add(cid)
            else:
                if reason == "duplicate" and cid not in seen_good:  # the copy arrived first: it is the good one
                    assert receipt.accepted, receipt
                    seen_good.add(cid)
                    continue
                assert not receipt.accepted and receipt.reason.startswith(reason), (reason, receipt)
                expected_rejections[reason] += 1
        rec = server.close_round()
        entry = server.entry(r)
        all_entries.append(entry)
        assert rec.participants == tuple(sorted(honest))
        assert entry.n_participants == len(honest)
        if honest:
            assert entry.scalars == _expected([honest[c] for c in sorted(honest)])
        else:
            assert entry.empty
        assert len(server.log) <= LOG_LIMIT and len(server.log.snapshots) <= 2
        if r >= 2 * LOG_LIMIT:
            assert server.log.start > 0
    # late replies that were never delivered arrive now (round closed)
    for _, old in stale:
        assert server.receive(old).reason.startswith("late")
        expected_rejections["late"] += 1
    for reason, n in expected_rejections.items():
        assert server.rejections[reason] == n, (reason, server.rejections[reason], n)
    assert sum(server.rejections.values()) == sum(expected_rejections.values())
    # everyone catches up and is bit-identical to the server
    for c, (w, _) in clients.items():
        assert server.receive(w.handle(server.sync_task(c))).reason == "synced"
        assert w.position == ROUNDS
        assert w.checksum() == server.checksum(), c
    for c in LATE_JOINERS:
        assert clients[c][0].replica.snapshot_loads >= 1
    assert clients[RESTART_CLIENT][0].replica.snapshot_loads >= 1
    # the server is a function of the entries: a fresh replica replaying them all matches
    fresh = Replica(opt_fn(model_fn()), server_seed=SEED)
    fresh.apply_all(all_entries)
    assert fresh.checksum() == server.checksum()
    assert full_loss(clients[0][1], ds) < 0.5 * initial  # and it trained
    elapsed = time.perf_counter() - t0
    print(f"chaos: {ROUNDS} rounds in {elapsed:.1f}s, rejections {dict(server.rejections)}")


def _fault(reply: Reply, enc: dict, kind: str, r: int, server: Server) -> tuple[dict, str]:
    n = len(reply.scalars) // 4
    if kind == "nan":
        return encode(dataclasses.replace(reply, scalars=pack_scalars([math.nan] * n))), "nonfinite"
    if kind == "inf":
        return encode(dataclasses.replace(reply, scalars=pack_scalars([-math.inf] * n))), "nonfinite"
    if kind == "shape":
        return encode(dataclasses.replace(reply, scalars=reply.scalars + reply.scalars)), "shape"
    if kind == "too_large":
        return encode(dataclasses.replace(reply, scalars=pack_scalars([3e7] * n))), "too_large"
    if kind == "wrong_round":
        return encode(dataclasses.replace(reply, round=r + 1 + r % 3)), "wrong_round"
    if kind == "version":
        return {**enc, "zo_fed": PROTOCOL_VERSION + 1}, "version"
    if kind == "algorithm":
        return encode(dataclasses.replace(reply, algorithm="hiso")), "algorithm"
    if kind == "rng_version":
        return encode(dataclasses.replace(reply, rng_version="philox4x32-10/bm4/v0")), "rng_version"
    if kind == "n_examples":
        return encode(dataclasses.replace(reply, n_examples=2**32 - 1)), "n_examples"  # > max_examples (2**31)
    if kind == "position":
        return encode(dataclasses.replace(reply, position=r + 1)), "position"
    # a client that was not sampled this round
    outsider = next(c for c in server.clients if c not in set(server._sampled))
    return encode(dataclasses.replace(reply, client_id=outsider)), "not_sampled"


# ---------------------------------------------------------------------------------------------- Byzantine

BYZ_ROUNDS, BYZ_CLIENTS = 80, 5


def byz_opt(model):
    return zo_optim.MeZO(model.parameters(), lr=0.01, backend="cpu")


@functools.cache
def _byzantine_run(aggregation: str, attack: bool) -> tuple[float, float]:
    """5 clients, all sampled every round; client 0 sends −200× its honest scalars when ``attack``."""
    ds = data(BYZ_CLIENTS, seed=7)
    losses = [batch_loss(*d) for d in ds]
    server = Server(byz_opt(model_fn()), clients=BYZ_CLIENTS, clients_per_round=BYZ_CLIENTS, server_seed=11,
                    aggregation=aggregation, trim_fraction=0.2)
    clients = []
    for c in range(BYZ_CLIENTS):
        model = model_fn()
        w = FederatedWrapper(byz_opt(model), 1, client_id=c, model=model)
        w.welcome(server.handshake(w.hello()))
        clients.append((w, model))
    for _ in range(BYZ_ROUNDS):
        for c, task in server.open_round().items():
            w, model = clients[c]
            reply = w.handle(task, lambda s, c=c, model=model: losses[c](model, s), n_examples=8)
            if attack and c == 0:  # huge but within max_abs_scalar: passes validation
                scalars = np.frombuffer(reply.scalars, dtype="<f4") * -200.0
                reply = dataclasses.replace(reply, scalars=pack_scalars(np.clip(scalars, -9e5, 9e5)))
            assert server.receive(encode(reply)).accepted
        server.close_round()
    return full_loss(_model_of(server), ds), full_loss(model_fn(), ds)


def _model_of(server: Server):
    model = model_fn()
    for p, q in zip(model.parameters(), server.replica._params(), strict=True):
        p.data.copy_(q)
    return model


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_byzantine_client_is_bounded_by_robust_aggregation(aggregation):
    honest, initial = _byzantine_run("mean", attack=False)
    attacked, _ = _byzantine_run(aggregation, attack=True)
    mean_attacked, _ = _byzantine_run("mean", attack=True) if aggregation == "median" else (math.inf, None)
    print(f"{aggregation}: initial {initial:.4f} honest(mean) {honest:.4f} attacked {attacked:.4f} "
          f"attacked(mean) {mean_attacked:.4g}")
    # stated bound (docs/federated.md): with 1 of 5 clients Byzantine, the robust run's loss ends within 1.25x of
    # the honest run's and keeps at least half of the honest run's loss decrease (measured: docs/federated.md)
    assert attacked <= 1.25 * honest
    assert initial - attacked >= 0.5 * (initial - honest)
    # and the attack is real: with the plain mean it wrecks training
    if aggregation == "median":
        assert not mean_attacked < initial
