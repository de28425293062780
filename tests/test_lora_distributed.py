"""Real multi-process Lightning runs of a PEFT LoRA model (tests/callback_toy.py --lora): DDP and
FSDP2 on 2 CPU processes. Each saves, through save_merged_to, an adapter of rank 2r that reloads to
the interpolant of the run's own pre-merge adapter and snapshot file."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lora_helpers import logits, lora_model
from test_callback_distributed import run_toy
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.weights import Snapshot, interpolated

pytestmark = pytest.mark.slow
IDS = torch.arange(4, 40).reshape(3, 12)
ARGS = ("--lora", "--devices", "2", "--max-steps", "8")


def reloaded_logits(out) -> torch.Tensor:
    tokenizer = char_tokenizer()
    base = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    adapter = PeftModel.from_pretrained(base, out / "merged")
    assert adapter.peft_config["default"].r == 8
    return logits(adapter, IDS)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-ddp")
    run_toy(out, *ARGS, "--strategy", "ddp")
    return out


def test_ddp_lora_run_saves_the_interpolated_adapter(ddp_run):
    out = ddp_run
    alpha = json.loads((out / "history.json").read_text())["chosen_alpha"]
    (snapshot_file,) = (out / "ckpt").glob("wiseft-snapshot-step*.safetensors")
    snapshot = Snapshot.load(snapshot_file)
    assert snapshot.lora is not None and not any("base_layer" in n for n in snapshot.tensors)
    latest = lora_model(char_tokenizer())
    loaded = latest.load_state_dict(load_file(out / "premerge.safetensors"), strict=False)
    assert not loaded.missing_keys  # (unexpected: the non-persistent rotary buffers)
    with interpolated(latest.eval(), snapshot, alpha):
        expected = logits(latest, IDS)
    torch.testing.assert_close(reloaded_logits(out), expected, rtol=0, atol=1e-5)
    finals = [load_file(out / f"final_rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])  # the ranks agree


def test_fsdp2_lora_run_saves_what_the_ddp_run_saves(ddp_run, tmp_path):
    run_toy(tmp_path, *ARGS, "--strategy", "fsdp2")
    ours, ddp = reloaded_logits(tmp_path), reloaded_logits(ddp_run)
    torch.testing.assert_close(ours, ddp, rtol=0, atol=1e-4)
    snapshots = sorted((tmp_path / "ckpt").glob("wiseft-snapshot-step*-rank*-of-2.safetensors"))
    assert len(snapshots) == 2  # one file of local shards per rank
