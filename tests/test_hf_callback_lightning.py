"""The two front doors share every decision: the same small run under Lightning
(`WiSEFTCallback`) and under transformers' Trainer (`WiSEFTTrainerCallback`), with the same
init, data order, optimizer and loss, passes identical weights at identical steps to each door,
and the two doors then write identical records and merge identically."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callback_toy import ToyModule
from helpers import assert_same, weights
from hf_toy import WeightRecorder, toy_arguments, toy_options, toy_trainer
from wise_callback import WiSEFTCallback, WiSEFTTrainerCallback

STEPS = 12
RECORDED = (4, 5, 10, STEPS)  # the snapshot, the evaluations, the end


class LightningRecorder(Callback):
    """Placed before WiSEFTCallback: the weights after each step in RECORDED."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in RECORDED:
            self.at[trainer.global_step] = weights(pl_module.model)


def test_lightning_and_trainer_doors_give_identical_records_for_identical_weights(tmp_path):
    lightning_door = WiSEFTCallback(**toy_options())
    lightning_weights = LightningRecorder()
    module = ToyModule(batch_size=None)  # the whole training set as one batch, fixed order
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=STEPS, callbacks=[lightning_weights, lightning_door],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path / "lightning",
    )  # fmt: skip
    trainer.fit(module)

    hf_door = WiSEFTTrainerCallback(**toy_options())
    hf_weights = WeightRecorder(steps=RECORDED)
    hf_trainer = toy_trainer(toy_arguments(tmp_path / "hf", max_steps=STEPS), [hf_weights, hf_door])
    hf_trainer.train()

    # the premise: both doors were handed the same weights at the same steps
    for step in RECORDED:
        assert_same(lightning_weights.at[step], hf_weights.at[step])
    # the claim: the same records, the same choice, the same merged weights
    assert [(r["step"], r["alpha"]) for r in hf_door.history] == [
        (4, 0.0), (5, 1.0), (10, 1.0), (12, 0.5), (12, 1.0),
    ]  # fmt: skip
    assert hf_door.history == lightning_door.history
    assert hf_door.chosen_alpha == lightning_door.chosen_alpha
    assert_same(weights(hf_trainer.model), weights(module.model))
    hf_history = (tmp_path / "hf" / "history.jsonl").read_text()
    assert hf_history == lightning_door.history_path.read_text()
