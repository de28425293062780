"""From one evaluation to the paired numbers the decisions use: per-problem values per alpha,
each alpha's paired gain over the current weights, and the final choice of alpha with its
cross-fitted (held-out) estimates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from wise_callback.eval_config import CURRENT
from wise_callback.paired import (
    Candidate,
    best_alpha_rule,
    cross_fitted_choice,
    mean_and_se,
    paired_difference,
    per_problem,
)
from wise_callback.results import AlphaResult

PAIRED_KEYS = (
    "gain_vs_current",
    "gain_vs_current_se",
    "pass1_gain_vs_current",
    "pass1_gain_vs_current_se",
    "collapse_drop",
    "collapse_drop_se",
    "collapse_z",
    "collapse_risk",
)
"""What the core adds to an evaluation's records: paired comparisons with other evaluations."""

PerProblem = dict[float, dict[str, np.ndarray]]
"""{alpha: {"score": the selection metric, "pass1": Pass@1, "passk": Pass@(largest k)}}, each
an array over the problems scored, in problem order."""


def per_problem_values(results: list[AlphaResult], select_metric: str, max_k: int) -> PerProblem:
    """The per-problem values of the selection metric, Pass@1 and Pass@(largest k) per alpha
    (no "score" when the selection metric is not a mean over problems)."""
    values: PerProblem = {}
    for result in results:
        row = {
            "pass1": problem_values(result, "pass1"),
            "passk": problem_values(result, f"pass@{max_k}"),
            "score": problem_values(result, select_metric),
        }
        values[result.alpha] = {k: v for k, v in row.items() if v is not None}
    return values


def problem_values(result: AlphaResult, metric: str) -> np.ndarray | None:
    """One alpha's per-problem values of `metric` (`paired.per_problem`), None for a metric
    that is not a mean over problems."""
    problems = result.problems
    return per_problem(
        metric,
        [len(p.correct) for p in problems],
        [p.num_correct for p in problems],
        [p.answers for p in problems],
        [p.correct for p in problems],
    )


def add_gains(records: list[dict[str, Any]], values: PerProblem) -> None:
    """Each alpha's record gains its paired gain over the current weights of the same
    evaluation: `gain_vs_current` (selection metric), `pass1_gain_vs_current`, and their `_se`."""
    current = values.get(CURRENT)
    if current is None:
        return
    for record in records:
        if record["alpha"] == CURRENT or record["alpha"] not in values:  # not a candidate
            continue
        mine = values[record["alpha"]]
        for name, key in (("score", "gain_vs_current"), ("pass1", "pass1_gain_vs_current")):
            if name in mine and name in current:
                gain, se = paired_difference(mine[name], current[name])
                record[key], record[f"{key}_se"] = gain, se


def final_choice(
    values: PerProblem, keep_pass1: bool, z_threshold: float, seed: int
) -> tuple[float, dict[str, Any]]:
    """The alpha "best" merges with (chosen on every problem) and the report on it: in-sample
    and cross-fitted held-out Pass@1 / Pass@k of the choice, its held-out paired gain over the
    final weights (`heldout/gain/...`, each problem's difference under the alpha chosen without
    it), and the final weights' own numbers."""
    base = values[CURRENT]
    candidates = [
        Candidate(
            alpha,
            {**row, **{f"gain_{k}": row[k] - base[k] for k in ("pass1", "passk")}},
        )
        for alpha, row in sorted(values.items())
    ]
    rule = best_alpha_rule(keep_pass1, z_threshold)
    everyone = np.arange(len(base["pass1"]))
    chosen = rule(candidates, everyone)
    report: dict[str, Any] = {"alpha": chosen, "keep_pass1": keep_pass1}
    report.update(_described("chosen", values[chosen]))
    report.update(_described("current", base))
    if len(everyone) >= 2:
        held = cross_fitted_choice(candidates, rule, seed)
        report["heldout_alphas_by_half"] = list(held.alphas_by_half)
        for name, label in (("pass1", "pass@1"), ("passk", "pass@k")):
            for key, prefix in ((name, "heldout/chosen"), (f"gain_{name}", "heldout/gain")):
                mean, se = held.estimates[key]
                report[f"{prefix}/{label}"], report[f"{prefix}/{label}_se"] = mean, se
    return chosen, report


def fixed_choice(values: PerProblem, alpha: float) -> dict[str, Any]:
    """The report on a fixed final_alpha when it was evaluated (no selection: its in-sample
    numbers are already held out)."""
    report: dict[str, Any] = {"alpha": alpha}
    if alpha in values:
        report.update(_described("chosen", values[alpha]))
    if CURRENT in values:
        report.update(_described("current", values[CURRENT]))
    return report


def _described(who: str, row: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, label in (("pass1", "pass@1"), ("passk", "pass@k")):
        out[f"{who}/{label}"], out[f"{who}/{label}_se"] = mean_and_se(row[name])
    return out


KEEP_PASS1_Z = 2.0
"""keep_pass1 drops an alpha whose Pass@1 is below the current weights' by this many paired
standard errors."""


def choose_final(
    final_alpha: float | str | None,
    grid: dict[str, Any] | None,
    history: list[dict[str, Any]],
    select_metric: str,
    keep_pass1: bool,
    seed: int,
) -> tuple[float | None, dict[str, Any] | None]:
    """The fixed final_alpha, or the best alpha of the latest evaluation of the grid (`grid`:
    its step and `grid_state` values; ties toward the larger alpha; with keep_pass1, among the
    alphas that keep Pass@1), and the report on it (in-sample and cross-fitted held-out numbers).
    None when there is nothing to choose from."""
    values = {} if grid is None else _arrays(grid["values"])
    if isinstance(final_alpha, float):
        return final_alpha, fixed_choice(values, final_alpha)
    if grid is None:
        return None, None
    if any("score" not in row for row in values.values()):  # not a mean over problems
        candidates = [r for r in history if r["step"] == grid["step"]]
        alpha = float(best_record(candidates, select_metric)["alpha"])
        return alpha, fixed_choice(values, alpha)
    alpha, report = final_choice(values, keep_pass1, KEEP_PASS1_Z, seed)
    return alpha, {**report, "step": grid["step"]}


def grid_state(values: PerProblem) -> dict[float, dict[str, list[float]]]:
    """Per-problem arrays as plain lists (checkpoint state: floats round-trip exactly)."""
    return {a: {k: [float(x) for x in v] for k, v in row.items()} for a, row in values.items()}


def _arrays(values: dict[float, dict[str, list[float]]]) -> PerProblem:
    return {a: {k: np.asarray(v) for k, v in row.items()} for a, row in values.items()}


def best_record(records: Iterable[Mapping[str, Any]], metric: str) -> Mapping[str, Any]:
    """The record with the highest `metric`, ties toward the larger alpha (among the records
    that have it: an alpha that successive halving stopped early has fewer k)."""
    return max((r for r in records if metric in r), key=lambda r: (r[metric], r["alpha"]))
