"""WiSE-FT of a real PEFT LoRA model: the snapshot holds the adapter only, the interpolant is exact
on the effective weights (against a float64 reference from PEFT's own merge_and_unload of each end,
and against PEFT's rescale_adapter_scale), the restore is bit for bit, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import rescale_adapter_scale
from peft.utils import get_peft_model_state_dict

from helpers import assert_same, weights
from lora_helpers import TARGETS, dense, logits, lora_model, train
from wise_callback.demo.model import tiny_llama
from wise_callback.lora import TEMPORARY_ADAPTER
from wise_callback.weights import Snapshot, alpha_sweep, interpolate_, interpolated

ALPHA = 0.3
IDS = torch.arange(4, 40).reshape(3, 12)


@pytest.fixture
def ends(tokenizer):
    """(model holding the latest adapter, snapshot of the early one, float64 dense ends)."""
    model = lora_model(tokenizer)
    train(model, seed=1)
    snapshot = Snapshot.capture(model, step=10)
    early = dense(model)
    train(model, seed=2)
    return model, snapshot, early, dense(model)


def reference(early: torch.nn.Module, latest: torch.nn.Module, alpha: float) -> dict:
    """theta(alpha) of the dense float64 ends: W0 + (1 - alpha) dW_early + alpha dW_latest."""
    early_state = early.state_dict()
    return {n: torch.lerp(early_state[n], t, alpha) for n, t in latest.state_dict().items()}


def max_error(model: torch.nn.Module, expected: dict) -> float:
    got = dense(model).state_dict()
    assert got.keys() == expected.keys()
    return max(float((got[n] - expected[n]).abs().max()) for n in expected)


def test_snapshot_holds_exactly_the_adapter_bytes(ends):
    model, snapshot, _, _ = ends
    adapter = get_peft_model_state_dict(model)  # what save_pretrained writes
    assert snapshot.nbytes == sum(t.numel() * t.element_size() for t in adapter.values())
    assert len(snapshot.tensors) == len(adapter)
    base = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters())
    assert snapshot.nbytes < base / 3
    assert not any("base_layer" in n or "original_module" in n for n in snapshot.tensors)
    layout = snapshot.lora
    assert layout["adapter"] == "default" and len(layout["layers"]) == 2 * 7
    assert {v["r"] for v in layout["layers"].values()} == {4}
    assert {v["scaling"] for v in layout["layers"].values()} == {2.0}


VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "embedding-lora": {"target_modules": [*TARGETS, "embed_tokens"]},  # lora_embedding_A/B
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_interpolant_is_exact_and_lerping_a_and_b_is_not(tokenizer, variant):
    model = lora_model(tokenizer, **VARIANTS[variant])
    train(model, seed=1)
    snapshot = Snapshot.capture(model)
    early = dense(model)
    train(model, seed=2)
    expected = reference(early, dense(model), ALPHA)
    with interpolated(model, snapshot, ALPHA):
        error = max_error(model, expected)
        ours = logits(model, IDS)
    assert error < 1e-6, error
    print(f"max abs error of the effective weights vs float64 ({variant}): {error:.3g}")

    naive = lora_model(tokenizer, **VARIANTS[variant])
    naive.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in naive.named_parameters():
            if name in snapshot.tensors:
                param.lerp_(snapshot.tensors[name], 1 - ALPHA)
    naive_error = max_error(naive, expected)
    assert naive_error > 1e3 * max(error, 1e-9), (naive_error, error)
    print(f"lerping A and B one by one instead: max abs error {naive_error:.3g}")
    reference_model = tiny_llama(len(tokenizer), seed=0).double()
    reference_model.load_state_dict(expected)
    torch.testing.assert_close(ours.double(), logits(reference_model, IDS), rtol=0, atol=1e-4)
    assert not torch.allclose(logits(naive, IDS), ours, atol=1e-3)


def test_restore_is_bit_exact_also_on_error(ends):
    model, snapshot, _, _ = ends
    before, outputs = weights(model), logits(model, IDS)
    params = dict(model.named_parameters())
    with interpolated(model, snapshot, ALPHA):
        assert any(TEMPORARY_ADAPTER in name for name in model.state_dict())
        assert not torch.allclose(logits(model, IDS), outputs, atol=1e-3)
    assert_same(weights(model), before)
    with pytest.raises(KeyError), interpolated(model, snapshot, 0.9):
        raise KeyError("boom")
    assert_same(weights(model), before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(logits(model, IDS), outputs)
    assert model.active_adapters == ["default"]
    assert all(l_.r["default"] == 4 for l_ in model.modules() if hasattr(l_, "lora_A"))


def test_alpha_sweep_matches_interpolated_for_each_alpha(ends):
    model, snapshot, early, latest = ends
    before = weights(model)
    alphas = [0.0, 0.75, ALPHA, 1.0]
    single = []
    for alpha in alphas:
        with interpolated(model, snapshot, alpha):
            single.append(logits(model, IDS))
    with alpha_sweep(model, snapshot) as set_alpha:
        torch.testing.assert_close(logits(model, IDS), single[-1], rtol=0, atol=1e-5)
        for alpha, expected in zip(alphas, single, strict=True):
            set_alpha(alpha)
            assert torch.equal(logits(model, IDS), expected)
            assert max_error(model, reference(early, latest, alpha)) < 1e-6
    assert_same(weights(model), before)
    torch.testing.assert_close(single[-1], logits(model, IDS), rtol=0, atol=1e-5)
    assert not torch.allclose(single[0], single[-1], atol=1e-3)


def test_early_snapshot_at_step_0_equals_peft_rescale_adapter_scale(tokenizer):
    """An independent anchor: against the base (B = 0 at step 0), WiSE-FT is PEFT's rescaling."""
    model = lora_model(tokenizer, modules_to_save=())
    snapshot = Snapshot.capture(model, step=0)
    assert all(not t.any() for n, t in snapshot.tensors.items() if "lora_B" in n)
    train(model, seed=3)
    for alpha in (0.25, 0.6):
        with rescale_adapter_scale(model, alpha):
            expected = logits(model, IDS)
        with interpolated(model, snapshot, alpha):
            got = logits(model, IDS)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, logits(model, IDS), atol=1e-3)


def test_snapshot_file_round_trip_keeps_the_layout(ends, tmp_path):
    model, snapshot, _, _ = ends
    snapshot.save(tmp_path / "early.safetensors")
    loaded = Snapshot.load(tmp_path / "early.safetensors")
    assert loaded.lora == snapshot.lora and loaded.step == 10
    assert_same(loaded.tensors, snapshot.tensors)
    with interpolated(model, snapshot, ALPHA):
        expected = logits(model, IDS)
    with interpolated(model, loaded, ALPHA):
        assert torch.equal(logits(model, IDS), expected)


def test_final_merge_saves_an_adapter_that_reloads_to_the_merged_model(ends, tmp_path, tokenizer):
    from peft import PeftModel

    model, snapshot, early, latest = ends
    with interpolated(model, snapshot, ALPHA):
        expected = logits(model, IDS)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    dropout = q_proj.lora_dropout["default"]
    interpolate_(model, snapshot, ALPHA)
    assert model.peft_config["default"].r == 8
    assert q_proj.r["default"] == 8 and q_proj.scaling["default"] == 1.0  # 8 / 8
    assert q_proj.lora_dropout["default"] is dropout  # the user's settings stay
    assert torch.equal(logits(model, IDS), expected)
    assert max_error(model, reference(early, latest, ALPHA)) < 1e-6
    model.save_pretrained(tmp_path / "adapter")
    base = tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(logits(reloaded, IDS), expected)
    with pytest.raises(ValueError, match="shape mismatch"):  # the old layout no longer fits
        interpolate_(model, snapshot, ALPHA)


def test_mismatched_or_unsupported_input_is_refused_before_any_change(ends, tokenizer):
    model, snapshot, _, _ = ends
    before = weights(model)
    other_rank = lora_model(tokenizer, r=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        interpolate_(other_rank, snapshot, ALPHA)
    with pytest.raises(ValueError, match="missing from the snapshot"):
        bigger = lora_model(tokenizer, modules_to_save=("embed_tokens", "lm_head"))
        interpolate_(bigger, snapshot, 0.5)
    plain = tiny_llama(len(tokenizer), seed=0)
    with pytest.raises(ValueError, match="has no LoRA layers"):
        interpolate_(plain, snapshot, ALPHA)
    with pytest.raises(ValueError, match="holds no LoRA layout"):
        interpolate_(model, Snapshot.capture(plain), ALPHA)
    with pytest.raises(ValueError, match=r"alpha=1\.5"):
        interpolate_(model, snapshot, 1.5)
    dora = lora_model(tokenizer, use_dora=True)
    with pytest.raises(ValueError, match="LoRA variant"):
        Snapshot.capture(dora)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        interpolate_(model, snapshot, ALPHA)
    model.base_model.model.model.norm.weight.requires_grad_(False)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="exactly one active LoRA adapter"):
        interpolate_(model, snapshot, ALPHA)
    model.base_model.set_adapter("default")
    ia3 = get_peft_model(tiny_llama(len(tokenizer), seed=0), _ia3())
    with pytest.raises(ValueError, match="supports LoRA adapters"):
        Snapshot.capture(ia3)
    assert_same({n: t for n, t in weights(model).items() if "second" not in n}, before)


def _ia3():
    from peft import IA3Config

    return IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])


def test_dense_merged_model_saves_through_save_merged(ends, tmp_path, tokenizer):
    """The "dense merged model" option: the plain base model's save_pretrained with the merged
    state dict, through the same atomic save_merged the core uses for full models."""
    from transformers import AutoModelForCausalLM

    from wise_callback.lora_dense import merged_dense_state_dict
    from wise_callback.outputs import save_merged

    model, snapshot, _, _ = ends
    interpolate_(model, snapshot, ALPHA)
    state = merged_dense_state_dict(model)
    assert state.keys() == tiny_llama(len(tokenizer), seed=0).state_dict().keys()
    save_merged(model.get_base_model(), tokenizer, tmp_path / "dense", {"alpha": ALPHA}, state)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(logits(saved, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    assert not any("lora" in n for n in saved.state_dict())


def test_nested_blocks_on_one_model_are_refused(ends):
    model, snapshot, _, _ = ends
    before = weights(model)
    with (
        interpolated(model, snapshot, ALPHA),
        pytest.raises(RuntimeError, match="inside another alpha_sweep"),
        interpolated(model, snapshot, 0.9),
    ):
        pass
    assert_same(weights(model), before)


def test_a_bf16_snapshot_interpolates_within_bf16_rounding(tokenizer):
    model = lora_model(tokenizer)
    train(model, seed=1)
    early = dense(model)
    snapshot = Snapshot.capture(model, dtype=torch.bfloat16)
    assert {t.dtype for t in snapshot.tensors.values()} == {torch.bfloat16}
    train(model, seed=2)
    expected = reference(early, dense(model), ALPHA)
    with interpolated(model, snapshot, ALPHA):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        error = max_error(model, expected)
    assert 1e-6 < error < 1e-3  # the early adapter's bf16 rounding, nothing more
