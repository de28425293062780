"""The layouts of evaluation sets that `wise_callback.problems.load_problems` recognises by their
columns (the first that fits wins), and how each gives a problem's prompt and reference:

    layout         columns                     prompt    reference ("answer")
    prompt_answer  prompt, answer (ours)       prompt    answer, as it is
    verl           prompt, reward_model        prompt    reward_model["ground_truth"]
    gsm8k          question, answer            question  after the last "####", commas removed
                                                         (the worked solution kept as "solution")
    aime           problem, answer, id|year    problem   answer (every one an int 0..999)
    math           problem, answer             problem   answer
    math           problem, solution           problem   the last \\boxed{...} / \\fbox{...}

AIME is told from MATH-500 by its answers (all integers 0..999, as AIME's are) *and* an "id" or
"year" column (MATH-500 has "unique_id"); both are graded the same way. `prompt_key=` /
`answer_key=` turn detection off: the named columns are the prompt and the reference, as they are
(layout "prompt_answer"; a dotted key such as "reward_model.ground_truth" reaches into a nested
column).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wise_callback.grading.matchers import _after_hashes, _last_boxed

_AIME_ANSWER = re.compile(r"\d{1,3}")


def _as_is(value: Any, where: str) -> Any:
    return value


def _after_four_hashes(value: Any, where: str) -> str:
    reference = _after_hashes(value) if isinstance(value, str) else None
    reference = (reference or "").strip().replace(",", "")
    if not reference:
        raise ValueError(f"{where}: a GSM8K answer must end in '#### <reference>', got {value!r}")
    return reference


def _boxed(value: Any, where: str) -> str:
    reference = _last_boxed(value) if isinstance(value, str) else None
    if reference is None or not reference.strip():
        raise ValueError(f"{where}: no \\boxed{{...}} in the solution to take the reference from")
    return reference.strip()


@dataclass(frozen=True)
class Layout:
    """How a layout reads a row: the prompt column, the reference column (dotted: nested), how
    the reference is taken from that column's value, and where the column's own value is kept
    when the reference replaces it (`keep_answer_as`)."""

    name: str
    prompt: str
    answer: str
    reference: Callable[[Any, str], Any] = _as_is
    keep_answer_as: str | None = None

    @property
    def columns(self) -> tuple[str, str]:
        return self.prompt, self.answer.split(".")[0]

    def read(self, row: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The row as a problem: its fields, plus "prompt", "answer" (the reference), "layout"
        and, from verl's "data_source", "source" (unless the row has one)."""
        missing = [column for column in self.columns if column not in row]
        if missing:
            raise ValueError(f"{where} lacks {missing}; it has keys {sorted(row)}")
        answer = row
        for key in self.answer.split("."):
            if not isinstance(answer, Mapping) or key not in answer:
                raise ValueError(f"{where} lacks {self.answer!r} ({self.name} layout)")
            answer = answer[key]
        problem = {**row, "prompt": row[self.prompt], "answer": self.reference(answer, where)}
        problem["layout"] = self.name
        if self.keep_answer_as is not None:
            problem.setdefault(self.keep_answer_as, row[self.answer])
        if "source" not in row and row.get("data_source") is not None:
            problem["source"] = str(row["data_source"])
        return problem


_LAYOUTS = (
    Layout("prompt_answer", "prompt", "answer"),
    Layout("verl", "prompt", "reward_model.ground_truth"),
    Layout("gsm8k", "question", "answer", _after_four_hashes, keep_answer_as="solution"),
    Layout("aime", "problem", "answer"),
    Layout("math", "problem", "answer"),
    Layout("math", "problem", "solution", _boxed),
)


def _is_aime_answer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value <= 999
    return isinstance(value, str) and _AIME_ANSWER.fullmatch(value.strip()) is not None


def detect_layout(columns: Iterable[str], rows: Sequence[Mapping[str, Any]] = ()) -> Layout | None:
    """The first layout whose columns are all in `columns` (AIME also needs `rows`' answers to be
    integers 0..999 and an "id" or "year" column), or None."""
    present = set(columns)
    for layout in _LAYOUTS:
        if not set(layout.columns) <= present:
            continue
        if layout.name == "aime" and not (
            present & {"id", "year"} and all(_is_aime_answer(row.get("answer")) for row in rows)
        ):
            continue
        return layout
    return None


_KNOWN_LAYOUTS = (
    "prompt + answer (ours), prompt + reward_model.ground_truth (verl), question + answer "
    "(GSM8K), problem + answer (MATH-500, AIME), problem + solution with a \\boxed{} (MATH)"
)


def unknown_layout(where: str, columns: Iterable[str]) -> ValueError:
    """The error for rows no layout fits: what they lack for the closest layout, what they have,
    and what every layout needs."""
    present = set(columns)
    closest = min(_LAYOUTS, key=lambda layout: len(set(layout.columns) - present))
    missing = [column for column in closest.columns if column not in present]
    return ValueError(
        f"{where}: unrecognised layout, it lacks {missing} (closest layout: {closest.name}); it "
        f"has keys {sorted(present)}. Known layouts: {_KNOWN_LAYOUTS}; or name the prompt and "
        "answer columns with prompt_key= and answer_key="
    )
