"""The trainer-free core of a WiSE-FT run: its settings, state and every decision.

A trainer adapter (`WiSEFTCallback` for Lightning, `WiSEFTTrainerCallback` for transformers'
Trainer) subclasses `WiSEFTCore` and drives it with four events, in its own hooks:

* `prepare(tokenizer)` once the trainer is set up (the tokenizer found on the trainer's side
  when none was given), then `begin(context)` when training starts (`RunContext`: the model, the
  planned steps, rank / world size, the folders);
* `step_ended(step)` after every optimizer step: snapshot when due (evaluated once as alpha 0),
  or evaluate the current weights and the alpha grid every `eval_every_n_steps`;
* `training_ended(step)`: evaluate the final weights if stale, choose the alpha, merge in place
  on every rank, save;
* `state_dict()` / `load_state_dict()` for the trainer's checkpoints.

The adapter gives back what is its own by overriding `_emit_metrics`, `_emit_samples`, `_info`,
`_stop_training` and `_call_on_collapse`. No trainer framework is imported here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wise_callback.arguments import resolve_tokenizer, settle_arguments
from wise_callback.collapse import CollapseWatch
from wise_callback.comparisons import (
    add_gains,
    choose_final,
    grid_state,
    per_problem_values,
)
from wise_callback.early import EarlySchedule
from wise_callback.evaluate import CURRENT, Evaluation, evaluate
from wise_callback.generations import format_samples, sample_rows, write_generations, write_jsonl
from wise_callback.grading import Grader, check_timeouts, exact_match
from wise_callback.options import (
    CollapseOptions,
    EvalOptions,
    SampleLogging,
    SamplingOptions,
    SnapshotOptions,
)
from wise_callback.outputs import logged_scalars, save_merged, write_history
from wise_callback.problems import format_prompts
from wise_callback.sampling import Sampler
from wise_callback.sampling.factory import make_sampler
from wise_callback.sharding import full_state_dict, is_sharded
from wise_callback.snapshot_files import SnapshotFiles
from wise_callback.weights import Snapshot, interpolate_

EARLY = 0.0
"""The snapshot's own evaluation is recorded as alpha = 0 (all weight on the early checkpoint)."""

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


class WiSEFTCore:
    """Snapshot an early checkpoint, evaluate WiSE-FT interpolants, watch collapse, merge.

    The arguments are those of `WiSEFTCallback` (see its docstring; shared by both adapters,
    checked by `settle_arguments`). After training: `history` (one
    record per evaluation and alpha), `chosen_alpha`, `snapshot`, `collapse_detected`,
    `last_evaluation`, `sample_table`.
    """

    def __init__(
        self,
        problems: Any,
        tokenizer: Any = None,
        grader: Grader | str = exact_match,
        snapshot_at: int | float | str = 0.1,
        eval_every_n_steps: int | None = 100,
        num_samples: int = 16,
        ks: Sequence[int] | None = None,
        alphas: Sequence[float] = (0.25, 0.5, 0.75),
        final_alpha: float | str | None = "best",
        select_metric: str | None = None,
        sampler: str | Sampler = "hf",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        save_merged_to: str | Path | None = None,
        *,
        sampling: SamplingOptions | None = None,
        snapshotting: SnapshotOptions | None = None,
        collapse: CollapseOptions | None = None,
        sample_logging: SampleLogging | None = None,
        evaluation: EvalOptions | None = None,
        model_attr: str | Callable[[Any], torch.nn.Module] | None = None,
        **legacy: Any,
    ) -> None:
        vars(self).update(settle_arguments({k: v for k, v in locals().items() if k != "self"}))
        self.history: list[dict[str, Any]] = []
        self.sample_table: list[dict[str, Any]] = []
        self.chosen_alpha: float | None = None
        self.last_evaluation: Evaluation | None = None
        self.snapshot: Snapshot | None = None
        self._files = SnapshotFiles()
        self._watch = CollapseWatch(
            self.collapse.min_drop,
            self.collapse.patience,
            f"pass@{self.config.max_k}",
            self.collapse.z_threshold,
        )
        self.final_report: dict[str, Any] | None = None
        self._last_grid: dict[str, Any] | None = None  # per-problem values of the latest grid
        self._last_eval_step: int | None = None
        self._early = EarlySchedule(self.snapshot_at, self.snapshotting.peak_until)
        self._eval_problems = self.problems
        self._context: RunContext | None = None
        self._sampler: Sampler | None = None

    # ------------------------------------------------------------------ events

    def prepare(self, tokenizer: Any, where: str) -> None:
        """Settle the tokenizer (the given one, else the trainer's `tokenizer`, found at
        `where`) and format the prompts with it."""
        self.tokenizer = resolve_tokenizer(self.tokenizer, tokenizer, where)
        self._eval_problems = format_prompts(
            self.problems, self.tokenizer, self.sampling.apply_chat_template
        )

    def begin(self, context: RunContext) -> None:
        """Build the sampler, resolve snapshot_at, reload a resumed snapshot, write the files
        of a resumed state, evaluate at step 0 if asked."""
        self._context = context
        if self.save_merged_to is not None and not hasattr(context.model, "save_pretrained"):
            raise TypeError(
                f"save_merged_to needs a model with save_pretrained; "
                f"{type(context.model).__name__} has none"
            )
        self._sampler = make_sampler(
            self.sampler, context.model, self.tokenizer, self.sampling.sampler_kwargs
        )
        self._early.resolve(context.planned_steps, self._files.name is not None)
        if self._files.name is not None and self.snapshot is None:
            self.snapshot = self._files.load(context, self.snapshotting.device)
        self._write_files()
        if self.evaluation.eval_at_start and self._last_eval_step is None:
            self._run_evaluation(0, (CURRENT,))  # the step-0 baseline

    def step_ended(self, step: int) -> None:
        """After an optimizer step: snapshot, or evaluate when due (once per step)."""
        if step == self._last_eval_step:
            return
        if self._early.fixed_snapshot_due(step, self.snapshot is not None):
            self._take_snapshot(step)
            self._run_evaluation(step, (EARLY,))
        elif self.eval_every_n_steps is not None and step % self.eval_every_n_steps == 0:
            self.evaluate_grid(step)
        if self._early.peak and self._early.open and step >= (self._early.step or 0):
            self._close_peak_search(step)

    def evaluate_grid(self, step: int) -> None:
        """Evaluate the current weights and the alpha grid now (also what an adapter calls when
        it follows its trainer's own evaluation schedule); while a "peak" search is open, the
        current weights only, keeping a new best as the snapshot."""
        if self._early.searching(step):
            if step != self._last_eval_step:
                self._search_peak(step)
        elif (
            self.snapshot is not None
            and not (self._early.peak and self._early.open)
            and step not in (self.snapshot.step, self._last_eval_step)
        ):
            self._run_evaluation(step, (CURRENT, *self.alphas))

    def training_ended(self, step: int) -> None:
        """Evaluate the final weights if stale, choose the alpha, merge on every rank, save."""
        if self._early.peak and self._early.open:
            self._close_peak_search(step)
        if self.snapshot is None:
            self._warn(
                f"training ended at step {step}, before the snapshot step "
                f"{self._early.step}; nothing to evaluate or merge"
            )
            return
        if self._last_eval_step != step:
            self._run_evaluation(step, (CURRENT, *self.alphas))
        if self.final_alpha is None:
            return
        alpha = self._choose_alpha()
        if alpha is None:
            self._warn("no evaluation to choose an alpha from; no merge")
            return
        context = self._require_context()
        interpolate_(context.model, self.snapshot, alpha)
        self.chosen_alpha = alpha
        report = self.final_report or {}
        scalars = {
            f"wiseft/final/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))
        }
        self._emit_metrics({"wiseft/final_alpha": alpha, **scalars}, step)
        self._info(
            f"merged with alpha={alpha:.2f} (final_alpha={self.final_alpha!r}, "
            f"select_metric={self.select_metric})"
        )
        if self.save_merged_to is not None:
            self._save_merged(step)

    # ------------------------------------------------------------------ what adapters override

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

    # ------------------------------------------------------------------ decisions

    @property
    def collapse_detected(self) -> bool:
        """Whether the collapse early warning has fired in this run (it fires at most once)."""
        return self._watch.fired

    @property
    def _is_global_zero(self) -> bool:
        return self._context is None or self._context.rank == 0

    def _require_context(self) -> RunContext:
        if self._context is None:
            raise RuntimeError(f"{type(self).__name__}: begin() was not called")
        return self._context

    def _search_peak(self, step: int) -> None:
        """ "peak": evaluate the current weights; a new best select_metric becomes the
        snapshot."""
        self._run_evaluation(step, (CURRENT,))
        record = self.history[-1] if self.history else {}
        evaluated = record.get("step") == step and record.get("alpha") == CURRENT
        if evaluated and self._early.improves(float(record[self.select_metric])):
            self._take_snapshot(step)

    def _close_peak_search(self, step: int) -> None:
        """ "peak": fix the early checkpoint at the cut-off (the weights now if no evaluation
        ran before it)."""
        self._early.open = False
        if self.snapshot is None:
            self._take_snapshot(step)
            self._run_evaluation(step, (EARLY,))
        assert self.snapshot is not None
        self._info(
            f"early checkpoint fixed at step {step}: the weights of step {self.snapshot.step} "
            f"({self.select_metric} {self._early.best})"
        )

    def _choose_alpha(self) -> float | None:
        """The alpha to merge with (None: nothing to choose from); sets `final_report`."""
        alpha, self.final_report = choose_final(
            self.final_alpha,
            self._last_grid,
            self.history,
            self.select_metric,
            self.evaluation.keep_pass1,
            self.sampling.seed,
        )
        return alpha

    def _take_snapshot(self, step: int) -> None:
        context = self._require_context()
        self.snapshot = Snapshot.capture(
            context.model,
            device=self.snapshotting.device,
            dtype=self.snapshotting.torch_dtype(),
            step=step,
        )
        path = self._files.save(self.snapshot, context, is_sharded(context.model))
        self._info(
            f"snapshot at step {step} ({self.snapshot.nbytes / 2**20:.1f} MiB per rank) written "
            f"to {path}"
        )

    # ------------------------------------------------------------------ evaluation

    def _run_evaluation(self, step: int, alphas: Sequence[float]) -> None:
        """One evaluation; on failure the weights are already restored: warn and go on."""
        context = self._require_context()
        assert self._sampler is not None
        self._last_eval_step = step
        try:
            result = evaluate(
                context.model,
                self.snapshot,
                self._eval_problems,
                self._sampler,
                self.grader,
                self.config,
                alphas=alphas,
                step=step,
                rank=context.rank,
                world_size=context.world_size,
                progress=self.sample_logging.progress and self._is_global_zero,
            )
        except Exception as err:
            if self.evaluation.fail_on_eval_error:
                raise
            self._warn(
                f"evaluation at step {step} failed with {type(err).__name__}: {err}. The weights "
                "were restored; training goes on (fail_on_eval_error=True raises instead)."
            )
            return
        self.last_evaluation = result
        self._record(result)

    def _record(self, result: Evaluation) -> None:
        """An evaluation's records into `history` and history.jsonl, its scalars (and the
        collapse flag) to the loggers. The one place that turns results into outputs."""
        assert result.step is not None
        records = result.records()
        values = per_problem_values(result.results, self.select_metric, self.config.max_k)
        add_gains(records, values)
        current = next(r for r in records if r["alpha"] in (CURRENT, EARLY))
        baseline = result.step == 0  # before any training: not part of the collapse watch
        if not baseline:
            current.update(self._watch.compare(values[current["alpha"]]["passk"]))
        if CURRENT in values and len(values) > 1:
            self._last_grid = {"step": result.step, "values": grid_state(values)}
        self.history.extend(records)
        metrics = logged_scalars(records, result.timings, self.select_metric)
        late = check_timeouts(
            sum(r["timed_out"] for r in records), sum(r["num_samples"] for r in records)
        )
        if late is not None:
            self._warn(f"step {result.step}: {late}")
        collapsed = not baseline and self._watch_collapse(current, values[current["alpha"]])
        metrics["wiseft/collapse"] = float(collapsed)
        self._emit_metrics(metrics, result.step)
        self._publish_samples(result)
        self._write_files()

    def _watch_collapse(self, record: dict[str, Any], values: dict[str, np.ndarray]) -> bool:
        """Feed the collapse watch; act the one time it fires."""
        info = self._watch.update(record, values["passk"])
        if info is not None:
            self._warn(CollapseWatch.message(info))
            if self.collapse.on_collapse == "stop":
                self._stop_training()
            elif callable(self.collapse.on_collapse):
                self._call_on_collapse(self.collapse.on_collapse, info)
        return self._watch.fired

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

    # ------------------------------------------------------------------ files

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
        state_dict = full_state_dict(context.model) if is_sharded(context.model) else None
        if not self._is_global_zero:
            return
        info = {
            "alpha": self.chosen_alpha,
            "final_alpha": self.final_alpha,
            "select_metric": self.select_metric,
            "snapshot_step": self.snapshot.step,
            "step": step,
        }
        save_merged(context.model, self.tokenizer, self.save_merged_to, info, state_dict)
        self._info(f"merged model saved to {self.save_merged_to}")

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (the snapshot itself is a file of its own)."""
        return {
            "history": [dict(r) for r in self.history],
            "collapse": self._watch.state_dict(),
            "last_eval_step": self._last_eval_step,
            "sample_table": [dict(r) for r in self.sample_table],
            "last_grid": self._last_grid,
            "early": self._early.state_dict(),
            **self._files.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict["history"]]
        self._watch.load_state_dict(state_dict["collapse"])
        self._last_eval_step = state_dict["last_eval_step"]
        self.sample_table = [dict(r) for r in state_dict.get("sample_table", [])]
        self._last_grid = state_dict.get("last_grid")
        if "early" in state_dict:
            self._early.load_state_dict(state_dict["early"])
        self._files.load_state_dict(state_dict)
        self.snapshot = None  # reloaded from its file in begin()
