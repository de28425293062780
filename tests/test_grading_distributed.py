"""A 2-process (gloo) evaluation on a loaded machine, graded by a grader whose module takes
4 s to import in every process, with a 2 s per-item limit: nothing times out, and the records
equal a single-process evaluation's. (Before the item clock waited for the grader's load, every
item timed out here and counted as a wrong answer with none extracted.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
WORLD_SIZE = 2
PROBLEMS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a % 10)} for a in range(6)]
GRADER_MODULE = """
import time
from wise_callback.grading import Verdict

time.sleep(4)  # a training script's imports on a busy machine


def grade(completion, reference):
    return Verdict(completion, reference in completion)
"""


def run_rank(rank: int, init_file: str, folder: str) -> None:
    from wise_callback.demo.model import char_tokenizer, tiny_llama
    from wise_callback.evaluate import EvalConfig, evaluate
    from wise_callback.sampling import HFSampler, SamplingConfig

    sys.path.insert(0, folder)
    from slow_grader import grade

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tokenizer = char_tokenizer()
        model = tiny_llama(len(tokenizer), seed=1, tokenizer=tokenizer)
        config = EvalConfig(
            num_samples=3,
            sampling=SamplingConfig(max_new_tokens=4),
            grade_timeout_s=2.0,
            grade_workers=1,
            problems_per_call=1,
        )
        sampler = HFSampler(model, tokenizer, progress=False)
        arguments = dict(step=3, progress=False)
        spread = evaluate(
            model, None, PROBLEMS, sampler, grade, config,
            rank=rank, world_size=WORLD_SIZE, **arguments,
        )  # fmt: skip
        summary = {"records": spread.records()}
        if rank == 0:
            summary["alone"] = evaluate(
                model, None, PROBLEMS, HFSampler(model, tokenizer, progress=False), grade,
                config, **arguments,
            ).records()  # fmt: skip
        Path(folder, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_ddp_evaluation_with_a_slow_to_import_grader_under_cpu_load(tmp_path):
    (tmp_path / "slow_grader.py").write_text(GRADER_MODULE)
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]  # two busy cores' worth of competition
    try:
        mp.spawn(run_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert ranks[0]["records"] == ranks[1]["records"] == ranks[0]["alone"]
    (record,) = ranks[0]["records"]
    assert record["timed_out"] == 0
    assert record["mean_none_fraction"] == 0.0  # every completion got the grader's answer
    assert record["num_samples"] == 3 * len(PROBLEMS)
