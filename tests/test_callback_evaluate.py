"""The Lightning-free evaluation core (`wise_callback.evaluate`), as `wise-ft eval` uses it."""

from __future__ import annotations

import pytest
import torch

from callback_toy import toy_problems
from wise_callback import Snapshot
from wise_callback.demo.model import tiny_llama
from wise_callback.evaluate import EvalConfig, evaluate
from wise_callback.grading import exact_match
from wise_callback.sampling import HFSampler, SamplingConfig

CONFIG = EvalConfig(num_samples=4, sampling=SamplingConfig(max_new_tokens=6, seed=3))


def texts(evaluation, alpha: float) -> list[list[str]]:
    (result,) = [r for r in evaluation.results if r.alpha == alpha]
    return [p.completions for p in result.problems]


def test_alpha_grid_in_one_sweep_matches_separate_models(tokenizer, tiny_model):
    early = tiny_llama(len(tokenizer), seed=1, tokenizer=tokenizer)
    snapshot = Snapshot.capture(early)
    before = {n: t.clone() for n, t in tiny_model.state_dict().items()}
    tiny_model.train()
    rng = torch.get_rng_state()
    problems = toy_problems(3)
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    grid = evaluate(
        tiny_model, snapshot, problems, sampler, exact_match, CONFIG, alphas=(0.0, 0.5, 1.0),
        step=7, progress=False,
    )  # fmt: skip

    # weights, mode and the global RNG are untouched
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert tiny_model.training
    assert torch.equal(torch.get_rng_state(), rng)

    # alpha 0 is the early model, alpha 1 the current one: same seeds, same completions
    alone = evaluate(
        early, None, problems, HFSampler(early, tokenizer, progress=False), exact_match, CONFIG,
        step=7, progress=False,
    )  # fmt: skip
    assert texts(grid, 0.0) == texts(alone, 1.0)
    current = evaluate(tiny_model, None, problems, sampler, exact_match, CONFIG, step=7)
    assert texts(grid, 1.0) == texts(current, 1.0)
    assert texts(grid, 0.5) != texts(grid, 1.0)  # the interpolant is another model

    records = grid.records()
    assert [(r["step"], r["alpha"]) for r in records] == [(7, 0.0), (7, 0.5), (7, 1.0)]
    assert records[0] | {"alpha": 1.0} == alone.records()[0]
    assert set(CONFIG.metric_names()) <= set(records[0])
    assert grid.timings["weights_s"] > 0 and grid.timings["sample_s"] > 0


def test_bad_calls_fail_before_sampling(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    problems = toy_problems(2)
    with pytest.raises(ValueError, match="need a snapshot"):
        evaluate(tiny_model, None, problems, sampler, exact_match, CONFIG, alphas=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"initialised torch\.distributed group"):
        evaluate(tiny_model, None, problems, sampler, exact_match, CONFIG, world_size=2)
    with pytest.raises(ValueError, match="problem 1 lacks"):
        evaluate(tiny_model, None, [problems[0], {"prompt": "x"}], sampler, exact_match, CONFIG)
    with pytest.raises(ValueError, match=r"k=8 .* larger than num_samples=4"):
        EvalConfig(num_samples=4, ks=(1, 8))
    assert EvalConfig(num_samples=12).ks == (1, 2, 4, 8, 12)


class EndRecorder(HFSampler):
    """A real HFSampler with the optional end-of-evaluation hook (what VLLMSampler's sleep mode
    uses), recording when it is called."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[str] = []

    def sample(self, prompts, n, config):
        self.events.append("sample")
        return super().sample(prompts, n, config)

    def end_evaluation(self) -> None:
        self.events.append("end")


def test_the_sampler_is_told_when_an_evaluation_has_sampled_everything(tokenizer, tiny_model):
    sampler = EndRecorder(tiny_model, tokenizer, progress=False)
    snapshot = Snapshot.capture(tiny_llama(len(tokenizer), seed=1, tokenizer=tokenizer))
    config = EvalConfig(
        num_samples=2, problems_per_call=2, sampling=SamplingConfig(max_new_tokens=2)
    )
    evaluate(
        tiny_model, snapshot, toy_problems(4), sampler, exact_match, config,
        alphas=(0.5, 1.0), progress=False,
    )  # fmt: skip
    assert sampler.events == ["sample"] * 4 + ["end"]  # 2 calls per alpha, then the hook once
