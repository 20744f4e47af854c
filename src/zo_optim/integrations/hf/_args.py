"""The ``zo_*`` training arguments; ``zo_optimizer`` names a class of the registry (:mod:`zo_optim.optim.registry`)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import TrainingArguments

from ...optim import ZOOptimizer
from ...optim._validation import check_choice, is_int
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
    "zo_loss_window": 100,
    "zo_default_lr": True,
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
    """The validated zo_* settings of ``args`` (defaults for fields a plain TrainingArguments lacks).

    The optimizer's own arguments (``zo_eps``, ``zo_num_queries``, ``zo_perturbation``, every key of
    ``zo_optimizer_kwargs``) are checked by the optimizer class itself: it is built once over a one-element
    stand-in parameter, so its constructor's checks (``zo_optim.optim._validation``) refuse a bad value here,
    when the arguments are built, not at ``train()``; the rules live in one place.
    """
    s = {k: getattr(args, k, d) for k, d in ZO_DEFAULTS.items()}
    cls = resolve_optimizer(s["zo_optimizer"])
    for name, choices in (("zo_loss_weighting", LOSS_WEIGHTINGS), ("zo_dropout", ZO_DROPOUT)):
        check_choice(name, s[name], choices)
    window = s["zo_loss_window"]
    if not is_int(window) or window < 0:
        raise ValueError(f"Invalid zo_loss_window: {window!r} (an int >= 0 of steps; 0 turns the loss check off)")
    if not isinstance(s["zo_default_lr"], bool):
        raise ValueError(f"Invalid zo_default_lr: {s['zo_default_lr']!r} (True or False)")
    kw = s["zo_optimizer_kwargs"]
    if isinstance(kw, str):  # from the command line (HfArgumentParser): a JSON object
        try:
            kw = json.loads(kw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Invalid zo_optimizer_kwargs: {kw!r} is not a JSON object") from exc
    if kw is not None and not isinstance(kw, dict):
        raise ValueError(f"Invalid zo_optimizer_kwargs: {kw!r} (a dict of extra optimizer constructor arguments)")
    s["zo_optimizer_kwargs"] = dict(kw or {})
    _check_with_the_optimizer(cls, args, s)
    return s


def _check_with_the_optimizer(cls: type[ZOOptimizer], args: Any, s: dict[str, Any]) -> None:
    """Build ``cls`` over a stand-in parameter with the arguments ZOTrainer will pass: its own checks run now."""
    for name, key in (("zo_eps", "zo_eps"), ("zo_num_queries", "num_queries")):
        if key in s["zo_optimizer_kwargs"]:
            raise ValueError(f"Invalid zo_optimizer_kwargs: {key!r} is set by the {name} argument; set it there")
    lr = getattr(args, "learning_rate", 1e-3)
    kwargs = {"lr": lr if isinstance(lr, (int, float)) and math.isfinite(lr) else 1e-3, "zo_eps": s["zo_eps"],
              "num_queries": s["zo_num_queries"], "perturbation": s["zo_perturbation"], "seed": 0,
              **s["zo_optimizer_kwargs"]}
    try:
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except TypeError as exc:  # an unknown keyword: a typo in zo_optimizer_kwargs
        raise ValueError(f"Invalid zo_optimizer_kwargs for {cls.__name__}: {exc}") from exc
    except ValueError as exc:
        # the optimizer names its own argument (num_queries, ...); say which training argument carries it
        msg = str(exc).replace("Invalid num_queries", "Invalid zo_num_queries").replace(
            "Invalid perturbation", "Invalid zo_perturbation")
        raise ValueError(f"{msg} (checked by {cls.__name__} when the training arguments are built)") from exc


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


def force_no_clipping(args: Any, warn: bool = True) -> None:
    """``max_grad_norm = 0``: there are no gradients to clip or measure.

    The warning for a value the user set is given by the trainer (``warn=True``), not when the arguments are
    parsed: scripts set up logging after parsing, so a notice at parse time went unformatted or unseen. The
    arguments remember the value (``_zo_max_grad_norm_given``) until then.
    """
    value = getattr(args, "max_grad_norm", 0)
    given = value if value and value > 0 else getattr(args, "_zo_max_grad_norm_given", None)
    if value and value > 0:
        args.max_grad_norm = 0.0
    if given is None:
        return
    if warn:
        logger.warning(
            "zo-optim: max_grad_norm=%s is ignored and set to 0: a zeroth-order step has no gradients to clip "
            "(no grad_norm is logged; see zo/projected_grad instead)", given)
        given = None
    try:
        args._zo_max_grad_norm_given = given
    except AttributeError:  # a frozen or slotted arguments class: the warning has been given already, or is lost
        pass


def no_gradient_checkpointing(args: Any) -> None:
    """Gradient (activation) checkpointing off, with a warning: it re-runs forwards to save memory for backward.

    transformers 5 calls it ``activation_checkpointing`` (``gradient_checkpointing`` is the old alias).
    """
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if getattr(args, n, False)]
    if not names:
        return
    logger.warning(
        "zo-optim: %s=True is turned off: it saves activation memory for a backward pass, and a zeroth-order step "
        "runs none (its no_grad forwards keep no activations), so it would only slow the probes down",
        names[-1])
    for n in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(args, n):
            setattr(args, n, False)


@dataclass
class ZOArgumentsMixin:
    """The ``zo_*`` fields; combine with any ``TrainingArguments`` subclass (e.g. TRL's ``SFTConfig``).

    ``max_grad_norm`` defaults to 0 and is forced to 0 (with a warning from the trainer when set): a ZO step
    has no gradient to clip. ``optim`` is not used (a warning says so when it is set; the arguments dump
    marks it). ``gradient_checkpointing`` (``activation_checkpointing``) is turned off by the trainer (with a
    warning): there is no backward.
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
    zo_loss_window: int = field(
        default=100,
        metadata={"help": "warn when the logged training loss has not improved (or rises) over this many steps "
                          "(0: no check)"},
    )
    zo_default_lr: bool = field(
        default=True,
        metadata={"help": "when learning_rate is left at the AdamW default 5e-5, use the optimizer's recommended "
                          "zeroth-order lr (logged; zo_optim.optim.registry)"},
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
        force_no_clipping(self, warn=False)  # the trainer warns, once logging is set up

    def __str__(self) -> str:
        # the arguments dump (scripts log it): optim is not used, so it does not show AdamW next to zo_optimizer
        text = super().__str__()  # type: ignore[misc]
        return text.replace(f"optim={self.optim},", "optim=<not used: zo_optimizer trains>,", 1)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()  # type: ignore[misc]
        if isinstance(d.get("zo_optimizer"), type):  # a class: logged (JSON) by its qualified name
            cls = d["zo_optimizer"]
            d["zo_optimizer"] = f"{cls.__module__}.{cls.__qualname__}"
        return d


@dataclass
class ZOTrainingArguments(ZOArgumentsMixin, TrainingArguments):
    """``transformers.TrainingArguments`` plus the ``zo_*`` fields of :class:`ZOArgumentsMixin`."""
