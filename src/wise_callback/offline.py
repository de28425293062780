"""`wise-ft eval`: the callback's evaluation, offline, on two saved Hugging Face checkpoints.

The latest checkpoint is loaded as the model; the early one is read once into a `Snapshot`
(matched to the model by tensor name) and dropped, so peak memory is about two models while
loading and one model plus the snapshot after. Alpha 0 (the early weights) and 1 (the latest) are
always evaluated next to the grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from wise_callback.evaluate import EvalConfig, Evaluation, check_alphas, evaluate
from wise_callback.grading import Grader
from wise_callback.problems import check_problems, format_prompts
from wise_callback.sampling.factory import make_sampler
from wise_callback.weights import Snapshot


def evaluate_checkpoints(
    early_dir: str | os.PathLike[str],
    latest_dir: str | os.PathLike[str],
    problems: Sequence[Mapping[str, Any]],
    grader: Grader | str,
    config: EvalConfig,
    *,
    alphas: Sequence[float] = (0.25, 0.5, 0.75),
    sampler: str = "hf",
    sampler_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate theta(alpha) = (1 - alpha) * early + alpha * latest for alpha in {0, *alphas, 1}.

    Records carry step 0 (no training step applies). The model keeps the latest checkpoint's dtype;
    the tokenizer comes from the latest folder (chat-message prompts go through its chat
    template).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grid = check_alphas([0.0, *alphas, 1.0])
    problems = check_problems(problems)
    for folder in (early_dir, latest_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    early = AutoModelForCausalLM.from_pretrained(early_dir, dtype="auto")
    snapshot = Snapshot.capture(early)
    del early
    model = AutoModelForCausalLM.from_pretrained(latest_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(latest_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    problems = format_prompts(problems, tokenizer, apply_chat_template=False)  # chat messages
    chosen = make_sampler(sampler, model, tokenizer, sampler_options)
    return evaluate(
        model, snapshot, problems, chosen, grader, config, alphas=grid, step=0, progress=progress
    )
