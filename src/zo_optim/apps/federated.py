"""``zo-optim federated``: a federated fine-tune of the packaged MiniLM's head that exchanges only scalars.

    zo-optim federated                       # HiSo, 8 clients (Dirichlet α = 0.5), 4 per round, P = 5
    zo-optim federated --optimizer mezo --rounds 200 --clients 16 --clients-per-round 2

The tweets are encoded once (the frozen encoder is the same for every participant); the
federated model is the 2-class head. Every round the server samples m clients, each runs τ
local ZO steps on its own non-IID share and sends back τ·P float32 scalars; the server
aggregates them and every replica applies the same round. The run prints held-out accuracy,
rounds, payload bytes per client and ``checksum: <sha256 of the final server weights>`` —
the same for every engine given the same settings — and writes ``curve.png``, ``rounds.csv``
and ``summary.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..optim.registry import OPTIMIZERS, optimizer_class, recommended_lr
from .common import positive_float, positive_int, serial_numba

ENGINES = ("simulate", "flower", "distributed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim federated", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, default="simulate",
                   help="what moves the messages: in process, Flower's simulation runtime (one SuperNode per "
                        "client, Ray actors; needs zo-optim[flower]), or torch.distributed (launched by torchrun, "
                        "rank 0 serves, one rank per client)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="hiso", help="the ZO optimizer of every replica")
    p.add_argument("--rounds", type=positive_int, default=300, help="communication rounds")
    p.add_argument("--clients", type=positive_int, default=8, help="M, clients holding a share of the tweets")
    p.add_argument("--clients-per-round", type=positive_int, default=4, help="m, clients sampled per round")
    p.add_argument("--local-steps", type=positive_int, default=1, help="τ, local ZO steps per round")
    p.add_argument("--num-queries", type=positive_int, default=5, help="P, directions per step (scalars per step)")
    p.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--aggregation", choices=("mean", "median", "trimmed_mean"), default="mean")
    p.add_argument("--dropout", type=float, default=0.0, help="probability that a sampled client never answers")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: per optimizer)")
    p.add_argument("--zo-eps", type=positive_float, default=1e-3, help="perturbation scale ε")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per client per local step")
    p.add_argument("--train-examples", type=positive_int, default=2000, help="training pool shared out to clients")
    p.add_argument("--eval-examples", type=positive_int, default=1000, help="held-out tweets (server-side)")
    p.add_argument("--max-len", type=positive_int, default=64, help="tokens per tweet")
    p.add_argument("--seed", type=int, default=0, help="server seed: split, head init, sampling, perturbations")
    p.add_argument("--out", type=Path, default=Path("zo-optim-federated"), help="directory for the plot, CSV, summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="write the server's checkpoint here after every --checkpoint-every rounds (atomic), with "
                        "the run's settings (args.json), so that --resume can continue it; with --engine flower "
                        "each SuperNode's client state too, in DIR/clients")
    p.add_argument("--checkpoint-every", type=positive_int, default=1, help="rounds between checkpoints")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR with its saved settings (and keep checkpointing "
                        "there); ends bit-identical to the run that was never interrupted")
    return p


# settings that may differ between a run and its resumption (where output goes, how it is shown)
_NOT_RESUMED = ("out", "no_progress", "resume", "checkpoint_dir")


def _resume_settings(args: argparse.Namespace) -> None:
    """--resume DIR: the checkpointed run's settings, saved in DIR/args.json when it started."""
    path = args.resume / "args.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Invalid --resume: {args.resume} holds no readable args.json ({exc}); point it at a "
                         "--checkpoint-dir of an earlier run") from exc
    for key, value in saved.items():
        if key not in _NOT_RESUMED and hasattr(args, key):
            setattr(args, key, value)
    args.checkpoint_dir = args.resume


def _check(args: argparse.Namespace) -> None:
    if args.clients_per_round > args.clients:
        raise ValueError(f"Invalid --clients-per-round: {args.clients_per_round} (more than --clients {args.clients})")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"Invalid --dropout: {args.dropout} (in [0, 1))")
    if args.engine == "flower" and args.dropout:
        raise ValueError("Invalid --dropout with --engine flower: dropout is simulated by the in-process engine only")
    if args.train_examples < args.clients * args.batch_size:
        raise ValueError(f"Invalid --train-examples: {args.train_examples} (fewer than --clients {args.clients} x "
                         f"--batch-size {args.batch_size}; the split needs more examples per client)")


def optimizer_factory(name: str, lr: float, zo_eps: float, num_queries: int, seed: int) -> Any:
    """``optimizer_fn(model)`` for every replica: the same class and settings everywhere."""
    cls = optimizer_class(name)

    def make(model: torch.nn.Module) -> Any:
        # "auto": numba's cpu kernels on CPU, 34 ms per round here against 223 ms for the reference
        # backend (8 clients, 4 per round, P = 5; the reference draws its Gaussians in plain torch)
        return cls(model.parameters(), lr=lr, zo_eps=zo_eps, num_queries=num_queries, seed=seed, backend="auto")

    return make


# --engine flower: Ray actors rebuild each client from these (module-level, so picklable by reference)
_TASK_ENV, _OPT_ENV = "ZO_OPTIM_FEDERATED_TASK", "ZO_OPTIM_FEDERATED_OPTIMIZER"
_TASKS: dict[str, Any] = {}


def _flower_task() -> Any:
    from .tweets import load_task

    path = os.environ[_TASK_ENV]
    if path not in _TASKS:
        _TASKS[path] = load_task(path)
    return _TASKS[path]


def _flower_model() -> torch.nn.Module:
    return _flower_task().model_fn()


def _flower_optimizer(model: torch.nn.Module) -> Any:
    return optimizer_factory(**json.loads(os.environ[_OPT_ENV]))(model)


def _flower_data(context: Any) -> Any:
    return _flower_task().client_loss(int(context.node_config["partition-id"]))


@dataclass
class _FlowerResult:
    """What the report needs from a Flower run (the fields :class:`~zo_optim.federated.SimulationResult` has)."""

    server: torch.nn.Module
    history: list[Any]
    bytes_up: int
    bytes_down: int
    check: Any  # the strategy's ReplicaCheck

    def replicas_identical(self) -> Any:
        return self.check


def _run_flower(args: argparse.Namespace, task: Any, lr: float, on_round: Any) -> _FlowerResult:
    """The same rounds on Flower's simulation runtime: one SuperNode per client, our ZOStrategy on the ServerApp."""
    try:
        import ray
        from flwr.simulation import run_simulation

        from ..federated.flower import ZOStrategy, flower_environment, make_client_app, make_server_app
    except ImportError as exc:
        hint = 'pip install "zo-optim[flower]"'
        raise ImportError(f"--engine flower needs Flower's simulation runtime: {hint} ({exc})") from exc
    flower_environment()
    args.out.mkdir(parents=True, exist_ok=True)
    task_path = args.out / "task.pt"
    task.save(task_path)  # the SuperNodes' processes load the encoded tweets instead of re-encoding them
    os.environ[_TASK_ENV] = str(task_path.resolve())
    os.environ[_OPT_ENV] = json.dumps({"name": args.optimizer, "lr": lr, "zo_eps": args.zo_eps,
                                       "num_queries": args.num_queries, "seed": args.seed})
    model = task.model_fn()
    # --checkpoint-dir: the ServerApp's checkpoint there, and each SuperNode's client state in DIR/clients (keyed by
    # client id, so the nodes of a resumed Flower run rejoin where they stopped: ZOStrategy(resume=) docs)
    state_dir = None if args.checkpoint_dir is None else args.checkpoint_dir / "clients"
    if state_dir is not None and args.resume is None:
        for stale in state_dir.glob("client-*.ckpt"):  # a new federation in an old directory: its clients start at 0
            stale.unlink()
    strategy = ZOStrategy(_flower_optimizer(model), clients_per_round=args.clients_per_round,
                          local_steps=args.local_steps, server_seed=args.seed, min_nodes=args.clients,
                          aggregation=args.aggregation, checkpoint_dir=args.checkpoint_dir,
                          checkpoint_every=args.checkpoint_every, resume=args.resume)
    started = strategy.server.position  # > 0 on --resume: those rounds were reported by the run that closed them

    def evaluate_fn(server_round: int, arrays: Any) -> None:
        if server_round > started:
            on_round(strategy.server.history[-1], model)

    # one CPU for Ray: one actor runs the clients' messages in turn (the test measured 17 s vs 26 s with 2)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 1, "include_dashboard": False}}
    try:
        run_simulation(make_server_app(strategy, args.rounds, evaluate_fn=evaluate_fn),
                       make_client_app(_flower_model, _flower_optimizer, _flower_data, local_steps=args.local_steps,
                                       state_dir=state_dir),
                       num_supernodes=args.clients, backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if strategy.errors or strategy.refused:
        raise RuntimeError(f"the Flower run reported errors {strategy.errors[:3]} / refused nodes {strategy.refused}")
    history = strategy.server.history
    return _FlowerResult(model, history, sum(r.bytes_up for r in history), sum(r.bytes_down for r in history),
                         strategy.replicas_identical())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..federated import simulate
    from . import assets
    from .tweets import encode_tweets, weights_checksum

    if args.resume is not None:
        _resume_settings(args)
    _check(args)
    # the default lr per optimizer for this head task (P = 5, τ = 1, 4 of 8 clients per round): the class's
    # "federated/head" (`zo-optim bench federated` sweeps {1e-3, 3e-3, 1e-2, 3e-2}; see docs/federated.md)
    lr = args.lr if args.lr is not None else recommended_lr(args.optimizer, "federated/head")
    if args.engine == "distributed":  # under torchrun: ranks > 0 are clients and return here
        from . import federated_distributed

        if federated_distributed.init_group(args) != 0:
            assets.set_offline()
            torch.set_num_threads(1)
            federated_distributed.run_client(args, optimizer_factory(args.optimizer, lr, args.zo_eps,
                                                                     args.num_queries, args.seed))
            return {}
    if args.checkpoint_dir is not None and args.resume is None:
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (args.checkpoint_dir / "args.json").write_text(json.dumps(
            {k: v for k, v in vars(args).items() if k not in _NOT_RESUMED}, indent=2))
    assets.set_offline()
    serial_numba()  # numba's spinning threads would take the cores from torch between forwards (docs/demo.md)
    progress = not args.no_progress
    t_start = time.perf_counter()
    task = encode_tweets(clients=args.clients, alpha=args.alpha, train_examples=args.train_examples,
                         eval_examples=args.eval_examples, max_len=args.max_len, batch_size=args.batch_size,
                         seed=args.seed, progress=progress)
    encode_s = time.perf_counter() - t_start
    sizes = [len(p) for p in task.parts]
    print(f"{args.clients} clients, Dirichlet α={args.alpha}: {min(sizes)}–{max(sizes)} tweets each; "
          f"{args.clients_per_round} per round, τ={args.local_steps}, P={args.num_queries}")
    acc_before, loss_before = task.evaluate(task.model_fn())
    print(f"held-out accuracy before: {acc_before:.1%} ({len(task.eval_y)} tweets, loss {loss_before:.3f})")

    every = max(1, args.rounds // 20)
    curve: list[tuple[int, float, float]] = []
    name = OPTIMIZERS[args.optimizer].__name__
    bar = tqdm(total=args.rounds, desc=f"{name} federated", unit="round", disable=not progress)

    def on_round(rec: Any, server_model: torch.nn.Module) -> None:
        bar.update(1)
        if (rec.round + 1) % every == 0 or rec.round + 1 == args.rounds:
            acc, loss = task.evaluate(server_model)
            curve.append((rec.round + 1, acc, loss))
            bar.set_postfix(acc=f"{acc:.1%}")

    # One torch thread for the rounds: a 32x384 matmul is far below the size where a second thread pays
    # for its wake-up, and numba's / torch's spinning pools would fight over the cores between forwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        if args.engine == "flower":
            result = _run_flower(args, task, lr, on_round)
        elif args.engine == "distributed":
            from .federated_distributed import run_server

            result = run_server(args, task, optimizer_factory(args.optimizer, lr, args.zo_eps, args.num_queries,
                                                              args.seed), on_round)
        else:
            optimizer_fn = optimizer_factory(args.optimizer, lr, args.zo_eps, args.num_queries, args.seed)
            result = simulate(task.model_fn, optimizer_fn, [task.client_loss(c) for c in range(args.clients)],
                              rounds=args.rounds, clients_per_round=args.clients_per_round,
                              local_steps=args.local_steps, seed=args.seed, dropout=args.dropout,
                              aggregation=args.aggregation, on_round=on_round,
                              checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                              resume=args.resume)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    train_s = time.perf_counter() - t0
    check = result.replicas_identical()
    # what was compared and what could not be, both printed: an "identical" that skipped a client says so
    print(f"replicas: {check.describe()}")
    if not check.identical:
        raise RuntimeError("a client replica differs from the server after the final catch-up; please report this")
    acc_after, loss_after = task.evaluate(result.server)
    checksum = weights_checksum(result.server)
    summary = _summary(args, lr, result, task, acc_before, loss_before, acc_after, loss_after, curve, checksum,
                       encode_s, train_s, time.perf_counter() - t_start)
    summary["replicas"] = {"checked": list(check.checked), "differing": list(check.differing),
                           "unchecked": [[str(c), why] for c, why in check.unchecked]}
    _write(args.out, result.history, curve, summary)
    _report(summary)
    return summary


def _summary(args: argparse.Namespace, lr: float, result: Any, task: Any, acc_before: float, loss_before: float,
             acc_after: float, loss_after: float, curve: list[tuple[int, float, float]], checksum: str,
             encode_s: float, train_s: float, total_s: float) -> dict[str, Any]:
    participations = sum(len(r.participants) for r in result.history)
    up_round = sum(r.bytes_up for r in result.history)
    n_params = sum(p.numel() for p in result.server.parameters())
    return {
        "engine": args.engine, "optimizer": OPTIMIZERS[args.optimizer].__name__, "lr": lr, "zo_eps": args.zo_eps,
        "rounds": args.rounds, "clients": args.clients, "clients_per_round": args.clients_per_round,
        "local_steps": args.local_steps, "num_queries": args.num_queries, "alpha": args.alpha,
        "aggregation": args.aggregation, "dropout": args.dropout, "batch_size": args.batch_size, "seed": args.seed,
        "client_examples": [len(p) for p in task.parts], "eval_examples": len(task.eval_y),
        "trainable_params": n_params,
        "accuracy_before": acc_before, "loss_before": loss_before, "accuracy_after": acc_after,
        "loss_after": loss_after, "curve": [{"round": r, "accuracy": a, "loss": lo} for r, a, lo in curve],
        "bytes_up_total": result.bytes_up, "bytes_down_total": result.bytes_down,
        "bytes_up_per_client": result.bytes_up / args.clients,
        "bytes_down_per_client": result.bytes_down / args.clients,
        "bytes_up_per_reply": up_round / participations if participations else math.nan,
        "participations": participations,
        "fedavg_bytes_per_client_round": 4 * n_params,  # float32 weights each way (context, not sent here)
        "checksum": checksum, "encode_s": encode_s, "train_s": train_s, "total_s": total_s,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }


def _write(out: Path, history: list[Any], curve: list[tuple[int, float, float]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    acc_at = {r: a for r, a, _ in curve}
    with (out / "rounds.csv").open("w") as f:
        f.write("round,participants,dropped,loss,bytes_up,bytes_down,eval_accuracy\n")
        for r in history:
            acc = acc_at.get(r.round + 1)
            f.write(f"{r.round + 1},{len(r.participants)},{len(r.dropped)},{r.loss:.6g},{r.bytes_up},{r.bytes_down},"
                    f"{'' if acc is None else f'{acc:.6g}'}\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = [r.loss for r in history]
    ax1.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="participants' loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= window:
        mean = torch.tensor(losses).nan_to_num(nan=0.0).unfold(0, window, 1).mean(1).tolist()
        ax1.plot(range(window, len(losses) + 1), mean, lw=1.5, label=f"moving mean ({window})")
    ax1.set_xlabel("round")
    ax1.set_ylabel("training loss")
    ax1.legend()
    ax2.plot([0] + [r for r, _, _ in curve], [summary["accuracy_before"]] + [a for _, a, _ in curve], marker="o", ms=3)
    ax2.set_xlabel("round")
    ax2.set_ylabel("held-out accuracy")
    fig.suptitle(f"{summary['optimizer']} federated: {summary['clients']} clients, {summary['clients_per_round']} "
                 f"per round, τ={summary['local_steps']}, P={summary['num_queries']}")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    summary["files"] = {"curve": str(out / "curve.png"), "rounds": str(out / "rounds.csv"),
                        "summary": str(out / "summary.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _report(s: dict[str, Any]) -> None:
    print(
        f"held-out accuracy after:  {s['accuracy_after']:.1%} (loss {s['loss_after']:.3f})\n\n"
        f"{s['optimizer']} on {s['trainable_params']:,} parameters: {s['rounds']} rounds, "
        f"{s['participations']} client replies, {s['train_s']:.1f} s ({s['engine']} engine); "
        f"whole run {s['total_s']:.1f} s.\n"
        f"held-out accuracy {s['accuracy_before']:.1%} -> {s['accuracy_after']:.1%}\n"
        f"payload per reply: {s['bytes_up_per_reply']:.0f} B up ({s['local_steps'] * s['num_queries']} float32 "
        f"scalars + header); FedAvg would send {s['fedavg_bytes_per_client_round']:,} B each way\n"
        f"payload per client over the run: {s['bytes_up_per_client']:,.0f} B up, "
        f"{s['bytes_down_per_client']:,.0f} B down (catch-up included)\n"
        f"checksum: {s['checksum']}\n"
        f"curve:   {s['files']['curve']}\nrounds:  {s['files']['rounds']}\nsummary: {s['files']['summary']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, ImportError) as exc:
        print(f"zo-optim federated: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
