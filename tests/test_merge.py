"""Offline merge (`wise-ft merge`) of real tiny Llama folders written by save_pretrained."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from wise_callback.cli import main
from wise_callback.demo.model import tiny_llama
from wise_callback.weights import Snapshot, interpolate_, interpolated

SHARD = "60KB"  # the tiny Llama (~170 KB) then spans several shards


@pytest.fixture
def folders(tmp_path, tokenizer):
    """EARLY sharded one way, LATEST sharded another, both real save_pretrained output."""
    early = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    latest = tiny_llama(len(tokenizer), seed=1, tokenizer=tokenizer)
    early.save_pretrained(tmp_path / "early", max_shard_size="90KB")
    latest.save_pretrained(tmp_path / "latest", max_shard_size=SHARD)
    tokenizer.save_pretrained(tmp_path / "latest")
    (tmp_path / "latest" / "NOTES.md").write_text("trained for 300 steps\n")
    torch.save({"step": 300}, tmp_path / "latest" / "optimizer.pt")  # training state: a pickle
    return early, latest, tmp_path


def merge(*args: object) -> None:
    assert main(["merge", *map(str, args), "--quiet"]) == 0


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("chunk_bytes", [None, 1002], ids=["whole", "tensors-split-in-chunks"])
def test_sharded_merge_equals_in_memory_interpolation(folders, monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr("wise_callback.merge.CHUNK_BYTES", chunk_bytes)
    early, latest, tmp = folders
    merge(tmp / "early", tmp / "latest", "--alpha", 0.3, "--out", tmp / "out")
    out = tmp / "out"

    # Sharded like LATEST (same files, same index), LATEST's other files kept byte for byte,
    # except pickles.
    latest_files = sorted(p.name for p in (tmp / "latest").iterdir() if p.suffix != ".pt")
    assert sorted(p.name for p in out.iterdir()) == latest_files
    shards = [n for n in latest_files if n.endswith(".safetensors")]
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    latest_index = json.loads((tmp / "latest" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == latest_index["weight_map"]
    for name in ("config.json", "tokenizer.json", "NOTES.md"):
        assert (out / name).read_bytes() == (tmp / "latest" / name).read_bytes()
    assert leftovers(tmp) == []

    merged = AutoModelForCausalLM.from_pretrained(out)
    snapshot = Snapshot.capture(early)
    with interpolated(latest, snapshot, 0.3):  # the same single lerp per element: bit-exact
        for name, tensor in latest.state_dict().items():
            assert torch.equal(merged.state_dict()[name], tensor), name
    interpolate_(latest, snapshot, 0.3)
    for name, tensor in latest.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=1e-6)
    on_disk = {}
    for shard in shards:
        on_disk.update(load_file(out / shard))
    assert on_disk.keys() == latest.state_dict().keys()


def test_single_file_and_low_precision_early(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("wise_callback.merge.CHUNK_BYTES", 1002)  # chunks across dtypes
    early = tiny_llama(len(tokenizer), seed=0).to(torch.bfloat16)
    latest = tiny_llama(len(tokenizer), seed=1)
    early.save_pretrained(tmp_path / "early", max_shard_size=SHARD)
    latest.save_pretrained(tmp_path / "latest")
    assert (tmp_path / "latest" / "model.safetensors").is_file()
    merge(tmp_path / "early", tmp_path / "latest", "--alpha", 0.5, "--out", tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    for name, tensor in latest.state_dict().items():
        expected = torch.lerp(early.state_dict()[name].float(), tensor, 0.5)
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], expected), name


def test_existing_output_needs_force(folders):
    _, _, tmp = folders
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        merge(tmp / "early", tmp / "latest", "--alpha", 0.5, "--out", out)
    assert exit_info.value.code == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge(tmp / "early", tmp / "latest", "--alpha", 0.5, "--out", out, "--force")
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors.index.json").is_file()
    assert leftovers(tmp) == []


def test_pickled_weights_only_on_request(tmp_path, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr("wise_callback.merge.CHUNK_BYTES", 1002)
    for seed, name in ((0, "early"), (1, "latest")):
        model = tiny_llama(len(tokenizer), seed=seed)
        model.config.save_pretrained(tmp_path / name)
        torch.save(model.state_dict(), tmp_path / name / "pytorch_model.bin")
    args = (tmp_path / "early", tmp_path / "latest", "--alpha", 0.5, "--out", tmp_path / "out")
    with pytest.raises(SystemExit):
        merge(*args)
    assert "--allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    merge(*args, "--allow-pickle")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    early_state = torch.load(tmp_path / "early" / "pytorch_model.bin", weights_only=True)
    latest_state = torch.load(tmp_path / "latest" / "pytorch_model.bin", weights_only=True)
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, torch.lerp(early_state[name], latest_state[name], 0.5)), name


def run_cli_error(capsys, *args: object) -> str:
    with pytest.raises(SystemExit) as exit_info:
        merge(*args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_mismatched_checkpoints_are_refused_before_writing(tmp_path, tokenizer, capsys):
    tiny_llama(len(tokenizer), seed=0).save_pretrained(tmp_path / "base")
    tiny_llama(len(tokenizer), num_layers=3).save_pretrained(tmp_path / "deeper")
    tiny_llama(len(tokenizer), hidden_size=96).save_pretrained(tmp_path / "wider")
    out = tmp_path / "out"

    err = run_cli_error(
        capsys, tmp_path / "base", tmp_path / "deeper", "--alpha", 0.5, "--out", out
    )
    assert "only in LATEST" in err and "model.layers.2.mlp.down_proj.weight" in err
    err = run_cli_error(capsys, tmp_path / "base", tmp_path / "wider", "--alpha", 0.5, "--out", out)
    assert "shape mismatch for lm_head.weight: EARLY has (100, 64), LATEST has (100, 96)" in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("alpha", ["nan", "1.5", "-0.2"])
def test_bad_alpha_is_refused(folders, capsys, alpha):
    _, _, tmp = folders
    err = run_cli_error(capsys, tmp / "early", tmp / "latest", "--alpha", alpha, "--out", tmp / "o")
    assert "alpha" in err
    assert not (tmp / "o").exists()


def test_bad_folders_are_refused(folders, capsys):
    _, _, tmp = folders
    err = run_cli_error(capsys, tmp / "nowhere", tmp / "latest", "--alpha", 0.5, "--out", tmp / "o")
    assert "not found" in err and "nowhere" in err
    (tmp / "empty").mkdir()
    err = run_cli_error(capsys, tmp / "empty", tmp / "latest", "--alpha", 0.5, "--out", tmp / "o")
    assert "no model weights" in err
    err = run_cli_error(
        capsys, tmp / "early", tmp / "latest", "--alpha", 0.5, "--out", tmp / "latest"
    )
    assert "is the input folder" in err
    shard = next((tmp / "early").glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: caught from its header, up front
    err = run_cli_error(capsys, tmp / "early", tmp / "latest", "--alpha", 0.5, "--out", tmp / "o")
    assert "truncated" in err and shard.name in err
    assert not (tmp / "o").exists() and leftovers(tmp) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_merge_leaves_no_output(tmp_path, tokenizer, sig):
    """A real `wise-ft merge` process interrupted while writing: OUT_DIR never appears."""
    for seed, name in ((0, "early"), (1, "latest")):
        model = tiny_llama(len(tokenizer), hidden_size=256, num_layers=6, head_dim=64, seed=seed)
        model.save_pretrained(tmp_path / name, max_shard_size="1MB")  # ~20 MB in ~20 shards
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wise_callback.cli", "merge", "--quiet", "--alpha", "0.5"]
    for _attempt in range(5):  # on a fast, idle machine the merge can finish before the signal
        process = subprocess.Popen(
            [*command, str(tmp_path / "early"), str(tmp_path / "latest"), "--out", str(out)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stderr=subprocess.PIPE,
            text=True,
            # a shell that starts CI in the background ignores SIGINT, and children inherit that
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob(".out.tmp-*/model-*.safetensors")):  # it is writing shards
            assert process.poll() is None, "merge ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
        if process.returncode != 0:
            break
        shutil.rmtree(out)  # it completed first: that run says nothing, interrupt another
    assert process.returncode != 0
    assert not out.exists()
    if sig == signal.SIGINT:  # a clean interruption also removes its temporary folder
        assert "interrupted" in err
        assert leftovers(tmp_path) == []
