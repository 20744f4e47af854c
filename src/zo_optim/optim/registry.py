"""The one registry of optimizers: the name every command and argument uses → the class.

Everything that offers a choice of optimizer by name (``zo-optim demo --optimizer``,
``zo-optim federated --optimizer``, the benches, ``ZOTrainingArguments.zo_optimizer``) reads
:data:`OPTIMIZERS`; nothing else lists the names. Each class declares its recommended settings
per use in its ``recommended`` class attribute (a mapping ``use → {"lr": ...}``), and the
commands take their defaults from there through :func:`recommended`. :data:`USES` says what
each use is; every registered class declares every use (``tests/test_registry.py``).

An entry may hold more than the lr: any keyword of the class's constructor (``estimator``,
``num_queries``, ...), which :func:`recommended_kwargs` returns, and the run setting ``lr_decay``
(:data:`RUN_SETTINGS`): ``True`` asks the command that knows the run's length to decay the lr
linearly to 0 over it (``lr_decay_steps`` = the run's steps; docs/optimizers.md, "Linear lr decay").

Adding an optimizer: write the class with its ``recommended`` settings and add one line to
:data:`OPTIMIZERS`; every command then offers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .base import ZOOptimizer
from .helene import HELENE
from .hiso import HiSo
from .hizoo import HiZOO
from .mezo import MeZO
from .zo_adam import ZOAdam

__all__ = ["OPTIMIZERS", "RUN_SETTINGS", "USES", "decays_lr", "optimizer_class", "recommended",
           "recommended_kwargs", "recommended_lr"]

#: name (lower case, as the command lines and ``zo_optimizer`` take it) → class
OPTIMIZERS: Mapping[str, type[ZOOptimizer]] = MappingProxyType({
    "mezo": MeZO,
    "zoadam": ZOAdam,
    "hizoo": HiZOO,
    "helene": HELENE,
    "hiso": HiSo,
})

#: use → what it is (the keys of every class's ``recommended``; the docs page that says how the values were chosen)
USES: Mapping[str, str] = MappingProxyType({
    "demo/head": "zo-optim demo --train head: MiniLM's linear head on tweets, batch 32 (docs/demo.md, tuned)",
    "demo/last-k": "zo-optim demo --train last-k: the last encoder layers + head (docs/demo.md; MeZO and ZOAdam: "
                   "issue 24's encoder study, checked on the demo; the others not tuned)",
    "demo/all": "zo-optim demo --train all: full fine-tune of MiniLM (docs/demo.md, not tuned)",
    "demo/lora": "zo-optim demo --train lora: LoRA adapters through ZOTrainer (docs/demo.md, not tuned)",
    "federated/head": "zo-optim federated: the head task, P = 5, tau = 1, 4 of 8 clients per round (docs/federated.md)",
    "finetune/lora": "zo-optim bench finetune, LoRA mode: MiniLM through ZOTrainer (docs/integrations.md)",
    "finetune/full": "zo-optim bench finetune, full mode: MiniLM through ZOTrainer (docs/integrations.md)",
    "finetune-clm/full": "zo-optim bench finetune-clm, full mode: MiniLM as a causal LM through ZOTrainer "
                         "(docs/integrations.md; measured for MeZO, others scaled by MeZO's ratio to finetune/full)",
    "finetune-clm/lora": "zo-optim bench finetune-clm, LoRA mode: MiniLM as a causal LM through ZOTrainer "
                         "(docs/integrations.md; measured for MeZO, others scaled by MeZO's ratio to finetune/lora)",
    "convergence/quadratic": "zo-optim bench convergence: centre of the lr grid on the quadratic (docs/convergence.md)",
    "convergence/rosenbrock": "zo-optim bench convergence: centre of the lr grid on Rosenbrock (docs/convergence.md)",
    "convergence/mlp": "zo-optim bench convergence: centre of the lr grid on the MLP (docs/convergence.md)",
    "convergence/minilm": "zo-optim bench convergence: centre of the lr grid on MiniLM (docs/convergence.md)",
    "convergence/encoder": "zo-optim bench convergence: centre of the lr grid on MiniLM's last layer + head "
                           "(docs/convergence.md, where each optimizer's and option's measured best lr is listed)",
})


#: keys of a ``recommended`` entry that are settings of the run, not constructor arguments (``lr_decay``: the lr
#: decays linearly to 0 over the run; the command sets ``lr_decay_steps`` once it knows the run's steps)
RUN_SETTINGS = ("lr_decay",)


def optimizer_class(name: str) -> type[ZOOptimizer]:
    """The registered class called ``name``; ``ValueError`` naming the choices otherwise."""
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"Invalid optimizer: {name!r} (choose one of {', '.join(sorted(OPTIMIZERS))})")
    return cls


def recommended(optimizer: str | type[ZOOptimizer], use: str) -> Mapping[str, Any]:
    """The settings ``optimizer`` (a registered name or a class) recommends for ``use`` (a key of :data:`USES`)."""
    cls = optimizer_class(optimizer) if isinstance(optimizer, str) else optimizer
    if use not in USES:
        raise ValueError(f"Invalid use: {use!r} (choose one of {', '.join(USES)})")
    table = cls.recommended
    if use not in table:
        raise ValueError(f"Invalid use: {use!r} ({cls.__name__} declares no recommended settings for it)")
    return table[use]


def recommended_lr(optimizer: str | type[ZOOptimizer], use: str) -> float:
    """The learning rate ``optimizer`` recommends for ``use``."""
    return float(recommended(optimizer, use)["lr"])


def recommended_kwargs(optimizer: str | type[ZOOptimizer], use: str) -> dict[str, Any]:
    """The constructor keywords ``optimizer`` recommends for ``use``: the lr and any option, not
    :data:`RUN_SETTINGS`."""
    return {k: v for k, v in recommended(optimizer, use).items() if k not in RUN_SETTINGS}


def decays_lr(optimizer: str | type[ZOOptimizer], use: str) -> bool:
    """Whether ``optimizer``'s recommended run for ``use`` decays the lr linearly to 0 over the run."""
    return bool(recommended(optimizer, use).get("lr_decay", False))
