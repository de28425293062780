"""The cheaper schedules: by default the alpha grid only for the final choice (by successive
halving); on request at every m-th evaluation, or after an alarming collapse_z; at every
evaluation when a checkpoint callback selects by a grid metric. Fewer tokens, same decisions."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from callback_toy import ToyModule, toy_problems
from wise_callback import WiSEFTCallback
from wise_callback.report import plot_history
from wise_callback.schedule import reads_grid

EVERY = {"grid_every": 1, "halving": None}
"""The 0.1 schedule: every alpha in full at every evaluation."""


def run(tmp_path, callbacks=(), **evaluation):
    module = ToyModule(lr=1e-2)
    callback = WiSEFTCallback(
        toy_problems(6), module.tokenizer, snapshot_at=1, eval_every_n_steps=2, num_samples=4,
        alphas=(0.25, 0.5), max_new_tokens=2, final_alpha="best",
        sample_logging={"progress": False}, evaluation=evaluation,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=9, callbacks=[callback, *callbacks], logger=False,
        enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module)
    return callback


def sampled(callback) -> dict[int, list[float]]:
    steps: dict[int, list[float]] = {}
    for record in callback.history:
        steps.setdefault(record["step"], []).append(record["alpha"])
    return steps


def tokens(callback) -> float:
    return sum(r["mean_completion_tokens"] * r["num_samples"] for r in callback.history)


def test_the_grid_every_second_evaluation_and_at_the_end_keeps_the_decisions(tmp_path):
    every = run(tmp_path / "every", **EVERY)
    sparse = run(tmp_path / "sparse", grid_every=2, halving=None)
    assert sampled(every) == {1: [0.0], **{s: [0.25, 0.5, 1.0] for s in (2, 4, 6, 8, 9)}}
    assert sampled(sparse) == {
        1: [0.0], 2: [1.0], 4: [0.25, 0.5, 1.0], 6: [1.0], 8: [0.25, 0.5, 1.0],
        9: [0.25, 0.5, 1.0],
    }  # fmt: skip
    # the current weights' records and the last step's grid are the same numbers
    current = lambda c: [r for r in c.history if r["alpha"] in (0.0, 1.0)]  # noqa: E731
    assert current(sparse) == current(every)
    assert [r for r in sparse.history if r["step"] == 9] == [
        r for r in every.history if r["step"] == 9
    ]
    assert sparse.chosen_alpha == every.chosen_alpha
    assert sparse.collapse_detected == every.collapse_detected
    assert tokens(sparse) < tokens(every)


def test_an_alarming_collapse_z_brings_the_grid_forward(tmp_path):
    alert = run(tmp_path, grid_every=100, grid_when_z=-1e9, halving=None)  # any z "alarms"
    # the early snapshot's record (step 1) has no z (nothing before it to compare with), so
    # step 2 samples the current weights only; every later evaluation follows one with a z
    current = [r for r in alert.history if r["alpha"] in (0.0, 1.0)]
    assert current[0]["collapse_z"] is None
    assert all(r["collapse_z"] is not None for r in current[1:])
    assert sampled(alert) == {1: [0.0], 2: [1.0], **{s: [0.25, 0.5, 1.0] for s in (4, 6, 8, 9)}}


def test_the_default_samples_the_grid_for_the_final_choice_only_by_halving(tmp_path):
    every = run(tmp_path / "every", **EVERY)
    default = run(tmp_path / "default")
    assert sampled(default) == {1: [0.0], **{s: [1.0] for s in (2, 4, 6, 8)}, 9: [0.25, 0.5, 1.0]}
    current = lambda c: [r for r in c.history if r["alpha"] in (0.0, 1.0)]  # noqa: E731
    assert current(default) == current(every)  # what the collapse watch reads
    assert default.collapse_detected == every.collapse_detected
    final = {r["alpha"]: r for r in default.history if r["step"] == 9}
    # 4 samples per problem: the first round gives every alpha 1, the better half (one of two)
    # goes on to 4, unless it is clearly worse than the current weights
    kept = [a for a in (0.25, 0.5) if final[a]["num_samples"] == 4 * 6]
    assert len(kept) <= 1
    assert all(final[a]["num_samples"] == 6 for a in (0.25, 0.5) if a not in kept)
    assert "pass@4" not in final[0.5 if kept == [0.25] else 0.25]
    full = [r for r in final.values() if "pass@4" in r]
    assert default.chosen_alpha == max(full, key=lambda r: (r["pass@4"], r["alpha"]))["alpha"]
    assert tokens(default) < 0.5 * tokens(every)
    # the report draws every alpha it has full records of
    assert plot_history(default.history, tmp_path / "report.png").stat().st_size > 0


def test_a_checkpoint_that_selects_by_the_grid_gets_the_grid_at_every_evaluation(tmp_path):
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="wiseft/best/pass@4", mode="max")
    callback = run(tmp_path, callbacks=[keeper])
    assert sampled(callback) == {1: [0.0], **{s: [0.25, 0.5, 1.0] for s in (2, 4, 6, 8, 9)}}


def test_which_checkpoint_selections_read_the_grid():
    assert reads_grid(["wiseft/best/pass@16"])
    assert reads_grid(["eval_wiseft/alpha_0.50/pass@1"])  # transformers' metric_for_best_model
    assert not reads_grid(["wiseft/alpha_1.00/pass@1", "loss", "eval_loss"])  # current weights
