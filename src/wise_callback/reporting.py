"""The reporting side of a WiSE-FT run: what the trainer adapters override to reach their
loggers and console, and the files a run writes (history.jsonl, samples.jsonl, generation dumps,
the merged model). `WiSEFTCore` inherits it; it reads the core's state and decides nothing."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wise_callback.generations import format_samples, sample_rows, write_generations, write_jsonl
from wise_callback.outputs import save_merged, what_to_save, write_history
from wise_callback.results import Evaluation

log = logging.getLogger("wise_callback")


@dataclass
class RunContext:
    """What the trainer tells the core when training starts."""

    model: torch.nn.Module
    planned_steps: float  # math.inf when unknown
    log_dir: Path  # history.jsonl, samples.jsonl, generations/
    snapshot_dir: Path  # where the snapshot file is written
    rank: int = 0
    world_size: int = 1
    resume_dir: Path | None = None  # the folder of the checkpoint resumed from
    selects_by: tuple[str, ...] = ()  # metrics the trainer selects checkpoints by


class RunReporting:
    """Outputs of a run. Adapters override the first six methods; the rest write files."""

    _context: RunContext | None
    history: list[dict[str, Any]]
    sample_table: list[dict[str, Any]]
    problems: list[dict[str, Any]]
    examples: list[int]
    config: Any
    sample_logging: Any
    snapshotting: Any
    snapshot: Any
    tokenizer: Any
    save_merged_to: Path | None
    chosen_alpha: float | None
    final_alpha: float | str | None
    select_metric: str

    def _emit_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Give scalars to the trainer's loggers (every rank calls it)."""

    def _emit_samples(
        self, table: list[dict[str, Any]], rows: list[dict[str, Any]], step: int
    ) -> None:
        """Give the sample table to the trainer's loggers (rank zero calls it)."""

    def _stop_training(self) -> None:
        """Ask the trainer to stop (on_collapse="stop")."""
        raise NotImplementedError(f"{type(self).__name__} cannot stop its trainer")

    def _call_on_collapse(self, callback: Callable[..., Any], info: dict[str, Any]) -> None:
        """Call the user's on_collapse callable with the adapter's own arguments."""
        callback(info)

    def _info(self, message: str) -> None:
        """A message for the console (rank zero)."""
        if self._is_global_zero:
            log.info(f"{type(self).__name__}: {message}")

    def _warn(self, message: str) -> None:
        """A warning (rank zero)."""
        if self._is_global_zero:
            warnings.warn(f"{type(self).__name__}: {message}", UserWarning, stacklevel=3)

    @property
    def _is_global_zero(self) -> bool:
        return self._context is None or self._context.rank == 0

    def _require_context(self) -> RunContext:
        if self._context is None:
            raise RuntimeError(f"{type(self).__name__}: begin() was not called")
        return self._context

    # ------------------------------------------------------------------ files

    def _publish_samples(self, result: Evaluation) -> None:
        """Extend the sample table (every rank: it is part of the state); rank zero gives it to
        the loggers and the console, writes the dump, says when the time budget cut it short."""
        step = result.step
        assert step is not None
        rows = sample_rows(result, self.problems, self.examples)
        self.sample_table = [r for r in self.sample_table if r["step"] != step] + rows
        if not self._is_global_zero:
            return
        covered = result.results[0].metrics["num_problems"]
        if covered < len(self.problems):
            self._info(
                f"evaluation.time_budget_s={self.config.time_budget_s} ran out at step {step}: "
                f"{covered} of {len(self.problems)} problems covered"
            )
        if self.examples:
            self._emit_samples(self.sample_table, rows, step)
        if self.sample_logging.print_samples:
            self._info(format_samples(rows[: self.sample_logging.print_samples]))
        folder = self.sample_logging.generations_folder(self._require_context().log_dir)
        if folder is not None:
            write_generations(result, self.problems, folder)

    @property
    def history_path(self) -> Path:
        """history.jsonl in the run's log folder."""
        return self._require_context().log_dir / "history.jsonl"

    def _write_files(self) -> None:
        """history.jsonl and samples.jsonl from the state (rank zero)."""
        if not self._is_global_zero:
            return
        write_history(self.history_path, self.history)
        if self.examples:
            write_jsonl(self.history_path.with_name("samples.jsonl"), self.sample_table)

    def _save_merged(self, step: int) -> None:
        """save_pretrained of the merged model + tokenizer into save_merged_to (rank zero
        writes; a sharded model's full state dict is a collective on every rank)."""
        context = self._require_context()
        assert self.save_merged_to is not None and self.snapshot is not None
        model, state_dict = what_to_save(context.model, self.snapshotting.dense_merge)
        if not self._is_global_zero:
            return
        info = {
            "alpha": self.chosen_alpha,
            "final_alpha": self.final_alpha,
            "select_metric": self.select_metric,
            "snapshot_step": self.snapshot.step,
            "step": step,
        }
        save_merged(model, self.tokenizer, self.save_merged_to, info, state_dict)
        self._info(f"merged model saved to {self.save_merged_to}")
