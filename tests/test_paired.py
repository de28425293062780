"""Paired statistics and the cross-fitted (held-out) choice of alpha, against direct
computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wise_callback.comparisons import final_choice
from wise_callback.paired import (
    Candidate,
    best_alpha_rule,
    cross_fitted_choice,
    halves,
    paired_difference,
    per_problem,
)


def test_paired_difference_is_the_mean_and_se_of_the_per_problem_differences():
    a, b = np.array([1.0, 0.5, 0.25, 1.0, 0.0]), np.array([0.5, 0.5, 0.0, 0.75, 0.25])
    mean, se = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    m = sum(d) / 5
    assert mean == pytest.approx(m)
    assert se == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in d) / 4 / 5))
    assert paired_difference(a[:1], b[:1])[1] is None
    with pytest.raises(ValueError, match="same problems"):
        paired_difference(a, b[:3])


def test_per_problem_values_average_to_the_metrics():
    n, c = [4, 4, 4], [0, 2, 4]
    assert per_problem("pass1", n, c).tolist() == [0.0, 0.5, 1.0]
    assert per_problem("pass@2", n, c).tolist() == pytest.approx([0.0, 1 - 1 / 6, 1.0])
    assert per_problem("jensen_bound@2", n, c) is None  # not a mean over problems


def test_cross_fitting_never_scores_a_problem_with_an_alpha_chosen_on_it():
    rng = np.random.default_rng(0)
    size = 11
    candidates = [
        Candidate(a, {"score": rng.random(size), "pass1": rng.random(size)}) for a in (0.5, 1.0)
    ]
    seen: list[set[int]] = []

    def rule(cands, rows):
        seen.append(set(rows.tolist()))
        return best_alpha_rule(False, 2.0)(cands, rows)

    held = cross_fitted_choice(candidates, rule, seed=5)
    first, second = halves(size, 5)
    assert set(first) | set(second) == set(range(size)) and not set(first) & set(second)
    # the choice that scores `first` was made on `second`, and the other way round
    assert seen == [set(second.tolist()), set(first.tolist())]
    by_alpha = {c.alpha: c for c in candidates}
    expected = np.empty(size)
    expected[first] = by_alpha[held.alphas_by_half[0]].values["score"][first]
    expected[second] = by_alpha[held.alphas_by_half[1]].values["score"][second]
    mean, se = held.estimates["score"]
    assert mean == pytest.approx(expected.mean())
    assert se == pytest.approx(expected.std(ddof=1) / math.sqrt(size))


def test_keep_pass1_drops_an_alpha_that_loses_pass1_significantly():
    size = 40
    current = {"pass1": np.full(size, 0.8), "passk": np.full(size, 0.6)}
    greedy = {
        "pass1": np.full(size, 0.8) - np.linspace(0.1, 0.3, size),
        "passk": np.full(size, 0.9),
    }
    mild = {
        "pass1": np.full(size, 0.8) + np.linspace(-0.05, 0.05, size),
        "passk": np.full(size, 0.7),
    }
    values = {
        a: {**row, "score": row["passk"]}
        for a, row in ((0.25, greedy), (0.75, mild), (1.0, current))
    }
    assert final_choice(values, keep_pass1=False, z_threshold=2.0, seed=0)[0] == 0.25
    alpha, report = final_choice(values, keep_pass1=True, z_threshold=2.0, seed=0)
    assert alpha == 0.75
    # the held-out paired gain of the choice over the final weights, problem by problem
    assert report["heldout/gain/pass@k"] == pytest.approx(0.1)
    assert report["heldout/gain/pass@1"] == pytest.approx(0.0, abs=1e-12)
    assert report["current/pass@k"] == pytest.approx(0.6)
