"""SFT of a ~0.5B instruct model on GSM8K, watched by WiSEFTCallback (GPU + vLLM + the hub).

    pip install "wise-callback[vllm,math]" datasets
    python examples/sft_gsm8k.py --devices 1                       # one GPU
    python examples/sft_gsm8k.py --devices 8                       # FSDP2 across 8 GPUs

Needs: CUDA GPUs (one 24 GB GPU is enough for the 0.5B model in bf16 with vLLM at
gpu_memory_utilization=0.25), internet access to the Hugging Face hub for the model and GSM8K.
Every 200 steps the callback samples 16 answers for 256 held-out test problems with an in-process
vLLM engine fed the live weights, grades them with math-verify and logs Pass@k, Maj@k and the
collapse terms of the current weights; at the end it samples the alpha grid (interpolated weights,
by successive halving), merges the best alpha and saves it to OUT/merged.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from wise_callback import WiSEFTCallback
from wise_callback.demo.sft import collate, completion_loss
from wise_callback.grading import math_verify_match

SYSTEM = "Solve the problem step by step. Put the final answer in \\boxed{}."


def chat_prompt(tokenizer: Any, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def gsm8k_completion(answer: str) -> tuple[str, str]:
    """GSM8K's reasoning with the final "#### 42" turned into a boxed answer; and the answer.
    (The SFT collate appends the tokenizer's eos and trains on the completion tokens only.)"""
    reasoning, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    return f"{reasoning.strip()}\nThe answer is \\boxed{{{final}}}.", final


class SFTModule(L.LightningModule):
    """Teacher-forced SFT on the completion tokens; the HF model lives at `self.model`."""

    def __init__(self, model_name: str, lr: float):
        super().__init__()
        self.model_name, self.lr = model_name, lr
        self.model: Any = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=torch.bfloat16)
        if self.trainer.world_size > 1:
            from torch.distributed.fsdp import fully_shard

            # Shard over the data-parallel axis alone: the whole (data, tensor) mesh would
            # replicate every parameter over the size-1 tensor axis and shard nothing.
            assert self.device_mesh is not None, "multi-device runs use fsdp2_strategy"
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = completion_loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)


def fsdp2_strategy(devices: int) -> Any:
    """FSDP2 across `devices` (SFTModule.configure_model shards the model); one device: "auto"."""
    if devices == 1:
        return "auto"
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-problems", type=int, default=256)
    parser.add_argument("--out", default="out/gsm8k")
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    gsm8k = load_dataset("openai/gsm8k", "main")
    test = gsm8k["test"].shuffle(seed=0).select(range(args.eval_problems))
    problems = [
        {
            "prompt": chat_prompt(tokenizer, r["question"]),
            "answer": gsm8k_completion(r["answer"])[1],
        }
        for r in test
    ]
    sft_rows = [
        {
            "prompt": chat_prompt(tokenizer, r["question"]),
            "completion": gsm8k_completion(r["answer"])[0],
        }
        for r in gsm8k["train"]
    ]
    train = DataLoader(
        sft_rows,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=partial(collate, tokenizer),
    )
    callback = WiSEFTCallback(
        problems=problems,
        tokenizer=tokenizer,
        grader=math_verify_match,
        snapshot_at=0.1,
        eval_every_n_steps=200,
        num_samples=16,
        ks=(1, 4, 16),
        alphas=(0.25, 0.5, 0.75),
        final_alpha="best",
        select_metric="pass@16",
        sampler="vllm",
        sampling={"sampler_kwargs": {"gpu_memory_utilization": 0.25}},
        max_new_tokens=512,
        temperature=1.0,
        save_merged_to=f"{args.out}/merged",
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=args.devices,
        strategy=fsdp2_strategy(args.devices),
        precision="bf16-true",
        max_steps=args.max_steps,
        callbacks=[callback],
        default_root_dir=args.out,
    )
    trainer.fit(SFTModule(args.model, args.lr), train_dataloaders=train)


if __name__ == "__main__":
    main()
