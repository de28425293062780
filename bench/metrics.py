"""Benchmark of the collapse metrics and of grading throughput; prints one JSON object last.

    .venv/bin/python bench/metrics.py [--quick]

1. Pass@k for 10,000 problems x n=64 x k in {1, 2, 4, ..., 64} against the per-problem loop of
   OpenAI human-eval's `estimate_pass_at_k` (its formula, re-implemented below), side by side:
   same numbers to 1e-12, goal >= 30x faster.
2. Maj@k, exact, for 1,000 problems x n=64 x k = 1..64 in one call: goal < 2 s.
3. grade_many with math_verify_match on MATH-style LaTeX answers (fractions, radicals, intervals,
   matrices; every answer a distinct string, so parse caches are cold) in a 2-worker pool, against
   the same grader called in a loop in this process: goal >= 500 completions/s (start-up reported
   apart).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from fractions import Fraction

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


LATEX_KINDS = ("fraction", "radical", "interval", "matrix")
SQUARE_FREE = (2, 3, 5, 6, 7, 10, 11, 13, 14, 15)


def rational(rng: np.random.Generator) -> Fraction:
    return Fraction(int(rng.integers(-99, 100)), int(rng.integers(1, 30)))


def written(value: Fraction, scale: int) -> str:
    """`value` in LaTeX as \\frac{scale*p}{scale*q}: each scale a different string, one value."""
    if value.denominator == 1 and scale == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{scale * abs(value.numerator)}}}{{{scale * value.denominator}}}"


def latex_answer(kind: str, values: list[Fraction], scale: int) -> str:
    """A MATH-style answer: a fraction, a radical, an interval or a 2x2 matrix."""
    parts = [written(v, scale) for v in values]
    if kind == "fraction":
        return parts[0]
    if kind == "radical":
        return f"{parts[0]}\\sqrt{{{values[1]}}}"
    if kind == "interval":
        low, high = (written(v, scale) for v in sorted(values))
        return f"[{low}, {high})"
    rows = f"{parts[0]} & {parts[1]} \\\\ {parts[2]} & {parts[3]}"
    return f"\\begin{{pmatrix}} {rows} \\end{{pmatrix}}"


def true_values(kind: str, rng: np.random.Generator) -> list[Fraction]:
    if kind == "radical":
        return [rational(rng), Fraction(int(rng.choice(SQUARE_FREE)))]
    count = {"fraction": 1, "interval": 2, "matrix": 4}[kind]
    values = [rational(rng) for _ in range(count)]
    return values if len(set(values)) == len(values) else true_values(kind, rng)


def math_completions(
    rng: np.random.Generator, kind: str, problems: int, samples: int, *, seen: set[str]
) -> tuple[list[str], list[str], list[bool]]:
    """MATH-style completions ending in a boxed LaTeX answer of one `kind`, every answer a
    string not in
    `seen` (then added to it: math-verify's and our parse caches never hit across samples),
    and the truth: ~60% are right, written as an equal but different form (\\frac{6}{8} for
    \\frac{3}{4}); the rest have one value changed. The samples of a problem share its
    reference, as in real use."""
    completions, references, truth = [], [], []
    for _ in range(problems):
        gold = true_values(kind, rng)
        reference = latex_answer(kind, gold, 1)
        for sample in range(samples):
            right = bool(rng.random() < 0.6)
            values = list(gold)
            if not right:  # one value off by a nonzero amount
                step = Fraction(int(rng.choice([-3, -2, -1, 1, 2, 3])), int(rng.integers(1, 5)))
                values[0] = gold[0] + step
            scale = 2 + sample
            answer = latex_answer(kind, values, scale)
            while answer in seen:
                scale += samples
                answer = latex_answer(kind, values, scale)
            seen.add(answer)
            completions.append(
                f"We simplify step by step: {int(rng.integers(1, 999))} terms cancel, the rest "
                f"gives the result.\n\nThe final answer is $\\boxed{{{answer}}}$."
            )
            references.append(reference)
            truth.append(right)
    return completions, references, truth


def simple_completions(rng: np.random.Generator, problems: int, samples: int) -> tuple[list, list]:
    """What this benchmark graded before: sums of small integers in three answer forms."""
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
    """Cold parse caches: every timed answer is a string never graded before in any process of
    this run (the pool's workers and this one), so no cache of math-verify's (lru_caches of
    20 parses) or ours (256) can hit, except a problem's reference within its 16 samples.
    The four kinds of answer in equal shares, each timed apart (their costs differ a lot);
    the in-process loop grades a quarter of each kind's problems, so the mix is the same."""
    seen: set[str] = set()
    warm, warm_refs, _ = math_completions(rng, "fraction", 1, 8, seen=seen)
    start = time.perf_counter()
    grade_many(math_verify_match, warm, warm_refs, workers=2)
    startup_s = time.perf_counter() - start
    per_kind = max(1, problems // len(LATEX_KINDS))
    sets = {kind: math_completions(rng, kind, per_kind, 16, seen=seen) for kind in LATEX_KINDS}
    pool_s, inline_s, items, inline_items, agree, correct, timed_out = {}, {}, 0, 0, 0, 0, 0
    for kind, (completions, references, truth) in sets.items():
        pool_s[kind], result = best_time(
            lambda c=completions, r=references: grade_many(math_verify_match, c, r, workers=2),
            1,
        )
        verdicts = [v.correct for v in result.verdicts]
        items += len(completions)
        correct += sum(verdicts)
        agree += sum(v == t for v, t in zip(verdicts, truth, strict=True))
        timed_out += result.timed_out
        part = slice(0, 16 * max(1, per_kind // 4))
        inline_items += len(completions[part])
        inline_s[kind], _ = best_time(
            lambda c=completions[part], r=references[part]: [
                math_verify_match(x, y) for x, y in zip(c, r, strict=True)
            ],
            1,
        )
    simple, simple_refs = simple_completions(rng, problems, samples=16)
    simple_s, _ = best_time(
        lambda: grade_many(math_verify_match, simple, simple_refs, workers=2), 1
    )
    shutdown_workers()
    pool_rate = items / sum(pool_s.values())
    inline_rate = inline_items / sum(inline_s.values())
    return {
        "grade_items": items,
        "grade_answers": "MATH-style LaTeX, distinct strings, kinds in equal shares",
        "grade_pool_startup_s": startup_s,
        "grade_per_s": pool_rate,
        "grade_per_s_goal": 500.0,
        "grade_per_s_by_kind": {k: len(sets[k][0]) / s for k, s in pool_s.items()},
        "grade_inline_per_s": inline_rate,
        "grade_speedup_vs_inline": pool_rate / inline_rate,
        "grade_simple_integers_per_s": len(simple) / simple_s,
        "grade_timed_out": timed_out,
        "grade_accuracy": correct / items,
        "grade_agrees_with_truth": agree / items,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {"bench": "metrics", "load_average_1m_start": os.getloadavg()[0]}
    results.update(bench_pass(rng, 1_000 if args.quick else 10_000, repeats=3))
    results.update(
        bench_majority(rng, 100 if args.quick else 1_000, repeats=1 if args.quick else 3)
    )
    results.update(bench_grading(rng, 16 if args.quick else 100))
    results["load_average_1m_end"] = os.getloadavg()[0]
    results["goals_met"] = bool(
        results["pass_speedup"] >= 30
        and results["pass_max_abs_diff"] <= 1e-12
        and results["maj_s"] < 2.0
        and results["grade_per_s"] >= 500
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
