"""WiSEFTCallback: the Lightning front door of `WiSEFTCore`.

Only what is Lightning's lives here: the hooks, finding the model and tokenizer on the
LightningModule, logging through the trainer's loggers (and `callback_metrics`, so
`ModelCheckpoint` / `EarlyStopping` can monitor `wiseft/...`), the trainer's folders and ranks.
Every decision is the core's.

Checkpoints: the trainer's checkpoints hold the *unmerged* training weights (written during
training, before the merge at the end of fit) plus this callback's state (history, collapse
watch, the snapshot file's name). The snapshot is NOT inside the checkpoint: it is written once,
when taken, beside the checkpoints (`snapshotting.dir`, default the `ModelCheckpoint` folder);
copy it along when you move checkpoints. After `fit`, the module in memory holds the merged
weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from wise_callback.arguments import resolve_model
from wise_callback.core import RunContext, WiSEFTCore
from wise_callback.generations import log_sample_table


class WiSEFTCallback(WiSEFTCore, Callback):
    """Snapshot an early checkpoint, log Pass@k collapse for WiSE-FT interpolants, merge at the end.

    Args:
        problems: validation problems: dicts with "prompt" and "answer" (other fields are kept),
            a `datasets.Dataset`, a JSONL path, or `{source: any of these}` for several sets
            (see `wise_callback.problems.load_problems`).
        tokenizer: the model's tokenizer, or a path to load one from; None takes
            `pl_module.tokenizer`.
        grader: `(completion, reference) -> Verdict`, e.g. `exact_match`, `math_verify_match`, or
            its import path ("wise_callback.grading.math_verify_match", handy in YAML).
        snapshot_at: the optimizer step at which to snapshot (int >= 1), or a fraction in (0, 1) of
            the planned steps (`trainer.estimated_stepping_batches`).
        eval_every_n_steps: evaluate at every multiple of this step after the snapshot; None:
            at the end of every validation run of the trainer instead.
        num_samples: completions per problem (n).
        ks: the k of Pass@k / Maj@k; default: 1, 2, 4, ... up to num_samples, and num_samples.
        alphas: WiSE-FT weights on the latest weights to evaluate next to the current ones (1.0):
            the grid of the final choice (when else: `EvalOptions.grid_every`).
        final_alpha: merge at the end with this alpha, "best" (the alpha of the final evaluation
            with the highest `select_metric`, ties toward the larger alpha), or None (no merge).
        select_metric: the metric "best" maximises; default pass@{largest k}.
        sampler: "hf" (`HFSampler`, generates with the training model), "vllm" (`VLLMSampler`,
            in-process engine), or a `Sampler` instance.
        max_new_tokens, temperature: sampling settings for evaluation.
        save_merged_to: after the merge, `save_pretrained` the model and tokenizer there (rank
            zero writes, atomically). A new or empty folder, or an earlier merged output of
            ours (it holds wiseft_merge.json), which is then replaced; any other existing path
            is refused before training starts: we never delete what we did not write.
        sampling: `SamplingOptions` (top_p, top_k, stop, seed, problems_per_call,
            sampler_kwargs, apply_chat_template).
        snapshotting: `SnapshotOptions` (device, dtype, dir).
        collapse: `CollapseOptions` (min_drop, patience, on_collapse: "warn", "stop" or a
            callable `(trainer, pl_module, info) -> None`).
        sample_logging: `SampleLogging` (num_examples_to_log, print_samples, save_generations,
            progress).
        evaluation: `EvalOptions` (grade_timeout_s, grade_workers, max_problems, eval_at_start,
            time_budget_s, fail_on_eval_error).
        model_attr: where the Hugging Face model is: an attribute path of the LightningModule
            (default "model"; "backbone.lm"), or a callable `pl_module -> nn.Module`.

    The option groups also take dicts (`sampling={"top_p": 0.95}`); the flat names of earlier
    versions (`top_p=`, `progress=`, ...) still work, with a FutureWarning.
    """

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer = trainer
            self.prepare(getattr(pl_module, "tokenizer", None), "pl_module.tokenizer")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._pl_module = pl_module
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        checkpoint_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        snapshot_dir = self.snapshotting.dir or checkpoint_dir or trainer.default_root_dir
        self.begin(
            RunContext(
                model=self._resolve_model(pl_module),
                planned_steps=trainer.estimated_stepping_batches,
                log_dir=log_dir,
                snapshot_dir=Path(snapshot_dir),
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                resume_dir=Path(trainer.ckpt_path).parent if trainer.ckpt_path else None,
                selects_by=_monitored(trainer),
            )
        )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After an optimizer step (this runs for every micro-batch; the core acts once)."""
        self.step_ended(trainer.global_step)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With eval_every_n_steps=None, evaluate the grid after each validation run."""
        if self.eval_every_n_steps is None and not trainer.sanity_checking and self._context:
            self.evaluate_grid(trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training_ended(trainer.global_step)

    # ------------------------------------------------------------------ Lightning's side

    def _resolve_model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The Hugging Face model inside the LightningModule (model_attr, default "model")."""
        attr = self.model_attr if self.model_attr is not None else "model"
        return resolve_model(pl_module, attr, "pl_module")

    @override
    def _emit_metrics(self, metrics: dict[str, float], step: int) -> None:
        """To every Lightning logger (rank zero), and into `trainer.callback_metrics` (every
        rank, so `ModelCheckpoint(monitor=...)` and `EarlyStopping` can use them)."""
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    @override
    def _emit_samples(
        self, table: list[dict[str, Any]], rows: list[dict[str, Any]], step: int
    ) -> None:
        log_sample_table(self._trainer.loggers, table, rows, step)

    @override
    def _stop_training(self) -> None:
        self._trainer.should_stop = True

    @override
    def _call_on_collapse(self, callback: Callable[..., Any], info: dict[str, Any]) -> None:
        callback(self._trainer, self._pl_module, info)

    @override
    def _info(self, message: str) -> None:
        rank_zero_info(f"{type(self).__name__}: {message}")

    @override
    def _warn(self, message: str) -> None:
        rank_zero_warn(f"{type(self).__name__}: {message}")


def _monitored(trainer: pl.Trainer) -> tuple[str, ...]:
    """The metrics the trainer's checkpoint and early-stopping callbacks select by."""
    watchers = [*trainer.checkpoint_callbacks, *trainer.early_stopping_callbacks]
    monitors = (getattr(watcher, "monitor", None) for watcher in watchers)
    return tuple(str(monitor) for monitor in monitors if monitor)
