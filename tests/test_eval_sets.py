"""Real evaluation sets end to end: three sources in three layouts in one Lightning fit (per-source
metrics logged, references as each layout defines them, graders picked per layout), and
`wise-ft eval` on a verl-style parquet file."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
from datasets import Dataset
from lightning.pytorch.loggers import CSVLogger

from callback_toy import ToyModule
from wise_callback import WiSEFTCallback
from wise_callback.cli import main
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.grading import boxed_match, graders_for, gsm8k_match, math_verify_match

GSM8K = [  # question + worked answer ending in "#### <number>"
    {"question": "1+2=", "answer": "One plus two.\n#### 3"},
    {"question": "4+5=", "answer": "Four and five make nine.\n#### 9"},
    {"question": "7+8=", "answer": "Seven plus eight is 15.\n#### 1,5"},  # odd, but commas go
]
MATH = [  # problem + solution with the reference in its last \boxed{}
    {"problem": "2+2=", "solution": "We get $\\boxed{4}$."},
    {"problem": "3+3=", "solution": "First \\boxed{5}, no: \\boxed{\\frac{12}{2}}."},
]
OURS = [{"prompt": "5+1=", "answer": "6"}, {"prompt": "0+0=", "answer": "0"}]


def test_three_sources_in_three_layouts_in_a_lightning_fit(tmp_path):
    parquet = tmp_path / "math.parquet"
    Dataset.from_list(MATH).to_parquet(str(parquet))
    module = ToyModule()
    callback = WiSEFTCallback(
        {"gsm8k": Dataset.from_list(GSM8K), "math": str(parquet), "ours": OURS},
        module.tokenizer,
        grader="auto",
        snapshot_at=1,
        eval_every_n_steps=2,
        num_samples=2,
        ks=(1, 2),
        alphas=(0.5,),
        max_new_tokens=3,
        sample_logging={"progress": False},
    )
    by_source = {}
    for problem in callback.problems:
        by_source.setdefault(problem["source"], []).append(problem)
    assert [p["answer"] for p in by_source["gsm8k"]] == ["3", "9", "15"]
    assert [p["prompt"] for p in by_source["gsm8k"]] == ["1+2=", "4+5=", "7+8="]
    assert [p["answer"] for p in by_source["math"]] == ["4", "\\frac{12}{2}"]
    assert [p["layout"] for p in callback.problems].count("gsm8k") == 3
    graders = {
        p["source"]: g
        for p, g in zip(callback.problems, graders_for(callback.problems, "auto"), strict=True)
    }
    assert graders == {"gsm8k": gsm8k_match, "math": boxed_match, "ours": math_verify_match}

    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, callbacks=[callback], logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module)
    record = callback.history[-1]
    assert record["num_problems"] == 7
    for source, count in (("gsm8k", 3), ("math", 2), ("ours", 2)):
        assert record[f"{source}/num_problems"] == count
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        logged = {k for row in csv.DictReader(handle) for k, v in row.items() if v}
    for source in ("gsm8k", "math", "ours"):
        assert f"wiseft/alpha_1.00/{source}/pass@2" in logged
        assert f"wiseft/alpha_0.50/{source}/mean_rho" in logged


def test_wise_ft_eval_reads_a_verl_parquet_file(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for seed, name in enumerate(("early", "latest")):
        model = tiny_llama(len(tokenizer), seed=seed, tokenizer=tokenizer)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{a}+{a}="}],
            "reward_model": {"style": "rule", "ground_truth": str(2 * a)},
        }
        for a in range(3)
    ]
    parquet = tmp_path / "verl.parquet"
    Dataset.from_list(rows).to_parquet(str(parquet))
    out = tmp_path / "eval.json"
    argv = ["eval", "--early", str(tmp_path / "early"), "--latest", str(tmp_path / "latest")]
    argv += ["--problems", str(parquet), "--alphas", "0.5", "--num-samples", "2"]
    argv += ["--max-new-tokens", "2", "--grader", "auto", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["alpha"] for r in records] == [0.0, 0.5, 1.0]
    assert all(r["openai/gsm8k/num_problems"] == 3 for r in records)
