"""The ``zo-optim`` command: ``check``, ``demo``, ``federated``, ``bench <name>`` (see :data:`COMMANDS`), ``--version``.

Each subcommand lives in its own module with a ``main(argv) -> int`` and is
imported only when used, so ``zo-optim --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "check": ("zo_optim.apps.check", "self-check every backend on every device (run first; attach to bug reports)"),
    "demo": ("zo_optim.apps.demo", "fine-tune the packaged MiniLM on tweet sentiment with a ZO optimizer"),
    "federated": ("zo_optim.apps.federated", "federated fine-tune of the MiniLM head exchanging only scalars"),
    "bench kernels": ("zo_optim.bench.kernels", "perturb / restore+update micro-benchmark (ms, GB/s, roofline)"),
    "bench step": ("zo_optim.bench.step", "per-step time (forwards vs optimizer) and peak memory vs MeZO's loop"),
    "bench convergence": ("zo_optim.bench.convergence", "forward passes to a target per optimizer (mean ± std)"),
    "bench sass": ("zo_optim.bench.sass", "compile the Triton kernels for sm_90 offline: registers, layouts, SASS"),
    "bench finetune": ("zo_optim.bench.finetune", "MiniLM tweet fine-tune through the HF Trainer: accuracy, memory"),
    "bench finetune-clm": ("zo_optim.bench.finetune_clm",
                           "MiniLM loaded as a causal LM, next-token fine-tune on tweets: held-out loss per lr"),
    "bench trainer-overhead": ("zo_optim.bench.trainer_overhead", "a ZOTrainer step vs the raw opt.step(closure) loop"),
    "bench memory": ("zo_optim.bench.memory", "peak memory: MeZO via ZOTrainer vs inference vs AdamW"),
    "bench federated": ("zo_optim.bench.federated", "HiSo vs DeComFL, non-IID federated head fine-tune: rounds, bytes"),
    "bench federated-attack": ("zo_optim.bench.federated_attack",
                               "1 of 10 clients flips its scalars: model distance from honest, per aggregation"),
    "bench federated-scale": ("zo_optim.bench.federated_scale",
                              "10,000 clients, 1% per round, 1,000 rounds: server time, bytes, memory, catch-up"),
    "bench flower-round-time": ("zo_optim.bench.flower_round_time",
                                "one Flower deployment round on real processes: where the time and bytes go"),
}


def _usage() -> str:
    lines = ["usage: zo-optim <command> [options]   (zo-optim <command> --help for its options)",
             "       zo-optim --version", "", "commands:"]
    width = max(map(len, COMMANDS)) + 1
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for n_words in (2, 1):
        name = " ".join(args[:n_words])
        if len(args) >= n_words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.main(args[n_words:]) or 0)
    if args and args[0] in ("-V", "--version"):
        from . import __version__

        print(f"zo-optim {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    print(f"zo-optim: unknown command {' '.join(args[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
