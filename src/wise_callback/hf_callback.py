"""WiSEFTTrainerCallback: the Hugging Face `Trainer` / TRL `SFTTrainer` front door of `WiSEFTCore`.

Only what is transformers' own lives here: the callback events, the model and tokenizer the
Trainer passes to them, logging through the Trainer's log, its evaluation metrics, its folders,
ranks and checkpoints. Every decision is the core's. Lightning is never imported.

Logging: a callback is not given its Trainer, so on `on_train_begin` it finds the Trainer whose
callback handler is calling it on the call stack (a Trainer always calls its callbacks itself).
Metrics then go through `transformers.Trainer.log` (the base method: a subclass's override, such
as TRL's, would fold its own pending training averages into our entry): they are appended to
`state.log_history` and every `report_to` integration receives them in `on_log`.

Checkpoints: the callback is an `ExportableState`; its state (history, collapse watch, the
snapshot file's name) is saved in each checkpoint's `trainer_state.json` under
`stateful_callbacks["WiSEFTTrainerCallback"]`, and read back from there when training resumes
(`state.global_step > 0` at `on_train_begin`). The snapshot is not in the checkpoints: it is
written once as safetensors beside them (`args.output_dir`, or `snapshotting.dir`). Keep
`restore_callback_states_from_checkpoint=False` (the default): with True the Trainer would rebuild
the callback from its saved arguments, which cannot hold problems or a grader.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from wise_callback.arguments import resolve_model
from wise_callback.core import RunContext, WiSEFTCore

EVAL_PREFIX = "eval_"
"""The Trainer looks up `metric_for_best_model` in the evaluation metrics with this prefix."""


class WiSEFTTrainerCallback(WiSEFTCore, TrainerCallback, ExportableState):
    """Snapshot an early checkpoint, log Pass@k collapse for WiSE-FT interpolants, merge at the end.

    The arguments are those of `WiSEFTCallback` (the Lightning door), with these differences:

    * tokenizer: None takes the Trainer's `processing_class`.
    * snapshot_at: a float is a fraction of `state.max_steps`.
    * eval_every_n_steps: evaluate at every multiple of this optimizer step; None: follow the
      Trainer's own evaluation schedule (`eval_strategy="steps"`): the grid is evaluated in
      `on_evaluate` and its metrics are added to the evaluation's metrics as `eval_wiseft/...`,
      so `metric_for_best_model="wiseft/best/pass@16"` (with `load_best_model_at_end=True`)
      works.
    * collapse.on_collapse: "stop" sets `control.should_training_stop`; a callable gets
      `(args, state, control, info)`.
    * model_attr: None (default) is the Trainer's model itself; an attribute path of it or a
      callable `model -> nn.Module` picks a submodule.

    history.jsonl (and samples.jsonl) go to `args.output_dir`. The final weights are evaluated at
    the last step (before the Trainer's last checkpoint and while its loggers are open), merged
    in `on_train_end` and, with `save_merged_to`, saved. With `load_best_model_at_end`, the
    weights the Trainer put back are merged with the best alpha of their own evaluation.
    """

    _in_training = False
    _latest_metrics: tuple[int | None, dict[str, float]] = (None, {})

    # ------------------------------------------------------------------ events

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_training_arguments(args)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        _check_training_arguments(args)
        self._event(args, state, control)
        self._trainer = _find_trainer(self)
        self.prepare(processing_class, "the Trainer's processing_class")
        if state.global_step > 0:
            self._restore(state)
        if self.eval_every_n_steps is None and args.eval_strategy == "no":
            self._warn(
                "eval_every_n_steps=None follows the Trainer's evaluations, but eval_strategy is "
                '"no": the grid is evaluated only at the end'
            )
        self._in_training = True
        self.begin(
            RunContext(
                model=resolve_model(model, self.model_attr, "the Trainer's model"),
                planned_steps=state.max_steps if state.max_steps > 0 else math.inf,
                log_dir=Path(args.output_dir),
                snapshot_dir=Path(self.snapshotting.dir or args.output_dir),
                rank=args.process_index,
                world_size=args.world_size,
                resume_dir=Path(args.output_dir),  # where the Trainer's checkpoints are
                selects_by=(
                    (args.metric_for_best_model,)
                    if args.load_best_model_at_end and args.metric_for_best_model
                    else ()
                ),
            )
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After an optimizer step. On the last one (the Trainer's flow callback, which runs
        first, has asked to stop) the final weights are evaluated now, so that the evaluation is
        in the last checkpoint and reaches loggers that close at the end of training."""
        self._event(args, state, control)
        self.step_ended(state.global_step)
        if control.should_training_stop:
            self.evaluate_grid(state.global_step)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """With eval_every_n_steps=None, evaluate the grid with the Trainer's evaluation; give
        the latest metrics of this step to the evaluation's metrics as eval_wiseft/..."""
        if not self._in_training or metrics is None:
            return
        self._event(args, state, control)
        if self.eval_every_n_steps is None:
            self.evaluate_grid(state.global_step)
        step, ours = self._latest_metrics
        if step == state.global_step:
            metrics.update({EVAL_PREFIX + name: value for name, value in ours.items()})
        wanted = args.metric_for_best_model
        if wanted is not None and wanted.removeprefix(EVAL_PREFIX).startswith("wiseft/"):
            # no evaluation of ours at this step (before the snapshot): never the best one
            metrics.setdefault(EVAL_PREFIX + wanted.removeprefix(EVAL_PREFIX), math.nan)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._event(args, state, control)
        step = state.global_step
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            step = state.best_global_step or step  # the weights the Trainer put back
        self.training_ended(step)
        self._in_training = False

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """The Trainer's stateful-callback record, saved in trainer_state.json. The core's state
        goes in as one JSON string: the Trainer writes with sort_keys, which would reorder the
        records' fields (and so history.jsonl) on resume."""
        return {"args": {}, "attributes": {"wiseft": json.dumps(self.state_dict())}}

    def _restore(self, state: TrainerState) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        if not isinstance(saved, dict) or "wiseft" not in saved.get("attributes", {}):
            self._warn(
                f"resumed at step {state.global_step} from a checkpoint without this callback's "
                "state: history and snapshot start afresh"
            )
            return
        self.load_state_dict(json.loads(saved["attributes"]["wiseft"]))

    # ------------------------------------------------------------------ transformers' side

    def _event(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Keep the current event's objects (on_collapse and the stop act on them)."""
        self._args, self._state, self._control = args, state, control

    def _emit_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Through the Trainer's log (every rank, as the Trainer does): into
        `state.log_history` and to every report_to integration."""
        self._latest_metrics = (step, dict(metrics))
        transformers.Trainer.log(self._trainer, dict(metrics))

    def _stop_training(self) -> None:
        self._control.should_training_stop = True

    def _call_on_collapse(self, callback: Callable[..., Any], info: dict[str, Any]) -> None:
        callback(self._args, self._state, self._control, info)


def _find_trainer(callback: TrainerCallback) -> transformers.Trainer:
    """The Trainer whose callback handler is calling `callback` (up the call stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, transformers.Trainer) and any(
                c is callback for c in owner.callback_handler.callbacks
            ):
                return owner
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError(
        f"{type(callback).__name__} must be called by a transformers.Trainer holding it in its "
        "callbacks (Trainer(callbacks=[...]) or trainer.add_callback)"
    )


def _check_training_arguments(args: TrainingArguments) -> None:
    if args.restore_callback_states_from_checkpoint:
        raise ValueError(
            "WiSEFTTrainerCallback restores its own state from the checkpoint; set "
            "restore_callback_states_from_checkpoint=False (the Trainer would rebuild the "
            "callback from saved arguments, which cannot hold problems or a grader)"
        )
