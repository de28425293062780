"""The evaluation core: sample -> grade -> collapse metrics, for the current weights and WiSE-FT
interpolants, with one weight backup and one bit-exact restore per evaluation.

No Lightning here: `WiSEFTCallback` calls `evaluate` during training, and `wise-ft eval` calls it
offline on saved checkpoints. The flow of one evaluation:

1. alpha = 1.0 (the current weights) is sampled first, untouched; every other alpha is sampled
   inside ONE `alpha_sweep` (one backup, one lerp per alpha, one restore, also on errors);
2. the completions are graded (one `grade_many` call per alpha) after the weights are back;
3. per-problem results are gathered across ranks (problems are split block by block) and the
   metrics are computed from all of them, so every rank holds the same numbers as a single
   process would.

Samplers seed every prompt on its own (from the config seed and the prompt), and the seed of an
evaluation is derived from (`sampling.seed`, step): a problem's samples do not depend on the other
problems, nor on any global RNG, and the same problem gets the same seed for every alpha of an
evaluation (common random numbers make alphas comparable with less noise). Problems are cut into
consecutive blocks of `problems_per_call`, one sampler call each, and rank r takes blocks r,
r + world_size, ...: every call holds the same prompts whatever the number of processes, so a
distributed evaluation equals a single-process one bit for bit (same batch shapes, same floating
point; with `problems_per_call=None`, one block per rank, that no longer holds). Global RNG states
are saved and restored around sampling, so evaluating never changes the training run.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wise_callback.grading import Grader, grade_many
from wise_callback.metrics import answer_diversity, collapse_stats, majority_at_k
from wise_callback.problems import check_problems
from wise_callback.sampling import Completion, Sampler, SamplingConfig
from wise_callback.sharding import is_sharded, reshard
from wise_callback.stats import generation_health, standard_errors
from wise_callback.weights import Snapshot, alpha_sweep, check_alpha

CURRENT = 1.0
"""alpha = 1.0 is the current (latest) weights, evaluated without touching them."""

BUDGET_CALLS = 16
"""With a time budget and `problems_per_call=None`, a rank's problems go out in this many calls."""

HIGHER_IS_BETTER = ("pass@", "maj@", "jensen_bound@", "mean_rho")
"""Prefixes of the metrics that can select the merge alpha (larger is better for all of them)."""


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: samples per problem, the k values, sampling and grading settings.

    `ks` defaults to the powers of two up to `num_samples`, plus `num_samples` itself.
    `sampling.seed` (default 0) is the base of the evaluation seeds. `problems_per_call`: the
    block of consecutive problems that goes into one `sampler.sample` call (the unit of batching
    and of the split across ranks; None: one block per rank, or BUDGET_CALLS blocks per rank
    when `time_budget_s` is set, so that the budget has calls to stop between).
    `time_budget_s`: seconds of sampling per evaluation (see `evaluate`).
    """

    num_samples: int = 16
    ks: tuple[int, ...] | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grade_timeout_s: float = 10.0
    grade_workers: int | None = None
    problems_per_call: int | None = 8
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int):
            raise TypeError(f"num_samples must be an int, got {self.num_samples!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        ks = default_ks(self.num_samples) if self.ks is None else tuple(self.ks)
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"every k must be a positive int, got {k!r} in ks={ks}")
            if k > self.num_samples:
                raise ValueError(
                    f"k={k} in ks={ks} is larger than num_samples={self.num_samples}: Pass@k needs "
                    "at least k samples per problem"
                )
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(
                f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}"
            )
        if not (self.grade_timeout_s > 0 and math.isfinite(self.grade_timeout_s)):
            raise ValueError(
                f"grade_timeout_s must be a positive number, got {self.grade_timeout_s}"
            )
        if self.grade_workers is not None and self.grade_workers < 0:
            raise ValueError(f"grade_workers must be None or >= 0, got {self.grade_workers}")
        per_call = self.problems_per_call
        if per_call is not None and (isinstance(per_call, bool) or per_call < 1):
            raise ValueError(f"problems_per_call must be None or >= 1, got {per_call}")
        budget = self.time_budget_s
        if budget is not None and not (
            isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)
        ):
            raise ValueError(f"time_budget_s must be None or a positive number, got {budget!r}")

    @property
    def max_k(self) -> int:
        assert self.ks is not None
        return self.ks[-1]

    def metric_names(self) -> list[str]:
        """The scalar metrics of every record (what `select_metric` may name, and more)."""
        assert self.ks is not None
        names = [f"pass@{k}" for k in self.ks] + [f"maj@{k}" for k in self.ks]
        names += ["mean_rho", "var_rho", "frac_rho0", "frac_rho1"]
        names += [f"jensen_bound@{k}" for k in self.ks if k >= 2]
        names += ["mean_distinct_answers", "mean_answer_entropy", "mean_none_fraction"]
        names += [f"{m}@{k}_se" for m in ("pass", "maj") for k in self.ks]
        return [*names, "mean_completion_tokens", "frac_truncated"]

    def selectable_metrics(self) -> list[str]:
        """Metrics where larger is better: the ones an alpha can be chosen by."""
        names = self.metric_names()
        return [m for m in names if m.startswith(HIGHER_IS_BETTER) and not m.endswith("_se")]


def default_ks(num_samples: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to num_samples, and num_samples itself."""
    ks = [2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples]
    return tuple(sorted({*ks, num_samples}))


def check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    """Alphas as sorted unique floats in [0, 1]; ValueError naming a bad one."""
    values = [check_alpha(a) for a in alphas]
    return tuple(sorted(set(values)))


def evaluation_seed(base: int, step: int | None) -> int:
    """The sampling seed of the evaluation at `step` (samplers derive per-prompt seeds from it)."""
    digest = hashlib.blake2b(f"{base}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class ProblemResult:
    """The n graded samples of one problem under one alpha (index = position in `problems`)."""

    index: int
    completions: list[str]
    answers: list[Hashable | None]
    correct: list[bool]
    finish_reasons: list[str | None]
    num_tokens: list[int]
    timed_out: int = 0

    @property
    def num_correct(self) -> int:
        return sum(self.correct)


@dataclass
class _Graded:
    """Graded problems of one alpha, and how many items timed out in grading."""

    problems: list[ProblemResult]
    timed_out: int


@dataclass
class AlphaResult:
    """All problems (in order) under one alpha, and the metrics computed from them (with
    `timed_out`: completions whose grading timed out, counted as incorrect)."""

    alpha: float
    problems: list[ProblemResult]
    metrics: dict[str, Any]


@dataclass
class Evaluation:
    """One evaluation: a result per alpha, and where the time went (seconds by phase)."""

    step: int | None
    results: list[AlphaResult]
    timings: dict[str, float]

    def records(self) -> list[dict[str, Any]]:
        """Flat history records, one per alpha: {"step", "alpha", "pass@1", ..., "num_problems"}."""
        return [{"step": self.step, "alpha": r.alpha, **r.metrics} for r in self.results]


def summarize(problems: Sequence[ProblemResult], ks: Sequence[int]) -> dict[str, Any]:
    """The collapse metrics of a set of per-problem results (a whole alpha, or any subset).

    Keys: pass@k and maj@k for each k, and their standard errors over problems (pass@k_se,
    maj@k_se; None for a single problem); the bias-variance terms of `collapse_stats` (mean_rho,
    var_rho, jensen_bound@k for k >= 2, frac_rho0, frac_rho1) and rho_hist (problem counts over
    10 equal bins of rho); the `answer_diversity` means (mean_distinct_answers,
    mean_answer_entropy, mean_none_fraction: the fraction of samples with no extractable answer);
    generation health (mean_completion_tokens, frac_truncated); num_problems and num_samples.
    """
    if not problems:
        raise ValueError("no problem results to summarize")
    n = np.array([len(p.correct) for p in problems])
    c = np.array([p.num_correct for p in problems])
    answers = [p.answers for p in problems]
    stats = collapse_stats(n, c, list(ks))
    majority = majority_at_k(answers, [p.correct for p in problems], list(ks))
    metrics: dict[str, Any] = {f"pass@{k}": stats.pass_at[k] for k in ks}
    metrics.update(
        {f"maj@{k}": math.fsum(majority[:, j]) / len(problems) for j, k in enumerate(ks)}
    )
    metrics.update(stats.scalars())
    metrics.update(answer_diversity(answers).scalars())
    metrics.update(standard_errors(n, c, majority, ks))
    metrics.update(
        generation_health([p.finish_reasons for p in problems], [p.num_tokens for p in problems])
    )
    metrics.update(
        rho_hist=[int(x) for x in stats.rho_histogram],
        num_problems=len(problems),
        num_samples=int(n.sum()),
    )
    return metrics


def summarize_by_source(
    results: Sequence[ProblemResult], problems: Sequence[Mapping[str, Any]], ks: Sequence[int]
) -> dict[str, Any]:
    """Every scalar metric of `summarize` per problem "source" (e.g. "gsm8k"), as
    "{source}/{metric}" keys; {} when no problem has a source (others count as "unknown").

    Means over problems (pass@k, maj@k, mean_rho, ...) of the sources, weighted by their
    num_problems, average back to the overall numbers.
    """
    sources = [problems[r.index].get("source") for r in results]
    if all(source is None for source in sources):
        return {}
    groups: dict[str, list[ProblemResult]] = {}
    for result, source in zip(results, sources, strict=True):
        groups.setdefault("unknown" if source is None else str(source), []).append(result)
    return {
        f"{source}/{name}": value
        for source, group in sorted(groups.items())
        for name, value in summarize(group, ks).items()
        if not isinstance(value, list)
    }


def evaluate(
    model: torch.nn.Module,
    snapshot: Snapshot | None,
    problems: Sequence[Mapping[str, Any]],
    sampler: Sampler,
    grader: Grader,
    config: EvalConfig,
    *,
    alphas: Sequence[float] = (CURRENT,),
    step: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Evaluation:
    """Evaluate `model` at each alpha (1.0 = as it is; others need `snapshot`) on `problems`.

    With `world_size > 1` (an initialised torch.distributed group), rank r samples the blocks of
    `config.problems_per_call` problems r, r + world_size, ...; the per-problem results are
    gathered so that every rank returns the full, identical `Evaluation`. On return the weights
    and the train/eval mode of every submodule are as they were on entry, bit for bit, also when
    sampling or grading raises.

    With `config.time_budget_s`, each alpha gets its share of the budget for sampling (what one
    alpha leaves unused goes to the next); when it runs out, sampling stops between two sampler
    calls (every alpha makes at least one; all ranks stop after the same one), and every alpha
    is scored on the same problems: those that all alphas covered, a prefix of `problems`.
    Records say `num_problems` (covered) of `num_problems_planned`.
    """
    alphas = check_alphas(alphas)
    if snapshot is None and alphas != (CURRENT,):
        raise ValueError(f"alphas {alphas} need a snapshot (only alpha=1.0 works without one)")
    problems = check_problems(problems)
    if world_size > 1 and not torch.distributed.is_initialized():
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed group")
    timings = dict.fromkeys(("sample_s", "push_s", "weights_s", "grade_s", "gather_s"), 0.0)
    start = time.perf_counter()
    calls = _calls(model, len(problems), config, rank, world_size)
    local = [index for call in calls for index in call]
    graded: dict[float, _Graded] | None = None
    error: Exception | None = None
    try:
        completions = _sample(
            model,
            snapshot,
            problems,
            sampler,
            config,
            alphas,
            step,
            calls,
            world_size,
            timings,
            progress,
        )
        local = local[: min(len(samples) for samples in completions.values())]  # budget cut
        tick = time.perf_counter()
        graded = _grade(completions, [problems[i] for i in local], local, grader, config)
        timings["grade_s"] = time.perf_counter() - tick
    except Exception as err:
        if world_size == 1:
            raise
        error = err  # tell the other ranks, so that none waits forever in the gather
    tick = time.perf_counter()
    if world_size > 1:
        graded = _gather(graded, error, world_size)
    timings["gather_s"] = time.perf_counter() - tick
    assert graded is not None
    results = [
        AlphaResult(
            alpha,
            graded[alpha].problems,
            {
                **summarize(graded[alpha].problems, config.ks or ()),
                **summarize_by_source(graded[alpha].problems, problems, config.ks or ()),
                "timed_out": graded[alpha].timed_out,
                "num_problems_planned": len(problems),
            },
        )
        for alpha in alphas
    ]
    timings["total_s"] = time.perf_counter() - start
    return Evaluation(step=step, results=results, timings=timings)


def _sample(
    model: torch.nn.Module,
    snapshot: Snapshot | None,
    problems: list[dict[str, Any]],
    sampler: Sampler,
    config: EvalConfig,
    alphas: tuple[float, ...],
    step: int | None,
    calls: list[list[int]],
    world_size: int,
    timings: dict[str, float],
    progress: bool,
) -> dict[float, list[list[Completion]]]:
    """This rank's completions for every alpha: 1.0 first as it is, the others in one sweep;
    cut to the problems that every alpha covered when the time budget ran out."""
    sampling = replace(config.sampling, seed=evaluation_seed(config.sampling.seed, step))
    completions: dict[float, list[list[Completion]]] = {}
    bar = tqdm(
        total=len(alphas) * sum(map(len, calls)),
        desc=f"wise-ft eval step {step}",
        unit="problem",
        disable=not progress,
        leave=False,
    )

    order = sorted(alphas, key=lambda a: a != CURRENT)  # the sampling order
    budget_start = time.perf_counter()
    sharded = is_sharded(model)

    def sample_all(alpha: float) -> None:
        deadline = _deadline(config.time_budget_s, budget_start, order.index(alpha), len(order))
        tick = time.perf_counter()
        sampler.load_weights(model)
        timings["push_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        completions[alpha] = []
        for number, call in enumerate(calls):
            if number > 0 and _out_of_time(deadline, world_size):
                break
            if not (call or sharded):  # a budget's padding (sharded generation needs them all)
                continue
            prompts = [problems[i]["prompt"] for i in call]
            samples = sampler.sample(prompts, config.num_samples, sampling)
            _check_counts(sampler, samples, call, config.num_samples)
            completions[alpha].extend(samples)
            bar.update(len(call))
        reshard(model)
        timings["sample_s"] += time.perf_counter() - tick

    modes = {module: module.training for module in model.modules()}
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)):
            if CURRENT in alphas:
                sample_all(CURRENT)
            interpolants = [a for a in alphas if a != CURRENT]
            if interpolants:
                assert snapshot is not None
                tick = time.perf_counter()
                with alpha_sweep(model, snapshot) as set_alpha:  # the backup
                    timings["weights_s"] += time.perf_counter() - tick
                    for alpha in interpolants:
                        tick = time.perf_counter()
                        set_alpha(alpha)
                        timings["weights_s"] += time.perf_counter() - tick
                        sample_all(alpha)
                    tick = time.perf_counter()
                timings["weights_s"] += time.perf_counter() - tick  # the restore
    finally:
        for module, training in modes.items():
            module.training = training
        bar.close()
    covered = min(len(samples) for samples in completions.values())
    return {alpha: samples[:covered] for alpha, samples in completions.items()}


def _deadline(budget_s: float | None, start: float, position: int, count: int) -> float:
    """When the alpha sampled at `position` (of `count`) must stop: its cumulative share."""
    if budget_s is None:
        return math.inf
    return start + budget_s * (position + 1) / count


def _out_of_time(deadline: float, world_size: int) -> bool:
    """Past the deadline, on any rank (decided together, so that every rank makes the same
    sampler calls and the problems covered are a prefix)."""
    if deadline == math.inf:
        return False
    late = time.perf_counter() > deadline
    if world_size > 1:
        everyone: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(everyone, late)
        late = any(everyone)
    return late


def _calls(
    model: torch.nn.Module, num_problems: int, config: EvalConfig, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's sampler calls: blocks of consecutive problem indices, round-robin by rank.

    A sharded (FSDP2) model generates with collectives, and a time budget stops all ranks
    together, so then every rank makes the same number of calls: ranks with fewer blocks get
    empty ones.
    """
    share = math.ceil(num_problems / world_size)
    budget = config.time_budget_s is not None
    block = config.problems_per_call or (math.ceil(share / BUDGET_CALLS) if budget else share)
    blocks = [list(range(s, min(s + block, num_problems))) for s in range(0, num_problems, block)]
    calls = blocks[rank::world_size]
    if is_sharded(model) or budget:
        calls += [[]] * (math.ceil(len(blocks) / world_size) - len(calls))
    return calls


def _check_counts(
    sampler: Sampler, samples: list[list[Completion]], call: list[int], num_samples: int
) -> None:
    """A sampler must return num_samples completions for each prompt of the call."""
    counts = [len(s) for s in samples]
    if counts != [num_samples] * len(call):
        raise RuntimeError(
            f"{type(sampler).__name__}.sample returned {counts} completions for problems {call}, "
            f"expected {num_samples} each"
        )


class EvaluationError(RuntimeError):
    """An evaluation failed on some rank (raised on every rank, so that all of them go on alike)."""


def _gather(
    local: dict[float, _Graded] | None, error: Exception | None, world_size: int
) -> dict[float, _Graded]:
    """Every rank's graded problems, in problem order, on every rank (torch.distributed)."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, (local, message))
    failures = [f"rank {r}: {m}" for r, (_, m) in enumerate(parts) if m is not None]
    if failures:
        raise EvaluationError("evaluation failed on " + "; ".join(failures)) from error
    merged: dict[float, _Graded] = {}
    for alpha in local or {}:
        everyone = [part[alpha] for part, _ in parts]
        results = sorted((r for g in everyone for r in g.problems), key=lambda r: r.index)
        indices = [r.index for r in results]
        if indices != list(range(len(results))):
            raise RuntimeError(f"gathered problem indices are not 0..{len(results) - 1}: {indices}")
        merged[alpha] = _Graded(results, sum(g.timed_out for g in everyone))
    return merged


def _rng_devices(model: torch.nn.Module) -> list[torch.device]:
    """Accelerator devices whose RNG state sampling may touch (saved and restored around it)."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def _grade(
    completions: dict[float, list[list[Completion]]],
    problems: list[dict[str, Any]],
    indices: list[int],
    grader: Grader,
    config: EvalConfig,
) -> dict[float, _Graded]:
    """Grade this rank's completions, one `grade_many` call per alpha (its pool persists)."""
    graded: dict[float, _Graded] = {}
    for alpha, per_problem in completions.items():
        texts = [c.text for samples in per_problem for c in samples]
        references = [
            p["answer"] for p, samples in zip(problems, per_problem, strict=True) for _ in samples
        ]
        verdicts, timed_out = grade_many(
            grader,
            texts,
            references,
            timeout_s=config.grade_timeout_s,
            workers=config.grade_workers,
        )
        results, start = [], 0
        for index, samples in zip(indices, per_problem, strict=True):
            marks = verdicts[start : start + len(samples)]
            start += len(samples)
            results.append(
                ProblemResult(
                    index=index,
                    completions=[c.text for c in samples],
                    answers=[v.answer for v in marks],
                    correct=[bool(v.correct) for v in marks],
                    finish_reasons=[c.finish_reason for c in samples],
                    num_tokens=[len(c.token_ids) for c in samples],
                )
            )
        graded[alpha] = _Graded(results, timed_out)
    return graded
