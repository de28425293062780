"""The collapse early warning: a plain object fed the current weights' evaluations.

Each evaluation of the current weights is compared, problem by problem, with the evaluation that
has been best so far (by Pass@k, largest k): `collapse_drop` (best minus now), its paired standard
error over problems `collapse_drop_se`, and `collapse_z = drop / se`. Comparing with the best
evaluation's own per-problem values, paired, rather than with its raw score keeps the problems'
difficulties out of the noise. An evaluation is collapsing when the drop is at least `min_drop`
AND significant (`z >= z_threshold`; with a single problem there is no z and the drop alone
counts) while Pass@1 is not below its value at the best. The watch fires (once per run) after
`patience` collapsing evaluations in a row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wise_callback.paired import paired_difference, z_score

WATCH_KEYS = ("collapse_drop", "collapse_drop_se", "collapse_z", "collapse_risk")
"""What the watch adds to the current weights' record."""


@dataclass
class CollapseWatch:
    """The state of the watch (all of it goes into checkpoints: `state_dict`)."""

    min_drop: float
    patience: int
    metric: str
    z_threshold: float = 2.0
    best: float | None = None
    best_step: int | None = None
    best_pass1: float | None = None
    best_values: list[float] = field(default_factory=list)  # per problem, at the best
    streak: int = 0
    fired: bool = False
    fired_step: int | None = None
    early_pass1: list[float] = field(default_factory=list)  # per problem, the early checkpoint
    last_pass1: list[float] = field(default_factory=list)  # per problem, the latest evaluation
    risk_fired: bool = False

    def risk(self, pass1: np.ndarray) -> float | None:
        """`collapse_risk`: the paired z of the rise in the share of problems solved by every
        sample (rho = 1) since the early checkpoint. Measured on the demo it rises before the
        Pass@k drop on every seed, but from the first evaluations after the snapshot on: it says
        "SFT is sharpening the answers", which precedes collapse, not that collapse is near."""
        if not self.early_pass1:
            return None
        common = min(len(pass1), len(self.early_pass1))
        now = (pass1[:common] == 1.0).astype(float)
        early = (np.asarray(self.early_pass1[:common]) == 1.0).astype(float)
        return z_score(*paired_difference(now, early))

    def compare(self, values: np.ndarray) -> dict[str, float | None]:
        """The paired drop of this evaluation from the best so far (problems a time budget left
        out of either side are left out of both: covered problems are a prefix)."""
        if self.best is None:
            return {"collapse_drop": None, "collapse_drop_se": None, "collapse_z": None}
        common = min(len(values), len(self.best_values))
        drop, se = paired_difference(np.asarray(self.best_values[:common]), values[:common])
        return {"collapse_drop": drop, "collapse_drop_se": se, "collapse_z": z_score(drop, se)}

    def update(self, record: dict[str, Any], values: np.ndarray) -> dict[str, Any] | None:
        """Take one evaluation record of the current weights (with its `compare` keys) and its
        per-problem values of `metric`; return the warning's facts the first time it fires."""
        value, pass1, z = record[self.metric], record["mean_rho"], record.get("collapse_z")
        if self.best is None or value > self.best:
            self.best, self.best_step, self.best_pass1 = value, record["step"], pass1
            self.best_values = [float(v) for v in values]
            self.streak = 0
        elif (
            self.best - value >= self.min_drop
            and (z is None or z >= self.z_threshold)
            and pass1 >= (self.best_pass1 or 0.0)
        ):
            self.streak += 1
        else:
            self.streak = 0
        if self.fired or self.streak < self.patience:
            return None
        self.fired, self.fired_step = True, record["step"]
        return {
            "step": record["step"],
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "current": value,
            "drop_se": record.get("collapse_drop_se"),
            "z": z,
            "pass@1_at_best": self.best_pass1,
            "pass@1": pass1,
            "evaluations_in_a_row": self.streak,
        }

    @staticmethod
    def message(info: dict[str, Any]) -> str:
        """The warning users read."""
        significance = (
            f" (paired SE {info['drop_se']:.4f}, z = {info['z']:.1f})"
            if info.get("z") is not None
            else ""
        )
        return (
            f"diversity collapse at step {info['step']}: {info['metric']} fell from "
            f"{info['best']:.4f} (step {info['best_step']}) to {info['current']:.4f}"
            f"{significance} for {info['evaluations_in_a_row']} evaluation(s) in a row while "
            f"Pass@1 went {info['pass@1_at_best']:.4f} -> {info['pass@1']:.4f}. WiSE-FT with the "
            "early snapshot recovers Pass@k: the final choice's alpha grid (wiseft/alpha_* "
            "metrics) shows by how much."
        )

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        for setting in ("min_drop", "patience", "metric", "z_threshold"):
            state.pop(setting)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
