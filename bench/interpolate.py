"""Benchmark: in-place WiSE-FT interpolation of a >= 100M-parameter float32 Llama on CPU.

Side by side in one process (best of `--repeats`, interleaved so machine noise hits all alike):
  * interpolate_            the fused in-place lerp (wise_callback.weights)
  * naive                   {k: (1-a)*e[k] + a*l[k]} + load_state_dict, as reference code does
  * copy                    copying the same bytes once (the memory-bandwidth ceiling)
  * grid                    a 3-alpha grid through alpha_sweep (one backup, 3 alphas, one restore),
                            with its extra peak memory (RSS sampled while it runs)
  * grid_of_blocks          for context, the same grid as 3 separate `interpolated()` blocks
  * set_alpha               one alpha inside an alpha_sweep: the weight work per alpha
Then the same base model gets a PEFT LoRA adapter (rank --lora-rank on every projection, B moved
off zero) and the LoRA path is timed alike (key "lora"): snapshot bytes (the adapter only) next
to the full snapshot's, the per-alpha work (refilling B of the rank-2r interpolant), the cost of
entering and leaving a block (building the concatenated adapter), and a 3-alpha grid.
Goals (issue 2): >= 8x faster than naive, <= 1.6x copy, grid <= 6 copies and <= 1.05x model bytes.
Prints one JSON object last.

    .venv/bin/python bench/interpolate.py
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wise_callback.weights import (
    Snapshot,
    alpha_sweep,
    interpolate_,
    interpolated,
    named_float_tensors,
)

GRID = (0.25, 0.5, 0.75)
PAGE = os.sysconf("SC_PAGE_SIZE")


def llama(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    """A float32 Llama from a config (no download); ~124M parameters at the defaults."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_extra_rss(fn: Callable[[], object]) -> tuple[float, int]:
    """Wall time of fn and the highest RSS above the starting RSS while it ran (sampled)."""
    before = rss_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        seconds = timed(fn)
    finally:
        done.set()
        sampler.join()
    return seconds, max(peak, rss_bytes()) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args()

    model = llama(args.hidden, args.layers, args.vocab, seed=0)
    snapshot = Snapshot.capture(model, step=0)
    with torch.no_grad():  # the "latest" weights: the early ones after some drift
        for tensor in named_float_tensors(model).values():
            tensor.add_(torch.randn_like(tensor), alpha=0.01)
    tensors = list(named_float_tensors(model).values())
    params = sum(t.numel() for t in tensors)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    early_state = {n: t for n, t in snapshot.tensors.items() if n in model.state_dict()}
    copy_target = [torch.empty_like(t) for t in tensors]

    def naive() -> None:
        latest = model.state_dict()
        merged = {k: (1 - 0.5) * early_state[k] + 0.5 * latest[k] for k in latest}
        model.load_state_dict(merged)

    def grid() -> None:
        with alpha_sweep(model, snapshot) as set_alpha:
            for alpha in GRID:
                set_alpha(alpha)

    def grid_of_blocks() -> None:  # the same grid as three separate interpolated() blocks
        for alpha in GRID:
            with interpolated(model, snapshot, alpha):
                pass

    times: dict[str, list[float]] = {name: [] for name in ("copy", "interpolate_", "naive")}
    times.update(grid=[], grid_of_blocks=[], set_alpha=[])
    grid_extra: list[int] = []
    with torch.no_grad():
        for _ in range(args.repeats):
            times["copy"].append(timed(lambda: torch._foreach_copy_(copy_target, tensors)))
            times["interpolate_"].append(timed(lambda: interpolate_(model, snapshot, 0.5)))
            times["naive"].append(timed(naive))
            seconds, extra = peak_extra_rss(grid)
            times["grid"].append(seconds)
            grid_extra.append(extra)
            times["grid_of_blocks"].append(timed(grid_of_blocks))
            times["set_alpha"].append(per_alpha(model, snapshot))
    best = {name: min(values) for name, values in times.items()}
    result = {
        "bench": "interpolate",
        "params": params,
        "model_bytes": model_bytes,
        "threads": torch.get_num_threads(),
        "seconds": {name: round(value, 4) for name, value in best.items()},
        "ratio_vs_naive": round(best["naive"] / best["interpolate_"], 2),
        "interp_over_copy": round(best["interpolate_"] / best["copy"], 3),
        "grid_over_copy": round(best["grid"] / best["copy"], 3),
        "grid_of_blocks_over_copy": round(best["grid_of_blocks"] / best["copy"], 3),
        "grid_extra_mem_over_model": round(max(grid_extra) / model_bytes, 3),
        "lora": lora_case(model, model_bytes, best, args.lora_rank, args.repeats),
        "goals_met": {
            "ratio_vs_naive>=8": best["naive"] / best["interpolate_"] >= 8,
            "interp_over_copy<=1.6": best["interpolate_"] / best["copy"] <= 1.6,
            "grid_over_copy<=6": best["grid"] / best["copy"] <= 6,
            "grid_extra_mem<=1.05x": max(grid_extra) / model_bytes <= 1.05,
        },
    }
    print(json.dumps(result))


def per_alpha(model: torch.nn.Module, snapshot: Snapshot) -> float:
    """Seconds of one `set_alpha` inside an open alpha_sweep (the block's setup not counted)."""
    with alpha_sweep(model, snapshot) as set_alpha:
        set_alpha(0.25)
        return timed(lambda: set_alpha(0.5))


def lora_case(
    model: LlamaForCausalLM, full_bytes: int, full: dict[str, float], rank: int, repeats: int
) -> dict:
    """The LoRA path on the same base model, next to the full-weights numbers in `full`."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    )
    with torch.no_grad():  # as if trained: B off zero (else the early end is the base)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    snapshot = Snapshot.capture(peft_model)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param), alpha=0.01)
    b_bytes = sum(
        p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_B" in n
    )

    def grid() -> None:
        with alpha_sweep(peft_model, snapshot) as set_alpha:
            for alpha in GRID:
                set_alpha(alpha)

    def block() -> None:
        with interpolated(peft_model, snapshot, 0.5):
            pass

    times: dict[str, list[float]] = {"set_alpha": [], "block": [], "grid": []}
    with torch.no_grad():
        for _ in range(repeats):
            times["set_alpha"].append(per_alpha(peft_model, snapshot))
            times["block"].append(timed(block))
            times["grid"].append(timed(grid))
    best = {name: min(values) for name, values in times.items()}
    return {
        "rank": rank,
        "snapshot_bytes": snapshot.nbytes,
        "full_snapshot_bytes": full_bytes,
        "snapshot_over_full": round(snapshot.nbytes / full_bytes, 4),
        "bytes_written_per_alpha": 2 * b_bytes,
        "seconds": {name: round(value, 5) for name, value in best.items()},
        "full_seconds": {name: round(full[name], 5) for name in ("set_alpha", "grid")},
        "set_alpha_speedup_vs_full": round(full["set_alpha"] / best["set_alpha"], 1),
        "grid_speedup_vs_full": round(full["grid"] / best["grid"], 1),
    }


if __name__ == "__main__":
    main()
