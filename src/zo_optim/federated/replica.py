"""A replica: an optimizer (and its parameters) that applies log entries exactly.

Applying round ``r`` = for local step k = 1..τ: ``opt.apply_update(round_seed(s, r, k),
ĝ[k], **extras[k])`` with the aggregated float32 scalars. For HiSo the preconditioner K is
frozen for steps 1..τ−1 and updated on step τ, inside the same fused pass and after the
weights (the op reads the old K for the directions and the model update, then writes K):
"model update first, then K", once per round, from the round's last aggregated ĝ.

Every replica that applied the same entries from the same start holds bit-identical
weights and optimizer state (same device kind and backend). Entries are applied
idempotently: an entry the replica already has is skipped, one beyond its position raises
:class:`GapError` (carrying the real position, which a client reports instead of crashing).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .. import rng
from ..optim.base import ZOOptimizer
from .protocol import ProtocolError, RoundEntry, Snapshot, contract_digest, unpack_scalars

__all__ = ["GapError", "LocalState", "Replica", "config_digest", "extra_streams"]


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s bytes to ``h`` through the buffer protocol: no bytes copy of the tensor (``tobytes()``
    made one and halved sha256's throughput: 0.8 vs 1.6-1.7 GB/s on a 64 MiB tensor, idle 2-core CI machine)."""
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class GapError(RuntimeError):
    """An entry (or task) starts beyond this replica's position; ``position`` is where it really is."""

    def __init__(self, position: int, needed: int) -> None:
        super().__init__(f"replica is at position {position} but the next entry is round {needed}: rounds "
                         f"{position}..{needed - 1} are missing (send them, or a snapshot)")
        self.position = position
        self.needed = needed


def extra_streams(optimizer: ZOOptimizer, optional: Iterable[str] = ()) -> tuple[str, ...]:
    """The extra scalar streams a round of this optimizer carries: required extras + the chosen optional ones."""
    optional = tuple(optional)
    unknown = [n for n in optional if n not in optimizer.extra_scalars]
    if unknown:
        raise ValueError(f"Invalid extras: {unknown} ({optimizer.algorithm} has extra scalars "
                         f"{sorted(optimizer.extra_scalars)})")
    return tuple(sorted({n for n, req in optimizer.extra_scalars.items() if req} | set(optional)))


def _plain(value: Any) -> Any:
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        # a NumPy scalar steps like the Python scalar it equals, so it must digest like it: json would write
        # np.int64(3) through default=str as the string "3" and refuse a replica built with the int 3
        return value.item()
    return value


def config_digest(optimizer: ZOOptimizer) -> str:
    """sha256 (hex, 16 chars) of what every replica must share: algorithm, settings, hyper-parameters, shapes."""
    groups = [
        {k: _plain(v) for k, v in sorted(g.items()) if k not in ("params", "param_names")}
        for g in optimizer.param_groups
    ]
    shapes = [[list(p.shape), str(p.dtype), bool(p.requires_grad)] for g in optimizer.param_groups for p in g["params"]]
    desc = {
        "algorithm": optimizer.algorithm,
        "rng": rng.RNG_VERSION,
        "num_queries": optimizer.num_queries,
        "estimator": optimizer.estimator,
        "distribution": optimizer.distribution,
        "zo_eps": optimizer.zo_eps,
        "maximize": optimizer.maximize,
        "rounding": optimizer.rounding,
        "settings": _plain(optimizer._settings()),
        "groups": groups,
        "shapes": shapes,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LocalState:
    """CPU copy of the weights and optimizer state, taken before local steps and copied back after."""

    params: list[torch.Tensor]
    optimizer: dict[str, Any]


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(v) for v in obj)
    return copy.copy(obj)


class Replica:
    """An optimizer's parameters and state, moved only by log entries.

    Args:
        optimizer: any zo-optim optimizer (its parameters are the replica's weights).
        local_steps: τ, local steps per round (every entry holds τ·P scalars per stream).
        server_seed: the seed of the federation (``None``: set by the first task).
        extras: optional extra streams to carry (e.g. HELENE's ``"sq_grad_sum"``).
    """

    def __init__(
        self,
        optimizer: ZOOptimizer,
        *,
        local_steps: int = 1,
        server_seed: int | None = None,
        extras: Iterable[str] = (),
    ) -> None:
        if not isinstance(optimizer, ZOOptimizer):
            raise TypeError(f"a replica needs a zo-optim optimizer, got {type(optimizer).__name__}")
        if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 1:
            raise ValueError(f"Invalid local_steps: {local_steps!r} (an int >= 1)")
        if getattr(optimizer, "k_interval", 1) != 1:
            raise ValueError(
                f"Invalid k_interval: {optimizer.k_interval} — federated rounds update K once per round (after the "
                "round's model update); construct the optimizer with k_interval=1"
            )
        self.optimizer = optimizer
        # Federated steps use explicit round seeds, so the base seed never matters; and under an initialised
        # torch.distributed group (the distributed engine) the ranks are NOT data-parallel replicas of one step:
        # the optimizer's first-estimate seed broadcast would be a collective only the sampled clients enter
        # (a hang). data_parallel = False keeps it out of every collective.
        optimizer.data_parallel = False
        contract_digest(optimizer.algorithm, rng.RNG_VERSION)  # so replies of a custom algorithm decode here
        self.local_steps = local_steps
        self.server_seed = server_seed
        self.streams = extra_streams(optimizer, extras)
        self.position = 0
        self.snapshot_loads = 0
        self.applied_rounds = 0
        # the user's own K freeze (HiSo): when set, K never moves, in local steps or rounds
        self._user_freeze = bool(getattr(optimizer, "freeze_precond", False))

    # ------------------------------------------------------------------ shape of a round

    @property
    def num_values(self) -> int:
        """Scalars per stream per round: τ·P."""
        return self.local_steps * self.optimizer.num_queries

    def seed(self, round_idx: int, local_step: int) -> int:
        if self.server_seed is None:
            raise RuntimeError("the replica has no server seed yet (it comes with the first task or the handshake)")
        return rng.round_seed(self.server_seed, round_idx, local_step)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ applying rounds

    def _unpack(self, entry: RoundEntry) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tau, q = self.local_steps, self.optimizer.num_queries
        grads = unpack_scalars(entry.scalars)
        if grads.numel() != tau * q:
            raise ProtocolError(f"round {entry.round}: {grads.numel()} scalars, expected τ·P = {tau}·{q}")
        extras = dict(entry.extras)
        if tuple(sorted(extras)) != self.streams:
            raise ProtocolError(f"round {entry.round}: extra streams {sorted(extras)}, expected {list(self.streams)}")
        ex = {n: unpack_scalars(b) for n, b in extras.items()}
        for n, v in ex.items():
            if v.numel() != tau * q:
                raise ProtocolError(f"round {entry.round}: stream {n!r} has {v.numel()} values, expected {tau * q}")
        return grads.reshape(tau, q), {n: v.reshape(tau, q) for n, v in ex.items()}

    def apply_steps(self, round_idx: int, grads: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        """Apply the τ steps of round ``round_idx`` from [τ, P] scalars (K updated on the last step only)."""
        opt = self.optimizer
        has_k = opt.can_freeze_precond
        tau = grads.shape[0]
        try:
            for k in range(1, tau + 1):
                if has_k:
                    opt.freeze_precond = self._user_freeze or k < tau
                opt.apply_update(self.seed(round_idx, k), grads[k - 1], **{n: v[k - 1] for n, v in extras.items()})
        finally:
            if has_k:
                opt.freeze_precond = self._user_freeze

    def apply(self, entry: RoundEntry) -> bool:
        """Apply one entry: True if applied, False if the replica already had it; GapError if it skips rounds."""
        if entry.round < self.position:
            return False
        if entry.round > self.position:
            raise GapError(self.position, entry.round)
        if not entry.empty:
            grads, extras = self._unpack(entry)
            self.apply_steps(entry.round, grads, extras)
            self.applied_rounds += 1
        self.position += 1
        return True

    def apply_all(self, entries: Iterable[RoundEntry]) -> int:
        """Apply consecutive entries idempotently; returns how many were new."""
        return sum(self.apply(e) for e in entries)

    # ------------------------------------------------------------------ snapshots and local state

    def snapshot(self) -> Snapshot:
        """Weights + optimizer state at the current position (a ``weights_only`` torch.save blob)."""
        buf = io.BytesIO()
        torch.save({"position": self.position, "params": [p.detach().cpu() for p in self._params()],
                    "optimizer": self.optimizer.state_dict()}, buf)
        return Snapshot(self.position, buf.getvalue())

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Replace weights and optimizer state with the snapshot's (which must come from the same configuration)."""
        try:
            data = torch.load(io.BytesIO(snapshot.payload), weights_only=True, map_location="cpu")
            weights, state, position = data["params"], data["optimizer"], data["position"]
        except Exception as e:  # a corrupt blob: torch.load's own error types vary (pickle, zip, KeyError)
            raise ProtocolError(f"snapshot payload is not a snapshot ({type(e).__name__}: {e})") from e
        params = self._params()
        if len(weights) != len(params) or position != snapshot.position:
            raise ProtocolError(f"snapshot holds {len(weights)} parameters at position {position}, this replica has "
                                f"{len(params)} (task says position {snapshot.position})")
        for p, v in zip(params, weights, strict=True):
            if not isinstance(v, torch.Tensor) or v.shape != p.shape or v.dtype != p.dtype:
                raise ProtocolError(f"snapshot parameter {getattr(v, 'shape', v)!r}/{getattr(v, 'dtype', '')}, "
                                    f"expected {tuple(p.shape)}/{p.dtype}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ProtocolError("snapshot parameter holds non-finite values")
        # the optimizer state first: its load is validated and atomic, so a refused snapshot changes nothing
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, TypeError, KeyError) as e:
            raise ProtocolError(f"snapshot optimizer state refused: {e}") from e
        with torch.no_grad():
            for p, v in zip(params, weights, strict=True):
                p.copy_(v)
        self._user_freeze = bool(getattr(self.optimizer, "freeze_precond", False))
        self.position = snapshot.position
        self.snapshot_loads += 1

    def save_local(self) -> LocalState:
        """Copy weights and optimizer state to the CPU (before local steps that will be reverted)."""
        return LocalState([p.detach().to("cpu", copy=True) for p in self._params()],
                          _cpu_copy(self.optimizer.state_dict()))

    def revert_local(self, state: LocalState) -> None:
        """Copy back what :meth:`save_local` took: bit-exact (copies, no arithmetic)."""
        with torch.no_grad():
            for p, v in zip(self._params(), state.params, strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(state.optimizer)

    def checksum(self) -> str:
        """sha256 of the weights' bytes, the optimizer state tensors, the hyper-parameters (:func:`config_digest`:
        a snapshot with another lr is another state), the step counter and the position."""
        h = hashlib.sha256()
        h.update(f"{self.position}/{self.optimizer.step_count}/{self.optimizer.skipped_steps}/"
                 f"{config_digest(self.optimizer)}".encode())
        for p in self._params():
            _hash_tensor(h, p)
        # the state as state_dict() presents it (index -> buffers), not optimizer.state: state_dict() creates
        # lazily allocated buffers (ZO-Adam's zero moments), so a replica that was snapshotted and one that never
        # was hash alike; found when the handshake's state digest refused every Flower node (they save a snapshot
        # before their hello)
        state = self.optimizer.state_dict()["state"]
        for i in sorted(state):
            for name, v in sorted(state[i].items()):
                if isinstance(v, torch.Tensor):
                    h.update(f"{i}.{name}".encode())
                    _hash_tensor(h, v)
        return h.hexdigest()
