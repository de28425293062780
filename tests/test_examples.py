"""The GPU example cannot run here (no GPU, no hub), but it imports and its pieces work."""

import importlib.util
from pathlib import Path

import pytest

from wise_callback.demo.sft import collate
from wise_callback.grading import math_verify_match

EXAMPLE = Path(__file__).parents[1] / "examples" / "sft_gsm8k.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sft_gsm8k", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gsm8k_targets_are_boxed_and_graded_correct(example, tokenizer):
    completion, answer = example.gsm8k_completion(
        "She sells 2 * 536 = <<2*536=1072>>1072.\n#### 1,072"
    )
    assert answer == "1072"
    assert completion.endswith("\\boxed{1072}.")
    assert math_verify_match(completion, answer).correct
    batch = collate(tokenizer, [{"prompt": "Q: 1+1?\n", "completion": completion}])
    trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tokenizer.decode(trained[:-1]) == completion
    assert trained[-1] == tokenizer.eos_token_id


def test_example_cli_help_needs_no_gpu(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    assert "--devices" in capsys.readouterr().out
