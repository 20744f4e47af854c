r"""Where the perturbed weights live during the forwards of a ZO step.

Two modes, chosen with ``perturbation=`` on every optimizer:

``"inplace"`` (default)
    The stored weights are moved to :math:`\theta + s\,u_k` by in-place passes
    (``ops.perturb_``) and the last offset is undone inside the fused update
    pass. No extra memory. For float32 weights the ±ε round trip is exact to a
    few ulp; for bfloat16/float16 it is not (each pass rounds), so the weights
    drift by about one ulp per step even with lr = 0 (measured in
    ``tests/test_optim_lowprec.py``, figures in ``docs/optimizers.md``).

``"transient"`` (with ``opt.attach(model)``)
    The stored weights are never perturbed. A forward pre-hook on every module
    that directly owns optimised parameters backs up that module's parameters
    (one module's worth of extra memory), perturbs them in place for the
    duration of the module's forward, and the forward hook (``always_call``, so
    it also runs when the forward raises) copies the backup back. The restore
    is a copy, so it is exact in every dtype: with lr = 0 the weights stay
    bit-identical. We back up and copy back (instead of swapping ``param.data``
    for a perturbed copy) so that anything holding a pointer to the parameter
    storage (tied weights, compiled graphs, cached views) keeps working.
    Limitation: a parameter must be used inside the forward of a module that
    owns it (registered it); a module that returns a view of its own parameter
    hands the restored values to its caller. A parameter read elsewhere
    (``nn.MultiheadAttention`` reads ``out_proj.weight`` in its own forward; a
    tied output layer ``F.linear(h, emb.weight)``; a regulariser in the
    closure) would be seen unperturbed, so its share of the estimate would
    silently be zero: the first estimate after :meth:`attach` watches every
    torch call of the forwards (a ``TorchFunctionMode``) and refuses such a use.

The two modes are collaborators of the optimizer (each owns its offset, hooks and pass count);
:class:`PerturbationModes` is the private mixin of :class:`~.base.ZOOptimizer` that switches
between them (``attach``/``detach``) and brings deferred offsets back (``restore_weights``): it
needs the optimizer's call guard and trainable parameters, so it is a mixin, not a collaborator.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..ops import _sharding

# perturb(params, seed, query, scale): θ ← θ + scale·u_query for those params (the optimizer knows ids/preconditioner).
PerturbFn = Callable[[list[torch.Tensor] | None, int, int, float], None]


class InPlacePerturbation:
    """Tracks the current offset ``scale·u_query`` of the stored weights and moves it."""

    mode = "inplace"

    def __init__(self, perturb: PerturbFn) -> None:
        self._perturb = perturb
        self.seed = 0
        self.query = 0
        self.scale = 0.0
        self.passes = 0  # perturbation passes run in the current step (for tests and docs)

    def move_to(self, seed: int, query: int, scale: float) -> None:
        """Make the weights θ + scale·u_query (θ = unperturbed weights)."""
        if self.scale != 0.0 and (query != self.query or seed != self.seed):
            self._perturb(None, self.seed, self.query, -self.scale)
            self.passes += 1
            self.scale = 0.0
        self.seed, self.query = seed, query
        delta = scale - self.scale
        if delta != 0.0:
            self._perturb(None, seed, query, delta)
            self.passes += 1
            self.scale = scale

    def restore(self) -> None:
        """Undo any offset with one explicit pass (used on errors, skips and after ``estimate``)."""
        if self.scale != 0.0:
            self.move_to(self.seed, self.query, 0.0)

    def pending_restore(self) -> tuple[float, int]:
        """(restore_scale, restore_query) for the fused update op."""
        return -self.scale, self.query

    def mark_restored(self) -> None:
        """The fused update pass has undone the offset."""
        self.scale = 0.0


# calls that read only a tensor's metadata, never its values: not a use of the values
_METADATA_CALLS = frozenset({
    "numel", "nelement", "dim", "ndimension", "size", "stride", "storage_offset", "is_contiguous", "data_ptr",
    "element_size", "is_floating_point", "is_complex", "is_inference", "get_device", "untyped_storage",
    "__len__", "__hash__", "__repr__", "__format__", "__str__", "requires_grad_", "type", "is_shared", "is_pinned",
})
# properties whose value is a view of the values (every other property, .dtype/.shape/.data/..., is metadata)
_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


def _reads_values(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") in _VALUE_PROPERTIES
    return name not in _METADATA_CALLS


def _call_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return "." + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


class _UseWatch(TorchFunctionMode):
    """Records optimised parameters passed to a torch call while they are not perturbed (outside their owner)."""

    def __init__(self, owner: TransientPerturbation, watched: set[int]) -> None:
        super().__init__()
        self.owner = owner
        self.watched = watched

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        o = self.owner
        out = func(*args, **kwargs)
        # only a call whose result is a tensor can carry the values into the loss (torch.equal(w, ref) in a
        # debugging hook returns a bool and is not a use)
        if not o._in_hook and o.scale != 0.0 and _reads_values(func) and any(
            isinstance(r, torch.Tensor) for r in tree_leaves(out)
        ):
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor) and id(a) in self.watched and id(a) not in o._active:
                    o.unperturbed_uses.setdefault(id(a), _call_name(func))
        return out


class TransientPerturbation:
    """Perturb one module at a time from forward hooks; the stored weights are never perturbed."""

    mode = "transient"

    def __init__(self, perturb: PerturbFn, is_optimised: Callable[[torch.Tensor], bool]) -> None:
        self._perturb = perturb
        self._is_optimised = is_optimised
        self.seed = 0
        self.query = 0
        self.scale = 0.0
        self.passes = 0
        self._backups: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._handles: list[Any] = []
        self.attached = False
        # ids of the parameters perturbed right now (inside their owner's forward)
        self._active: set[int] = set()
        self._in_hook = False
        # whether the forwards of an estimate were watched for uses of unperturbed parameters since attach()
        self.checked = False
        self.unperturbed_uses: dict[int, str] = {}  # id(param) -> the torch call that read it unperturbed
        self._pre_impl: Callable[..., None] = self._pre
        self._post_impl: Callable[..., None] = self._post
        self._compile_safe = False

    def __deepcopy__(self, memo: dict[int, Any]) -> TransientPerturbation:
        # copy.deepcopy(model) copies the model's hooks, which are bound methods of this object: the copy's
        # hooks stay this object (inert there: none of the copy's parameters is optimised, so none is
        # perturbed) instead of dragging a copy of the optimizer, which cannot be copied, along
        return self

    def attach(self, modules: Iterable[torch.nn.Module]) -> None:
        for mod in modules:
            if not any(p is not None for p in mod._parameters.values()):
                continue
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook))
            self._handles.append(mod.register_forward_hook(self._post_hook, always_call=True))
        self.attached = True
        self.checked = False
        self.make_compile_safe()

    # The registered hooks are trampolines to ``_pre_impl``/``_post_impl``: once torch.compile is in use those
    # become ``torch.compiler.disable`` versions, so that Dynamo, which inlines module hooks into a compiled
    # forward, graph-breaks around them instead of tracing the perturbation (the ops' checks, the Python dicts of
    # backups), which it cannot: they run eagerly, as without compile, and change the parameters' storage in
    # place, where the compiled graphs read it. Swapped in lazily because torch.compiler.disable imports
    # torch._dynamo (and Triton), which ``import zo_optim`` must not (tests/test_ops.py); torch.optim.Optimizer
    # imports it when an optimizer is built, so in practice attach() already finds it.
    def _pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        return self._pre_impl(module, args)

    def _post_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        return self._post_impl(module, args, output)

    def make_compile_safe(self) -> None:
        """Exclude the hooks and the use watch from Dynamo if torch.compile is in use (``torch._dynamo`` imported;
        ``torch.compile(model)`` imports it when called, so before the estimate whose closure runs the model)."""
        if self._compile_safe or "torch._dynamo" not in sys.modules:
            return
        self._pre_impl = torch.compiler.disable(self._pre)
        self._post_impl = torch.compiler.disable(self._post)
        if not getattr(_UseWatch, "compile_safe", False):
            _UseWatch.__torch_function__ = torch.compiler.disable(_UseWatch.__torch_function__)
            _UseWatch.compile_safe = True
        self._compile_safe = True

    @contextlib.contextmanager
    def watch(self, watched: set[int]) -> Iterator[None]:
        """Record (in ``unperturbed_uses``) the watched parameters a torch call reads while they are unperturbed."""
        self.unperturbed_uses = {}
        with _UseWatch(self, watched):
            yield

    def detach(self) -> None:
        self.restore()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.attached = False

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if self.scale == 0.0 or id(module) in self._backups:
            return
        # a Parameter registered on a module and on one of its descendants is already perturbed
        # (and backed up) by the outer module: perturbing it again would apply the offset twice
        active = {id(p) for ps, _ in self._backups.values() for p in ps}
        params = [
            p for p in module._parameters.values() if p is not None and self._is_optimised(p) and id(p) not in active
        ]
        if not params:
            return
        self._in_hook = True
        try:
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                self._backups[id(module)] = (params, backup)
                self._perturb(params, self.seed, self.query, self.scale)
                self._active.update(map(id, params))
        finally:
            self._in_hook = False
        self.passes += 1

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # copy back, then forget the backup: an interrupt in between leaves it for restore() (copying twice is
        # harmless; forgetting first could lose it). The pre-hook likewise records the backup before perturbing.
        entry = self._backups.get(id(module))
        if entry is not None:
            self._in_hook = True
            try:
                with torch.no_grad():
                    for p, b in zip(*entry, strict=True):
                        p.copy_(b)
                self._backups.pop(id(module), None)
                self._active.difference_update(map(id, entry[0]))
            finally:
                self._in_hook = False

    def move_to(self, seed: int, query: int, scale: float) -> None:
        self.seed, self.query, self.scale = seed, query, scale

    def restore(self) -> None:
        self.scale = 0.0
        for mid in list(self._backups):
            params, backup = self._backups[mid]
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)
            del self._backups[mid]  # after the copy (see _post)
            self._active.difference_update(map(id, params))

    def pending_restore(self) -> tuple[float, int]:
        return 0.0, 0

    def forget(self) -> None:
        """Drop the backups and offset without copying back (the weights are being reloaded from a checkpoint)."""
        self.scale = 0.0
        self._backups.clear()
        self._active.clear()

    def mark_restored(self) -> None:
        self.scale = 0.0


class PerturbationModes:
    """``attach``/``detach`` and the in-place offset's public view (mixed into :class:`~.base.ZOOptimizer`)."""

    @property
    def perturbation(self) -> str:
        return self._perturbation.mode

    def attach(self, module: torch.nn.Module, *, check_uses: bool = True) -> None:
        """Switch to ``perturbation="transient"``: perturb ``module``'s sub-modules one at a time from hooks.

        Every optimised parameter must be registered on a module inside ``module``, and must be
        read only inside the forward of a module that registers it (there it is perturbed): with
        ``check_uses=True`` the first estimate after this call watches the forwards' torch calls
        and raises ``ValueError`` (weights untouched, no estimate recorded) when one reads an
        optimised parameter elsewhere, e.g. ``nn.MultiheadAttention``'s ``out_proj.weight`` or a
        tied ``F.linear(h, emb.weight)``, whose share of the estimate would silently be zero.
        ``check_uses=False`` skips the check (a hook that only logs a parameter's values).
        """
        sharded = [i for i, p in enumerate(self._trainable()) if _sharding.is_dtensor(p)]
        if sharded:
            # FSDP2 all-gathers a module's shards into fresh unsharded tensors for its forward (and prefetches
            # the next module's): per-module hooks would perturb shards the forward never reads
            raise ValueError(
                f"perturbation='transient' does not support sharded (DTensor, FSDP2) parameters (trainable "
                f"positions {sharded[:5]}): FSDP2's forward runs on all-gathered copies, not on the shards the "
                "hooks would perturb. Use perturbation='inplace' (the default; exact for float32 weights)"
            )
        # not while a step is in flight (from a closure): switching modes would strand its perturbation
        with self._guard.exclusive("attach"):
            self._attach(module, check_uses)

    def _attach(self, module: torch.nn.Module, check_uses: bool) -> None:
        owned = {id(p) for m in module.modules() for p in m._parameters.values() if p is not None}
        missing = [i for i, p in enumerate(self._trainable()) if id(p) not in owned]
        if missing:
            raise ValueError(
                f"{len(missing)} optimised parameters (trainable positions {missing[:5]}) are not registered "
                "on any sub-module of the attached module; attach the model that owns all of them"
            )
        self._inplace.restore()  # an estimate(..., restore=False) offset belongs to the in-place mode
        if self._transient.attached:
            self._transient.detach()
        self._transient_names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        self._transient.attach(module.modules())
        self._transient.checked = not check_uses
        self._attached = (module, check_uses)
        self._perturbation = self._transient

    def _reattach(self) -> None:
        """After ``add_param_group`` in transient mode: the attach checks again, over the new parameters too.

        They must be registered on the attached model, the modules added to it since :meth:`attach` get their
        hooks, and the next estimate watches the forwards again (a new parameter read outside its module).
        Without this a parameter of a module added later was never perturbed but was updated.
        """
        module, check_uses = self._attached
        self._attach(module, check_uses)

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` and return to in-place perturbation."""
        with self._guard.exclusive("detach"):
            self._inplace.restore()
            self._transient.detach()
            self._perturbation = self._inplace

    @property
    def weights_perturbed(self) -> bool:
        """Whether the stored weights are off θ now (after ``estimate(..., restore=False)``, before ``step()``)."""
        return self._inplace.scale != 0.0

    def restore_weights(self) -> None:
        """Bring the weights back to θ if ``estimate(..., restore=False)`` left them perturbed (else nothing).

        One pass over the trainable weights; the pending estimate is kept, and ``step()``
        then applies it with a separate update pass. Call it before reading or saving the
        weights between a deferred-restore estimate and ``step()``.
        """
        with self._guard.exclusive("restore_weights"):
            self._inplace.restore()
