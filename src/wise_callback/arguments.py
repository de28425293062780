"""The arguments both WiSE-FT callbacks take, checked in one place before any training: every
wrong type or value is a TypeError / ValueError that names the argument."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from wise_callback.checks import check_float, check_int, check_sequence
from wise_callback.early import PEAK
from wise_callback.evaluate import CURRENT, EvalConfig, check_alphas
from wise_callback.generations import pick_examples
from wise_callback.grading import AUTO, GRADERS, check_grader, graders_for
from wise_callback.options import build_groups
from wise_callback.outputs import check_merge_target
from wise_callback.problems import check_chat_template, load_problems, subset_problems
from wise_callback.sampling import SamplingConfig
from wise_callback.sampling.factory import check_sampler
from wise_callback.weights import check_alpha

GROUP_NAMES = ("sampling", "snapshotting", "collapse", "sample_logging", "evaluation")


def settle_arguments(given: Mapping[str, Any]) -> dict[str, Any]:
    """The callbacks' attributes from their arguments (`given`: the constructor's locals)."""
    groups = build_groups({name: given[name] for name in GROUP_NAMES}, given.get("legacy", {}))
    sampling, evaluation = groups["sampling"], groups["evaluation"]
    problems = subset_problems(
        load_problems(given["problems"]), evaluation.max_problems, sampling.seed
    )
    tokenizer = given["tokenizer"]
    _check_tokenizer(tokenizer)
    if tokenizer is not None and _is_tokenizer(tokenizer):
        check_chat_template(tokenizer, problems, sampling.apply_chat_template)
    grader = given["grader"]
    if isinstance(grader, str) and grader != AUTO:
        grader = GRADERS.get(grader) or _import_object(grader)
    for each in {id(g): g for g in graders_for(problems, grader)}.values():
        check_grader(each)
    snapshot_at = _check_snapshot_at(given["snapshot_at"])
    every = check_int("eval_every_n_steps", given["eval_every_n_steps"], minimum=1, optional=True)
    sampler = given["sampler"]
    check_sampler(sampler, sampling.sampler_kwargs)
    ks = given["ks"]
    config = EvalConfig(
        num_samples=check_int("num_samples", given["num_samples"], minimum=1),
        ks=None if ks is None else check_sequence("ks", ks),
        sampling=SamplingConfig(
            temperature=check_float("temperature", given["temperature"], minimum=0.0),
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=check_int("max_new_tokens", given["max_new_tokens"], minimum=1),
            stop=sampling.stop,
            seed=sampling.seed,
        ),
        grade_timeout_s=evaluation.grade_timeout_s,
        grade_workers=evaluation.grade_workers,
        grade_load_timeout_s=evaluation.grade_load_timeout_s,
        problems_per_call=(
            _default_problems_per_call(sampler)
            if sampling.problems_per_call is None
            else sampling.problems_per_call
        ),
        time_budget_s=evaluation.time_budget_s,
    )
    alphas = tuple(
        a for a in check_alphas(check_sequence("alphas", given["alphas"])) if a != CURRENT
    )
    names = [f"{a:.2f}" for a in (*alphas, CURRENT)]
    if len(set(names)) != len(names):
        raise ValueError(f"alphas {alphas} collide in the logged names alpha_{{alpha:.2f}}")
    select_metric = given["select_metric"] or f"pass@{config.max_k}"
    if select_metric not in config.selectable_metrics():
        raise ValueError(
            f"select_metric={select_metric!r} is not among the computed metrics where larger is "
            f"better: {config.selectable_metrics()}"
        )
    save_merged_to = given["save_merged_to"]
    if save_merged_to is not None:
        if not isinstance(save_merged_to, (str, os.PathLike)):
            raise TypeError(f"save_merged_to must be a folder path, got {save_merged_to!r}")
        save_merged_to = Path(save_merged_to)
        check_merge_target(save_merged_to)
    model_attr = given["model_attr"]
    if not (model_attr is None or (isinstance(model_attr, str) and model_attr)) and not callable(
        model_attr
    ):
        raise TypeError(f"model_attr must be an attribute path or a callable: {model_attr!r}")
    return {
        "problems": problems,
        "tokenizer": tokenizer,
        "grader": grader,
        "snapshot_at": snapshot_at,
        "eval_every_n_steps": every,
        "config": config,
        "alphas": alphas,
        "final_alpha": _check_final_alpha(given["final_alpha"]),
        "select_metric": select_metric,
        "sampler": sampler,
        "save_merged_to": save_merged_to,
        "model_attr": model_attr,
        "examples": pick_examples(
            [p.get("source") for p in problems], groups["sample_logging"].num_examples_to_log
        ),
        **groups,
    }


def resolve_tokenizer(tokenizer: Any, fallback: Any, where: str) -> Any:
    """The given tokenizer, else the trainer's (`fallback`, found at `where`); a path is loaded
    with `AutoTokenizer`."""
    tokenizer = tokenizer if tokenizer is not None else fallback
    if tokenizer is None:
        raise ValueError(f"a tokenizer is needed: pass tokenizer= or set {where}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    _check_tokenizer(tokenizer)
    return tokenizer


def resolve_model(
    root: Any, attr: str | Callable[[Any], Any] | None, root_name: str
) -> torch.nn.Module:
    """The model an adapter works on (model_attr): `root` itself (None), an attribute path of it
    ("backbone.lm"), or what a callable returns for it; checked to be a torch module."""
    if callable(attr):
        model, where = attr(root), f"model_attr callable {attr!r}"
    else:
        model, where = root, root_name
        for part in attr.split(".") if attr else ():
            model, where = getattr(model, part, None), f"{where}.{part}"
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{where} is {type(model).__name__}, not a torch module; point model_attr= at the "
            "Hugging Face model"
        )
    return model


def _is_tokenizer(value: Any) -> bool:
    return callable(getattr(value, "encode", None)) and callable(getattr(value, "decode", None))


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) or _is_tokenizer(tokenizer):
        return
    raise TypeError(
        "tokenizer must be None, a tokenizer (with encode/decode) or a path to load one from, "
        f"got {tokenizer!r} ({type(tokenizer).__name__})"
    )


def _check_final_alpha(final_alpha: Any) -> float | str | None:
    if final_alpha is None or final_alpha == "best":
        return final_alpha
    if isinstance(final_alpha, str):
        raise ValueError(f"final_alpha must be a float, 'best' or None, got {final_alpha!r}")
    check_float("final_alpha", final_alpha)
    return check_alpha(final_alpha)


def _check_snapshot_at(snapshot_at: Any) -> int | float | str:
    if snapshot_at == PEAK:
        return snapshot_at
    if isinstance(snapshot_at, str):
        raise ValueError(f"snapshot_at must be a step, a fraction or {PEAK!r}, got {snapshot_at!r}")
    if isinstance(snapshot_at, bool) or not isinstance(snapshot_at, (int, float)):
        raise TypeError(
            f"snapshot_at must be a step (int), a fraction (float) or {PEAK!r}: {snapshot_at!r}"
        )
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


def _default_problems_per_call(sampler: Any) -> int | None:
    """8 for the HF sampler (most of the batching gain on CPU), None (one block per rank) for
    the others."""
    from wise_callback.sampling.hf import HFSampler

    if sampler == "hf" or isinstance(sampler, HFSampler):
        return EvalConfig.problems_per_call
    return None


def _import_object(path: str) -> Any:
    """The object at a dotted import path, "package.module.name"."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"grader: cannot import {path!r}: {err}") from err
