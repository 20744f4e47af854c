"""The ``zo_*`` training arguments; ``zo_optimizer`` names a class of the registry (:mod:`zo_optim.optim.registry`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from ...optim import ZOOptimizer
from ...optim._validation import PERTURBATIONS, check_choice
from ...optim.registry import OPTIMIZERS

__all__ = [
    "LOSS_WEIGHTINGS",
    "OPTIMIZERS",
    "ZO_DROPOUT",
    "ZOArgumentsMixin",
    "ZOTrainingArguments",
    "resolve_optimizer",
]

logger = logging.getLogger(__name__)

LOSS_WEIGHTINGS = ("mean", "tokens")
ZO_DROPOUT = ("off", "shared")

#: the zo_* fields and their defaults (also used when a plain TrainingArguments / SFTConfig reaches a ZO trainer)
ZO_DEFAULTS: dict[str, Any] = {
    "zo_optimizer": "mezo",
    "zo_eps": 1e-3,
    "zo_num_queries": 1,
    "zo_perturbation": "inplace",
    "zo_loss_weighting": "mean",
    "zo_dropout": "off",
    "zo_optimizer_kwargs": None,
}


def resolve_optimizer(spec: Any) -> type[ZOOptimizer]:
    """A ZO optimizer class from a registered name (``"mezo"``, ``"zoadam"``, ... :data:`OPTIMIZERS`) or a class."""
    if isinstance(spec, str):
        key = spec.lower().replace("-", "").replace("_", "")
        if key not in OPTIMIZERS:
            raise ValueError(f"Invalid zo_optimizer: {spec!r} (choose from {', '.join(map(repr, OPTIMIZERS))}, "
                             "or pass a zo_optim.ZOOptimizer subclass)")
        return OPTIMIZERS[key]
    if isinstance(spec, type) and issubclass(spec, ZOOptimizer):
        return spec
    raise TypeError(f"Invalid zo_optimizer: {spec!r} is not a zeroth-order optimizer; pass one of "
                    f"{', '.join(map(repr, OPTIMIZERS))} or a zo_optim.ZOOptimizer subclass")


def zo_settings(args: Any) -> dict[str, Any]:
    """The validated zo_* settings of ``args`` (defaults for fields a plain TrainingArguments lacks)."""
    s = {k: getattr(args, k, d) for k, d in ZO_DEFAULTS.items()}
    resolve_optimizer(s["zo_optimizer"])
    eps = s["zo_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0 or eps == float("inf"):
        raise ValueError(f"Invalid zo_eps: {eps!r} (a positive finite number)")
    q = s["zo_num_queries"]
    if not isinstance(q, int) or isinstance(q, bool) or q < 1:
        raise ValueError(f"Invalid zo_num_queries: {q!r} (an int >= 1)")
    for name, choices in (("zo_perturbation", PERTURBATIONS), ("zo_loss_weighting", LOSS_WEIGHTINGS),
                          ("zo_dropout", ZO_DROPOUT)):
        check_choice(name, s[name], choices)
    kw = s["zo_optimizer_kwargs"]
    if isinstance(kw, str):  # from the command line (HfArgumentParser): a JSON object
        try:
            kw = json.loads(kw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Invalid zo_optimizer_kwargs: {kw!r} is not a JSON object") from exc
    if kw is not None and not isinstance(kw, dict):
        raise ValueError(f"Invalid zo_optimizer_kwargs: {kw!r} (a dict of extra optimizer constructor arguments)")
    s["zo_optimizer_kwargs"] = dict(kw or {})
    return s


# TrainingArguments' own default of ``optim``: any other value was chosen by the user, and is not used
_DEFAULT_OPTIM = next(f.default for f in fields(TrainingArguments) if f.name == "optim")


def warn_unused_optim(args: Any) -> None:
    """Say so when ``args.optim`` names an optimizer: ZOTrainer builds a zeroth-order one instead."""
    optim = getattr(args, "optim", _DEFAULT_OPTIM)
    name = getattr(optim, "value", optim)  # TrainingArguments turns the string into an OptimizerNames member
    if name != _DEFAULT_OPTIM:
        chosen = getattr(args, "zo_optimizer", "mezo")
        logger.warning(
            "zo-optim: optim=%r is not used: ZOTrainer trains with a zeroth-order optimizer (zo_optimizer=%r; "
            "choose it with zo_optimizer or pass optimizers=(opt, None))", name,
            getattr(chosen, "__name__", chosen))


def force_no_clipping(args: Any) -> None:
    """``max_grad_norm = 0`` (with a warning when it was set): there are no gradients to clip or measure."""
    if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
        logger.warning(
            "zo-optim: max_grad_norm=%s is ignored and set to 0: a zeroth-order step has no gradients to clip "
            "(no grad_norm is logged; see zo/projected_grad instead)", args.max_grad_norm)
        args.max_grad_norm = 0.0


@dataclass
class ZOArgumentsMixin:
    """The ``zo_*`` fields; combine with any ``TrainingArguments`` subclass (e.g. TRL's ``SFTConfig``).

    ``max_grad_norm`` defaults to 0 and is forced to 0 (with a warning when set): a ZO step has no
    gradient to clip. ``optim`` is not used (a warning says so when it is set).
    """

    zo_optimizer: str = field(
        default="mezo",
        metadata={"help": f"zeroth-order optimizer: {' | '.join(OPTIMIZERS)} (in Python, also a "
                          "zo_optim.ZOOptimizer subclass)"},
    )
    zo_eps: float = field(default=1e-3, metadata={"help": "perturbation scale epsilon"})
    zo_num_queries: int = field(default=1, metadata={"help": "random directions per step"})
    zo_perturbation: str = field(
        default="inplace",
        metadata={"help": "inplace (weights moved by +-eps) | transient (stored weights never perturbed; exact for "
                          "bf16/fp16 weights)"},
    )
    zo_loss_weighting: str = field(
        default="mean",
        metadata={"help": "mean (every micro-batch weighs the same) | tokens (each micro-batch and rank weighs by "
                          "its label count: gradient accumulation equals one big batch)"},
    )
    zo_dropout: str = field(
        default="off",
        metadata={"help": "off (forwards in eval mode, model.training restored) | shared (train mode, both probes "
                          "see the same dropout masks)"},
    )
    zo_optimizer_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "extra optimizer constructor arguments (a dict, or JSON on the command line)"}
    )
    # TrainingArguments' default is 1.0, which would be ignored with a warning on every run; 0 says it as it is
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "always 0: a zeroth-order step has no gradient to clip (a value > 0 is ignored, with a "
                          "warning)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        settings = zo_settings(self)
        self.zo_optimizer_kwargs = settings["zo_optimizer_kwargs"]
        force_no_clipping(self)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()  # type: ignore[misc]
        if isinstance(d.get("zo_optimizer"), type):  # a class: logged (JSON) by its qualified name
            cls = d["zo_optimizer"]
            d["zo_optimizer"] = f"{cls.__module__}.{cls.__qualname__}"
        return d


@dataclass
class ZOTrainingArguments(ZOArgumentsMixin, TrainingArguments):
    """``transformers.TrainingArguments`` plus the ``zo_*`` fields of :class:`ZOArgumentsMixin`."""
