"""Evaluation sets: the one loader of problems (`load_problems`), and what is done with them before
sampling: `check_problems`, a seeded `subset_problems` and `format_prompts` (chat template).

`load_problems` reads a list of dicts, a JSONL / JSON / parquet file, a `datasets.Dataset`, a
`datasets.DatasetDict` (with `split=`) or a mapping {source name: any of these}, and recognises the
common layouts by their columns (ours, GSM8K, MATH / MATH-500, AIME, verl: see
`wise_callback.problem_layouts`).

Every problem comes out as the row's own fields plus "prompt" (text, token ids, or chat messages
[{"role", "content"}, ...]), "answer" (str), "layout" and, where known, "source" (the mapping's
name, else the row's "source", else verl's "data_source"). `datasets` and `pyarrow` are imported
only when a parquet file or a `datasets` object is given.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wise_callback.problem_layouts import Layout, detect_layout, unknown_layout

Problem = dict[str, Any]

INSTRUCTION_POSITIONS = ("after", "before")


# ---------------------------------------------------------------------------------- the loader


@dataclass
class _Rows:
    """Raw rows of one set, with a label for each (for errors: file and line, or row)."""

    rows: list[Any]
    labels: list[str]
    name: str  # the set as a whole, e.g. "problems" or a file path


def load_problems(
    source: Any,
    *,
    split: str | None = None,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    instruction: str | None = None,
    instruction_position: str = "after",
) -> list[Problem]:
    """The problems of `source` (see the module docstring for what it accepts and how layouts are
    recognised), checked, with `instruction` added to every prompt.

    A mapping {source name: set} gives every problem its set's name as "source"; the sets are
    interleaved in proportion to their sizes, each in its own order, so that any prefix (what a
    time budget covers) holds every set in its share. `split` picks a `DatasetDict`'s split (or
    a JSON object's {split: [...]}). `instruction` is joined to text prompts with a line break,
    after or before them (`instruction_position`), and to the last user message of chat-message
    prompts; token-id prompts cannot take one.
    """
    loader = _Loader(split, prompt_key, answer_key, instruction, instruction_position)
    problems = loader.load(source, "problems")
    if split is not None and not loader.split_used:
        raise ValueError(
            f"split={split!r} was given, but no set has splits (a datasets.DatasetDict or a JSON "
            "object {split: [...]})"
        )
    return problems


@dataclass
class _Loader:
    """`load_problems`'s options, checked once, and the recursion over a mapping of sets."""

    split: str | None
    prompt_key: str | None
    answer_key: str | None
    instruction: str | None
    instruction_position: str
    split_used: bool = False

    def __post_init__(self) -> None:
        for name in ("split", "prompt_key", "answer_key", "instruction"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TypeError(f"{name} must be None or a non-empty str, got {value!r}")
        if self.instruction_position not in INSTRUCTION_POSITIONS:
            raise ValueError(
                f"instruction_position must be one of {INSTRUCTION_POSITIONS}, "
                f"got {self.instruction_position!r}"
            )
        self.layout: Layout | None = None
        if self.prompt_key is not None or self.answer_key is not None:
            self.layout = Layout(
                "prompt_answer", self.prompt_key or "prompt", self.answer_key or "answer"
            )

    def load(self, source: Any, name: str) -> list[Problem]:
        if _datasets_kind(source) == "splits":
            return self.load(
                self._pick_split(source, list(source), name), f"{name}[{self.split!r}]"
            )
        if isinstance(source, Mapping):
            return self._load_sets(source, name)
        return self._read(self._raw_rows(source, name))

    def _pick_split(self, source: Mapping[str, Any], splits: list[str], name: str) -> Any:
        if self.split is None or self.split not in splits:
            wanted = "no split= was given" if self.split is None else f"split={self.split!r}"
            raise ValueError(f"{name} has the splits {splits}, {wanted}: give split= one of them")
        self.split_used = True
        return source[self.split]

    def _load_sets(self, sets: Mapping[Any, Any], name: str) -> list[Problem]:
        if not sets:
            raise ValueError(f"{name} is an empty mapping: give at least one evaluation set")
        if detect_layout(map(str, sets)) is not None:
            raise TypeError(
                f"{name} is one problem (a dict with keys {sorted(map(str, sets))}): give a list "
                "of problems, or a mapping {source name: problems}"
            )
        loaded = [(str(key), self.load(rows, f"{name}[{key!r}]")) for key, rows in sets.items()]
        placed = [
            ((index + 0.5) / len(rows), order, {**problem, "source": source})
            for order, (source, rows) in enumerate(loaded)
            for index, problem in enumerate(rows)
        ]
        return [problem for _, _, problem in sorted(placed, key=lambda item: item[:2])]

    def _raw_rows(self, source: Any, name: str) -> _Rows:
        if isinstance(source, (str, os.PathLike)):
            return self._read_file(Path(source))
        if _datasets_kind(source) == "table":
            rows = source.to_list()  # columnar: faster than iterating over the rows
        elif isinstance(source, bytes) or not isinstance(source, Iterable):
            raise TypeError(
                f"{name} must be a list of dicts, a JSONL / JSON / parquet path, a "
                "datasets.Dataset or DatasetDict, or a mapping {source name: any of these}; "
                f"got {type(source).__name__}"
            )
        else:
            rows = list(source)
        prefix = "" if name == "problems" else f"{name}, "
        return _Rows(rows, [f"{prefix}problem {index}" for index in range(len(rows))], name)

    def _read_file(self, path: Path) -> _Rows:
        if not path.is_file():
            raise FileNotFoundError(f"problems file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                document = json.loads(text)
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":
                    raise ValueError(f"{path}: not JSON ({err})") from None
                return _read_jsonl(path)  # JSON Lines under a .json name
            return self._json_rows(document, path)
        return _read_jsonl(path)

    def _json_rows(self, document: Any, path: Path) -> _Rows:
        """A JSON document's rows: a list of objects, an object {"data" | split: [...]}, or one
        problem object (as a JSONL file of one line is read)."""
        if isinstance(document, dict) and detect_layout(document, [document]) is not None:
            document = [document]
        if isinstance(document, dict):
            lists = [key for key, value in document.items() if isinstance(value, list)]
            if self.split is not None and self.split in lists:
                self.split_used = True
                document, path_name = document[self.split], f"{path} [{self.split!r}]"
            elif self.split is None and "data" in lists:
                document, path_name = document["data"], f"{path} ['data']"
            else:
                raise ValueError(
                    f"{path}: a JSON object with the lists {lists}; give split= one of them, or "
                    "make the file a list of problem objects"
                )
        else:
            path_name = str(path)
        if not isinstance(document, list):
            raise ValueError(f"{path}: a JSON {type(document).__name__}, not a list of problems")
        return _Rows(document, [f"{path_name}, row {i}" for i in range(len(document))], str(path))

    def _read(self, raw: _Rows) -> list[Problem]:
        if not raw.rows:
            raise ValueError(
                f"{raw.name} is empty: give at least one {{'prompt', 'answer'}} problem"
            )
        for row, label in zip(raw.rows, raw.labels, strict=True):
            if not isinstance(row, Mapping):
                raise TypeError(f"{label} is a {type(row).__name__}, not a mapping")
        layout = self.layout or detect_layout(raw.rows[0], raw.rows)
        if layout is None:
            raise unknown_layout(raw.labels[0], raw.rows[0])
        problems = []
        for row, label in zip(raw.rows, raw.labels, strict=True):
            problem = layout.read(row, label)
            problems.append({**problem, "prompt": self._instructed(problem["prompt"], label)})
        return check_problems(problems, raw.labels)

    def _instructed(self, prompt: Any, where: str) -> Any:
        """`prompt` with the instruction joined to it (text) or to its last user message."""
        if self.instruction is None:
            return prompt
        if isinstance(prompt, str):
            return _joined(prompt, self.instruction, self.instruction_position)
        if _is_messages(prompt):
            users = [i for i, message in enumerate(prompt) if message["role"] == "user"]
            if not users:
                raise ValueError(f"{where}: instruction= needs a user message in the prompt")
            messages = [dict(message) for message in prompt]
            messages[users[-1]]["content"] = _joined(
                messages[users[-1]]["content"], self.instruction, self.instruction_position
            )
            return messages
        raise ValueError(f"{where}: instruction= needs text or chat-message prompts, not token ids")


def _joined(text: str, instruction: str, position: str) -> str:
    parts = (text, instruction) if position == "after" else (instruction, text)
    return "\n".join(parts)


def _read_jsonl(path: Path) -> _Rows:
    rows, labels = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON object ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {number}: a JSON {type(row).__name__}, not an object"
                )
            rows.append(row)
            labels.append(f"{path}, line {number}")
    return _Rows(rows, labels, str(path))


def _read_parquet(path: Path) -> _Rows:
    try:
        import pyarrow
        import pyarrow.parquet
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"{path}: reading parquet needs pyarrow: pip install 'wise-callback[data]'"
        ) from None

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    return _Rows(rows, [f"{path}, row {index}" for index in range(len(rows))], str(path))


def _datasets_kind(source: Any) -> str | None:
    """What `source` is to `datasets`: "splits" (a `DatasetDict` / `IterableDatasetDict`), "table"
    (a `Dataset`) or None (never imports `datasets`: its objects exist only once it is)."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(
        source, (datasets.DatasetDict, datasets.IterableDatasetDict)
    ):
        return "splits"
    if datasets is not None and isinstance(source, datasets.Dataset):
        return "table"
    return None


# ------------------------------------------------------------------------------ checks and forms


def _is_messages(prompt: Any) -> bool:
    """True for a non-empty list of {"role": str, "content": str} chat messages."""
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
            for message in prompt
        )
    )


def check_problems(
    problems: Iterable[Mapping[str, Any]], labels: Sequence[str] | None = None
) -> list[Problem]:
    """Problems as a list of dicts with a "prompt" (text, token ids or chat messages) and an
    "answer" (a string; numbers are turned into their string form). Other fields travel along
    untouched. Accepts a list of mappings or anything iterable over row dicts (e.g. a
    `datasets.Dataset`); `labels` name the rows in errors (default "problem {index}")."""
    if isinstance(problems, (str, bytes, Mapping)) or not isinstance(problems, Iterable):
        raise TypeError(
            "problems must be a list of {'prompt', 'answer'} dicts (or a datasets.Dataset with "
            f"those columns), got a {type(problems).__name__}"
        )
    rows = list(problems)
    if not rows:
        raise ValueError("problems is empty: give at least one {'prompt', 'answer'} problem")
    checked = []
    for index, row in enumerate(rows):
        where = labels[index] if labels is not None else f"problem {index}"
        if not isinstance(row, Mapping):
            raise TypeError(f"{where} is a {type(row).__name__}, not a mapping")
        missing = [key for key in ("prompt", "answer") if key not in row]
        if missing:
            raise ValueError(f"{where} lacks {missing}; it has keys {sorted(row)}")
        prompt, answer = row["prompt"], row["answer"]
        is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        if not ((isinstance(prompt, str) or is_ids or _is_messages(prompt)) and len(prompt) > 0):
            raise ValueError(
                f"{where}: prompt must be a non-empty str, token-id list or list of "
                "{'role', 'content'} chat messages"
            )
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: answer must be a str or a number, got {answer!r}")
        checked.append({**row, "answer": str(answer)})
    return checked


def subset_problems(problems: list[Problem], max_problems: int | None, seed: int) -> list[Problem]:
    """A fixed random subset of `max_problems` problems (seeded), in their original order."""
    if max_problems is None:
        return problems
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        raise ValueError(f"max_problems must be None or an int >= 1, got {max_problems!r}")
    if max_problems >= len(problems):
        return problems
    chosen = sorted(random.Random(seed).sample(range(len(problems)), max_problems))
    return [problems[i] for i in chosen]


def check_chat_template(
    tokenizer: Any, problems: Sequence[Mapping[str, Any]] = (), apply_chat_template: bool = True
) -> None:
    """Refuse (ValueError) a tokenizer without a chat_template when the prompts need one: with
    `apply_chat_template`, or when any of `problems` has a chat-message prompt."""
    if getattr(tokenizer, "chat_template", None) is not None:
        return
    name = type(tokenizer).__name__
    if apply_chat_template:
        raise ValueError(
            f"apply_chat_template=True, but the tokenizer ({name}) has no chat_template; set "
            "tokenizer.chat_template or pass apply_chat_template=False"
        )
    for index, problem in enumerate(problems):
        if _is_messages(problem["prompt"]):
            raise ValueError(
                f"problem {index} has a chat-message prompt, but the tokenizer ({name}) has no "
                "chat_template to turn it into tokens; set tokenizer.chat_template"
            )


def format_prompts(
    problems: list[Problem], tokenizer: Any, apply_chat_template: bool
) -> list[Problem]:
    """The problems as the sampler takes them: chat-message prompts always, and text prompts when
    `apply_chat_template` (as one user message), replaced by the token ids of the tokenizer's chat
    template with the generation prompt. Ids, not text, so that the sampler adds no second BOS
    token. Token-id prompts are left as they are (refused with `apply_chat_template`)."""
    check_chat_template(tokenizer, problems, apply_chat_template)
    formatted = []
    for index, problem in enumerate(problems):
        prompt = problem["prompt"]
        if _is_messages(prompt):
            messages = [dict(message) for message in prompt]
        elif not apply_chat_template:
            formatted.append(problem)
            continue
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            raise ValueError(
                f"apply_chat_template=True needs text prompts; problem {index} has ids"
            )
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        formatted.append({**problem, "prompt": [int(i) for i in ids]})
    return formatted
