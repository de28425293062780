"""The torchmetrics classes on 2 real gloo processes, each over its own (uneven) part of the
problems, give exactly the numbers one process gets over all of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
KS = [1, 2, 4, 8]


def problems() -> dict:
    """Synthetic graded samples of 13 problems (n = 8): answers, verdicts, scores, counts."""
    rng = np.random.default_rng(7)
    answers, correct, scores = [], [], []
    for _ in range(13):
        picks = rng.integers(0, 4, size=8)
        answers.append([None if p == 3 else f"a{p}" for p in picks])
        correct.append([bool(p == 0) for p in picks])
        scores.append(rng.integers(0, 3, size=8).astype(float).tolist())
    n = [8] * 13
    c = [sum(row) for row in correct]
    return {"answers": answers, "correct": correct, "scores": scores, "n": n, "c": c}


def metric_values(parts: list[list[int]], partial_parts: list[list[int]]) -> dict[str, dict]:
    """Update fresh metrics batch by batch over the problem index lists `parts`, and one more
    CollapseStats over `partial_parts` only (empty on a rank: that rank has no data), then compute.
    """
    from wise_callback.metrics import BestAtK, CollapseStats, MajorityAtK, PassAtK

    data = problems()
    passes, majority, best, stats = PassAtK(KS), MajorityAtK(KS), BestAtK(KS), CollapseStats(KS)
    partial = CollapseStats(KS)
    for part in parts:
        batch = {key: [rows[i] for i in part] for key, rows in data.items()}
        passes.update(batch["n"], batch["c"])
        majority.update(batch["answers"], batch["correct"])
        best.update(batch["scores"], batch["correct"])
        stats.update(batch["n"], batch["c"])
    for part in partial_parts:
        partial.update([data["n"][i] for i in part], [data["c"][i] for i in part])
    values = {}
    for name, metric in (("pass", passes), ("maj", majority), ("best", best)):
        values[name] = {key: value.item() for key, value in metric.compute().items()}
    for name, metric in (("collapse", stats), ("collapse_partial", partial)):
        summary = metric.compute()
        values[name] = {**summary.scalars(), "rho_histogram": summary.rho_histogram.tolist()}
    return values


RANK_PARTS = {0: [[0, 1, 2, 3, 4], [5, 6, 7, 8]], 1: [[9, 10, 11, 12]]}  # uneven, 2 batches vs 1


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        partial_parts = RANK_PARTS[0] if rank == 0 else []
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(metric_values(RANK_PARTS[rank], partial_parts), f)
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still talks
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process_exactly(tmp_path):
    mp.spawn(run_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE)
    everything = [list(range(13))]
    single = metric_values(everything, RANK_PARTS[0])
    assert set(single["maj"]) == {f"maj@{k}" for k in KS}
    for rank in range(WORLD_SIZE):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == single  # every number bit for bit (JSON keeps float64 exactly)
