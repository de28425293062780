"""The TRL example cannot run here (no GPU, no hub), but its pieces work: its rows, problems,
config and callback drive a real tiny SFTTrainer run (the HF sampler standing in for vLLM)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from datasets import Dataset

from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.grading import math_verify_match

EXAMPLE = Path(__file__).parents[1] / "examples" / "trl_sft_gsm8k.py"
GSM8K_LIKE = [  # GSM8K's layout: the reasoning, then "#### answer" (commas in large numbers)
    {
        "question": f"Tom has {a} apples and buys {b}. How many?",
        "answer": f"{a}+{b}={a + b}\n#### {a + b:,}",
    }
    for a, b in ((2, 3), (1200, 34), (5, 5), (7, 1))
]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("trl_sft_gsm8k", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_and_problems_agree_and_grade_correct(example):
    row = example.sft_row(GSM8K_LIKE[1])
    assert row["prompt"][0]["content"].endswith(example.INSTRUCTION)
    completion = row["completion"][0]["content"]
    assert completion.endswith("\\boxed{1234}.")
    problems = example.eval_problems(GSM8K_LIKE, 3)
    assert [p["answer"] for p in problems] == ["5", "1234", "10"]
    assert problems[1]["prompt"] == row["prompt"][0]["content"]
    assert math_verify_match(completion, problems[1]["answer"]).correct


def test_the_example_config_and_callback_run_a_tiny_sft_trainer(example, tmp_path):
    from trl import SFTTrainer

    pytest.importorskip("math_verify")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    args = example.parse(["--out", str(tmp_path), "--max-steps", "4", "--eval-steps", "2",
                          "--batch-size", "2", "--no-bf16"])  # fmt: skip
    config = example.make_config(args)
    config.report_to, config.use_cpu = [], True
    rows = Dataset.from_list([example.sft_row(r) for r in GSM8K_LIKE])
    callback = example.make_callback(
        example.eval_problems(GSM8K_LIKE, 2), str(tmp_path), sampler="hf", max_new_tokens=4
    )
    trainer = SFTTrainer(
        model=tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer), args=config,
        train_dataset=rows, eval_dataset=rows, processing_class=tokenizer, callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert [(r["step"], r["alpha"]) for r in callback.history][:1] == [(1, 0.0)]  # 0.1 of 4
    assert sorted({r["step"] for r in callback.history}) == [1, 2, 4]
    scores = {s: max(r["pass@16"] for r in callback.history if r["step"] == s) for s in (2, 4)}
    best = min(s for s in scores if scores[s] == max(scores.values()))
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    assert (tmp_path / "merged" / "wiseft_merge.json").is_file()


def test_example_cli_help_needs_no_gpu(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    assert "--eval-steps" in capsys.readouterr().out
