"""What the model generated: sample tables for loggers and the console, full JSONL dumps.

Lightning-free: loggers are reached by what they can do (duck typing), so this module imports
nothing of Lightning and works with any logger object.

* Sample table: for a fixed choice of problems (`pick_examples`, the same at every evaluation),
  the first completion under every alpha of an evaluation, as rows (step, alpha, problem, source,
  prompt, reference, completion, answer, correct). The first sample of a problem shares its seed
  across alphas, so the rows of one problem compare the weights, not the dice. Rows of every
  evaluation are kept: `log_sample_table` gives loggers with `log_table` (W&B) the whole table so
  far, and TensorBoard a markdown table per evaluation at its step (`add_text`); every run also
  gets `samples.jsonl` (all rows so far) in its log folder.
* Generation dump: `write_generations` writes `step_{N}.jsonl`, one line per (alpha, problem)
  with every completion, its extracted answer, verdict, token count and finish reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from wise_callback.evaluate import Evaluation
from wise_callback.files import write_text_atomically

TABLE_KEY = "wiseft/samples"
COLUMNS = (
    "step",
    "alpha",
    "problem",
    "source",
    "prompt",
    "reference",
    "completion",
    "answer",
    "correct",
)


def pick_examples(sources: Sequence[str | None], count: int) -> list[int]:
    """`count` problem indices, taken round-robin over the sources (the first problem of each
    source, then the second, ...), so that every evaluation set shows up; the same at every
    evaluation. The earliest problems first: they are the ones a time budget covers."""
    groups: dict[str | None, list[int]] = {}
    for index, source in enumerate(sources):
        groups.setdefault(source, []).append(index)
    rounds = zip_longest(*groups.values())
    picked = [index for turn in rounds for index in turn if index is not None]
    return sorted(picked[:count])


def sample_rows(
    evaluation: Evaluation, problems: Sequence[Mapping[str, Any]], examples: Iterable[int]
) -> list[dict[str, Any]]:
    """Table rows of one evaluation: the first completion of each example problem under each
    alpha (problems that a time budget left out are skipped)."""
    wanted = set(examples)
    rows = []
    for result in evaluation.results:
        for problem in result.problems:
            if problem.index not in wanted:
                continue
            source = problems[problem.index]
            rows.append(
                {
                    "step": evaluation.step,
                    "alpha": result.alpha,
                    "problem": problem.index,
                    "source": source.get("source"),
                    "prompt": _text(source["prompt"]),
                    "reference": source["answer"],
                    "completion": problem.completions[0],
                    "answer": _plain(problem.answers[0]),
                    "correct": problem.correct[0],
                }
            )
    return rows


def generation_lines(
    evaluation: Evaluation, problems: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One JSON-ready line per (alpha, problem) with all of its samples."""
    lines = []
    for result in evaluation.results:
        for problem in result.problems:
            source = problems[problem.index]
            samples = zip(
                problem.completions,
                problem.answers,
                problem.correct,
                problem.num_tokens,
                problem.finish_reasons,
                strict=True,
            )
            lines.append(
                {
                    "step": evaluation.step,
                    "alpha": result.alpha,
                    "problem": problem.index,
                    "id": source.get("id"),
                    "source": source.get("source"),
                    "prompt": source["prompt"],
                    "reference": source["answer"],
                    "num_correct": problem.num_correct,
                    "samples": [
                        {
                            "completion": text,
                            "answer": _plain(answer),
                            "correct": correct,
                            "num_tokens": tokens,
                            "finish_reason": reason,
                        }
                        for text, answer, correct, tokens, reason in samples
                    ],
                }
            )
    return lines


def write_generations(
    evaluation: Evaluation, problems: Sequence[Mapping[str, Any]], folder: str | os.PathLike
) -> Path:
    """`folder/step_{N}.jsonl` with every generation of the evaluation, written atomically."""
    path = Path(folder) / f"step_{evaluation.step}.jsonl"
    write_jsonl(path, generation_lines(evaluation, problems))
    return path


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, replacing `path` atomically (a crash leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(line) + "\n" for line in lines))


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (what TensorBoard's text tab renders)."""
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def format_samples(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows for the console: one block per row, the completion on its own line."""
    blocks = []
    for row in rows:
        verdict = "correct" if row["correct"] else "wrong"
        source = f" [{row['source']}]" if row["source"] is not None else ""
        blocks.append(
            f"step {row['step']} alpha={row['alpha']:.2f} problem {row['problem']}{source}: "
            f"{verdict} (answer {row['answer']!r}, reference {row['reference']!r})\n"
            f"  prompt:     {row['prompt']!r}\n  completion: {row['completion']!r}"
        )
    return "\n".join(blocks)


def log_sample_table(
    loggers: Iterable[Any],
    table: Sequence[Mapping[str, Any]],
    new_rows: Sequence[Mapping[str, Any]],
    step: int,
) -> None:
    """Give each logger that can show tables the sample rows: `log_table(key, columns, data,
    step=)` loggers (W&B) the whole `table` so far, TensorBoard (`experiment.add_text`) the
    evaluation's `new_rows` at `step`. Other loggers are skipped (samples.jsonl has the rows)."""
    for logger in loggers:
        if callable(getattr(logger, "log_table", None)):
            data = [[row[c] for c in COLUMNS] for row in table]
            logger.log_table(key=TABLE_KEY, columns=list(COLUMNS), data=data, step=step)
        elif callable(add_text := getattr(getattr(logger, "experiment", None), "add_text", None)):
            add_text(TABLE_KEY, markdown_table(new_rows), global_step=step)


def _text(prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def _plain(answer: Hashable | None) -> str | int | float | None:
    """An extracted answer as JSON can hold it."""
    if answer is None or isinstance(answer, (str, int, float)):
        return answer
    return str(answer)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")
