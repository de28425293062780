"""HFSampler on a real tiny Llama: counts, seeds, stop strings and EOS, modes, greedy equality with
`model.generate` (also on an interpolant), and FSDP2 across two real processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers import reference_greedy
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.sampling import Completion, HFSampler, Sampler, SamplingConfig
from wise_callback.weights import Snapshot, interpolated

PROMPTS = ["a", "The sum of 3 and 4 is", "xyz 12", "Question: what is 7*6?"]


def perturbed(model):
    """An 'early checkpoint': the model with its weights visibly moved."""
    snapshot = Snapshot.capture(model)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in snapshot.tensors.items():
        noise = torch.randn(tensor.shape, generator=generator)
        snapshot.tensors[name] = tensor + 0.5 * tensor.std() * noise if tensor.dim() > 1 else tensor
    return snapshot


def test_counts_types_and_protocol(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    assert isinstance(sampler, Sampler)
    out = sampler.sample(PROMPTS, 3, SamplingConfig(max_new_tokens=12))
    assert [len(completions) for completions in out] == [3] * len(PROMPTS)
    for completion in (c for completions in out for c in completions):
        assert isinstance(completion, Completion)
        assert 1 <= len(completion.token_ids) <= 12
        assert completion.finish_reason in ("stop", "length")
        assert completion.logprob is None
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert sampler.sample([], 3, SamplingConfig()) == []


def test_token_id_prompts_equal_string_prompts(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    config = SamplingConfig(max_new_tokens=10, seed=4)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert sampler.sample(ids, 2, config) == sampler.sample(PROMPTS, 2, config)


def test_greedy_matches_generate_with_padding_and_batches(tiny_model, tokenizer):
    config = SamplingConfig(temperature=0, max_new_tokens=16)
    for budget in (10**6, 1):  # all prompts in one padded batch; one prompt per batch
        out = HFSampler(tiny_model, tokenizer, token_budget=budget, progress=False).sample(
            PROMPTS, 2, config
        )
        for prompt, completions in zip(PROMPTS, out, strict=True):
            reference = reference_greedy(tiny_model, tokenizer, prompt, 16)
            assert [c.token_ids for c in completions] == [reference, reference]


def test_greedy_after_interpolation_matches_generate_on_the_interpolant(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    config = SamplingConfig(temperature=0, max_new_tokens=16)
    latest = [c[0].token_ids for c in sampler.sample(PROMPTS, 1, config)]
    with interpolated(tiny_model, perturbed(tiny_model), 0.5):
        sampler.load_weights(tiny_model)
        out = [c[0].token_ids for c in sampler.sample(PROMPTS, 1, config)]
        expected = [reference_greedy(tiny_model, tokenizer, p, 16) for p in PROMPTS]
    assert out == expected
    assert out != latest  # the interpolant really generates differently


def test_same_seed_same_samples_independent_of_batching_and_order(tiny_model, tokenizer):
    config = SamplingConfig(max_new_tokens=20, seed=7)
    big = HFSampler(tiny_model, tokenizer, progress=False)
    small = HFSampler(tiny_model, tokenizer, token_budget=1, progress=False)

    def ids(out):
        return [[c.token_ids for c in completions] for completions in out]

    first = ids(big.sample(PROMPTS, 4, config))
    assert ids(big.sample(PROMPTS, 4, config)) == first
    assert ids(small.sample(PROMPTS, 4, config)) == first
    assert ids(big.sample(PROMPTS[::-1], 4, config))[::-1] == first
    assert ids(big.sample(PROMPTS[:1], 4, config)) == first[:1]
    other = ids(big.sample(PROMPTS, 4, SamplingConfig(max_new_tokens=20, seed=8)))
    assert other != first
    assert len({tuple(t) for t in first[1]}) > 1  # n samples of one prompt differ


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    greedy = sampler.sample(PROMPTS, 1, SamplingConfig(temperature=0, max_new_tokens=12))
    for config in (
        SamplingConfig(top_k=1, max_new_tokens=12),
        SamplingConfig(top_p=1e-6, max_new_tokens=12),
    ):
        out = sampler.sample(PROMPTS, 3, config)
        assert [[c.token_ids for c in cs] for cs in out] == [[g[0].token_ids] * 3 for g in greedy]


def test_stop_strings_end_completions_and_are_cut_from_the_text(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    free = sampler.sample(PROMPTS, 1, SamplingConfig(temperature=0, max_new_tokens=16))
    full = free[1][0].text
    stop = full[6:8]
    index = full.find(stop)
    out = sampler.sample(PROMPTS, 2, SamplingConfig(temperature=0, max_new_tokens=16, stop=[stop]))
    completion = out[1][0]
    assert completion.finish_reason == "stop"
    assert completion.text == full[:index]
    assert tokenizer.decode(completion.token_ids).endswith(stop)  # ids stop at the completing token
    assert len(completion.token_ids) < 16


def test_eos_ends_a_completion_and_is_kept_in_the_ids_only(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    out = sampler.sample(PROMPTS, 16, SamplingConfig(max_new_tokens=40, seed=0, logprobs=True))
    completions = [c for cs in out for c in cs]
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(completions)  # the random model emits EOS sometimes
    for c in stopped:
        assert c.token_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in c.token_ids[:-1]
        assert c.text == tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
    for c in completions:
        assert c.finish_reason == "stop" or len(c.token_ids) == 40
        assert c.logprob is not None and c.logprob < 0


def test_logprob_is_the_sum_of_raw_token_logprobs(tiny_model, tokenizer):
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    config = SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=8, logprobs=True)
    completion = sampler.sample([prompt], 1, config)[0][0]
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([prompt + completion.token_ids])).logits[0].float()
    steps = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    expected = steps.gather(1, torch.tensor(completion.token_ids)[:, None]).sum()
    assert completion.logprob == pytest.approx(float(expected), abs=1e-3)


def test_modes_restored_and_weights_untouched(tiny_model, tokenizer):
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # a mixed state must come back exactly
    modes = [m.training for m in tiny_model.modules()]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    HFSampler(tiny_model, tokenizer, progress=False).sample(
        PROMPTS, 2, SamplingConfig(max_new_tokens=5)
    )
    assert [m.training for m in tiny_model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


@pytest.mark.parametrize(
    ("prompts", "n", "message"),
    [
        (["ok", ""], 2, "prompt 1 is empty"),
        ([[5, 6], [7, 10**6]], 2, "prompt 1 has token ids outside"),
        ("a string", 2, "list of strings"),
        (["ok"], 0, "n \\(completions per prompt\\)"),
    ],
)
def test_bad_input_is_refused_before_any_work(tiny_model, tokenizer, prompts, n, message):
    tiny_model.train()
    with pytest.raises((ValueError, TypeError), match=message):
        HFSampler(tiny_model, tokenizer, progress=False).sample(prompts, n, SamplingConfig())
    assert tiny_model.training


def test_bad_config_and_foreign_module_are_refused(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(TypeError, match="stop must be a sequence"):
        SamplingConfig(stop="\n")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    sampler = HFSampler(tiny_model, tokenizer, progress=False)
    wrapper = torch.nn.ModuleDict({"lm": tiny_model})
    sampler.load_weights(wrapper)  # a LightningModule-style wrapper holding the model is fine
    with pytest.raises(ValueError, match="generates with the model it was built with"):
        sampler.load_weights(tiny_llama(len(tokenizer), seed=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, port: int, prompts_per_rank, configs, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        tokenizer = char_tokenizer()
        model = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
        sampler = HFSampler(model, tokenizer, token_budget=200, progress=False)
        out = [
            [[c.token_ids for c in cs] for cs in sampler.sample(prompts_per_rank[rank], 3, config)]
            for config in configs
        ]
        # a rank with nothing to sample still joins every forward of the other's batches
        uneven = sampler.sample(PROMPTS[:2] if rank == 0 else [], 2, configs[1])
        results[rank] = [*out, [[c.token_ids for c in cs] for cs in uneven]]
    finally:
        torch.distributed.barrier()  # no rank tears gloo down while its peer still talks
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_model_two_processes_match_one_process(tokenizer):
    # Uneven work: rank 0 has three prompts (several batches under the small budget), rank 1 one,
    # so the ranks must step in lockstep or they deadlock.
    prompts_per_rank = [PROMPTS[:3], PROMPTS[3:]]
    configs = [
        SamplingConfig(temperature=0, max_new_tokens=12),
        SamplingConfig(max_new_tokens=12, seed=5, stop=("e",)),
    ]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _fsdp_worker,
            args=(_free_port(), prompts_per_rank, configs, results),
            nprocs=2,
            start_method="spawn",
        )
        results = dict(results)
    model = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    sampler = HFSampler(model, tokenizer, progress=False)
    for rank in range(2):
        expected = [
            [[c.token_ids for c in cs] for cs in sampler.sample(prompts_per_rank[rank], 3, config)]
            for config in configs
        ]
        uneven = sampler.sample(PROMPTS[:2] if rank == 0 else [], 2, configs[1])
        expected.append([[c.token_ids for c in cs] for cs in uneven])
        assert results[rank] == expected
