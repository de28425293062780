"""Supervised fine-tuning for the demo: a LightningModule and a datamodule for chain problems.

The model sees ``prompt + completion + eos`` and is trained teacher-forced on the completion tokens
only (the prompt and the padding are masked out of the loss), which is plain SFT on reasoning
traces. Prompts are not prefixed with bos: samplers tokenize a prompt as its characters alone, so
training matches what they feed the model at evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

IGNORE_INDEX = -100


def collate(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Mapping[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (completion + eos only)."""
    prompts = tokenizer([p["prompt"] for p in problems], add_special_tokens=False)["input_ids"]
    completions = tokenizer([p["completion"] for p in problems], add_special_tokens=False)[
        "input_ids"
    ]
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)) + 1
    input_ids = torch.full((len(problems), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(problems), length), dtype=torch.long)
    labels = torch.full((len(problems), length), IGNORE_INDEX)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        target = [*completion, tokenizer.eos_token_id]
        end = len(prompt) + len(target)
        input_ids[row, :end] = torch.tensor(prompt + target)
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_loss(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of `batch`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


class ChainSFTModule(L.LightningModule):
    """SFT of a causal LM (kept at ``self.model``) with AdamW.

    The learning rate warms up linearly over `warmup_steps`, then follows a cosine from `lr` down
    to ``lr * final_lr_ratio`` at ``trainer.max_steps``; the default (no warmup, ratio 1) is a
    constant `lr`, which is what the demo's SFT uses.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        final_lr_ratio: float = 1.0,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.final_lr_ratio = final_lr_ratio

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = completion_loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        if self.warmup_steps == 0 and self.final_lr_ratio == 1:
            return optimizer
        if self.trainer.max_steps < 1:
            raise ValueError("a learning-rate schedule needs Trainer(max_steps=...)")
        schedule = partial(
            _warmup_cosine, self.warmup_steps, self.trainer.max_steps, self.final_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _warmup_cosine(warmup: int, total: int, final_ratio: float, index: int) -> float:
    """The lr factor of optimizer step `index` (0-based): linear warmup, then cosine decay."""
    step = index + 1
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ChainDataModule(L.LightningDataModule):
    """Shuffled mini-batches of a fixed problem list (SFT) or of an endless stream (pretraining).

    With a list, each epoch is a seeded reshuffle, so a run with ``max_steps`` past one epoch
    revisits the same problems: the overfitting regime in which diversity collapses.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        problems: Sequence[Mapping[str, str]] | Iterable[Mapping[str, str]],
        batch_size: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(problems, Sequence) and len(problems) < batch_size:
            raise ValueError(f"{len(problems)} problems are fewer than batch_size {batch_size}")
        self.tokenizer = tokenizer
        self.problems = problems
        self.batch_size = batch_size
        self.seed = seed

    @override
    def train_dataloader(self) -> DataLoader:
        collate_fn = partial(collate, self.tokenizer)
        if not isinstance(self.problems, Sequence):
            stream = _Stream(self.problems)
            return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate_fn)
        return DataLoader(
            list(self.problems),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
        )


class _Stream(torch.utils.data.IterableDataset):
    """An iterable of problems as a torch dataset (one pass, consumed in order)."""

    def __init__(self, problems: Iterable[Mapping[str, str]]):
        self.problems = problems

    def __iter__(self):
        return iter(self.problems)
