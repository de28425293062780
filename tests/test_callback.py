"""WiSEFTCallback with a real Lightning Trainer on a tiny Llama and a toy sum task (fast tests)."""

from __future__ import annotations

import csv
import json
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForCausalLM

from callback_toy import ToyModule, toy_problems
from helpers import EVERY, assert_same, weights
from wise_callback import Snapshot, WiSEFTCallback, interpolate_
from wise_callback.collapse import CollapseWatch
from wise_callback.sampling import HFSampler

FAST = dict(num_samples=4, max_new_tokens=3, sample_logging={"progress": False}, evaluation=EVERY)


class Bracket(Callback):
    """Put one before and one after WiSEFTCallback: the weights (and mode) each sees per step."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[dict[str, torch.Tensor], bool]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = (weights(pl_module.model), pl_module.model.training)

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen[-1] = (weights(pl_module.model), pl_module.model.training)


def trainer_for(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=12,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def test_model_attr_finds_the_model():
    module = ToyModule()
    for model_attr in ("model", lambda m: m.model):
        callback = WiSEFTCallback(toy_problems(), model_attr=model_attr)
        assert callback._resolve_model(module) is module.model
    with pytest.raises(ValueError, match=r"pl_module\.backbone\.lm is NoneType, not a torch"):
        WiSEFTCallback(toy_problems(), model_attr="backbone.lm")._resolve_model(module)


def test_snapshot_after_the_last_step_fails_before_training(tmp_path):
    module = ToyModule()
    before = weights(module.model)
    callback = WiSEFTCallback(toy_problems(), module.tokenizer, snapshot_at=50, **FAST)
    with pytest.raises(ValueError, match=r"snapshot_at=50 .* after the last planned step 12"):
        trainer_for(tmp_path, [callback]).fit(module)
    assert_same(before, weights(module.model))


def test_fit_snapshots_evaluates_logs_and_merges(tmp_path):
    """The whole life cycle, with gradient accumulation (2 micro-batches per step)."""
    module = ToyModule()
    before, after = Bracket(), Bracket()
    callback = WiSEFTCallback(
        toy_problems(),
        module.tokenizer,
        snapshot_at=0.25,  # of 12 steps: step 3
        eval_every_n_steps=4,
        alphas=(0.5, 0.25),
        final_alpha="best",
        select_metric="pass@4",
        save_merged_to=tmp_path / "merged",
        **FAST,
    )
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=12
    )
    trainer = trainer_for(
        tmp_path,
        [before, callback, after, checkpoints],
        accumulate_grad_batches=2,
        enable_checkpointing=True,
    )
    trainer.fit(module)

    steps = [(r["step"], r["alpha"]) for r in callback.history]
    assert steps == [(3, 0.0)] + [(s, a) for s in (4, 8, 12) for a in (0.25, 0.5, 1.0)]
    record = callback.history[-1]
    assert record["num_problems"] == 6 and record["num_samples"] == 24
    assert 0.0 <= record["pass@1"] <= record["pass@2"] <= record["pass@4"] <= 1.0
    assert record["mean_rho"] == pytest.approx(record["pass@1"])
    assert sum(record["rho_hist"]) == 6

    # weights and mode restored bit for bit after every evaluation, nothing changed otherwise
    for step in before.seen:
        if step != -1:
            assert_same(before.seen[step][0], after.seen[step][0])
            assert after.seen[step][1] is True

    # the snapshot is the weights after step 3, on disk beside the checkpoints
    snapshot_file = tmp_path / "ckpt" / "wiseft-snapshot-step3.safetensors"
    assert_same(Snapshot.load(snapshot_file).tensors, before.seen[3][0])

    # merged: the best alpha of the final evaluation (ties toward the larger alpha)
    final = [r for r in callback.history if r["step"] == 12]
    best = max(final, key=lambda r: (r["pass@4"], r["alpha"]))
    assert callback.chosen_alpha == best["alpha"]
    expected = ToyModule().model
    expected.load_state_dict(before.seen[-1][0], strict=False)
    interpolate_(expected, Snapshot.load(snapshot_file), callback.chosen_alpha)
    assert_same(weights(expected), weights(module.model))
    # the last checkpoint (step 12) holds the unmerged weights and the full history
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    held = {n.removeprefix("model."): t for n, t in checkpoint["state_dict"].items()}
    unmerged = before.seen[-1][0]
    assert_same(held, {n: unmerged[n] for n in held})
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "WiSEFTCallback" in k]
    assert state["history"] == callback.history
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_same(weights(saved), weights(module.model))
    merge = json.loads((tmp_path / "merged" / "wiseft_merge.json").read_text())
    assert merge["alpha"] == callback.chosen_alpha and merge["snapshot_step"] == 3

    # history.jsonl in the log folder = history; the CSV logger got the metrics at their steps
    log_dir = tmp_path / "logs" / "version_0"
    lines = (log_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == callback.history
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {(int(r["step"]), k) for r in rows for k, v in r.items() if v and "wiseft" in k}
    assert (3, "wiseft/alpha_0.00/pass@4") in logged
    assert (8, "wiseft/alpha_0.25/maj@4") in logged
    assert (12, "wiseft/alpha_1.00/jensen_bound@4") in logged
    assert (12, "wiseft/collapse") in logged and (12, "wiseft/final_alpha") in logged
    assert (8, "wiseft/time/sample_s") in logged and (8, "wiseft/time/weights_s") in logged
    assert "wiseft/alpha_0.50/pass@4" in trainer.callback_metrics

    # evaluations leave the training trajectory alone: same weights as a run without the callback
    plain = ToyModule()
    trainer_for(tmp_path / "plain", [], accumulate_grad_batches=2, logger=False).fit(plain)
    assert_same(weights(plain.model), before.seen[-1][0])


class FailingSampler(HFSampler):
    """A real HFSampler that raises on one chosen call (fault injection)."""

    def __init__(self, *args, fail_on_call: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def sample(self, prompts, n, config):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("sampler exploded")
        return super().sample(prompts, n, config)


@pytest.mark.parametrize("fail_on_eval_error", [False, True])
def test_a_failing_evaluation_restores_the_weights(tmp_path, fail_on_eval_error):
    module = ToyModule()
    # one call per alpha (6 problems, 8 per call): the snapshot's at step 2, then at step 4 the
    # current weights' and the interpolant's, inside the sweep: fail there
    sampler = FailingSampler(module.model, module.tokenizer, progress=False, fail_on_call=3)
    before, after = Bracket(), Bracket()
    callback = WiSEFTCallback(
        toy_problems(),
        module.tokenizer,
        snapshot_at=2,
        eval_every_n_steps=4,
        alphas=(0.5,),
        sampler=sampler,
        fail_on_eval_error=fail_on_eval_error,
        **FAST,
    )
    trainer = trainer_for(tmp_path, [before, callback, after], max_steps=8)
    if fail_on_eval_error:
        with pytest.raises(RuntimeError, match="sampler exploded"):
            trainer.fit(module)
        assert_same(before.seen[4][0], weights(module.model))
        return
    with pytest.warns(UserWarning, match="step 4 failed with RuntimeError: sampler exploded"):
        trainer.fit(module)
    assert_same(before.seen[4][0], after.seen[4][0])
    assert after.seen[4][1] is True
    assert [r["step"] for r in callback.history] == [2, 8, 8]  # 4 is missing, training went on


def watched(watch: CollapseWatch, step: int, values: list[float], pass1: float):
    """Feed one evaluation of the current weights (per-problem Pass@4 values) to the watch."""
    array = np.asarray(values, dtype=float)
    record = {"step": step, "pass@4": array.mean(), "mean_rho": pass1}
    record.update(watch.compare(array))
    return record, watch.update(record, array)


def test_the_collapse_watch_fires_on_a_significant_paired_drop_with_pass1_held():
    watch = CollapseWatch(min_drop=0.1, patience=1, metric="pass@4", z_threshold=2.0)
    peak = [1.0] * 18 + [0.0] * 2  # 0.9
    steady = [0.0] * 4 + [1.0] * 14 + [0.0] * 2  # 0.7: 4 down, none up: consistent
    first, fired = watched(watch, 10, peak, 0.3)
    assert fired is None and first["collapse_z"] is None and watch.best_step == 10
    record, fired = watched(watch, 20, steady, 0.2)  # pass@1 fell: not collapse
    assert fired is None and watch.streak == 0
    # the paired statistics against a direct computation
    diffs = np.asarray(peak) - np.asarray(steady)
    se = diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert record["collapse_drop"] == pytest.approx(0.2)
    assert record["collapse_drop_se"] == pytest.approx(se)
    assert record["collapse_z"] == pytest.approx(0.2 / se) and 0.2 / se > 2
    record, fired = watched(watch, 30, [0.0] * 2 + [1.0] * 16 + [0.0] * 2, 0.4)  # drop 0.1, z 1.45
    assert fired is None and record["collapse_z"] < 2.0
    record, fired = watched(watch, 40, steady, 0.5)  # 0.2 and significant, pass@1 up: fires
    assert fired == {
        "step": 40,
        "metric": "pass@4",
        "best": pytest.approx(0.9),
        "best_step": 10,
        "current": pytest.approx(0.7),
        "drop_se": pytest.approx(se),
        "z": pytest.approx(0.2 / se),
        "pass@1_at_best": 0.3,
        "pass@1": 0.5,
        "evaluations_in_a_row": 1,
    }
    assert watched(watch, 50, [0.0] * 20, 0.6)[1] is None  # fires once
    resumed = CollapseWatch(min_drop=0.1, patience=1, metric="pass@4", z_threshold=2.0)
    resumed.load_state_dict(watch.state_dict())
    assert resumed == watch
    # the old rule (drop >= min_drop, no significance) would have fired on a noisy drop
    loose = CollapseWatch(min_drop=0.1, patience=1, metric="pass@4", z_threshold=2.0)
    watched(loose, 10, [1.0] * 10 + [0.0] * 10, 0.3)  # 0.5
    noisy = [0.0] * 5 + [1.0] * 5 + [1.0] * 2 + [0.0] * 8  # 0.35: 5 down, 2 up
    record, fired = watched(loose, 20, noisy, 0.4)
    assert record["collapse_drop"] == pytest.approx(0.15)
    assert record["collapse_z"] < 2.0 and fired is None


def test_the_callback_warns_once_and_acts_on_collapse(tmp_path):
    module = ToyModule()
    seen = []
    callback = WiSEFTCallback(
        toy_problems(),
        module.tokenizer,
        ks=(1, 4),
        collapse={"min_drop": 0.1, "on_collapse": lambda *args: seen.append(args)},
        **FAST,
    )
    trainer = trainer_for(tmp_path, [callback], max_steps=1)
    callback._trainer, callback._pl_module = trainer, module
    fired = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, values in ((1, [1.0] * 6), (2, [0.0] * 6), (3, [0.0] * 6)):
            array = np.asarray(values)
            record = {"step": step, "pass@4": array.mean(), "mean_rho": 0.5}
            record.update(callback._watch.compare(array))
            fired.append(callback._watch_collapse(record, {"passk": array}))
    assert fired == [False, True, True]
    messages = [str(w.message) for w in caught if "collapse" in str(w.message)]
    assert len(messages) == 1
    assert "step 2: pass@4 fell from 1.0000 (step 1) to 0.0000" in messages[0]
    assert [(t, m, info["step"]) for t, m, info in seen] == [(trainer, module, 2)]
    stopping = WiSEFTCallback(
        toy_problems(), module.tokenizer, collapse={"on_collapse": "stop"}, **FAST
    )
    stopping._trainer = trainer
    for step, pass_k in ((1, 1.0), (2, 0.0)):
        array = np.full(6, pass_k)
        record = {"step": step, "pass@4": pass_k, "mean_rho": 0, **stopping._watch.compare(array)}
        stopping._watch_collapse(record, {"passk": array})
    assert trainer.should_stop


class NoisyLabels(ToyModule):
    """Memorises 8 sums, half of them with a consistently wrong label: sampling starts diverse
    (high Pass@16), then every problem collapses onto one answer, right or wrong, while Pass@1
    climbs towards 0.5: the collapse the early warning is for."""

    PAIRS = [(a, b) for a in range(10) for b in range(10)][::7][:8]

    def problems(self) -> list[dict[str, str]]:
        return [{"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)} for a, b in self.PAIRS]

    def train_dataloader(self):
        rows = [
            self.tokenizer(f"{a}+{b}={(a + b + 3 * (i % 2)) % 10}")["input_ids"]
            + [self.tokenizer.eos_token_id]
            for i, (a, b) in enumerate(self.PAIRS)
        ]
        return torch.utils.data.DataLoader(torch.tensor(rows), batch_size=len(rows))


def test_collapse_in_a_real_run_warns_and_stops_it(tmp_path):
    """8 problems cannot give a paired z of 2 (it peaks near 1.5 here): the threshold is 1."""
    module = NoisyLabels(lr=1e-2)
    callback = WiSEFTCallback(
        module.problems(), module.tokenizer, snapshot_at=5, eval_every_n_steps=5, num_samples=16,
        ks=(1, 16), alphas=(0.5,), max_new_tokens=2, sample_logging={"progress": False},
        collapse={"min_drop": 0.1, "z_threshold": 1.0, "patience": 2, "on_collapse": "stop"},
    )  # fmt: skip
    trainer = trainer_for(tmp_path, [callback], max_steps=200)
    with pytest.warns(UserWarning, match=r"diversity collapse at step \d+: pass@16 fell from"):
        trainer.fit(module)
    assert trainer.global_step < 200  # stopped
    current = [r for r in callback.history if r["alpha"] in (0.0, 1.0)]
    last, state = current[-1], callback._watch
    assert last["step"] == trainer.global_step and state.fired and callback.collapse_detected
    assert state.best == max(r["pass@16"] for r in current) >= last["pass@16"] + 0.1
    assert last["pass@1"] >= state.best_pass1
    assert trainer.callback_metrics["wiseft/collapse"] == 1
    assert callback.chosen_alpha is not None  # the merge still happens after the stop
    # the grid at the end used the stop step's samples of the current weights, not new ones
    assert {r["alpha"] for r in callback.history if r["step"] == last["step"]} == {0.5, 1.0}
    sampled = sum(r["mean_completion_tokens"] * r["num_samples"] for r in callback.history)
    assert callback.spent["generated_tokens"] == pytest.approx(sampled, rel=1e-12)


def test_bf16_mixed_a_bf16_snapshot_and_a_fixed_alpha(tmp_path):
    module = ToyModule()
    before = Bracket()
    callback = WiSEFTCallback(
        toy_problems(3), module.tokenizer, snapshot_at=2, eval_every_n_steps=3,
        alphas=(0.5,), final_alpha=0.25, snapshotting={"dtype": "bfloat16"}, **FAST,
    )  # fmt: skip
    trainer_for(tmp_path, [before, callback], max_steps=4, precision="bf16-mixed").fit(module)
    assert [(r["step"], r["alpha"]) for r in callback.history] == [
        (2, 0.0), (3, 0.5), (3, 1.0), (4, 0.5), (4, 1.0),
    ]  # fmt: skip
    assert callback.chosen_alpha == 0.25
    assert callback.snapshot is not None
    assert {t.dtype for t in callback.snapshot.tensors.values()} == {torch.bfloat16}
    assert_same(callback.snapshot.tensors, {n: t.bfloat16() for n, t in before.seen[2][0].items()})
    expected = ToyModule().model  # fp32 weights, lerp computed in fp32 from the bf16 snapshot
    expected.load_state_dict(before.seen[-1][0], strict=False)
    interpolate_(expected, callback.snapshot, 0.25)
    assert_same(weights(expected), weights(module.model))
    assert module.model.lm_head.weight.dtype == torch.float32


def test_resume_finds_the_snapshot_beside_the_checkpoint(tmp_path):
    """The checkpoint names the snapshot file; a resumed run looks beside the checkpoint it is
    resumed from, then where the file was written, and says where it looked if both fail."""

    def run(root, max_steps, ckpt_path=None):
        module = ToyModule(batch_size=None)  # one batch per epoch, a checkpoint per epoch
        callback = WiSEFTCallback(
            toy_problems(2), module.tokenizer, snapshot_at=2, eval_every_n_steps=3,
            alphas=(0.5,), final_alpha=None, **FAST,
        )  # fmt: skip
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer_for(root, [callback, checkpoints], max_steps=max_steps, logger=False,
                    enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)  # fmt: skip
        return callback

    first = run(tmp_path / "first", 4)
    written = tmp_path / "first" / "ckpt" / "wiseft-snapshot-step2.safetensors"
    assert written.is_file()
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "first" / "ckpt" / "last.ckpt").rename(moved / "last.ckpt")
    written.rename(tmp_path / "snapshot.safetensors")
    with pytest.raises(FileNotFoundError, match=r"wiseft-snapshot-step2\.safetensors.*none of"):
        run(tmp_path / "second", 7, ckpt_path=moved / "last.ckpt")

    (tmp_path / "snapshot.safetensors").rename(moved / written.name)
    resumed = run(tmp_path / "third", 7, ckpt_path=moved / "last.ckpt")
    assert resumed.snapshot is not None and resumed.snapshot.step == 2
    assert_same(resumed.snapshot.tensors, Snapshot.load(moved / written.name).tensors)
    # the checkpoint (step 4, end of its epoch) predates the first run's final evaluation
    assert resumed.history[:3] == [r for r in first.history if r["step"] < 4]
    assert [(r["step"], r["alpha"]) for r in resumed.history[3:]] == [
        (6, 0.5), (6, 1.0), (7, 0.5), (7, 1.0),
    ]  # fmt: skip


def test_collapse_risk_is_the_paired_z_of_the_rise_at_rho_one():
    watch = CollapseWatch(min_drop=0.02, patience=1, metric="pass@4")
    assert watch.risk(np.ones(4)) is None  # no early checkpoint yet
    watch.early_pass1 = [1.0, 0.5, 0.25, 0.0, 0.75, 1.0]
    now = np.asarray([1.0, 1.0, 1.0, 0.0, 0.75, 1.0])  # two problems newly at rho = 1
    rise = np.asarray([0, 1, 1, 0, 0, 0], dtype=float)
    expected = rise.mean() / (rise.std(ddof=1) / np.sqrt(len(rise)))
    assert watch.risk(now) == pytest.approx(expected)
    assert watch.risk(np.asarray(watch.early_pass1)) is None  # no change, no spread: no z


def test_the_risk_warning_is_opt_in_and_fires_once(tmp_path):
    module = ToyModule()
    quiet = WiSEFTCallback(toy_problems(), module.tokenizer, **FAST)
    loud = WiSEFTCallback(toy_problems(), module.tokenizer, collapse={"risk_warning": True}, **FAST)
    record = {"step": 5, "collapse_risk": 3.0, "frac_rho1": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet._warn_of_risk(record)
        loud._warn_of_risk(record)
        loud._warn_of_risk({**record, "step": 6})
    said = [str(w.message) for w in caught if "collapse likely" in str(w.message)]
    assert said == [
        "WiSEFTCallback: collapse likely: at step 5 the share of problems every sample solves "
        "(rho = 1) is 0.500, up from the early checkpoint by 3.0 paired standard errors"
    ]
