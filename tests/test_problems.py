"""The one loader of evaluation sets, on small files made here in every layout it recognises
(ours, GSM8K, MATH, MATH-500, AIME, verl) and every container (list, JSONL, JSON, parquet written
with `datasets`, Dataset, DatasetDict); then the checks, the seeded subset and chat formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest

from callback_toy import EVAL_PAIRS, toy_problems
from wise_callback.demo.model import char_tokenizer
from wise_callback.problems import (
    check_chat_template,
    check_problems,
    format_prompts,
    load_problems,
    subset_problems,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."

# ----------------------------------------------------------------- one small set per layout

GSM8K = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop sells 617 pens a day. How many pens does it sell in 2 days?",
        "answer": "It sells 617*2 = <<617*2=1234>>1,234 pens.\n#### 1,234",
    },
]
MATH = [  # hendrycks MATH: the reference is only in the solution's last \boxed{}
    {
        "problem": "Simplify $\\frac{2a}{4b}$.",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "First $\\boxed{2}$ cancels, so we get $\\boxed{\\frac{a}{2b}}$.",
    },
    {
        "problem": "What is $2+3$?",
        "level": "Level 1",
        "type": "Prealgebra",
        "solution": "It is $\\fbox{5}$.",
    },
]
MATH_500 = [
    {
        "problem": "Convert the point $(0,3)$ to polar coordinates.",
        "solution": "... so the answer is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is $1+2$?",
        "solution": "$\\boxed{3}$",
        "answer": "3",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
]
AIME = [
    {
        "id": 60,
        "problem": "Every morning Aya goes for a 9-kilometer-long walk ... Find the number of "
        "minutes the walk takes her.",
        "solution": "... $\\boxed{204}$",
        "answer": "204",
        "year": 2024,
    },
    {
        "id": 61,
        "problem": "Let $ABC$ be a triangle ... Find $m+n$.",
        "solution": "... $\\boxed{113}$",
        "answer": "113",
        "year": 2024,
    },
]
VERL = [
    {
        "data_source": "openai/gsm8k",
        "prompt": [
            {"role": "system", "content": "You are a careful solver."},
            {"role": "user", "content": "What is 6*12?"},
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
        "extra_info": {"split": "test", "index": 0},
    },
    {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": [{"role": "user", "content": "Simplify $\\frac{2}{4}$."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        "extra_info": {"split": "test", "index": 1},
    },
]

# layout name, rows, the references the callback must see, and a field that must be kept
# (GSM8K: the worked solution, under "solution", since its "answer" becomes the reference)
SETS = {
    "gsm8k": (GSM8K, ["72", "1234"], "solution"),
    "math": (MATH, ["\\frac{a}{2b}", "5"], "level"),
    "math500": (MATH_500, ["\\left( 3, \\frac{\\pi}{2} \\right)", "3"], "unique_id"),
    "aime": (AIME, ["204", "113"], "year"),
    "verl": (VERL, ["72", "\\frac{1}{2}"], "extra_info"),
}
LAYOUT_OF = {"math500": "math"}
PROMPT_COLUMN = {"gsm8k": "question", "math": "problem", "math500": "problem", "aime": "problem"}


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def as_container(rows: list[dict[str, Any]], container: str, folder: Path) -> tuple[Any, dict]:
    """`rows` in one of the containers `load_problems` takes, and the keyword arguments it needs."""
    if container == "list":
        return rows, {}
    if container == "jsonl":
        return write_jsonl(rows, folder / "set.jsonl"), {}
    if container == "json":
        (folder / "set.json").write_text(json.dumps(rows))
        return folder / "set.json", {}
    if container == "json_splits":
        (folder / "set.json").write_text(json.dumps({"train": rows[:1], "test": rows}))
        return str(folder / "set.json"), {"split": "test"}
    if container == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(folder / "set.parquet")
        return folder / "set.parquet", {}
    if container == "dataset":
        return datasets.Dataset.from_list(rows), {}
    if container == "dataset_dict":
        splits = {"train": rows[:1], "test": rows}
        tables = {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
        return datasets.DatasetDict(tables), {"split": "test"}
    raise AssertionError(container)


CONTAINERS = ("list", "jsonl", "json", "json_splits", "parquet", "dataset", "dataset_dict")


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", sorted(SETS))
def test_every_layout_in_every_container_gives_the_prompts_and_references(
    tmp_path, name, container
):
    rows, references, kept = SETS[name]
    source, kwargs = as_container(rows, container, tmp_path)
    problems = load_problems(source, **kwargs)

    assert [p["answer"] for p in problems] == references
    assert {p["layout"] for p in problems} == {LAYOUT_OF.get(name, name)}
    if name == "verl":
        assert [p["prompt"] for p in problems] == [row["prompt"] for row in rows]
        assert [p["source"] for p in problems] == [row["data_source"] for row in rows]
    else:
        assert [p["prompt"] for p in problems] == [row[PROMPT_COLUMN[name]] for row in rows]
        assert all("source" not in p for p in problems)
    kept_from = "answer" if name == "gsm8k" else kept
    assert [p[kept] for p in problems] == [row[kept_from] for row in rows]


def test_aime_is_told_from_math_500_by_integer_answers_and_an_id_or_year():
    assert {p["layout"] for p in load_problems(AIME)} == {"aime"}
    integer_math_500 = [{**row, "answer": "3"} for row in MATH_500]  # unique_id, not id
    assert {p["layout"] for p in load_problems(integer_math_500)} == {"math"}
    without_id = [{k: v for k, v in row.items() if k not in ("id", "year")} for row in AIME]
    assert {p["layout"] for p in load_problems(without_id)} == {"math"}
    over_999 = [{**AIME[0], "answer": 1000}, AIME[1]]
    assert {p["layout"] for p in load_problems(over_999)} == {"math"}
    as_ints = [{**row, "answer": int(row["answer"])} for row in AIME]
    problems = load_problems(as_ints)
    assert [(p["layout"], p["answer"], p["id"]) for p in problems] == [
        ("aime", "204", 60),
        ("aime", "113", 61),
    ]


def test_ours_is_read_as_before_numbers_as_strings_other_fields_kept():
    rows = [{"prompt": "1+1=", "answer": 2, "id": "a"}, {"prompt": [5, 6, 7], "answer": "x"}]
    assert load_problems(rows) == [
        {"prompt": "1+1=", "answer": "2", "id": "a", "layout": "prompt_answer"},
        {"prompt": [5, 6, 7], "answer": "x", "layout": "prompt_answer"},
    ]


def test_a_mapping_of_sets_in_different_layouts_names_each_source(tmp_path):
    gsm8k = write_jsonl(GSM8K, tmp_path / "gsm8k.jsonl")
    datasets.Dataset.from_list(VERL).to_parquet(tmp_path / "verl.parquet")
    problems = load_problems(
        {
            "gsm8k": gsm8k,
            "math500": datasets.Dataset.from_list(MATH_500),
            "aime": datasets.DatasetDict({"train": datasets.Dataset.from_list(AIME)}),
            "verl": tmp_path / "verl.parquet",
        },
        split="train",
    )
    assert [(p["source"], p["layout"], p["answer"]) for p in problems] == [
        ("gsm8k", "gsm8k", "72"),
        ("math500", "math", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("aime", "aime", "204"),
        ("verl", "verl", "72"),  # the mapping's name wins over data_source
        ("gsm8k", "gsm8k", "1234"),
        ("math500", "math", "3"),
        ("aime", "aime", "113"),
        ("verl", "verl", "\\frac{1}{2}"),
    ]
    assert problems[3]["data_source"] == "openai/gsm8k"


def test_sets_are_interleaved_in_proportion_and_the_subset_is_seeded():
    """Ported from the callback tests of `_read_problems` / `_subset`."""
    diffs = [{"prompt": f"{a}-{b}=", "answer": str((a - b) % 10)} for a, b in EVAL_PAIRS[6:12]]
    sets = {"sums": toy_problems(6), "diffs": diffs}
    together = load_problems(sets)
    assert [p["source"] for p in together] == ["sums", "diffs"] * 6
    assert [p["prompt"] for p in together[::2]] == [p["prompt"] for p in sets["sums"]]
    uneven = load_problems({"a": sets["sums"][:2], "b": sets["diffs"]})
    assert [p["source"] for p in uneven] == ["b", "a", "b", "b", "b", "a", "b", "b"]

    first = subset_problems(together, 5, seed=3)
    assert first == subset_problems(together, 5, seed=3) and len(first) == 5
    assert first != subset_problems(together, 5, seed=4)
    assert first == [p for p in together if p in first]  # order kept
    assert subset_problems(together, None, seed=3) is together
    assert subset_problems(together, 100, seed=3) is together
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_problems must be None or an int >= 1"):
            subset_problems(together, bad, seed=3)


def test_instruction_goes_after_or_before_text_and_into_the_last_user_message():
    after = load_problems(GSM8K[:1], instruction=STEP_BY_STEP)
    assert after[0]["prompt"] == GSM8K[0]["question"] + "\n" + STEP_BY_STEP
    assert after[0]["question"] == GSM8K[0]["question"]  # the original column is kept
    before = load_problems(MATH, instruction="Solve:", instruction_position="before")
    assert [p["prompt"] for p in before] == [f"Solve:\n{row['problem']}" for row in MATH]

    follow_up = [{"role": "assistant", "content": "Hm."}, {"role": "user", "content": "Go on."}]
    chat = [{**VERL[0], "prompt": [*VERL[0]["prompt"], *follow_up]}]
    messages = load_problems(chat, instruction=STEP_BY_STEP)[0]["prompt"]
    assert messages == [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 6*12?"},
        {"role": "assistant", "content": "Hm."},
        {"role": "user", "content": "Go on.\n" + STEP_BY_STEP},
    ]
    assert load_problems(VERL[:1], instruction="Think.")[0]["prompt"][1] == {
        "role": "user",
        "content": "What is 6*12?\nThink.",
    }
    assert chat[0]["prompt"][3]["content"] == "Go on."  # the input is left untouched

    with pytest.raises(ValueError, match="problem 0: instruction= needs text or chat-message"):
        load_problems([{"prompt": [1, 2], "answer": "3"}], instruction="Think.")
    system_only = [{**VERL[0], "prompt": VERL[0]["prompt"][:1]}]
    with pytest.raises(ValueError, match="instruction= needs a user message"):
        load_problems(system_only, instruction="Think.")
    with pytest.raises(ValueError, match="instruction_position must be one of"):
        load_problems(GSM8K, instruction="Think.", instruction_position="middle")


@pytest.fixture
def chat_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_messages_always_go_through_the_template_and_text_when_asked(chat_tokenizer):
    problems = load_problems(
        {"verl": VERL[:1], "toy": toy_problems(1)},
        instruction="Think.",
        instruction_position="after",
    )
    as_text = [
        "system: You are a careful solver.\nuser: What is 6*12?\nThink.\nassistant: ",
        f"user: {toy_problems(1)[0]['prompt']}\nThink.\nassistant: ",
    ]
    ids = [chat_tokenizer(text)["input_ids"] for text in as_text]

    plain = format_prompts(problems, chat_tokenizer, apply_chat_template=False)
    assert [p["prompt"] for p in plain] == [ids[0], problems[1]["prompt"]]
    wrapped = format_prompts(problems, chat_tokenizer, apply_chat_template=True)
    assert [p["prompt"] for p in wrapped] == ids
    assert [p["answer"] for p in wrapped] == ["72", toy_problems(1)[0]["answer"]]
    assert check_problems(wrapped) == wrapped  # what evaluate() receives is valid

    no_template = char_tokenizer()
    with pytest.raises(ValueError, match="problem 0 has a chat-message prompt, but the tokenizer"):
        format_prompts(problems, no_template, apply_chat_template=False)
    text_only = load_problems(toy_problems(2))
    assert format_prompts(text_only, no_template, apply_chat_template=False) == text_only
    with pytest.raises(ValueError, match="apply_chat_template=True, but the tokenizer"):
        format_prompts(text_only, no_template, apply_chat_template=True)
    with pytest.raises(ValueError, match="needs text prompts; problem 0 has ids"):
        format_prompts(wrapped, chat_tokenizer, apply_chat_template=True)


def test_chat_template_check_before_any_work():
    """Ported from the callback's constructor check (`_check_chat_template`)."""
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="has no chat_template"):
        check_chat_template(tokenizer)
    check_chat_template(tokenizer, load_problems(toy_problems(2)), apply_chat_template=False)
    with pytest.raises(ValueError, match="chat-message prompt"):
        check_chat_template(tokenizer, load_problems(VERL), apply_chat_template=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    check_chat_template(tokenizer, load_problems(VERL))


def test_named_columns_turn_detection_off():
    rows = [{"input": "2+2=", "target": 4, "question": "ignored", "answer": "#### 9"}]
    problems = load_problems(rows, prompt_key="input", answer_key="target")
    assert [(p["prompt"], p["answer"], p["layout"]) for p in problems] == [
        ("2+2=", "4", "prompt_answer")
    ]
    nested = load_problems(VERL, answer_key="reward_model.ground_truth")
    assert [p["answer"] for p in nested] == ["72", "\\frac{1}{2}"]
    with pytest.raises(ValueError, match=r"problem 0 lacks 'reward_model\.truth'"):
        load_problems(VERL, answer_key="reward_model.truth")


def test_an_unrecognised_layout_is_refused_with_its_columns_and_the_known_ones(tmp_path):
    rows = [{"query": "2+2=", "response": "4"}]
    with pytest.raises(ValueError) as error:
        load_problems(datasets.Dataset.from_list(rows))
    message = str(error.value)
    assert "unrecognised layout" in message and "['query', 'response']" in message
    for needed in ("prompt + answer", "question + answer", "problem + solution", "reward_model"):
        assert needed in message
    assert "prompt_key= and answer_key=" in message


@pytest.mark.parametrize(
    ("container", "where"),
    [("jsonl", r"set\.jsonl, line 2"), ("json", r"set\.json, row 1"), ("parquet", r"row 1")],
)
def test_errors_name_the_file_and_the_line_or_row(tmp_path, container, where):
    broken = [GSM8K[0], {**GSM8K[1], "answer": "It sells 1234 pens."}]
    source, _ = as_container(broken, container, tmp_path)
    with pytest.raises(ValueError, match=rf"{where}: a GSM8K answer must end in '#### <ref"):
        load_problems(source)


def test_bad_rows_and_files_are_refused_clearly(tmp_path):
    no_box = [{**MATH[0], "solution": "It is a/(2b)."}]
    with pytest.raises(ValueError, match=r"problem 0: no \\boxed\{...\} in the solution"):
        load_problems(no_box)
    with pytest.raises(ValueError, match=r"problems\['m'\], problem 1 lacks \['solution'\]"):
        load_problems({"m": [MATH[0], {"problem": "x"}]})
    with pytest.raises(ValueError, match="answer must be a str or a number, got \\['72'\\]"):
        load_problems([{**VERL[0], "reward_model": {"ground_truth": ["72"]}}])
    with pytest.raises(ValueError, match="prompt must be a non-empty str, token-id list or list"):
        load_problems([{"prompt": [{"role": "user"}], "answer": "1"}])

    lines = tmp_path / "array.jsonl"
    lines.write_text('{"prompt": "a", "answer": "1"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"array\.jsonl, line 3: a JSON list, not an object"):
        load_problems(lines)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"bad\.json: not JSON"):
        load_problems(tmp_path / "bad.json")
    (tmp_path / "lines.json").write_text('{"prompt": "a", "answer": "1"}\n' * 2)  # JSONL as .json
    assert len(load_problems(tmp_path / "lines.json")) == 2
    (tmp_path / "one.json").write_text('{"prompt": "a", "answer": 1}')  # read as JSONL before
    assert load_problems(tmp_path / "one.json") == [
        {"prompt": "a", "answer": "1", "layout": "prompt_answer"}
    ]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        load_problems(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="problems file not found"):
        load_problems(tmp_path / "missing.jsonl")


def test_splits_must_be_chosen_and_exist(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K)})
    with pytest.raises(ValueError, match=r"splits \['train'\], no split= was given"):
        load_problems(splits)
    with pytest.raises(ValueError, match=r"splits \['train'\], split='test'"):
        load_problems(splits, split="test")
    with pytest.raises(ValueError, match="split='test' was given, but no set has splits"):
        load_problems(GSM8K, split="test")
    (tmp_path / "splits.json").write_text(json.dumps({"train": GSM8K, "test": GSM8K}))
    with pytest.raises(ValueError, match=r"the lists \['train', 'test'\]; give split="):
        load_problems(tmp_path / "splits.json")
    (tmp_path / "data.json").write_text(json.dumps({"version": 2, "data": GSM8K}))
    assert [p["answer"] for p in load_problems(tmp_path / "data.json")] == ["72", "1234"]


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        (None, TypeError, "problems must be a list of dicts, .* got NoneType"),
        (3, TypeError, "problems must be a list of dicts, .* got int"),
        (b"x", TypeError, "got bytes"),
        ({"prompt": "1+1=", "answer": "2"}, TypeError, "problems is one problem"),
        ({"a": None}, TypeError, r"problems\['a'\] must be a list of dicts"),
        ({}, ValueError, "problems is an empty mapping"),
        ([], ValueError, "problems is empty"),
        ([{"prompt": "1+1="}], ValueError, "lacks \\['answer'\\]"),
        (["1+1="], TypeError, "problem 0 is a str, not a mapping"),
    ],
)
def test_bad_problems_are_refused_naming_problems(source, error, match):
    """Ported from the callback's constructor tests, plus wrong types."""
    with pytest.raises(error, match=match):
        load_problems(source)


@pytest.mark.parametrize("option", ["split", "prompt_key", "answer_key", "instruction"])
@pytest.mark.parametrize("value", [3, ""])
def test_bad_options_are_refused_by_name(option, value):
    with pytest.raises(TypeError, match=f"{option} must be None or a non-empty str"):
        load_problems(GSM8K, **{option: value})


def test_check_problems_takes_today_s_problems_and_chat_messages():
    """Ported from `evaluate.check_problems`: numbers become strings, fields travel along."""
    checked = check_problems([{"prompt": "1+1=", "answer": 2.5, "id": 7}])
    assert checked == [{"prompt": "1+1=", "answer": "2.5", "id": 7}]
    messages = [{"prompt": VERL[0]["prompt"], "answer": "72"}]
    assert check_problems(messages) == messages
    with pytest.raises(ValueError, match="problem 0: answer must be a str or a number"):
        check_problems([{"prompt": "x", "answer": True}])
    with pytest.raises(TypeError, match="problems must be a list"):
        check_problems({"prompt": "x", "answer": "1"})


def test_loading_a_jsonl_file_imports_neither_datasets_nor_pyarrow(tmp_path):
    path = write_jsonl(toy_problems(2), tmp_path / "toy.jsonl")
    code = (
        "import sys\nfrom wise_callback.problems import load_problems\n"
        f"assert len(load_problems({str(path)!r})) == 2\n"
        "print(sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parquet_without_pyarrow_says_which_extra_to_install(tmp_path, monkeypatch):
    datasets.Dataset.from_list(GSM8K).to_parquet(tmp_path / "set.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=r"set\.parquet: reading parquet needs pyarrow"):
        load_problems(tmp_path / "set.parquet")
