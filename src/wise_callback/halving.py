"""Successive halving over the alpha grid at the final choice: the same decision from fewer
sampled tokens.

The final choice needs the selection metric of every alpha at `num_samples` per problem. Most
alphas are not close to the best one, and a few samples per problem show it:

1. the current weights are sampled as usual (`num_samples`; the collapse watch reads them);
2. first round: every alpha gets `first` samples per problem (the same problems, and the same
   per-problem seed for every alpha);
3. each alpha is compared, problem by problem, with the best candidate (the current weights
   included) on the selection metric at `first` samples (Pass@32 -> Pass@`first`, unbiased for
   every candidate). An alpha goes on if it is not clearly worse (paired z > -HALVING_Z) and is
   among the better half of the alphas (`keep` of them); with keep_pass1 an alpha whose Pass@1 is
   already significantly below the current weights' (the final rule's own test) stops here;
4. second round: the alphas that go on get `num_samples - first` more samples per problem (a
   fresh seed stream), joined to their first round: `num_samples` samples per problem, the same
   metrics as a full evaluation's, and the candidates of the final choice.

With three alphas and `first = num_samples / 4` that is 3/4 + 2 x 3/4 = 2.25 of the 3 weight
sets' samples (1.5 when all but the best stop). An alpha far behind the best is dropped; one
that the full evaluation would choose with a large gap is never dropped (its paired z against
the best is 0). The weights are restored bit for bit by each round (`evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from wise_callback.comparisons import KEEP_PASS1_Z, problem_values
from wise_callback.eval_config import CURRENT, EvalConfig, default_ks, evaluation_seed
from wise_callback.evaluate import end_sampling, evaluate
from wise_callback.grading import Grader
from wise_callback.paired import mean_and_se, significantly_below
from wise_callback.results import AlphaResult, Evaluation, GradedAlpha, ProblemResult, alpha_result
from wise_callback.sampling import Sampler
from wise_callback.weights import Snapshot

HALVING_Z = 2.0
"""An alpha stops after the first round when its paired z against the best candidate is below
-HALVING_Z (clearly worse), or when it is not among the better half."""

SECOND_ROUND = ":second-round"
"""The salt of the second round's seed stream (`evaluation_seed`)."""


def first_round_samples(
    config: EvalConfig, share: float | None, select_metric: str, final_alpha: object
) -> int | None:
    """Samples per problem of the first round (`share` of num_samples, at least one), or None
    where halving does not apply: off (share None), nothing to choose (final_alpha not "best"),
    a selection metric that is not a mean over problems, a time budget (rounds could cover
    different problems), or no saving (first >= num_samples)."""
    if share is None or final_alpha != "best" or config.time_budget_s is not None:
        return None
    first = max(1, round(share * config.num_samples))
    if first >= config.num_samples or proxy_metric(select_metric, first) is None:
        return None
    return first


def proxy_metric(select_metric: str, first: int) -> str | None:
    """The selection metric as the first round can measure it with `first` samples per problem
    (pass@k / maj@k with k capped at `first`; mean_rho as it is); None for a metric that is not a
    mean over problems (then every alpha gets the full evaluation)."""
    if select_metric == "mean_rho":
        return select_metric
    kind, _, k = select_metric.partition("@")
    if kind in ("pass", "maj") and k.isdigit():
        return f"{kind}@{min(int(k), first)}"
    return None


def survivors(
    scores: Mapping[float, np.ndarray],
    keep: int,
    pass1: Mapping[float, np.ndarray] | None = None,
) -> tuple[float, ...]:
    """The alphas (never CURRENT, which is a reference here) that go on to the second round.

    `scores`: per-problem values of the proxy metric per candidate, CURRENT included; `keep`:
    how many alphas go on at most; `pass1`: per-problem Pass@1 per candidate when the final rule
    keeps Pass@1 (an alpha significantly below the current weights' stops). Ties toward the
    larger alpha, as in the final rule.
    """
    alphas = [a for a in scores if a != CURRENT]
    if pass1 is not None:  # the final rule's own test, on the first round's samples
        alphas = [
            a for a in alphas if not significantly_below(pass1[a], pass1[CURRENT], KEEP_PASS1_Z)
        ]
    field = [*alphas, CURRENT] if CURRENT in scores else alphas
    if not field:
        return ()
    best = max(field, key=lambda a: (mean_and_se(scores[a])[0], a))
    contenders = [
        a
        for a in alphas
        if a == best or not significantly_below(scores[a], scores[best], HALVING_Z)
    ]
    ranked = sorted(contenders, key=lambda a: (mean_and_se(scores[a])[0], a), reverse=True)
    return tuple(sorted(ranked[:keep]))


def evaluate_halving(
    model: torch.nn.Module,
    snapshot: Snapshot | None,
    problems: Sequence[Mapping[str, Any]],
    sampler: Sampler,
    grader: Grader | str,
    config: EvalConfig,
    *,
    alphas: Sequence[float],
    first: int | None,
    select_metric: str,
    keep_pass1: bool = False,
    current: AlphaResult | None = None,
    step: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Evaluation:
    """The current weights and `alphas` by successive halving (module docstring): one
    `Evaluation` whose survivors have `config.num_samples` samples per problem and whose
    `first_round_only` alphas have `first`; `first=None` (or no alpha besides 1.0): a plain
    `evaluate` of every alpha. `current`: the current weights' result of this step, already
    sampled (the end of a run that stopped at an evaluation): used, not sampled again. Needs no
    time budget (every round covers every problem, so that the comparisons are paired)."""

    def run(cfg: EvalConfig, which: Sequence[float], last_round: bool = True) -> Evaluation:
        return evaluate(
            model, snapshot, problems, sampler, grader, cfg, alphas=which, step=step,
            rank=rank, world_size=world_size, progress=progress, last_round=last_round,
        )  # fmt: skip

    grid = tuple(a for a in alphas if a != CURRENT)
    if current is None or not grid or CURRENT not in alphas:
        current = None  # nothing to reuse: sampled with the others
    if first is None or not grid:
        fresh = run(config, alphas if current is None else grid)
        if current is None:
            return fresh
        ordered = sorted([current, *fresh.results], key=lambda r: r.alpha)
        return Evaluation(step, ordered, fresh.timings, reused=(CURRENT,))
    proxy = proxy_metric(select_metric, first)
    if proxy is None or not 1 <= first < config.num_samples or config.time_budget_s is not None:
        raise ValueError(
            f"successive halving needs 1 <= first ({first}) < num_samples "
            f"({config.num_samples}), a selection metric that is a mean over problems "
            f"({select_metric!r}) and no time budget ({config.time_budget_s})"
        )
    try:  # the rounds are one evaluation for the sampler: it ends (vLLM sleeps) once
        return _rounds(run, problems, config, grid, first, proxy, keep_pass1, current, step)
    finally:
        end_sampling(sampler)


def _rounds(
    run: Callable[[EvalConfig, Sequence[float], bool], Evaluation],
    problems: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    grid: tuple[float, ...],
    first: int,
    proxy: str,
    keep_pass1: bool,
    current: AlphaResult | None,
    step: int | None,
) -> Evaluation:
    """The current weights unless given, the first round, the second round of the survivors."""
    reused = () if current is None else (CURRENT,)
    timings: dict[str, float] = {}
    if current is None:
        current_run = run(config, (CURRENT,), False)
        current, timings = current_run.results[0], current_run.timings
    small = replace(config, num_samples=first, ks=_ks_up_to(config, first))
    first_round = run(small, grid, False)
    results = {r.alpha: r for r in [current, *first_round.results]}
    scores = {a: _values(r, proxy) for a, r in results.items()}
    pass1 = {a: _values(r, "pass1") for a, r in results.items()} if keep_pass1 else None
    keep = survivors(scores, math.ceil(len(grid) / 2), pass1)
    timings = _summed([timings, first_round.timings])
    if keep:
        rest = config.num_samples - first
        seed = evaluation_seed(config.sampling.seed, step, SECOND_ROUND)
        more = replace(
            config,
            num_samples=rest,
            ks=default_ks(rest),
            sampling=replace(config.sampling, seed=seed),
        )
        second_round = run(more, keep, False)
        for extra in second_round.results:
            joined = _joined(results[extra.alpha], extra)
            results[extra.alpha] = alpha_result(extra.alpha, joined, problems, config.ks or ())
        timings = _summed([timings, second_round.timings])
    ordered = [results[a] for a in sorted(results)]
    dropped = tuple(a for a in grid if a not in keep)
    return Evaluation(step, ordered, timings, first_round_only=dropped, reused=reused)


def sampled_current(evaluation: Evaluation | None, step: int) -> AlphaResult | None:
    """The current weights' result of `evaluation` when it was of `step` (to be reused)."""
    if evaluation is None or evaluation.step != step:
        return None
    return next((r for r in evaluation.results if r.alpha == CURRENT), None)


def _ks_up_to(config: EvalConfig, first: int) -> tuple[int, ...]:
    """The config's k values that `first` samples can measure, and `first` itself."""
    return tuple(sorted({k for k in config.ks or () if k <= first} | {first}))


def _values(result: AlphaResult, metric: str) -> np.ndarray:
    values = problem_values(result, metric)
    assert values is not None  # proxy_metric only names per-problem means
    return values


def _joined(first: AlphaResult, second: AlphaResult) -> GradedAlpha:
    """One alpha's two rounds as one set of samples per problem (paired by problem index)."""
    later = {p.index: p for p in second.problems}
    joined = []
    for p in first.problems:
        q = later[p.index]
        joined.append(
            ProblemResult(
                index=p.index,
                completions=p.completions + q.completions,
                answers=p.answers + q.answers,
                correct=p.correct + q.correct,
                finish_reasons=p.finish_reasons + q.finish_reasons,
                num_tokens=p.num_tokens + q.num_tokens,
                timed_out=p.timed_out + q.timed_out,
            )
        )
    timed_out = first.metrics["timed_out"] + second.metrics["timed_out"]
    return GradedAlpha(joined, timed_out)


def _summed(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = {k for part in parts for k in part}
    return {k: sum(part.get(k, 0.0) for part in parts) for k in sorted(keys)}
