"""The ``encoder`` task of ``zo-optim bench federated``: the convergence bench's encoder problem, federated.

The problem is :mod:`zo_optim.bench.encoder`'s: MiniLM's last encoder layer + pooler + classifier
(20 tensors, 1.93 M parameters) on the class-balanced tweets, the frozen prefix's outputs (the token
states entering layer 5 and the attention masks) cached once by ``encoder._features`` and the
logits computed by :func:`~zo_optim.bench.encoder.head_logits` — so a federated run optimises
exactly the function the convergence bench does, from the same initial weights (``problem_seed``
fixes the randomly initialised classifier; the run's seed does not change them).

The training pool is split among the clients as the head task's is
(:func:`zo_optim.apps.tweets.split_clients`: Dirichlet(α) class shares, at least ``batch_size // 4``
examples each) and a client's batch number s is :func:`zo_optim.apps.tweets.client_batch_index` —
the same examples on every engine, so replicas stay bit-identical. The seed of :meth:`EncoderTask.resplit`
picks the split and the batch orders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..apps.tweets import client_batch_index, split_clients
from . import encoder as E

__all__ = ["EncoderModel", "EncoderTask", "build_encoder_task"]

EVAL_CHUNK = 256  # held-out examples per forward: bounds the [B, T, 384] key/value activations


class EncoderModel(torch.nn.Module):
    """The 20 trainable tensors (in :func:`~zo_optim.bench.encoder.trainable`'s order) and their forward.

    ``forward(h, mask)`` takes the cached layer-5 inputs ``h`` [B, T, 384] and masks [B, T] and returns
    the logits [B, 2] (eval mode: no dropout, so every replica computes the same numbers). The tensors
    are registered on this module itself (``bert_encoder_layer_5_attention_self_query_weight``, ...), not
    in a ParameterList: the optimizers' default transient perturbation applies a parameter's perturbation
    inside the forward of the module that registers it, and this forward is the one that reads them.
    """

    def __init__(self, tensors: list[torch.Tensor], names: list[str], heads: int, eps: float):
        super().__init__()
        self._order = [n.replace(".", "_") for n in names]
        for n, t in zip(self._order, tensors, strict=True):
            self.register_parameter(n, torch.nn.Parameter(t.detach().clone()))
        self.heads, self.eps = heads, eps

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return E.head_logits(h, mask, [getattr(self, n) for n in self._order], self.heads, self.eps)


@dataclass
class EncoderTask:
    """Cached layer-5 inputs, labels, the client split and the initial weights; TweetTask's interface.

    ``model_fn()`` gives a fresh :class:`EncoderModel` at the initial weights (identical every call);
    ``client_loss(c)`` is client c's ``(model, step) -> per-example losses`` for
    :func:`~zo_optim.federated.simulate`; ``evaluate(model)`` is (accuracy, mean cross-entropy) held out.
    """

    train: dict[str, torch.Tensor]  # "h" [N, T, H] float32, "mask" [N, T] bool, "y" [N] int64
    test: dict[str, torch.Tensor]
    parts: list[list[int]]  # client -> indices into the training pool
    init: list[torch.Tensor]  # the 20 tensors, encoder.trainable's order
    names: list[str]
    heads: int
    eps: float
    batch_size: int = E.BATCH
    seed: int = 0
    _orders: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def model_fn(self) -> EncoderModel:
        return EncoderModel(self.init, self.names, self.heads, self.eps)

    def batch_index(self, client: int, step: int) -> torch.Tensor:
        """Indices (into the training pool) of client ``client``'s batch number ``step``."""
        return client_batch_index(self.parts, client, step, self.batch_size, self.seed, self._orders)

    def client_loss(self, client: int) -> Callable[[torch.nn.Module, int], torch.Tensor]:
        if not 0 <= client < self.num_clients:
            raise ValueError(f"Invalid client: {client} (the task has {self.num_clients} clients)")
        tr = self.train

        def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
            i = self.batch_index(client, step)
            return F.cross_entropy(model(tr["h"][i], tr["mask"][i]), tr["y"][i], reduction="none")

        return loss

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of ``model`` on the held-out tweets."""
        te, hits, total = self.test, 0, 0.0
        with torch.no_grad():
            for s in range(0, len(te["y"]), EVAL_CHUNK):
                chunk = slice(s, s + EVAL_CHUNK)
                logits, y = model(te["h"][chunk], te["mask"][chunk]), te["y"][chunk]
                hits += int((logits.argmax(-1) == y).sum())
                total += float(F.cross_entropy(logits, y, reduction="sum"))
        return hits / len(te["y"]), total / len(te["y"])

    def resplit(self, *, clients: int, alpha: float, seed: int, batch_size: int | None = None) -> EncoderTask:
        """The same cached inputs and initial weights with another split / seed; nothing is recomputed."""
        bs = batch_size if batch_size is not None else self.batch_size
        parts = split_clients(self.train["y"], clients, alpha, seed=seed, batch_size=bs)
        return EncoderTask(self.train, self.test, parts, self.init, self.names, self.heads, self.eps, bs, seed)


def build_encoder_task(size: str = "ci", *, clients: int = 8, alpha: float = 0.5, batch_size: int = E.BATCH,
                       seed: int = 0, problem_seed: int = 0) -> EncoderTask:
    """The encoder problem of size ``size`` (``encoder.SIZES``: train/test examples) split among ``clients``.

    Needs transformers and the packaged MiniLM; the layer-5 inputs are computed once and cached on disk
    (``ZO_OPTIM_CACHE``), shared with ``zo-optim bench convergence --problems encoder``.
    """
    if size not in E.SIZES:
        raise ValueError(f"Invalid size: {size!r} (choose one of {', '.join(E.SIZES)})")
    model, data = E._features(size, problem_seed)
    names, init = E.trainable(model)
    cfg = model.config
    base = EncoderTask(data["train"], data["test"], [], init, names, cfg.num_attention_heads, cfg.layer_norm_eps,
                       batch_size, seed)
    return base.resplit(clients=clients, alpha=alpha, seed=seed)
