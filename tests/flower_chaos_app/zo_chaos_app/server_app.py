"""ServerApp: a ZOStrategy that checkpoints every round and, with run config resume=true, continues from it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from zo_optim.federated.flower import ZOStrategy

from .task import make_opt, model_fn

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    work = Path(str(cfg["work-dir"]))
    ckpt = work / "server"
    # the strategy logs every round through Flower's logger; keep a copy where the test can show it on failure
    handler = logging.FileHandler(work / f"serverapp.{os.getpid()}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("flwr").addHandler(handler)
    strategy = ZOStrategy(make_opt(model_fn()), clients_per_round=int(cfg["clients-per-round"]),
                          server_seed=int(cfg["seed"]), min_nodes=int(cfg["min-nodes"]),
                          round_timeout=float(cfg["round-timeout"]), handshake_timeout=120.0, poll_interval=0.1,
                          checkpoint_dir=ckpt, resume=ckpt if cfg["resume"] else None)

    def progress(rnd: int, arrays) -> None:  # called after every round: the test waits on it to inject faults
        hist = strategy.server.history  # empty at the first call (rnd 0: before any round)
        who = ",".join(str(c) for c in (hist[-1].participants if hist else ())) or "-"
        with open(work / "rounds.txt", "a") as f:
            f.write(f"{rnd} {os.getpid()} {who}\n")

    strategy.start(grid, num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=progress)
    check = strategy.replicas_identical()
    s = strategy.server
    result = {
        "checksum": s.checksum(), "client_checksums": {str(c): v for c, v in strategy.client_checksums.items()},
        "identical": bool(check), "describe": check.describe(), "rebound": strategy.rebound,
        "refused": {str(n): r for n, r in strategy.refused.items()},
        "history": [[r.round, list(r.sampled), list(r.participants), list(r.dropped)] for r in s.history],
        "rounds_trained": strategy.rounds_trained, "errors": [list(map(str, e)) for e in strategy.errors],
    }
    tmp = work / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(work / "result.json")
