"""Successive halving over the alpha grid at the final choice: it keeps the alpha a full
evaluation chooses when the gap is large, samples fewer tokens, and leaves the weights bit for
bit as they were, whatever it drops.

The constructed case: the shipped pretrained base of the demo is the early checkpoint, and the
same weights with heavy Gaussian noise are the "current" weights, so that the more weight an alpha
puts on the current weights the worse it solves the demo's chains (Pass@8 about 0.36 / 0.08 /
0.02 / 0.0 for alpha 0.25 / 0.5 / 0.75 / 1.0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wise_callback.comparisons import final_choice, per_problem_values
from wise_callback.core import WiSEFTCore
from wise_callback.demo.model import char_tokenizer
from wise_callback.demo.pretrain import load_base_model
from wise_callback.demo.task import make_splits
from wise_callback.eval_config import CURRENT, EvalConfig
from wise_callback.evaluate import evaluate
from wise_callback.grading import exact_match
from wise_callback.halving import (
    HALVING_Z,
    evaluate_halving,
    first_round_samples,
    proxy_metric,
    survivors,
)
from wise_callback.reporting import RunContext
from wise_callback.sampling import HFSampler, SamplingConfig
from wise_callback.weights import Snapshot

ALPHAS = (0.25, 0.5, 0.75, CURRENT)
CONFIG = EvalConfig(num_samples=8, sampling=SamplingConfig(max_new_tokens=10, stop=["\n"], seed=0))


def noisy(model: torch.nn.Module, scale: float = 2.0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(
                torch.randn(parameter.shape, generator=generator) * scale * parameter.std()
            )
    return model


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    _, heldout = make_splits(0, 0, 64)
    problems = [{"prompt": p["prompt"], "answer": p["answer"]} for p in heldout]
    return tokenizer, problems


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor.view(torch.uint8), after[name].view(torch.uint8)), name


def tokens(evaluation) -> int:
    return sum(sum(p.num_tokens) for r in evaluation.results for p in r.problems)


def chosen(evaluation) -> float:
    full = [r for r in evaluation.results if r.alpha not in evaluation.first_round_only]
    values = per_problem_values(full, "pass@8", 8)
    for row in values.values():
        row["score"] = row["passk"]
    return final_choice(values, keep_pass1=False, z_threshold=2.0, seed=0)[0]


def test_halving_keeps_the_full_evaluations_choice_and_restores_the_weights(case):
    tokenizer, problems = case
    snapshot = Snapshot.capture(load_base_model(tokenizer), step=0)
    model = noisy(load_base_model(tokenizer))
    sampler = HFSampler(model, tokenizer, progress=False)
    model.train()  # the modes come back too
    before = weights(model)
    run = dict(step=7, progress=False)
    full = evaluate(model, snapshot, problems, sampler, exact_match, CONFIG, alphas=ALPHAS, **run)
    assert_bitwise_equal(before, model)
    halved = evaluate_halving(
        model, snapshot, problems, sampler, exact_match, CONFIG, alphas=ALPHAS, first=2,
        select_metric="pass@8", **run,
    )  # fmt: skip
    assert_bitwise_equal(before, model)
    assert all(m.training for m in model.modules())

    assert chosen(full) == 0.25  # the constructed gap: 0.25 is far ahead
    assert 0.25 not in halved.first_round_only and chosen(halved) == 0.25
    assert 0.75 in halved.first_round_only  # far behind after two samples per problem
    by_alpha = {r.alpha: r for r in halved.results}
    assert [r.alpha for r in halved.results] == list(ALPHAS)
    for alpha, result in by_alpha.items():
        expected = 2 if alpha in halved.first_round_only else 8
        assert [len(p.correct) for p in result.problems] == [expected] * len(problems)
        assert ("pass@8" in result.metrics) == (expected == 8)
    # the current weights are the full evaluation's, sample for sample
    assert (
        by_alpha[CURRENT].problems == next(r for r in full.results if r.alpha == CURRENT).problems
    )
    assert tokens(halved) < 0.8 * tokens(full)
    # the README's bound: three alphas at n/4 first, at most two go on: <= 2.25 n per problem
    grid_samples = sum(
        len(p.correct) for r in halved.results if r.alpha != CURRENT for p in r.problems
    )
    assert grid_samples <= 2.25 * 8 * len(problems)


def test_the_weights_come_back_whatever_halving_drops(case):
    tokenizer, problems = case
    good, bad = load_base_model(tokenizer), noisy(load_base_model(tokenizer))
    dropped = {}
    for label, model, early, alphas in (
        ("none", bad, good, (0.25, CURRENT)),  # 0.25 is the best candidate: it goes on
        ("all", good, bad, (0.25, 0.5, CURRENT)),  # the current weights are best by far
        ("some", bad, good, (0.25, 0.5, 0.75, CURRENT)),
    ):
        before = weights(model)
        result = evaluate_halving(
            model, Snapshot.capture(early, step=0), problems, HFSampler(model, tokenizer,
            progress=False), exact_match, CONFIG, alphas=alphas, first=2, select_metric="pass@8",
            step=3, progress=False,
        )  # fmt: skip
        assert_bitwise_equal(before, model)
        dropped[label] = result.first_round_only
    assert dropped["none"] == ()
    assert dropped["all"] == (0.25, 0.5)
    assert 0 < len(dropped["some"]) < 3


def test_survivors_drop_the_clearly_worse_and_keep_at_most_the_better_half():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    jitter = lambda: (lambda x: x - x.mean())(rng.normal(0, 0.2, 200))  # noqa: E731
    close = {
        CURRENT: base,
        0.25: base + 0.01 + jitter(),
        0.5: base + 0.005 + jitter(),
        0.75: base + jitter(),
    }  # differences of 0.005 with paired standard errors of about 0.015
    # all within noise of each other: the better half by mean goes on
    assert survivors(close, keep=2) == (0.25, 0.5)
    assert survivors(close, keep=3) == (0.25, 0.5, 0.75)
    noise = rng.normal(0, 0.05, 200)
    far = {
        CURRENT: base,
        0.25: base + 0.3 + noise,
        0.5: base + 0.1 + noise,
        0.75: base - 0.2 + noise,
    }
    assert survivors(far, keep=2) == (0.25,)  # 0.5 and 0.75 are clearly worse than 0.25
    # the best alpha is never dropped, however few it may keep
    assert survivors(far, keep=1) == (0.25,)
    behind = {CURRENT: base + 0.5, 0.25: base + noise, 0.5: base - 0.1 + noise}
    assert survivors(behind, keep=2) == ()  # the current weights are far ahead
    # with keep_pass1, an alpha whose Pass@1 is clearly below the current weights' stops
    pass1 = {CURRENT: base, 0.25: base - 0.2 + noise, 0.5: base + 0.05 + noise, 0.75: base + 0.05}
    assert survivors(far, keep=2, pass1=pass1) == (0.5,)


def test_where_halving_applies():
    assert proxy_metric("pass@32", 8) == "pass@8"
    assert proxy_metric("maj@4", 8) == "maj@4"
    assert proxy_metric("mean_rho", 8) == "mean_rho"
    assert proxy_metric("jensen_bound@8", 8) is None
    config = EvalConfig(num_samples=32)
    assert first_round_samples(config, 0.25, "pass@32", "best") == 8
    assert first_round_samples(config, None, "pass@32", "best") is None
    assert first_round_samples(config, 0.25, "pass@32", 0.5) is None  # nothing to choose
    assert first_round_samples(config, 1.0, "pass@32", "best") is None  # nothing saved
    assert first_round_samples(config, 0.25, "jensen_bound@32", "best") is None
    budget = EvalConfig(num_samples=32, time_budget_s=60.0)
    assert first_round_samples(budget, 0.25, "pass@32", "best") is None
    assert HALVING_Z == 2.0


def test_when_halving_drops_every_alpha_the_run_keeps_the_current_weights(case, tmp_path):
    """The core driven by hand (no trainer): the snapshot is taken of noisy weights, the
    current weights are the clean base, so every interpolant is clearly worse after the first
    round. The final choice is then alpha = 1.0 (the weights as they are), from the one
    evaluation of the last step."""
    tokenizer, problems = case
    clean = load_base_model(tokenizer)
    model = noisy(load_base_model(tokenizer))
    core = WiSEFTCore(
        problems, tokenizer, snapshot_at=1, eval_every_n_steps=2, num_samples=8,
        alphas=(0.25, 0.5), sampling={"stop": ["\n"]}, max_new_tokens=10,
        sample_logging={"progress": False},
    )  # fmt: skip
    core.prepare(None, "nowhere")
    core.begin(RunContext(model, planned_steps=4, log_dir=tmp_path, snapshot_dir=tmp_path))
    core.step_ended(1)  # the snapshot: the noisy weights
    model.load_state_dict(clean.state_dict())  # "training" made them clean again
    before = weights(model)
    for step in (2, 3, 4):
        core.step_ended(step)
    core.training_ended(4)
    final = {r["alpha"]: r["num_samples"] for r in core.history if r["step"] == 4}
    assert final == {0.25: 2 * 64, 0.5: 2 * 64, CURRENT: 8 * 64}  # both stopped after round one
    assert core.spent["evaluations"] == 3  # the snapshot, step 2, step 4: nothing evaluated twice
    assert core.chosen_alpha == CURRENT and core.final_report["alpha"] == CURRENT
    assert_bitwise_equal(before, model)  # merged with alpha 1.0: the weights as they are


def test_a_result_of_the_current_weights_already_sampled_is_reused(case):
    """The end of a run that stopped at an evaluation: the grid is added to the current
    weights' result of that step, with or without halving, and their samples are not drawn (nor
    counted) again."""
    tokenizer, problems = case[0], case[1][:16]
    snapshot = Snapshot.capture(load_base_model(tokenizer), step=0)
    model = noisy(load_base_model(tokenizer))
    sampler = HFSampler(model, tokenizer, progress=False)
    run = dict(step=5, progress=False)
    earlier = evaluate(model, snapshot, problems, sampler, exact_match, CONFIG, **run)
    (current,) = earlier.results
    full = evaluate(model, snapshot, problems, sampler, exact_match, CONFIG, alphas=ALPHAS, **run)
    for first in (None, 2):
        again = evaluate_halving(
            model, snapshot, problems, sampler, exact_match, CONFIG, alphas=ALPHAS, first=first,
            select_metric="pass@8", current=current, **run,
        )  # fmt: skip
        assert again.reused == (CURRENT,)
        assert next(r for r in again.results if r.alpha == CURRENT) is current
        assert [r.alpha for r in again.results] == list(ALPHAS)
        grid_tokens = sum(sum(p.num_tokens) for r in again.results[:-1] for p in r.problems)
        assert again.generated_tokens() == grid_tokens
    # without halving, the grid is the full evaluation's, sample for sample
    assert [r.problems for r in full.results[:-1]] == [
        r.problems
        for r in evaluate_halving(
            model, snapshot, problems, sampler, exact_match, CONFIG, alphas=ALPHAS, first=None,
            select_metric="pass@8", current=current, **run,
        ).results[:-1]
    ]  # fmt: skip


class CountingSampler(HFSampler):
    """A real HFSampler that counts the evaluation ends it is told of (as vLLM's sleep mode
    would sleep at each)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ends = 0

    def end_evaluation(self) -> None:
        self.ends += 1


def test_the_rounds_end_the_samplers_evaluation_once(case):
    tokenizer, problems = case[0], case[1][:16]
    snapshot = Snapshot.capture(load_base_model(tokenizer), step=0)
    model = noisy(load_base_model(tokenizer))
    for first in (None, 2):
        sampler = CountingSampler(model, tokenizer, progress=False)
        result = evaluate_halving(
            model, snapshot, problems, sampler, exact_match, CONFIG, alphas=ALPHAS, first=first,
            select_metric="pass@8", step=1, progress=False,
        )  # fmt: skip
        assert sampler.ends == 1
    # the halving run had three rounds (current, first, second): still one end
    assert any(len(r.problems[0].correct) == 8 for r in result.results if r.alpha != CURRENT)
