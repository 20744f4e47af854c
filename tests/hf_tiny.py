"""Tiny random-init Hugging Face models and datasets for the integration tests (no network, CPU).

Also imported by the subprocess scripts of tests/test_hf_*.py (resume in a fresh process, torchrun).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from typing import Any

import torch

VOCAB = 64
# the optimizer kwargs of every ZOTrainer test: the plain-torch backend, no numba JIT warm-up in every test process
REF: dict[str, Any] = {"backend": "reference"}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def causal_lm_rows(n: int, seq: int = 12, seed: int = 0, min_len: int = 2) -> ListDataset:
    """Right-padded sequences of uneven length; labels -100 on padding (so label counts differ per row)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, seq + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (seq,), generator=g)
        ids[length:] = 0
        mask = (torch.arange(seq) < length).long()
        labels = ids.clone()
        labels[length:] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return ListDataset(rows)


def classification_rows(n: int, seq: int = 8, seed: int = 0, num_labels: int = 2) -> ListDataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (seq,), generator=g)
        label = int(ids[0] % num_labels)  # learnable from the first token
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "labels": torch.tensor(label)})
    return ListDataset(rows)


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def tiny_opt(seed: int = 0) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return OPTForCausalLM(cfg)


def tiny_bert(seed: int = 0, dropout: float = 0.0, num_labels: int = 2) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def zo_args(output_dir: Any, **kw: Any) -> Any:
    from zo_optim.integrations.hf import ZOTrainingArguments

    base = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
                disable_tqdm=True, dataloader_num_workers=0, zo_eps=1e-3)
    base.update(kw)
    return ZOTrainingArguments(**base)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over ``w1 .. w59`` (+ specials), built in memory: no files, no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(1, VOCAB - len(specials) + 1)]
    vocab = {t: i for i, t in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(1, 40, (int(torch.randint(3, 10, (1,), generator=g)),),
                                                             generator=g)) for _ in range(n)]
