"""A durable server: state_dict round trip, an atomic self-checking checkpoint, simulate() killed and resumed."""

from __future__ import annotations

import random

import pytest

from fed_problems import batch_loss, data, hiso, mlp_fn
from zo_optim.federated import Server, simulate
from zo_optim.federated.checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint

ROUNDS = 12
KW = dict(rounds=ROUNDS, clients_per_round=3, local_steps=2, seed=7, dropout=0.3, log_limit=4)


class Killed(Exception):
    pass


def _losses():
    return [batch_loss(*d) for d in data(5)]


def _fingerprint(res):
    return (res.coordinator.checksum(), [w.checksum() for w in res.wrappers], [w.local_step_counter
            for w in res.wrappers], res.history, res.bytes_up, res.bytes_down, res.coordinator.rejections)


@pytest.fixture(scope="module")
def uninterrupted():
    return _fingerprint(simulate(mlp_fn, hiso, _losses(), **KW))


@pytest.mark.parametrize("kill_seed", [0, 1])
def test_simulate_killed_at_a_random_round_and_resumed_is_bit_identical(tmp_path, uninterrupted, kill_seed):
    kill_at = random.Random(kill_seed).randrange(1, ROUNDS - 1)  # after round kill_at closed and was checkpointed

    def die(rec, model):
        if rec.round == kill_at:
            raise Killed

    with pytest.raises(Killed):
        simulate(mlp_fn, hiso, _losses(), **KW, checkpoint_dir=tmp_path, on_round=die)
    saved = read_checkpoint(tmp_path)
    assert saved["server"]["replica"]["position"] == kill_at + 1
    # a new process would build everything again from the same arguments; here: fresh models and optimizers
    res = simulate(mlp_fn, hiso, _losses(), **KW, checkpoint_dir=tmp_path, resume=tmp_path)
    # server, every client (weights, optimizer state, batch counters), every round's record and byte counts
    assert _fingerprint(res) == uninterrupted
    assert res.replicas_identical()


def _server(**kw):
    return Server(hiso(mlp_fn()), clients=3, clients_per_round=2, server_seed=3, log_limit=2, **kw)


def test_server_state_dict_round_trips_mid_round():
    a = _server(quarantine_after=1)
    for _ in range(3):
        a.open_round()
        a.close_round()
    tasks = a.open_round()  # an open round: sampled, owed replies, one refused reply (a quarantine)
    c = sorted(tasks)[0]
    from zo_optim import rng
    from zo_optim.federated import Reply, pack_scalars
    a.receive(Reply(round=3, client_id=c, status="ok", position=3, algorithm="hiso", rng_version=rng.RNG_VERSION,
                    n_examples=1, loss=0.0, scalars=pack_scalars([float("nan")])))
    b = _server(quarantine_after=1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict().keys() == a.state_dict().keys()
    for k, v in a.state_dict().items():
        if k not in ("deadline_left",):
            assert b.state_dict()[k] == v, k
    assert b.checksum() == a.checksum() and c in b.quarantine and b.current_round == 3
    # both continue the same way: the same sample in the next round (the sampling RNG came along)
    a.close_round()
    b.close_round()
    assert a.open_round().keys() == b.open_round().keys()


@pytest.mark.parametrize("how", ["truncate", "flip", "magic", "empty"])
def test_a_truncated_or_tampered_checkpoint_is_refused_and_changes_nothing(tmp_path, how):
    a = _server(checkpoint_dir=tmp_path)
    for _ in range(3):
        a.open_round()
        a.close_round()
    path = tmp_path / CHECKPOINT_NAME
    good = path.read_bytes()
    blob = bytearray(good)
    if how == "truncate":
        blob = blob[: len(blob) // 2]
    elif how == "flip":
        blob[len(blob) // 2] ^= 0x04
    elif how == "magic":
        blob[:8] = b"NOTACKPT"
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    b = _server()
    before = (b.checksum(), b.position, b.state_dict()["sampler"])
    match = {"truncate": "truncated", "flip": "altered", "magic": "not a zo-optim", "empty": "not a zo-optim"}[how]
    with pytest.raises(CheckpointError, match=match):
        b.load_checkpoint(tmp_path)
    assert (b.checksum(), b.position, b.state_dict()["sampler"]) == before
    # the intact file loads (three empty rounds in it: their b"" scalars survive the weights_only unpickler)
    path.write_bytes(good)
    b.load_checkpoint(tmp_path)
    assert b.checksum() == a.checksum() and b.position == 3 and b.entry(2).empty


def test_a_state_of_another_configuration_is_refused_before_anything_changes():
    a = _server()
    a.open_round()
    a.close_round()
    state = a.state_dict()
    other = Server(hiso(mlp_fn(), lr=0.5), clients=3, clients_per_round=2, server_seed=3)
    before = other.checksum()
    with pytest.raises(ValueError, match="configuration digest"):
        other.load_state_dict(state)
    b = _server()
    broken = {**state, "positions": {0: 99}}
    with pytest.raises(ValueError, match="position lies outside"):
        b.load_state_dict(broken)
    assert other.checksum() == before and b.position == 0
    snap = dict(state["replica"])
    snap["snapshot"] = b"garbage"
    with pytest.raises(ValueError, match="snapshot"):
        b.load_state_dict({**state, "replica": snap})
    assert b.position == 0 and b.log.end == 0 and b.history == []
