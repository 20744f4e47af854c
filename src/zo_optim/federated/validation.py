"""What a reply and a round mean, checked before they reach the server's state.

Three layers, each refusing with a reason:

* :func:`mistyped`: a :class:`Reply` object built in process with a field of the wrong type (a decoded reply
  never has one: :func:`~zo_optim.federated.decode` checks the types).
* :func:`semantic_error`: finite, in-range scalars that still cannot be true, by the optimizer class's own
  rules (``ZOOptimizer._check_scalars``, the check ``apply_update`` runs before it writes): HiZOO's curvature
  ``|L+ + L- - 2 L0| / (2 eps^2)`` and HELENE's ``sq_grad_sum`` (a sum of squares) are >= 0. The server runs
  it on every reply, one local step at a time, so a reply the server's own replica would refuse to apply
  never reaches the aggregate.
* :func:`state_error`: the state after a round is applied must be one the optimizer's own loader accepts
  (finite weights; every buffer finite and in its range, ``_check_state_buffer``: the preconditioner > 0,
  HELENE's hessian >= 0). The server applies each aggregate on its replica under this check and refuses
  the round (reverting the replica) if it fails, so its snapshots stay loadable and ``close_round`` never
  gets stuck.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..optim.base import ZOOptimizer
from .protocol import Reply, RoundEntry
from .replica import Replica

__all__ = ["apply_checked", "mistyped", "reply_error", "semantic_error", "state_error"]


def mistyped(reply: Reply) -> str:
    """What in a Reply object has the wrong type, or ``""``."""
    for name in ("round", "client_id", "position", "n_examples", "version"):
        v = getattr(reply, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
            return f"reply field {name!r} = {v!r} is not a uint64"
    for name in ("status", "algorithm", "rng_version"):
        if not isinstance(getattr(reply, name), str):
            return f"reply field {name!r} is a {type(getattr(reply, name)).__name__}, not a str"
    if not isinstance(reply.loss, (int, float)) or isinstance(reply.loss, bool):
        return f"reply field 'loss' is a {type(reply.loss).__name__}, not a float"
    if not isinstance(reply.scalars, bytes):
        return f"reply field 'scalars' is a {type(reply.scalars).__name__}, not bytes"
    if not isinstance(reply.extras, tuple) or not all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], bytes)
            for x in reply.extras):
        return "reply field 'extras' is not a tuple of (name, bytes) pairs"
    return ""


def semantic_error(optimizer: ZOOptimizer, scalars: bytes, extras: dict[str, bytes], local_steps: int) -> str:
    """The optimizer class's objection to these τ·P scalars (and extra streams), or ``""``.

    The shapes were checked before (τ·P float32 values per stream).
    """
    tau = local_steps
    g = torch.from_numpy(np.frombuffer(scalars, dtype="<f4").copy()).reshape(tau, -1)
    ex = {n: torch.from_numpy(np.frombuffer(b, dtype="<f4").copy()).reshape(tau, -1) for n, b in extras.items()}
    for k in range(tau):
        try:
            optimizer._check_scalars(g[k], {n: v[k] for n, v in ex.items()})
        except ValueError as e:
            return f"local step {k + 1}: {e}"
    return ""


def state_error(optimizer: ZOOptimizer) -> str:
    """Why the optimizer's weights or state are not a state its own ``load_state_dict`` would accept, or ``""``."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                return f"parameter {pi} of group {gi} holds non-finite values"
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    try:
                        optimizer._check_state_buffer(f"state {name!r} of parameter {pi} (group {gi})", name, v)
                    except ValueError as e:
                        return str(e)
    return ""


def reply_error(reply: Reply, round_idx: int, replica: Replica, streams: tuple[str, ...], max_examples: int,
                max_abs_scalar: float) -> tuple[str, int, str] | None:
    """(reason, client, detail) for an answered reply of the open round that may not reach the aggregate, or None.

    Checked in order: status, position, n_examples, shape, finiteness, the |scalar| bound, then what the
    scalars mean (:func:`semantic_error`).
    """
    c = reply.client_id
    if reply.status != "ok":
        return "status", c, repr(reply.status)
    if reply.position != round_idx:
        return "position", c, f"measured at position {reply.position}, round {round_idx}"
    if not 1 <= reply.n_examples <= max_examples:
        return "n_examples", c, f"{reply.n_examples}"
    n = replica.num_values
    names = tuple(name for name, _ in reply.extras)
    if len(reply.scalars) != 4 * n or names != streams or any(len(b) != 4 * n for _, b in reply.extras):
        return "shape", c, (f"{len(reply.scalars)} B of scalars, extras {list(names)}; expected {4 * n} B and "
                            f"{list(streams)}")
    values = np.frombuffer(reply.scalars + b"".join(b for _, b in reply.extras), dtype="<f4")
    if not (np.isfinite(values).all() and math.isfinite(reply.loss)):
        return "nonfinite", c, ""
    if values.size and float(np.abs(values).max()) > max_abs_scalar:
        return "too_large", c, f"|scalar| {float(np.abs(values).max()):.3g} > {max_abs_scalar}"
    wrong = semantic_error(replica.optimizer, reply.scalars, dict(reply.extras), replica.local_steps)
    if wrong:
        return "invalid", c, wrong
    return None


def apply_checked(replica: Replica, entry: RoundEntry) -> str:
    """Apply ``entry`` on ``replica`` if the result is a state its optimizer would itself accept; otherwise revert
    (bit-exact, from a CPU copy taken first) and return why (``""``: applied).

    Each reply was checked on its own (:func:`semantic_error`); this catches what only their aggregate or the
    accumulated state can break (weights overflowing to inf, a buffer leaving its range). The copy costs one
    weights + state sized CPU buffer per round on the server.
    """
    if entry.empty:
        replica.apply(entry)
        return ""
    saved, applied = replica.save_local(), replica.applied_rounds
    try:
        replica.apply(entry)
        why = state_error(replica.optimizer)
    except ValueError as e:  # the optimizer's own refusal of the aggregated scalars: nothing was applied
        why = str(e)
    if why:
        replica.revert_local(saved)
        replica.position, replica.applied_rounds = entry.round, applied
    return why
