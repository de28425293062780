"""Collapse metrics: exact Pass@k, Maj@k, Best@k, the bias–variance view of Pass@k, diversity.

This is the functional core (numpy, vectorised over problems, exact); its torchmetrics twins
(metric_classes.py, importable from here) only store per-problem values and reduce them across
processes, in the split torchmetrics itself uses (functional/ vs Metric classes). Definitions:
the README, "The metrics".

Every mean over problems is `math.fsum(...) / count`: an exactly rounded sum does not depend on
the order of the problems, so a run split over processes gives bit-identical numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "AnswerDiversity",
    "BestAtK",
    "CollapseStats",
    "CollapseSummary",
    "MajorityAtK",
    "PassAtK",
    "answer_diversity",
    "best_at_k",
    "collapse_stats",
    "majority_at_k",
    "pass_at_k",
]

MAX_SAMPLES_MAJORITY = 1000
"""Maj@k counts subsets in float64; C(1000, 500) ~ 1e299 is the largest that fits."""


# ----------------------------------------------------------------------------------------------
# input checks


def _first(bad: np.ndarray) -> tuple[tuple[int, ...], str]:
    """Index of the first True in `bad`, and a label for messages: "problem 3" (1-D),
    "problem (2, 1)" (n-D) or "" (a scalar)."""
    if bad.ndim == 0:
        return (), ""
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
    return index, f"problem {index[0]}" if len(index) == 1 else f"problem {index}"


def _as_counts(name: str, values: Any) -> np.ndarray:
    """Non-negative integer counts as int64; ValueError naming the first bad problem."""
    array = np.asarray(values)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be integer counts, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            index, label = _first(bad)
            where = f" ({label})" if label else ""
            raise ValueError(f"{name} must be whole numbers, got {array[index].item()!r}{where}")
    array = array.astype(np.int64)
    if (array < 0).any():
        index, label = _first(array < 0)
        where = f" ({label})" if label else ""
        raise ValueError(f"{name} must be >= 0, got {array[index].item()}{where}")
    return array


def _as_ks(k: int | Sequence[int]) -> tuple[list[int], bool]:
    """(the ks as a list of positive ints, whether a single int was given)."""
    scalar = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
    ks: list[Any] = [k] if scalar else list(k)  # type: ignore[arg-type]
    if not ks:
        raise ValueError("k is an empty sequence: give at least one k")
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"every k must be a positive int, got {value!r}")
    return [int(v) for v in ks], scalar


# ----------------------------------------------------------------------------------------------
# Pass@k


def _survival_table(n: int, ks: np.ndarray) -> np.ndarray:
    """R[i, a] = C(n - a, ks[i]) / C(n, ks[i]) for a = 0..n, by the stable product form.

    R[i, a] = prod_{j = n-a+1..n} (1 - k/j): a cumulative product over j = n, n-1, ..., 1 whose
    factors all lie in [0, 1] (factors with j <= k are exactly 0), so nothing cancels or overflows.
    """
    j = np.arange(n, 0, -1, dtype=np.float64)
    factors = np.clip(1.0 - ks[:, None] / j[None, :], 0.0, None)
    table = np.ones((len(ks), n + 1))
    np.cumprod(factors, axis=1, out=table[:, 1:])
    return table


def pass_at_k(n: Any, c: Any, k: Any) -> np.ndarray:
    """Unbiased Pass@k per problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    `n` (samples), `c` (correct samples) and `k` broadcast against each other (numpy rules), so
    `pass_at_k(n[:, None], c[:, None], ks[None, :])` gives a (problems, len(ks)) table. The caller
    takes the mean. Exact to ~1e-12 for n up to 10,000 (a product of factors in [0, 1]).
    ValueError, naming the problem index, for k > n, c > n, k < 1, negative or non-integer counts.
    """
    n, c, k = np.broadcast_arrays(_as_counts("n", n), _as_counts("c", c), _as_counts("k", k))
    for bad, message in (
        (k < 1, "k={k} must be >= 1"),
        (c > n, "c={c} correct exceeds n={n} samples"),
        (k > n, "k={k} exceeds n={n} samples (Pass@k needs at least k samples)"),
    ):
        if bad.any():
            index, label = _first(bad)
            where = f"{label}: " if label else ""
            raise ValueError(where + message.format(n=n[index], c=c[index], k=k[index]))
    out = np.empty(n.shape, dtype=np.float64)
    for size in np.unique(n):
        rows = n == size
        ks, k_index = np.unique(k[rows], return_inverse=True)
        table = _survival_table(int(size), ks.astype(np.float64))
        out[rows] = 1.0 - table[k_index.reshape(-1), c[rows]]
    return out


# ----------------------------------------------------------------------------------------------
# Maj@k


@lru_cache(maxsize=8)
def _binomials(size: int) -> np.ndarray:
    """C[m, x] = C(m, x) as float64 (exactly rounded) for 0 <= m, x <= size."""
    table = np.zeros((size + 1, size + 1))
    row = [1]  # Pascal's triangle in exact Python ints, rounded once per entry
    for m in range(size + 1):
        table[m, : m + 1] = [float(x) for x in row]
        row = [1, *(a + b for a, b in itertools.pairwise(row)), 1]
    table.setflags(write=False)
    return table


def _vote_profile(index: int, answers: Sequence[Any], correct: Sequence[Any]) -> tuple:
    """(n, None count, vote counts of the distinct answers sorted descending, their verdicts)."""
    if isinstance(answers, (str, bytes)) or isinstance(correct, (str, bytes)):
        raise TypeError(f"problem {index}: answers and correct must be sequences, not strings")
    answers, correct = list(answers), list(correct)
    if len(answers) != len(correct):
        raise ValueError(
            f"problem {index}: {len(answers)} answers but {len(correct)} verdicts in `correct`"
        )
    if not answers:
        raise ValueError(f"problem {index} has no samples")
    votes: dict[Hashable, int] = {}
    verdict: dict[Hashable, bool] = {}
    nones = 0
    for answer, ok in zip(answers, correct, strict=True):
        if answer is None:
            nones += 1
            continue
        try:
            votes[answer] = votes.get(answer, 0) + 1
        except TypeError:
            raise TypeError(
                f"problem {index}: answer {answer!r} is not hashable (use a canonical str key)"
            ) from None
        ok = bool(ok)
        if verdict.setdefault(answer, ok) != ok:
            raise ValueError(
                f"problem {index}: answer {answer!r} is graded both correct and incorrect; "
                "samples with the same answer must share a verdict"
            )
    order = sorted(votes, key=votes.__getitem__, reverse=True)
    counts = np.array([votes[a] for a in order], dtype=np.int64)
    flags = np.array([verdict[a] for a in order], dtype=bool)
    return len(answers), nones, counts, flags


def _convolve_prefix(state: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """out[r, j, s] = sum_x coefficients[r, x] * state[r, j, s - x] (truncated at the last s)."""
    out = np.zeros_like(state)
    width = state.shape[-1]
    for x in range(min(coefficients.shape[1], width)):
        out[:, :, x:] += coefficients[:, x, None, None] * state[:, :, : width - x]
    return out


def majority_at_k(
    answers: Sequence[Sequence[Hashable | None]],
    correct: Sequence[Sequence[bool]],
    k: int | Sequence[int],
) -> np.ndarray:
    """Exact Maj@k per problem: the probability that a majority vote over k samples drawn
    uniformly without replacement from the n of a problem picks a correct answer.

    `answers[i][j]` is the canonical answer of sample j of problem i (hashable) or None when none
    could be extracted; `correct[i][j]` its verdict. Votes go to answers, not verdicts: samples
    with the same answer must share a verdict (ValueError otherwise); the verdicts of None samples
    are ignored. None never wins (a subset of only None scores 0); a tie between answers splits
    the credit evenly (equivalently: ties are broken uniformly at random).
    Returns shape (problems,) for an int k, (problems, len(k)) for a sequence.

    Method (exact, no Monte Carlo). For each threshold t (the winning vote count), the subsets
    whose top count is exactly t are counted with a generating function in z (z^s = subset size
    s) and a tie counter j: answers with fewer than t votes (and the None samples) can never
    reach t, so together they contribute the single factor (1 + z)^M; each of the J_t answers
    with at least t votes contributes sum_{x<t} C(m, x) z^x (below t) + C(m, t) z^t (tied at t).
    A DP over those answers tracks (j, s) and, alongside, the sum of the number of correct tied
    answers; the credit of size s is sum_j (correct tied) / j. Every subset size s, hence every
    k, comes out of the same DP. Cost per problem: sum_t J_t * min(t, K) * J_t * K with
    K = max(k) and J_t <= n/t, i.e. O(n^2 K log n) in the worst case and about O(K^2) for a
    collapsed problem; the work is vectorised across problems. Counts are float64, so n is
    limited to MAX_SAMPLES_MAJORITY.
    """
    ks, scalar = _as_ks(k)
    if isinstance(answers, (str, bytes)) or isinstance(correct, (str, bytes)):
        raise TypeError("answers and correct must be per-problem sequences, not strings")
    answers, correct = list(answers), list(correct)
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} problems in answers but {len(correct)} in correct")
    profiles = [
        _vote_profile(i, a, c) for i, (a, c) in enumerate(zip(answers, correct, strict=True))
    ]
    top_k = max(ks)
    for i, (n, *_rest) in enumerate(profiles):
        if top_k > n:
            raise ValueError(f"problem {i}: k={top_k} exceeds its n={n} samples")
        if n > MAX_SAMPLES_MAJORITY:
            raise ValueError(f"problem {i}: n={n} > {MAX_SAMPLES_MAJORITY} samples is unsupported")
    num = len(profiles)
    if num == 0:
        return np.zeros((0,) if scalar else (0, len(ks)))
    sizes = np.array([p[0] for p in profiles])
    nones = np.array([p[1] for p in profiles])
    width = max(len(p[2]) for p in profiles)
    counts = np.zeros((num, max(width, 1)), dtype=np.int64)
    flags = np.zeros_like(counts, dtype=bool)
    for i, (_, _, c, f) in enumerate(profiles):
        counts[i, : len(c)], flags[i, : len(f)] = c, f
    binom = _binomials(int(sizes.max()))
    span = top_k + 1
    credit = np.zeros((num, span))  # credit[p, s]: sum over s-subsets of the correct share
    for t in range(1, min(top_k, int(counts[:, 0].max())) + 1):
        reaching = (counts >= t).sum(axis=1)  # J_t per problem
        rows = np.flatnonzero(reaching)
        rows = rows[np.argsort(-reaching[rows], kind="stable")]  # so slot s is a row prefix
        reach = reaching[rows]
        ties = min(int(reach[0]), top_k // t)
        below = nones[rows] + np.where(counts[rows] < t, counts[rows], 0).sum(axis=1)
        total = np.zeros((len(rows), ties + 1, span))  # subsets by (tied answers j, size s)
        total[:, 0, :] = binom[below, :span]
        good = np.zeros_like(total)  # the same, weighted by the number of correct tied answers
        for slot in range(int(reach[0])):
            # Before this slot only j <= slot can be non-zero (and `good` only for j >= 1); the
            # j = 0 subsets are only needed by rows with more slots to come ("more").
            live, more = (
                int(np.count_nonzero(reach > slot)),
                int(np.count_nonzero(reach > slot + 1)),
            )
            m, ok = counts[rows[:live], slot], flags[rows[:live], slot]
            at_t = binom[m, t][:, None, None]
            below_t = binom[m, :t]
            seen = min(slot, ties)
            tot, gd = total[:live, : seen + 1].copy(), good[:live, : seen + 1].copy()
            total[:live, 1 : seen + 1] = _convolve_prefix(tot[:, 1:], below_t)
            good[:live, 1 : seen + 1] = _convolve_prefix(gd[:, 1:], below_t)
            total[:more, :1] = _convolve_prefix(tot[:more, :1], below_t[:more])
            hi = min(seen + 1, ties)
            total[:live, 1 : hi + 1, t:] += at_t * tot[:, :hi, :-t]
            good[:live, 1 : hi + 1, t:] += at_t * (
                gd[:, :hi, :-t] + ok[:, None, None] * tot[:, :hi, :-t]
            )
        for j in range(1, ties + 1):
            credit[rows] += good[:, j, :] / j
    ks_array = np.array(ks)
    out = credit[:, ks_array] / binom[sizes[:, None], ks_array[None, :]]
    return out[:, 0] if scalar else out


# ----------------------------------------------------------------------------------------------
# Best@k


def best_at_k(
    scores: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    k: int | Sequence[int],
) -> np.ndarray:
    """Exact Best@k per problem: the probability that the highest-scoring of k samples drawn
    without replacement is correct; ties in score split the credit evenly.

    Sorting by score makes groups of equal score. The top group of a k-subset is group g with
    probability [C(n - above_g, k) - C(n - above_g - size_g, k)] / C(n, k), and given that, the
    pick is uniform over the drawn members of g, so it is correct with probability
    correct_g / size_g. O(n log n) per problem (the sort) plus O(n) per k.
    Returns shape (problems,) for an int k, (problems, len(k)) for a sequence.
    """
    ks, scalar = _as_ks(k)
    scores, correct = list(scores), list(correct)
    if len(scores) != len(correct):
        raise ValueError(f"{len(scores)} problems in scores but {len(correct)} in correct")
    ks_array = np.array(ks, dtype=np.float64)
    out = np.zeros((len(scores), len(ks)))
    tables: dict[int, np.ndarray] = {}
    for i, (row_scores, row_correct) in enumerate(zip(scores, correct, strict=True)):
        s = np.asarray(row_scores, dtype=np.float64).reshape(-1)
        v = np.asarray(row_correct).reshape(-1)
        if len(s) != len(v):
            raise ValueError(f"problem {i}: {len(s)} scores but {len(v)} verdicts")
        if np.isnan(s).any():
            raise ValueError(f"problem {i}: score of sample {int(np.argmax(np.isnan(s)))} is NaN")
        n = len(s)
        if max(ks) > n:
            raise ValueError(f"problem {i}: k={max(ks)} exceeds its n={n} samples")
        order = np.argsort(-s, kind="stable")
        s, v = s[order], v[order].astype(bool)
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        ends = np.r_[starts[1:], n]
        share = np.add.reduceat(v.astype(np.float64), starts) / (ends - starts)
        if n not in tables:
            tables[n] = _survival_table(n, ks_array)
        table = tables[n]
        out[i] = (table[:, starts] - table[:, ends]) @ share
    return out[:, 0] if scalar else out


# ----------------------------------------------------------------------------------------------
# bias–variance and diversity


def _mean(values: np.ndarray) -> float:
    """Order-independent mean (exactly rounded sum), NaN for no values."""
    return math.fsum(values.tolist()) / len(values) if len(values) else math.nan


@dataclass
class CollapseSummary:
    """What `collapse_stats` returns; `scalars()` is ready for `log_dict`. (Not frozen: torchmetrics
    copies a Metric's compute() result field by field.)"""

    num_problems: int
    mean_rho: float
    var_rho: float
    frac_rho0: float
    frac_rho1: float
    pass_at: dict[int, float]
    jensen_bound: dict[int, float]
    rho_histogram: np.ndarray
    rho_bin_edges: np.ndarray

    def scalars(self) -> dict[str, float]:
        """Flat names: mean_rho, var_rho, frac_rho0, frac_rho1, pass@k, jensen_bound@k."""
        out = {
            "mean_rho": self.mean_rho,
            "var_rho": self.var_rho,
            "frac_rho0": self.frac_rho0,
            "frac_rho1": self.frac_rho1,
        }
        out.update({f"pass@{k}": v for k, v in self.pass_at.items()})
        out.update({f"jensen_bound@{k}": v for k, v in self.jensen_bound.items()})
        return out


def collapse_stats(n: Any, c: Any, ks: Sequence[int], *, bins: int = 10) -> CollapseSummary:
    """The collapse picture of per-problem counts (n samples, c correct; rho = c / n).

    mean and (population) variance of rho; Pass@k (mean of the unbiased estimate) for each k;
    for each k >= 2 the Jensen bound 1 - ((1 - mean)^2 + var)^(k/2), from
    1 - Pass@k = E[(1 - rho)^k] >= (E[(1 - rho)^2])^(k/2) -- an upper bound on Pass@k when rho
    is each problem's true success rate (with finite n the unbiased estimate can exceed it
    slightly); the fractions of problems with rho = 0 and rho = 1; and a histogram of rho over
    `bins` equal bins of [0, 1] (rho = 1 in the last). Collapse shows as var rising while mean
    stays: mass piling at rho = 0 and rho = 1.
    """
    ks_list, _ = _as_ks(ks)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    n_arr, c_arr = _as_counts("n", n).reshape(-1), _as_counts("c", c).reshape(-1)
    if n_arr.shape != c_arr.shape:
        raise ValueError(f"n has {n_arr.size} problems but c has {c_arr.size}")
    if len(n_arr) == 0:
        raise ValueError("collapse_stats needs at least one problem")
    per_problem = pass_at_k(n_arr[:, None], c_arr[:, None], np.array(ks_list)[None, :])
    rho = c_arr / n_arr
    mean = _mean(rho)
    var = _mean((rho - mean) ** 2)
    edges = np.linspace(0.0, 1.0, bins + 1)
    histogram = np.histogram(rho, bins=edges)[0]
    return CollapseSummary(
        num_problems=len(rho),
        mean_rho=mean,
        var_rho=var,
        frac_rho0=float(np.count_nonzero(c_arr == 0)) / len(rho),
        frac_rho1=float(np.count_nonzero(c_arr == n_arr)) / len(rho),
        pass_at={k: _mean(per_problem[:, i]) for i, k in enumerate(ks_list)},
        jensen_bound={k: 1.0 - ((1.0 - mean) ** 2 + var) ** (k / 2) for k in ks_list if k >= 2},
        rho_histogram=histogram,
        rho_bin_edges=edges,
    )


@dataclass(frozen=True)
class AnswerDiversity:
    """Per-problem diversity of the extracted answers (arrays of shape (problems,)), and means."""

    distinct: np.ndarray
    entropy: np.ndarray
    none_fraction: np.ndarray

    @property
    def mean_distinct(self) -> float:
        return _mean(self.distinct.astype(np.float64))

    @property
    def mean_entropy(self) -> float:
        return _mean(self.entropy)

    def scalars(self) -> dict[str, float]:
        """Flat names: mean_distinct_answers, mean_answer_entropy, mean_none_fraction."""
        return {
            "mean_distinct_answers": self.mean_distinct,
            "mean_answer_entropy": self.mean_entropy,
            "mean_none_fraction": _mean(self.none_fraction),
        }


def answer_diversity(answers: Sequence[Sequence[Hashable | None]]) -> AnswerDiversity:
    """Per problem: the number of distinct non-None answers, the entropy (nats) of the
    distribution of the non-None answers (0 when all agree or none was extracted), and the
    fraction of samples with no answer. Collapse shows as distinct -> 1 and entropy -> 0.
    """
    if isinstance(answers, (str, bytes)):
        raise TypeError("answers must be a sequence of per-problem answer lists, not a string")
    distinct, entropy, none_fraction = [], [], []
    for i, row in enumerate(answers):
        row = list(row)
        if not row:
            raise ValueError(f"problem {i} has no samples")
        votes: dict[Hashable, int] = {}
        for answer in row:
            if answer is not None:
                votes[answer] = votes.get(answer, 0) + 1
        counts = np.array(list(votes.values()), dtype=np.float64)
        p = counts / counts.sum() if len(counts) else counts
        distinct.append(len(votes))
        entropy.append(max(0.0, -math.fsum((p * np.log(p)).tolist())))
        none_fraction.append(1.0 - counts.sum() / len(row))
    return AnswerDiversity(
        distinct=np.array(distinct, dtype=np.int64),
        entropy=np.array(entropy, dtype=np.float64),
        none_fraction=np.array(none_fraction, dtype=np.float64),
    )


# The torchmetrics classes live beside (metric_classes.py), importable from here as before.
from wise_callback.metric_classes import (  # noqa: E402
    BestAtK,
    CollapseStats,
    MajorityAtK,
    PassAtK,
)
