"""What users of in-training evaluation expect, with a real Trainer and real loggers: sample tables
kept across evaluations, generation dumps, per-source metrics, health, standard errors, cost
controls (max_problems, eval_at_start, the last step, a time budget), chat templates, and metric
names that ModelCheckpoint and EarlyStopping can monitor."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callback_toy import EVAL_PAIRS, ToyModule, toy_problems
from helpers import EVERY, assert_same, weights
from wise_callback import WiSEFTCallback
from wise_callback.generations import COLUMNS
from wise_callback.sampling import HFSampler

FAST = dict(num_samples=4, max_new_tokens=3, progress=False, evaluation=EVERY)


class Bracket(Callback):
    """One before and one after WiSEFTCallback: the weights each sees after every step."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = weights(pl_module.model)


def trainer_for(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=7,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def csv_metrics(log_dir) -> dict[tuple[int, str], float]:
    with open(log_dir / "metrics.csv") as f:
        return {(int(r["step"]), k): float(v) for r in csv.DictReader(f) for k, v in r.items() if v}


def problem_sets() -> dict[str, list[dict[str, str]]]:
    """Two evaluation sets: sums (the toy task) and differences (a second source)."""
    diffs = [{"prompt": f"{a}-{b}=", "answer": str((a - b) % 10)} for a, b in EVAL_PAIRS[6:12]]
    return {"sums": toy_problems(6), "diffs": diffs}


def test_max_problems_is_a_fixed_seeded_subset(tokenizer):
    sets = problem_sets()
    first = WiSEFTCallback(sets, tokenizer, evaluation={"max_problems": 5}, sampling={"seed": 3})
    again = WiSEFTCallback(sets, tokenizer, evaluation={"max_problems": 5}, sampling={"seed": 3})
    other = WiSEFTCallback(sets, tokenizer, evaluation={"max_problems": 5}, sampling={"seed": 4})
    assert first.problems == again.problems and len(first.problems) == 5
    assert first.problems != other.problems
    # the sets are interleaved in proportion to their sizes, each in its own order
    together = WiSEFTCallback(sets, tokenizer).problems
    assert [p["source"] for p in together] == ["sums", "diffs"] * 6
    assert [p["prompt"] for p in together[::2]] == [p["prompt"] for p in sets["sums"]]
    assert first.problems == [p for p in together if p in first.problems]  # order kept
    uneven = WiSEFTCallback({"a": sets["sums"][:2], "b": sets["diffs"]}, tokenizer).problems
    assert [p["source"] for p in uneven] == ["b", "a", "b", "b", "b", "a", "b", "b"]


def test_logs_tables_dumps_sources_health_and_errors(tmp_path, caplog):
    """One run, two loggers (CSV and TensorBoard), two evaluation sets, a step-0 baseline and a
    last step (7) that is not a multiple of eval_every_n_steps."""
    module = ToyModule()
    callback = WiSEFTCallback(
        problem_sets(),
        module.tokenizer,
        snapshot_at=2,
        eval_every_n_steps=3,
        alphas=(0.5,),
        num_examples_to_log=3,
        print_samples=2,
        save_generations=True,
        eval_at_start=True,
        **FAST,
    )
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    with caplog.at_level(logging.INFO):
        trainer_for(tmp_path, [callback], logger=loggers).fit(module)

    evaluations = [(0, 1.0), (2, 0.0), (3, 0.5), (3, 1.0), (6, 0.5), (6, 1.0), (7, 0.5), (7, 1.0)]
    assert [(r["step"], r["alpha"]) for r in callback.history] == evaluations
    steps = [0, 2, 3, 6, 7]

    # per-source metrics average back to the overall ones, weighted by problem counts
    for record in callback.history:
        assert record["sums/num_problems"] == record["diffs/num_problems"] == 6
        assert record["num_problems"] == record["num_problems_planned"] == 12
        for name in ("pass@1", "pass@4", "maj@4", "mean_rho", "mean_none_fraction"):
            both = (record[f"sums/{name}"] + record[f"diffs/{name}"]) / 2
            assert both == pytest.approx(record[name], abs=1e-12)
        assert 1 <= record["mean_completion_tokens"] <= 3
        assert 0 <= record["frac_truncated"] <= 1 and record["pass@4_se"] >= 0

    # the CSV logger got per-source, health, standard-error and monitorable metrics at each step
    logged = csv_metrics(tmp_path / "csv" / "version_0")
    for step in (3, 6, 7):
        assert (step, "wiseft/alpha_0.50/diffs/pass@4") in logged
        assert (step, "wiseft/alpha_1.00/frac_truncated") in logged
        assert (step, "wiseft/alpha_1.00/pass@4_se") in logged
        final = {r["alpha"]: r for r in callback.history if r["step"] == step}
        best = max(final.values(), key=lambda r: (r["pass@4"], r["alpha"]))
        assert logged[(step, "wiseft/best/pass@4")] == pytest.approx(best["pass@4"])
        assert logged[(step, "wiseft/best_alpha")] == best["alpha"]
    assert (0, "wiseft/alpha_1.00/sums/mean_rho") in logged

    # the sample table keeps the rows of every evaluation, for the same problems each time
    log_dir = tmp_path / "csv" / "version_0"
    rows = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    assert rows == callback.sample_table
    assert sorted({r["step"] for r in rows}) == steps
    shown = {(r["problem"], r["source"]) for r in rows}
    assert shown == {(0, "sums"), (1, "diffs"), (2, "sums")}  # round-robin over the sources
    for step, alpha in evaluations:
        chosen = [r["problem"] for r in rows if (r["step"], r["alpha"]) == (step, alpha)]
        assert chosen == [0, 1, 2]
    assert all(r["prompt"] == callback.problems[r["problem"]]["prompt"] for r in rows)

    # TensorBoard: a markdown table at every evaluation step, and the scalars
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(
        "wiseft/samples/text_summary")}  # fmt: skip
    assert sorted(texts) == steps
    assert texts[7].count("\n| 7 | 0.5 |") == 3 and texts[7].count("\n| 7 | 1.0 |") == 3
    scalars = events.Scalars("wiseft/alpha_0.50/sums/pass@4")
    assert [s.step for s in scalars] == [3, 6, 7]

    # the generation dump: every completion of every problem and alpha, per evaluation
    dumps = sorted(p.name for p in (log_dir / "generations").iterdir())
    assert dumps == sorted(f"step_{s}.jsonl" for s in steps)
    lines = [json.loads(line) for line in (log_dir / "generations" / "step_6.jsonl").open()]
    assert [(x["alpha"], x["problem"]) for x in lines] == [
        (a, i) for a in (0.5, 1.0) for i in range(12)
    ]
    record = next(r for r in callback.history if (r["step"], r["alpha"]) == (6, 1.0))
    mine = [x for x in lines if x["alpha"] == 1.0]
    assert sum(x["num_correct"] for x in mine) / 48 == pytest.approx(record["mean_rho"])
    sample = mine[0]["samples"][0]
    assert set(sample) == {"completion", "answer", "correct", "num_tokens", "finish_reason"}
    assert mine[1]["source"] == "diffs" and all(len(x["samples"]) == 4 for x in lines)
    tokens = [s["num_tokens"] for x in mine for s in x["samples"]]
    assert sum(tokens) / len(tokens) == pytest.approx(record["mean_completion_tokens"])

    # the console: print_samples rows per evaluation
    printed = [r.getMessage() for r in caplog.records if "completion: " in r.getMessage()]
    assert len(printed) == len(steps)
    assert all(m.count("completion: ") == 2 for m in printed)


def test_the_time_budget_stops_sampling_and_restores_the_weights(tmp_path, caplog):
    """A budget far below one sampler call: every alpha makes exactly one call (one problem),
    also inside the interpolation sweep, and the weights come back bit for bit."""
    module = ToyModule()
    before, after = Bracket(), Bracket()
    callback = WiSEFTCallback(
        toy_problems(6),
        module.tokenizer,
        snapshot_at=2,
        eval_every_n_steps=2,
        alphas=(0.25, 0.5),
        eval_time_budget_s=1e-4,
        problems_per_call=1,
        **FAST,
    )
    with caplog.at_level(logging.INFO):
        trainer_for(tmp_path, [before, callback, after], max_steps=4).fit(module)
    assert [(r["step"], r["alpha"]) for r in callback.history] == [
        (2, 0.0), (4, 0.25), (4, 0.5), (4, 1.0),
    ]  # fmt: skip
    for record in callback.history:
        assert record["num_problems"] == 1 and record["num_problems_planned"] == 6
        assert record["num_samples"] == 4
    for step in (2, 3, 4):
        assert_same(before.seen[step], after.seen[step])
    said = [r.getMessage() for r in caplog.records if "ran out" in r.getMessage()]
    assert said == [
        f"WiSEFTCallback: evaluation.time_budget_s=0.0001 ran out at step {s}: 1 of 6 problems "
        "covered"
        for s in (2, 4)
    ]


def test_model_checkpoint_keeps_the_best_wise_ft_checkpoint(tmp_path):
    """Two ModelCheckpoints on `wiseft/best/mean_rho`: the best one (max) and the two worst
    (min); each must keep the checkpoints of the steps whose evaluation scored that way."""
    module = ToyModule(lr=1e-2)
    callback = WiSEFTCallback(
        toy_problems(6),
        module.tokenizer,
        snapshot_at=1,
        eval_every_n_steps=2,
        alphas=(0.5,),
        select_metric="mean_rho",
        final_alpha=None,
        **FAST,
    )
    watch = dict(monitor="wiseft/best/mean_rho", every_n_train_steps=2)
    best = ModelCheckpoint(dirpath=tmp_path / "best", mode="max", save_top_k=1, **watch)
    worst = ModelCheckpoint(dirpath=tmp_path / "worst", mode="min", save_top_k=2, **watch)
    trainer = trainer_for(
        tmp_path, [callback, best, worst], max_steps=10, enable_checkpointing=True
    )
    trainer.fit(module)
    score = {}  # the best alpha's mean_rho of each evaluation at a checkpoint step
    for record in callback.history:
        if record["step"] % 2 == 0:
            score[record["step"]] = max(score.get(record["step"], -1.0), record["mean_rho"])
    # a later checkpoint replaces a kept one only when strictly better: ties keep the earlier
    ranked_max = sorted(score, key=lambda s: (-score[s], s))
    ranked_min = sorted(score, key=lambda s: (score[s], s))
    for checkpoint, expected in ((best, ranked_max[:1]), (worst, ranked_min[:2])):
        kept = {
            torch.load(path, weights_only=False, map_location="cpu")["global_step"]: value.item()
            for path, value in checkpoint.best_k_models.items()
        }
        assert sorted(kept) == sorted(expected)
        assert kept == pytest.approx({s: score[s] for s in expected})
        assert len(list(Path(checkpoint.dirpath).glob("*.ckpt"))) == len(expected)


def test_early_stopping_can_watch_a_wise_ft_metric(tmp_path):
    """One batch per epoch; EarlyStopping checks at every epoch end. The step-0 baseline makes
    the metric exist from the first check on; no improvement can reach min_delta=1."""
    module = ToyModule(batch_size=None)
    callback = WiSEFTCallback(
        toy_problems(3),
        module.tokenizer,
        snapshot_at=1,
        eval_every_n_steps=2,
        alphas=(),
        final_alpha=None,
        eval_at_start=True,
        **FAST,
    )
    stop = EarlyStopping(monitor="wiseft/alpha_1.00/pass@4", mode="max", patience=2, min_delta=1.0)
    trainer = trainer_for(tmp_path, [callback, stop], max_steps=20)
    trainer.fit(module)
    assert trainer.global_step == 3  # checks after steps 1, 2, 3: the first sets the reference
    assert stop.stopped_epoch == 2
    assert [r["step"] for r in callback.history if r["alpha"] == 1.0] == [0, 2, 3]


class PromptRecorder(HFSampler):
    """A real HFSampler that remembers the prompts it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompts: list = []

    def sample(self, prompts, n, config):
        self.prompts.extend(prompts)
        return super().sample(prompts, n, config)


def test_chat_template_formats_the_prompts(tmp_path, tokenizer):
    module = ToyModule()
    module.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    sampler = PromptRecorder(module.model, module.tokenizer, progress=False)
    callback = WiSEFTCallback(
        toy_problems(2),
        module.tokenizer,
        snapshot_at=1,
        eval_every_n_steps=5,
        alphas=(),
        final_alpha=None,
        sampler=sampler,
        apply_chat_template=True,
        **FAST,
    )
    trainer_for(tmp_path, [callback], max_steps=1).fit(module)
    expected = [
        module.tokenizer(f"user: {p['prompt']}\nassistant: ")["input_ids"] for p in toy_problems(2)
    ]
    assert sampler.prompts == expected
    assert [r["prompt"] for r in callback.sample_table] == [p["prompt"] for p in toy_problems(2)]


def test_the_sample_table_travels_with_the_checkpoint(tokenizer):
    callback = WiSEFTCallback(toy_problems(), tokenizer)
    callback.sample_table = [{"step": 3, "alpha": 1.0, "problem": 0}]
    state = callback.state_dict()
    fresh = WiSEFTCallback(toy_problems(), tokenizer)
    fresh.load_state_dict(state)
    assert fresh.sample_table == callback.sample_table
    del state["sample_table"]  # a checkpoint of an older version
    fresh.load_state_dict(state)
    assert fresh.sample_table == []


@pytest.mark.slow
def test_wandb_offline_gets_the_whole_table_at_every_evaluation(tmp_path, monkeypatch):
    """W&B overwrites a table logged under the same key; the callback logs all rows so far."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    module = ToyModule()
    callback = WiSEFTCallback(
        toy_problems(4),
        module.tokenizer,
        snapshot_at=1,
        eval_every_n_steps=2,
        alphas=(0.5,),
        num_examples_to_log=2,
        **FAST,
    )
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="wiseft-test")
    try:
        trainer_for(tmp_path, [callback], max_steps=4, logger=logger).fit(module)
    finally:
        logger.experiment.finish()
    tables = sorted(
        tmp_path.glob("wandb/offline-run-*/files/media/table/wiseft/samples_*.table.json"),
        key=lambda path: path.stat().st_mtime_ns,
    )
    assert len(tables) == 3  # steps 1, 2, 4
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "alpha", "problem", "source", "prompt", "reference",
                               "completion", "answer", "correct"]  # fmt: skip
    steps = [row[0] for row in last["data"]]
    assert steps == [1, 1, 2, 2, 2, 2, 4, 4, 4, 4]
    assert [[row[c] for c in COLUMNS] for row in callback.sample_table] == last["data"]


def test_a_resumed_run_ends_with_the_same_sample_table(tmp_path):
    """Fit 6 steps; fit again from the step-4 checkpoint with a fresh callback: the table (and
    samples.jsonl) of the resumed run equal the straight run's."""

    def run(folder, ckpt_path=None):
        module = ToyModule(batch_size=None)  # one batch per epoch
        callback = WiSEFTCallback(
            toy_problems(4), module.tokenizer, snapshot_at=1, eval_every_n_steps=2,
            alphas=(0.5,), num_examples_to_log=2, **FAST,
        )  # fmt: skip
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        trainer = trainer_for(
            folder, [callback, every], max_steps=6, enable_checkpointing=True,
            logger=CSVLogger(folder, name="logs"),
        )  # fmt: skip
        trainer.fit(module, ckpt_path=ckpt_path)
        lines = (folder / "logs" / "version_0" / "samples.jsonl").read_text().splitlines()
        return callback.sample_table, [json.loads(line) for line in lines]

    straight, straight_file = run(tmp_path / "straight")
    assert sorted({r["step"] for r in straight}) == [1, 2, 4, 6]
    resumed, resumed_file = run(tmp_path / "resumed", tmp_path / "ckpt" / "epoch=3-step=4.ckpt")
    assert resumed == straight == straight_file == resumed_file
