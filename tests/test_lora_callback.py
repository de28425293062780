"""WiSEFTCallback with a real Lightning fit of a PEFT LoRA model (tiny Llama, LoRA on attention and
MLP, lm_head in modules_to_save): the snapshot is the adapter only, the final merge is the exact
interpolant (rank 2r), and save_merged_to holds an adapter that reloads to the merged model."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from callback_toy import toy_batches, toy_problems
from helpers import EVERY
from lora_helpers import assert_merged_exactly, logits, lora_model
from wise_callback import WiSEFTCallback
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.grading import exact_match

IDS = torch.arange(4, 40).reshape(3, 12)


class LoraToyModule(pl.LightningModule):
    """Causal-LM SFT of the adapter (and lm_head) of a PeftModel at `pl_module.model`."""

    def __init__(self, batch_size: int | None = 8) -> None:
        super().__init__()
        self.tokenizer = char_tokenizer()
        self.model = lora_model(self.tokenizer)
        self.batch_size = batch_size

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=1e-2)

    def train_dataloader(self):
        return toy_batches(self.tokenizer, self.batch_size)


class BeforeMerge(Callback):
    """Placed before WiSEFTCallback: the adapter as training left it."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.latest = {n: t.clone() for n, t in pl_module.model.state_dict().items()}
        self.adapter_bytes = sum(
            t.numel() * t.element_size()
            for t in get_peft_model_state_dict(pl_module.model).values()
        )


def fit(root, module, max_steps, callbacks=(), ckpt_path=None, **options) -> WiSEFTCallback:
    """A real Lightning fit of `module` with WiSEFTCallback (after `callbacks`)."""
    callback = WiSEFTCallback(
        problems=toy_problems(),
        tokenizer=module.tokenizer,
        grader=exact_match,
        snapshot_at=2,
        eval_every_n_steps=4,
        num_samples=2,
        alphas=(0.5,),
        final_alpha=0.4,
        max_new_tokens=3,
        sample_logging={"progress": False},
        **options,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[*callbacks, callback],
        logger=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return callback


def test_lightning_fit_of_a_lora_model_merges_and_saves_the_interpolated_adapter(tmp_path):
    module = LoraToyModule()
    before = BeforeMerge()
    callback = fit(tmp_path, module, 8, [before], save_merged_to=tmp_path / "merged")

    assert [(r["step"], r["alpha"]) for r in callback.history] == [
        (2, 0.0), (4, 1.0), (8, 0.5), (8, 1.0),
    ]  # fmt: skip
    snapshot = callback.snapshot
    assert snapshot.step == 2 and snapshot.lora is not None
    assert snapshot.nbytes == before.adapter_bytes  # the adapter only, never the frozen base
    assert callback.chosen_alpha == 0.4

    merged = module.model.eval()
    assert merged.peft_config["default"].r == 8
    expected = assert_merged_exactly(merged, module.tokenizer, before.latest, snapshot, 0.4, IDS)

    saved = tmp_path / "merged"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((saved / "wiseft_merge.json").read_text())["alpha"] == 0.4
    base = tiny_llama(len(module.tokenizer), seed=0, tokenizer=module.tokenizer)
    reloaded = PeftModel.from_pretrained(base, saved)
    assert torch.equal(logits(reloaded, IDS), expected)


def test_a_resumed_lora_run_reloads_the_adapter_snapshot_and_merges_alike(tmp_path):
    """Killed after step 4 and resumed from its checkpoint, a run ends with the same merged
    adapter as an uninterrupted one: the snapshot file (adapter only) reloads with its layout."""
    whole = LoraToyModule(batch_size=None)  # one batch per epoch: a checkpoint per step
    # the grid at every evaluation: the 4-step run stands in for a killed 6-step one, and its
    # last step would otherwise get the final choice's grid
    uninterrupted = fit(tmp_path / "whole", whole, 6, evaluation=EVERY)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "checkpoint", LoraToyModule(batch_size=None), 4, [checkpoints], evaluation=EVERY)
    resumed_module = LoraToyModule(batch_size=None)
    resumed = fit(
        tmp_path / "checkpoint",
        resumed_module,
        6,
        [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
        evaluation=EVERY,
    )
    assert resumed.snapshot.step == 2 and resumed.snapshot.lora == uninterrupted.snapshot.lora
    assert resumed.history == uninterrupted.history
    assert resumed_module.model.peft_config["default"].r == 8
    assert torch.equal(logits(resumed_module.model.eval(), IDS), logits(whole.model.eval(), IDS))


def test_dense_merge_saves_the_plain_model_with_the_merged_weights(tmp_path):
    """snapshotting.dense_merge: save_merged_to holds a plain transformers model (no adapter)
    whose logits are the merged PeftModel's."""
    from transformers import AutoModelForCausalLM

    module = LoraToyModule()
    fit(
        tmp_path, module, 4, save_merged_to=tmp_path / "dense",
        snapshotting={"dense_merge": True},
    )  # fmt: skip
    saved = tmp_path / "dense"
    assert not (saved / "adapter_config.json").exists()
    dense = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert type(dense).__name__ == "LlamaForCausalLM"
    merged = logits(module.model.eval(), IDS)
    assert torch.allclose(logits(dense, IDS), merged, atol=1e-5, rtol=0)
    assert json.loads((saved / "wiseft_merge.json").read_text())["alpha"] == 0.4
