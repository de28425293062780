"""FSDP2 (fully_shard, DTensor) on 2 real CPU processes over gloo: each rank captures and
interpolates its own shards, with no communication, and the result is the full interpolation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD_SIZE = 2
ALPHA = 0.3


def build(seed: int) -> nn.Module:
    """Same weights on every rank; an odd row count so shards are uneven (padding)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 5), nn.LayerNorm(5))
    model[0].requires_grad_(False)  # a frozen layer is interpolated too
    return model


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_rank(rank: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from wise_callback.weights import Snapshot, alpha_sweep, interpolate_, interpolated

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        early_full = build(seed=0)
        expected_full = build(seed=1)  # the latest weights, made into theta(ALPHA) just below
        with torch.no_grad():
            for name, param in expected_full.named_parameters():
                param.copy_(torch.lerp(early_full.get_parameter(name), param, ALPHA))
        early = shard(build(seed=0), mesh)
        latest = shard(build(seed=1), mesh)
        assert all(isinstance(p, DTensor) for p in latest.parameters())

        with CommDebugMode() as comm:
            snapshot = Snapshot.capture(early)
            local = {n: p.to_local().clone() for n, p in latest.named_parameters()}
            with interpolated(latest, snapshot, ALPHA):
                inside = {n: p.to_local().clone() for n, p in latest.named_parameters()}
            with alpha_sweep(latest, snapshot) as set_alpha:
                set_alpha(0.9)
                set_alpha(ALPHA)
                swept = {n: p.to_local().clone() for n, p in latest.named_parameters()}
            restored = {n: p.to_local().clone() for n, p in latest.named_parameters()}
            interpolate_(latest, snapshot, ALPHA)
        assert comm.get_total_counts() == 0, comm.get_comm_counts()

        for name, param in latest.named_parameters():
            assert snapshot.tensors[name].shape == param.to_local().shape  # local shards only
            assert torch.equal(restored[name], local[name]), name
            expected = distribute_tensor(
                expected_full.get_parameter(name).detach(), mesh, param.placements
            ).to_local()
            for got in (inside[name], swept[name], param.to_local()):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

        # The sharded model still runs and computes what the full interpolated model computes.
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(latest(x), expected_full(x), rtol=1e-5, atol=1e-6)
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still talks
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_local_shards_interpolate_without_communication(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(run_rank, args=(str(tmp_path / "init"),), nprocs=WORLD_SIZE, join=True)
