"""WiSEFTTrainerCallback on a real transformers Trainer training a PEFT LoRA model: the snapshot is
the adapter only, the final merge is the exact interpolant, and save_merged_to holds an adapter
(rank 2r) that PeftModel.from_pretrained reloads to the merged model."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from transformers import Trainer, TrainerCallback

from hf_toy import toy_arguments, toy_options, toy_train_set
from lora_helpers import assert_merged_exactly, logits, lora_model
from wise_callback import WiSEFTTrainerCallback
from wise_callback.demo.model import char_tokenizer, tiny_llama

IDS = torch.arange(4, 40).reshape(3, 12)


class BeforeMerge(TrainerCallback):
    """Placed before WiSEFTTrainerCallback: the adapter as training left it."""

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self.latest = {n: t.clone() for n, t in model.state_dict().items()}
        self.adapter_bytes = sum(
            t.numel() * t.element_size() for t in get_peft_model_state_dict(model).values()
        )


def test_trainer_fit_of_a_lora_model_merges_and_saves_the_interpolated_adapter(tmp_path):
    tokenizer = char_tokenizer()
    model = lora_model(tokenizer)
    callback = WiSEFTTrainerCallback(
        **toy_options(final_alpha=0.4, save_merged_to=tmp_path / "merged")
    )
    before = BeforeMerge()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(
        model=model, args=toy_arguments(tmp_path / "out", max_steps=8),
        train_dataset=toy_train_set(tokenizer), processing_class=tokenizer,
        callbacks=[before, callback], optimizers=(torch.optim.AdamW(trainable, lr=1e-2), None),
    )  # fmt: skip
    trainer.train()

    assert [(r["step"], r["alpha"]) for r in callback.history][:1] == [(4, 0.0)]
    snapshot = callback.snapshot
    assert snapshot.lora is not None and snapshot.nbytes == before.adapter_bytes
    merged = trainer.model.eval()
    expected = assert_merged_exactly(merged, tokenizer, before.latest, snapshot, 0.4, IDS)

    saved = tmp_path / "merged"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2 * 4
    reloaded = PeftModel.from_pretrained(
        tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer), saved
    )
    assert torch.equal(logits(reloaded, IDS), expected)
