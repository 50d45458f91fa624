"""Sharded training (`train.sharding: fsdp`): torch FSDP2 shards the frozen base model; the adapters stay whole.

Why not Accelerate's FSDP plugin: FSDP flattens the parameters it manages into per-unit buffers fixed when the
model is wrapped, and HyDRA replaces adapter parameters with differently shaped ones at every decision. The memory
that sharding saves is the base model's (adapters are well under 1 % of the weights), so only the base is sharded:
`fully_shard` on every decoder layer, on the inner model's other parts and on the model, with every adapter parameter
in `ignored_params`. FSDP then
all-gathers a layer's base weights for its forward and backward and frees them after; the adapters are ordinary
replicated tensors, resizable like in one process, and their gradients are averaged over processes before each
optimizer step (`loop.average_gradients`, one all-reduce), as DDP would. A parameter created by a resize is outside
FSDP's groups from birth, so it too is left alone. Accelerate's FSDP is also GPU-only, while FSDP2 runs on CPU
with gloo, which is how this is tested.
"""

from __future__ import annotations

from collections import Counter

from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import PeftModel
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from .errors import ConfigError
from .models.arch import decoder_layers


def check_launcher(accelerator: Accelerator) -> None:
    """Refuse, at start-up, the sharding engines that cannot take adapters that change shape during training."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported: its ZeRO engine owns the parameters and optimizer and cannot take adapters "
            "that change shape during training; launch without DeepSpeed (DDP) and set train.sharding: fsdp to shard "
            "the frozen base model"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "Accelerate's FSDP plugin is not supported (it flattens parameters that HyDRA replaces when it resizes "
            "adapters); launch without it (DDP) and set train.sharding: fsdp, which shards the frozen base model"
        )


def shard_frozen_base(model: PeftModel) -> None:
    """Shard every frozen weight of `model` across the processes, leaving every trainable parameter whole and
    unmanaged. FSDP2 units: each decoder layer, each part of the inner model (vision tower, projector, language
    model: `generate` runs the vision tower outside the model's forward, so it needs its own unit) and the rest."""
    trainable = {p for p in model.parameters() if p.requires_grad}
    root = model.base_model.model
    for layer in decoder_layers(root)[1]:
        fully_shard(layer, ignored_params=trainable)
    uses = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
    inner = getattr(root, "model", None)
    for part in [] if inner is None else inner.children():
        # A ModuleList has no forward to gather its weights in; a part holding a tied weight (the embeddings, tied
        # to the output head) must share a unit with its twin: both stay in the model's own unit.
        weights = [id(p) for p in part.parameters()]
        if weights and not isinstance(part, nn.ModuleList) and all(uses[w] == 1 for w in weights):
            fully_shard(part, ignored_params=trainable)
    fully_shard(root, ignored_params=trainable)


def local_frozen_params(model: nn.Module) -> int:
    """How many frozen weights this process holds at rest (for a sharded base: its shards, once the gathered copies
    that the model's own unit keeps after a forward are freed)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters() if not p.requires_grad
    )
