"""``zo-optim bench federated-scale``: the server at scale — 10,000 clients, 1% per round, 1,000 rounds.

What it measures is the coordinator's cost, so the sampled clients' replies are synthetic (τ·P scalars drawn
from N(0, 0.1²), encoded and decoded like real ones; a client's own compute is the same at any scale): per
round, the time of ``open_round`` (tasks for the m sampled clients, each carrying the entries that client
missed) + m ``receive`` + ``close_round`` (aggregate, apply under the state check, checksum, chain); the
payload bytes up and down; the server's memory (RSS growth after the first round and the log's own
bytes). Then the catch-up cost of a real :class:`~zo_optim.federated.FederatedWrapper` absent 10, 100
and 1,000 rounds, both ways: replaying the log entries (bytes of the task, seconds of the verified
catch-up) and loading a fresh snapshot (bytes, seconds).

The model: a 128 → 64 linear layer (8,256 weights), MeZO P = 5, τ = 1, backend "auto" (numba on CPU). Output
(``--out``): ``scale.csv`` (long format), ``table.txt``, ``env.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(128, 64)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(clients: int, fraction: float, rounds: int, absences: list[int]) -> dict[str, Any]:
    from zo_optim import MeZO, rng
    from zo_optim.federated import FederatedWrapper, Replica, Reply, Server, decode, encode, payload_bytes

    def make(m: torch.nn.Module) -> MeZO:
        return MeZO(m.parameters(), lr=1e-3, num_queries=5, backend="auto")

    m = max(1, round(fraction * clients))
    server = Server(make(_model()), clients=clients, clients_per_round=m, server_seed=1)
    gen = np.random.default_rng(0)
    rss0 = _rss_mib()  # re-read after round 0: the first round JIT-compiles the numba kernels (~120 MiB)
    times, ups, downs, entries_per_task = [], [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        tasks = server.open_round()
        for c, task in tasks.items():
            entries_per_task.append(len(task.entries))
            scalars = (gen.standard_normal(5) * 0.1).astype("<f4").tobytes()
            reply = Reply(round=r, client_id=c, status="ok", position=r, algorithm="mezo", rng_version=rng.RNG_VERSION,
                          n_examples=1, loss=1.0, scalars=scalars)
            server.receive(encode(reply))
        rec = server.close_round()
        times.append(time.perf_counter() - t0)
        if r == 0:
            rss0 = _rss_mib()
        ups.append(rec.bytes_up)
        downs.append(rec.bytes_down)
    kept = server.log.entries(server.log.start)
    log_bytes = sum(16 + len(e.scalars) + sum(len(b) for _, b in e.extras) for e in kept)
    out: dict[str, Any] = {
        "clients": clients, "per_round": m, "rounds": rounds,
        "round_ms_median": 1e3 * statistics.median(times),
        "round_ms_p95": 1e3 * sorted(times)[int(0.95 * len(times))],
        "round_ms_mean": 1e3 * statistics.fmean(times),
        "bytes_up_per_round": statistics.fmean(ups), "bytes_down_per_round": statistics.fmean(downs),
        "entries_per_task_mean": statistics.fmean(entries_per_task),
        "rss_growth_mib": _rss_mib() - rss0, "log_bytes": log_bytes,
        "snapshot_bytes": len(server.replica.snapshot().payload), "catch_up": [],
    }
    # catch-up of a client absent `a` rounds: a replica brought to position rounds - a by replaying, then the task
    for a in absences:
        if a > rounds:
            continue
        model = _model()
        w = FederatedWrapper(make(model), client_id=0, model=model)
        w.welcome(server.welcome_for(0, True, "ok", at=0))
        Replica.apply_all(w.replica, server.log.entries(0, rounds - a))
        w.chain_digest = server.chain.at(rounds - a)[0] if server.chain.at(rounds - a) else None
        task = decode(encode(server.task_for(0, compute=False, position=rounds - a)))
        t0 = time.perf_counter()
        w.catch_up(task)  # type: ignore[arg-type]
        replay_s = time.perf_counter() - t0
        assert w.checksum() == server.checksum()
        fresh_model = _model()
        f = FederatedWrapper(make(fresh_model), client_id=0, model=fresh_model)
        snap_task = decode(encode(server.task_for(0, compute=False, position=rounds - a, fresh_snapshot=True)))
        t0 = time.perf_counter()
        f.catch_up(snap_task)  # type: ignore[arg-type]
        snap_s = time.perf_counter() - t0
        assert f.checksum() == server.checksum()
        out["catch_up"].append({"absent": a, "replay_bytes": payload_bytes(task), "replay_s": replay_s,
                                "snapshot_bytes": payload_bytes(snap_task), "snapshot_s": snap_s})
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench federated-scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--absences", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--out", type=Path, default=Path("bench-federated-scale"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "federated-scale", *argv])
    torch.set_num_threads(1)
    random.seed(0)
    res = run(a.clients, a.fraction, a.rounds, a.absences)
    x = f"{a.clients}x{a.fraction:g}x{a.rounds}"
    rows = [report.Row("server", "scale", k, "ms" if k.startswith("round_ms") else "B" if "bytes" in k else
                       "MiB" if k.endswith("mib") else "count", x, float(v))
            for k, v in res.items() if k not in ("catch_up", "clients", "per_round", "rounds")]
    for c in res["catch_up"]:
        rows += [report.Row(f"catch_up/absent={c['absent']}", way, metric, unit, c["absent"], float(c[f"{way}_{k}"]))
                 for way in ("replay", "snapshot") for k, metric, unit in (("bytes", "payload", "B"),
                                                                           ("s", "seconds", "s"))]
    head = report.format_table(
        ["clients", "per round", "rounds", "round ms (median)", "round ms (p95)", "B up / round", "B down / round",
         "entries / task", "RSS growth MiB", "log B", "snapshot B"],
        [[res["clients"], res["per_round"], res["rounds"], res["round_ms_median"], res["round_ms_p95"],
          res["bytes_up_per_round"], res["bytes_down_per_round"], res["entries_per_task_mean"],
          res["rss_growth_mib"], res["log_bytes"], res["snapshot_bytes"]]], title="server at scale")
    tail = report.format_table(
        ["absent rounds", "replay B", "replay s", "snapshot B", "snapshot s"],
        [[c["absent"], c["replay_bytes"], c["replay_s"], c["snapshot_bytes"], c["snapshot_s"]]
         for c in res["catch_up"]],
        title="catch-up of one client (verified against the chain)")
    print(head + "\n\n" + tail)
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "scale.csv", rows, env)
    (a.out / "table.txt").write_text(head + "\n\n" + tail + "\n")
    report.write_environment(a.out / "env.json", env, **{k: str(v) for k, v in vars(a).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
