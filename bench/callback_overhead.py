"""What WiSEFTCallback costs a training run, and where an evaluation's time goes.

Side by side in one process, on the demo's chain-arithmetic SFT task with a tiny Llama:
  * the wall time of `Trainer.fit` without and with the callback at its default settings
    (snapshot at 10% of the steps, evaluation every 100 steps, 16 samples, alphas 0.25/0.5/0.75,
    64 new tokens, temperature 1, HF sampler, exact-match grading);
  * the split of each evaluation's time into sampling, grading and weight work (backup, one lerp
    per alpha, restore), plus the rest (gathering, metrics, logging);
  * one `Snapshot.capture` next to one plain copy of the same weights (a ~25M-parameter Llama).
Goal: weight work under 2% of an evaluation. The last line printed is one JSON object.

    .venv/bin/python bench/callback_overhead.py [--steps 200] [--problems 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from wise_callback import Snapshot, WiSEFTCallback
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.demo.sft import ChainDataModule, ChainSFTModule
from wise_callback.demo.task import make_splits
from wise_callback.grading import exact_match


class EvaluationTimes(Callback):
    """After WiSEFTCallback in the list: the timings of every evaluation it ran."""

    def __init__(self, wiseft: WiSEFTCallback) -> None:
        self.wiseft = wiseft
        self.timings: list[dict[str, float]] = []
        self._seen: object = None

    def _collect(self) -> None:
        evaluation = self.wiseft.last_evaluation
        if evaluation is not None and evaluation is not self._seen:
            self._seen = evaluation
            self.timings.append({**evaluation.timings, "alphas": len(evaluation.results)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect()

    def on_train_end(self, trainer, pl_module) -> None:
        self._collect()


def fit(train, heldout, steps: int, with_callback: bool) -> tuple[float, list[dict[str, float]]]:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    module = ChainSFTModule(model, lr=1e-3)
    data = ChainDataModule(tokenizer, train, batch_size=32, seed=0)
    callbacks: list[Callback] = []
    times = None
    if with_callback:
        wiseft = WiSEFTCallback(heldout, tokenizer, grader=exact_match, progress=False)
        times = EvaluationTimes(wiseft)
        callbacks = [wiseft, times]
    with tempfile.TemporaryDirectory() as folder:  # the snapshot and history.jsonl go here
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
        )
        start = time.perf_counter()
        trainer.fit(module, data)
        seconds = time.perf_counter() - start
    return seconds, times.timings if times else []


def snapshot_vs_copy(repeats: int = 10) -> tuple[float, float, int]:
    """Median seconds of one Snapshot.capture and of one clone of every weight tensor, on a
    ~25M-parameter Llama (the tiny one is too small to time anything but Python overhead)."""
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=512, num_layers=8, head_dim=64, seed=0)
    tensors = [t.detach() for t in [*model.parameters(), *model.buffers()]]
    snap, copy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        Snapshot.capture(model)
        snap.append(time.perf_counter() - start)
        start = time.perf_counter()
        [t.clone() for t in tensors]
        copy.append(time.perf_counter() - start)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return statistics.median(snap), statistics.median(copy), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--problems", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, heldout = make_splits(0, 512, args.problems)
    heldout = [{"prompt": p["prompt"], "answer": p["answer"]} for p in heldout]

    fit(train, heldout, 5, with_callback=False)  # warm-up: one-time costs land in neither run
    fit_without, _ = fit(train, heldout, args.steps, with_callback=False)
    fit_with, evaluations = fit(train, heldout, args.steps, with_callback=True)
    snapshot_s, copy_s, snapshot_bytes = snapshot_vs_copy()

    grid = [t for t in evaluations if t["alphas"] > 1]  # the periodic ones (current + alphas)
    total = sum(t["total_s"] for t in grid)
    share = {k: sum(t[k] for t in grid) / total for k in ("sample_s", "grade_s", "weights_s")}
    share["push_s"] = sum(t["push_s"] for t in grid) / total
    result = {
        "bench": "callback_overhead",
        "steps": args.steps,
        "problems": args.problems,
        "evaluations": len(evaluations),
        "fit_s_without_callback": round(fit_without, 3),
        "fit_s_with_callback": round(fit_with, 3),
        "fit_ratio_with_vs_without": round(fit_with / fit_without, 3),
        "eval_s_mean": round(total / len(grid), 3),
        "share_sampling": round(share["sample_s"], 4),
        "share_grading": round(share["grade_s"], 4),
        "share_weights": round(share["weights_s"], 5),
        "share_other": round(1 - sum(share.values()), 4),
        "snapshot_bytes": snapshot_bytes,
        "snapshot_s": round(snapshot_s, 6),
        "copy_s": round(copy_s, 6),
        "snapshot_vs_copy": round(snapshot_s / copy_s, 3),
        "weights_under_2pct": share["weights_s"] < 0.02,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
