"""One home for "is this sharded": DTensor (FSDP2) checks, local/full views, resharding.

A leaf module (imports nothing of ours). It never imports `torch.distributed.tensor` itself: no
tensor can be a DTensor before that module was imported, and importing it would add about a
second to every `wise-ft merge`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def _dtensor_type() -> type | None:
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a DTensor (a shard of a distributed tensor)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor); any other tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model has DTensor (FSDP2) parameters."""
    return _dtensor_type() is not None and any(is_dtensor(p) for p in model.parameters())


def is_collective(model: torch.nn.Module) -> bool:
    """Whether the model's forwards are collectives: sharded across several processes."""
    dist = torch.distributed
    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and is_sharded(model)
    )


def reshard(model: torch.nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state after generating.

    A root `fully_shard` module keeps its parameters gathered after a forward (it expects a
    backward); interpolating then would change the shards while later forwards still used the
    stale gathered copies, and the named tensors would not match the shard-local snapshot.
    """
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The full (unsharded) state dict of an FSDP2 model on CPU; a collective on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
