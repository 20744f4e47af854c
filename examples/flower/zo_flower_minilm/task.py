"""What the ServerApp and the ClientApp share: settings, the model, the optimizer and the data.

The packaged all-MiniLM-L6-v2 encoder is frozen, so each node runs it once over its tweets
(mean-pooled 384-d sentence features, cached on the node's disk: in deployment every message
may run in a fresh process) and the federation trains the linear head with HiSo. Every
participant builds the same initial head from ``seed`` and the same optimizer, so the handshake's
configuration digest matches; only round numbers and τ·P float32 scalars travel.

Each SuperNode's share of the training tweets is a Dirichlet(alpha) non-IID split by label
(``zo_optim.federated.dirichlet_split``), indexed by the node config's ``partition-id`` out of
``num-partitions``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import zo_optim
from zo_optim.apps import assets
from zo_optim.federated import dirichlet_split

#: the defaults of ``[tool.flwr.app.config]`` in pyproject.toml (a run config overrides them; the
#: test checks both agree)
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 60,
    "clients-per-round": 3,
    "min-nodes": 3,
    "local-steps": 1,
    "num-queries": 5,
    "lr": 0.05,
    "zo-eps": 1e-3,
    "batch-size": 32,
    "train-examples": 2000,
    "eval-examples": 400,
    "alpha": 0.5,
    "seed": 0,
    "round-timeout": 300.0,
    "cache-dir": "",
}
HIDDEN = 384


def settings(run_config: Any) -> dict[str, Any]:
    """DEFAULTS overridden by a run config (``flwr run --run-config "lr=0.2"``)."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in dict(run_config or {}).items() if k in DEFAULTS})
    return out


def head_model(seed: int) -> torch.nn.Linear:
    """The classifier head, initialised exactly as ``assets.load_minilm_classifier`` does (same on every node)."""
    return assets.init_head_(torch.nn.Linear(HIDDEN, len(assets.LABELS)), seed)


def optimizer(model: torch.nn.Module, cfg: dict[str, Any]) -> zo_optim.HiSo:
    # the reference backend on every participant: replicas are bit-identical on one backend and device kind
    return zo_optim.HiSo(model.parameters(), lr=float(cfg["lr"]), zo_eps=float(cfg["zo-eps"]),
                         num_queries=int(cfg["num-queries"]), backend="reference")


@lru_cache(maxsize=1)
def _splits(n_train: int, n_eval: int) -> assets.TweetSplits:
    return assets.load_tweet_sentiment(n_train=n_train, n_eval=n_eval, seed=0)


def _cache_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["cache-dir"] or os.path.join(tempfile.gettempdir(), "zo-flower-minilm"))


def _features(texts: list[str], key: dict[str, Any], cfg: dict[str, Any]) -> torch.Tensor:
    """Mean-pooled MiniLM features of ``texts`` [n, 384], cached on disk under a hash of ``key``."""
    path = _cache_dir(cfg) / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt")
    if path.exists():
        return torch.load(path, weights_only=True)
    assets.set_offline()
    tokenizer = assets.load_minilm_tokenizer()
    model = assets.load_minilm_classifier(num_labels=len(assets.LABELS))
    rows = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = assets.encode(tokenizer, texts[i: i + 64], max_len=64)
            h = model.features(enc["input_ids"], enc["attention_mask"], stop=model.num_layers)
            rows.append(model.pool(h, enc["attention_mask"]))
    feats = torch.cat(rows) if rows else torch.empty(0, HIDDEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats


def partition(cfg: dict[str, Any], partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's (features, labels): its Dirichlet(alpha) share of the training tweets."""
    data = _splits(int(cfg["train-examples"]), int(cfg["eval-examples"]))
    parts = dirichlet_split(data.train_labels, num_partitions, alpha=float(cfg["alpha"]), seed=int(cfg["seed"]))
    idx = parts[partition_id]
    key = {"split": "train", "n": cfg["train-examples"], "n_eval": cfg["eval-examples"], "alpha": cfg["alpha"],
           "seed": cfg["seed"], "part": partition_id, "of": num_partitions}
    x = _features([data.train_texts[i] for i in idx], key, cfg)
    return x, torch.tensor([data.train_labels[i] for i in idx], dtype=torch.long)


def held_out(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-balanced held-out tweets (features, labels), for the server's evaluation."""
    data = _splits(int(cfg["train-examples"]), int(cfg["eval-examples"]))
    x = _features(data.eval_texts, {"split": "eval", "n_eval": cfg["eval-examples"]}, cfg)
    return x, torch.tensor(data.eval_labels, dtype=torch.long)


def batch_loss(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """loss(model, step): cross-entropy on mini-batch ``step`` of a fixed shuffle (same step, same batch)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(len(y)))

    def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        i = (step * batch_size + torch.arange(batch_size)) % len(y)
        b = order[i]
        return F.cross_entropy(model(x[b]), y[b])

    return loss


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy)."""
    with torch.no_grad():
        logits = model(x)
        return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))
