"""The dense weights a PEFT LoRA model computes with, under the plain base model's names.

For every LoRA layer W0 + s * B @ A (of its active adapters), the active modules_to_save copy
under the wrapped module's name, every other tensor as it is: what `VLLMSampler` pushes into its
engine and what "save the dense merged model" writes. One tensor at a time (DTensors gathered one
by one), never a dense copy of the whole model. A quantized base (QLoRA) is refused: its weights
are not floating point.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from wise_callback.lora import AdaptedLayer, whole_tensor


def merged_dense_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense weights the model computes with, named as in the plain transformers model:
    W0 + s * B @ A for every LoRA layer (of its active adapters), the active modules_to_save copy
    under the wrapped module's name, everything else as it is. One tensor at a time (DTensors
    gathered one by one), so there is never a dense copy of the whole model.
    """
    get_base_model = getattr(module, "get_base_model", None)
    yield from _dense(get_base_model() if callable(get_base_model) else module, "")


def merged_dense_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`merged_dense_tensors` as a state dict for the plain base model (e.g. `save_pretrained(
    state_dict=...)`). Extra memory: one dense copy of the adapted weights only; the other
    tensors are the model's own (not copies), so use the dict before the model changes."""
    return dict(merged_dense_tensors(module))


def _dense(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        adapter = module.active_adapters[0] if module.active_adapters else None
        use_copy = not module.disable_adapters and adapter in module.modules_to_save
        inner = module.modules_to_save[adapter] if use_copy else module.original_module
        yield from _dense(inner, prefix)
        return
    if isinstance(module, PeftLoraLayer):
        base = module.get_base_layer()
        for name, tensor in _own_tensors(base):
            if name == "weight":
                tensor = _merged_weight(module, tensor)
            yield prefix + name, tensor
        return
    yield from ((prefix + n, t) for n, t in _own_tensors(module))
    for name, child in module.named_children():
        yield from _dense(child, f"{prefix}{name}.")


def _own_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters and persistent buffers (as `state_dict` holds them), whole."""
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield name, whole_tensor(tensor).detach()
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, whole_tensor(buffer).detach()


def _merged_weight(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """W0 + sum over active adapters of s * B @ A, in float32 at least, cast back."""
    if layer.merged or layer.disable_adapters:
        return weight
    if not weight.is_floating_point():
        raise ValueError(
            f"the base weight of a LoRA layer is quantized ({weight.dtype}); a dense merge "
            "(e.g. for VLLMSampler) needs floating-point base weights: use sampler='hf' for QLoRA"
        )
    compute = torch.promote_types(weight.dtype, torch.float32)
    merged = weight.to(compute, copy=True)
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)
    for adapter in layer.active_adapters:
        embedding = adapter in layer.lora_embedding_A
        if not embedding and adapter not in layer.lora_A:
            continue
        item = AdaptedLayer("", layer, embedding)
        a, b = (whole_tensor(t).to(compute) for t in item.factors(adapter))
        delta = b @ a
        merged += (delta.T if embedding or fan_in_fan_out else delta) * layer.scaling[adapter]
    return merged.to(weight.dtype)
