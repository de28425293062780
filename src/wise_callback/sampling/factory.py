"""Build a sampler from its name, so the callback and `wise-ft eval` make them the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from wise_callback.sampling.base import Sampler

SAMPLER_NAMES = ("hf", "vllm")


def make_sampler(
    spec: str | Sampler,
    model: torch.nn.Module,
    tokenizer: Any,
    options: Mapping[str, Any] | None = None,
) -> Sampler:
    """ "hf" -> `HFSampler` on `model` itself (its own bar off: the evaluation shows one),
    "vllm" -> `VLLMSampler` fed `model`'s weights; a `Sampler` instance is returned as it is."""
    if not isinstance(spec, str):
        if options:
            raise ValueError("sampler options only apply to sampler='hf' or 'vllm'")
        return spec
    if spec == "hf":
        from wise_callback.sampling.hf import HFSampler

        return HFSampler(model, tokenizer, **{"progress": False, **(options or {})})
    if spec == "vllm":
        from wise_callback.sampling.vllm import VLLMSampler

        return VLLMSampler(model, tokenizer, **(options or {}))
    raise ValueError(f"sampler must be one of {SAMPLER_NAMES} or a Sampler, got {spec!r}")
