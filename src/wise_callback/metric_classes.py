"""torchmetrics twins of the functional metrics (`wise_callback.metrics`): per-problem values
in "cat" states, reduced with an exact sum, so that a run split over processes gives the same
numbers as one process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from wise_callback.metrics import (
    CollapseSummary,
    _as_counts,
    _as_ks,
    _mean,
    best_at_k,
    collapse_stats,
    majority_at_k,
    pass_at_k,
)


def _gathered(state: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
    """A "cat" state as a flat float64 array: a list before syncing, one tensor after it."""
    if isinstance(state, list):
        if not state:
            return np.zeros(0)
        state = dim_zero_cat(state)
    return state.detach().cpu().double().numpy().reshape(-1)


class _PerProblemAtK(Metric):
    """Stores one row of per-problem values per k (flattened, float64) and averages them.

    States are 1-D float64 lists reduced with "cat", so ranks with different numbers of problems
    (or none) gather cleanly; `compute` averages with math.fsum, so the numbers do not depend on
    how the problems were split over processes.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    name = ""
    values: list[torch.Tensor]

    def __init__(self, ks: int | Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks, _ = _as_ks(ks)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def _append(self, per_problem: np.ndarray) -> None:
        self.values.append(torch.as_tensor(per_problem.reshape(-1), device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        table = _gathered(self.values).reshape(-1, len(self.ks))
        return {
            f"{self.name}@{k}": torch.tensor(_mean(table[:, i]), dtype=torch.float64)
            for i, k in enumerate(self.ks)
        }


class PassAtK(_PerProblemAtK):
    """Mean unbiased Pass@k over problems; `update(n, c)` with per-problem counts.
    compute() -> {"pass@k": tensor} for each k."""

    name = "pass"

    def update(self, n: Any, c: Any) -> None:
        n_arr, c_arr = np.asarray(n).reshape(-1, 1), np.asarray(c).reshape(-1, 1)
        self._append(pass_at_k(n_arr, c_arr, np.array(self.ks)[None, :]))


class MajorityAtK(_PerProblemAtK):
    """Mean exact Maj@k; `update(answers, correct)` as for `majority_at_k`.
    compute() -> {"maj@k": tensor}."""

    name = "maj"

    def update(self, answers: Sequence[Sequence[Any]], correct: Sequence[Sequence[bool]]) -> None:
        self._append(majority_at_k(answers, correct, self.ks))


class BestAtK(_PerProblemAtK):
    """Mean exact Best@k; `update(scores, correct)` as for `best_at_k`.
    compute() -> {"best@k": tensor}."""

    name = "best"

    def update(self, scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]) -> None:
        self._append(best_at_k(scores, correct, self.ks))


class CollapseStats(Metric):
    """`collapse_stats` over all problems seen (on all processes); `update(n, c)`.
    compute() -> CollapseSummary (use `.scalars()` for logging)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    num_samples: list[torch.Tensor]
    num_correct: list[torch.Tensor]

    def __init__(self, ks: Sequence[int], *, bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks, _ = _as_ks(ks)
        self.bins = bins
        self.add_state("num_samples", default=[], dist_reduce_fx="cat")
        self.add_state("num_correct", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def update(self, n: Any, c: Any) -> None:
        n_arr, c_arr = _as_counts("n", n).reshape(-1), _as_counts("c", c).reshape(-1)
        pass_at_k(n_arr, c_arr, 1)  # validates c <= n before anything is stored
        self.num_samples.append(torch.as_tensor(n_arr, dtype=torch.float64, device=self.device))
        self.num_correct.append(torch.as_tensor(c_arr, dtype=torch.float64, device=self.device))

    def compute(self) -> CollapseSummary:
        n, c = _gathered(self.num_samples), _gathered(self.num_correct)
        return collapse_stats(n, c, self.ks, bins=self.bins)
