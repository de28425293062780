"""WiSEFTTrainerCallback in real processes: SIGKILL mid-run and `resume_from_checkpoint`, and
`torchrun --nproc_per_node 2` (gloo, CPU). Each test starts `tests/hf_toy.py` as a script and
compares what the runs wrote (see that file's docstring)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import assert_same, kill_when_printed
from hf_toy import toy_options
from test_hf_callback import merged_reference
from wise_callback import Snapshot, WiSEFTTrainerCallback
from wise_callback.comparisons import PAIRED_KEYS
from wise_callback.demo.model import tiny_llama
from wise_callback.halving import evaluate_halving, first_round_samples
from wise_callback.sampling import HFSampler

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("hf_toy.py")
LAUNCH = {
    "single": [sys.executable, str(SCRIPT)],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 str(SCRIPT)],
}  # fmt: skip


def run_toy(out: Path, launch: str, *args: str, timeout: float = 300) -> None:
    command = [*LAUNCH[launch], "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run per launch, made once and shared by the tests of this module."""
    runs: dict[str, Path] = {}

    def get(launch: str) -> Path:
        if launch not in runs:
            runs[launch] = tmp_path_factory.mktemp(f"straight-{launch}")
            run_toy(runs[launch], launch)
        return runs[launch]

    return get


@pytest.mark.parametrize("launch", ["single", "torchrun"])
def test_sigkill_then_resume_from_checkpoint_gives_the_same_merge_and_history(
    tmp_path, straight_run, launch
):
    straight = straight_run(launch)
    killed = tmp_path / "killed"
    # checkpoints at steps 3, 6, 9, 12, 15; evaluations at 5, 10, 15: killed at step 11
    returncode = kill_when_printed([*LAUNCH[launch], "--out", str(killed)], "STEP 11")
    assert returncode == -signal.SIGKILL
    assert not (killed / "final_rank0.safetensors").exists()
    lost = [json.loads(line) for line in (killed / "history.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lost) == 10  # the killed run evaluated past its checkpoint
    saved = json.loads((killed / "checkpoint-9" / "trainer_state.json").read_text())
    state = json.loads(saved["stateful_callbacks"]["WiSEFTTrainerCallback"]["attributes"]["wiseft"])
    assert [r["step"] for r in state["history"]] == [4, 5]  # the state as of step 9

    run_toy(killed, launch, "--resume")
    resumed = json.loads((killed / "history.json").read_text())
    assert resumed == json.loads((straight / "history.json").read_text())
    assert [r["step"] for r in resumed["history"]] == [4, 5, 10, 15, 16, 16]
    assert (killed / "history.jsonl").read_text() == (straight / "history.jsonl").read_text()
    for rank in (0, 1) if launch == "torchrun" else (0,):
        name = f"final_rank{rank}.safetensors"
        assert_same(load_file(killed / name), load_file(straight / name))


def test_two_processes_evaluate_as_one_and_merge_on_every_rank(straight_run):
    out = straight_run("torchrun")
    final = [load_file(out / f"final_rank{r}.safetensors") for r in (0, 1)]
    assert_same(final[0], final[1])  # merged on every rank
    summary = json.loads((out / "history.json").read_text())
    premerge = load_file(out / "premerge.safetensors")
    snapshot = load_file(out / "snapshot.safetensors")
    assert_same(final[0], merged_reference(premerge, snapshot, summary["chosen_alpha"]))
    saved = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert_same(
        dict(saved.named_parameters()), {n: final[0][n] for n, _ in saved.named_parameters()}
    )

    # the final evaluation, successive halving with the problems split 4 + 2 over the ranks,
    # = one process over all 6
    callback = WiSEFTTrainerCallback(**toy_options())
    model = tiny_llama(len(callback.tokenizer), seed=0, tokenizer=callback.tokenizer)
    model.load_state_dict(premerge, strict=False)
    sampler = HFSampler(model, callback.tokenizer, progress=False)
    first = first_round_samples(
        callback.config, callback.evaluation.halving, callback.select_metric, "best"
    )
    single = evaluate_halving(
        model, Snapshot(snapshot), callback.problems, sampler, callback.grader, callback.config,
        alphas=(1.0, 0.5), first=first, select_metric=callback.select_metric, step=16,
        progress=False,
    )  # fmt: skip
    recorded = [r for r in summary["history"] if r["step"] == 16]
    assert single.records() == [  # the core adds the paired comparisons to the records
        {k: v for k, v in r.items() if k not in PAIRED_KEYS} for r in recorded
    ]


def test_the_vllm_sampler_under_the_trainer_writes_what_the_hf_sampler_writes(tmp_path):
    """Greedy decoding: vLLM (its own process: one engine per process), fed the snapshot,
    interpolated and current weights by the HF door, gives the HF sampler's records."""
    pytest.importorskip("vllm")
    options = ("--max-steps", "6", "--temperature", "0")
    run_toy(tmp_path / "vllm", "single", "--sampler", "vllm", *options)
    run_toy(tmp_path / "hf", "single", "--sampler", "hf", *options)
    vllm_run = json.loads((tmp_path / "vllm" / "history.json").read_text())
    hf_run = json.loads((tmp_path / "hf" / "history.json").read_text())
    assert [(r["step"], r["alpha"]) for r in vllm_run["history"]] == [
        (4, 0.0), (5, 1.0), (6, 0.5), (6, 1.0),
    ]  # fmt: skip
    assert (vllm_run.pop("sampler"), hf_run.pop("sampler")) == ("VLLMSampler", "HFSampler")
    assert vllm_run == hf_run
    vllm_final = load_file(tmp_path / "vllm" / "final_rank0.safetensors")
    assert_same(vllm_final, load_file(tmp_path / "hf" / "final_rank0.safetensors"))
