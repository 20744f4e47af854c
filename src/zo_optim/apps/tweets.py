"""The packaged fine-tune as a federated task: MiniLM's head on the packaged tweets, split non-IID.

Used by ``zo-optim federated``, ``zo-optim bench federated`` and the Flower example. The frozen
encoder is the same everywhere, so every tweet's mean-pooled MiniLM vector is computed ONCE
(exact: pooling has no parameters) and the federated model is the 2-class linear head alone
(770 parameters). Each client holds a Dirichlet(α) share of the training pool
(:func:`~zo_optim.federated.dirichlet_split`) and draws its batches from it epoch by epoch, in
an order fixed by (seed, client, epoch); a client with fewer than ``batch_size`` examples (the
split guarantees ``batch_size // 4``) uses all of them each step — so "client c's batch number s" means the same
examples on every engine, which is what makes runs on different engines bit-identical.

Features can be saved and loaded (:meth:`TweetTask.save`, :func:`load_task`) so that processes
started by an engine (Flower's ClientApps, Ray workers) do not re-encode the tweets.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..federated import dirichlet_split
from ..federated.replica import _hash_tensor  # the library's tensor hash (Replica's digests), private on purpose

__all__ = ["TweetTask", "client_batch_index", "encode_tweets", "load_task", "split_clients", "weights_checksum"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: mixes (seed, client, epoch) into one generator seed


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, raw bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        _hash_tensor(h, t)  # flat first: a 0-dim int64 (BatchNorm's num_batches_tracked) has no uint8 view
    return h.hexdigest()


def split_clients(labels: torch.Tensor, clients: int, alpha: float, *, seed: int, batch_size: int) -> list[list[int]]:
    """Dirichlet(α) client shares of a labelled pool, each of at least ``batch_size // 4`` examples."""
    return dirichlet_split(labels, clients, alpha, seed=seed, min_size=max(1, batch_size // 4))


def client_batch_index(parts: list[list[int]], client: int, step: int, batch_size: int, seed: int,
                       orders: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Indices (into the pool) of client ``client``'s batch number ``step`` (module docstring).

    Epoch by epoch over the client's share ``parts[client]``, in an order fixed by (seed, client, epoch);
    ``orders`` caches the current epochs' orders (cleared when it grows past 4 per client).
    """
    part = parts[client]
    size = min(batch_size, len(part))
    per_epoch = len(part) // size
    epoch, j = divmod(step, per_epoch)
    key = (client, epoch)
    order = orders.get(key)
    if order is None:
        gen = torch.Generator().manual_seed(((seed * _MIX + client) * _MIX + epoch) % 2**63)
        order = torch.as_tensor(part, dtype=torch.long)[torch.randperm(len(part), generator=gen)]
        if len(orders) > 4 * len(parts):  # keep memory flat over long runs
            orders.clear()
        orders[key] = order
    return order[j * size : (j + 1) * size]


@dataclass
class TweetTask:
    """Pooled features, labels, the client split and the head's initial weights.

    ``model_fn()`` gives a fresh copy of the initial head (identical every call);
    ``client_loss(c)`` is client c's ``(model, step) -> loss`` for :func:`~zo_optim.federated.simulate`.
    """

    train_x: torch.Tensor  # [N, H] float32 pooled vectors
    train_y: torch.Tensor  # [N] int64
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    parts: list[list[int]]  # client -> indices into the training pool
    head_state: dict[str, torch.Tensor]
    batch_size: int = 32
    seed: int = 0
    _orders: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def model_fn(self) -> torch.nn.Linear:
        out, hidden = self.head_state["weight"].shape
        head = torch.nn.Linear(hidden, out)
        head.load_state_dict(copy.deepcopy(self.head_state))
        return head

    def batch_index(self, client: int, step: int) -> torch.Tensor:
        """Indices (into the training pool) of client ``client``'s batch number ``step``."""
        return client_batch_index(self.parts, client, step, self.batch_size, self.seed, self._orders)

    def client_loss(self, client: int) -> Callable[[torch.nn.Module, int], torch.Tensor]:
        if not 0 <= client < self.num_clients:
            raise ValueError(f"Invalid client: {client} (the task has {self.num_clients} clients)")

        def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
            index = self.batch_index(client, step)
            return F.cross_entropy(model(self.train_x[index]).float(), self.train_y[index])

        return loss

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of ``model`` on the held-out tweets."""
        with torch.no_grad():
            logits = model(self.eval_x).float()
        return float((logits.argmax(-1) == self.eval_y).float().mean()), float(F.cross_entropy(logits, self.eval_y))

    def resplit(self, *, clients: int, alpha: float, seed: int, batch_size: int | None = None) -> TweetTask:
        """The same features with another split / seed (the head init follows ``seed``); nothing is re-encoded."""
        bs = batch_size if batch_size is not None else self.batch_size
        parts = split_clients(self.train_y, clients, alpha, seed=seed, batch_size=bs)
        head = _head_state(self.train_x.shape[1], int(self.train_y.max()) + 1, seed)
        return TweetTask(self.train_x, self.train_y, self.eval_x, self.eval_y, parts, head, bs, seed)

    def save(self, path: str | Path) -> None:
        torch.save({"train_x": self.train_x, "train_y": self.train_y, "eval_x": self.eval_x, "eval_y": self.eval_y,
                    "parts": self.parts, "head_state": self.head_state, "batch_size": self.batch_size,
                    "seed": self.seed}, Path(path))


def load_task(path: str | Path) -> TweetTask:
    """A task written by :meth:`TweetTask.save` (plain tensors and lists: ``weights_only=True``)."""
    d: dict[str, Any] = torch.load(Path(path), weights_only=True)
    return TweetTask(d["train_x"], d["train_y"], d["eval_x"], d["eval_y"], [list(p) for p in d["parts"]],
                     d["head_state"], int(d["batch_size"]), int(d["seed"]))


def _head_state(hidden: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    from .assets import init_head_

    head = init_head_(torch.nn.Linear(hidden, classes), seed)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def encode_tweets(*, clients: int = 8, alpha: float = 0.5, train_examples: int = 2000, eval_examples: int = 1000,
                  max_len: int = 64, batch_size: int = 32, seed: int = 0, device: str | torch.device = "cpu",
                  progress: bool = False) -> TweetTask:
    """Encode the packaged tweets with the packaged MiniLM once and split the pool among ``clients``.

    Needs the ``demo`` extra (transformers, the packaged model and corpus); runs offline.
    """
    from . import assets
    from .common import encode_cached

    dev = torch.device(device)
    data = assets.load_tweet_sentiment(n_train=train_examples, n_eval=eval_examples, seed=0)
    tokenizer = assets.load_minilm_tokenizer()
    model = assets.load_minilm_classifier(num_labels=len(assets.LABELS), seed=seed).to(dev)
    start = model.num_layers  # everything frozen but the head: cache the pooled vectors
    with torch.no_grad():
        train = encode_cached(model, tokenizer, data.train_texts, data.train_labels, start, max_len, dev,
                               "encoding training tweets", progress)
        held_out = encode_cached(model, tokenizer, data.eval_texts, data.eval_labels, start, max_len, dev,
                                  "encoding held-out tweets", progress)
    train_x, eval_x = torch.stack(train.rows).float().cpu(), torch.stack(held_out.rows).float().cpu()
    base = TweetTask(train_x, train.labels, eval_x, held_out.labels, [], {}, batch_size, seed)
    return base.resplit(clients=clients, alpha=alpha, seed=seed)
