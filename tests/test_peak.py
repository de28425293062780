"""snapshot_at="peak": the early checkpoint is the weights of the best evaluation of the current
weights before the cut-off, bit for bit, also after a crash and a resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from callback_toy import ToyModule, toy_problems
from helpers import assert_same, weights
from wise_callback import WiSEFTCallback


class Recorder(Callback):
    """Placed before WiSEFTCallback: the weights after every optimizer step."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = weights(pl_module.model)


class Crash(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("the machine went away")


def run(root, crash=False, ckpt_path=None):
    module = ToyModule(batch_size=None, lr=1e-2)  # one batch per epoch
    recorder = Recorder()
    callback = WiSEFTCallback(
        toy_problems(6), module.tokenizer, snapshot_at="peak", eval_every_n_steps=2,
        num_samples=8, ks=(1, 8), alphas=(0.5,), final_alpha=0.5, max_new_tokens=2,
        snapshotting={"peak_until": 0.5}, sample_logging={"progress": False},
    )  # fmt: skip
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=root / "ckpt", save_last=True, every_n_train_steps=1
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[recorder, callback, *([Crash()] if crash else []), checkpoints],
    )  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return callback, recorder, module


def test_the_peak_snapshot_is_the_best_evaluation_and_survives_a_resume(tmp_path):
    straight, recorder, module = run(tmp_path / "straight")
    steps = [(r["step"], r["alpha"]) for r in straight.history]
    assert steps == [(2, 1.0), (4, 1.0), (6, 1.0), (8, 0.5), (8, 1.0)]
    searched = [r for r in straight.history if r["step"] <= 4]
    best = max(searched, key=lambda r: (r["pass@8"], -r["step"]))  # the first best wins ties
    assert straight.snapshot is not None and straight.snapshot.step == best["step"]
    snapshot = {n: t for n, t in recorder.seen[best["step"]].items()}
    assert_same(straight.snapshot.tensors, {n: snapshot[n] for n in straight.snapshot.tensors})
    assert straight.snapshot.tensors["model.embed_tokens.weight"].device.type == "cpu"

    with pytest.raises(RuntimeError, match="went away"):
        run(tmp_path / "crashed", crash=True)
    resumed, _, resumed_module = run(
        tmp_path / "crashed", ckpt_path=tmp_path / "crashed" / "ckpt" / "last.ckpt"
    )
    assert resumed.history == straight.history
    assert resumed.snapshot is not None and resumed.snapshot.step == straight.snapshot.step
    assert_same(resumed.snapshot.tensors, straight.snapshot.tensors)
    assert_same(weights(resumed_module.model), weights(module.model))  # the same merge


def test_peak_needs_the_planned_steps():
    with pytest.raises(ValueError, match="snapshot_at must be a step, a fraction or 'peak'"):
        WiSEFTCallback(toy_problems(2), snapshot_at="best")
    with pytest.raises(ValueError, match=r"snapshotting\.peak_until must be > 0"):
        WiSEFTCallback(toy_problems(2), snapshot_at="peak", snapshotting={"peak_until": 0.0})
