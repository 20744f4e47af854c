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

Refused: the Trainer's checkpoints (``save_strategy`` other than ``"no"``). Without its FSDP path the
Trainer saves the model and the optimizer from rank 0 alone, which holds only its own shards: the
checkpoint would be silently incomplete. Save with ``torch.distributed.checkpoint`` instead
(docs/sharded.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...ops import _sharding


def is_sharded(model: nn.Module) -> bool:
    return any(_sharding.is_dtensor(p) for p in model.parameters())


def prepare_sharded(trainer: Any) -> None:
    """Make the Trainer run a user-sharded (FSDP2) model: no DDP wrapper, roots reshard after forward."""
    model = trainer.model
    if not is_sharded(model):
        return
    if str(getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy)) != "no":
        raise ValueError(
            f"ZOTrainer: save_strategy={trainer.args.save_strategy.value!r} with a model sharded by fully_shard "
            "(DTensor parameters): the Trainer would save the model and optimizer from rank 0 alone, which holds "
            "only its own shards. Set save_strategy='no' and save with torch.distributed.checkpoint "
            "(dcp.save({'model': model.state_dict(), 'optim': trainer.zo_optimizer.state_dict()}, ...)), "
            "see docs/sharded.md"
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
