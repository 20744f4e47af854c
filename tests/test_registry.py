"""One registry of optimizers: every command, argument and bench offers exactly its names, and every
registered class declares its recommended settings for every use (no second table to forget)."""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

import pytest
import torch

import zo_optim
from zo_optim.optim import ZOOptimizer
from zo_optim.optim.registry import (
    OPTIMIZERS,
    RUN_SETTINGS,
    USES,
    decays_lr,
    optimizer_class,
    recommended,
    recommended_kwargs,
    recommended_lr,
)

SRC = Path(zo_optim.__file__).resolve().parent
NAMES = set(OPTIMIZERS)


def _choices(parser: argparse.ArgumentParser, dest: str) -> set[str]:
    (action,) = [a for a in parser._actions if a.dest == dest]
    assert action.choices is not None, dest
    return set(action.choices)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_class_is_exported_and_declares_every_use(name):
    cls = OPTIMIZERS[name]
    assert issubclass(cls, ZOOptimizer) and getattr(zo_optim, cls.__name__) is cls
    assert optimizer_class(name) is cls
    table = cls.recommended
    assert set(table) == set(USES), f"{cls.__name__}.recommended: missing {set(USES) - set(table)}, " \
                                    f"unknown {set(table) - set(USES)}"
    for use in USES:
        lr = recommended_lr(name, use)
        assert lr > 0 and math.isfinite(lr), (name, use, lr)
        assert recommended(cls, use) is table[use]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_recommended_entry_builds_its_optimizer_and_runs(name):
    """Settings beyond the lr are constructor keywords (or the run setting lr_decay): each entry builds its class and
    steps, so a typo in an option cannot wait for the command that reads it."""
    for use in USES:
        kwargs = recommended_kwargs(name, use)
        assert kwargs["lr"] == recommended_lr(name, use)
        assert set(recommended(name, use)) - set(kwargs) <= set(RUN_SETTINGS), (name, use)
        assert decays_lr(name, use) in (True, False)
        p = torch.nn.Parameter(torch.arange(6.0))
        opt = OPTIMIZERS[name]([p], seed=0, backend="reference", **kwargs)
        opt.step(lambda p=p: (p * p).sum())
        assert not torch.equal(p.detach(), torch.arange(6.0)), (name, use)


def test_the_encoder_fine_tune_use_carries_issue_24s_winner():
    """docs/convergence.md: ZOAdam with q = 8 forward differences and the lr decayed to 0 over the run; MeZO with the
    decay. The demo's last-k mode is that fine-tune (MiniLM's last layer + head on the tweets)."""
    assert recommended("zoadam", "demo/last-k") == {"lr": 6e-3, "estimator": "forward", "num_queries": 8,
                                                    "lr_decay": True}
    assert decays_lr("mezo", "demo/last-k") and not decays_lr("mezo", "demo/head")
    assert "lr_decay" not in recommended_kwargs("zoadam", "demo/last-k")


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match=r"Invalid optimizer: 'sgd' \(choose one of helene, hiso, hizoo, mezo"):
        optimizer_class("sgd")
    with pytest.raises(ValueError, match=r"Invalid use: 'demo/middle'"):
        recommended("mezo", "demo/middle")


def test_the_apps_offer_every_registered_optimizer():
    from zo_optim.apps import demo
    from zo_optim.apps import federated as federated_app

    assert _choices(demo.build_parser(), "optimizer") == NAMES
    assert _choices(federated_app.build_parser(), "optimizer") == NAMES
    # and the demo has a default lr for every --train mode
    assert {f"demo/{mode}" for mode in _choices(demo.build_parser(), "train")} <= set(USES)


def test_the_benches_offer_every_registered_optimizer():
    from zo_optim.bench import convergence, finetune, problems, trainer_overhead

    assert _choices(trainer_overhead.build_parser(), "optimizer") == NAMES
    assert _choices(finetune._parser(), "optimizers") == NAMES
    assert set(convergence.OPTIMIZER_NAMES) == NAMES
    assert set(convergence.SWEEPS) <= NAMES
    for mode in finetune.MODES:
        assert f"finetune/{mode}" in USES
    for problem in problems.PROBLEMS:
        assert f"convergence/{problem}" in USES


def test_the_hf_arguments_accept_every_registered_optimizer():
    pytest.importorskip("transformers")
    from zo_optim.integrations import hf

    assert hf.OPTIMIZERS is OPTIMIZERS
    for name, cls in OPTIMIZERS.items():
        assert hf.resolve_optimizer(name) is cls
        assert hf.resolve_optimizer(name.upper()) is cls


# Fused update ops happen to share some optimizers' names; bench/kernels.py times ops, not optimizers.
_OP_TABLES = {"bench/kernels.py"}


def test_no_second_table_of_optimizer_names():
    """A literal list / tuple / set / dict that names three or more registered optimizers is a second
    registry (the next optimizer would be missing from it): read the names from the registry instead."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "optim/registry.py" or rel in _OP_TABLES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if not isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)) or items is None:
                continue
            named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES}
            if len(named) >= 3:
                found.append(f"{rel}:{node.lineno} {sorted(named)}")
    assert not found, "tables of optimizer names outside the registry:\n" + "\n".join(found)
