"""The cheaper schedule: the alpha grid at every m-th evaluation (and at the last step, and after
an alarming collapse_z) samples fewer tokens and leaves the decisions as they were."""

from __future__ import annotations

import lightning.pytorch as pl

from callback_toy import ToyModule, toy_problems
from wise_callback import WiSEFTCallback


def run(tmp_path, **evaluation):
    module = ToyModule(lr=1e-2)
    callback = WiSEFTCallback(
        toy_problems(6), module.tokenizer, snapshot_at=1, eval_every_n_steps=2, num_samples=4,
        alphas=(0.25, 0.5), max_new_tokens=2, final_alpha="best",
        sample_logging={"progress": False}, evaluation=evaluation,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=9, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
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
    every = run(tmp_path / "every")
    sparse = run(tmp_path / "sparse", grid_every=2)
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
    alert = run(tmp_path, grid_every=100, grid_when_z=-1e9)  # any z is "alarming"
    # the early snapshot's record (step 1) has no z (nothing before it to compare with), so
    # step 2 samples the current weights only; every later evaluation follows one with a z
    current = [r for r in alert.history if r["alpha"] in (0.0, 1.0)]
    assert current[0]["collapse_z"] is None
    assert all(r["collapse_z"] is not None for r in current[1:])
    assert sampled(alert) == {1: [0.0], 2: [1.0], **{s: [0.25, 0.5, 1.0] for s in (4, 6, 8, 9)}}
