"""Collapse metrics against exact brute force (Fractions, every k-subset) and properties."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wise_callback.metrics import (
    BestAtK,
    CollapseStats,
    MajorityAtK,
    PassAtK,
    answer_diversity,
    best_at_k,
    collapse_stats,
    majority_at_k,
    pass_at_k,
)

FAST = settings(max_examples=60, deadline=None)


def exact_pass(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def brute_majority(answers: list, correct: list, k: int) -> Fraction:
    """Average over every k-subset of the correct share of the tied top answers."""
    verdict = {a: bool(v) for a, v in zip(answers, correct, strict=True) if a is not None}
    total, subsets = Fraction(0), 0
    for subset in itertools.combinations(range(len(answers)), k):
        subsets += 1
        votes: dict = {}
        for j in subset:
            if answers[j] is not None:
                votes[answers[j]] = votes.get(answers[j], 0) + 1
        if votes:
            top = max(votes.values())
            tied = [a for a, v in votes.items() if v == top]
            total += Fraction(sum(verdict[a] for a in tied), len(tied))
    return total / subsets


def brute_best(scores: list, correct: list, k: int) -> Fraction:
    total, subsets = Fraction(0), 0
    for subset in itertools.combinations(range(len(scores)), k):
        subsets += 1
        top = max(scores[j] for j in subset)
        tied = [j for j in subset if scores[j] == top]
        total += Fraction(sum(bool(correct[j]) for j in tied), len(tied))
    return total / subsets


# ---------------------------------------------------------------------------------------------
# Pass@k


def test_pass_at_k_matches_exact_fractions_up_to_n_10000():
    cases = [(n, c, k) for n in (1, 2, 7, 64) for c in range(n + 1) for k in range(1, n + 1)]
    cases += [(10_000, c, k) for c in (0, 1, 17, 5_000, 9_990, 10_000) for k in (1, 10, 100, 9_000)]
    n, c, k = (np.array(column) for column in zip(*cases, strict=True))
    got = pass_at_k(n, c, k)
    want = np.array([float(exact_pass(*case)) for case in cases])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_pass_at_k_broadcasts_problems_against_ks():
    n, c, ks = np.array([8, 8, 16]), np.array([0, 3, 16]), np.array([1, 2, 8])
    table = pass_at_k(n[:, None], c[:, None], ks[None, :])
    assert table.shape == (3, 3)
    for i, j in itertools.product(range(3), range(3)):
        assert table[i, j] == pytest.approx(float(exact_pass(n[i], c[i], ks[j])), abs=1e-15)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        ([4, 4, 4], [1, 2, 3], 5, "problem 0: k=5 exceeds n=4"),
        ([4, 3], [1, 4], 1, "problem 1: c=4 correct exceeds n=3"),
        ([4, 4], [1, -1], 1, "c must be >= 0, got -1 (problem 1)"),
        ([4, 4.5], [1, 1], 1, "n must be whole numbers, got 4.5 (problem 1)"),
        ([4, 4], [1, 1], 0, "k=0 must be >= 1"),
        ([4, 4], [True, False], 1, "c must be integer counts"),
    ],
)
def test_pass_at_k_rejects_bad_counts_naming_the_problem(n, c, k, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pass_at_k(n, c, k)


@FAST
@given(
    st.integers(1, 300).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))
    )
)
def test_pass_at_k_property_exact(case):
    assert pass_at_k(*case) == pytest.approx(float(exact_pass(*case)), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Maj@k


def random_problem(rng: np.random.Generator, n: int) -> tuple[list, list]:
    """n answers from a few candidates (plus None), one or two of them correct."""
    candidates = ["a", "b", "c", "d", "e"][: rng.integers(1, 6)]
    weights = rng.dirichlet(np.ones(len(candidates) + 1))
    picks = rng.choice(len(candidates) + 1, size=n, p=weights)
    answers = [None if p == len(candidates) else candidates[p] for p in picks]
    right = set(rng.choice(candidates, size=rng.integers(1, 3)))
    return answers, [a in right for a in answers]


def test_majority_at_k_matches_every_subset_for_small_n():
    rng = np.random.default_rng(0)
    problems = [random_problem(rng, int(n)) for n in rng.integers(1, 11, size=40)]
    problems += [(["a", "b"] * 5, [True, False] * 5), ([None] * 6, [False] * 6)]
    for answers, correct in problems:
        ks = list(range(1, len(answers) + 1))
        got = majority_at_k([answers], [correct], ks)[0]
        want = [float(brute_majority(answers, correct, k)) for k in ks]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_majority_at_k_is_batch_independent_and_shapes_follow_k():
    rng = np.random.default_rng(1)
    problems = [random_problem(rng, 10) for _ in range(12)]
    answers, correct = [p[0] for p in problems], [p[1] for p in problems]
    together = majority_at_k(answers, correct, [1, 3, 10])
    alone = np.stack([majority_at_k([a], [c], [1, 3, 10])[0] for a, c in problems])
    assert together.shape == (12, 3)
    assert np.array_equal(together, alone)  # bit for bit: splitting problems changes nothing
    assert majority_at_k(answers, correct, 3).shape == (12,)
    assert np.array_equal(majority_at_k(answers, correct, 3), together[:, 1])


def test_majority_at_k_handles_256_samples_and_a_collapsed_problem():
    rng = np.random.default_rng(2)
    answers, correct = random_problem(rng, 256)
    got = majority_at_k([answers, ["x"] * 256], [correct, [True] * 256], [1, 64, 256])
    assert np.all((got >= 0) & (got <= 1))
    np.testing.assert_allclose(got[1], 1.0)
    votes = {a: answers.count(a) for a in set(answers) if a is not None}
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    right = {a for a, c in zip(answers, correct, strict=True) if c}
    assert got[0, 2] == pytest.approx(sum(a in right for a in tied) / len(tied))  # k = n
    assert got[0, 0] == pytest.approx(sum(correct[i] for i, a in enumerate(answers) if a) / 256)


def test_majority_at_k_rejects_inconsistent_verdicts_and_bad_k():
    with pytest.raises(ValueError, match=r"problem 1: answer 'b' is graded both"):
        majority_at_k([["a"], ["b", "b"]], [[True], [True, False]], 1)
    with pytest.raises(ValueError, match="problem 0: k=3 exceeds its n=2"):
        majority_at_k([["a", "b"]], [[True, False]], [1, 3])
    with pytest.raises(ValueError, match="problem 0: 2 answers but 1 verdicts"):
        majority_at_k([["a", "b"]], [[True]], 1)
    with pytest.raises(ValueError, match="positive int"):
        majority_at_k([["a"]], [[True]], [0])
    with pytest.raises(ValueError, match="problem 0: n=1001 > 1000 samples is unsupported"):
        majority_at_k([["a"] * 1001], [[True] * 1001], 1)
    with pytest.raises(TypeError, match="not hashable"):
        majority_at_k([[["a"]]], [[True]], 1)


@FAST
@given(
    st.lists(st.sampled_from(["p", "q", "r", None]), min_size=1, max_size=8),
    st.sets(st.sampled_from(["p", "q", "r"])),
)
def test_majority_at_k_property_matches_brute_force(answers, right):
    correct = [a in right for a in answers]
    ks = list(range(1, len(answers) + 1))
    want = [float(brute_majority(answers, correct, k)) for k in ks]
    np.testing.assert_allclose(majority_at_k([answers], [correct], ks)[0], want, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Best@k


def test_best_at_k_matches_every_subset_for_small_n():
    rng = np.random.default_rng(3)
    for n in rng.integers(1, 11, size=40):
        scores = rng.integers(0, 4, size=n).astype(float).tolist()  # many ties
        correct = (rng.random(n) < 0.4).tolist()
        ks = list(range(1, n + 1))
        want = [float(brute_best(scores, correct, k)) for k in ks]
        np.testing.assert_allclose(best_at_k([scores], [correct], ks)[0], want, atol=1e-13)


def test_best_at_k_rejects_nan_and_mismatch():
    with pytest.raises(ValueError, match="problem 0: score of sample 1 is NaN"):
        best_at_k([[0.0, math.nan]], [[True, False]], 1)
    with pytest.raises(ValueError, match="problem 0: 2 scores but 1 verdicts"):
        best_at_k([[0.0, 1.0]], [[True]], 1)
    with pytest.raises(ValueError, match="k=3 exceeds its n=2"):
        best_at_k([[0.0, 1.0]], [[True, False]], 3)


@FAST
@given(st.lists(st.tuples(st.integers(-2, 2), st.booleans()), min_size=1, max_size=9))
def test_best_at_k_property_matches_brute_force(samples):
    scores, correct = [float(s) for s, _ in samples], [v for _, v in samples]
    ks = list(range(1, len(samples) + 1))
    want = [float(brute_best(scores, correct, k)) for k in ks]
    np.testing.assert_allclose(best_at_k([scores], [correct], ks)[0], want, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# collapse_stats and diversity


def test_collapse_stats_moments_bound_and_histogram():
    n, c = np.array([8, 8, 8, 8, 4]), np.array([0, 8, 2, 8, 1])
    stats = collapse_stats(n, c, [1, 4], bins=4)
    rho = c / n
    assert stats.mean_rho == pytest.approx(rho.mean())
    assert stats.var_rho == pytest.approx(rho.var())
    assert (stats.frac_rho0, stats.frac_rho1) == (0.2, 0.4)
    assert stats.pass_at[4] == pytest.approx(pass_at_k(n, c, 4).mean())
    assert list(stats.jensen_bound) == [4]
    assert stats.jensen_bound[4] == pytest.approx(1 - ((1 - rho.mean()) ** 2 + rho.var()) ** 2)
    assert stats.rho_histogram.tolist() == [1, 2, 0, 2]
    assert set(stats.scalars()) == {
        "mean_rho",
        "var_rho",
        "frac_rho0",
        "frac_rho1",
        "pass@1",
        "pass@4",
        "jensen_bound@4",
    }


@FAST
@given(st.lists(st.integers(0, 16), min_size=1, max_size=30), st.integers(2, 16))
def test_jensen_bound_bounds_plug_in_pass_at_k(correct_counts, k):
    c = np.array(correct_counts)
    rho = c / 16
    stats = collapse_stats(np.full(len(c), 16), c, [k])
    plug_in = np.mean(1 - (1 - rho) ** k)  # Pass@k with rho the true per-problem rate
    assert plug_in <= stats.jensen_bound[k] + 1e-12
    assert stats.pass_at[k] >= plug_in - 1e-12  # without replacement never does worse


def test_collapse_stats_is_order_independent_bit_for_bit():
    rng = np.random.default_rng(4)
    n = rng.integers(8, 65, size=500)
    c = rng.integers(0, 9, size=500)
    order = rng.permutation(500)
    assert (
        collapse_stats(n, c, [1, 8]).scalars()
        == collapse_stats(n[order], c[order], [1, 8]).scalars()
    )


def test_answer_diversity():
    div = answer_diversity([["a", "a", "a", "a"], ["a", "b", None, None], [None, None]])
    assert div.distinct.tolist() == [1, 2, 0]
    np.testing.assert_allclose(div.entropy, [0.0, math.log(2), 0.0])
    np.testing.assert_allclose(div.none_fraction, [0.0, 0.5, 1.0])
    assert div.mean_distinct == 1.0
    assert div.scalars()["mean_answer_entropy"] == pytest.approx(math.log(2) / 3)


# ---------------------------------------------------------------------------------------------
# torchmetrics classes (one process; the 2-process run is in test_metrics_distributed.py)


def test_metric_classes_accumulate_batches_like_the_functions():
    rng = np.random.default_rng(5)
    problems = [random_problem(rng, 8) for _ in range(9)]
    answers, correct = [p[0] for p in problems], [p[1] for p in problems]
    scores = [rng.random(8).tolist() for _ in problems]
    n, c = np.full(9, 8), np.array([sum(v) for v in correct])
    ks = [1, 2, 8]
    passes, majority, best, stats = PassAtK(ks), MajorityAtK(ks), BestAtK(ks), CollapseStats(ks)
    for part in (slice(0, 4), slice(4, 9)):
        passes.update(n[part], c[part])
        majority.update(answers[part], correct[part])
        best.update(scores[part], correct[part])
        stats.update(n[part], c[part])
    for i, k in enumerate(ks):
        assert passes.compute()[f"pass@{k}"].item() == pytest.approx(pass_at_k(n, c, k).mean())
        assert majority.compute()[f"maj@{k}"].item() == pytest.approx(
            majority_at_k(answers, correct, ks)[:, i].mean()
        )
        assert best.compute()[f"best@{k}"].item() == pytest.approx(
            best_at_k(scores, correct, ks)[:, i].mean()
        )
    assert stats.compute().scalars() == collapse_stats(n, c, ks).scalars()
    fresh = MajorityAtK(ks)  # forward(): this batch's value, while accumulating
    batch = fresh(answers[:4], correct[:4])
    assert batch["maj@2"].item() == pytest.approx(majority_at_k(answers[:4], correct[:4], 2).mean())
    fresh(answers[4:], correct[4:])
    assert fresh.compute() == majority.compute()
    assert passes.compute()["pass@1"].dtype == torch.float64
    stats.reset()
    with (
        pytest.warns(UserWarning, match="before the ``update``"),
        pytest.raises(ValueError, match="at least one problem"),
    ):
        stats.compute()
