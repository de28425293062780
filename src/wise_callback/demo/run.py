"""`wise-ft demo`: SFT of the shipped base on a small chain set, watched by `WiSEFTCallback`.

The run overfits a small fixed set of 3-step chains (the regime where diversity collapses) and
evaluates held-out chains every few hundred steps for the current weights and an alpha grid; the
callback warns when Pass@k collapses and merges the best alpha at the end. Outputs in the chosen
folder: history.jsonl, summary.json, report.png, and the Lightning logs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wise_callback.callback import WiSEFTCallback
from wise_callback.demo.model import char_tokenizer
from wise_callback.demo.pretrain import load_base_model
from wise_callback.demo.sft import ChainDataModule, ChainSFTModule
from wise_callback.demo.task import make_splits
from wise_callback.files import write_text_atomically
from wise_callback.grading import exact_match
from wise_callback.options import EvalOptions, SampleLogging, SamplingOptions
from wise_callback.report import format_table, ks_of, plot_history, table_rows


@dataclass(frozen=True)
class DemoSettings:
    """The SFT schedule and the evaluation settings of one demo run.

    Full mode overfits 256 problems for 500 epochs at a high constant learning rate, from a base
    that already solves a third of the 3-step chains greedily: the regime in which Pass@1 rises
    and Pass@k collapses. The snapshot at step 300 comes after SFT has finished the base's jump in
    skill on every seed tried; earlier snapshots caught it half-way on some data orders.
    """

    num_train: int = 256
    num_heldout: int = 256
    sft_steps: int = 2000
    lr: float = 2e-3
    batch_size: int = 64
    snapshot_at: int = 300
    eval_every_n_steps: int = 400
    num_samples: int = 32
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    max_new_tokens: int = 10
    temperature: float = 1.0


FULL = DemoSettings()
QUICK = DemoSettings(
    num_train=128,
    num_heldout=96,
    sft_steps=500,
    lr=1e-3,
    snapshot_at=50,
    eval_every_n_steps=250,
    num_samples=16,
    alphas=(0.5,),
)


FULL_GRID: dict[str, Any] = {"grid_every": 1, "halving": None}
"""The demo's evaluations: every alpha in full at every evaluation, for the curves of
report.png (the library's default samples the grid for the final choice only)."""


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    quick: bool = False,
    seed: int = 0,
    sampler: str = "hf",
    progress: bool = True,
    settings: DemoSettings | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo into `out_dir` and return its summary (also written to summary.json).
    `evaluation`: the callback's `EvalOptions` fields; None: `FULL_GRID` (the demo draws every
    alpha's curve over training); {}: the library's defaults."""
    settings = settings or (QUICK if quick else FULL)
    if sampler not in ("hf", "vllm"):
        raise ValueError(f"sampler must be 'hf' or 'vllm', got {sampler!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two here
    L.seed_everything(seed, workers=True, verbose=False)

    tokenizer = char_tokenizer()
    train, heldout = make_splits(seed, settings.num_train, settings.num_heldout)
    module = ChainSFTModule(load_base_model(tokenizer), lr=settings.lr)
    data = ChainDataModule(tokenizer, train, batch_size=settings.batch_size, seed=seed)
    callback = WiSEFTCallback(
        problems=[{"prompt": p["prompt"], "answer": p["answer"]} for p in heldout],
        tokenizer=tokenizer,
        grader=exact_match,
        snapshot_at=settings.snapshot_at,
        eval_every_n_steps=settings.eval_every_n_steps,
        num_samples=settings.num_samples,
        alphas=settings.alphas,
        final_alpha="best",
        sampler=sampler,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        sampling=SamplingOptions(stop=["\n"], seed=seed),
        sample_logging=SampleLogging(progress=progress),
        evaluation=EvalOptions(**(FULL_GRID if evaluation is None else evaluation)),
    )
    trainer = L.Trainer(
        max_steps=settings.sft_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        default_root_dir=out,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    elapsed = time.perf_counter() - start

    history = callback.history
    write_text_atomically(out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    plot_history(history, out / "report.png", chosen_alpha=callback.chosen_alpha)
    summary = {
        "seed": seed,
        "sampler": sampler,
        "settings": dataclasses.asdict(settings),
        "chosen_alpha": callback.chosen_alpha,
        "collapse_warning": callback.collapse_detected,
        "collapse_warning_step": callback.collapse_step,
        "spent": dict(callback.spent),
        "wall_time_s": round(elapsed, 1),
        "rows": table_rows(history),
        **_headline(history, callback.chosen_alpha),
        "heldout": heldout_part(callback.final_report),
    }
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if progress:
        print(format_table(history))
        print(format_heldout(summary["heldout"]))
        print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "settings")}))
    return summary


def heldout_part(report: dict[str, Any] | None) -> dict[str, Any]:
    """The final choice's numbers from problems that did not take part in choosing it
    (cross-fitted over two halves), the final weights' (never selected, so all problems), and the
    choice's held-out paired gain over them: Pass@1 and Pass@k (largest k) with standard errors."""
    if not report:
        return {}
    part: dict[str, Any] = {"alpha": report["alpha"]}
    keys = ("pass@1", "pass@1_se", "pass@k", "pass@k_se")
    places = (
        ("chosen", "heldout/chosen/"),
        ("final_weights", "current/"),
        ("gain", "heldout/gain/"),
    )
    for who, prefix in places:
        part[who] = {key: report.get(f"{prefix}{key}") for key in keys}
    part["alphas_chosen_on_each_half"] = report.get("heldout_alphas_by_half")
    return part


def format_heldout(part: dict[str, Any]) -> str:
    """The held-out part of the console table."""
    if not part:
        return "held-out: no merge"
    halves = part["alphas_chosen_on_each_half"]
    lines = [f"held-out (cross-fitted over two halves; the alpha chosen on each: {halves})"]
    for who, label in (("chosen", f"WiSE-FT a={part['alpha']:.2f}"), ("final_weights", "current")):
        numbers = part[who]
        lines.append(
            f"  {label:>16}: pass@1 {numbers['pass@1']:.3f} ± {numbers['pass@1_se']:.3f}   "
            f"pass@k {numbers['pass@k']:.3f} ± {numbers['pass@k_se']:.3f}"
        )
    gain = part["gain"]
    if gain.get("pass@k") is not None:
        lines.append(
            f"  {'paired gain':>16}: pass@1 {gain['pass@1']:+.3f} ± {gain['pass@1_se']:.3f}   "
            f"pass@k {gain['pass@k']:+.3f} ± {gain['pass@k_se']:.3f}"
        )
    return "\n".join(lines)


def _headline(history: list[dict[str, Any]], chosen_alpha: float | None) -> dict[str, Any]:
    """The numbers the README reports: Pass@k (largest k) at the end vs its best earlier value,
    Pass@1 early vs end, and the chosen WiSE-FT vs the final weights on both."""
    k = max(ks_of(history[:1]))  # pass@k keys only (not pass@k_se)
    top = f"pass@{k}"
    current = [r for r in history if r["alpha"] in (0.0, 1.0)]
    early, final = current[0], current[-1]
    best_before = max(current[:-1], key=lambda r: r[top])
    wise = next(
        (r for r in history if r["step"] == final["step"] and r["alpha"] == chosen_alpha), final
    )
    return {
        "k": k,
        f"{top}_best_before_end": best_before[top],
        f"{top}_best_step": best_before["step"],
        f"{top}_end": final[top],
        "pass@1_early": early["pass@1"],
        "pass@1_end": final["pass@1"],
        f"{top}_wiseft": wise[top],
        "pass@1_wiseft": wise["pass@1"],
    }
