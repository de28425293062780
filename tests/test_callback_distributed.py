"""Real processes: SIGKILL mid-run and resume, DDP on 2 CPU processes, FSDP2 on 2 CPU processes.

Each test starts `tests/callback_toy.py` as a script (Lightning launches the second rank itself)
and compares what the runs wrote (see that file's docstring).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from callback_toy import ToyModule, toy_callback
from helpers import assert_same
from wise_callback import Snapshot, interpolate_
from wise_callback.comparisons import PAIRED_KEYS
from wise_callback.halving import evaluate_halving, first_round_samples
from wise_callback.sampling import HFSampler

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("callback_toy.py")


def run_toy(out: Path, *args: str, timeout: float = 240) -> None:
    command = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def saved_merged(out: Path) -> dict[str, torch.Tensor]:
    """The parameters of the model the callback saved with save_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    return {n: t.detach() for n, t in model.named_parameters()}


def merged_reference(premerge: dict, snapshot: dict, alpha: float) -> dict[str, torch.Tensor]:
    """What the merge must give: the pre-merge weights interpolated with the full snapshot."""
    model = ToyModule().model
    model.load_state_dict(premerge, strict=False)
    interpolate_(model, Snapshot(dict(snapshot)), alpha)
    return {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}


STRATEGIES = {"single": (), "ddp": ("--strategy", "ddp", "--devices", "2")}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run per strategy, made once and shared by the tests of this module."""
    runs: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(f"straight-{strategy}")
            run_toy(runs[strategy], *STRATEGIES[strategy])
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", ["single", "ddp"])
def test_sigkill_mid_run_then_resume_gives_the_same_merge_and_history(
    tmp_path, straight_run, strategy
):
    straight = straight_run(strategy)
    killed = tmp_path / "killed"
    command = [sys.executable, str(SCRIPT), "--out", str(killed), *STRATEGIES[strategy]]
    process = subprocess.Popen(  # its own session: the kill takes every rank, like a lost node
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:  # checkpoints at steps 3, 6, 9, 12; evaluations at 5, 10, 15
        if "STEP 11" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "final_rank0.safetensors").exists()
    lost = [json.loads(line) for line in (killed / "history.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lost) == 10  # the killed run evaluated past its checkpoint

    run_toy(killed, "--resume", *STRATEGIES[strategy])
    resumed = json.loads((killed / "history.json").read_text())
    assert resumed == json.loads((straight / "history.json").read_text())
    assert [r["step"] for r in resumed["history"]] == [4, 5, 10, 15, 16, 16]
    assert (killed / "history.jsonl").read_text() == (straight / "history.jsonl").read_text()
    ranks = (0, 1) if strategy == "ddp" else (0,)
    for rank in ranks:
        name = f"final_rank{rank}.safetensors"
        assert_same(load_file(killed / name), load_file(straight / name))


def test_ddp_two_processes_match_a_single_process_evaluation(straight_run):
    tmp_path = straight_run("ddp")
    final = [load_file(tmp_path / f"final_rank{r}.safetensors") for r in (0, 1)]
    assert_same(final[0], final[1])  # merged on every rank
    summary = json.loads((tmp_path / "history.json").read_text())
    premerge = load_file(tmp_path / "premerge.safetensors")
    snapshot = load_file(tmp_path / "snapshot_rank0.safetensors")
    assert_same(final[0], merged_reference(premerge, snapshot, summary["chosen_alpha"]))
    saved = saved_merged(tmp_path)
    assert_same(saved, {n: final[0][n] for n in saved})

    # the final evaluation, successive halving with the problems split 3 + 3 over the ranks,
    # = one process over all 6
    callback = toy_callback()
    module = ToyModule()
    module.model.load_state_dict(premerge, strict=False)
    sampler = HFSampler(module.model, callback.tokenizer, progress=False)
    first = first_round_samples(
        callback.config, callback.evaluation.halving, callback.select_metric, "best"
    )
    assert first == 1  # a quarter of 4 samples per problem
    single = evaluate_halving(
        module.model, Snapshot(snapshot), callback.problems, sampler, callback.grader,
        callback.config, alphas=(1.0, 0.5), first=first, select_metric=callback.select_metric,
        step=16, progress=False,
    )  # fmt: skip
    recorded = [r for r in summary["history"] if r["step"] == 16]
    assert single.records() == [
        {k: v for k, v in r.items() if k not in PAIRED_KEYS} for r in recorded
    ]


def test_fsdp2_two_processes_keep_snapshot_and_merge_shard_local(tmp_path):
    run_toy(tmp_path, "--strategy", "fsdp2", "--devices", "2")
    shards = [load_file(tmp_path / f"snapshot_rank{r}.safetensors") for r in (0, 1)]
    full_names = load_file(tmp_path / "premerge.safetensors")
    sharded = [n for n in shards[0] if shards[0][n].shape != full_names[n].shape]
    assert sharded, "no parameter was sharded"
    for name in sharded:  # each rank holds its own dim-0 shard only
        assert shards[0][name].shape[0] + shards[1][name].shape[0] == full_names[name].shape[0]
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("wiseft-snapshot-*"))
    assert files == [f"wiseft-snapshot-step4-rank{r}-of-2.safetensors" for r in (0, 1)]

    snapshot = {  # buffers are replicated, parameters sharded
        n: torch.cat([shards[0][n], shards[1][n]]) if n in sharded else shards[0][n]
        for n in shards[0]
    }
    final = [load_file(tmp_path / f"final_rank{r}.safetensors") for r in (0, 1)]
    assert_same(final[0], final[1])
    summary = json.loads((tmp_path / "history.json").read_text())
    expected = merged_reference(full_names, snapshot, summary["chosen_alpha"])
    assert_same(final[0], expected)
    saved = saved_merged(tmp_path)  # gathered from the shards into one save_pretrained folder
    assert_same(saved, {n: final[0][n] for n in saved})
    assert [(r["step"], r["alpha"]) for r in summary["history"]] == [
        (4, 0.0), (5, 1.0), (10, 1.0), (15, 1.0), (16, 0.5), (16, 1.0),
    ]  # fmt: skip
