"""The collapse early warning: a plain object fed the current weights' evaluations.

It fires (once per run) when Pass@k (largest k) of the current weights has stayed at least
`min_drop` below its best so far for `patience` evaluations in a row while Pass@1 is not below
its value at that best: the model gets more often right and less often diverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class CollapseWatch:
    """The state of the watch (all of it goes into checkpoints: `state_dict`)."""

    min_drop: float
    patience: int
    metric: str
    best: float | None = None
    best_step: int | None = None
    best_pass1: float | None = None
    streak: int = 0
    fired: bool = False

    def update(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Take one evaluation record of the current weights; return the warning's facts
        (step, metric, best, ...) the first time the watch fires, else None."""
        value, pass1 = record[self.metric], record["mean_rho"]
        if self.best is None or value > self.best:
            self.best, self.best_step, self.best_pass1, self.streak = (
                value,
                record["step"],
                pass1,
                0,
            )
        elif self.best - value >= self.min_drop and pass1 >= (self.best_pass1 or 0.0):
            self.streak += 1
        else:
            self.streak = 0
        if self.fired or self.streak < self.patience:
            return None
        self.fired = True
        return {
            "step": record["step"],
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "current": value,
            "pass@1_at_best": self.best_pass1,
            "pass@1": pass1,
            "evaluations_in_a_row": self.streak,
        }

    @staticmethod
    def message(info: dict[str, Any]) -> str:
        """The warning users read."""
        return (
            f"diversity collapse at step {info['step']}: {info['metric']} fell from "
            f"{info['best']:.4f} (step {info['best_step']}) to {info['current']:.4f} for "
            f"{info['evaluations_in_a_row']} evaluations in a row while Pass@1 went "
            f"{info['pass@1_at_best']:.4f} -> {info['pass@1']:.4f}. WiSE-FT with the early "
            "snapshot recovers Pass@k; see the wiseft/alpha_* metrics."
        )

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        for setting in ("min_drop", "patience", "metric"):
            state.pop(setting)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
