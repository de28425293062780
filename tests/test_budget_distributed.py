"""The evaluation time budget on 2 real CPU processes (gloo): one rank is slow, yet both stop
after the same sampler call, so the gathered problems are a prefix, every rank holds the same
numbers, they equal a single-process evaluation of those problems, and the weights are back."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
WORLD_SIZE = 2
PROBLEMS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a % 10)} for a in range(7)]  # uneven


def run_rank(rank: int, init_file: str, out: str) -> None:
    from wise_callback.demo.model import char_tokenizer, tiny_llama
    from wise_callback.evaluate import EvalConfig, evaluate
    from wise_callback.grading import exact_match
    from wise_callback.sampling import HFSampler, SamplingConfig
    from wise_callback.weights import Snapshot

    class SlowOnRankOne(HFSampler):
        """A real HFSampler; rank 1 waits 0.3 s before each call (a slower machine)."""

        def sample(self, prompts, n, config):
            if rank == 1:
                time.sleep(0.3)
            return super().sample(prompts, n, config)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tokenizer = char_tokenizer()
        model = tiny_llama(len(tokenizer), seed=1, tokenizer=tokenizer)
        snapshot = Snapshot.capture(tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer))
        before = {n: t.clone() for n, t in model.state_dict().items()}
        sampling = SamplingConfig(max_new_tokens=3)
        config = EvalConfig(
            num_samples=2,
            sampling=sampling,
            grade_workers=0,
            problems_per_call=1,
            time_budget_s=1.2,
        )
        sampler = SlowOnRankOne(model, tokenizer, progress=False)
        arguments = dict(alphas=(0.5, 1.0), step=7, progress=False)
        spread = evaluate(
            model, snapshot, PROBLEMS, sampler, exact_match, config,
            rank=rank, world_size=WORLD_SIZE, **arguments,
        )  # fmt: skip
        restored = all(torch.equal(before[n], t) for n, t in model.state_dict().items())
        covered = spread.results[0].metrics["num_problems"]
        alone = evaluate(
            model, snapshot, PROBLEMS[:covered], HFSampler(model, tokenizer, progress=False),
            exact_match, replace(config, time_budget_s=None),
            **arguments,
        )  # fmt: skip
        summary = {
            "records": spread.records(),
            "alone": alone.records(),
            "restored": restored,
            "indices": [[p.index for p in r.problems] for r in spread.results],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_a_budget_stops_every_rank_after_the_same_call(tmp_path):
    mp.spawn(run_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert ranks[0]["records"] == ranks[1]["records"]
    for summary in ranks:
        assert summary["restored"]
        covered = summary["records"][0]["num_problems"]
        assert 2 <= covered < len(PROBLEMS) and covered % WORLD_SIZE == 0
        assert summary["indices"] == [list(range(covered))] * 2  # a prefix, for both alphas
        for spread, alone in zip(summary["records"], summary["alone"], strict=True):
            assert spread["num_problems_planned"] == len(PROBLEMS)
            assert alone["num_problems_planned"] == covered
            spread = {k: v for k, v in spread.items() if k != "num_problems_planned"}
            alone = {k: v for k, v in alone.items() if k != "num_problems_planned"}
            assert spread == alone
