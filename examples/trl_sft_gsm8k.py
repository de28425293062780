"""TRL SFTTrainer on GSM8K with a reasoning model, watched by WiSEFTTrainerCallback (GPU, vLLM).

    pip install "wise-callback[hf,vllm,math]" trl
    python examples/trl_sft_gsm8k.py                                  # one GPU
    accelerate launch --num_processes 8 examples/trl_sft_gsm8k.py     # 8 GPUs (DDP or FSDP2)

Needs: a CUDA GPU (one 40 GB GPU holds the 1.5B model trained in bf16 and vLLM at
gpu_memory_utilization=0.25) and the Hugging Face hub for the model and GSM8K. SFTTrainer trains on
the completions of GSM8K's train split (conversational prompt-completion rows: the loss is on the
completion only). The callback follows the Trainer's own evaluations (`eval_steps`): each time it
samples 16 answers for held-out test problems (read with `wise_callback.problems.load_problems`,
which knows GSM8K's layout) with an in-process vLLM engine fed the live and interpolated weights,
grades them with math-verify and adds Pass@k, Maj@k and the collapse terms for the current weights
and an alpha grid (at every evaluation, because the Trainer selects its best checkpoint by it) to
the Trainer's log (`trainer.state.log_history`, TensorBoard, W&B, ...). The
checkpoint kept at the end is the one whose best interpolant scored highest
(`metric_for_best_model="wiseft/best/pass@16"`); it is merged with its best alpha and saved to
OUT/merged.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from wise_callback import WiSEFTTrainerCallback
from wise_callback.grading import math_verify_match
from wise_callback.problems import load_problems

INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


def sft_row(row: Mapping[str, str]) -> dict[str, list[dict[str, str]]]:
    """A GSM8K row as a conversational prompt-completion example: the question (with the
    instruction) as the user turn, the reasoning ending in a boxed answer as the assistant's."""
    reasoning, final = row["answer"].rsplit("####", 1)
    final = final.strip().replace(",", "")
    completion = f"{reasoning.strip()}\nThe answer is \\boxed{{{final}}}."
    return {
        "prompt": [{"role": "user", "content": f"{row['question']}\n{INSTRUCTION}"}],
        "completion": [{"role": "assistant", "content": completion}],
    }


def eval_problems(rows: Any, count: int) -> list[dict[str, Any]]:
    """The first `count` GSM8K rows as evaluation problems, the instruction after the question."""
    return load_problems(rows, instruction=INSTRUCTION)[:count]


def make_callback(
    problems: list[dict[str, Any]], out: str, sampler: str = "vllm", max_new_tokens: int = 1024
) -> WiSEFTTrainerCallback:
    """Follow the Trainer's evaluations; sample with vLLM; chat-format the prompts."""
    return WiSEFTTrainerCallback(
        problems=problems,
        grader=math_verify_match,
        snapshot_at=0.1,
        eval_every_n_steps=None,  # the Trainer's eval_steps
        num_samples=16,
        ks=(1, 4, 16),
        alphas=(0.25, 0.5, 0.75),
        final_alpha="best",
        select_metric="pass@16",
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        temperature=0.6,
        save_merged_to=f"{out}/merged",
        sampling={
            "top_p": 0.95,
            "apply_chat_template": True,
            "sampler_kwargs": {"gpu_memory_utilization": 0.25} if sampler == "vllm" else {},
        },
    )


def make_config(args: argparse.Namespace) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        bf16=args.bf16,
        model_init_kwargs={"dtype": "bfloat16" if args.bf16 else "float32"},
        max_length=1024,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        per_device_eval_batch_size=args.batch_size,
        save_strategy="steps",
        save_steps=args.eval_steps,
        save_total_limit=3,
        load_best_model_at_end=True,
        metric_for_best_model="wiseft/best/pass@16",
        logging_steps=10,
        report_to=["tensorboard"],
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-problems", type=int, default=256)
    parser.add_argument("--out", default="out/trl-gsm8k")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    from datasets import load_dataset
    from trl import SFTTrainer

    gsm8k = load_dataset("openai/gsm8k", "main")
    test = gsm8k["test"].shuffle(seed=0)
    trainer = SFTTrainer(
        model=args.model,
        args=make_config(args),
        train_dataset=gsm8k["train"].map(sft_row, remove_columns=["question", "answer"]),
        eval_dataset=test.select(range(256, 512)).map(
            sft_row, remove_columns=["question", "answer"]
        ),
        callbacks=[make_callback(eval_problems(test, args.eval_problems), args.out)],
    )
    trainer.train()
    print(trainer.state.best_model_checkpoint, trainer.state.best_metric)


if __name__ == "__main__":
    main()
