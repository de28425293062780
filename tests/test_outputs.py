"""save_merged_to never removes what wise-callback did not write: an existing file or a foreign
non-empty folder is refused before training; our own earlier output is replaced atomically."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest

from callback_toy import ToyModule, toy_problems
from wise_callback import WiSEFTCallback
from wise_callback.outputs import MERGE_INFO, save_merged


def fit_and_merge(tmp_path, target, max_steps=3) -> None:
    module = ToyModule()
    callback = WiSEFTCallback(
        toy_problems(2), module.tokenizer, snapshot_at=1, eval_every_n_steps=2, num_samples=2,
        alphas=(0.5,), final_alpha=0.5, max_new_tokens=2, save_merged_to=target,
        sample_logging={"progress": False},
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module)


def user_folder(tmp_path):
    """A folder holding the user's own files (a checkpoint, a snapshot, a history)."""
    folder = tmp_path / "runs"
    folder.mkdir()
    for name in ("last.ckpt", "wiseft-snapshot-step300.safetensors", "history.jsonl"):
        (folder / name).write_text(f"user data: {name}")
    return folder


def test_a_foreign_folder_is_refused_before_training_and_left_whole(tmp_path):
    folder = user_folder(tmp_path)
    before = {p.name: p.read_text() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="non-empty folder that wise-callback did not write"):
        WiSEFTCallback(toy_problems(2), save_merged_to=folder)
    assert {p.name: p.read_text() for p in folder.iterdir()} == before


def test_an_existing_file_is_refused_before_training(tmp_path):
    path = tmp_path / "merged"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is an existing file, not a folder"):
        WiSEFTCallback(toy_problems(2), save_merged_to=path)
    assert path.read_text() == "not a folder"


def test_an_empty_folder_and_our_own_output_are_written_and_replaced(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()  # empty: fine
    fit_and_merge(tmp_path, target)
    info = json.loads((target / MERGE_INFO).read_text())
    assert info["alpha"] == 0.5 and info["step"] == 3 and info["snapshot_step"] == 1
    assert (target / "model.safetensors").is_file()
    # a second run replaces our own earlier output, leaving nothing of it behind
    (target / "stale-from-first-run.txt").write_text("ours")
    fit_and_merge(tmp_path, target, max_steps=4)
    assert json.loads((target / MERGE_INFO).read_text())["step"] == 4
    assert not (target / "stale-from-first-run.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_a_folder_that_became_foreign_during_training_is_not_touched(tmp_path):
    module = ToyModule()
    target = tmp_path / "merged"
    user_folder(tmp_path).rename(target)  # appeared after the check, before the save
    before = {p.name: p.read_text() for p in target.iterdir()}
    with pytest.raises(FileExistsError, match="did not write"):
        save_merged(module.model, module.tokenizer, target, {"alpha": 0.5})
    assert {p.name: p.read_text() for p in target.iterdir()} == before


def test_a_failing_save_leaves_our_old_output_and_no_staging_folder(tmp_path):
    module = ToyModule()
    target = tmp_path / "merged"
    save_merged(module.model, module.tokenizer, target, {"alpha": 0.5})
    old = {p.name: p.read_bytes() for p in target.iterdir()}

    class Broken:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_merged(module.model, Broken(), target, {"alpha": 0.25})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
