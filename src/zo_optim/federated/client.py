"""The client side: :class:`FederatedWrapper` turns any zo-optim optimizer into a federated participant.

``handle(task, closure)``:

1. checks the task's contract (protocol version, RNG contract, algorithm, P, τ);
2. catches up: loads the task's snapshot if its position is older than the task's
   entries, then applies the entries it does not have (idempotent); if it still cannot
   reach ``task.round`` it answers ``status="gap"`` with its real position (no crash);
3. runs τ local steps with seeds ``rng.round_seed(server_seed, round, k)``, k = 1..τ:
   ``estimate(closure(step), seed=...)`` → ``take_estimate()``; for τ > 1 each local step is
   applied locally (``apply_update``, HiSo's K frozen) so the next one measures at the
   moved weights, and afterwards weights and optimizer state are copied back from a CPU
   copy taken before step 1 (bit-exact);
4. replies with the τ·P float32 scalars per stream and its position.

Exactness of the scalars' side effects: ``estimate`` with in-place perturbation leaves
float32 weights a few ulp off, so the wrapper either uses transient perturbation
(``exact="transient"``: ``opt.attach(model)``; the stored weights are never perturbed) or
copies the weights back from the CPU copy after the forwards (``exact="restore"``, one
weights-sized CPU buffer, the default when no model is given). Either way a client that
computed is bit-identical to a replica that only replays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import rng
from ..optim.base import ZOOptimizer
from ._contract import contract_mismatches
from ._verify import verified_catch_up
from .chain import ChainError, genesis
from .protocol import Hello, ProtocolError, Reply, Task, Welcome, pack_scalars
from .replica import GapError, Replica, config_digest

__all__ = ["FederatedWrapper", "StepClosure"]

#: ``closure(step) -> loss``: the client's loss on its batch number ``step`` (a client-local counter of local
#: steps). It is called several times per step (one per forward of the estimate) with the same ``step``, and must
#: use the same batch each time.
StepClosure = Callable[[int], Any]

EXACT_MODES = ("transient", "restore")


class FederatedWrapper:
    """A federated participant around ``optimizer``.

    Args:
        optimizer: any zo-optim optimizer (MeZO, ZOAdam, HiZOO, HELENE, HiSo).
        local_steps: τ, local steps per round (must match the server's).
        client_id: this client's id (a uint64; Flower's node id fits).
        model: the model that owns the optimizer's parameters; with it the wrapper uses
            transient perturbation (``opt.attach(model)``) unless ``exact="restore"``.
        exact: ``"transient"`` or ``"restore"`` (see the module docstring); default
            ``"transient"`` when the optimizer is already transient or ``model`` is given.
        extras: optional extra streams to send (HELENE's ``"sq_grad_sum"`` needs per-example losses).
    """

    def __init__(
        self,
        optimizer: ZOOptimizer,
        local_steps: int = 1,
        *,
        client_id: int = 0,
        model: torch.nn.Module | None = None,
        exact: str | None = None,
        extras: Iterable[str] = (),
    ) -> None:
        if exact is None:
            exact = "transient" if (model is not None or optimizer.perturbation == "transient") else "restore"
        if exact not in EXACT_MODES:
            raise ValueError(f"Invalid exact: {exact!r} (choose from 'transient', 'restore')")
        if not isinstance(client_id, int) or isinstance(client_id, bool) or not 0 <= client_id < 2**64:
            raise ValueError(f"Invalid client_id: {client_id!r} (an int in [0, 2**64))")
        if exact == "transient" and optimizer.perturbation != "transient":
            if model is None:
                raise ValueError("exact='transient' needs the model (model=...) or an optimizer already attached")
            optimizer.attach(model)
        self.replica = Replica(optimizer, local_steps=local_steps, extras=extras)
        self.optimizer = optimizer
        self.client_id = client_id
        self.exact = exact
        self.local_step_counter = 0
        #: (round, local_step_counter before it) of the last round computed: a round computed again (its reply was
        #: lost with a server that restarted from an earlier checkpoint) reuses those batches, so its reply is the
        #: one the uninterrupted run sent
        self.last_computed: tuple[int, int] | None = None
        self.gaps = 0
        #: the digest chain at our position (None: unknown, not checked); what each refused task did wrong
        self.chain_digest: bytes | None = None
        self.divergences: list[str] = []

    # ------------------------------------------------------------------ state

    @property
    def local_steps(self) -> int:
        return self.replica.local_steps

    @property
    def position(self) -> int:
        """Rounds applied (0 .. position-1)."""
        return self.replica.position

    def checksum(self) -> str:
        return self.replica.checksum()

    def hello(self) -> Hello:
        """The handshake message announcing this client's contract and the digest of its weights + state.

        The digest (:meth:`Replica.checksum`) hashes every trained weight and state tensor once, on the
        CPU, one tensor at a time (a GPU tensor is copied to the host first), once per client start:
        sha256 hashed 1.6-1.7 GB/s on one core of the 2-core CI machine (a 64 MiB tensor), so the
        cost is the bytes of weights + state over that rate, plus the device-to-host copies.
        """
        opt = self.optimizer
        return Hello(client_id=self.client_id, algorithm=opt.algorithm, rng_version=rng.RNG_VERSION,
                     num_queries=opt.num_queries, local_steps=self.local_steps, config_digest=config_digest(opt),
                     position=self.position, state_digest=self.replica.checksum())

    def welcome(self, msg: Welcome) -> None:
        """Take the server's answer to :meth:`hello`: the server seed and the chain digest at our position; raise
        if refused, or if at position 0 the server's chain does not commit to our initial weights."""
        if not msg.accepted:
            raise ProtocolError(f"the server refused client {self.client_id}: {msg.reason}")
        if msg.chain and self.position == 0:
            ours = genesis(msg.server_seed, config_digest(self.optimizer), self.replica.checksum())
            if ours != msg.chain:
                raise ChainError(f"client {self.client_id}: the server's chain does not commit to our initial weights "
                                 "and configuration: every node must build its model the same way")
        self.replica.server_seed = msg.server_seed
        self.chain_digest = msg.chain or None

    def state_dict(self) -> dict[str, Any]:
        """Position, server seed, counters, weights and optimizer state (for engines that restart clients)."""
        snap = self.replica.snapshot()
        return {"position": self.position, "server_seed": self.replica.server_seed,
                "local_step_counter": self.local_step_counter, "snapshot": snap.payload,
                "chain_digest": self.chain_digest,
                "last_computed": None if self.last_computed is None else list(self.last_computed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; atomic: every key and type is checked, and the snapshot is
        validated by :meth:`Replica.load_snapshot` (itself atomic), before anything is replaced."""
        from .protocol import Snapshot

        if not isinstance(state, dict):
            raise ValueError(f"Invalid state dict: expected FederatedWrapper.state_dict()'s dict, got "
                             f"{type(state).__name__}")
        missing = [k for k in ("position", "server_seed", "local_step_counter", "snapshot") if k not in state]
        if missing:
            raise ValueError(f"Invalid state dict: missing {missing} (expected FederatedWrapper.state_dict()'s keys)")
        position, seed, counter, blob = (state[k] for k in ("position", "server_seed", "local_step_counter",
                                                               "snapshot"))
        for name, v in (("position", position), ("local_step_counter", counter), ("server_seed", seed)):
            if name == "server_seed" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
                raise ValueError(f"Invalid state dict: {name} = {v!r} (an int in [0, 2**64))")
        if not isinstance(blob, bytes):
            raise ValueError(f"Invalid state dict: snapshot is a {type(blob).__name__}, expected bytes")
        digest = state.get("chain_digest")
        if digest is not None and not (isinstance(digest, bytes) and len(digest) == 32):
            raise ValueError(f"Invalid state dict: chain_digest = {digest!r} (32 bytes or None)")
        last = state.get("last_computed")  # absent in state dicts of zo-optim <= 0.2: nothing to reuse
        if last is not None and not (isinstance(last, (list, tuple)) and len(last) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in last)):
            raise ValueError(f"Invalid state dict: last_computed = {last!r} (None or [round, counter], two ints)")
        self.replica.load_snapshot(Snapshot(position, blob))  # validated first; raises before any write
        self.replica.snapshot_loads -= 1  # a restart, not a catch-up
        self.replica.server_seed = seed
        self.local_step_counter = counter
        self.chain_digest = digest
        self.last_computed = None if last is None else (int(last[0]), int(last[1]))

    # ------------------------------------------------------------------ protocol

    def _check_task(self, task: Task) -> None:
        wrong = contract_mismatches(task, self.optimizer, self.local_steps, "ours")
        if task.client_id != self.client_id:
            wrong.append(f"client id {task.client_id} (ours {self.client_id})")
        if wrong:
            raise ProtocolError("task refused: " + "; ".join(wrong))
        if self.replica.server_seed is None:
            self.replica.server_seed = task.server_seed
        elif self.replica.server_seed != task.server_seed:
            raise ProtocolError(f"task from a federation with server seed {task.server_seed}, ours is "
                                f"{self.replica.server_seed}")

    def catch_up(self, task: Task) -> int:
        """Apply the task's snapshot/entries this client misses; returns the position (may fall short: a gap).

        With a chain (every task of :class:`Server`), what is applied is verified (:mod:`.chain`); on a mismatch
        the client is reverted to where it was and :class:`ChainError` is raised (:meth:`handle` answers
        ``"diverged"``).
        """
        self._check_task(task)
        rep = self.replica
        # a snapshot is loaded when the client is older than the task's log, or when it comes alone (the
        # server's answer to "diverged": whatever the client holds, it is replaced by the server's state)
        use_snapshot = (task.snapshot is not None and task.snapshot.position <= task.round
                        and (rep.position < task.log_start or not task.entries))
        if task.chain:
            return verified_catch_up(self, task, use_snapshot)
        if use_snapshot:
            assert task.snapshot is not None
            rep.load_snapshot(task.snapshot)
        entries = [e for e in task.entries if e.round >= rep.position]
        if entries and entries[0].round == rep.position:
            try:
                rep.apply_all(entries)
            except GapError:  # entries not consecutive: stop where we are and report it
                pass
        return rep.position

    def _reply(self, task: Task, status: str, **kw: Any) -> Reply:
        return Reply(round=task.round, client_id=self.client_id, status=status, position=self.position,
                     algorithm=self.optimizer.algorithm, rng_version=rng.RNG_VERSION, **kw)

    def handle(self, task: Task, closure: StepClosure | None = None, *, n_examples: int = 1) -> Reply:
        """Catch up, run the round's τ local steps, and reply (see the module docstring).

        ``closure(step)`` returns the loss on batch ``step`` (not needed when ``task.compute`` is False).
        """
        try:
            position = self.catch_up(task)
        except ChainError as e:  # reverted: ask for a fresh snapshot, never train on a divergent replica
            self.divergences.append(str(e))
            return self._reply(task, "diverged")
        if position != task.round:
            self.gaps += 1
            return self._reply(task, "gap")
        if not task.compute:
            return self._reply(task, "synced")
        if closure is None:
            raise TypeError("handle(task, closure) needs closure(step) -> loss to compute the round's scalars")
        if not isinstance(n_examples, int) or isinstance(n_examples, bool) or n_examples < 1:
            raise ValueError(f"Invalid n_examples: {n_examples!r} (a positive int)")
        grads, extras, losses = self.compute(task.round, closure, streams=tuple(task.streams.split(","))
                                             if task.streams else ())
        return self._reply(task, "ok", n_examples=n_examples, loss=float(sum(losses) / len(losses)),
                           scalars=pack_scalars(grads), extras=tuple((n, pack_scalars(v)) for n, v in extras.items()))

    def compute(
        self, round_idx: int, closure: StepClosure, *, streams: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
        """τ local steps of round ``round_idx`` at the current position; weights and state end where they began.

        Returns (g [τ·P] float32, extras {name: [τ·P]}, per-step losses).
        """
        rep, opt = self.replica, self.optimizer
        streams = rep.streams if streams is None else tuple(s for s in streams if s)
        tau = self.local_steps
        if self.last_computed is not None and self.last_computed[0] == round_idx == rep.position:
            # this round again, from the same position: its first reply never closed a round (the server restarted
            # from a checkpoint before it): the same batches, so the same reply as the uninterrupted run
            self.local_step_counter = self.last_computed[1]
        self.last_computed = (round_idx, self.local_step_counter)
        need_copy = tau > 1 or self.exact == "restore"
        saved = rep.save_local() if need_copy else None
        has_k = opt.can_freeze_precond
        user_freeze = bool(getattr(opt, "freeze_precond", False))
        grads: list[torch.Tensor] = []
        extras: dict[str, list[torch.Tensor]] = {n: [] for n in streams}
        losses: list[float] = []
        try:
            if has_k:
                opt.freeze_precond = True  # K stays frozen within a round (HiSo)
            for k in range(1, tau + 1):
                step = self.local_step_counter
                seed = rep.seed(round_idx, k)
                loss = opt.estimate(lambda step=step: closure(step), seed=seed)
                self.local_step_counter += 1
                _, g, ex = opt.take_estimate()
                missing = [n for n in streams if n not in ex]
                if missing:
                    raise ValueError(f"the estimate has no extra scalars {missing} (HELENE's 'sq_grad_sum' needs "
                                     "the closure to return per-example losses)")
                grads.append(g.detach().float().cpu())
                for n in streams:
                    extras[n].append(ex[n].detach().float().cpu())
                losses.append(float(loss))
                if k < tau:
                    # the next local step measures at the locally moved weights (K frozen)
                    opt.apply_update(seed, g, **{n: ex[n] for n in ex if n in opt.extra_scalars})
        finally:
            if saved is not None:
                rep.revert_local(saved)
            if has_k:
                opt.freeze_precond = user_freeze
        # non-finite scalars are sent as they are: the server refuses them (and says why)
        return torch.cat(grads), {n: torch.cat(v) for n, v in extras.items()}, losses
