"""How an evaluation is configured: samples per problem, the k values, sampling and grading
settings, the alpha grid's checks, and the seed of each evaluation."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from wise_callback.grading import LOAD_TIMEOUT_S
from wise_callback.sampling import SamplingConfig
from wise_callback.weights import check_alpha

CURRENT = 1.0
"""alpha = 1.0 is the current (latest) weights, evaluated without touching them."""

HIGHER_IS_BETTER = ("pass@", "maj@", "jensen_bound@", "mean_rho")
"""Prefixes of the metrics that can select the merge alpha (larger is better for all of them)."""


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: samples per problem, the k values, sampling and grading settings.

    `ks` defaults to the powers of two up to `num_samples`, plus `num_samples` itself.
    `sampling.seed` (default 0) is the base of the evaluation seeds. `problems_per_call`: the
    block of consecutive problems that goes into one `sampler.sample` call (the unit of batching
    and of the split across ranks; None: one block per rank, or BUDGET_CALLS blocks per rank
    when `time_budget_s` is set, so that the budget has calls to stop between).
    `time_budget_s`: seconds of sampling per evaluation (see `evaluate`).
    """

    num_samples: int = 16
    ks: tuple[int, ...] | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grade_timeout_s: float = 10.0
    grade_workers: int | None = None
    grade_load_timeout_s: float = LOAD_TIMEOUT_S
    problems_per_call: int | None = 8
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int):
            raise TypeError(f"num_samples must be an int, got {self.num_samples!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        ks = default_ks(self.num_samples) if self.ks is None else tuple(self.ks)
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"every k must be a positive int, got {k!r} in ks={ks}")
            if k > self.num_samples:
                raise ValueError(
                    f"k={k} in ks={ks} is larger than num_samples={self.num_samples}: Pass@k needs "
                    "at least k samples per problem"
                )
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(
                f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}"
            )
        if not (self.grade_timeout_s > 0 and math.isfinite(self.grade_timeout_s)):
            raise ValueError(
                f"grade_timeout_s must be a positive number, got {self.grade_timeout_s}"
            )
        if self.grade_workers is not None and self.grade_workers < 0:
            raise ValueError(f"grade_workers must be None or >= 0, got {self.grade_workers}")
        per_call = self.problems_per_call
        if per_call is not None and (isinstance(per_call, bool) or per_call < 1):
            raise ValueError(f"problems_per_call must be None or >= 1, got {per_call}")
        budget = self.time_budget_s
        if budget is not None and not (
            isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)
        ):
            raise ValueError(f"time_budget_s must be None or a positive number, got {budget!r}")

    @property
    def max_k(self) -> int:
        assert self.ks is not None
        return self.ks[-1]

    def metric_names(self) -> list[str]:
        """The scalar metrics of every record (what `select_metric` may name, and more)."""
        assert self.ks is not None
        names = [f"pass@{k}" for k in self.ks] + [f"maj@{k}" for k in self.ks]
        names += ["mean_rho", "var_rho", "frac_rho0", "frac_rho1"]
        names += [f"jensen_bound@{k}" for k in self.ks if k >= 2]
        names += ["mean_distinct_answers", "mean_answer_entropy", "mean_none_fraction"]
        names += [f"{m}@{k}_se" for m in ("pass", "maj") for k in self.ks]
        return [*names, "mean_completion_tokens", "frac_truncated"]

    def selectable_metrics(self) -> list[str]:
        """Metrics where larger is better: the ones an alpha can be chosen by."""
        names = self.metric_names()
        return [m for m in names if m.startswith(HIGHER_IS_BETTER) and not m.endswith("_se")]


def default_ks(num_samples: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to num_samples, and num_samples itself."""
    ks = [2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples]
    return tuple(sorted({*ks, num_samples}))


def check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    """Alphas as sorted unique floats in [0, 1]; ValueError naming a bad one."""
    values = [check_alpha(a) for a in alphas]
    return tuple(sorted(set(values)))


def evaluation_seed(base: int, step: int | None, salt: str = "") -> int:
    """The sampling seed of the evaluation at `step` (samplers derive per-prompt seeds from it);
    a `salt` gives another, independent stream (a second round of sampling at the same step)."""
    digest = hashlib.blake2b(f"{base}:{step}{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
