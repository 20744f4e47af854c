"""ClientApp: each SuperNode trains the shared head on its non-IID share of the tweets (only scalars travel)."""

from __future__ import annotations

from flwr.app import Context

from zo_optim.federated.flower import make_client_app

from . import task


def _data(context: Context):
    cfg = task.settings(context.run_config)
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    x, y = task.partition(cfg, pid, n)
    return task.batch_loss(x, y, int(cfg["batch-size"])), len(y)  # weighted by its number of tweets


app = make_client_app(
    lambda context: task.head_model(int(task.settings(context.run_config)["seed"])),
    lambda model, context: task.optimizer(model, task.settings(context.run_config)),
    _data,
    local_steps=lambda context: int(task.settings(context.run_config)["local-steps"]),
)
