"""When the alpha grid is sampled: the current weights at every evaluation, the grid only where
something reads it.

The collapse watch reads the current weights only, and the final choice reads the grid of the
last step (or of the step whose weights the trainer put back), so by default the grid is sampled
for the final choice alone. It is sampled more often when asked (`EvalOptions.grid_every`,
`grid_when_z`) and when the trainer itself selects checkpoints by a grid metric (a
`ModelCheckpoint(monitor="wiseft/best/pass@16")`, or transformers' `metric_for_best_model`):
then the grid is due at every evaluation, in full (no successive halving at the end), so that the
selection sees what it saw before.
"""

from __future__ import annotations

from collections.abc import Sequence

from wise_callback.options import EvalOptions

GRID_METRICS = ("wiseft/best", "wiseft/alpha_")
"""Logged names that the alpha grid gives (`outputs.logged_scalars`)..."""

CURRENT_METRICS = "wiseft/alpha_1.00/"
"""... except the current weights' own, sampled at every evaluation."""


def reads_grid(selects_by: Sequence[str]) -> bool:
    """Whether a trainer's checkpoint selection (metric names) reads the alpha grid."""
    return any(
        prefix in name and CURRENT_METRICS not in name
        for name in selects_by
        for prefix in GRID_METRICS
    )


def grid_due(
    options: EvalOptions,
    *,
    evaluation_number: int,
    final: bool,
    last_z: float | None,
    selects_by: Sequence[str] = (),
) -> bool:
    """Whether the evaluation numbered `evaluation_number` (1, 2, ... after the snapshot)
    samples the alpha grid: for the final choice, every `grid_every`-th one, after one whose
    collapse_z reached `grid_when_z`, and at every one when the trainer selects by the grid."""
    every = 1 if options.grid_every is None and reads_grid(selects_by) else options.grid_every
    alert = options.grid_when_z
    return (
        final
        or (every is not None and evaluation_number % every == 0)
        or (alert is not None and last_z is not None and last_z >= alert)
    )
