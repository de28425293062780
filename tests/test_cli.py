"""`wise-ft eval` and `wise-ft plot` run for real on tiny saved checkpoints."""

import json

import pytest

from wise_callback.cli import main
from wise_callback.demo.model import tiny_llama
from wise_callback.evaluate import EvalConfig, evaluate
from wise_callback.grading import exact_match
from wise_callback.problems import load_problems
from wise_callback.sampling import HFSampler, SamplingConfig


@pytest.fixture
def checkpoints(tmp_path, tokenizer):
    folders = {}
    for seed, name in enumerate(("early", "latest")):
        model = tiny_llama(len(tokenizer), seed=seed, tokenizer=tokenizer)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    problems = tmp_path / "problems.jsonl"
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(5)]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folders["early"], folders["latest"], problems


def test_eval_scores_the_grid_and_alpha_zero_is_the_early_checkpoint(
    tmp_path, checkpoints, tokenizer, capsys
):
    early, latest, problems = checkpoints
    out = tmp_path / "eval.json"
    argv = ["eval", "--early", str(early), "--latest", str(latest), "--problems", str(problems)]
    argv += ["--alphas", "0.5", "--num-samples", "4", "--max-new-tokens", "4", "--grader"]
    argv += ["exact", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "WiSE-FT a=0.50" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert [r["alpha"] for r in records] == [0.0, 0.5, 1.0]

    # alpha = 0 through the snapshot of EARLY must equal sampling EARLY itself, number for number
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(early)
    config = EvalConfig(num_samples=4, sampling=SamplingConfig(max_new_tokens=4, seed=0))
    direct = evaluate(
        model,
        None,
        load_problems(problems),
        HFSampler(model, tokenizer, progress=False),
        exact_match,
        config,
        step=0,
        progress=False,
    ).records()[0]
    assert {**direct, "alpha": 0.0} == records[0]


def test_eval_refuses_missing_folder_with_a_clear_message(tmp_path, checkpoints, capsys):
    _, latest, problems = checkpoints
    argv = ["eval", "--early", str(tmp_path / "nope"), "--latest", str(latest)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--problems", str(problems)])
    assert exit_info.value.code == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_plot_redraws_report_from_history(tmp_path, checkpoints, capsys):
    early, latest, problems = checkpoints
    out = tmp_path / "eval.json"
    argv = ["eval", "--early", str(early), "--latest", str(latest), "--problems", str(problems)]
    argv += ["--alphas", "0.5", "--num-samples", "2", "--max-new-tokens", "2", "--grader"]
    assert main([*argv, "exact", "--out", str(out), "--quiet"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    records = json.loads(out.read_text())["records"]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(run)]) == 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "pass@2" in capsys.readouterr().out
