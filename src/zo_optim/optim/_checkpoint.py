"""Checkpointing: the optimizer's state dict, and a load that is validated whole before anything changes.

``state_dict()`` is torch's (param groups + per-parameter buffers) plus a ``"zo"`` section: the
algorithm, the RNG contract version, the base seed, the step and skipped-step counters, the
estimator settings, the subclass's constructor settings and its runtime flags. A load checks the
``zo`` section, every param group and its hyper-parameters, every state tensor (shape, dtype,
range) and the runtime flags first (the ``_checked_*`` helpers return what would be installed),
then installs them, rolling back if anything still fails: a refused state dict leaves the
optimizer exactly as it was. The state dict is also the only way to copy an optimizer: pickling
and ``copy``/``deepcopy`` are refused with a pointer to it (a copy would lose the seed, step
counter, lock and hooks, and would not share the model's parameters).

torch.distributed.checkpoint's ``get_optimizer_state_dict``/``set_optimizer_state_dict`` (the FSDP2
route to sharded checkpoints) work on it as on ``torch.optim`` optimizers: they keep only ``state`` and
``param_groups`` (so the ``zo`` section travels in every param group too, under ``"zo"``), pass
parameter names (FQNs) instead of int ids on load (accepted), and would "initialize" an optimizer with
empty state by a zero-gradient ``step()`` without closure (:class:`ZOState` prevents it).

A private mixin of :class:`~.base.ZOOptimizer` rather than a collaborator: it extends
``torch.optim.Optimizer.state_dict``/``load_state_dict`` through ``super()`` and calls the
subclass hooks (``_check_group``, ``_buffers``, ``_settings``, ``_runtime_state``, ...) on the
optimizer itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from .. import rng
from ..ops import _sharding
from ._anchor import ANCHOR
from ._eager import eager
from ._validation import as_seed, is_int

__all__ = ["Checkpointing", "ZOState"]

#: group options that state dicts saved before they existed lack: such a group loads with them off
#: (``anchor_decay``: :mod:`._anchor`; ``lr_decay_steps``: :mod:`._schedule`)
LATER_GROUP_DEFAULTS: dict[str, Any] = {"anchor_decay": 0.0, "lr_decay_steps": 0}


class ZOState(defaultdict):
    """The optimizer's per-parameter state (``opt.state``): torch's ``defaultdict(dict)``, truthy even when empty.

    Why: ``torch.distributed.checkpoint.state_dict``'s ``get_optimizer_state_dict`` and
    ``set_optimizer_state_dict`` treat an optimizer whose ``state`` is empty (falsy) as uninitialised and
    "initialise" it: a zero gradient for every parameter, ``lr`` set to 0, ``step(closure=None)``. A
    zeroth-order optimizer has no gradient step (``step()`` without closure raises: it needs the loss), its
    buffers are created on demand (the state dict of a fresh optimizer already has them), and those zero
    gradients alone would take a full gradient's memory, which ZO training exists to avoid. MeZO without
    momentum has no state at all, ever.
    """

    def __bool__(self) -> bool:
        return True


def _with_later_defaults(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with the options added since it may have been saved (``LATER_GROUP_DEFAULTS``) appended when absent.

    Appended, not prepended: a loaded group keeps its saved key order, so a state dict saved again after a load
    pickles to the same bytes as the original (federated replicas compare those bytes).
    """
    for key, value in LATER_GROUP_DEFAULTS.items():
        group.setdefault(key, value)
    return group


def _zo_section(state_dict: Mapping[str, Any]) -> Any:
    """The ``zo`` section of a state dict: top level, or (after torch.distributed.checkpoint's
    ``get/set_optimizer_state_dict``, which keep only ``state`` and ``param_groups``) a param group's copy."""
    if "zo" in state_dict:
        return state_dict["zo"]
    groups = state_dict.get("param_groups")
    if isinstance(groups, (list, tuple)):
        for g in groups:
            if isinstance(g, Mapping) and "zo" in g:
                return g["zo"]
    return None


class Checkpointing:
    """State dicts, their checks, and the refusal of copies (mixed into :class:`~.base.ZOOptimizer`)."""

    # ------------------------------------------------------------------ copies: refused, the state dict is the way

    def _refuse_copy(self, how: str) -> TypeError:
        name = type(self).__name__
        return TypeError(
            f"{name} cannot be {how}: a copy would lose the zeroth-order state (seed, step counter, lock, hooks) "
            f"and would not share the model's parameters. Use the state dict instead: "
            f"torch.save(opt.state_dict(), path), then opt2 = {name}(model2.parameters(), ...) and "
            "opt2.load_state_dict(torch.load(path, weights_only=True)) (resumes bit for bit)"
        )

    def __getstate__(self) -> dict[str, Any]:
        raise self._refuse_copy("pickled (pickle.dumps, torch.save(opt))")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise self._refuse_copy("pickled or copied (pickle.dumps, torch.save(opt), copy.copy)")

    def __deepcopy__(self, memo: Any) -> Any:
        raise self._refuse_copy("deep-copied (copy.deepcopy)")

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (tensors and Python scalars only; loadable with ``weights_only=True``).

        Refused while an estimate is pending (``estimate()`` called, ``step()`` not yet): the
        pending scalars belong to a step that has not happened, so a checkpoint is taken
        after ``step()`` (as ``transformers.Trainer`` does) or after ``take_estimate()``.
        """
        with self._guard.exclusive("state_dict"):
            if self._acc is not None and self._acc.applied is not None:
                raise RuntimeError(self._partial_help())
            if self._acc is not None:
                raise RuntimeError(
                    f"{type(self).__name__}.state_dict() was called while an estimate is pending (estimate() without "
                    "step()); apply it with step() (or drop it with take_estimate()) before saving"
                )
            return self._state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` of the same optimizer class.

        Atomic: everything is validated before anything changes (the ``zo`` section, the
        param groups and their hyper-parameters, every state tensor, the runtime flags), so a
        refused state dict (``TypeError``/``ValueError``) leaves the optimizer exactly as it was.

        After a :class:`~._passes.WeightsNotRestoredError` (a failed pass that could not be taken
        back) this is the only call accepted: load the model's weights from the same checkpoint
        first; a successful load drops what the failed step left and lifts the refusal.
        """
        with self._guard.exclusive("load_state_dict"):
            if self._guard.refusal is None:
                self._load_state_dict(state_dict)
                return
            # after a failed take-back (WeightsNotRestoredError): the way back. What the failed step left (its
            # pending estimate, the offsets it recorded) belongs to weights the user is replacing from a checkpoint
            kept = self._acc
            self._acc = None
            try:
                self._load_state_dict(state_dict)
            except BaseException:
                self._acc = kept
                raise
            self._inplace.scale = 0.0
            self._transient.forget()
            self._guard.refusal = None

    def _state_dict(self) -> dict[str, Any]:
        self._ensure_state()
        sd = eager(super().state_dict)()  # no torch._dynamo import (see _eager)
        sd["zo"] = {
            "algorithm": self.algorithm,
            "rng_version": rng.RNG_VERSION,
            "base_seed": self.base_seed,
            "step": self._t,
            "skipped_steps": self.skipped_steps,
            "zo_eps": self.zo_eps,
            "num_queries": self.num_queries,
            "estimator": self.estimator,
            "distribution": self.distribution,
            # constructor-level settings of the subclass, recorded for information (like zo_eps)
            "settings": self._settings(),
            # runtime flags that change the next steps; restored by load_state_dict
            "runtime": self._runtime_state(),
        }
        # torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and "param_groups" (with
        # every group's entries): a copy in each group brings the seed and step counter through it
        for g in sd["param_groups"]:
            g["zo"] = dict(sd["zo"])
        return sd

    def _load_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{type(self).__name__}.load_state_dict() takes the dict returned by state_dict(), got a "
                f"{type(state_dict).__name__}; load it with opt.load_state_dict(torch.load(path, weights_only=True))"
            )
        zo = _zo_section(state_dict)
        if not isinstance(zo, Mapping):
            raise ValueError(
                "not a zo-optim state dict (no 'zo' entry); "
                f"load a state dict saved by {type(self).__name__}.state_dict()"
            )
        if zo.get("algorithm") != self.algorithm:
            raise ValueError(
                f"state dict is from optimizer {zo.get('algorithm')!r}, cannot load it into {self.algorithm!r}; "
                "construct the same optimizer class that saved it"
            )
        if zo.get("rng_version") != rng.RNG_VERSION:
            raise ValueError(
                f"state dict was saved with RNG contract {zo.get('rng_version')!r} but this zo-optim uses "
                f"{rng.RNG_VERSION!r}; perturbations would differ, so resuming is refused"
            )
        if self._acc is not None and self._acc.applied is not None:
            raise RuntimeError(self._partial_help())
        if self._acc is not None:
            raise RuntimeError("an estimate is pending; apply it with step() before loading a state dict")
        # ---- validate everything; nothing below changes the optimizer until every check has passed
        base_seed, t, skipped = self._checked_counters(zo)
        runtime = zo.get("runtime", {})
        if not isinstance(runtime, Mapping):
            raise ValueError(f"Invalid state dict: zo['runtime'] is a {type(runtime).__name__}, not a dict")
        self._check_runtime_state(runtime)
        groups = self._checked_groups(state_dict)
        state = self._checked_state(state_dict, groups)
        # ---- apply (torch's own load for the groups; rolled back if anything still fails)
        old = {k: self.__dict__[k] for k in ("state", "param_groups")}
        old_attrs = (self.base_seed, self._t, self.skipped_steps, self._seed_synced, self._runtime_state())
        try:
            # without the groups' copies of the zo section: they are not hyper-parameters (the live groups would
            # carry a stale step counter, and replicas' config digests would differ)
            saved_groups = [_with_later_defaults({k: v for k, v in g.items() if k != "zo"})
                            for g in state_dict["param_groups"]]
            eager(super().load_state_dict)({"state": {}, "param_groups": saved_groups})
            self.state = ZOState(dict, self.state)  # torch's load made it a plain defaultdict again
            for p, entry in state.items():
                self.state[p] = entry
            self.base_seed, self._t, self.skipped_steps = base_seed, t, skipped
            self._load_runtime_state(runtime)
            self._seed_synced = True
        except BaseException:
            self.__dict__.update(old)
            self.base_seed, self._t, self.skipped_steps, self._seed_synced = old_attrs[:4]
            self._load_runtime_state(old_attrs[4])
            raise

    def _checked_counters(self, zo: Mapping[str, Any]) -> tuple[int, int, int]:
        """base_seed, step and skipped_steps of a state dict's ``zo`` section, validated."""
        for key in ("base_seed", "step", "skipped_steps"):
            if key not in zo:
                raise ValueError(
                    f"Invalid state dict: zo[{key!r}] is missing; load a complete state dict saved by "
                    f"{type(self).__name__}.state_dict()"
                )
        try:
            base_seed = as_seed(zo["base_seed"])
        except ValueError:
            raise ValueError(
                f"Invalid state dict: zo['base_seed'] = {zo['base_seed']!r} (an int in [0, 2**64))"
            ) from None
        t, skipped = zo["step"], zo["skipped_steps"]
        if not is_int(t) or not 0 <= t < 2**64:
            raise ValueError(f"Invalid state dict: zo['step'] = {t!r} (the step counter, an int >= 0)")
        if not is_int(skipped) or not 0 <= skipped <= t:
            raise ValueError(
                f"Invalid state dict: zo['skipped_steps'] = {skipped!r} (an int in [0, step = {t}])"
            )
        return base_seed, int(t), int(skipped)

    def _checked_groups(self, state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The param groups as a load would make them (saved hyper-parameters, current params), validated."""
        saved = state_dict.get("param_groups")
        if not isinstance(saved, (list, tuple)) or not all(isinstance(g, Mapping) for g in saved):
            raise ValueError("Invalid state dict: 'param_groups' must be a list of dicts (as saved by state_dict())")
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"Invalid state dict: it has {len(saved)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}; construct the optimizer with the same groups that saved it"
            )
        out = []
        for i, (own, sg) in enumerate(zip(self.param_groups, saved, strict=True)):
            ids = sg.get("params")
            # int ids (state_dict()), or parameter names (torch.distributed.checkpoint's set_optimizer_state_dict)
            if not isinstance(ids, (list, tuple)) or not all(is_int(j) or isinstance(j, str) for j in ids):
                raise ValueError(
                    f"Invalid state dict: param_groups[{i}]['params'] must be a list of int ids (or of parameter names)"
                )
            if len(ids) != len(own["params"]):
                raise ValueError(
                    f"Invalid state dict: param_groups[{i}] has {len(ids)} parameters, this optimizer's group {i} "
                    f"has {len(own['params'])}; construct the optimizer with the same parameters that saved it"
                )
            # (an option added since a state dict was saved is off in its groups: LATER_GROUP_DEFAULTS)
            missing = [k for k in own if k not in ("params", "param_names", *LATER_GROUP_DEFAULTS) and k not in sg]
            if missing:
                raise ValueError(f"Invalid state dict: param_groups[{i}] lacks the hyper-parameters {missing}")
            names = sg.get("param_names")
            if names is not None and (
                not isinstance(names, (list, tuple))
                or len(names) != len(ids)
                or not all(isinstance(n, str) for n in names)
            ):
                raise ValueError(f"Invalid state dict: param_groups[{i}]['param_names'] must list one str per param")
            # the zo section's copy is not a hyper-parameter
            group = _with_later_defaults({k: v for k, v in sg.items() if k != "zo"})
            group["params"] = own["params"]
            if names is None and "param_names" in own:
                group["param_names"] = own["param_names"]
            try:
                self._check_group(group)
            except (ValueError, TypeError) as e:
                raise type(e)(f"Invalid state dict: param_groups[{i}]: {e}") from None
            out.append(group)
        all_ids = [j for sg in saved for j in sg["params"]]
        if len(set(all_ids)) != len(all_ids):
            raise ValueError("Invalid state dict: a parameter id appears twice in 'param_groups'")
        return out

    def _checked_state(
        self, state_dict: Mapping[str, Any], groups: list[dict[str, Any]]
    ) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-parameter state a load would install (fp32 copies on the params' devices), validated."""
        saved = state_dict.get("state")
        if not isinstance(saved, Mapping):
            raise ValueError("Invalid state dict: 'state' must be a dict (param id -> buffers)")
        id_map: dict[Any, tuple[int, torch.Tensor, dict[str, Any]]] = {}
        pos = 0
        for sg, group in zip(state_dict["param_groups"], groups, strict=True):
            for j, p in zip(sg["params"], group["params"], strict=True):
                id_map[j] = (pos, p, group)
                pos += 1
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for key, entry in saved.items():
            if key not in id_map:
                raise ValueError(f"Invalid state dict: state[{key!r}] belongs to no parameter of 'param_groups'")
            if not isinstance(entry, Mapping):
                raise ValueError(f"Invalid state dict: state[{key!r}] is a {type(entry).__name__}, not a dict")
            i, p, group = id_map[key]
            known = set(self._buffers(group)) | {ANCHOR}  # (an anchor is kept even while its group's decay is 0)
            new: dict[str, torch.Tensor] = {}
            for name, v in entry.items():
                where = f"state[{key!r}][{name!r}] (parameter {i}, shape {tuple(p.shape)})"
                if name not in known:
                    raise ValueError(
                        f"Invalid state dict: {where} is not a buffer of {type(self).__name__} with this group's "
                        f"settings (expected {sorted(known)})"
                    )
                if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                    got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
                    raise ValueError(f"Invalid state dict: {where} is {got}; it must be a floating tensor")
                if v.layout != torch.strided or tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"Invalid state dict: {where} has shape {tuple(v.shape)}; it must have its parameter's shape"
                    )
                # torch casts floating state to the param dtype on load; ZO buffers are always fp32, an anchor
                # has its parameter's dtype (_anchor). Sharded parameters: a DTensor buffer or a full one, kept as
                # this rank's rows (ops._sharding)
                dtype = p.dtype if name == ANCHOR else torch.float32
                v = _sharding.local_rows(p, v.detach()).to(device=_sharding.local(p).device, dtype=dtype)
                v = v.clone()
                self._check_state_buffer(where, name, v)
                new[name] = _sharding.like(p, v)
            out[p] = new
        self._check_anchors_loaded(state_dict, groups, out)
        return out

    def _check_state_buffer(self, where: str, name: str, value: torch.Tensor) -> None:
        """A loaded buffer must be finite and in its valid range (``buffer_ranges``; the preconditioner > 0)."""
        if value.numel() == 0:
            return
        lo, strict = (0.0, True) if name == self.precond_buffer else self.buffer_ranges.get(name, (-math.inf, True))
        lo_v, hi_v = (float(x) for x in torch.aminmax(value))
        finite = bool(torch.isfinite(value).all())
        if not finite or lo_v < lo or (strict and lo_v == lo):
            need = "finite" if lo == -math.inf else f"finite and {'>' if strict else '>='} {lo:g}"
            raise ValueError(
                f"Invalid state dict: {where} has values outside its range (min {lo_v:g}, max {hi_v:g}"
                f"{'' if finite else ', non-finite values'}); it must be {need}"
            )

    def _check_runtime_state(self, runtime: Mapping[str, Any]) -> None:
        """Validate a state dict's ``zo["runtime"]`` before it is loaded (ValueError)."""
        unknown = set(runtime) - set(self._runtime_state())
        if unknown:
            raise ValueError(
                f"Invalid state dict: zo['runtime'] has unknown entries {sorted(unknown)} for {type(self).__name__} "
                f"(known: {sorted(self._runtime_state())})"
            )
