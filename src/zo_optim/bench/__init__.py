"""Benchmarks behind ``zo-optim bench`` (docs: benchmarks.md), one module per command.

* :mod:`~zo_optim.bench.kernels` (``bench kernels``): ms and GB/s per parameter pass against MeZO's loop;
* :mod:`~zo_optim.bench.step` (``bench step``): per-step time (forwards vs optimizer) and peak memory;
* :mod:`~zo_optim.bench.convergence` (``bench convergence``): forward passes to a target per optimizer,
  on the problems of :mod:`~zo_optim.bench.problems`;
* :mod:`~zo_optim.bench.sass` (``bench sass``): the Triton kernels compiled for sm_90 offline;
* :mod:`~zo_optim.bench.finetune` (``bench finetune``): the MiniLM tweet fine-tune through the HF Trainer;
* :mod:`~zo_optim.bench.finetune_clm` (``bench finetune-clm``): MiniLM loaded as a causal LM, next-token
  fine-tune on the tweets: held-out loss per lr and step budget (the causal-LM row of the first-run table);
* :mod:`~zo_optim.bench.trainer_overhead` (``bench trainer-overhead``): a ZOTrainer step vs the raw loop;
* :mod:`~zo_optim.bench.memory` (``bench memory``): peak memory, MeZO via ZOTrainer vs inference vs AdamW;
* :mod:`~zo_optim.bench.federated` (``bench federated``): HiSo vs DeComFL, rounds and bytes;
* :mod:`~zo_optim.bench.federated_attack` (``bench federated-attack``): one sign-flipping client per
  aggregation rule, the distance from the honest run;
* :mod:`~zo_optim.bench.federated_scale` (``bench federated-scale``): 10,000 clients, 1% a round, 1,000
  rounds: server time, bytes, memory and catch-up cost;
* :mod:`~zo_optim.bench.flower_round_time` (``bench flower-round-time``): one Flower deployment round on real
  processes, phase by phase, with Flower's own floor and the bytes on the wire.

Shared: :mod:`~zo_optim.bench.report` (CSV, tables, plots, environment), :mod:`~zo_optim.bench.timing`,
:mod:`~zo_optim.bench.shapes` (real models' parameter lists), :mod:`~zo_optim.bench.baselines` (MeZO's loop).
"""
