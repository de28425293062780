"""What WiSEFTCallback costs a training run, and where its time goes.

Side by side in one process, on the demo's chain-arithmetic SFT task with a Llama of ~113M
parameters built from a config (hidden 768, 12 layers, random init: large enough that a copy of
the weights costs real time next to the Python overhead of sampling a few tokens):
  * the wall time of `Trainer.fit` without and with the callback (snapshot at 10% of the steps,
    an evaluation every `--eval-every` steps, `--samples` samples of `--new-tokens` tokens on
    `--problems` held-out problems, alphas 0.25/0.5/0.75, temperature 1, HF sampler, exact-match
    grading);
  * the split of the callback's work into sampling, grading and weight work, plus the rest
    (gathering, metrics, logging). Weight work is the snapshot's capture and its write to disk
    (once per run, timed on the trained model with the same calls the callback makes) plus, in
    every evaluation, the backup, one lerp per alpha and the restore. `share_weights` is over the
    whole run (snapshot + every evaluation); `share_weights_in_evaluations` leaves the snapshot
    out and counts only the alpha-grid evaluations (what this bench reported before);
  * one `Snapshot.capture` next to one plain copy of the same weights.
Goal: weight work under 2% of the callback's work. The last line printed is one JSON object.

    .venv/bin/python bench/callback_overhead.py [--steps 8] [--eval-every 4] [--problems 2]
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


def wiseft_callback(args, heldout, tokenizer, sampler) -> WiSEFTCallback:
    """The callback as the benches run it (also bench/gpu_smoke.py): snapshot at 10% of the
    steps, an evaluation every `args.eval_every` steps, `args.samples` samples of
    `args.new_tokens` tokens per problem, exact-match grading, default alphas."""
    return WiSEFTCallback(
        heldout,
        tokenizer,
        grader=exact_match,
        snapshot_at=0.1,
        eval_every_n_steps=args.eval_every,
        num_samples=args.samples,
        sampler=sampler,
        max_new_tokens=args.new_tokens,
        sample_logging={"progress": False},
    )


def quiet_trainer(callbacks: list[Callback], **options) -> pl.Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def fit(args, train, heldout, with_callback: bool):
    """One fit of a fresh model (same seed every time); returns its wall time, the timings of
    the callback's evaluations, and the trained model."""
    tokenizer = char_tokenizer()
    model = tiny_llama(
        len(tokenizer),
        hidden_size=args.hidden,
        num_layers=args.layers,
        head_dim=64,
        seed=0,
        tokenizer=tokenizer,
    )
    module = ChainSFTModule(model, lr=1e-4)
    data = ChainDataModule(tokenizer, train, batch_size=args.batch_size, seed=0)
    callbacks: list[Callback] = []
    times = None
    if with_callback:
        wiseft = wiseft_callback(args, heldout, tokenizer, sampler="hf")
        times = EvaluationTimes(wiseft)
        callbacks = [wiseft, times]
    with tempfile.TemporaryDirectory() as folder:  # the snapshot and history.jsonl go here
        trainer = quiet_trainer(
            callbacks, accelerator="cpu", max_steps=args.steps, default_root_dir=folder
        )
        start = time.perf_counter()
        trainer.fit(module, data)
        seconds = time.perf_counter() - start
    return seconds, times.timings if times else [], model


def snapshot_work(model: torch.nn.Module, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the snapshot's two steps as the callback takes them (capture to CPU,
    then save to a safetensors file), and of one clone of every weight tensor."""
    tensors = [t.detach() for t in [*model.parameters(), *model.buffers()]]
    capture, write, copy = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            start = time.perf_counter()
            snapshot = Snapshot.capture(model)
            capture.append(time.perf_counter() - start)
            start = time.perf_counter()
            snapshot.save(f"{folder}/snapshot.safetensors")
            write.append(time.perf_counter() - start)
            start = time.perf_counter()
            [t.clone() for t in tensors]
            copy.append(time.perf_counter() - start)
    return {
        "capture_s": statistics.median(capture),
        "write_s": statistics.median(write),
        "copy_s": statistics.median(copy),
        "bytes": snapshot.nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    train, heldout = make_splits(0, 512, args.problems)
    heldout = [{"prompt": p["prompt"], "answer": p["answer"]} for p in heldout]

    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    for with_callback in (False, True):  # one-time costs (first sampling, first weight
        fit(warm, train, heldout, with_callback)  # sweep, ...) land in neither measured run
    fit_without, _, _ = fit(args, train, heldout, with_callback=False)
    fit_with, evaluations, model = fit(args, train, heldout, with_callback=True)
    snapshot = snapshot_work(model)
    snapshot_s = snapshot["capture_s"] + snapshot["write_s"]

    total = snapshot_s + sum(t["total_s"] for t in evaluations)
    share = {k: sum(t[k] for t in evaluations) / total for k in ("sample_s", "grade_s")}
    share["weights_s"] = (snapshot_s + sum(t["weights_s"] for t in evaluations)) / total
    grid = [t for t in evaluations if t["alphas"] > 1]  # the periodic ones (current + alphas)
    grid_share = sum(t["weights_s"] for t in grid) / sum(t["total_s"] for t in grid)
    result = {
        "bench": "callback_overhead",
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "problems": args.problems,
        "samples": args.samples,
        "new_tokens": args.new_tokens,
        "evaluations": len(evaluations),
        "fit_s_without_callback": round(fit_without, 3),
        "fit_s_with_callback": round(fit_with, 3),
        "fit_ratio_with_vs_without": round(fit_with / fit_without, 3),
        "callback_work_s": round(total, 3),
        "share_sampling": round(share["sample_s"], 4),
        "share_grading": round(share["grade_s"], 4),
        "share_weights": round(share["weights_s"], 4),
        "share_other": round(1 - sum(share.values()), 4),
        "share_weights_in_evaluations": round(grid_share, 4),
        "snapshot_bytes": snapshot["bytes"],
        "snapshot_capture_s": round(snapshot["capture_s"], 4),
        "snapshot_write_s": round(snapshot["write_s"], 4),
        "copy_s": round(snapshot["copy_s"], 4),
        "snapshot_capture_vs_copy": round(snapshot["capture_s"] / snapshot["copy_s"], 3),
        "weights_under_2pct": share["weights_s"] < 0.02,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
