"""A toy SFT task for the callback tests: single-digit sums "a+b=" -> "c" (mod 10) on a tiny Llama.

Shared by the in-process tests and by the multi-process runs, which start this file as a script:

    python tests/callback_toy.py --out DIR [--strategy ddp|fsdp2] [--devices 2] [--resume] ...

The script trains with `WiSEFTCallback` (one batch per epoch), checkpoints every 3 steps (epochs),
and writes into DIR: `merged/` (the callback's save_pretrained of the merged model),
`history.json` (the callback's history, rank 0), `final_rank{r}.safetensors` (each rank's weights
after the merge, full tensors), `premerge.safetensors` (rank 0's weights just before the merge)
and `snapshot_rank{r}.safetensors` (each rank's snapshot, local shards under FSDP2). With
`--lora` the model is a PEFT LoRA model (`merged/` then holds the interpolated adapter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from wise_callback.demo.model import char_tokenizer, tiny_llama

TRAIN_PAIRS = [(a, b) for a in range(10) for b in range(10) if (a + b) % 3 != 0]
EVAL_PAIRS = [(a, b) for a in range(10) for b in range(10) if (a + b) % 3 == 0]


def toy_problems(count: int = 6) -> list[dict[str, str]]:
    return [{"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)} for a, b in EVAL_PAIRS[:count]]


def toy_callback(num_problems: int = 6, save_merged_to: Path | None = None):
    """The callback of the multi-process runs (tests rebuild it to evaluate single-process)."""
    from wise_callback import WiSEFTCallback
    from wise_callback.grading import exact_match

    return WiSEFTCallback(
        problems=toy_problems(num_problems),
        tokenizer=char_tokenizer(),
        grader=exact_match,
        snapshot_at=4,
        eval_every_n_steps=5,
        num_samples=4,
        alphas=(0.5,),
        final_alpha="best",
        max_new_tokens=3,
        problems_per_call=2,  # 3 blocks: 2 on rank 0, 1 on rank 1 (FSDP2 pads with an empty call)
        save_merged_to=save_merged_to,
        progress=False,
    )


def toy_batches(tokenizer, batch_size: int | None = 8) -> DataLoader:
    """Every training pair as "a+b=c</s>" (all 6 tokens long, so no padding), in a fixed order;
    `batch_size=None`: all of them in one batch (one step per epoch)."""
    rows = [
        tokenizer(f"{a}+{b}={(a + b) % 10}")["input_ids"] + [tokenizer.eos_token_id]
        for a, b in TRAIN_PAIRS
    ]
    data = torch.tensor(rows)
    return DataLoader(data, batch_size=batch_size or len(data), shuffle=False)


class ToyModule(pl.LightningModule):
    """Causal-LM SFT of a tiny Llama at `pl_module.model` (where the callback looks by default)."""

    def __init__(
        self,
        lr: float = 3e-3,
        seed: int = 0,
        fsdp2: bool = False,
        batch_size: int | None = 8,
        lora: bool = False,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.batch_size = batch_size
        self.fsdp2 = fsdp2
        self.tokenizer = char_tokenizer()
        if lora:  # a PEFT LoRA adapter on attention and MLP, lm_head fully trained
            from lora_helpers import lora_model

            self.model = lora_model(self.tokenizer)
        else:
            self.model = tiny_llama(len(self.tokenizer), seed=seed, tokenizer=self.tokenizer)

    def configure_model(self) -> None:
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        get_base_model = getattr(self.model, "get_base_model", None)  # a PeftModel
        causal_lm = get_base_model() if callable(get_base_model) else self.model
        for layer in causal_lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return toy_batches(self.tokenizer, self.batch_size)


class ToyData(pl.LightningDataModule):
    """The same batches as a datamodule (for LightningCLI)."""

    def train_dataloader(self) -> DataLoader:
        return toy_batches(char_tokenizer())


def full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating tensor of the model, gathered to full size when sharded, on CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if tensor.is_floating_point():
            out[name] = tensor.detach().cpu().clone().contiguous()
    return out


class PremergeRecorder(Callback):
    """Placed before WiSEFTCallback: keeps rank 0's weights as they are before the merge."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tensors = full_tensors(pl_module.model)
        if trainer.is_global_zero:
            save_file(tensors, str(self.out / "premerge.safetensors"))


class Announcer(Callback):
    """Prints the step after every optimizer step, so that a parent process can kill us mid-run."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            print(f"STEP {trainer.global_step}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], default="single")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--resume", action="store_true", help="fit from DIR/ckpt/last.ckpt")
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--lora", action="store_true", help="train a PEFT LoRA adapter")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    # one batch per epoch: a resumed run meets the same batches whatever Lightning does with a
    # partly consumed epoch, so what is tested is the callback's own resume
    module = ToyModule(fsdp2=args.strategy == "fsdp2", batch_size=None, lora=args.lora)
    callback = toy_callback(args.problems, save_merged_to=args.out / "merged")
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: object = ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1
        )
    elif args.strategy == "ddp":
        strategy = "ddp"
    else:
        strategy = "auto"
    checkpoints = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, every_n_epochs=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        callbacks=[Announcer(), PremergeRecorder(args.out), callback, checkpoints],
        default_root_dir=args.out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = args.out / "ckpt" / "last.ckpt" if args.resume else None
    trainer.fit(module, ckpt_path=ckpt)
    rank = trainer.global_rank
    save_file(full_tensors(module.model), str(args.out / f"final_rank{rank}.safetensors"))
    assert callback.snapshot is not None
    save_file(
        {n: t.contiguous() for n, t in callback.snapshot.tensors.items()},
        str(args.out / f"snapshot_rank{rank}.safetensors"),
    )
    if trainer.is_global_zero:
        summary = {"history": callback.history, "chosen_alpha": callback.chosen_alpha}
        (args.out / "history.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
