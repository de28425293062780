"""The demo task: seeded, correct chains; SFT batches that train on completions only; a base that
really has the skill (it solves short chains greedily)."""

from __future__ import annotations

import json
import re
from itertools import islice, pairwise

import lightning as L
import pytest
import torch

from wise_callback.demo.pretrain import BASE_CONFIG, BASE_WEIGHTS, load_base_model
from wise_callback.demo.pretrain import main as pretrain_main
from wise_callback.demo.sft import (
    IGNORE_INDEX,
    ChainDataModule,
    ChainSFTModule,
    collate,
    completion_loss,
)
from wise_callback.demo.task import (
    answer_of,
    completion_for,
    make_problem,
    make_splits,
    problem_stream,
    running_results,
)


def independent_running_results(prompt: str) -> list[int]:
    """Running results recomputed from the prompt's signed terms, without the task's parser."""
    first, *steps = (int(term) for term in re.findall(r"[+-]?\d+", prompt.rstrip("=")))
    results, value = [], first
    for step in steps:
        value += step
        results.append(value)
    return results


def test_splits_are_seeded_disjoint_and_distinct():
    train, heldout = make_splits(seed=3, num_train=300, num_heldout=100)
    again_train, again_heldout = make_splits(seed=3, num_train=300, num_heldout=100)
    assert (train, heldout) == (again_train, again_heldout)
    assert (len(train), len(heldout)) == (300, 100)
    prompts = [p["prompt"] for p in train + heldout]
    assert len(set(prompts)) == len(prompts)
    other_train, _ = make_splits(seed=4, num_train=300, num_heldout=100)
    assert other_train != train
    _, fewer_heldout = make_splits(seed=3, num_train=50, num_heldout=40)
    assert fewer_heldout == heldout[:40]  # held-out does not depend on the train size


def test_problems_have_correct_answers_and_intermediate_results():
    train, heldout = make_splits(seed=0, num_train=500, num_heldout=0, num_ops=3)
    for problem in train + heldout:
        results = independent_running_results(problem["prompt"])
        assert len(results) == 3
        assert all(0 <= value <= 99 for value in results), problem
        assert re.fullmatch(r"\d\d([+-]\d\d){3}=", problem["prompt"]), problem
        assert problem["completion"] == ";".join(f"{value:02d}" for value in results)
        assert problem["answer"] == f"{results[-1]:02d}"
        assert answer_of(problem["completion"]) == problem["answer"]


def test_prototype_example_and_both_operators_appear():
    assert running_results("23+45-17+08=") == [68, 51, 59]
    assert completion_for("23+45-17+08=") == "68;51;59"
    problems = make_splits(seed=1, num_train=200, num_heldout=0)[0]
    text = "".join(p["prompt"] for p in problems)
    assert text.count("+") > 100 and text.count("-") > 100


def test_stream_is_seeded_and_mixes_chain_lengths():
    first = list(islice(problem_stream(seed=5), 300))
    assert first == list(islice(problem_stream(seed=5), 300))
    lengths = {len(independent_running_results(p["prompt"])) for p in first}
    assert lengths == {1, 2, 3}
    for problem in first:
        results = independent_running_results(problem["prompt"])
        assert all(0 <= value <= 99 for value in results), problem
        assert problem["completion"] == ";".join(f"{value:02d}" for value in results)
        assert problem["answer"] == f"{results[-1]:02d}"


@pytest.mark.parametrize(
    ("prompt", "wrong"),
    [
        ("23+45-17+08", "not a chain"),
        ("23*45=", "operator"),
        ("2+345=", "2-digit"),
        ("90+20=", "leaves 0..99"),
        ("05-07=", "leaves 0..99"),
    ],
)
def test_running_results_rejects_bad_prompts(prompt, wrong):
    with pytest.raises(ValueError, match=wrong):
        running_results(prompt)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_ops"):
        make_problem(__import__("random").Random(0), 0)
    with pytest.raises(ValueError, match="min_ops"):
        next(problem_stream(0, min_ops=3, max_ops=2))
    with pytest.raises(ValueError, match="sizes"):
        make_splits(0, -1, 5)


def test_answer_of_reads_the_last_running_result():
    assert answer_of("68;51;59") == "59"
    assert answer_of("68;51;5") is None
    assert answer_of("") is None
    assert answer_of("68;51;x9") is None


def test_collate_trains_on_completion_and_eos_only(tokenizer):
    problems = [
        {"prompt": "23+45=", "completion": "68"},
        {"prompt": "23+45-17=", "completion": "68;51"},
    ]
    batch = collate(tokenizer, problems)
    for row, problem in enumerate(problems):
        labels = batch["labels"][row]
        target = labels[labels != IGNORE_INDEX].tolist()
        assert tokenizer.decode(target[:-1]) == problem["completion"]
        assert target[-1] == tokenizer.eos_token_id
        prompt_length = len(problem["prompt"])
        assert (labels[:prompt_length] == IGNORE_INDEX).all()
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        assert text == problem["prompt"] + problem["completion"] + tokenizer.eos_token


def greedy_accuracy(model, tokenizer, problems) -> float:
    prompts = tokenizer([p["prompt"] for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**prompts, do_sample=False, max_new_tokens=12)
    texts = tokenizer.batch_decode(
        out[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return sum(answer_of(t) == p["answer"] for t, p in zip(texts, problems, strict=True)) / len(
        problems
    )


@pytest.mark.parametrize(("num_ops", "low", "high"), [(1, 0.5, 1.0), (3, 0.2, 0.8)])
def test_shipped_base_has_part_of_the_skill(tokenizer, num_ops, low, high):
    """Greedy accuracy of the shipped base: it adds and subtracts (1 step) and chains 3 steps on
    some problems, but not on most of them, which leaves SFT room to raise Pass@1."""
    config = json.loads(BASE_CONFIG.read_text())
    assert config["model"]["head_dim"] >= 32  # vLLM's CPU kernels need it
    model = load_base_model(tokenizer).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    _, problems = make_splits(seed=99, num_train=0, num_heldout=100, num_ops=num_ops)
    assert low <= greedy_accuracy(model, tokenizer, problems) <= high


def test_sft_module_fits_a_small_set_with_a_real_trainer(tokenizer, tiny_model):
    train, _ = make_splits(seed=0, num_train=16, num_heldout=0)
    batch = collate(tokenizer, train)
    before = completion_loss(tiny_model, batch).item()
    module = ChainSFTModule(tiny_model, lr=3e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=ChainDataModule(tokenizer, train, batch_size=8, seed=0))
    assert module.model is tiny_model
    assert completion_loss(tiny_model, batch).item() < 0.8 * before


def test_sft_options_are_checked_up_front(tokenizer, tiny_model):
    with pytest.raises(ValueError, match="lr"):
        ChainSFTModule(tiny_model, lr=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        ChainDataModule(tokenizer, make_splits(0, 4, 0)[0], batch_size=8)


def test_pretrain_script_writes_loadable_base(tmp_path, tokenizer):
    out = tmp_path / "nested" / "base.safetensors"
    pretrain_main(["--out", str(out), "--steps", "3", "--quiet"])
    record = json.loads((tmp_path / "nested" / "base_config.json").read_text())
    assert record["pretrain"]["steps"] == 3
    model = load_base_model(tokenizer, weights=out, config=out.with_name("base_config.json"))
    assert set(model.state_dict()) == set(load_base_model(tokenizer).state_dict())
    assert BASE_WEIGHTS.stat().st_size < 5_000_000


def test_warmup_cosine_schedule_shape():
    from wise_callback.demo.sft import _warmup_cosine

    factors = [_warmup_cosine(10, 110, 0.1, index) for index in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[-1] == pytest.approx(0.1)
    decay = factors[9:]
    assert all(a >= b for a, b in pairwise(decay))
    assert {_warmup_cosine(0, 50, 1.0, index) for index in range(50)} == {1.0}  # constant lr
