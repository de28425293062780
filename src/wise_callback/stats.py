"""Spread and health of one evaluation: standard errors over problems, and generation health.

Standard errors tell a real drop of Pass@k from sampling noise. Each metric is a mean over
problems of a per-problem value (exact Pass@k / Maj@k of that problem's n samples), so its
standard error is the one of a mean: the sample standard deviation of the per-problem values over
sqrt(problems). It treats the problems as drawn from a larger pool and covers both the choice of
problems and each problem's finite samples. With a single problem there is no spread to measure:
the value is None (never logged, never plotted).

Generation health is what verl and OpenRLHF users read next to accuracy: how long completions are
and how many ran into `max_new_tokens`. (The fraction with no extractable answer is
`mean_none_fraction`, from `answer_diversity`.)

Imports nothing of ours but the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from wise_callback.metrics import pass_at_k


def standard_error(values: np.ndarray) -> float | None:
    """Standard error of the mean of `values` (sample std / sqrt(count)); None below 2 values."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def standard_errors(
    num_samples: Sequence[int] | np.ndarray,
    num_correct: Sequence[int] | np.ndarray,
    majority: np.ndarray,
    ks: Sequence[int],
) -> dict[str, float | None]:
    """{"pass@k_se", "maj@k_se"} for every k: standard errors over problems of Pass@k and Maj@k.

    `majority` is the per-problem Maj@k table of `majority_at_k(answers, correct, ks)`, shape
    (problems, len(ks)), which the caller has already computed for the means. The key convention
    "<metric>_se" is what the report draws as a band around "<metric>".
    """
    n = np.asarray(num_samples)[:, None]
    per_pass = pass_at_k(n, np.asarray(num_correct)[:, None], np.asarray(ks)[None, :])
    errors: dict[str, float | None] = {}
    for j, k in enumerate(ks):
        errors[f"pass@{k}_se"] = standard_error(per_pass[:, j])
        errors[f"maj@{k}_se"] = standard_error(majority[:, j])
    return errors


def generation_health(
    finish_reasons: Sequence[Sequence[str | None]], num_tokens: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Over every sample of every problem: mean completion length in tokens, and the fraction
    truncated at `max_new_tokens` (finish reason "length")."""
    reasons = [r for per_problem in finish_reasons for r in per_problem]
    lengths = [t for per_problem in num_tokens for t in per_problem]
    if not reasons:
        raise ValueError("no samples to describe")
    return {
        "mean_completion_tokens": math.fsum(lengths) / len(lengths),
        "frac_truncated": sum(r == "length" for r in reasons) / len(reasons),
    }
