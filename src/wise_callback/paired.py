"""Paired statistics over problems, and an honest (cross-fitted) choice of alpha.

Every evaluation scores the same problems, and within one evaluation every alpha samples a
problem with the same seed, so two evaluations (or two alphas) are compared problem by problem:
the difference of two metrics is the mean of the per-problem differences, and its standard error
is the one of that mean, sd(differences) / sqrt(problems) — much smaller than the two separate
standard errors would suggest when the problems' difficulties dominate the spread.

Choosing alpha by a metric and reporting that metric on the same problems is biased upward (the
chosen alpha is the one whose noise happened to be favourable). `cross_fitted_choice` splits
the problems into two fixed halves, chooses on each half, and reports each problem under the
alpha chosen on the *other* half: an estimate from problems that took no part in the choice.

Imports nothing of ours but the metrics.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from wise_callback.metrics import majority_at_k, pass_at_k


def per_problem(
    metric: str,
    num_samples: Sequence[int],
    num_correct: Sequence[int],
    answers: Sequence[Sequence[object]] | None = None,
    correct: Sequence[Sequence[bool]] | None = None,
) -> np.ndarray | None:
    """The per-problem values whose mean is `metric` ("pass@k", "maj@k", "mean_rho", "pass1"),
    or None for a metric that is not a mean over problems."""
    n, c = np.asarray(num_samples), np.asarray(num_correct)
    if metric in ("mean_rho", "pass1"):
        return c / n
    kind, _, k = metric.partition("@")
    if not k.isdigit():
        return None
    if kind == "pass":
        return pass_at_k(n, c, int(k))
    if kind == "maj" and answers is not None and correct is not None:
        return majority_at_k(answers, correct, [int(k)])[:, 0]
    return None


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """mean(a - b) over problems and its standard error (None below two problems)."""
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same problems: shapes {a.shape} and {b.shape}")
    differences = a - b
    return mean_and_se(differences)


def z_score(difference: float, standard_error: float | None) -> float | None:
    """difference / standard error; None when there is no spread to measure."""
    if standard_error is None or standard_error == 0.0:
        return None
    return difference / standard_error


@dataclass(frozen=True)
class Candidate:
    """One alpha's per-problem values: "score" (the selection metric), "pass1", and any others
    to report."""

    alpha: float
    values: Mapping[str, np.ndarray]


ChoiceRule = Callable[[Sequence[Candidate], np.ndarray], float]
"""(candidates, indices of the problems to decide on) -> the chosen alpha."""


def best_alpha_rule(keep_pass1: bool, z_threshold: float, current: float = 1.0) -> ChoiceRule:
    """The rule: the highest mean score (ties toward the larger alpha); with `keep_pass1`, only
    among alphas whose Pass@1 is not significantly below the current weights' (paired z of the
    Pass@1 gain above -z_threshold)."""

    def choose(candidates: Sequence[Candidate], rows: np.ndarray) -> float:
        allowed = list(candidates)
        if keep_pass1:
            base = next(c for c in candidates if c.alpha == current).values["pass1"][rows]
            allowed = [
                c
                for c in candidates
                if not significantly_below(c.values["pass1"][rows], base, z_threshold)
            ]
        return max(allowed, key=lambda c: (_mean(c.values["score"][rows]), c.alpha)).alpha

    return choose


def significantly_below(values: np.ndarray, base: np.ndarray, z_threshold: float) -> bool:
    """Whether per-problem `values` are below `base` by more than `z_threshold` paired standard
    errors (False where there is no spread to measure)."""
    gain, se = paired_difference(values, base)
    z = z_score(gain, se)
    return z is not None and z < -z_threshold


def halves(num_problems: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded split of the problem indices into two halves (sizes differ by <= 1)."""
    order = list(range(num_problems))
    random.Random(seed).shuffle(order)
    middle = num_problems // 2
    return np.sort(order[:middle]), np.sort(order[middle:])


@dataclass(frozen=True)
class HeldOut:
    """Cross-fitted estimates: each problem scored under the alpha chosen without it; for each
    reported value, (mean over problems, its standard error)."""

    alphas_by_half: tuple[float, float]
    estimates: dict[str, tuple[float, float | None]]


def cross_fitted_choice(
    candidates: Sequence[Candidate], rule: ChoiceRule, seed: int = 0
) -> HeldOut:
    """Choose on each half with `rule`, score the other half with that choice."""
    num_problems = len(candidates[0].values["score"])
    if num_problems < 2:
        raise ValueError("cross-fitting needs at least two problems")
    first, second = halves(num_problems, seed)
    by_alpha = {c.alpha: c for c in candidates}
    chosen = (rule(candidates, second), rule(candidates, first))  # half 1 by the choice on 2
    estimates = {}
    for name in candidates[0].values:
        held = np.empty(num_problems)
        for rows, alpha in zip((first, second), chosen, strict=True):
            held[rows] = by_alpha[alpha].values[name][rows]
        estimates[name] = mean_and_se(held)
    return HeldOut(chosen, estimates)


def _mean(values: np.ndarray) -> float:
    return math.fsum(values) / len(values)


def mean_and_se(values: np.ndarray) -> tuple[float, float | None]:
    """Mean over problems and its standard error (None below two problems)."""
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return _mean(values), se
