"""Progress a Flower user sees while the federation runs, and rounds that wait for a client instead of burning.

Flower's simulation runtime (``run_simulation``) with the in-process backend of ``flower_inprocess`` (ClientApp
calls in threads instead of Ray actors; LinkState, grid, contexts and message loop are Flower's).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

import zo_optim  # noqa: E402
from fed_problems import batch_loss, data, mlp_fn  # noqa: E402
from flower_inprocess import tampered_client_app, use_in_process_backend  # noqa: E402

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

from flwr.app import Context  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from zo_optim.federated.flower import ZOStrategy, make_client_app, make_server_app  # noqa: E402

N_NODES = 3
TAU = 2


def make_opt(model: torch.nn.Module) -> zo_optim.ZOAdam:
    return zo_optim.ZOAdam(model.parameters(), lr=1e-2, backend="reference")


def client_data(context: Context):
    return batch_loss(*data(N_NODES, seed=5)[int(context.node_config["partition-id"])])


@pytest.fixture
def in_process(monkeypatch):
    return use_in_process_backend(monkeypatch)


def strategy(**kw) -> ZOStrategy:
    kw.setdefault("round_timeout", 60.0)
    kw.setdefault("min_nodes", N_NODES)
    return ZOStrategy(make_opt(mlp_fn()), local_steps=TAU, server_seed=3, **kw)


def nan_replies_from(bad: int) -> ClientApp:
    """The real client app, except that client ``bad``'s round replies carry NaN scalars (refused by the server)."""
    def tamper(rec) -> None:
        rec["scalars"] = np.full(len(rec["scalars"]) // 4, np.nan, dtype="<f4").tobytes()

    return tampered_client_app(make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU), "train", bad, tamper)


def test_every_round_is_logged_through_flowers_console_without_configuring_logging(in_process, monkeypatch):
    import io

    from flwr.common import logger as flwr_logger

    # Flower's own console handler (the one `flwr run --stream` and the simulation's terminal show), its stream
    # swapped for a buffer: nothing in zo_optim or this test configures logging
    buf = io.StringIO()
    monkeypatch.setattr(flwr_logger.console_handler, "stream", buf)
    rounds = 3
    strat = strategy(clients_per_round=N_NODES)
    run_simulation(make_server_app(strat, rounds), nan_replies_from(bad=1), num_supernodes=N_NODES)
    text = buf.getvalue()
    lines = [ln for ln in text.splitlines() if re.search(r"round \d+: \d+/\d+ participants", ln)]
    assert len(lines) == rounds, text[-3000:]
    for r, (ln, rec) in enumerate(zip(lines, strat.server.history, strict=True)):
        # round, participants, refused with the reason, loss, payload and record bytes: the record's own numbers
        assert f"round {r}: 2/3 participants, dropped [1], refused 1 (client 1: nonfinite)" in ln
        assert f"loss {rec.loss:.5f}" in ln
        assert f"payload {rec.bytes_up} B up / {rec.bytes_down} B down" in ln
        assert f"records {strat.wire_up[r]} B up / {strat.wire_down[r]} B down" in ln
    # the end-of-run summary: rounds trained, and which replicas were checked (client 1 too: its weights follow the
    # server's aggregate, only its replies were refused)
    assert strat.rounds_trained == rounds
    assert re.search(r"3 round\(s\) run \(3 trained, 0 empty\).*replicas: 3 replica\(s\) checked: all identical", text)


def test_a_round_with_no_eligible_client_waits_instead_of_closing_empty(in_process):
    """Every client answers its first task after 1.5 s; rounds time out at 0.5 s. Round 0 closes with every reply
    late (empty). Without the wait, rounds 1..3 find every client still owing its round-0 reply (they are released
    only when the late reply arrives) and close instantly, empty: 0 rounds trained. With it, round 1 waits for the
    late replies (≈ 1 s), and rounds 1..3 train."""
    rounds = 4

    def delay(partition: int, message_type: str, n: int) -> float:
        return 1.5 if message_type == "train" and n == 1 else 0.0

    in_process.delay = delay
    strat = strategy(clients_per_round=N_NODES, round_timeout=0.5, message_ttl=30.0, idle_timeout=20.0)
    run_simulation(make_server_app(strat, rounds), make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU),
                   num_supernodes=N_NODES)
    hist = strat.server.history
    assert hist[0].participants == () and hist[0].dropped == (0, 1, 2)
    assert strat.server.rejections["late"] == N_NODES  # the round-0 replies arrived late: logged, never applied
    assert [len(r.participants) for r in hist[1:]] == [N_NODES] * (rounds - 1)
    assert strat.rounds_trained == rounds - 1
    assert strat.replicas_identical()


def test_the_wait_is_bounded(in_process):
    """idle_timeout bounds the wait: a client that answers nothing for 3 s is waited for 0.4 s per round, then the
    round runs empty (the old behaviour, now logged), and the run ends — it never hangs on an absent client."""
    rounds = 3

    def delay(partition: int, message_type: str, n: int) -> float:
        return 3.0 if message_type == "train" else 0.0

    in_process.delay = delay
    strat = strategy(clients_per_round=1, min_nodes=1, round_timeout=0.3, message_ttl=60.0, idle_timeout=0.4)
    run_simulation(make_server_app(strat, rounds), make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU),
                   num_supernodes=1)
    assert strat.rounds_trained == 0 and [r.participants for r in strat.server.history] == [()] * rounds
    assert [r.sampled for r in strat.server.history] == [(0,), (), ()]  # 0 owed its reply in rounds 1 and 2


def test_idle_timeout_is_validated():
    with pytest.raises(ValueError, match="Invalid idle_timeout"):
        strategy(clients_per_round=1, idle_timeout=-1)


def test_an_error_the_superlink_generates_keeps_its_reason(in_process):
    """A message that expires before its reply arrives is answered by the SuperLink (src node 1) with an error
    reply: the strategy records Flower's reason, not "reply from node 1", and releases the client."""
    def delay(partition: int, message_type: str, n: int) -> float:
        return 2.0 if message_type == "train" and n == 1 else 0.0

    in_process.delay = delay
    strat = strategy(clients_per_round=1, min_nodes=1, round_timeout=0.3, message_ttl=0.6, idle_timeout=5.0)
    run_simulation(make_server_app(strat, 3), make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU),
                   num_supernodes=1)
    reasons = [e[3] for e in strat.errors]
    assert reasons and all(not r.startswith("reply from node") for r in reasons), reasons
    assert any(r.startswith("SuperLink: ") and "code" in r for r in reasons), reasons
    assert strat.rounds_trained >= 1  # released by the error reply, the client trains the later rounds


def test_the_final_sync_waits_for_a_reply_still_in_flight(in_process):
    """Client 2's reply to the last round arrives 1.5 s after the round closed (0.5 s timeout): the final sync
    waits for it (late: not applied) and then brings client 2 to the server's position, so every replica is
    checked. Before, client 2 still owed that reply at the sync, was skipped, and ended unchecked."""
    rounds = 3

    def delay(partition: int, message_type: str, n: int) -> float:
        return 2.0 if partition == 2 and message_type == "train" and n == rounds else 0.0

    in_process.delay = delay
    strat = strategy(clients_per_round=N_NODES, round_timeout=0.5, message_ttl=30.0)
    run_simulation(make_server_app(strat, rounds), make_client_app(mlp_fn, make_opt, client_data, local_steps=TAU),
                   num_supernodes=N_NODES)
    assert strat.server.history[-1].dropped == (2,)  # the slow reply missed the last round
    check = strat.replicas_identical()
    assert check, check.describe()
    assert sorted(strat.client_checksums) == [0, 1, 2]
