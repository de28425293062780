"""A real PEFT LoRA model under FSDP2 (fully_shard, DTensor) on 2 CPU processes over gloo.

The adapter's A and B cannot be concatenated shard-locally (FSDP2 fixes parameter shapes, and each
forward needs the whole rank-2r factors), so entering the interpolation all-gathers the small
adapter tensors (A and B, early and latest: four per LoRA layer) and nothing else; the
modules_to_save lerp is shard-local. The sharded forward then equals the unsharded interpolant,
and the local shards are back bit for bit after the block.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ALPHA = 0.3


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def run_rank(rank: int, init_file: str, results) -> None:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from lora_helpers import logits, lora_model, train
    from wise_callback.demo.model import char_tokenizer
    from wise_callback.sharding import reshard
    from wise_callback.weights import Snapshot, interpolate_, interpolated

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = torch.arange(4, 40).reshape(3, 12)
        early = lora_model(char_tokenizer())
        train(early, seed=1)
        latest = copy.deepcopy(early)
        train(latest, seed=2)
        with interpolated(latest, Snapshot.capture(early), ALPHA):
            expected = logits(latest, ids)
        reference = logits(latest, ids)
        for model in (early, latest):
            shard(model)
        factors = [p for n, p in latest.named_parameters() if "lora_" in n]
        assert factors and all(isinstance(p, DTensor) for p in factors)
        with CommDebugMode() as capture_comm:
            snapshot = Snapshot.capture(early)  # this rank's shards only
        local = {n: p.to_local().clone() for n, p in latest.named_parameters()}
        with CommDebugMode() as comm, interpolated(latest, snapshot, ALPHA):
            counts = {str(k): v for k, v in comm.get_comm_counts().items()}
            inside = logits(latest, ids)
            reshard(latest)
        after = logits(latest, ids)
        reshard(latest)
        restored = all(torch.equal(p.to_local(), local[n]) for n, p in latest.named_parameters())
        try:
            interpolate_(latest, snapshot, ALPHA)
            refused = ""
        except ValueError as error:
            refused = str(error)
        results[rank] = {
            "capture_comms": capture_comm.get_total_counts(),
            "comms": counts,
            "lora_layers": sum(1 for n, _ in latest.named_modules() if n.endswith("lora_A")),
            "inside_error": float((inside - expected).abs().max()),
            "after_error": float((after - reference).abs().max()),
            "moved": float((expected - reference).abs().max()),
            "restored": restored,
            "refused": refused,
        }
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_lora_interpolation_gathers_only_the_adapter(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(run_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    for rank in range(2):
        result = results[rank]
        assert result["capture_comms"] == 0
        gathers = 4 * result["lora_layers"]  # A and B, early and latest, of each layer
        assert sum(result["comms"].values()) == gathers, result["comms"]
        assert all("all_gather" in kind for kind in result["comms"]), result["comms"]
        assert result["moved"] > 1e-3
        assert result["inside_error"] < 1e-5 and result["after_error"] < 1e-5, result
        assert result["restored"]
        assert "FSDP2" in result["refused"]
