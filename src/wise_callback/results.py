"""What an evaluation produces: per-problem results per alpha, and the collapse metrics
summarised from them (overall and per problem source)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wise_callback.metrics import answer_diversity, collapse_stats, majority_at_k
from wise_callback.stats import generation_health, standard_errors


@dataclass(frozen=True)
class ProblemResult:
    """The n graded samples of one problem under one alpha (index = position in `problems`)."""

    index: int
    completions: list[str]
    answers: list[Hashable | None]
    correct: list[bool]
    finish_reasons: list[str | None]
    num_tokens: list[int]
    timed_out: int = 0

    @property
    def num_correct(self) -> int:
        return sum(self.correct)


@dataclass
class GradedAlpha:
    """Graded problems of one alpha, and how many items timed out in grading."""

    problems: list[ProblemResult]
    timed_out: int


@dataclass
class AlphaResult:
    """All problems (in order) under one alpha, and the metrics computed from them (with
    `timed_out`: completions whose grading timed out, counted as incorrect)."""

    alpha: float
    problems: list[ProblemResult]
    metrics: dict[str, Any]


@dataclass
class Evaluation:
    """One evaluation: a result per alpha, and where the time went (seconds by phase).
    `first_round_only`: alphas that successive halving sampled in its first round only (fewer
    samples per problem: records, not candidates for the final choice); `reused`: alphas whose
    results come from an earlier evaluation of the same step (not sampled again)."""

    step: int | None
    results: list[AlphaResult]
    timings: dict[str, float]
    first_round_only: tuple[float, ...] = ()
    reused: tuple[float, ...] = ()

    def generated_tokens(self) -> int:
        """The tokens this evaluation sampled (reused results not counted)."""
        fresh = [r for r in self.results if r.alpha not in self.reused]
        return sum(sum(p.num_tokens) for r in fresh for p in r.problems)

    def records(self) -> list[dict[str, Any]]:
        """Flat history records, one per alpha: {"step", "alpha", "pass@1", ..., "num_problems"}."""
        return [{"step": self.step, "alpha": r.alpha, **r.metrics} for r in self.results]


def alpha_result(
    alpha: float,
    graded: GradedAlpha,
    problems: Sequence[Mapping[str, Any]],
    ks: Sequence[int],
) -> AlphaResult:
    """One alpha's graded problems with their metrics (overall and per source)."""
    return AlphaResult(
        alpha,
        graded.problems,
        {
            **summarize(graded.problems, ks),
            **summarize_by_source(graded.problems, problems, ks),
            "timed_out": graded.timed_out,
            "num_problems_planned": len(problems),
        },
    )


def summarize(problems: Sequence[ProblemResult], ks: Sequence[int]) -> dict[str, Any]:
    """The collapse metrics of a set of per-problem results (a whole alpha, or any subset).

    Keys: pass@k and maj@k for each k, and their standard errors over problems (pass@k_se,
    maj@k_se; None for a single problem); the bias-variance terms of `collapse_stats` (mean_rho,
    var_rho, jensen_bound@k for k >= 2, frac_rho0, frac_rho1) and rho_hist (problem counts over
    10 equal bins of rho); the `answer_diversity` means (mean_distinct_answers,
    mean_answer_entropy, mean_none_fraction: the fraction of samples with no extractable answer);
    generation health (mean_completion_tokens, frac_truncated); num_problems and num_samples.
    """
    if not problems:
        raise ValueError("no problem results to summarize")
    n = np.array([len(p.correct) for p in problems])
    c = np.array([p.num_correct for p in problems])
    answers = [p.answers for p in problems]
    stats = collapse_stats(n, c, list(ks))
    majority = majority_at_k(answers, [p.correct for p in problems], list(ks))
    metrics: dict[str, Any] = {f"pass@{k}": stats.pass_at[k] for k in ks}
    metrics.update(
        {f"maj@{k}": math.fsum(majority[:, j]) / len(problems) for j, k in enumerate(ks)}
    )
    metrics.update(stats.scalars())
    metrics.update(answer_diversity(answers).scalars())
    metrics.update(standard_errors(n, c, majority, ks))
    metrics.update(
        generation_health([p.finish_reasons for p in problems], [p.num_tokens for p in problems])
    )
    metrics.update(
        rho_hist=[int(x) for x in stats.rho_histogram],
        num_problems=len(problems),
        num_samples=int(n.sum()),
    )
    return metrics


def summarize_by_source(
    results: Sequence[ProblemResult], problems: Sequence[Mapping[str, Any]], ks: Sequence[int]
) -> dict[str, Any]:
    """Every scalar metric of `summarize` per problem "source" (e.g. "gsm8k"), as
    "{source}/{metric}" keys; {} when no problem has a source (others count as "unknown").

    Means over problems (pass@k, maj@k, mean_rho, ...) of the sources, weighted by their
    num_problems, average back to the overall numbers.
    """
    sources = [problems[r.index].get("source") for r in results]
    if all(source is None for source in sources):
        return {}
    groups: dict[str, list[ProblemResult]] = {}
    for result, source in zip(results, sources, strict=True):
        groups.setdefault("unknown" if source is None else str(source), []).append(result)
    return {
        f"{source}/{name}": value
        for source, group in sorted(groups.items())
        for name, value in summarize(group, ks).items()
        if not isinstance(value, list)
    }
