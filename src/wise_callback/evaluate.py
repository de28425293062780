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

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from wise_callback.eval_config import (
    CURRENT,
    HIGHER_IS_BETTER,
    EvalConfig,
    check_alphas,
    default_ks,
    evaluation_seed,
)
from wise_callback.grading import Grader, Verdict, check_timeouts, grade_many, graders_for
from wise_callback.problems import check_problems
from wise_callback.results import (
    AlphaResult,
    Evaluation,
    GradedAlpha,
    ProblemResult,
    alpha_result,
    summarize,
    summarize_by_source,
)
from wise_callback.sampling import Completion, Sampler
from wise_callback.sharding import is_sharded, reshard
from wise_callback.weights import Snapshot, alpha_sweep

__all__ = [  # the evaluation's names, importable from here as before the split
    "BUDGET_CALLS",
    "CURRENT",
    "HIGHER_IS_BETTER",
    "AlphaResult",
    "EvalConfig",
    "Evaluation",
    "EvaluationError",
    "ProblemResult",
    "check_alphas",
    "default_ks",
    "evaluate",
    "evaluation_seed",
    "summarize",
    "summarize_by_source",
]

BUDGET_CALLS = 16
"""With a time budget and `problems_per_call=None`, a rank's problems go out in this many calls."""


def evaluate(
    model: torch.nn.Module,
    snapshot: Snapshot | None,
    problems: Sequence[Mapping[str, Any]],
    sampler: Sampler,
    grader: Grader | str,
    config: EvalConfig,
    *,
    alphas: Sequence[float] = (CURRENT,),
    step: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    last_round: bool = True,
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

    The sampler's `end_evaluation` (e.g. vLLM's sleep) is called when sampling is done, unless
    `last_round=False` (more sampling of the same evaluation follows: the caller calls it).
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
    graded: dict[float, GradedAlpha] | None = None
    error: Exception | None = None
    try:
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
        finally:  # e.g. a vLLM engine in sleep mode releases its memory until the next one
            if last_round:
                end_sampling(sampler)
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
    # every rank holds the same counts now, so all of them fail (or not) together
    timed_out = sum(g.timed_out for g in graded.values())
    check_timeouts(timed_out, sum(len(r.correct) for g in graded.values() for r in g.problems))
    results = [alpha_result(alpha, graded[alpha], problems, config.ks or ()) for alpha in alphas]
    timings["total_s"] = time.perf_counter() - start
    return Evaluation(step=step, results=results, timings=timings)


def end_sampling(sampler: Sampler) -> None:
    """Tell the sampler an evaluation's sampling is done (`end_evaluation`, when it has one)."""
    end_evaluation = getattr(sampler, "end_evaluation", None)
    if callable(end_evaluation):
        end_evaluation()


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
    local: dict[float, GradedAlpha] | None, error: Exception | None, world_size: int
) -> dict[float, GradedAlpha]:
    """Every rank's graded problems, in problem order, on every rank (torch.distributed)."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, (local, message))
    failures = [f"rank {r}: {m}" for r, (_, m) in enumerate(parts) if m is not None]
    if failures:
        raise EvaluationError("evaluation failed on " + "; ".join(failures)) from error
    merged: dict[float, GradedAlpha] = {}
    for alpha in local or {}:
        everyone = [part[alpha] for part, _ in parts]
        results = sorted((r for g in everyone for r in g.problems), key=lambda r: r.index)
        indices = [r.index for r in results]
        if indices != list(range(len(results))):
            raise RuntimeError(f"gathered problem indices are not 0..{len(results) - 1}: {indices}")
        merged[alpha] = GradedAlpha(results, sum(g.timed_out for g in everyone))
    return merged


def _rng_devices(model: torch.nn.Module) -> list[torch.device]:
    """Accelerator devices whose RNG state sampling may touch (saved and restored around it)."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def _grade(
    completions: dict[float, list[list[Completion]]],
    problems: list[dict[str, Any]],
    indices: list[int],
    grader: Grader | str,
    config: EvalConfig,
) -> dict[float, GradedAlpha]:
    """Grade this rank's completions: per alpha, one `grade_many` call per grader (one in all
    unless grader="auto" picks per problem layout; the pool persists)."""
    graders = graders_for(problems, grader)
    graded: dict[float, GradedAlpha] = {}
    for alpha, per_problem in completions.items():
        items = [(p, c) for p, samples in enumerate(per_problem) for c in samples]
        verdicts: list[Verdict] = [Verdict(None, False)] * len(items)
        timed_out = [False] * len(items)
        by_grader: dict[int, list[int]] = {}
        for item, (problem, _) in enumerate(items):
            by_grader.setdefault(id(graders[problem]), []).append(item)
        for group in by_grader.values():
            result = grade_many(
                graders[items[group[0]][0]],
                [items[i][1].text for i in group],
                [problems[items[i][0]]["answer"] for i in group],
                timeout_s=config.grade_timeout_s,
                workers=config.grade_workers,
                load_timeout_s=config.grade_load_timeout_s,
            )
            for position, item in enumerate(group):
                verdicts[item] = result.verdicts[position]
            for position in result.timed_out_items:
                timed_out[group[position]] = True
        results, start = [], 0
        for index, samples in zip(indices, per_problem, strict=True):
            marks = verdicts[start : start + len(samples)]
            late = sum(timed_out[start : start + len(samples)])
            start += len(samples)
            results.append(
                ProblemResult(
                    index=index,
                    completions=[c.text for c in samples],
                    answers=[v.answer for v in marks],
                    correct=[bool(v.correct) for v in marks],
                    finish_reasons=[c.finish_reason for c in samples],
                    num_tokens=[len(c.token_ids) for c in samples],
                    timed_out=late,
                )
            )
        graded[alpha] = GradedAlpha(results, sum(timed_out))
    return graded
