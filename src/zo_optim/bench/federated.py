"""``zo-optim bench federated``: HiSo vs DeComFL on a non-IID federated fine-tune, rounds and bytes.

The task is the one ``zo-optim federated`` runs (:mod:`zo_optim.apps.tweets`): the packaged
MiniLM's 2-class head on the packaged tweets, encoded once, split among M clients with
Dirichlet(α) class proportions; m clients per round, τ local steps, P directions per step.

* **HiSo**: :class:`zo_optim.HiSo` through :class:`~zo_optim.federated.FederatedWrapper`
  (K rebuilt by every replica from the aggregated scalars, frozen within a round).
* **DeComFL**: the same wrapper and optimizer with K ≡ 1 (``freeze_precond = True``), i.e.
  MeZO-style forward differences with P directions — the same scalar-only cost per round.

Each method runs every lr of ``--lrs`` for every seed; the best lr per method is the one with
the highest mean final held-out accuracy. The target is DeComFL's mean final accuracy at its best
lr; the table gives, mean ± std over seeds, the rounds each method needs to first reach it
(held-out accuracy evaluated every ``--eval-every`` rounds), its final accuracy, and payload bytes
per client to the target. FedAvg's bytes (float32 weights, each way) are printed for context.

Output (``--out``): ``federated.csv`` (long format, :mod:`zo_optim.bench.report`), ``federated.png``
(mean accuracy ± std vs round, best lr per method), ``env.json``. The default size runs in
seconds (CI); ``--full`` is the recorded run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import report

METHODS = ("hiso", "decomfl")
FULL = {"rounds": 600, "seeds": 3, "lrs": [3e-3, 1e-2, 3e-2, 1e-1], "eval_every": 10}


def run_one(task: Any, method: str, lr: float, *, rounds: int, clients_per_round: int, local_steps: int,
            num_queries: int, zo_eps: float, seed: int, eval_every: int) -> dict[str, Any]:
    """One federated run; its accuracy curve [(round, accuracy)], bytes and whether replicas agree."""
    import zo_optim
    from zo_optim.federated import simulate

    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (choose one of {', '.join(METHODS)})")

    def make(model: torch.nn.Module) -> zo_optim.HiSo:
        opt = zo_optim.HiSo(model.parameters(), lr=lr, zo_eps=zo_eps, num_queries=num_queries, seed=seed)
        opt.freeze_precond = method == "decomfl"  # K ≡ 1: DeComFL's MeZO forward differences
        return opt

    curve = [(0, task.evaluate(task.model_fn())[0])]

    def on_round(rec: Any, server_model: torch.nn.Module) -> None:
        if (rec.round + 1) % eval_every == 0 or rec.round + 1 == rounds:
            curve.append((rec.round + 1, task.evaluate(server_model)[0]))

    t0 = time.perf_counter()
    res = simulate(task.model_fn, make, [task.client_loss(c) for c in range(task.num_clients)], rounds=rounds,
                   clients_per_round=clients_per_round, local_steps=local_steps, seed=seed, on_round=on_round)
    wall = time.perf_counter() - t0
    replies = sum(len(r.participants) for r in res.history)
    opt = res.coordinator.optimizer
    k = torch.cat([opt.state[p]["hessian"].flatten() for p in res.server.parameters() if "hessian" in opt.state[p]])
    return {"curve": curve, "k_min": float(k.min()), "k_max": float(k.max()), "wall_s": wall,
            "identical": res.replicas_identical(),
            "bytes_up_per_reply": sum(r.bytes_up for r in res.history) / max(replies, 1),
            "bytes_down_per_task": sum(r.bytes_down for r in res.history) / max(replies, 1),
            "n_params": sum(p.numel() for p in res.server.parameters())}


def rounds_to(curve: list[tuple[int, float]], target: float) -> float:
    """First evaluated round with accuracy ≥ ``target`` (NaN if never)."""
    return next((float(r) for r, acc in curve if acc >= target), math.nan)


def _final(curve: list[tuple[int, float]]) -> float:
    """Final accuracy: the mean of the last three evaluations (one evaluation is noisy at ±1/n_eval)."""
    tail = [acc for _, acc in curve[-3:]]
    return sum(tail) / len(tail)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench federated", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2])
    p.add_argument("--clients", type=int, default=8, help="M")
    p.add_argument("--clients-per-round", type=int, default=4, help="m")
    p.add_argument("--local-steps", type=int, default=1, help="τ")
    p.add_argument("--num-queries", type=int, default=5, help="P")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--zo-eps", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-examples", type=int, default=400)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--full", action="store_true",
                   help=f"the recorded size: {FULL['rounds']} rounds, {FULL['seeds']} seeds, lrs {FULL['lrs']}, "
                        "2000 train / 1000 held-out tweets")
    p.add_argument("--out", type=Path, default=Path("bench-federated"))
    return p


def main(argv: list[str] | None = None) -> int:
    from zo_optim.apps import assets
    from zo_optim.apps.common import serial_numba
    from zo_optim.apps.tweets import encode_tweets

    a = _parser().parse_args(argv)
    if a.full:
        a.rounds, a.seeds, a.lrs, a.eval_every = FULL["rounds"], FULL["seeds"], FULL["lrs"], FULL["eval_every"]
        a.train_examples, a.eval_examples = 2000, 1000
    assets.set_offline()
    serial_numba()
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "federated", *argv])
    base = encode_tweets(clients=a.clients, alpha=a.alpha, train_examples=a.train_examples,
                         eval_examples=a.eval_examples, batch_size=a.batch_size, seed=0)
    torch.set_num_threads(1)  # tiny matmuls: a second thread costs more than it gives (see zo-optim federated)
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    rows: list[report.Row] = []
    for method in METHODS:
        for lr in a.lrs:
            for seed in range(a.seeds):
                task = base.resplit(clients=a.clients, alpha=a.alpha, seed=seed)
                r = run_one(task, method, lr, rounds=a.rounds, clients_per_round=a.clients_per_round,
                            local_steps=a.local_steps, num_queries=a.num_queries, zo_eps=a.zo_eps, seed=seed,
                            eval_every=a.eval_every)
                if not r["identical"]:
                    raise RuntimeError(f"{method} lr={lr:g} seed {seed}: a client replica differs from the server")
                runs.setdefault((method, lr), []).append(r)
                label = f"{method}/lr={lr:g}/seed={seed}"
                rows += [report.Row(label, method, "held_out_accuracy", "fraction", n, acc) for n, acc in r["curve"]]
                print(f"{label}: final accuracy {_final(r['curve']):.3f} ({r['wall_s']:.1f} s)", flush=True)
    best = {m: max(a.lrs, key=lambda lr, m=m: report.mean_std([_final(r["curve"]) for r in runs[(m, lr)]])[0])
            for m in METHODS}
    target = report.mean_std([_final(r["curve"]) for r in runs[("decomfl", best["decomfl"])]])[0]
    table, stats = [], {}
    for m in METHODS:
        rs = runs[(m, best[m])]
        to_target = [rounds_to(r["curve"], target) for r in rs]
        reached = sum(math.isfinite(x) for x in to_target)
        rt, final = report.mean_std(to_target), report.mean_std([_final(r["curve"]) for r in rs])
        up = rs[0]["bytes_up_per_reply"]
        stats[m] = rt[0]
        table.append([m, best[m], f"{final[0]:.3f} ± {final[1]:.3f}", f"{rt[0]:.0f} ± {rt[1]:.0f}",
                      f"{reached}/{len(rs)}", up, rt[0] * up * a.clients_per_round / a.clients])
        for metric, unit, value in (("final_accuracy", "fraction", final[0]), ("rounds_to_target", "rounds", rt[0]),
                                    ("bytes_up_per_reply", "B", up), ("best_lr", "lr", best[m])):
            rows.append(report.Row(m, m, metric, unit, "best", value))
    n_params = runs[(METHODS[0], a.lrs[0])][0]["n_params"]
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "federated.csv", rows, env)
    report.write_environment(a.out / "env.json", env, **{k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(a).items()})
    headers = ["method", "best lr", "final accuracy", "rounds to target", "reached", "B up / reply",
               "B up / client to target"]
    print(report.format_table(headers, table, digits=3, title=(
        f"bench federated: M={a.clients}, m={a.clients_per_round}, τ={a.local_steps}, P={a.num_queries}, "
        f"α={a.alpha}, {a.rounds} rounds, {a.seeds} seeds; target = DeComFL's final accuracy {target:.3f}")))
    ratio = stats["decomfl"] / stats["hiso"] if stats["hiso"] > 0 else math.nan
    print(f"DeComFL rounds / HiSo rounds to the target: {ratio:.2f}x")
    print(f"FedAvg for context: {4 * n_params:,} B of float32 weights per client per round each way "
          f"({n_params:,} parameters)")
    series, bands = {}, {}
    for m in METHODS:
        rs = runs[(m, best[m])]
        xs = [n for n, _ in rs[0]["curve"]]
        per = [[r["curve"][i][1] for r in rs] for i in range(len(xs))]
        ms = [report.mean_std(v) for v in per]
        label = f"{m} (lr={best[m]:g})"
        series[label] = (xs, [x for x, _ in ms])
        bands[label] = ([x - s for x, s in ms], [x + s for x, s in ms])
    try:
        report.plot_lines(a.out / "federated.png", series, bands=bands, xlabel="round", ylabel="held-out accuracy",
                          title=f"HiSo vs DeComFL, scalar-only rounds (mean ± std over {a.seeds} seeds)")
    except ImportError:
        print("(matplotlib not installed: no PNG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
