"""The weight engine: exact restore, agreement with a float64 lerp, pairing by name, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wise_callback.weights import (
    Snapshot,
    alpha_sweep,
    interpolate_,
    interpolated,
    named_float_tensors,
)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in named_float_tensors(module).items()}


def assert_state_equal(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    current = named_float_tensors(module)
    assert current.keys() == expected.keys()
    for name, tensor in current.items():
        assert torch.equal(tensor, expected[name]), name


def perturb(module: nn.Module, seed: int = 1) -> None:
    """Make `module` differ from its snapshot, like a few SFT steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in named_float_tensors(module).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def reference(early: dict[str, torch.Tensor], latest: dict[str, torch.Tensor], alpha: float):
    return {n: (1 - alpha) * early[n].double() + alpha * latest[n].double() for n in latest}


class Net(nn.Module):
    """Linear layers, a frozen parameter, a float buffer and an integer buffer."""

    def __init__(self, order: tuple[str, ...] = ("first", "second")) -> None:
        super().__init__()
        for name in order:
            setattr(self, name, nn.Linear(6, 6))
        self.norm = nn.BatchNorm1d(6)  # running stats: float buffers; num_batches_tracked: int
        self.frozen = nn.Parameter(torch.randn(3, 6), requires_grad=False)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    module = Net()
    with torch.no_grad():
        module.norm.running_mean.normal_()
    return module


def test_captures_float_params_and_buffers_by_name_frozen_included(net):
    snapshot = Snapshot.capture(net, step=7)
    assert set(snapshot.tensors) == {
        "first.weight", "first.bias", "second.weight", "second.bias",
        "norm.weight", "norm.bias", "frozen", "norm.running_mean", "norm.running_var",
    }  # fmt: skip
    assert snapshot.step == 7
    assert snapshot.nbytes == sum(p.numel() * 4 for p in snapshot.tensors.values())
    assert snapshot.tensors["frozen"].data_ptr() != net.frozen.data_ptr()  # a copy, not a view


def test_capture_casts_to_requested_dtype(net):
    snapshot = Snapshot.capture(net, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in snapshot.tensors.values())
    assert snapshot.nbytes == sum(t.numel() * 2 for t in snapshot.tensors.values())
    with pytest.raises(ValueError, match="floating-point"):
        Snapshot.capture(net, dtype=torch.int64)


def test_tied_weights_are_captured_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    snapshot = Snapshot.capture(model)
    assert list(snapshot.tensors) == ["0.weight"]
    perturb(model)
    interpolate_(model, snapshot, 0.5)
    assert model[1].weight is model[0].weight


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_interpolate_agrees_with_float64_reference(net, alpha):
    early = state(net)
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    interpolate_(net, snapshot, alpha)
    expected = reference(early, latest, alpha)
    for name, tensor in named_float_tensors(net).items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
    if alpha == 0.0:
        assert_state_equal(net, early)
    if alpha == 1.0:
        assert_state_equal(net, latest)


def test_extrapolation_only_on_request(net):
    early = state(net)
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    interpolate_(net, snapshot, 1.5, allow_extrapolation=True)
    expected = reference(early, latest, 1.5)
    for name, tensor in named_float_tensors(net).items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("staging_bytes", [None, 44], ids=["one-batch", "tiny-staging-buffer"])
def test_low_precision_snapshot_is_computed_in_module_dtype(net, monkeypatch, staging_bytes):
    """A bf16 snapshot streams through the staging buffer, here also in slices of 11 elements
    that split tensors and span several per batch."""
    if staging_bytes:
        monkeypatch.setattr("wise_callback.weights.STAGING_BYTES", staging_bytes)
    with torch.no_grad():  # a non-contiguous parameter is converted whole
        net.first.weight = nn.Parameter(net.first.weight.detach().t().contiguous().t())
    assert not net.first.weight.is_contiguous()
    snapshot = Snapshot.capture(net, dtype=torch.bfloat16)
    perturb(net)
    latest = state(net)
    interpolate_(net, snapshot, 0.3)
    expected = reference(snapshot.tensors, latest, 0.3)
    for name, tensor in named_float_tensors(net).items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
    with alpha_sweep(net, snapshot) as set_alpha:
        before = state(net)
        for alpha in (0.8, 0.1):
            set_alpha(alpha)
            expected = reference(snapshot.tensors, before, alpha)
            for name, tensor in named_float_tensors(net).items():
                torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
    assert_state_equal(net, before)


def test_pairs_by_name_not_position():
    torch.manual_seed(0)
    source = Net(order=("first", "second"))
    snapshot = Snapshot.capture(source)
    target = Net(order=("second", "first"))  # same names, registered in the other order
    assert list(named_float_tensors(target)) != list(snapshot.tensors)
    latest = state(target)
    interpolate_(target, snapshot, 0.5)
    expected = reference(snapshot.tensors, latest, 0.5)
    for name, tensor in named_float_tensors(target).items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)


def test_interpolated_restores_bit_for_bit(tiny_model):
    snapshot = Snapshot.capture(tiny_model)
    perturb(tiny_model)
    latest = state(tiny_model)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        logits_latest = tiny_model(ids).logits
    with interpolated(tiny_model, snapshot, 0.5) as model:
        assert model is tiny_model
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, logits_latest)
    assert_state_equal(tiny_model, latest)


def test_interpolated_restores_after_exception(net):
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    with pytest.raises(RuntimeError, match="body failed"), interpolated(net, snapshot, 0.4):
        assert not torch.equal(net.first.weight, latest["first.weight"])
        raise RuntimeError("body failed")
    assert_state_equal(net, latest)


def test_alpha_sweep_any_order_then_exact_restore(net):
    early = state(net)
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    with alpha_sweep(net, snapshot) as set_alpha:
        assert_state_equal(net, latest)  # nothing changes before the first set_alpha
        for alpha in (0.75, 0.25, 1.0, 0.5, 0.25):
            set_alpha(alpha)
            expected = reference(early, latest, alpha)
            for name, tensor in named_float_tensors(net).items():
                torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="outside"):
            set_alpha(2.0)
        torch.testing.assert_close(  # the bad alpha changed nothing
            net.first.weight.double(),
            reference(early, latest, 0.25)["first.weight"],
            rtol=0,
            atol=1e-6,
        )
    assert_state_equal(net, latest)
    with pytest.raises(RuntimeError, match="after its alpha_sweep block"):
        set_alpha(0.5)
    assert_state_equal(net, latest)


def test_alpha_sweep_restores_after_exception(net):
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    with pytest.raises(KeyError), alpha_sweep(net, snapshot) as set_alpha:
        set_alpha(0.1)
        set_alpha(0.9)
        raise KeyError("evaluation crashed")
    assert_state_equal(net, latest)


def test_save_load_round_trip(tmp_path, net):
    snapshot = Snapshot.capture(net, step=123)
    snapshot.tensors["half"] = torch.randn(2, 3).to(torch.bfloat16)
    path = tmp_path / "early.safetensors"
    snapshot.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["early.safetensors"]  # no temp file left
    loaded = Snapshot.load(path)
    assert loaded.step == 123
    assert list(loaded.tensors) == list(snapshot.tensors)
    for name, tensor in snapshot.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor), name
    Snapshot(snapshot.tensors).save(path)  # overwrite; no step
    assert Snapshot.load(path).step is None


# --- bad input: a clear error, raised before anything changes -------------------------------------


@pytest.mark.parametrize(
    ("alpha", "error", "match"),
    [
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        (-0.1, ValueError, "outside"),
        (1.01, ValueError, "outside"),
        (True, TypeError, "number"),
        ("0.5", TypeError, "number"),
        (None, TypeError, "number"),
    ],
)
def test_bad_alpha(net, alpha, error, match):
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    with pytest.raises(error, match=match):
        interpolate_(net, snapshot, alpha)
    with pytest.raises(error, match=match), interpolated(net, snapshot, alpha):
        pass
    assert_state_equal(net, latest)


def test_nonfinite_extrapolation_is_still_refused(net):
    snapshot = Snapshot.capture(net)
    with pytest.raises(ValueError, match="finite"):
        interpolate_(net, snapshot, math.inf, allow_extrapolation=True)


def test_missing_and_unexpected_names_are_listed(net):
    snapshot = Snapshot.capture(net)
    del snapshot.tensors["second.bias"]
    snapshot.tensors["extra.weight"] = torch.zeros(2)
    perturb(net)
    latest = state(net)
    with pytest.raises(ValueError, match=r"missing from the snapshot: second\.bias") as info:
        interpolate_(net, snapshot, 0.5)
    assert "not in the module: extra.weight" in str(info.value)
    with pytest.raises(ValueError, match=r"second\.bias"), interpolated(net, snapshot, 0.5):
        pass
    assert_state_equal(net, latest)


def test_shape_mismatch_names_tensor_and_shapes(net):
    snapshot = Snapshot.capture(net)
    snapshot.tensors["second.weight"] = torch.zeros(6, 5)
    perturb(net)
    latest = state(net)
    with pytest.raises(
        ValueError, match=r"second\.weight: module has \(6, 6\), snapshot has \(6, 5\)"
    ):
        interpolate_(net, snapshot, 0.5)
    assert_state_equal(net, latest)


def test_nonfinite_snapshot_values_are_refused_even_after_a_check(net):
    snapshot = Snapshot.capture(net)
    perturb(net)
    latest = state(net)
    interpolate_(net, snapshot, 1.0)  # checks the snapshot once and remembers it
    snapshot.tensors["first.bias"][2] = math.nan  # in-place change after that check
    snapshot.tensors["frozen"][0, 0] = -math.inf
    snapshot.tensors["second.bias"] = torch.full((6,), math.nan)  # replaced after that check
    with pytest.raises(ValueError, match="non-finite") as info:
        interpolate_(net, snapshot, 0.5)
    for name in ("first.bias", "frozen", "second.bias"):
        assert name in str(info.value)
    assert "second.weight" not in str(info.value)
    with pytest.raises(ValueError, match="non-finite"), alpha_sweep(net, snapshot):
        pass
    assert_state_equal(net, latest)


def test_missing_truncated_and_foreign_files(tmp_path, net):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        Snapshot.load(tmp_path / "nowhere.safetensors")
    path = tmp_path / "early.safetensors"
    Snapshot.capture(net).save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="truncated"):
        Snapshot.load(truncated)
    truncated.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        Snapshot.load(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a wise-callback snapshot"):
        Snapshot.load(foreign)
