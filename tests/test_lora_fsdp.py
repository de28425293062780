"""A real PEFT LoRA model under FSDP2 (fully_shard, DTensor) on 2 CPU processes over gloo.

The adapter's A and B cannot be concatenated shard-locally (FSDP2 fixes parameter shapes, and each
forward needs the whole rank-2r factors), so entering the interpolation all-gathers the small
adapter tensors (A and B, early and latest: four per LoRA layer) and nothing else; the
modules_to_save lerp is shard-local. The sharded forward then equals the unsharded interpolant,
and the local shards are back bit for bit after the block. The final merge (`interpolate_`) leaves
whole rank-2r factors on every rank, and the core's save path (full_state_dict, save_merged on
rank 0) writes an adapter that reloads to the interpolant.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel

from lora_helpers import logits
from wise_callback.demo.model import tiny_llama

ALPHA = 0.3
IDS = torch.arange(4, 40).reshape(3, 12)


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def run_rank(rank: int, init_file: str, out: str, results) -> None:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from lora_helpers import lora_model, train
    from wise_callback.demo.model import char_tokenizer
    from wise_callback.outputs import save_merged
    from wise_callback.sharding import full_state_dict, reshard
    from wise_callback.weights import Snapshot, interpolate_, interpolated

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = IDS
        tokenizer = char_tokenizer()
        early = lora_model(tokenizer)
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
        with CommDebugMode() as merge_comm:
            interpolate_(latest, snapshot, ALPHA)
        merged = logits(latest, ids)
        reshard(latest)
        state = full_state_dict(latest)  # what the core saves a sharded model from
        if rank == 0:
            save_merged(latest, tokenizer, Path(out), {"alpha": ALPHA}, state)
        results[rank] = {
            "capture_comms": capture_comm.get_total_counts(),
            "comms": counts,
            "lora_layers": sum(1 for n, _ in latest.named_modules() if n.endswith("lora_A")),
            "inside_error": float((inside - expected).abs().max()),
            "after_error": float((after - reference).abs().max()),
            "moved": float((expected - reference).abs().max()),
            "restored": restored,
            "merge_comms": merge_comm.get_total_counts(),
            "merged_error": float((merged - expected).abs().max()),
            "expected": expected,
        }
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_lora_interpolation_gathers_only_the_adapter(tmp_path, tokenizer):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with mp.Manager() as manager:
        results = manager.dict()
        out = str(tmp_path / "merged")
        mp.spawn(run_rank, args=(str(tmp_path / "init"), out, results), nprocs=2, join=True)
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
        assert result["merge_comms"] == gathers
        assert result["merged_error"] < 1e-5
    base = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "merged")
    assert reloaded.peft_config["default"].r == 8
    expected = results[0]["expected"]
    torch.testing.assert_close(logits(reloaded, IDS), expected, rtol=0, atol=1e-5)
