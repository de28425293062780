"""Real PEFT LoRA models for the LoRA tests: a tiny Llama with LoRA on attention and MLP and a
fully trained lm_head (modules_to_save), and stand-ins for training that move what trains."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from wise_callback.demo.model import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(tokenizer, *, modules_to_save=("lm_head",), **config) -> PeftModel:
    """A seed-0 tiny Llama with a fresh, seeded LoRA adapter (B = 0: the base model's function);
    the same in every process."""
    base = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(base, LoraConfig(modules_to_save=list(modules_to_save), **options))


def train(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Move every trainable tensor (B too, so B @ A != 0), like some SFT steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                param.add_(scale * param.detach().abs().mean().clamp(min=0.1) * noise)


def dense(model: PeftModel, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """PEFT's own dense merge of a deep copy (`merge_and_unload`), in `dtype`."""
    return copy.deepcopy(model).to(dtype).merge_and_unload()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_merged_exactly(merged, tokenizer, latest_state, snapshot, alpha, ids) -> torch.Tensor:
    """The merged PeftModel's logits equal those of the latest adapter (`latest_state`, as
    training left it) interpolated with `snapshot` at `alpha`, and differ from the latest's own;
    returns the expected logits."""
    from wise_callback.weights import interpolated

    latest = lora_model(tokenizer)
    latest.load_state_dict(latest_state)
    with interpolated(latest.eval(), snapshot, alpha):
        expected = logits(latest, ids)
    assert torch.equal(logits(merged, ids), expected)
    assert not torch.allclose(logits(latest, ids), expected, atol=1e-3)
    return expected
