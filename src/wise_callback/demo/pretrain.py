"""Regenerate the demo's pretrained base: a tiny Llama trained on a stream of 1–3-step chains.

    python -m wise_callback.demo.pretrain --out src/wise_callback/demo/base.safetensors

The base must hold part of the skill without having saturated it: SFT on a small fixed set then
raises Pass@1 while Pass@k collapses. This model learns the task in a sharp transition (with these
defaults the loss falls from ~0.8 at step 1000 to ~0.15 at step 1600); the shipped base stops in
the middle of it, at step 1300 (3-step chains: greedy accuracy ~0.34, sampled Pass@1 ~0.19,
Pass@32 ~0.9). A base from step 1100 only half-learns during SFT (Pass@1 ends ~0.4), one from
step 1400 on finishes the transition during SFT and leaves no room (Pass@32 stays ~1). The
architecture and the run that made the shipped weights are recorded in ``base_config.json``.
Training is deterministic on one thread: the same arguments give bit-identical weights here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.files import write_atomically, write_text_atomically

HERE = Path(__file__).parent
BASE_WEIGHTS = HERE / "base.safetensors"
BASE_CONFIG = HERE / "base_config.json"
MODEL_KWARGS: dict[str, int] = {
    "hidden_size": 128,
    "num_layers": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "max_position_embeddings": 64,
}
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 1300,
    "lr": 1e-3,
    "warmup_steps": 100,
    "final_lr_ratio": 1.0,
    "batch_size": 128,
    "min_ops": 1,
    "max_ops": 3,
}


def load_base_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    weights: str | os.PathLike = BASE_WEIGHTS,
    config: str | os.PathLike = BASE_CONFIG,
) -> LlamaForCausalLM:
    """The shipped pretrained base: `tiny_llama` built from the config, weights loaded strictly."""
    tokenizer = tokenizer or char_tokenizer()
    model_kwargs = json.loads(Path(config).read_text())["model"]
    model = tiny_llama(len(tokenizer), tokenizer=tokenizer, **model_kwargs)
    model.load_state_dict(load_file(weights), strict=True)
    return model


def pretrain(
    out: Path,
    seed: int,
    steps: int,
    lr: float,
    warmup_steps: int,
    final_lr_ratio: float,
    batch_size: int,
    min_ops: int,
    max_ops: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a fresh base on a seeded chain stream, write weights and config atomically."""
    import lightning as L

    from wise_callback.demo.sft import ChainDataModule, ChainSFTModule
    from wise_callback.demo.task import problem_stream

    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed, tokenizer=tokenizer, **MODEL_KWARGS)
    module = ChainSFTModule(model, lr=lr, warmup_steps=warmup_steps, final_lr_ratio=final_lr_ratio)
    data = ChainDataModule(tokenizer, problem_stream(seed, min_ops, max_ops), batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    record = {
        "model": MODEL_KWARGS,
        "pretrain": {
            "seed": seed,
            "steps": steps,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "final_lr_ratio": final_lr_ratio,
            "batch_size": batch_size,
            "min_ops": min_ops,
            "max_ops": max_ops,
            "optimizer": "AdamW, weight_decay 0, linear warmup then cosine to final_lr_ratio",
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
    }
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    write_atomically(out, lambda path: save_file(state, str(path)))
    config = out.with_name(BASE_CONFIG.name)
    write_text_atomically(config, json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BASE_WEIGHTS, help="weights file to write")
    for name, default in PRETRAIN_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    record = pretrain(
        args.out,
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        final_lr_ratio=args.final_lr_ratio,
        batch_size=args.batch_size,
        min_ops=args.min_ops,
        max_ops=args.max_ops,
        progress=not args.quiet,
    )
    print(json.dumps(record["pretrain"]))


if __name__ == "__main__":
    main()
