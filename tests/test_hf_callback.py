"""WiSEFTTrainerCallback under a real transformers Trainer and a real TRL SFTTrainer (tiny Llama,
the toy sum task of hf_toy.py; fast in-process tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

from helpers import assert_same, weights
from hf_toy import WeightRecorder, toy_arguments, toy_options, toy_train_set, toy_trainer
from test_callback import NoisyLabels
from wise_callback import Snapshot, WiSEFTTrainerCallback, interpolate_
from wise_callback.demo.model import char_tokenizer, tiny_llama

GRID_STEPS = [(4, 0.0), (5, 1.0), (10, 1.0), (12, 0.5), (12, 1.0)]
"""The default schedule: the early checkpoint, the current weights, the grid at the end."""


def merged_reference(last: dict, snapshot: dict, alpha: float) -> dict[str, torch.Tensor]:
    """The fixed-alpha WiSE-FT merge of two recorded sets of weights."""
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    model.load_state_dict(last, strict=False)
    interpolate_(model, Snapshot(dict(snapshot)), alpha)
    return weights(model)


def logged_wiseft(log_history: list[dict]) -> dict[int, dict[str, float]]:
    """The entries of the Trainer's log history that hold our metrics, by step."""
    out: dict[int, dict[str, float]] = {}
    for entry in log_history:
        ours = {k: v for k, v in entry.items() if k.startswith("wiseft/")}
        if ours:
            out.setdefault(entry["step"], {}).update(ours)
    return out


@pytest.mark.parametrize("trl", [False, True], ids=["Trainer", "SFTTrainer"])
def test_records_merge_and_logs_through_the_trainer(tmp_path, trl):
    callback = WiSEFTTrainerCallback(**toy_options(final_alpha=0.25, tokenizer=None))
    recorder = WeightRecorder(steps=(4, 12))
    config = toy_arguments(tmp_path, max_steps=12, report_to=["tensorboard"])
    if trl:
        from trl import SFTConfig

        config = SFTConfig(**config.to_dict())
    dataset = None
    if trl:  # SFTTrainer's own data path: a tokenized datasets.Dataset, its collator
        rows = toy_train_set(char_tokenizer())
        dataset = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in rows])
    kwargs = {"train_dataset": dataset} if trl else {}
    trainer = toy_trainer(config, [recorder, callback], trl=trl, **kwargs)
    trainer.train()

    # records: alpha 0 once (the snapshot), then the grid and 1.0; the last step evaluated
    assert [(r["step"], r["alpha"]) for r in callback.history] == GRID_STEPS
    assert callback.tokenizer is trainer.processing_class
    # the final weights: the fixed-alpha merge of the recorded snapshot-step and last-step weights
    assert callback.chosen_alpha == 0.25
    assert_same(callback.snapshot.tensors, recorder.at[4])
    assert_same(weights(trainer.model), merged_reference(recorder.at[12], recorder.at[4], 0.25))
    # history.jsonl in output_dir
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == callback.history

    # the Trainer's log history: every record's scalars at its step, and the final alpha
    logged = logged_wiseft(trainer.state.log_history)
    assert sorted(logged) == [4, 5, 10, 12]
    for record in callback.history:
        name = f"wiseft/alpha_{record['alpha']:.2f}/pass@4"
        assert logged[record["step"]][name] == record["pass@4"]
    assert logged[12]["wiseft/final_alpha"] == 0.25
    best = max(r["pass@4"] for r in callback.history if r["step"] == 10)
    assert logged[10]["wiseft/best/pass@4"] == best

    # ... and through report_to: TensorBoard's event file, read back
    # (TensorBoard closes its writer in on_train_end before ours: the final alpha, logged after
    # the merge, lands in a second event file of the run, so read them all, as TensorBoard does)
    scalars = {}
    for event_file in tmp_path.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        events.Reload()
        for name in events.Tags()["scalars"]:
            scalars.update({(e.step, name): e.value for e in events.Scalars(name)})
    for record in callback.history:
        name = f"wiseft/alpha_{record['alpha']:.2f}/pass@4"
        assert scalars[(record["step"], f"train/{name}")] == pytest.approx(record["pass@4"])


def test_metric_for_best_model_keeps_the_checkpoint_the_history_says_is_best(tmp_path):
    """The grid follows the Trainer's evaluations; load_best_model_at_end keeps the checkpoint
    whose best interpolant scored highest, and the merge is of those weights, with their alpha."""
    callback = WiSEFTTrainerCallback(**toy_options(eval_every_n_steps=None, alphas=(0.25, 0.5)))
    recorder = WeightRecorder(steps=(4, 6, 9, 12))
    config = toy_arguments(
        tmp_path, max_steps=12, eval_strategy="steps", eval_steps=3, save_strategy="steps",
        save_steps=3, load_best_model_at_end=True, metric_for_best_model="wiseft/best/pass@4",
        per_device_eval_batch_size=8,
    )  # fmt: skip
    tokenizer = char_tokenizer()
    trainer = toy_trainer(config, [recorder, callback], eval_dataset=toy_train_set(tokenizer)[:8])
    trainer.train()

    steps = sorted({r["step"] for r in callback.history})
    assert steps == [4, 6, 9, 12]  # the snapshot, then the Trainer's evaluations after it
    grid = {s: max(r["pass@4"] for r in callback.history if r["step"] == s) for s in (6, 9, 12)}
    best_step = min(s for s in grid if grid[s] == max(grid.values()))  # the first best
    assert best_step < 12  # the weights put back are not the last ones: their merge is tested
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    assert trainer.state.best_metric == grid[best_step]
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [3, 6, 9, 12]
    # step 3 came before the snapshot: no metric of ours, never the best
    assert callback.final_report["step"] == best_step  # the alpha of the kept weights' grid
    alpha = callback.chosen_alpha
    expected = merged_reference(recorder.at[best_step], recorder.at[4], alpha)
    assert_same(weights(trainer.model), expected)
    saved = json.loads((tmp_path / f"checkpoint-{best_step}" / "trainer_state.json").read_text())
    kept = json.loads(saved["stateful_callbacks"]["WiSEFTTrainerCallback"]["attributes"]["wiseft"])
    assert kept["history"] == [r for r in callback.history if r["step"] <= best_step]


def test_bad_trainer_settings_are_refused_before_training(tmp_path):
    callback = WiSEFTTrainerCallback(**toy_options())
    config = toy_arguments(tmp_path, restore_callback_states_from_checkpoint=True)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        toy_trainer(config, [callback])
    no_tokenizer = WiSEFTTrainerCallback(**toy_options(tokenizer=None))
    trainer = toy_trainer(toy_arguments(tmp_path), [no_tokenizer])
    trainer.processing_class = None
    trainer.callback_handler.processing_class = None
    with pytest.raises(ValueError, match="processing_class"):
        trainer.train()
    assert trainer.state.global_step == 0
    # driven by anything but a Trainer holding it: a clear error, not a silent non-logging run
    with pytest.raises(RuntimeError, match=r"must be called by a transformers\.Trainer"):
        no_tokenizer.on_train_begin(trainer.args, TrainerState(), TrainerControl())


def test_save_merged_to_writes_the_merged_model(tmp_path):
    callback = WiSEFTTrainerCallback(**toy_options(save_merged_to=tmp_path / "merged"))
    trainer = toy_trainer(toy_arguments(tmp_path / "run", max_steps=6), [callback])
    trainer.train()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    final = weights(trainer.model)
    named = dict(saved.named_parameters())
    assert_same(named, {n: final[n] for n in named})


def test_importing_and_building_the_hf_door_never_imports_lightning():
    code = (
        "import sys, wise_callback\n"
        "from wise_callback import WiSEFTTrainerCallback\n"
        "from wise_callback.demo.model import char_tokenizer\n"
        "WiSEFTTrainerCallback([{'prompt': '1+1=', 'answer': '2'}], char_tokenizer())\n"
        "names = ('lightning', 'pytorch_lightning')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_collapse_stops_the_trainer_and_calls_back_with_its_objects(tmp_path):
    """The noisy-label task of test_callback.py (8 sums, half with a consistently wrong label):
    Pass@16 falls while Pass@1 holds; on_collapse="stop" ends the Trainer's run there (8
    problems cannot give a paired z of 2: the threshold is 1, as in test_callback.py)."""
    tokenizer = char_tokenizer()
    rows = []
    for i, (a, b) in enumerate(NoisyLabels.PAIRS):
        ids = tokenizer(f"{a}+{b}={(a + b + 3 * (i % 2)) % 10}")["input_ids"]
        ids = torch.tensor([*ids, tokenizer.eos_token_id])
        rows.append({"input_ids": ids, "labels": ids})
    problems = [{"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)} for a, b in NoisyLabels.PAIRS]
    callback = WiSEFTTrainerCallback(
        problems, snapshot_at=5, eval_every_n_steps=5, num_samples=16, ks=(1, 16), alphas=(0.5,),
        collapse={"min_drop": 0.1, "z_threshold": 1.0, "patience": 2, "on_collapse": "stop"},
        max_new_tokens=2,
        sample_logging={"progress": False},
    )  # fmt: skip
    args = toy_arguments(tmp_path, max_steps=200, per_device_train_batch_size=len(rows))
    trainer = toy_trainer(args, [callback], lr=1e-2, train_dataset=rows)
    with pytest.warns(UserWarning, match=r"diversity collapse at step \d+: pass@16 fell from"):
        trainer.train()
    assert trainer.state.global_step < 200  # stopped
    current = [r for r in callback.history if r["alpha"] in (0.0, 1.0)]
    assert current[-1]["step"] == trainer.state.global_step and callback.collapse_detected
    logged = logged_wiseft(trainer.state.log_history)
    assert logged[trainer.state.global_step]["wiseft/collapse"] == 1
    assert callback.chosen_alpha is not None  # the merge still happens after the stop

    seen = []
    watcher = WiSEFTTrainerCallback(
        problems, tokenizer, collapse={"on_collapse": lambda *a: seen.append(a)}
    )
    watcher._event(trainer.args, trainer.state, trainer.control)
    with pytest.warns(UserWarning, match="diversity collapse at step 2"):
        for step, pass_k in ((1, 1.0), (2, 0.0)):
            array = np.full(len(problems), pass_k)
            record = {"step": step, "pass@16": pass_k, "mean_rho": 0}
            watcher._watch_collapse({**record, **watcher._watch.compare(array)}, {"passk": array})
    assert [(a, s, c, info["step"]) for a, s, c, info in seen] == [
        (trainer.args, trainer.state, trainer.control, 2)
    ]
