"""ZOTrainer on a model the user sharded with FSDP2 (``fully_shard``) before building the Trainer.

accelerate 1.15 makes ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})`` an FSDP run only
on accelerators (``AcceleratorState`` promotes MULTI_GPU/NPU/XPU/... to ``DistributedType.FSDP``, never
MULTI_CPU), so on CPU the Trainer's own FSDP path cannot run; a model sharded by the user can. Two
things stand in its way, both fixed here when the model has DTensor parameters:

* accelerate wraps the model in DDP on MULTI_CPU, and DDP cannot broadcast DTensors
  (``c10d.broadcast_`` has no sharding strategy). A ZO step needs no gradient sync (the optimizer
  all-reduces its scalars), so such a model is left unwrapped.
* FSDP2 keeps the root module's parameters gathered after a forward (a backward would gather them
  again). ZO forwards have no backward: the next forward would read the gathered copy, not the
  perturbed shards. Every FSDP module is set to reshard after forward.

Checkpoints. Without its FSDP path the Trainer would save the model and the optimizer from rank 0
alone, which holds only its own shards: a silently incomplete checkpoint. So for such a model:

* the model is gathered (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, a collective)
  and rank 0 writes it with ``save_pretrained``: a checkpoint (and ``trainer.save_model()``) is a plain
  HF model that ``from_pretrained`` loads, as with accelerate's ``FULL_STATE_DICT``; on resume rank 0
  reads it and broadcasts it (``set_model_state_dict(broadcast_from_rank0=True)``), each rank keeping its
  rows. Costs the full weights in rank 0's CPU memory while saving/loading, once per checkpoint;
* the optimizer state (ZO-Adam's two moments are twice the weights) is not gathered: every rank writes
  its own shards with ``torch.distributed.checkpoint`` (:data:`OPTIMIZER_DIR`, through
  ``get/set_optimizer_state_dict``), and resume reads them back, also onto another world size;
* the lr scheduler, the Trainer state and each rank's RNG state are the Trainer's own files.

Resume then continues bit for bit (tests/test_hf_sharded.py). ``load_best_model_at_end`` is refused
(its loader is not this one).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from ...ops import _sharding

#: the folder of a checkpoint that holds the optimizer's shards (torch.distributed.checkpoint's format)
OPTIMIZER_DIR = "zo_optimizer_dcp"
_SCHEDULER = "scheduler.pt"


def is_sharded(model: nn.Module) -> bool:
    return any(_sharding.is_dtensor(p) for p in model.parameters())


def prepare_sharded(trainer: Any) -> None:
    """Make the Trainer run a user-sharded (FSDP2) model: no DDP wrapper, roots reshard after forward."""
    model = trainer.model
    if not is_sharded(model):
        return
    if trainer.args.load_best_model_at_end:
        raise ValueError(
            "ZOTrainer: load_best_model_at_end=True with a model sharded by fully_shard (DTensor parameters) is not "
            "supported: the Trainer's best-model loader writes full tensors into the shards. Pick the best "
            "checkpoint yourself and resume from it (resume_from_checkpoint=...), see docs/sharded.md"
        )
    for module in model.modules():
        if hasattr(module, "set_reshard_after_forward"):  # an FSDPModule (fully_shard)
            module.set_reshard_after_forward(True, recurse=False)
    accelerator = trainer.accelerator
    prepare_model = accelerator.prepare_model

    def prepare_sharded_model(m: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if is_sharded(m):
            return m  # already distributed by fully_shard; DDP cannot wrap DTensors and ZO needs no grad sync
        return prepare_model(m, *args, **kwargs)

    accelerator.prepare_model = prepare_sharded_model


# ---------------------------------------------------------------------- checkpoints (every rank calls these)


def save_model(trainer: Any, output_dir: str) -> None:
    """Gather the full weights (a collective) and let rank 0 write them as a plain HF model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.args.should_save:  # cpu_offload: the other ranks got an empty dict
        trainer._save(output_dir, state_dict=full)


def save_optimizer_and_scheduler(trainer: Any, output_dir: str) -> None:
    """Every rank writes its optimizer shards (DCP); rank 0 the lr scheduler, as the Trainer does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(trainer.model, trainer.zo_optimizer)
    dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(output_dir, OPTIMIZER_DIR))
    if trainer.args.should_save:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's "please also save the optimizer" notice
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER))


def _read_full_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    single, index = os.path.join(checkpoint, SAFE_WEIGHTS_NAME), os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for name in files:
            out.update(load_file(os.path.join(checkpoint, name)))
        return out
    raise ValueError(
        f"ZOTrainer: {checkpoint} holds no {SAFE_WEIGHTS_NAME} (or its index): resuming a model sharded by "
        "fully_shard needs a checkpoint written by ZOTrainer (save_safetensors=True)"
    )


def load_model(trainer: Any, checkpoint: str) -> None:
    """Rank 0 reads the full weights and broadcasts them; every rank keeps its rows (a collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = trainer.model
    full: dict[str, torch.Tensor] = {}
    error = [None]
    if dist.get_rank() == 0:
        try:
            full = _read_full_weights(checkpoint)
            # save_pretrained drops the second name of a tied weight (GPT-2's lm_head = wte); any other
            # missing or extra key is a truncated or foreign checkpoint
            names: dict[int, list[str]] = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), []).append(name)
            aliases = {n for group in names.values() if len(group) > 1 for n in group}
            expected = set(model.state_dict())
            missing, unexpected = sorted(expected - set(full) - aliases), sorted(set(full) - expected)
            if missing or unexpected:
                error[0] = (f"ZOTrainer: the checkpoint {checkpoint} does not match the model: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]}")
        except (OSError, ValueError) as e:
            error[0] = str(e)
    dist.broadcast_object_list(error, src=0)  # every rank raises, or none: a lone raise would hang the others
    if error[0] is not None:
        raise ValueError(error[0])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))


def has_sharded_optimizer(checkpoint: str) -> bool:
    return os.path.isdir(os.path.join(checkpoint, OPTIMIZER_DIR))


def load_optimizer_and_scheduler(trainer: Any, checkpoint: str) -> None:
    """Every rank reads its optimizer shards back (DCP); the lr scheduler from the Trainer's file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not has_sharded_optimizer(checkpoint):
        return  # save_only_model: _resume.step_from_trainer_state takes it from here
    model, opt = trainer.model, trainer.zo_optimizer
    sd = {"optimizer": get_optimizer_state_dict(model, opt)}  # the template DCP loads into (this rank's shards)
    dcp.load(sd, checkpoint_id=os.path.join(checkpoint, OPTIMIZER_DIR))
    set_optimizer_state_dict(model, opt, sd["optimizer"])
    sched = os.path.join(checkpoint, _SCHEDULER)
    if os.path.isfile(sched):
        trainer.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))
