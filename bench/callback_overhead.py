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
The same fit with transformers' `Trainer` and `WiSEFTTrainerCallback` gives the `hf_` keys
(the Hugging Face door's shares; `--no-hf` skips it). Goal: weight work under 2% of the
callback's work, for both doors. The last line printed is one JSON object.

    .venv/bin/python bench/callback_overhead.py [--steps 8] [--eval-every 4] [--problems 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from wise_callback import Snapshot, WiSEFTCallback
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.demo.sft import ChainDataModule, ChainSFTModule, collate
from wise_callback.demo.task import make_splits
from wise_callback.grading import exact_match


class Timings:
    """The timings of every evaluation a WiSE-FT callback ran (collected after each step)."""

    def __init__(self, wiseft) -> None:
        self.wiseft = wiseft
        self.timings: list[dict[str, float]] = []
        self._seen: object = None

    def collect(self) -> None:
        evaluation = self.wiseft.last_evaluation
        if evaluation is not None and evaluation is not self._seen:
            self._seen = evaluation
            self.timings.append({**evaluation.timings, "alphas": len(evaluation.results)})


class EvaluationTimes(Callback):
    """After WiSEFTCallback in the list: `Timings` of the Lightning door."""

    def __init__(self, wiseft: WiSEFTCallback) -> None:
        self.times = Timings(wiseft)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.collect()

    def on_train_end(self, trainer, pl_module) -> None:
        self.times.collect()


def callback_arguments(args, sampler) -> dict:
    """The callbacks' settings as the benches run them (either door): snapshot at 10% of the
    steps, an evaluation every `args.eval_every` steps, `args.samples` samples of
    `args.new_tokens` tokens per problem, exact-match grading, default alphas."""
    return {
        "grader": exact_match,
        "snapshot_at": 0.1,
        "eval_every_n_steps": args.eval_every,
        "num_samples": args.samples,
        "sampler": sampler,
        "max_new_tokens": args.new_tokens,
        "sample_logging": {"progress": False},
    }


def wiseft_callback(args, heldout, tokenizer, sampler) -> WiSEFTCallback:
    """The Lightning callback as the benches run it (also bench/gpu_smoke.py)."""
    return WiSEFTCallback(heldout, tokenizer, **callback_arguments(args, sampler))


def bench_model(args, tokenizer) -> torch.nn.Module:
    """A fresh Llama of `args.hidden` x `args.layers` (same seed every time)."""
    return tiny_llama(
        len(tokenizer),
        hidden_size=args.hidden,
        num_layers=args.layers,
        head_dim=64,
        seed=0,
        tokenizer=tokenizer,
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
    model = bench_model(args, tokenizer)
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
    return seconds, times.times.timings if times else [], model


def hf_fit(args, train, heldout):
    """The same fit with transformers' Trainer and WiSEFTTrainerCallback (same model, data,
    lr and settings); returns its wall time and the timings of the callback's evaluations."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from wise_callback import WiSEFTTrainerCallback

    tokenizer = char_tokenizer()
    model = bench_model(args, tokenizer)
    wiseft = WiSEFTTrainerCallback(heldout, tokenizer, **callback_arguments(args, "hf"))
    times = Timings(wiseft)

    class Collect(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            times.collect()

        def on_train_end(self, *_, **__) -> None:
            times.collect()

    with tempfile.TemporaryDirectory() as folder:
        options = TrainingArguments(
            output_dir=folder, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
            remove_unused_columns=False, use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=options, train_dataset=list(train),
            data_collator=partial(collate, tokenizer), callbacks=[wiseft, Collect()],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return seconds, times.timings


def shares(evaluations: list[dict[str, float]], snapshot_s: float) -> dict[str, float]:
    """Where the callback's work went: sampling, grading, weight work (the snapshot's capture
    and write, and every evaluation's backup, lerps, restore) and the rest (bookkeeping)."""
    total = snapshot_s + sum(t["total_s"] for t in evaluations)
    share = {k: sum(t[k] for t in evaluations) / total for k in ("sample_s", "grade_s")}
    share["weights_s"] = (snapshot_s + sum(t["weights_s"] for t in evaluations)) / total
    grid = [t for t in evaluations if t["alphas"] > 1]  # the periodic ones (current + alphas)
    return {
        "callback_work_s": round(total, 3),
        "share_sampling": round(share["sample_s"], 4),
        "share_grading": round(share["grade_s"], 4),
        "share_weights": round(share["weights_s"], 4),
        "share_other": round(1 - sum(share.values()), 4),
        "share_weights_in_evaluations": round(
            sum(t["weights_s"] for t in grid) / sum(t["total_s"] for t in grid), 4
        ),
    }


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
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Trainer run")
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
        **shares(evaluations, snapshot_s),
        "snapshot_bytes": snapshot["bytes"],
        "snapshot_capture_s": round(snapshot["capture_s"], 4),
        "snapshot_write_s": round(snapshot["write_s"], 4),
        "copy_s": round(snapshot["copy_s"], 4),
        "snapshot_capture_vs_copy": round(snapshot["capture_s"] / snapshot["copy_s"], 3),
    }
    result["weights_under_2pct"] = result["share_weights"] < 0.02
    if not args.no_hf:  # the Hugging Face door: the same work through WiSEFTTrainerCallback
        hf_fit(warm, train, heldout)
        hf_seconds, hf_evaluations = hf_fit(args, train, heldout)
        result["hf_fit_s_with_callback"] = round(hf_seconds, 3)
        result.update({f"hf_{k}": v for k, v in shares(hf_evaluations, snapshot_s).items()})
        result["hf_weights_under_2pct"] = result["hf_share_weights"] < 0.02
    print(json.dumps(result))


if __name__ == "__main__":
    main()
