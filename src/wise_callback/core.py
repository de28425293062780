"""The trainer-free core of a WiSE-FT run: its settings, state and every decision.

A trainer adapter (`WiSEFTCallback` for Lightning, `WiSEFTTrainerCallback` for transformers'
Trainer) subclasses `WiSEFTCore` and drives it with four events, in its own hooks:

* `prepare(tokenizer)` once the trainer is set up (the tokenizer found on the trainer's side
  when none was given), then `begin(context)` when training starts (`RunContext`: the model, the
  planned steps, rank / world size, the folders);
* `step_ended(step)` after every optimizer step: snapshot when due (evaluated once as alpha 0),
  or evaluate every `eval_every_n_steps` (the current weights; the alpha grid when due);
* `training_ended(step)`: evaluate the final weights and grid if stale, choose, merge, save;
* `state_dict()` / `load_state_dict()` for the trainer's checkpoints.

The adapter gives back what is its own by overriding `_emit_metrics`, `_emit_samples`, `_info`,
`_stop_training` and `_call_on_collapse`. No trainer framework is imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wise_callback.arguments import resolve_tokenizer, settle_arguments
from wise_callback.collapse import WATCH_KEYS, CollapseWatch
from wise_callback.comparisons import (
    add_gains,
    choose_final,
    grid_state,
    per_problem_values,
)
from wise_callback.early import EarlySchedule
from wise_callback.evaluate import CURRENT, EvalConfig, Evaluation
from wise_callback.grading import Grader, check_timeouts, exact_match
from wise_callback.halving import evaluate_halving, first_round_samples, sampled_current
from wise_callback.options import (
    CollapseOptions,
    EvalOptions,
    SampleLogging,
    SamplingOptions,
    SnapshotOptions,
)
from wise_callback.outputs import logged_scalars
from wise_callback.problems import format_prompts
from wise_callback.reporting import RunContext, RunReporting
from wise_callback.sampling import Sampler
from wise_callback.sampling.factory import make_sampler
from wise_callback.schedule import grid_due, reads_grid
from wise_callback.sharding import is_sharded
from wise_callback.snapshot_files import SnapshotFiles
from wise_callback.weights import Snapshot, interpolate_

EARLY = 0.0
"""The snapshot's own evaluation is recorded as alpha = 0 (all weight on the early checkpoint)."""

log = logging.getLogger("wise_callback")


class WiSEFTCore(RunReporting):
    """Snapshot an early checkpoint, evaluate WiSE-FT interpolants, watch collapse, merge.

    The arguments are those of `WiSEFTCallback` (see its docstring; shared by both adapters,
    checked by `settle_arguments`). After training: `history` (one
    record per evaluation and alpha), `chosen_alpha`, `snapshot`, `collapse_detected`,
    `last_evaluation`, `sample_table`.
    """

    # set from the arguments by `settle_arguments`
    problems: list[dict[str, Any]]
    tokenizer: Any
    grader: Grader | str
    snapshot_at: int | float | str
    eval_every_n_steps: int | None
    config: EvalConfig
    alphas: tuple[float, ...]
    final_alpha: float | str | None
    select_metric: str
    sampler: str | Sampler
    save_merged_to: Path | None
    model_attr: str | Callable[[Any], torch.nn.Module] | None
    examples: list[int]
    sampling: SamplingOptions
    snapshotting: SnapshotOptions
    collapse: CollapseOptions
    sample_logging: SampleLogging
    evaluation: EvalOptions

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
        self.spent = {"evaluations": 0, "generated_tokens": 0.0, "sample_s": 0.0}
        """What the evaluations cost so far (sampling wall time is this process's)."""
        # per-problem values (grid_state) of every grid evaluation, by step: the merge may be of
        # an earlier step's weights (transformers' load_best_model_at_end)
        self._grids: dict[int, dict[float, dict[str, list[float]]]] = {}
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
        """Evaluate now: the current weights, and the alpha grid when due (also what an adapter
        calls when it follows its trainer's own evaluation schedule); while a "peak" search is
        open, the current weights only, keeping a new best as the snapshot."""
        if self._early.searching(step):
            if step != self._last_eval_step:
                self._search_peak(step)
        elif (
            self.snapshot is not None
            and not (self._early.peak and self._early.open)
            and step not in (self.snapshot.step, self._last_eval_step)
        ):
            final = step >= self._require_context().planned_steps
            self._run_evaluation(step, self._alphas_due(final), final)

    def _alphas_due(self, final: bool) -> tuple[float, ...]:
        """The current weights, and the alpha grid when due (`schedule.grid_due`)."""
        context = self._require_context()
        after = self._early.step or 0
        number = 1 + sum(r["alpha"] == CURRENT and r["step"] > after for r in self.history)
        due = grid_due(
            self.evaluation,
            evaluation_number=number,
            final=final,
            last_z=next((r.get("collapse_z") for r in reversed(self.history)), None),
            selects_by=context.selects_by,
        )
        return (CURRENT, *self.alphas) if due else (CURRENT,)

    def training_ended(self, step: int) -> None:
        """Evaluate the final weights if stale, choose the alpha, merge on every rank, save.
        `step`: the step of the weights in the model: the last, or an earlier one the trainer
        put back (load_best_model_at_end), whose own evaluation then chooses the alpha."""
        if self._early.peak and self._early.open:
            self._close_peak_search(step)
        if self.snapshot is None:
            self._warn(
                f"training ended at step {step}, before the snapshot step "
                f"{self._early.step}; nothing to evaluate or merge"
            )
            return
        current_only = bool(self.alphas) and any(
            r["step"] == step and r["alpha"] == CURRENT for r in self.history
        )
        stale = self._last_eval_step != step or current_only  # or the grid was not due
        if stale and step not in self._grids:
            self._run_evaluation(step, (CURRENT, *self.alphas), final=True)
        if self.final_alpha is None:
            return
        alpha = self._choose_alpha(step)
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

    # ------------------------------------------------------------------ decisions

    @property
    def collapse_detected(self) -> bool:
        """Whether the collapse early warning has fired in this run (it fires at most once)."""
        return self._watch.fired

    @property
    def collapse_step(self) -> int | None:
        """The step at which the collapse early warning fired (None: it has not)."""
        return self._watch.fired_step

    def _search_peak(self, step: int) -> None:
        """ "peak": evaluate the current weights; a new best select_metric becomes the
        snapshot."""
        self._run_evaluation(step, (CURRENT,))
        record = self.history[-1] if self.history else {}
        evaluated = record.get("step") == step and record.get("alpha") == CURRENT
        if evaluated and self._early.improves(float(record[self.select_metric])):
            self._take_snapshot(step)
            self._watch.early_pass1 = list(self._watch.last_pass1)

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

    def _choose_alpha(self, step: int) -> float | None:
        """The alpha to merge with, from the grid of `step` if evaluated, else the latest grid
        (None: nothing to choose from); sets `final_report`."""
        grid_step = step if step in self._grids else max(self._grids, default=None)
        grid = None if grid_step is None else {"step": grid_step, "values": self._grids[grid_step]}
        alpha, self.final_report = choose_final(
            self.final_alpha,
            grid,
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

    def _run_evaluation(self, step: int, alphas: Sequence[float], final: bool = False) -> None:
        """One evaluation (the final choice's grid by successive halving where it applies); on
        failure the weights are already restored: warn and go on."""
        context = self._require_context()
        assert self._sampler is not None
        self._last_eval_step = step
        first = first_round_samples(
            self.config, self.evaluation.halving, self.select_metric, self.final_alpha
        )
        halving = final and len(alphas) > 1 and not reads_grid(context.selects_by)
        try:
            result = evaluate_halving(
                context.model,
                self.snapshot,
                self._eval_problems,
                self._sampler,
                self.grader,
                self.config,
                alphas=alphas,
                first=first if halving else None,
                select_metric=self.select_metric,
                keep_pass1=self.evaluation.keep_pass1,
                current=sampled_current(self.last_evaluation, step),
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
        seen = {r["alpha"]: r for r in self.history if r["step"] == result.step}
        again = bool(seen)  # adding the grid at the end to a step the watch has already seen
        self.history = [r for r in self.history if r["step"] != result.step]
        records = result.records()
        full = [r for r in result.results if r.alpha not in result.first_round_only]
        values = per_problem_values(full, self.select_metric, self.config.max_k)
        add_gains(records, values)
        current = next(r for r in records if r["alpha"] in (CURRENT, EARLY))
        baseline = result.step == 0 or again  # step 0, or a step the watch has already seen
        pass1 = values[current["alpha"]]["pass1"]
        if again:  # the same samples again (same seed): keep what the watch said of them
            current.update(
                {k: v for k, v in seen.get(current["alpha"], {}).items() if k in WATCH_KEYS}
            )
        elif not baseline:
            current.update(self._watch.compare(values[current["alpha"]]["passk"]))
            if current["alpha"] == CURRENT:
                current["collapse_risk"] = self._watch.risk(pass1)
        if current["alpha"] == EARLY:
            self._watch.early_pass1 = [float(v) for v in pass1]
        self._watch.last_pass1 = [float(v) for v in pass1]
        if CURRENT in values and len(result.results) > 1:  # the candidates, maybe 1.0 alone
            self._grids[result.step] = grid_state(values)
        self.history.extend(records)
        self.spent["evaluations"] += 1
        self.spent["generated_tokens"] += result.generated_tokens()
        self.spent["sample_s"] += result.timings["sample_s"]
        metrics = logged_scalars(records, result.timings, self.select_metric)
        late = check_timeouts(
            sum(r["timed_out"] for r in records), sum(r["num_samples"] for r in records)
        )
        if late is not None:
            self._warn(f"step {result.step}: {late}")
        watched = values[current["alpha"]]
        fired = self._watch.fired if baseline else self._watch_collapse(current, watched)
        metrics["wiseft/collapse"] = float(fired)
        self._warn_of_risk(current)
        self._emit_metrics(metrics, result.step)
        self._publish_samples(result)
        self._write_files()

    def _warn_of_risk(self, record: dict[str, Any]) -> None:
        """With collapse.risk_warning: warn once when collapse_risk reaches the z threshold."""
        risk = record.get("collapse_risk")
        if not self.collapse.risk_warning or self._watch.risk_fired or risk is None:
            return
        if risk >= self.collapse.z_threshold:
            self._watch.risk_fired = True
            self._warn(
                f"collapse likely: at step {record['step']} the share of problems every sample "
                f"solves (rho = 1) is {record['frac_rho1']:.3f}, up from the early checkpoint by "
                f"{risk:.1f} paired standard errors"
            )

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

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (the snapshot itself is a file of its own)."""
        return {
            "history": [dict(r) for r in self.history],
            "collapse": self._watch.state_dict(),
            "last_eval_step": self._last_eval_step,
            "sample_table": [dict(r) for r in self.sample_table],
            # JSON-safe (a Trainer's trainer_state.json would turn float keys into strings)
            "grids": [[step, list(grid.items())] for step, grid in self._grids.items()],
            "early": self._early.state_dict(),
            "spent": dict(self.spent),
            **self._files.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict["history"]]
        self._watch.load_state_dict(state_dict["collapse"])
        self._last_eval_step = state_dict["last_eval_step"]
        self.sample_table = [dict(r) for r in state_dict.get("sample_table", [])]
        self._grids = {step: dict(grid) for step, grid in state_dict.get("grids", [])}
        self.spent = dict(state_dict.get("spent", self.spent))
        if "early" in state_dict:
            self._early.load_state_dict(state_dict["early"])
        self._files.load_state_dict(state_dict)
        self.snapshot = None  # reloaded from its file in begin()
