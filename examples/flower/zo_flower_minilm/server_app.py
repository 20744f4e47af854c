"""ServerApp: a ZOStrategy over HiSo on the head; the server replica is evaluated on held-out tweets each round."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from zo_optim.federated.flower import ZOStrategy, flower_environment

from . import task

flower_environment()
log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # the strategy is built here, not at import: it depends on the run config (flwr run --run-config ...)
    cfg = task.settings(context.run_config)
    model = task.head_model(int(cfg["seed"]))
    strategy = ZOStrategy(task.optimizer(model, cfg), clients_per_round=int(cfg["clients-per-round"]),
                          local_steps=int(cfg["local-steps"]), server_seed=int(cfg["seed"]),
                          min_nodes=int(cfg["min-nodes"]), round_timeout=float(cfg["round-timeout"]),
                          handshake_timeout=max(600.0, float(cfg["round-timeout"])), log_limit=100)
    x_eval, y_eval = task.held_out(cfg)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # the server replica is the model itself (arrays is its copy): evaluated locally, never sent
        acc, loss = task.evaluate(model, x_eval, y_eval)
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(grid, num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=evaluate_fn)
    first, last = result.evaluate_metrics_serverapp[0], result.evaluate_metrics_serverapp[max(
        result.evaluate_metrics_serverapp)]
    up = sum(r.bytes_up for r in strategy.server.history)
    down = sum(r.bytes_down for r in strategy.server.history)
    replicas = strategy.replicas_identical()  # a ReplicaCheck: true only if every client was checked and identical
    print(f"held-out accuracy: {first['accuracy']:.3f} -> {last['accuracy']:.3f}, loss {first['loss']:.4f} -> "
          f"{last['loss']:.4f}; {len(strategy.server.history)} rounds, payload {up} B up / {down} B down; "
          f"replicas identical: {bool(replicas)} ({replicas.describe()}); refused: {strategy.refused or 'none'}",
          flush=True)
    context.state["zo_result"] = MetricRecord({"accuracy": float(last["accuracy"]), "loss": float(last["loss"]),
                                               "identical": int(bool(replicas))})
