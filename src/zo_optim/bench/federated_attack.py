"""``zo-optim bench federated-attack``: what one sign-flipping client does to the model, per aggregation.

The setting the issue asks to measure: M = 10 clients, all sampled every round, one of them malicious.
It computes its scalars honestly and replies ``factor`` times them (``-1``: a sign flip; ``-100``: a
flip scaled 100×, still finite and within ``max_abs_scalar``), every round — scalars every validation
layer accepts, because nothing about a single finite in-range scalar says it is a lie. The same
federation runs without the attacker (the honest run, same seeds, same data) for each aggregation rule;
the table gives the distance of the attacked model from the honest one, relative to how far the honest
run moved from the initial weights (``‖θ_attacked − θ_honest‖ / ‖θ_honest − θ_0‖``), and both runs'
final loss over all clients' data.

The problem: linear regression from one random teacher (16 → 16, 256 weights), client c's inputs scaled
by 1 + 0.1·c (mildly non-IID), MeZO with P = 5, τ = 1. Output (``--out``): ``attack.csv`` (long format,
:mod:`zo_optim.bench.report`), ``table.txt``, ``env.json``. Runs in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from . import report

AGGREGATIONS = ("mean", "median", "trimmed_mean")
DIM = 16


def _problem(clients: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, DIM, generator=g) / DIM**0.5
    out = []
    for c in range(clients):
        x = torch.randn(64, DIM, generator=g) * (1.0 + 0.1 * c)
        out.append((x, x @ teacher.T))
    return out


def _model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Linear(DIM, DIM, bias=False)


def run(aggregation: str, factor: float | None, *, clients: int, rounds: int, lr: float, seed: int = 0
        ) -> dict[str, Any]:
    """One federation; ``factor`` None: every client honest, else client 0 replies ``factor`` × its scalars."""
    from zo_optim import MeZO
    from zo_optim.federated import FederatedWrapper, Server, decode, encode, pack_scalars, unpack_scalars

    data = _problem(clients)

    def make(m: torch.nn.Module) -> MeZO:
        return MeZO(m.parameters(), lr=lr, num_queries=5, backend="reference")

    server_model = _model()
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in server_model.parameters()])
    server = Server(make(server_model), clients=clients, clients_per_round=clients, server_seed=seed,
                    aggregation=aggregation)
    models = [_model() for _ in range(clients)]
    wrappers = [FederatedWrapper(make(m), client_id=c, model=m) for c, m in enumerate(models)]
    for w in wrappers:
        w.welcome(server.handshake(w.hello()))
    refused = 0
    for _ in range(rounds):
        tasks = server.open_round()
        for c, task in tasks.items():
            x, y = data[c]
            m = models[c]

            def loss(step: int, m: torch.nn.Module = m, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                i = (step % 8) * 8
                return ((m(x[i: i + 8]) - y[i: i + 8]) ** 2).mean()

            reply = wrappers[c].handle(decode(encode(task)), loss)  # type: ignore[arg-type]
            if c == 0 and factor is not None:
                flipped = pack_scalars(unpack_scalars(reply.scalars) * factor)
                reply = type(reply)(**{**reply.__dict__, "scalars": flipped})
            refused += not server.receive(encode(reply)).accepted
        server.close_round()
    theta = torch.cat([p.detach().reshape(-1) for p in server_model.parameters()])
    with torch.no_grad():
        final = float(sum(((server_model(x) - y) ** 2).mean() for x, y in data) / len(data))
    return {"theta": theta, "theta0": theta0, "loss": final, "refused": refused}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench federated-attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--factors", type=float, nargs="+", default=[-1.0, -100.0])
    p.add_argument("--out", type=Path, default=Path("bench-federated-attack"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "federated-attack", *argv])
    torch.set_num_threads(1)
    rows: list[report.Row] = []
    table = []
    for agg in AGGREGATIONS:
        honest = run(agg, None, clients=a.clients, rounds=a.rounds, lr=a.lr)
        moved = float((honest["theta"] - honest["theta0"]).norm())
        for factor in a.factors:
            bad = run(agg, factor, clients=a.clients, rounds=a.rounds, lr=a.lr)
            dist = float((bad["theta"] - honest["theta"]).norm()) / moved
            label = f"{agg}/factor={factor:g}"
            rows += [report.Row(label, agg, "relative_distance_from_honest", "fraction", factor, dist),
                     report.Row(label, agg, "final_loss", "mse", factor, bad["loss"]),
                     report.Row(label, agg, "honest_final_loss", "mse", factor, honest["loss"]),
                     report.Row(label, agg, "refused_replies", "count", factor, bad["refused"])]
            table.append([agg, factor, dist, honest["loss"], bad["loss"], bad["refused"]])
            print(f"{label}: distance {dist:.4g} of the honest run's movement; loss honest {honest['loss']:.4g}, "
                  f"attacked {bad['loss']:.4g}", flush=True)
    text = report.format_table(
        ["aggregation", "attacker factor", "‖θ−θ_honest‖/‖θ_honest−θ0‖", "honest loss", "attacked loss", "refused"],
        table, title=f"1 of {a.clients} clients replies factor × its scalars every round, {a.rounds} rounds "
                     f"(initial loss {run('mean', None, clients=a.clients, rounds=0, lr=a.lr)['loss']:.4g})")
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "attack.csv", rows, env)
    (a.out / "table.txt").write_text(text + "\n")
    report.write_environment(a.out / "env.json", env, **{k: str(v) for k, v in vars(a).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
