"""Issue 13's measurements on the demo: when the Pass@k drop becomes significant, which
indicator (if any) leads it, and what the final choice of alpha is worth on held-out problems.

One seed per run. It trains the demo's full SFT (`wise_callback.demo.run.FULL`) with a small
callback that saves the weights every `--every` steps, then evaluates them offline with
`wise_callback.evaluate.evaluate` under the demo's evaluation settings (same problems, same
per-evaluation seeds, same sampler batching), so every number is the one `WiSEFTCallback` would
log at that step. Training is unchanged by the saving (no RNG is drawn), and the callback's
evaluations restore every RNG, so the trajectory is the demo's.

Printed last (and written to `--out`): one JSON object with
- `evaluations`: per step, Pass@1, Pass@k, the paired drop of Pass@k from the best evaluation so
  far (SE, z), and each leading indicator's paired change from the fixed early checkpoint (z);
- `collapse`: the step at which each rule would fire (the paired rule, z >= 2, on the dense
  schedule and on the demo's; the old rule, drop >= 0.02 twice in a row, on the demo's schedule);
- `indicators`: the first step each indicator is significant in the collapse direction, and its
  lead in steps over the paired Pass@k rule on the dense schedule;
- `final`: for the fixed and the "peak" early checkpoint, with and without keep_pass1, the report
  of `comparisons.final_choice` plus the cross-fitted paired gain over the final weights.

    PYTHONPATH=src python scripts/collapse_study.py --seed 0 --out study_seed0.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from wise_callback.collapse import CollapseWatch
from wise_callback.comparisons import final_choice, per_problem_values
from wise_callback.demo.model import char_tokenizer
from wise_callback.demo.pretrain import load_base_model
from wise_callback.demo.run import FULL, DemoSettings
from wise_callback.demo.sft import ChainDataModule, ChainSFTModule
from wise_callback.demo.task import make_splits
from wise_callback.eval_config import CURRENT, EvalConfig
from wise_callback.evaluate import evaluate
from wise_callback.files import write_text_atomically
from wise_callback.grading import exact_match
from wise_callback.metrics import answer_diversity
from wise_callback.paired import (
    Candidate,
    best_alpha_rule,
    cross_fitted_choice,
    paired_difference,
    z_score,
)
from wise_callback.results import AlphaResult
from wise_callback.sampling import SamplingConfig
from wise_callback.sampling.hf import HFSampler
from wise_callback.weights import Snapshot, named_float_tensors

MIN_DROP = 0.02  # the collapse watch's default minimum drop of Pass@k
Z = 2.0  # significance threshold (collapse watch, indicators, keep_pass1)
OLD_EVERY = 400  # the demo's evaluation schedule (after the snapshot)
INDICATORS = {  # name -> +1 if collapse raises it, -1 if collapse lowers it
    "var_rho": 1,
    "frac_rho1": 1,
    "answer_entropy": -1,
    "distinct_answers": -1,
}


class SaveWeights(L.Callback):
    """Saves the model's weights (a `Snapshot` file, safetensors) after the listed steps."""

    def __init__(self, steps: set[int], folder: Path):
        self.steps, self.folder = steps, folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps:
            Snapshot.capture(pl_module.model, step=step).save(self.folder / f"{step}.safetensors")


def train(seed: int, settings: DemoSettings, steps: set[int], folder: Path) -> list[dict]:
    """The demo's SFT for `seed`, saving the weights at `steps`; returns the held-out problems."""
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = char_tokenizer()
    train_set, heldout = make_splits(seed, settings.num_train, settings.num_heldout)
    module = ChainSFTModule(load_base_model(tokenizer), lr=settings.lr)
    data = ChainDataModule(tokenizer, train_set, batch_size=settings.batch_size, seed=seed)
    trainer = L.Trainer(
        max_steps=settings.sft_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[SaveWeights(steps, folder)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return [{"prompt": p["prompt"], "answer": p["answer"]} for p in heldout]


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy the saved weights into `model`, by name."""
    saved = Snapshot.load(path).tensors
    with torch.no_grad():
        for name, tensor in named_float_tensors(model).items():
            tensor.copy_(saved[name])


def per_problem_indicators(result: AlphaResult) -> dict[str, np.ndarray]:
    """Per-problem values whose means are Pass@1, Pass@k (largest k), Var(rho) (each problem's
    (rho - mean rho)^2: its influence on the variance, so paired differences of it give the
    delta-method SE), the share at rho = 1, answer entropy and distinct answers."""
    n = np.array([len(p.correct) for p in result.problems], dtype=np.float64)
    c = np.array([p.num_correct for p in result.problems], dtype=np.float64)
    rho = c / n
    diversity = answer_diversity([p.answers for p in result.problems])
    return {
        "pass1": rho,
        "passk": (c > 0).astype(np.float64),  # Pass@n with k = n samples
        "var_rho": (rho - rho.mean()) ** 2,
        "frac_rho1": (c == n).astype(np.float64),
        "answer_entropy": diversity.entropy,
        "distinct_answers": diversity.distinct.astype(np.float64),
    }


def watch_steps(records: list[dict], values: dict[int, np.ndarray], watch: CollapseWatch) -> dict:
    """Feed `records` (in step order) to a collapse watch; the step it fires at (or None)."""
    for record in records:
        record = {**record, **watch.compare(values[record["step"]])}
        info = watch.update(record, values[record["step"]])
        if info is not None:
            return {"step": record["step"], **{k: info[k] for k in ("best_step", "z")}}
    return {"step": None}


def collapse_table(
    records: dict[int, dict], values: dict[int, dict[str, np.ndarray]], fixed: int, k_key: str
) -> tuple[list[dict], dict]:
    """Per step: the paired drop of Pass@k from the best evaluation so far, and each indicator's
    paired change from the fixed early checkpoint; and the steps at which each rule fires."""
    steps = sorted(records)
    rows, best = [], None
    for step in steps:
        row: dict[str, Any] = {
            "step": step,
            "pass@1": records[step]["mean_rho"],
            k_key: records[step][k_key],
        }
        if best is not None:
            drop, se = paired_difference(values[best]["passk"], values[step]["passk"])
            row.update(best_step=best, drop=drop, drop_se=se, drop_z=z_score(drop, se))
        if best is None or records[step][k_key] > records[best][k_key]:
            best = step
        if step > fixed:
            for name, sign in INDICATORS.items():
                change, se = paired_difference(values[step][name], values[fixed][name])
                z = z_score(sign * change, se)
                row[name] = float(values[step][name].mean())
                row[f"{name}_change"], row[f"{name}_z"] = change, z
        rows.append(row)
    passk = {s: values[s]["passk"] for s in steps}
    as_record = [
        {"step": s, k_key: records[s][k_key], "mean_rho": records[s]["mean_rho"]} for s in steps
    ]
    old_schedule = [r for r in as_record if r["step"] == fixed or r["step"] % OLD_EVERY == 0]
    old_schedule = [r for r in old_schedule if r["step"] >= fixed]
    rules = {
        "paired_dense": watch_steps(as_record, passk, CollapseWatch(MIN_DROP, 1, k_key, Z)),
        "paired_demo_schedule": watch_steps(
            old_schedule, passk, CollapseWatch(MIN_DROP, 1, k_key, Z)
        ),
        "old_demo_schedule": watch_steps(
            old_schedule, passk, CollapseWatch(MIN_DROP, 2, k_key, 0.0)
        ),
    }
    return rows, rules


def first_significant(rows: list[dict], collapse_step: int | None) -> dict[str, dict]:
    """Per indicator: the first step with z >= Z in the collapse direction, and its lead (steps)
    over the paired Pass@k rule (positive: earlier)."""
    out = {}
    for name in INDICATORS:
        step = next((r["step"] for r in rows if (r.get(f"{name}_z") or 0.0) >= Z), None)
        lead = None if step is None or collapse_step is None else collapse_step - step
        out[name] = {"first_step": step, "lead_steps": lead}
    return out


def final_reports(results: list[AlphaResult], k_key: str, max_k: int, seed: int) -> dict:
    """With and without keep_pass1: `final_choice`'s report, plus the cross-fitted paired gain
    of the choice over the final weights (Pass@1 and Pass@k, with SE)."""
    values = per_problem_values(results, k_key, max_k)
    current = values[CURRENT]
    out = {}
    for keep in (False, True):
        _, report = final_choice(values, keep, Z, seed)
        candidates = [
            Candidate(
                alpha,
                {
                    **row,
                    "gain1": row["pass1"] - current["pass1"],
                    "gaink": row["passk"] - current["passk"],
                },
            )
            for alpha, row in sorted(values.items())
        ]
        held = cross_fitted_choice(candidates, best_alpha_rule(keep, Z), seed)
        for name, label in (("gain1", "pass@1"), ("gaink", "pass@k")):
            mean, se = held.estimates[name]
            report[f"heldout/gain/{label}"], report[f"heldout/gain/{label}_se"] = mean, se
        report["in_sample"] = {
            f"{alpha}": {"pass@1": float(r["pass1"].mean()), "pass@k": float(r["passk"].mean())}
            for alpha, r in sorted(values.items())
        }
        out[f"keep_pass1={keep}"] = report
    return out


def study(
    seed: int, settings: DemoSettings, every: int, fixed: int, alphas: tuple[float, ...]
) -> dict:
    """Train, save, evaluate, analyse one seed."""
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    steps = set(range(every, settings.sft_steps + 1, every)) | {fixed}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tick = time.perf_counter()
        problems = train(seed, settings, steps, folder)
        timings["train_s"] = time.perf_counter() - tick
        tokenizer = char_tokenizer()
        model = load_base_model(tokenizer)
        sampler = HFSampler(model, tokenizer, progress=False)
        config = EvalConfig(
            num_samples=settings.num_samples,
            sampling=SamplingConfig(
                temperature=settings.temperature,
                max_new_tokens=settings.max_new_tokens,
                stop=("\n",),
                seed=seed,
            ),
            problems_per_call=8,
        )
        k_key = f"pass@{config.max_k}"

        def run(step: int, early: int | None = None) -> list[AlphaResult]:
            load_weights(model, folder / f"{step}.safetensors")
            snapshot = None if early is None else Snapshot.load(folder / f"{early}.safetensors")
            grid = (CURRENT,) if early is None else (*alphas, CURRENT)
            return evaluate(
                model,
                snapshot,
                problems,
                sampler,
                exact_match,
                config,
                alphas=grid,
                step=step,
                progress=False,
            ).results

        tick = time.perf_counter()
        records, values = {}, {}
        for step in sorted(steps):
            (result,) = run(step)
            records[step], values[step] = result.metrics, per_problem_indicators(result)
            print(
                f"seed {seed} step {step}: {k_key} {result.metrics[k_key]:.4f} "
                f"pass@1 {result.metrics['mean_rho']:.4f}",
                file=sys.stderr,
                flush=True,
            )
        timings["evaluate_current_s"] = time.perf_counter() - tick
        rows, rules = collapse_table(records, values, fixed, k_key)
        cutoff = settings.sft_steps // 2
        peak = max((s for s in sorted(steps) if s <= cutoff), key=lambda s: records[s][k_key])
        tick = time.perf_counter()
        last = settings.sft_steps
        final = {
            "fixed": {
                "early_step": fixed,
                **final_reports(run(last, fixed), k_key, config.max_k, seed),
            }
        }
        final["peak"] = {
            "early_step": peak,
            **final_reports(run(last, peak), k_key, config.max_k, seed),
        }
        timings["evaluate_grids_s"] = time.perf_counter() - tick
    return {
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "every": every,
        "fixed_step": fixed,
        "peak_cutoff": cutoff,
        "alphas": [*alphas, CURRENT],
        "k": config.max_k,
        "collapse": rules,
        "indicators": first_significant(rows, rules["paired_dense"]["step"]),
        "final": final,
        "evaluations": rows,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def _pm(report: dict, key: str) -> str:
    return f"{report[key]:.3f} ± {report[key + '_se']:.3f}"


def fire_step(rows: list[dict], patience: int) -> int | None:
    """The step at which the paired rule (drop >= MIN_DROP, z >= Z, Pass@1 not below its value
    at the best) fires after `patience` collapsing evaluations in a row, from a study's rows."""
    pass1 = {r["step"]: r["pass@1"] for r in rows}
    streak = 0
    for r in rows:
        collapsing = (
            r.get("drop_z") is not None
            and r["drop"] >= MIN_DROP
            and r["drop_z"] >= Z
            and r["pass@1"] >= pass1[r["best_step"]]
        )
        streak = streak + 1 if collapsing else 0
        if streak >= patience:
            return r["step"]
    return None


def tables(studies: list[dict]) -> str:
    """The README's three tables (markdown) from the JSON of several seeds."""
    lines = [
        "| seed | early checkpoint | alpha (halves) | held-out Pass@k | held-out Pass@1 "
        "| held-out gain Pass@k | held-out gain Pass@1 | final weights Pass@k | Pass@1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in studies:
        for kind in ("fixed", "peak"):
            r = s["final"][kind]["keep_pass1=False"]
            lines.append(
                f"| {s['seed']} | {kind} (step {s['final'][kind]['early_step']}) | {r['alpha']} "
                f"({', '.join(map(str, r['heldout_alphas_by_half']))}) "
                f"| {_pm(r, 'heldout/chosen/pass@k')} | {_pm(r, 'heldout/chosen/pass@1')} "
                f"| {_pm(r, 'heldout/gain/pass@k')} | {_pm(r, 'heldout/gain/pass@1')} "
                f"| {_pm(r, 'current/pass@k')} | {_pm(r, 'current/pass@1')} |"
            )
    lines += [
        "",
        "| seed | early checkpoint | keep_pass1 | alpha (halves) | held-out Pass@k "
        "| held-out Pass@1 | held-out gain Pass@k | held-out gain Pass@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in studies:
        for kind in ("fixed", "peak"):
            for keep in (False, True):
                r = s["final"][kind][f"keep_pass1={keep}"]
                lines.append(
                    f"| {s['seed']} | {kind} | {keep} | {r['alpha']} "
                    f"({', '.join(map(str, r['heldout_alphas_by_half']))}) "
                    f"| {_pm(r, 'heldout/chosen/pass@k')} | {_pm(r, 'heldout/chosen/pass@1')} "
                    f"| {_pm(r, 'heldout/gain/pass@k')} | {_pm(r, 'heldout/gain/pass@1')} |"
                )
    names = list(INDICATORS)
    lines += [
        "",
        "| seed | paired rule, every 100 | same, 2 in a row | paired rule, demo schedule "
        "| old rule, demo schedule | " + " | ".join(f"{n}: first (lead)" for n in names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for s in studies:
        c, ind = s["collapse"], s["indicators"]
        cells = [f"{ind[n]['first_step']} ({ind[n]['lead_steps']})" for n in names]
        lines.append(
            f"| {s['seed']} | {c['paired_dense']['step']} | {fire_step(s['evaluations'], 2)} "
            f"| {c['paired_demo_schedule']['step']} "
            f"| {c['old_demo_schedule']['step']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="a short run to check the pipeline")
    parser.add_argument("--tables", type=Path, nargs="+", help="print the README tables of these")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables([json.loads(path.read_text()) for path in args.tables]))
        return
    if args.seed is None or args.out is None:
        parser.error("--seed and --out are needed (or --tables)")
    settings, every, fixed = FULL, 100, FULL.snapshot_at
    if args.quick:
        settings = dataclasses.replace(FULL, sft_steps=400, num_heldout=32, num_samples=8)
        every, fixed = 100, 100
    result = study(args.seed, settings, every, fixed, FULL.alphas)
    text = json.dumps(result, indent=1)
    write_text_atomically(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
