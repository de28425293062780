"""The toy SFT task of callback_toy.py (single-digit sums on a tiny Llama) under transformers'
Trainer with WiSEFTTrainerCallback. Importable by the tests, and a script for real processes:

    python tests/hf_toy.py --out DIR [--resume] [--max-steps 16] [--trl] [--sampler vllm]
    torchrun --nproc_per_node 2 tests/hf_toy.py --out DIR

The training is made to match the Lightning toy's step for step: the same init, the whole
training set as one batch per step in a fixed order, `torch.optim.AdamW(lr=3e-3)` at a constant
rate, no clipping, and the loss as the model's own mean (`model_accepts_loss_kwargs=False`).
The script checkpoints every 3 steps and writes into DIR: the Trainer's checkpoints and
history.jsonl, `merged/` (save_merged_to), `history.json` (the callback's history, chosen alpha
and sampler class, rank 0), `final_rank{r}.safetensors` (each rank's weights after the merge),
`premerge.safetensors` and `snapshot.safetensors` (rank 0). It prints "STEP n" after each step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from callback_toy import TRAIN_PAIRS, toy_problems
from helpers import weights
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.grading import exact_match

LEARNING_RATE = 3e-3


def toy_options(**overrides: Any) -> dict[str, Any]:
    """The callback's arguments, the same for either adapter."""
    options: dict[str, Any] = {
        "problems": toy_problems(6),
        "tokenizer": char_tokenizer(),
        "grader": exact_match,
        "snapshot_at": 4,
        "eval_every_n_steps": 5,
        "num_samples": 4,
        "alphas": (0.5,),
        "final_alpha": "best",
        "max_new_tokens": 3,
        "sampling": {"problems_per_call": 2},  # 3 blocks: 2 on rank 0, 1 on rank 1
        "sample_logging": {"progress": False},
    }
    return {**options, **overrides}


def toy_train_set(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Every training pair as "a+b=c</s>" (6 tokens, no padding), labels = inputs."""
    rows = []
    for a, b in TRAIN_PAIRS:
        ids = tokenizer(f"{a}+{b}={(a + b) % 10}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return rows


def toy_arguments(out: Path, world_size: int = 1, **overrides: Any) -> TrainingArguments:
    """One batch of the whole training set per optimizer step (split over the ranks)."""
    options: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 16,
        "per_device_train_batch_size": len(TRAIN_PAIRS) // world_size,
        "train_sampling_strategy": "sequential",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**{**options, **overrides})


def toy_trainer(
    args: TrainingArguments,
    callbacks: list[TrainerCallback],
    trl: bool = False,
    lr: float = LEARNING_RATE,
    **kwargs: Any,
) -> Trainer:
    """A Trainer (or TRL SFTTrainer) on a fresh seed-0 tiny Llama with the toy's optimizer."""
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    common = {
        "model": model,
        "args": args,
        "train_dataset": toy_train_set(tokenizer),
        "processing_class": tokenizer,
        "callbacks": callbacks,
        "optimizers": (optimizer, None),
        **kwargs,
    }
    if trl:
        from trl import SFTTrainer

        trainer: Trainer = SFTTrainer(**common)
    else:
        trainer = Trainer(**common)
    trainer.model_accepts_loss_kwargs = False  # the model's mean loss, as in the Lightning toy
    return trainer


class WeightRecorder(TrainerCallback):
    """Placed before WiSEFTTrainerCallback: the weights after each step in `steps`, and before
    the merge (`premerge`), recorded independently of the callback."""

    def __init__(self, steps: tuple[int, ...] = ()) -> None:
        self.steps = steps
        self.at: dict[int, dict[str, torch.Tensor]] = {}
        self.premerge: dict[str, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step in self.steps:
            self.at[state.global_step] = weights(model)

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self.premerge = weights(model)


class Announcer(TrainerCallback):
    """Prints the step after every optimizer step, so that a parent process can kill us."""

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero:
            print(f"STEP {state.global_step}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from wise_callback import WiSEFTTrainerCallback

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--resume", action="store_true", help="from the last checkpoint in DIR")
    parser.add_argument("--trl", action="store_true", help="TRL's SFTTrainer")
    parser.add_argument("--sampler", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--temperature", type=float, default=1.0)
    parsed = parser.parse_args(argv)
    torch.set_num_threads(1)
    sampler_kwargs = {"max_model_len": 64, "progress": False} if parsed.sampler == "vllm" else {}
    callback = WiSEFTTrainerCallback(
        **toy_options(
            save_merged_to=parsed.out / "merged",
            sampler=parsed.sampler,
            temperature=parsed.temperature,
            sampling={"problems_per_call": 2, "sampler_kwargs": sampler_kwargs},
        )
    )
    recorder = WeightRecorder()
    world_size = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    args = toy_arguments(
        parsed.out, world_size, max_steps=parsed.max_steps, save_strategy="steps", save_steps=3
    )
    trainer = toy_trainer(args, [Announcer(), recorder, callback], trl=parsed.trl)
    trainer.train(resume_from_checkpoint=True if parsed.resume else None)
    rank = args.process_index
    save_file(weights(trainer.model), str(parsed.out / f"final_rank{rank}.safetensors"))
    if rank == 0:
        assert callback.snapshot is not None
        save_file(recorder.premerge, str(parsed.out / "premerge.safetensors"))
        tensors = {n: t.contiguous() for n, t in callback.snapshot.tensors.items()}
        save_file(tensors, str(parsed.out / "snapshot.safetensors"))
        summary = {
            "history": callback.history,
            "chosen_alpha": callback.chosen_alpha,
            "sampler": type(callback._sampler).__name__,
        }
        (parsed.out / "history.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
