"""Problems for ``zo-optim bench convergence`` (docs/convergence.md): a closure factory, a metric and a target each.

Every problem is built from a size (``"ci"`` — seconds on two cores — or ``"full"``) and a
seed. The problem itself (curvatures, optimum, teacher, data, initial weights) is fixed by
``problem_seed=0`` so that all optimizers and seeds start from the same point; the run's
``seed`` only drives the mini-batch order (the optimizer gets the same seed for its
directions). An :class:`Instance` exposes

* ``params`` — the trainable tensors, in the order the optimizer numbers them, and
  ``names`` — their names (for HELENE's per-layer clipping);
* ``closure_for_step()`` — a closure over the mini-batch of the next step; the
  optimizer calls it several times per step and must see the same batch each time.
  Closures return a ``[B]`` vector of per-example losses where the problem has examples
  (HELENE's A-GNB uses it) and a scalar otherwise;
* ``evaluate()`` — the metric (``loss`` or ``accuracy``) on held-out data or, for the
  deterministic problems, the exact objective.

The problems:

``quadratic``
    :math:`L(\\theta) = \\tfrac12 \\sum_i \\sum_j c_i\\,\\lambda_{ij}(\\theta_{ij} - \\theta^*_{ij})^2 / Z` over
    several "layers" (tensors of different sizes). Layer *i* has top curvature :math:`c_i`
    (scales 1e-2 … 1e2 across layers) and eigenvalues log-spaced over its own spread
    :math:`\\kappa_i` (10 … 1e3), in random order inside the tensor. ``Z`` normalises the
    expected initial loss to 1; the optimum loss is exactly 0. Target: 1e-2 (1 % of the start).
``rosenbrock``
    Chained Rosenbrock :math:`\\sum_{k} 100(x_{k+1} - x_k^2)^2 + (1 - x_k)^2` from the classic
    start (−1.2, 1, −1.2, …), divided by the number of terms; optimum 0 at all ones.
``mlp``
    Regression of a fixed random tanh teacher MLP by a student of the same shape
    (mini-batches of 64, per-example squared error); metric: held-out MSE relative to the
    variance of the targets (1.0 = predicting the mean).
``minilm``
    Tweet sentiment (pos/neg) with the packaged all-MiniLM-L6-v2 as
    ``BertForSequenceClassification`` (as in docs/integrations.md), class-balanced train/test split.
    Trainable (benchmark default, ``trainable="head"``): the pooler and the classifier
    (148 k of 22.7 M parameters, the pooler pre-trained, the classifier random);
    ``trainable="ffn"`` adds the last encoder layer's feed-forward block and its LayerNorm
    (1.33 M). Because the pooler reads only the [CLS] position and the feed-forward block
    is per token, the frozen part (embeddings, layers 0–4, layer 5's attention) is
    evaluated once and cached as one 384-vector per example; the trainable part is then
    computed exactly on it (tested against the full model's logits). Why the small
    subset: on the shared 2-core machine one ``ffn`` step took ~0.36 s under load, too
    slow for a 5-optimizer × lr-grid × 3-seed study in the time we had.
    Metric: held-out accuracy.
``encoder``
    The same task with MiniLM's whole last encoder layer + pooler + classifier trainable
    (1.93 M parameters, the frozen prefix cached): :mod:`zo_optim.bench.encoder`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import encoder as E
from ._problem_base import (  # re-exported: the problems' shared types and data helpers live there
    Closure,
    Instance,
    ProblemSpec,
    _BatchStream,
    _cache_dir,
    _gen,
    _minilm_dir,
    _split,
    _tweets,
)

__all__ = ["PROBLEMS", "Instance", "ProblemSpec", "build"]


def _no_grad_float(fn: Callable[[], torch.Tensor]) -> float:
    with torch.no_grad():
        return float(fn())


# --------------------------------------------------------------------------- quadratic

_QUAD_LAYERS = {  # (numel, top curvature c_i, spread kappa_i)
    "ci": ((256, 1.0, 100.0), (64, 100.0, 10.0), (32, 0.01, 1000.0), (16, 10.0, 100.0)),
    "full": ((4096, 1.0, 100.0), (1024, 100.0, 10.0), (256, 0.01, 1000.0), (64, 10.0, 100.0), (16, 0.1, 10.0)),
}


def quadratic(size: str, seed: int, problem_seed: int = 0) -> Instance:
    g = _gen(problem_seed)
    curv, optimum, params, names = [], [], [], []
    for i, (n, top, spread) in enumerate(_QUAD_LAYERS[size]):
        lam = top * torch.logspace(0.0, -math.log10(spread), n, dtype=torch.float64)
        curv.append(lam[torch.randperm(n, generator=g)])
        optimum.append(torch.randn(n, generator=g, dtype=torch.float64))
        params.append((optimum[-1] + torch.randn(n, generator=g, dtype=torch.float64)).float().requires_grad_())
        names.append(f"layer{i}.weight")
    norm = 0.5 * float(sum(c.sum() for c in curv))  # E[L(θ0)] before normalisation

    def loss() -> torch.Tensor:
        total = sum((c * (p.double() - o) ** 2).sum() for p, c, o in zip(params, curv, optimum, strict=True))
        return (0.5 * total / norm).float()

    return Instance(params, names, lambda: loss, lambda: _no_grad_float(loss), {"optimum": optimum})


# --------------------------------------------------------------------------- rosenbrock

_ROSEN_DIM = {"ci": 8, "full": 16}


def rosenbrock(size: str, seed: int, problem_seed: int = 0) -> Instance:
    d = _ROSEN_DIM[size]
    x = torch.ones(d)
    x[0::2] = -1.2
    x.requires_grad_()

    def loss() -> torch.Tensor:
        xd = x.double()
        terms = 100.0 * (xd[1:] - xd[:-1] ** 2) ** 2 + (1.0 - xd[:-1]) ** 2
        return terms.mean().float()

    return Instance([x], ["x"], lambda: loss, lambda: _no_grad_float(loss))


# --------------------------------------------------------------------------- mlp regression

_MLP_SHAPE = {"ci": (8, 16), "full": (32, 64)}  # (inputs, hidden)
_MLP_BATCH = 64


def _mlp_params(d_in: int, hidden: int, g: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(hidden, d_in, generator=g) / math.sqrt(d_in),
        0.1 * torch.randn(hidden, generator=g),
        torch.randn(1, hidden, generator=g) / math.sqrt(hidden),
        0.1 * torch.randn(1, generator=g),
    ]


def _mlp_forward(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.tanh(F.linear(x, p[0], p[1])), p[2], p[3]).squeeze(-1)


def mlp(size: str, seed: int, problem_seed: int = 0) -> Instance:
    d_in, hidden = _MLP_SHAPE[size]
    g = _gen(problem_seed)
    teacher = _mlp_params(d_in, hidden, g)
    teacher[2] *= 3.0  # a teacher with a clearly non-linear, non-trivial response
    student = [p.requires_grad_() for p in _mlp_params(d_in, hidden, g)]
    n_train, n_test = 2048, 1024
    x = torch.randn(n_train + n_test, d_in, generator=g)
    with torch.no_grad():
        y = _mlp_forward(teacher, x) + 0.05 * torch.randn(n_train + n_test, generator=g)
    x_tr, y_tr, x_te, y_te = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    var = float(y_te.var())
    batches = _BatchStream(n_train, _MLP_BATCH, seed)

    def closure_for_step() -> Closure:
        idx = batches.next()
        return lambda: (_mlp_forward(student, x_tr[idx]) - y_tr[idx]) ** 2 / var

    def evaluate() -> float:
        with torch.no_grad():
            return float(((_mlp_forward(student, x_te) - y_te) ** 2).mean() / var)

    return Instance(student, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], closure_for_step, evaluate)


# --------------------------------------------------------------------------- MiniLM sentiment

_MINILM_SIZES = {"ci": (256, 256), "full": (4096, 1024)}  # (train, test) examples
_MINILM_BATCH = 32
_MINILM_MAX_LEN = 64


def _minilm_features(size: str, problem_seed: int):
    """Frozen-part features ([N, 384] attention output of layer 5 at [CLS]) and labels, cached on disk."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    n_train, n_test = _MINILM_SIZES[size]
    key = hashlib.sha256(f"v2-balanced/{size}/{problem_seed}/{_MINILM_MAX_LEN}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"minilm-features-{key}.pt"
    torch.manual_seed(problem_seed)  # the randomly initialised pooler/classifier
    model = AutoModelForSequenceClassification.from_pretrained(_minilm_dir(), num_labels=2).eval()
    if path.exists():
        feats = torch.load(path, weights_only=True)
        return model, feats["train_x"], feats["train_y"], feats["test_x"], feats["test_y"]
    texts, labels = _tweets()
    tr, te = _split(labels, n_train, n_test, problem_seed)
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    captured: list[torch.Tensor] = []
    layer = model.bert.encoder.layer[-1]
    # The attention block's output at [CLS] is the input of the (trainable) feed-forward block.
    hook = layer.attention.register_forward_hook(lambda m, i, o: captured.append(o[0][:, 0].detach().clone()))

    def encode(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for s in range(0, len(idx), 64):
            batch = [texts[int(i)] for i in idx[s : s + 64]]
            enc = tok(batch, padding=True, truncation=True, max_length=_MINILM_MAX_LEN, return_tensors="pt")
            captured.clear()
            with torch.no_grad():
                model.bert(**enc)
            out.append(captured[-1])
        return torch.cat(out), torch.tensor([labels[int(i)] for i in idx])

    try:
        train_x, train_y = encode(tr)
        test_x, test_y = encode(te)
    finally:
        hook.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}, path)
    return model, train_x, train_y, test_x, test_y


def minilm(size: str, seed: int, problem_seed: int = 0, trainable: str = "head") -> Instance:
    """MiniLM sentiment; ``trainable="head"`` (pooler + classifier, the benchmark's default) or
    ``"ffn"`` (also the last layer's feed-forward block and its LayerNorm)."""
    if trainable not in ("head", "ffn"):
        raise ValueError(f"Invalid trainable: {trainable!r}; use 'head' or 'ffn'")
    model, train_x, train_y, test_x, test_y = _minilm_features(size, problem_seed)
    last = model.bert.encoder.layer[-1]
    act = last.intermediate.intermediate_act_fn
    ffn_modules = {
        "bert.encoder.layer.5.intermediate.dense": last.intermediate.dense,
        "bert.encoder.layer.5.output.dense": last.output.dense,
        "bert.encoder.layer.5.output.LayerNorm": last.output.LayerNorm,
    }
    head_modules = {"bert.pooler.dense": model.bert.pooler.dense, "classifier": model.classifier}
    modules = (ffn_modules | head_modules) if trainable == "ffn" else head_modules
    names, params = [], []
    for prefix, mod in modules.items():
        for n, p in mod.named_parameters():
            names.append(f"{prefix}.{n}")
            params.append(p.detach().requires_grad_())

    def ffn(h: torch.Tensor, w1, b1, w2, b2, ln_w, ln_b) -> torch.Tensor:
        # BertLayer's feed-forward block (BertIntermediate + BertOutput, dropout off in eval).
        return F.layer_norm(F.linear(act(F.linear(h, w1, b1)), w2, b2) + h, (h.shape[-1],), ln_w, ln_b,
                            last.output.LayerNorm.eps)

    def head(y: torch.Tensor, wp, bp, wc, bc) -> torch.Tensor:
        return F.linear(torch.tanh(F.linear(y, wp, bp)), wc, bc)  # BertPooler + classifier

    if trainable == "ffn":
        def logits(h: torch.Tensor) -> torch.Tensor:
            return head(ffn(h, *params[:6]), *params[6:])
    else:
        # The frozen feed-forward block is applied once to the cached features.
        with torch.no_grad():
            frozen = [p.detach() for m in ffn_modules.values() for p in m.parameters()]
            train_x, test_x = ffn(train_x, *frozen), ffn(test_x, *frozen)

        def logits(h: torch.Tensor) -> torch.Tensor:
            return head(h, *params)

    batches = _BatchStream(len(train_y), _MINILM_BATCH, seed)

    def closure_for_step() -> Closure:
        idx = batches.next()
        return lambda: F.cross_entropy(logits(train_x[idx]), train_y[idx], reduction="none")

    def evaluate() -> float:
        with torch.no_grad():
            return float((logits(test_x).argmax(-1) == test_y).float().mean())

    return Instance(params, names, closure_for_step, evaluate, {"logits": logits, "test_x": test_x})


def encoder(size: str, seed: int, problem_seed: int = 0) -> Instance:
    """MiniLM's last encoder layer + head (:mod:`zo_optim.bench.encoder`)."""
    return E.encoder(size, seed, problem_seed)


# --------------------------------------------------------------------------- registry

_BUILDERS: dict[str, Callable[..., Instance]] = {
    "quadratic": quadratic,
    "rosenbrock": rosenbrock,
    "mlp": mlp,
    "minilm": minilm,
    "encoder": encoder,
}

PROBLEMS: dict[str, ProblemSpec] = {
    "quadratic": ProblemSpec(
        "quadratic", "loss", "relative loss", False, {"ci": 0.5, "full": 0.1}, {"ci": 1000, "full": 8000}, 40,
        description="layer-wise heterogeneous diagonal quadratic (curvature scales 1e-2..1e2, spreads 10..1e3)",
    ),
    "rosenbrock": ProblemSpec(
        "rosenbrock", "loss", "loss per term", False, {"ci": 2.0, "full": 1.0}, {"ci": 1000, "full": 6000}, 40,
        description="chained Rosenbrock from (-1.2, 1, ...)",
    ),
    "mlp": ProblemSpec(
        "mlp", "loss", "test MSE / var(y)", False, {"ci": 0.5, "full": 0.16}, {"ci": 1000, "full": 6000}, 40,
        description="tanh MLP student regressing a fixed random teacher",
    ),
    "minilm": ProblemSpec(
        "minilm", "accuracy", "test accuracy", True, {"ci": 0.6, "full": 0.7}, {"ci": 300, "full": 2000}, 20,
        description="MiniLM-L6 tweet sentiment, pooler + classifier trainable",
    ),
    "encoder": ProblemSpec(
        "encoder", "accuracy", "test accuracy", True, {"ci": 0.55, "full": 0.7}, {"ci": 100, "full": 1000}, 10,
        description="MiniLM-L6 tweet sentiment, last encoder layer + pooler + classifier trainable (1.93 M)",
    ),
}


def build(name: str, size: str, seed: int) -> Instance:
    """Build problem ``name`` at ``size`` ("ci" or "full") for run seed ``seed``."""
    if name not in _BUILDERS:
        raise ValueError(f"Invalid problem: {name!r}; choose from {sorted(_BUILDERS)}")
    if size not in ("ci", "full"):
        raise ValueError(f"Invalid size: {size!r}; use 'ci' or 'full'")
    return _BUILDERS[name](size, seed)
