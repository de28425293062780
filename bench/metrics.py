"""Benchmark of the collapse metrics and of grading throughput; prints one JSON object last.

    .venv/bin/python bench/metrics.py [--quick]

1. Pass@k for 10,000 problems x n=64 x k in {1, 2, 4, ..., 64} against the per-problem loop of
   OpenAI human-eval's `estimate_pass_at_k` (its formula, re-implemented below), side by side:
   same numbers to 1e-12, goal >= 30x faster.
2. Maj@k, exact, for 1,000 problems x n=64 x k = 1..64 in one call: goal < 2 s.
3. grade_many with math_verify_match on simple completions in a 2-worker pool, against the same
   grader called in a loop in this process: goal >= 500 completions/s (start-up reported apart).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from wise_callback.grading import grade_many, math_verify_match, shutdown_workers
from wise_callback.metrics import majority_at_k, pass_at_k

KS = [1, 2, 4, 8, 16, 32, 64]
N = 64


def human_eval_estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """human-eval/human_eval/evaluation.py::estimate_pass_at_k, verbatim in substance."""

    def estimator(n: int, c: int, k: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))

    if isinstance(num_samples, int):
        num_samples_it = itertools.repeat(num_samples, len(num_correct))
    else:
        num_samples_it = iter(num_samples)
    return np.array(
        [estimator(int(n), int(c), k) for n, c in zip(num_samples_it, num_correct, strict=False)]
    )


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def collapsing_counts(rng: np.random.Generator, problems: int) -> np.ndarray:
    """Correct counts of a half-collapsed model: a third of problems at rho = 0 or 1."""
    rho = rng.beta(0.4, 0.4, size=problems)
    return rng.binomial(N, rho)


def bench_pass(rng: np.random.Generator, problems: int, repeats: int) -> dict:
    n = np.full(problems, N)
    c = collapsing_counts(rng, problems)
    ks = np.array(KS)
    loop_s, loop = best_time(
        lambda: np.stack([human_eval_estimate_pass_at_k(n, c, k) for k in KS], axis=1), repeats
    )
    ours_s, ours = best_time(lambda: pass_at_k(n[:, None], c[:, None], ks[None, :]), repeats * 5)
    return {
        "pass_estimates": int(problems * len(KS)),
        "pass_loop_s": loop_s,
        "pass_ours_s": ours_s,
        "pass_speedup": loop_s / ours_s,
        "pass_speedup_goal": 30.0,
        "pass_max_abs_diff": float(np.abs(np.asarray(ours) - np.asarray(loop)).max()),
    }


def model_answers(rng: np.random.Generator, problems: int) -> tuple[list, list]:
    """Per problem: 1-12 candidate answers with Dirichlet weights (some problems collapsed,
    some spread out), ~10% None; candidate 0 is the correct one."""
    answers, correct = [], []
    for _ in range(problems):
        m = int(rng.integers(1, 13))
        weights = rng.dirichlet(np.full(m + 1, rng.choice([0.1, 0.5, 2.0])))
        weights[-1] *= 0.2  # None is rarer
        weights /= weights.sum()
        picks = rng.choice(m + 1, size=N, p=weights)
        answers.append([None if p == m else f"answer-{p}" for p in picks])
        correct.append([bool(p == 0) for p in picks])
    return answers, correct


def bench_majority(rng: np.random.Generator, problems: int, repeats: int) -> dict:
    answers, correct = model_answers(rng, problems)
    ks = list(range(1, N + 1))
    seconds, table = best_time(lambda: majority_at_k(answers, correct, ks), repeats)
    table = np.asarray(table)
    # Cheap exact checks: Maj@1 is the fraction of correct samples; Maj@n is the full vote.
    maj1 = np.array([sum(row) / N for row in correct])
    full = []
    for row, ok in zip(answers, correct, strict=True):
        votes = {a: row.count(a) for a in set(row) if a is not None}
        top = max(votes.values(), default=0)
        tied = [a for a, v in votes.items() if v == top]
        right = {a for a, v in zip(row, ok, strict=True) if v}
        full.append(sum(a in right for a in tied) / len(tied) if tied else 0.0)
    return {
        "maj_problems": problems,
        "maj_ks": len(ks),
        "maj_s": seconds,
        "maj_goal_s": 2.0,
        "maj_check_max_abs_diff": float(
            max(np.abs(table[:, 0] - maj1).max(), np.abs(table[:, -1] - np.array(full)).max())
        ),
    }


def simple_completions(rng: np.random.Generator, problems: int, samples: int) -> tuple[list, list]:
    completions, references = [], []
    for _ in range(problems):
        a, b = (int(x) for x in rng.integers(1, 500, size=2))
        gold = a + b
        for _ in range(samples):
            guess = gold if rng.random() < 0.6 else gold + int(rng.integers(-3, 4))
            form = rng.integers(3)
            answer = (f"\\boxed{{{guess}}}", f"#### {guess}", f"The answer is {guess}.")[form]
            completions.append(f"We add {a} and {b}: {a} + {b} = {guess}. {answer}")
            references.append(str(gold))
    return completions, references


def bench_grading(rng: np.random.Generator, problems: int) -> dict:
    """Fresh problems for each timed run, so no run is helped by another's parse caches (within
    a run the 16 samples of a problem share their reference, as in real use)."""
    warm, warm_refs = simple_completions(rng, 1, samples=8)
    start = time.perf_counter()
    grade_many(math_verify_match, warm, warm_refs, workers=2)
    startup_s = time.perf_counter() - start
    completions, references = simple_completions(rng, problems, samples=16)
    pool_s, result = best_time(
        lambda: grade_many(math_verify_match, completions, references, workers=2), 1
    )
    shutdown_workers()
    inline, inline_refs = simple_completions(rng, max(1, problems // 4), samples=16)
    inline_s, _ = best_time(
        lambda: [math_verify_match(c, r) for c, r in zip(inline, inline_refs, strict=True)], 1
    )
    return {
        "grade_items": len(completions),
        "grade_pool_startup_s": startup_s,
        "grade_per_s": len(completions) / pool_s,
        "grade_per_s_goal": 500.0,
        "grade_inline_per_s": len(inline) / inline_s,
        "grade_speedup_vs_inline": (len(completions) / pool_s) / (len(inline) / inline_s),
        "grade_timed_out": result.timed_out,
        "grade_accuracy": sum(v.correct for v in result.verdicts) / len(completions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {"bench": "metrics"}
    results.update(bench_pass(rng, 1_000 if args.quick else 10_000, repeats=3))
    results.update(
        bench_majority(rng, 100 if args.quick else 1_000, repeats=1 if args.quick else 3)
    )
    results.update(bench_grading(rng, 16 if args.quick else 250))
    results["goals_met"] = bool(
        results["pass_speedup"] >= 30
        and results["pass_max_abs_diff"] <= 1e-12
        and results["maj_s"] < 2.0
        and results["grade_per_s"] >= 500
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
