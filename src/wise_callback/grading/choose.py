"""Which grader: by name (`GRADERS`, for the CLI and YAML), by dataset layout
(`grader_for_layout`, what `auto` picks per source), and `check_grader`, the up-front check."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from wise_callback.grading.matchers import (
    Grader,
    boxed_match,
    exact_match,
    gsm8k_match,
    has_math_verify,
    math_verify_match,
    numeric_match,
)

GRADERS: dict[str, Grader] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "math": math_verify_match,
    "boxed": boxed_match,
    "gsm8k": gsm8k_match,
}
"""The graders by the short names the CLI and YAML configs use."""

LAYOUTS = ("prompt_answer", "gsm8k", "math", "aime", "verl")
"""The problem layouts `grader_for_layout` knows (those the problem loader detects)."""

_NEEDS_MATH_VERIFY = (math_verify_match,)
"""Graders that cannot work without math-verify (boxed_match falls back to plain matching)."""


def grader_for_layout(layout: str, source: str | None = None) -> Grader:
    """The grader that matches how a dataset writes its answers (`auto`):

    - "prompt_answer" (ours: `prompt` + `answer`, any answer form): math_verify_match where
      math-verify is installed, else exact_match (numeric_match would refuse a non-number
      reference);
    - "gsm8k": gsm8k_match ("####", else the last number);
    - "math" (MATH / MATH-500) and "aime" (integers, written in a box): boxed_match;
    - "verl": by the `data_source` name in `source`: gsm8k_match when it contains "gsm8k",
      else boxed_match (verl's math sets ask for a boxed answer).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown problem layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if source is not None and not isinstance(source, str):
        raise TypeError(f"source must be a str or None, got {type(source).__name__}")
    if layout == "prompt_answer":
        return math_verify_match if has_math_verify() else exact_match
    if layout == "gsm8k" or (layout == "verl" and "gsm8k" in (source or "").lower()):
        return gsm8k_match
    return boxed_match


AUTO = "auto"
"""The grader name that picks a grader per problem from its layout (`graders_for`)."""


def graders_for(problems: Sequence[Mapping[str, Any]], grader: Grader | str) -> list[Grader]:
    """One grader per problem: `grader` itself, or with AUTO the one `grader_for_layout` picks
    from the problem's "layout" and its "data_source" (verl) or "source"."""
    if grader != AUTO:
        return [grader] * len(problems)  # type: ignore[list-item]
    return [
        grader_for_layout(p.get("layout", "prompt_answer"), p.get("data_source") or p.get("source"))
        for p in problems
    ]


def check_grader(grader: Any) -> None:
    """Refuse a grader that cannot work, before any work is done: TypeError (naming it) when
    it is not callable; ImportError when it needs math-verify (math_verify_match, or a
    functools.partial of it) and math-verify cannot be imported here."""
    if not callable(grader):
        raise TypeError(
            f"grader must be a callable (completion, reference) -> Verdict, got {grader!r} "
            f"({type(grader).__name__})"
        )
    inner = grader
    while isinstance(inner, functools.partial):
        inner = inner.func
    if any(inner is needy for needy in _NEEDS_MATH_VERIFY) and not has_math_verify():
        raise ImportError(
            f"grader {inner.__name__} needs math-verify, which cannot be imported here: "
            "pip install math-verify (or the `math` extra: pip install 'wise-callback[math]')"
        )
