"""The demo's synthetic reasoning task: chains of additions and subtractions of 2-digit numbers.

A problem is a chain such as ``23+45-17+08=``; its completion writes every running result,
``68;51;59``, and it is graded on the last one (``59``). Every number is zero-padded to two digits
and every running result stays in 0..99, so each step is one small, learnable skill and the chain
is a short "reasoning trace" whose intermediate steps can go wrong.

Given the running value ``v``, the next step is drawn uniformly from the 101 moves that keep it in
range (``+b`` for b in 0..99-v, ``-b`` for b in 0..v). Everything is seeded: the same seed gives the
same problems on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

MAX_VALUE = 99
SEPARATOR = ";"


def running_results(prompt: str) -> list[int]:
    """The running results of a chain prompt such as ``"23+45-17+08="`` -> ``[68, 51, 59]``."""
    if not prompt.endswith("=") or len(prompt) < 6 or (len(prompt) - 3) % 3:
        raise ValueError(f"not a chain prompt like '23+45-17=': {prompt!r}")
    body = prompt[:-1]
    value = _two_digits(body[:2], prompt)
    results = []
    for start in range(2, len(body), 3):
        op, operand = body[start], _two_digits(body[start + 1 : start + 3], prompt)
        if op not in "+-":
            raise ValueError(f"unknown operator {op!r} in {prompt!r}")
        value = value + operand if op == "+" else value - operand
        if not 0 <= value <= MAX_VALUE:
            raise ValueError(f"running result {value} of {prompt!r} leaves 0..{MAX_VALUE}")
        results.append(value)
    return results


def completion_for(prompt: str) -> str:
    """The target completion: every running result, zero-padded, joined by ``;``."""
    return SEPARATOR.join(f"{value:02d}" for value in running_results(prompt))


def answer_of(completion: str) -> str | None:
    """The graded answer of a completion (its last running result), or None if there is none."""
    last = completion.strip().split(SEPARATOR)[-1].strip()
    return last if len(last) == 2 and last.isdigit() else None


def make_problem(rng: random.Random, num_ops: int) -> dict[str, str]:
    """One random chain of `num_ops` steps as ``{"prompt", "answer", "completion"}``."""
    if num_ops < 1:
        raise ValueError(f"num_ops must be >= 1, got {num_ops}")
    value = rng.randint(0, MAX_VALUE)
    prompt = f"{value:02d}"
    for _ in range(num_ops):
        move = rng.randint(0, MAX_VALUE + 1)  # 101 moves keep the value in 0..99
        if move < MAX_VALUE + 1 - value:
            prompt += f"+{move:02d}"
            value += move
        else:
            operand = move - (MAX_VALUE + 1 - value)
            prompt += f"-{operand:02d}"
            value -= operand
    prompt += "="
    completion = completion_for(prompt)
    return {"prompt": prompt, "answer": f"{value:02d}", "completion": completion}


def problem_stream(seed: int, min_ops: int = 1, max_ops: int = 3) -> Iterator[dict[str, str]]:
    """An endless, seeded stream of chains with a uniformly drawn number of steps (pretraining)."""
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    rng = random.Random(seed)
    while True:
        yield make_problem(rng, rng.randint(min_ops, max_ops))


def make_splits(
    seed: int, num_train: int, num_heldout: int, num_ops: int = 3
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and held-out sets of distinct `num_ops`-step chains, fixed by `seed`.

    The two sets come from separate seeded streams (train skips held-out prompts), so the held-out
    set depends only on `seed` and `num_heldout`, and a smaller one is a prefix of a larger one.
    """
    if num_train < 0 or num_heldout < 0:
        raise ValueError(f"sizes must be >= 0, got {num_train}, {num_heldout}")
    heldout = _distinct(random.Random(f"wise-ft-demo-heldout-{seed}"), num_ops, num_heldout, set())
    taken = {problem["prompt"] for problem in heldout}
    train = _distinct(random.Random(f"wise-ft-demo-train-{seed}"), num_ops, num_train, taken)
    return train, heldout


def _distinct(
    rng: random.Random, num_ops: int, count: int, taken: set[str]
) -> list[dict[str, str]]:
    """`count` problems with prompts distinct from each other and from `taken`."""
    seen = set(taken)
    problems: list[dict[str, str]] = []
    while len(problems) < count:
        problem = make_problem(rng, num_ops)
        if problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            problems.append(problem)
    return problems


def _two_digits(text: str, prompt: str) -> int:
    if len(text) != 2 or not text.isdigit():
        raise ValueError(f"expected a zero-padded 2-digit number, got {text!r} in {prompt!r}")
    return int(text)
