"""The option groups of the WiSE-FT callbacks: everything past the main arguments, grouped by
what it is about, each checked when built. Plain dataclasses, so LightningCLI / jsonargparse
fill them from YAML (`sampling: {top_p: 0.95}`) and scripts build them by keyword.

The flat keyword names of earlier versions (`top_p=`, `snapshot_device=`, `collapse_patience=`,
...) are still accepted by the callbacks and mapped onto these groups (`LEGACY_NAMES`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from wise_callback.checks import check_bool, check_choice, check_float, check_int
from wise_callback.grading import LOAD_TIMEOUT_S

ON_COLLAPSE = ("warn", "stop")


@dataclass(frozen=True)
class SamplingOptions:
    """How evaluation completions are sampled, beyond `temperature` and `max_new_tokens`.

    Args:
        top_p, top_k, stop: nucleus / top-k truncation and stop strings.
        seed: base of the per-evaluation, per-problem seeds (evaluations are reproducible).
        problems_per_call: consecutive problems per `sampler.sample` call, the unit of batching
            and of the split across ranks (so a distributed evaluation equals a single-process
            one bit for bit). None: 8 with the HF sampler, one block per rank otherwise.
        sampler_kwargs: keyword arguments for the sampler built from "hf" or "vllm" (e.g.
            `{"gpu_memory_utilization": 0.3}` for vLLM).
        apply_chat_template: format each text prompt as a user message with the tokenizer's
            chat template (and the generation prompt) before sampling.
    """

    top_p: float = 1.0
    top_k: int | None = None
    stop: Sequence[str] = ()
    seed: int = 0
    problems_per_call: int | None = None
    sampler_kwargs: Mapping[str, Any] = field(default_factory=dict)
    apply_chat_template: bool = False

    def __post_init__(self) -> None:
        check_float("sampling.top_p", self.top_p, minimum=0.0, maximum=1.0, positive=True)
        check_int("sampling.top_k", self.top_k, minimum=1, optional=True)
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"sampling.stop must be a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        check_int("sampling.seed", self.seed)
        check_int("sampling.problems_per_call", self.problems_per_call, minimum=1, optional=True)
        if not isinstance(self.sampler_kwargs, Mapping):
            raise TypeError(
                f"sampling.sampler_kwargs must be a dict, got {type(self.sampler_kwargs).__name__}"
            )
        check_bool("sampling.apply_chat_template", self.apply_chat_template)


@dataclass(frozen=True)
class SnapshotOptions:
    """Where and how the early checkpoint is kept.

    Args:
        device: where the snapshot lives between evaluations (CPU by default: no GPU memory).
        dtype: its dtype, or its name ("bfloat16" halves the snapshot of an fp32 model).
        dir: where the snapshot file goes; default the trainer's checkpoint folder.
        dense_merge: for a LoRA PeftModel, save_merged_to gets the dense merged model (the
            plain base model with W0 + the interpolated update) instead of the interpolated
            adapter (rank r_early + r_latest, loadable with PeftModel.from_pretrained).
        peak_until: with snapshot_at="peak", the fraction of the planned steps up to which
            the best evaluation of the current weights replaces the snapshot; after it the
            snapshot is fixed and the alpha grid runs against it.
    """

    device: str = "cpu"
    dtype: str | None = None
    dir: str | os.PathLike[str] | None = None
    peak_until: float = 0.5
    dense_merge: bool = False

    def __post_init__(self) -> None:
        check_bool("snapshotting.dense_merge", self.dense_merge)
        check_float("snapshotting.peak_until", self.peak_until, minimum=0.0, maximum=1.0)
        if self.peak_until == 0.0:
            raise ValueError("snapshotting.peak_until must be > 0")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"snapshotting.device: not a device: {self.device!r}") from err
        self.torch_dtype()  # checks
        if self.dir is not None and not isinstance(self.dir, (str, os.PathLike)):
            raise TypeError(f"snapshotting.dir must be a folder path, got {self.dir!r}")

    def torch_dtype(self) -> torch.dtype | None:
        """`dtype` as a floating torch.dtype (None: keep the weights' own)."""
        dtype: Any = self.dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"snapshotting.dtype must be a floating dtype, got {self.dtype!r}")
        return dtype


@dataclass(frozen=True)
class CollapseOptions:
    """The collapse early warning on the current weights' Pass@k (largest k).

    Args:
        min_drop: how far Pass@k must fall below its best so far to count as collapsing.
        z_threshold: and how significant the fall must be: the paired z of the drop over
            problems (drop / its paired standard error) must reach it.
        patience: how many collapsing evaluations in a row (Pass@1 not below its value at the
            Pass@k peak) raise the warning.
        risk_warning: also warn (once) when `collapse_risk` - the paired z of the rise in the
            share of problems at rho = 1 since the early checkpoint - reaches z_threshold. Off
            by default: on the demo it leads the Pass@k drop on every seed but rises from the
            first evaluations on (it measures sharpening, not imminent collapse).
        on_collapse: "warn", "stop" (warn and stop training), or a callable the adapter calls
            with its own arguments (Lightning: `(trainer, pl_module, info)`; HF: `(args, state,
            control, info)`).
    """

    min_drop: float = 0.02
    z_threshold: float = 2.0
    patience: int = 1
    on_collapse: str | Callable[..., Any] = "warn"
    risk_warning: bool = False

    def __post_init__(self) -> None:
        check_bool("collapse.risk_warning", self.risk_warning)
        check_float("collapse.min_drop", self.min_drop, minimum=0.0, maximum=1.0)
        check_float("collapse.z_threshold", self.z_threshold, minimum=0.0)
        check_int("collapse.patience", self.patience, minimum=1)
        if not callable(self.on_collapse):
            check_choice("collapse.on_collapse", self.on_collapse, ON_COLLAPSE)


@dataclass(frozen=True)
class SampleLogging:
    """What of the generations is shown and kept.

    Args:
        num_examples_to_log: how many problems (the same at every evaluation: the first of each
            source in turn) show their first completion under every alpha in the sample table
            (W&B: the whole table; TensorBoard: text per step; samples.jsonl beside
            history.jsonl).
        print_samples: print that many rows of the sample table per evaluation.
        save_generations: write every completion of every evaluation to
            `generations/step_{N}.jsonl` in the log folder (True), or in this folder.
        progress: a progress bar while sampling (rank zero only).
    """

    num_examples_to_log: int = 4
    print_samples: int = 0
    save_generations: bool | str | os.PathLike[str] = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("sample_logging.num_examples_to_log", self.num_examples_to_log, minimum=0)
        check_int("sample_logging.print_samples", self.print_samples, minimum=0)
        if not isinstance(self.save_generations, (bool, str, os.PathLike)):
            raise TypeError(
                "sample_logging.save_generations must be a bool or a folder, got "
                f"{self.save_generations!r}"
            )
        check_bool("sample_logging.progress", self.progress)

    def generations_folder(self, log_dir: Path) -> Path | None:
        """Where generation dumps go, or None."""
        where = self.save_generations
        if where is False:
            return None
        return log_dir / "generations" if where is True else Path(where)


@dataclass(frozen=True)
class EvalOptions:
    """Grading, cost and failure handling of the evaluations.

    Args:
        grade_timeout_s, grade_workers: per-completion grading timeout, and grading worker
            processes (None: exact/numeric/gsm8k matching in this process, other graders in a
            pool with the timeout; 0: always in this process, no timeout).
        grade_load_timeout_s: how long a grading worker may take to start and load the grader
            (a grader in your training script loads that script), apart from the per-item
            timeout.
        max_problems: evaluate a fixed subset of this many problems (chosen with the seed).
        eval_at_start: evaluate the weights at step 0 (alpha = 1.0), a baseline.
        time_budget_s: seconds of sampling per evaluation; when they run out, sampling stops
            cleanly and the metrics cover the problems every alpha reached.
        fail_on_eval_error: raise when sampling or grading fails, instead of warning and going
            on with training (the weights are restored either way).
        grid_every: also sample the alpha grid at every m-th evaluation (1: at every one, the
            0.1 schedule). None (default): the current weights at every evaluation and the
            grid only for the final choice (the last step, or the end of training), unless a
            checkpoint callback of the trainer selects by a `wiseft/best` or `wiseft/alpha_`
            metric (then at every evaluation). The collapse watch reads the current weights
            only and the final choice the last grid, so the decisions do not change.
        grid_when_z: also sample the grid at the evaluation after one whose collapse_z (the
            paired z of the Pass@k drop) reached this, e.g. 1.0 (None: never).
        halving: successive halving at the final choice (final_alpha="best"): every alpha
            first gets this share of num_samples per problem, and only those not clearly
            worse than the best candidate, at most the better half, get the rest (see
            `wise_callback.halving`). None: every alpha gets num_samples.
        keep_pass1: with final_alpha="best", choose only among alphas whose Pass@1 is not
            significantly below the current weights' (paired z > -2 over problems).
    """

    grade_timeout_s: float = 10.0
    grade_workers: int | None = None
    grade_load_timeout_s: float = LOAD_TIMEOUT_S
    max_problems: int | None = None
    eval_at_start: bool = False
    time_budget_s: float | None = None
    fail_on_eval_error: bool = False
    keep_pass1: bool = False
    grid_every: int | None = None
    grid_when_z: float | None = None
    halving: float | None = 0.25

    def __post_init__(self) -> None:
        check_int("evaluation.grid_every", self.grid_every, minimum=1, optional=True)
        check_float("evaluation.grid_when_z", self.grid_when_z, optional=True)
        check_float("evaluation.halving", self.halving, positive=True, maximum=1.0, optional=True)
        check_bool("evaluation.keep_pass1", self.keep_pass1)
        check_float("evaluation.grade_timeout_s", self.grade_timeout_s, positive=True)
        check_int("evaluation.grade_workers", self.grade_workers, minimum=0, optional=True)
        check_float("evaluation.grade_load_timeout_s", self.grade_load_timeout_s, positive=True)
        check_int("evaluation.max_problems", self.max_problems, minimum=1, optional=True)
        check_bool("evaluation.eval_at_start", self.eval_at_start)
        check_float("evaluation.time_budget_s", self.time_budget_s, positive=True, optional=True)
        check_bool("evaluation.fail_on_eval_error", self.fail_on_eval_error)


GROUPS: dict[str, type] = {
    "sampling": SamplingOptions,
    "snapshotting": SnapshotOptions,
    "collapse": CollapseOptions,
    "sample_logging": SampleLogging,
    "evaluation": EvalOptions,
}

LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "top_p": ("sampling", "top_p"),
    "top_k": ("sampling", "top_k"),
    "stop": ("sampling", "stop"),
    "seed": ("sampling", "seed"),
    "problems_per_call": ("sampling", "problems_per_call"),
    "sampler_options": ("sampling", "sampler_kwargs"),
    "apply_chat_template": ("sampling", "apply_chat_template"),
    "snapshot_device": ("snapshotting", "device"),
    "snapshot_dtype": ("snapshotting", "dtype"),
    "snapshot_dir": ("snapshotting", "dir"),
    "collapse_min_drop": ("collapse", "min_drop"),
    "collapse_patience": ("collapse", "patience"),
    "on_collapse": ("collapse", "on_collapse"),
    "num_examples_to_log": ("sample_logging", "num_examples_to_log"),
    "print_samples": ("sample_logging", "print_samples"),
    "save_generations": ("sample_logging", "save_generations"),
    "progress": ("sample_logging", "progress"),
    "grade_timeout_s": ("evaluation", "grade_timeout_s"),
    "grade_workers": ("evaluation", "grade_workers"),
    "max_problems": ("evaluation", "max_problems"),
    "eval_at_start": ("evaluation", "eval_at_start"),
    "eval_time_budget_s": ("evaluation", "time_budget_s"),
    "fail_on_eval_error": ("evaluation", "fail_on_eval_error"),
}
"""Flat keyword arguments of earlier versions -> (option group, field)."""


def build_groups(given: Mapping[str, Any], legacy: Mapping[str, Any]) -> dict[str, Any]:
    """Each option group as a checked dataclass: the one given (an instance, a dict of its
    fields, or None for the defaults), with the flat `legacy` keywords applied on top."""
    unknown = sorted(set(legacy) - set(LEGACY_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}")
    groups: dict[str, Any] = {}
    for name, cls in GROUPS.items():
        value = given.get(name)
        if value is None:
            value = cls()
        elif isinstance(value, Mapping):
            allowed = {f.name for f in fields(cls)}
            extra = sorted(set(value) - allowed)
            if extra:
                raise TypeError(f"{name} has no option(s) {extra}; it has {sorted(allowed)}")
            value = cls(**value)
        elif not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {value!r}")
        groups[name] = value
    moved: dict[str, dict[str, Any]] = {}
    for old, value in legacy.items():
        group, option = LEGACY_NAMES[old]
        moved.setdefault(group, {})[option] = value
    if moved:
        spelled = ", ".join(
            f"{old} -> {LEGACY_NAMES[old][0]}.{LEGACY_NAMES[old][1]}" for old in legacy
        )
        warnings.warn(
            f"flat option names are deprecated; use the option groups: {spelled}",
            FutureWarning,
            stacklevel=4,
        )
    for group, changes in moved.items():
        groups[group] = replace(groups[group], **changes)
    return groups
