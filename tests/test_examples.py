"""The GPU example cannot run here (no GPU, no hub), but it imports and its pieces work: its
FSDP2 sharding runs on 2 real CPU processes with a tiny local model in place of the hub's."""

import importlib.util
import os
import socket
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.multiprocessing as mp

from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.demo.sft import collate
from wise_callback.grading import math_verify_match

EXAMPLE = Path(__file__).parents[1] / "examples" / "sft_gsm8k.py"
WORLD_SIZE = 2


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sft_gsm8k", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


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


def shard_and_train_one_step(rank: int, model_dir: str, port: int) -> None:
    """One rank of the example's own FSDP2 set-up (its strategy and `configure_model`) under a
    real Lightning Trainer on CPU, checked after a training step."""
    import lightning as L
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    # Lightning sees a launched process group member (LOCAL_RANK set) and starts no processes.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0")
    os.environ.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    example = load_example()
    module = example.SFTModule(model_dir, lr=1e-3)
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(4)]
    data = DataLoader(rows, batch_size=2, collate_fn=partial(collate, char_tokenizer()))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=example.fsdp2_strategy(WORLD_SIZE),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=data)

    params = dict(module.model.named_parameters())
    for name, param in params.items():
        assert isinstance(param, DTensor), name
        assert param.placements == (Shard(0),), (name, param.placements)
        assert param.device_mesh.ndim == 1 and param.device_mesh.size() == WORLD_SIZE, name
    total = sum(p.numel() for p in params.values())
    local = sum(p.to_local().numel() for p in params.values())
    # Half of every tensor, but for the one extra row of an odd first dimension.
    odd_rows = sum(p.numel() // p.shape[0] for p in params.values() if p.shape[0] % 2)
    assert abs(local - total / WORLD_SIZE) <= odd_rows / 2, (local, total)
    both = torch.tensor(local)
    dist.all_reduce(both)
    assert both.item() == total  # the two shards hold every parameter exactly once
    dist.barrier()  # no rank tears gloo down while its peer still talks


@pytest.mark.slow
def test_example_fsdp2_shards_the_model_over_data_parallel_ranks(tmp_path, tokenizer):
    # hidden size 96 and 3 layers give no special alignment; the model is saved like a hub one
    model = tiny_llama(len(tokenizer), hidden_size=96, num_layers=3, seed=0, tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "model")
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(
        shard_and_train_one_step,
        args=(str(tmp_path / "model"), port),
        nprocs=WORLD_SIZE,
        join=True,
    )
