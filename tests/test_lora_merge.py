"""`wise-ft merge` of two real PEFT LoRA adapter folders: the written adapter (rank 2r) reloads
with PeftModel.from_pretrained and computes what the in-memory interpolant computes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from lora_helpers import TARGETS, logits, lora_model, train
from wise_callback.cli import main
from wise_callback.demo.model import tiny_llama
from wise_callback.weights import Snapshot, interpolated

IDS = torch.arange(4, 40).reshape(3, 12)


VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "embedding-lora": {"target_modules": [*TARGETS, "embed_tokens"]},
}


@pytest.fixture(params=list(VARIANTS))
def folders(request, tokenizer, tmp_path):
    """EARLY and LATEST adapter folders saved from one run, and its in-memory interpolant."""
    model = lora_model(tokenizer, **VARIANTS[request.param])
    train(model, seed=1)
    model.save_pretrained(tmp_path / "early")
    snapshot = Snapshot.capture(model)
    train(model, seed=2)
    model.save_pretrained(tmp_path / "latest")
    (tmp_path / "latest" / "notes.txt").write_text("kept")
    with interpolated(model, snapshot, 0.3):
        expected = logits(model, IDS)
    return tmp_path / "early", tmp_path / "latest", expected


def reload(tokenizer, folder) -> PeftModel:
    return PeftModel.from_pretrained(
        tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer), folder
    )


def test_merged_adapter_reloads_to_the_interpolant(folders, tokenizer, tmp_path):
    early, latest, expected = folders
    out = tmp_path / "merged"
    assert main(["merge", str(early), str(latest), "--alpha", "0.3", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert (out / "notes.txt").read_text() == "kept"
    merged = reload(tokenizer, out)
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(reload(tokenizer, latest), IDS), expected, atol=1e-3)


def test_bad_adapter_input_is_refused_before_writing(folders, tokenizer, tmp_path, capsys):
    early, latest, _ = folders
    other = lora_model(tokenizer, r=2)
    other.save_pretrained(tmp_path / "other")
    out = tmp_path / "merged"
    args = ["--alpha", "0.3", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(early), str(tmp_path / "other"), *args])
    assert exit_info.value.code == 2
    assert "LoRA settings differ: r (4 in" in capsys.readouterr().err
    full = tmp_path / "full"
    tiny_llama(len(tokenizer), seed=0).save_pretrained(full)
    with pytest.raises(SystemExit):
        main(["merge", str(full), str(latest), *args])
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    out.mkdir()
    with pytest.raises(SystemExit):
        main(["merge", str(early), str(latest), *args])
    assert "already exists" in capsys.readouterr().err
    assert not any(out.iterdir())
