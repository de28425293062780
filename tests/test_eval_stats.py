"""Standard errors and generation health, checked against direct formulas (no Trainer)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from wise_callback.evaluate import EvalConfig, ProblemResult, summarize, summarize_by_source
from wise_callback.metrics import majority_at_k
from wise_callback.stats import generation_health, standard_errors


def chen_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_standard_error_is_the_spread_of_per_problem_values():
    rng = np.random.default_rng(1)
    n, ks = 8, (1, 2, 8)
    counts = rng.integers(0, n + 1, size=23)
    correct = [[j < c for j in range(n)] for c in counts]
    answers = [["right" if ok else f"wrong{j % 3}" for j, ok in enumerate(row)] for row in correct]
    majority = majority_at_k(answers, correct, list(ks))
    errors = standard_errors([n] * len(counts), counts, majority, ks)
    for k in ks:
        values = [chen_pass_at_k(n, int(c), k) for c in counts]
        expected = statistics.stdev(values) / math.sqrt(len(values))
        assert errors[f"pass@{k}_se"] == pytest.approx(expected, rel=1e-12)
    # Maj@1 is the fraction correct per problem, like Pass@1
    assert errors["maj@1_se"] == pytest.approx(errors["pass@1_se"], rel=1e-12)
    assert set(errors) == {f"{m}@{k}_se" for m in ("pass", "maj") for k in ks}


def test_one_problem_has_no_standard_error():
    majority = majority_at_k([["a", "a", "b", "b"]], [[True, True, False, False]], [1, 4])
    errors = standard_errors([4], [2], majority, (1, 4))
    assert errors == {"pass@1_se": None, "maj@1_se": None, "pass@4_se": None, "maj@4_se": None}


def test_generation_health_counts_every_sample():
    health = generation_health([["stop", "length"], ["length", "length"]], [[2, 6], [6, 6]])
    assert health == {"mean_completion_tokens": 5.0, "frac_truncated": 0.75}
    with pytest.raises(ValueError, match="no samples"):
        generation_health([], [])


def result(index: int, correct: list[bool]) -> ProblemResult:
    return ProblemResult(
        index=index,
        completions=["x"] * len(correct),
        answers=[str(int(ok)) if j % 3 else None for j, ok in enumerate(correct)],
        correct=correct,
        finish_reasons=["stop" if ok else "length" for ok in correct],
        num_tokens=[1 + j for j in range(len(correct))],
    )


def test_per_source_means_average_back_to_the_overall_ones():
    rng = np.random.default_rng(2)
    ks = (1, 2, 4)
    results = [result(i, list(rng.random(4) < 0.5)) for i in range(11)]
    problems = [{"prompt": "p", "answer": "1", "source": "ab"[i % 3 == 0]} for i in range(11)]
    problems[5].pop("source")  # counted as "unknown"
    overall = summarize(results, ks)
    parts = summarize_by_source(results, problems, ks)
    sources = sorted({key.split("/")[0] for key in parts})
    assert sources == ["a", "b", "unknown"]
    counts = {s: parts[f"{s}/num_problems"] for s in sources}
    assert sum(counts.values()) == 11 and counts["unknown"] == 1
    means = [f"{m}@{k}" for m in ("pass", "maj") for k in ks]
    means += ["mean_rho", "frac_rho0", "frac_rho1", "mean_none_fraction"]
    for name in means:
        weighted = sum(counts[s] * parts[f"{s}/{name}"] for s in sources) / 11
        assert weighted == pytest.approx(overall[name], abs=1e-12), name
    assert parts["unknown/pass@1_se"] is None  # a single problem
    assert not any(isinstance(v, list) for v in parts.values())  # no per-source histograms
    assert summarize_by_source(results, [{"prompt": "p", "answer": "1"}] * 11, ks) == {}


def test_standard_errors_are_not_selectable_metrics():
    config = EvalConfig(num_samples=4)
    assert "pass@4_se" in config.metric_names()
    assert "mean_completion_tokens" in config.metric_names()
    assert all(not m.endswith("_se") for m in config.selectable_metrics())
    with pytest.raises(ValueError, match="time_budget_s"):
        EvalConfig(time_budget_s=0)


def test_the_report_draws_the_standard_errors(tmp_path):
    """The same history with and without "<metric>_se" keys gives different figures."""
    from wise_callback.report import plot_history

    rng = np.random.default_rng(3)
    records = []
    for step, alpha in [(5, 0.0), (10, 0.5), (10, 1.0), (20, 0.5), (20, 1.0)]:
        results = [result(i, list(rng.random(4) < 0.5) if i % 3 else [False] * 4) for i in range(9)]
        records.append({"step": step, "alpha": alpha, **summarize(results, (1, 2, 4))})
    assert records[-1]["pass@4_se"] > 0
    bare = [{k: v for k, v in r.items() if not k.endswith("_se")} for r in records]
    with_errors = plot_history(records, tmp_path / "with.png").read_bytes()
    without = plot_history(bare, tmp_path / "without.png").read_bytes()
    assert with_errors != without
    assert plot_history(bare, tmp_path / "again.png").read_bytes() == without  # deterministic


def test_a_budget_splits_all_at_once_sampling_into_calls(tiny_model, tokenizer):
    """problems_per_call=None (all at once, the vLLM default) would leave a budget nothing to
    stop between: with a budget the problems go out in BUDGET_CALLS calls."""
    from wise_callback.evaluate import BUDGET_CALLS, evaluate
    from wise_callback.grading import exact_match
    from wise_callback.sampling import HFSampler, SamplingConfig

    problems = [{"prompt": f"{i % 10}+1=", "answer": str((i + 1) % 10)} for i in range(40)]
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    config = EvalConfig(
        num_samples=2,
        sampling=SamplingConfig(max_new_tokens=2),
        grade_workers=0,
        problems_per_call=None,
        time_budget_s=1e-4,
    )
    evaluation = evaluate(tiny_model, None, problems, sampler, exact_match, config, progress=False)
    record = evaluation.records()[0]
    assert record["num_problems"] == math.ceil(40 / BUDGET_CALLS) == 3
    assert record["num_problems_planned"] == 40
