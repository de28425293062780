"""Samplers: n completions per prompt, with the training model (`HFSampler`) or an in-process
vLLM engine fed the live weights (`VLLMSampler`). Both follow the `Sampler` protocol.

Importing this package does not import vLLM; creating a `VLLMSampler` does.
"""

from wise_callback.sampling.base import Completion, Sampler, SamplingConfig
from wise_callback.sampling.hf import HFSampler
from wise_callback.sampling.vllm import VLLMSampler

__all__ = ["Completion", "HFSampler", "Sampler", "SamplingConfig", "VLLMSampler"]
