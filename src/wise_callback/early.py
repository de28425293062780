"""Which weights become the early checkpoint, and when.

* A step (int) or a fraction of the planned steps (float): the weights after that step.
* "peak": chosen by the data. Until a cut-off (`peak_until`, a fraction of the planned steps)
  the current weights are evaluated every `eval_every_n_steps`, and each evaluation with a new
  best selection metric replaces the snapshot (a copy kept off the accelerator). At the cut-off
  the snapshot is fixed, and the alpha grid runs against it from then on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PEAK = "peak"


@dataclass
class EarlySchedule:
    """The resolved schedule and, for "peak", the search's state (saved with checkpoints)."""

    spec: int | float | str
    peak_until: float = 0.5
    step: int | None = None  # the snapshot step, or the peak search's cut-off
    best: float | None = None  # "peak": the best selection metric so far
    open: bool = True  # "peak": still looking for the best evaluation

    @property
    def peak(self) -> bool:
        return self.spec == PEAK

    def resolve(self, planned: float, have_snapshot: bool) -> None:
        """The step, from the planned number of steps (math.inf when unknown)."""
        if isinstance(self.spec, float) or self.peak:
            fraction = self.peak_until if self.peak else float(self.spec)
            if not math.isfinite(planned):
                raise ValueError(
                    f"snapshot_at={self.spec!r} needs the planned number of steps, which is "
                    "unknown: set max_steps or give snapshot_at as a step"
                )
            self.step = max(1, round(fraction * planned))
        else:
            self.step = int(self.spec)
        if not self.peak and not have_snapshot and self.step > planned:
            raise ValueError(
                f"snapshot_at={self.spec} (step {self.step}) is after the last planned step "
                f"{planned}: the snapshot would never be taken"
            )

    def fixed_snapshot_due(self, step: int, have_snapshot: bool) -> bool:
        """A step / fraction schedule: whether to take the snapshot now."""
        assert self.step is not None, "resolve() was not called"
        return not self.peak and not have_snapshot and step >= self.step

    def searching(self, step: int) -> bool:
        """ "peak": whether `step` is still before (or at) the cut-off of the search."""
        assert self.step is not None, "resolve() was not called"
        return self.peak and self.open and step <= self.step

    def improves(self, value: float) -> bool:
        """ "peak": whether an evaluation's selection metric is a new best (then remembered)."""
        if self.best is not None and value <= self.best:
            return False
        self.best = value
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "open": self.open}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.open = state["best"], state["open"]
