"""Flower engine (zo_optim.federated.flower): Flower's own simulation runtime ends bit-identical to simulate().

* ``test_run_simulation_is_bit_identical_to_simulate``: ``flwr.simulation.run_simulation`` with 3 SuperNodes
  (Ray actors, separate processes), ZOAdam, τ = 2 — server weights, optimizer state, every client (checksums
  from the final sync), the sampled sets and the payload bytes per round equal ``simulate(...)``'s.
* The fast tests run the same ``run_simulation`` with Ray's actor pool swapped for an in-process backend
  (a ``flwr`` ``Backend`` subclass; LinkState, InMemoryGrid, node contexts and the message loop are Flower's):
  every message holds only ConfigRecords (never an ArrayRecord), a node speaking another RNG contract is
  refused at the handshake and never sampled, a straggler's late reply is dropped without breaking
  bit-identity, and clients rebuilt from ``context.state`` for every message (deployment's fresh
  processes) stay exact.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

import pytest
import torch

flwr = pytest.importorskip("flwr")

import zo_optim  # noqa: E402
from fed_problems import batch_loss, data, mlp_fn  # noqa: E402
from flower_inprocess import tampered_client_app, use_in_process_backend  # noqa: E402
from zo_optim import rng  # noqa: E402
from zo_optim.federated import simulate  # noqa: E402
from zo_optim.federated.protocol import REPLY_HEADER  # noqa: E402

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

from flwr.app import Context, MetricRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from zo_optim.federated.flower import RECORD_KEY, ZOStrategy, make_client_app, make_server_app  # noqa: E402
from zo_optim.federated.flower import client_app as zo_client_app  # noqa: E402

TESTS = str(pathlib.Path(__file__).resolve().parent)
N_NODES = 3
TAU = 2
SEED = 7
DATA_SEED = 2


# module-level (picklable by reference): Ray ships the ClientApp to its actors with cloudpickle
def make_opt(model: torch.nn.Module) -> zo_optim.ZOAdam:
    return zo_optim.ZOAdam(model.parameters(), lr=1e-2, backend="reference")


def client_data(context: Context):
    return batch_loss(*data(N_NODES, seed=DATA_SEED)[int(context.node_config["partition-id"])])


def reference(rounds: int, clients_per_round: int):
    losses = [batch_loss(*d) for d in data(N_NODES, seed=DATA_SEED)]
    return simulate(mlp_fn, make_opt, losses, rounds=rounds, clients_per_round=clients_per_round, local_steps=TAU,
                    seed=SEED)


def assert_same_as_simulate(strategy: ZOStrategy, server_model: torch.nn.Module, sim, clients=range(N_NODES)) -> None:
    for p, q in zip(server_model.parameters(), sim.server.parameters(), strict=True):
        assert torch.equal(p, q)
    ours, theirs = strategy.server.optimizer.state_dict(), sim.coordinator.optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys() and ours["state"]
    for k in ours["state"]:
        for name, v in ours["state"][k].items():
            w = theirs["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)
    assert strategy.server.checksum() == sim.coordinator.checksum()
    assert {c: strategy.client_checksums.get(c) for c in clients} == {c: sim.wrappers[c].checksum() for c in clients}


def strategy_for(rounds: int, clients_per_round: int, **kw: Any) -> tuple[ZOStrategy, torch.nn.Module]:
    model = mlp_fn()
    kw.setdefault("round_timeout", 60.0)
    kw.setdefault("min_nodes", N_NODES)
    strategy = ZOStrategy(make_opt(model), clients_per_round=clients_per_round, local_steps=TAU, server_seed=SEED,
                          **kw)
    return strategy, model


@pytest.mark.slow
def test_run_simulation_is_bit_identical_to_simulate(monkeypatch):
    ray = pytest.importorskip("ray")
    # Ray's workers import this module and fed_problems by name: put tests/ on their path (Flower also
    # forwards sys.path, but only when it initialises Ray itself)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    rounds, m = 4, 2
    sim = reference(rounds, m)
    strategy, model = strategy_for(rounds, m)
    t0 = time.perf_counter()
    # Ray with one CPU: one actor and one prestarted worker (17 s alone on 2 cores; 2 CPUs: 26 s)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 1, "include_dashboard": False}}
    try:
        run_simulation(make_server_app(strategy, rounds),
                       make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU),
                       num_supernodes=N_NODES, backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    elapsed = time.perf_counter() - t0
    assert not strategy.errors and not strategy.refused
    assert len(strategy.node_of) == N_NODES
    assert [r.participants for r in strategy.server.history] == [r.participants for r in sim.history]
    assert [(r.bytes_up, r.bytes_down) for r in strategy.server.history] == [
        (r.bytes_up, r.bytes_down) for r in sim.history]
    assert_same_as_simulate(strategy, model, sim)
    assert strategy.replicas_identical()
    print(f"run_simulation: {elapsed:.1f}s for {rounds} rounds on {N_NODES} Ray SuperNodes")


# ---------------------------------------------------------------------------- in-process Flower runtime


@pytest.fixture
def in_process(monkeypatch):
    return use_in_process_backend(monkeypatch)


def wrong_rng_client_app(bad_partition: int) -> ClientApp:
    """The real client app, except that node ``bad_partition`` announces another RNG contract."""
    def tamper(rec) -> None:
        rec["rng_version"] = "philox4x32-10/bm4/v0"

    return tampered_client_app(make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU), "query",
                               bad_partition, tamper)


def test_messages_are_config_records_only_and_a_wrong_rng_client_is_refused(in_process):
    rounds, m = 3, 2
    strategy, model = strategy_for(rounds, m)
    run_simulation(make_server_app(strategy, rounds), wrong_rng_client_app(bad_partition=2), num_supernodes=N_NODES)
    # no ArrayRecord (nor MetricRecord) in any message either way; every message holds our one ConfigRecord
    assert in_process.seen and all(arrays == () for _, arrays, _ in in_process.seen)
    assert all(RECORD_KEY in configs for _, _, configs in in_process.seen)
    types = [t for t, _, _ in in_process.seen if t != "reply"]
    assert types.count("query") == N_NODES and types.count("train") == rounds * m
    # the node with another RNG contract was refused at the handshake, with the reason, and never sampled
    assert len(strategy.refused) == 1
    (reason,) = strategy.refused.values()
    assert "RNG contract" in reason and rng.RNG_VERSION in reason
    assert sorted(strategy.node_of) == [0, 1]
    assert all(set(r.sampled) == {0, 1} for r in strategy.server.history)
    assert strategy.server.rejections["handshake"] == 1
    # the refused node was never checked: the check says so and is not truthy, though both checked are identical
    check = strategy.replicas_identical()
    assert check.identical and check.checked == (0, 1) and not check
    (node, why), = check.unchecked
    assert str(node).startswith("node ") and why.startswith("refused: RNG contract")
    # bytes up per reply: payload 8 + len("reply") + the 29 B packed header + 4·τ·P (docs/federated.md), and on
    # Flower's record count the 24 B of keys on top (zo_fed, kind, h, scalars, extras)
    payload = 8 + len("reply") + REPLY_HEADER.size + 4 * TAU
    for r in strategy.server.history:
        assert r.bytes_up == payload * len(r.participants)
        assert strategy.wire_up[r.round] == (payload + 24) * len(r.participants)
    # without client 2 the federation is simulate() over clients 0 and 1 (both sampled every round)
    losses = [batch_loss(*d) for d in data(N_NODES, seed=DATA_SEED)][:2]
    sim = simulate(mlp_fn, make_opt, losses, rounds=rounds, clients_per_round=m, local_steps=TAU, seed=SEED)
    assert_same_as_simulate(strategy, model, sim, clients=(0, 1))


def test_fresh_process_per_message_stays_bit_identical(in_process):
    rounds, m = 4, 2
    in_process.fresh_process = True  # every message rebuilds its client from context.state
    strategy, model = strategy_for(rounds, m)
    evaluated = []

    def evaluate_fn(server_round, arrays):  # the server replica's parameters, built locally (never sent)
        evaluated.append((server_round, [a.numpy() for a in arrays.values()]))
        return MetricRecord({"n": len(arrays)})

    # the context-taking forms that a deployment's run config needs
    app = make_client_app(lambda context: mlp_fn(), lambda model, context: make_opt(model), client_data,
                          local_steps=lambda context: TAU)
    run_simulation(make_server_app(strategy, rounds, evaluate_fn=evaluate_fn), app, num_supernodes=N_NODES)
    assert not strategy.errors
    sim = reference(rounds, m)
    assert_same_as_simulate(strategy, model, sim)
    assert [r for r, _ in evaluated] == list(range(rounds + 1))
    for got, want in zip(evaluated[-1][1], sim.server.parameters(), strict=True):
        assert torch.equal(torch.from_numpy(got), want)


WEIGHTS = (5, 1, 3)  # unequal, so a mean that ignored them would move the weights elsewhere


def weighted_client_data(context: Context):
    part = int(context.node_config["partition-id"])
    return client_data(context), WEIGHTS[part]  # data_fn's (loss, n_examples): the reply's weight in the mean


def test_weighted_clients_are_bit_identical_to_simulate_with_the_same_weights(in_process):
    """A ClientApp whose data_fn returns (loss, n) (as examples/flower's, by number of tweets) follows
    simulate(..., n_examples=n), bit for bit; simulate() without them is another federation (its checksum differs:
    the aggregate is Σ n·g / Σ n, not the plain mean)."""
    rounds, m = 3, 3
    in_process.fresh_process = True
    strategy, model = strategy_for(rounds, m)
    run_simulation(make_server_app(strategy, rounds), make_client_app(mlp_fn, make_opt, weighted_client_data,
                                                                      local_steps=TAU), num_supernodes=N_NODES)
    assert not strategy.errors
    losses = [batch_loss(*d) for d in data(N_NODES, seed=DATA_SEED)]
    kw = dict(rounds=rounds, clients_per_round=m, local_steps=TAU, seed=SEED)
    weighted = simulate(mlp_fn, make_opt, losses, n_examples=list(WEIGHTS), **kw)
    assert_same_as_simulate(strategy, model, weighted)
    assert strategy.server.checksum() != simulate(mlp_fn, make_opt, losses, **kw).coordinator.checksum()
    with pytest.raises(ValueError, match="Invalid n_examples"):
        simulate(mlp_fn, make_opt, losses, n_examples=[1, 2], **kw)


def test_a_late_reply_is_dropped_and_the_straggler_catches_up(in_process, tmp_path):
    rounds, m = 8, 3

    def delay(partition: int, message_type: str, n: int) -> float:
        if message_type != "train":
            return 0.0
        if partition == 1 and n == 1:
            return 2.5  # client 1's first task answers long after round 0 closed (at 1 s)
        return 0.2  # every other round takes a while, so the late reply arrives while a later round is open

    in_process.delay = delay
    strategy, _ = strategy_for(rounds, m, round_timeout=1.0, message_ttl=30.0)
    app = make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU, cache_dir=tmp_path)
    run_simulation(make_server_app(strategy, rounds), app, num_supernodes=N_NODES)
    hist = strategy.server.history
    assert hist[0].dropped == (1,) and hist[0].participants == (0, 2)
    assert strategy.server.late[0] == (0, 1) and strategy.server.rejections["late"] >= 1  # logged, never applied
    # never a second message to a node that owes a reply: client 1 is sampled again only after its late reply
    back = next(i for i, r in enumerate(hist) if i > 0 and 1 in r.sampled)
    assert back >= 2 and all(1 not in r.sampled for r in hist[1:back])
    assert 1 in hist[back].participants  # it caught up from the log entries its task carried
    assert strategy.server.position == rounds
    assert not strategy.errors
    assert strategy.replicas_identical() and sorted(strategy.client_checksums) == [0, 1, 2]
    assert list(tmp_path.glob("zo-*.pt"))  # the weights lived in the node-local cache, not in context.state


def test_a_client_that_lost_its_state_answers_a_gap_and_catches_up_from_a_snapshot(in_process):
    rounds, m = 6, 3

    def before(context: Context, partition: int, message_type: str, n: int) -> None:
        if partition == 0 and message_type == "train" and n == 4:  # node 0 restarts with nothing (disk lost)
            del context.state[zo_client_app.STATE_KEY]
            zo_client_app._PARTICIPANTS.clear()

    in_process.before = before
    strategy, _ = strategy_for(rounds, m, log_limit=2)  # snapshots every round; the log holds 2 rounds
    run_simulation(make_server_app(strategy, rounds), make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU),
                   num_supernodes=N_NODES)
    hist = strategy.server.history
    assert strategy.server.rejections["gap"] == 1  # it answered with its real position (0), no crash
    assert hist[3].participants == (0, 1, 2)  # the retry carried a snapshot + tail, and it computed in time
    assert hist[3].snapshot_bytes > 0 and strategy.server.log.start > 0
    assert not strategy.errors
    assert strategy.replicas_identical() and sorted(strategy.client_checksums) == [0, 1, 2]


@pytest.mark.parametrize("kw, match", [
    ({"min_nodes": 0}, "Invalid min_nodes"), ({"round_timeout": 0}, "Invalid round_timeout"),
    ({"round_timeout": 10, "message_ttl": 5}, "Invalid message_ttl"), ({"poll_interval": 0}, "Invalid poll_interval"),
    ({"handshake_timeout": -1}, "Invalid handshake_timeout"), ({"clients": 3}, "Invalid argument: clients"),
    ({"release_after": 3}, "Invalid argument: release_after"), ({"aggregation": "mode"}, "Invalid aggregation"),
])
def test_strategy_refuses_invalid_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        ZOStrategy(make_opt(mlp_fn()), clients_per_round=2, **kw)
    with pytest.raises(ValueError, match="Invalid local_steps"):
        make_client_app(mlp_fn, make_opt, client_data, local_steps=0)
    with pytest.raises(ValueError, match="Invalid num_rounds"):
        make_server_app(ZOStrategy(make_opt(mlp_fn()), clients_per_round=2), -1)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr.app", None)
    monkeypatch.delitem(sys.modules, "zo_optim.federated.flower", raising=False)
    with pytest.raises(ImportError, match=r'pip install "zo-optim\[flower\]"'):
        import zo_optim.federated.flower  # noqa: F401


def test_the_federated_extra_is_the_flower_extra():
    """``pip install "zo-optim[federated]"`` (the package's and the command's name) installed no Flower: pip only
    warned that the extra does not exist."""
    import tomllib

    extras = tomllib.loads((pathlib.Path(TESTS).parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["federated"] == ["zo-optim[flower]"] and any(d.startswith("flwr") for d in extras["flower"])


def test_random_64_bit_node_ids_as_client_ids_train(in_process):
    """Flower's node ids are random uint64: used as client ids (the fallback without a partition id) they must
    pass the handshake AND every reply (the reply header's client id was uint32 before protocol 3)."""
    rounds, m = 3, 3
    in_process.fresh_process = True  # the node id also keys the client's state in context.state
    strategy, _ = strategy_for(rounds, m)
    app = make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU, client_id=lambda context: context.node_id)
    run_simulation(make_server_app(strategy, rounds), app, num_supernodes=N_NODES)
    assert not strategy.errors and not strategy.refused
    ids = sorted(strategy.node_of)
    assert len(ids) == N_NODES and max(ids) >= 2**32  # P(all three < 2**32) = 2**-96
    assert all(len(r.participants) == m for r in strategy.server.history) and strategy.server.position == rounds
    check = strategy.replicas_identical()
    assert check and check.checked == tuple(ids)
