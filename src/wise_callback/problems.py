"""Evaluation problems: read, check, subset and chat-format them, in one place used by the
callbacks and `wise-ft eval`."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def load_problems(problems: Any) -> list[dict[str, Any]]:
    """Problems from a list/Dataset, a JSONL file path, or a mapping {source: either of those}
    (several evaluation sets at once: each problem gets its set's name as "source").

    The sets are interleaved in proportion to their sizes, each in its own order, so that any
    prefix (what a time budget covers) holds every set in its share."""
    if isinstance(problems, Mapping) and not {"prompt", "answer"} <= problems.keys():
        if not problems:
            raise ValueError("problems is an empty mapping: give at least one evaluation set")
        sets = [(str(source), load_problems(rows)) for source, rows in problems.items()]
        placed = [
            ((index + 0.5) / len(rows), order, {**problem, "source": source})
            for order, (source, rows) in enumerate(sets)
            for index, problem in enumerate(rows)
        ]
        return [problem for _, _, problem in sorted(placed, key=lambda item: item[:2])]
    if problems is None or isinstance(problems, (int, float, bytes)):
        raise TypeError(
            "problems must be a list of {'prompt', 'answer'} dicts, a datasets.Dataset, a JSONL "
            f"path or a {{source: problems}} mapping, got {problems!r}"
        )
    if isinstance(problems, (str, os.PathLike)):
        return read_problems(problems)
    return check_problems(problems)


def check_problems(problems: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Problems as a list of dicts with a "prompt" (text or token ids) and an "answer" (a string;
    numbers are turned into their string form). Other fields travel along untouched.

    Accepts a list of mappings or anything iterable over row dicts (e.g. a `datasets.Dataset`).
    """
    if isinstance(problems, (str, bytes, Mapping)):
        raise TypeError(
            "problems must be a list of {'prompt', 'answer'} dicts (or a datasets.Dataset with "
            f"those columns), got a {type(problems).__name__}"
        )
    rows = list(problems)
    if not rows:
        raise ValueError("problems is empty: give at least one {'prompt', 'answer'} problem")
    checked = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"problem {index} is a {type(row).__name__}, not a mapping")
        missing = [key for key in ("prompt", "answer") if key not in row]
        if missing:
            raise ValueError(f"problem {index} lacks {missing}; it has keys {sorted(row)}")
        prompt, answer = row["prompt"], row["answer"]
        is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        if not ((isinstance(prompt, str) or is_ids) and len(prompt) > 0):
            raise ValueError(f"problem {index}: prompt must be a non-empty str or token-id list")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"problem {index}: answer must be a str or a number, got {answer!r}")
        checked.append({**row, "answer": str(answer)})
    return checked


def read_problems(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Problems from a JSONL file, one {"prompt", "answer", ...} object per line, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problems file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({err})") from None
    return check_problems(rows)


def subset_problems(
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


def check_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"apply_chat_template=True, but the tokenizer ({type(tokenizer).__name__}) has no "
            "chat_template; set tokenizer.chat_template or pass apply_chat_template=False"
        )


def format_prompts(
    problems: list[dict[str, Any]], tokenizer: Any, apply_chat_template: bool
) -> list[dict[str, Any]]:
    """The problems with each text prompt replaced by the token ids of the tokenizer's chat
    template around it (one user message, then the generation prompt). Ids, not text, so that
    the sampler adds no second BOS token."""
    if not apply_chat_template:
        return problems
    check_chat_template(tokenizer)
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
