"""A Flower federation whose ServerApp stops after a random round, resumed from its checkpoint in a new Flower run.

Flower's own simulation runtime (``run_simulation``: LinkState, InMemoryGrid, node contexts, message loop), with
Ray's actor pool swapped for the in-process backend of ``flower_inprocess`` and every message run as in a fresh
``flwr-clientapp`` process (the client rebuilt from ``context.state``). Run 1 closes rounds 0..k-1 and stops without
a final sync (the ServerApp ended: a kill after round k-1's checkpoint); run 2 is a new Flower run — new contexts,
new node ids, empty ``context.state`` — whose strategy resumes from the checkpoint and whose clients rejoin from
their node-local ``state_dir``. The server and every client end bit-identical to ``simulate()`` of the whole run,
which ``test_federated_flower`` shows is the uninterrupted Flower run.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

flwr = pytest.importorskip("flwr")

import zo_optim  # noqa: E402
from fed_problems import batch_loss, data, mlp_fn  # noqa: E402
from flower_inprocess import use_in_process_backend  # noqa: E402
from zo_optim.federated import simulate  # noqa: E402
from zo_optim.federated.checkpoint import CheckpointError  # noqa: E402

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

from flwr.app import Context  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from zo_optim.federated.flower import ZOStrategy, make_client_app, make_server_app  # noqa: E402

N_NODES = 4
TAU = 2
SEED = 11
ROUNDS = 7
M = 2  # 2 of 4 per round: clients sit out rounds, so they rejoin at different positions


def make_opt(model: torch.nn.Module) -> zo_optim.ZOAdam:
    return zo_optim.ZOAdam(model.parameters(), lr=1e-2, backend="reference")


def client_data(context: Context):
    return batch_loss(*data(N_NODES, seed=3)[int(context.node_config["partition-id"])])


@pytest.fixture
def in_process(monkeypatch):
    backend = use_in_process_backend(monkeypatch)
    backend.fresh_process = True  # every message rebuilds its client from context.state (deployment)
    return backend


@pytest.fixture(scope="module")
def uninterrupted():
    losses = [batch_loss(*d) for d in data(N_NODES, seed=3)]
    return simulate(mlp_fn, make_opt, losses, rounds=ROUNDS, clients_per_round=M, local_steps=TAU, seed=SEED)


def strategy(**kw) -> ZOStrategy:
    return ZOStrategy(make_opt(mlp_fn()), clients_per_round=M, local_steps=TAU, server_seed=SEED, round_timeout=60.0,
                      **kw)


def run(strat: ZOStrategy, rounds: int, state_dir) -> None:
    app = make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU, state_dir=state_dir)
    run_simulation(make_server_app(strat, rounds), app, num_supernodes=N_NODES)


def positions(state_dir) -> dict[int, int]:
    from zo_optim.federated.checkpoint import read_checkpoint

    return {c: read_checkpoint(state_dir / f"client-{c}.ckpt")["position"] for c in range(N_NODES)}


@pytest.mark.parametrize("kill_seed", [0, 1])
def test_serverapp_stopped_at_a_random_round_resumes_bit_identical(in_process, tmp_path, uninterrupted, kill_seed):
    k = random.Random(kill_seed).randrange(1, ROUNDS - 1)  # run 1 closes rounds 0..k-1, then the ServerApp ends
    ckpt, states = tmp_path / "server", tmp_path / "clients"
    first = strategy(min_nodes=N_NODES, checkpoint_dir=ckpt, sync_at_end=False)
    run(first, k, states)
    assert first.server.position == k and not first.errors
    left_at = positions(states)
    # the clients sampled in round k-1 are at k-1 (they apply its entry when next contacted), the others further
    # back (seed 0: k = 4, positions {2, 2, 3, 3}; seed 1: k = 2, {0, 1, 0, 1}): they must rejoin at their own
    # positions, not the server's
    assert max(left_at.values()) < k and len(set(left_at.values())) > 1

    second = strategy(checkpoint_dir=ckpt, resume=ckpt)  # a new ServerApp process: built again, then the checkpoint
    assert second.server.position == k and second.min_nodes == N_NODES  # min_nodes: the clients it knows
    run(second, ROUNDS, states)
    assert not second.errors and not second.refused and second.server.position == ROUNDS
    # the handshake registered every client at the position its state_dir file held
    assert second.server.rejections["handshake"] == 0 and second.server.rejections["gap"] == 0
    # bit-identical to the uninterrupted run: server weights + optimizer state, every client, every round's record
    assert second.server.checksum() == uninterrupted.coordinator.checksum()
    for p, q in zip(second.server.optimizer.param_groups[0]["params"], uninterrupted.server.parameters(), strict=True):
        assert torch.equal(p, q)
    assert second.client_checksums == {c: w.checksum() for c, w in enumerate(uninterrupted.wrappers)}
    assert [(r.sampled, r.participants, r.bytes_up, r.bytes_down) for r in second.server.history] == [
        (r.sampled, r.participants, r.bytes_up, r.bytes_down) for r in uninterrupted.history]
    assert positions(states) == dict.fromkeys(range(N_NODES), ROUNDS)
    assert second.replicas_identical()
    # the record byte counters came along: run 2's rounds 0..k-1 are run 1's
    assert {r: second.wire_up[r] for r in range(k)} == {r: first.wire_up[r] for r in range(k)}


def test_without_the_client_state_dir_the_resume_is_valid_but_not_the_same_run(in_process, tmp_path, uninterrupted):
    """The control: clients that lost their state rejoin at 0 and catch up (every replica still equals the
    server), but their batch counters restarted, so the federation trains on other batches than the
    uninterrupted run — which is why the state_dir is needed for bit-identity."""
    k, ckpt = 3, tmp_path / "server"
    run(strategy(min_nodes=N_NODES, checkpoint_dir=ckpt, sync_at_end=False), k, None)
    second = strategy(resume=ckpt)
    run(second, ROUNDS, None)
    assert not second.errors and second.server.position == ROUNDS
    assert second.replicas_identical()  # caught up correctly...
    assert second.server.checksum() != uninterrupted.coordinator.checksum()  # ...but not the same run


def test_a_corrupt_checkpoint_or_too_few_rounds_is_refused(in_process, tmp_path):
    ckpt = tmp_path / "server"
    run(strategy(min_nodes=N_NODES, checkpoint_dir=ckpt, sync_at_end=False), 2, tmp_path / "clients")
    blob = bytearray((ckpt / "server.ckpt").read_bytes())
    good = bytes(blob)
    blob[len(blob) // 2] ^= 0x01
    (ckpt / "server.ckpt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="altered"):
        strategy(resume=ckpt)
    (ckpt / "server.ckpt").write_bytes(good)
    with pytest.raises(ValueError, match="Invalid num_rounds: 1"):
        strategy(resume=ckpt).start(None, num_rounds=1)  # type: ignore[arg-type]
    # a client's state file that was altered is refused by that node (its hello fails with the reason)
    f = tmp_path / "clients" / "client-0.ckpt"
    bad = bytearray(f.read_bytes())
    bad[-3] ^= 0x01
    f.write_bytes(bytes(bad))
    second = strategy(resume=ckpt, handshake_timeout=20.0)
    run(second, 3, tmp_path / "clients")
    assert any("altered" in why for _, _, _, why in second.errors)
    assert 0 not in second.node_of and sorted(second.node_of) == [1, 2, 3]
    check = second.replicas_identical()
    assert not check and (0, "did not reconnect after the resume") in check.unchecked
