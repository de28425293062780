"""HFSampler on a real PEFT LoRA model inside `interpolated`: greedy tokens equal transformers'
`generate` on the dense merged model (PEFT's merge_and_unload of a deep copy)."""

from __future__ import annotations

import torch

from helpers import reference_greedy
from lora_helpers import dense, lora_model, train
from wise_callback.sampling import HFSampler, SamplingConfig
from wise_callback.weights import Snapshot, interpolated

PROMPTS = ["a", "The sum of 3 and 4 is", "xyz 12", "Question: what is 7*6?"]


def test_hf_sampler_generates_from_the_interpolated_adapter(tokenizer):
    model = lora_model(tokenizer)
    train(model, seed=1, scale=2.0)
    snapshot = Snapshot.capture(model)
    train(model, seed=2, scale=2.0)
    sampler = HFSampler(model, tokenizer, progress=False)
    config = SamplingConfig(temperature=0, max_new_tokens=16)

    def sample() -> list[list[int]]:
        return [c[0].token_ids for c in sampler.sample(PROMPTS, 2, config)]

    latest = sample()
    with interpolated(model, snapshot, 0.5):
        sampler.load_weights(model)
        mixed = sample()
        merged = dense(model, torch.float32)
    assert mixed == [reference_greedy(merged, tokenizer, p, 16) for p in PROMPTS]
    assert mixed != latest
    assert latest == [
        reference_greedy(dense(model, torch.float32), tokenizer, p, 16) for p in PROMPTS
    ]
    assert sample() == latest
