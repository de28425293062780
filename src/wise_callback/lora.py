"""WiSE-FT for PEFT LoRA models: snapshot the adapter only, interpolate effective weights exactly.

For every adapted layer (frozen base W0, LoRA factors A, B, scaling s):

    W(alpha) = W0 + (1 - alpha) * s_e * B_e @ A_e + alpha * s_l * B_l @ A_l

Lerping A and B one by one is *not* this (the update is a product). It is itself a LoRA update of
rank r_e + r_l, so it is built without touching the (possibly quantized) base weights:

    A = [A_e; A_l]      B = [(1 - alpha) * s_e / s * B_e,  alpha * s_l / s * B_l]

with s the scaling PEFT computes for the new rank (lora_alpha / r, or / sqrt(r) with rsLoRA), so
PEFT's own forward, `save_pretrained` and `from_pretrained` stay valid. `modules_to_save` copies
(e.g. a fully trained lm_head) are lerped like full weights.

`alpha_sweep` installs that rank-concatenated adapter in every LoRA layer under a temporary
adapter name and makes it the layer's active adapter; the user's adapter is never written to, so
the restore is exact by construction. Under FSDP2 the sharded A and B are all-gathered for this
(small adapter tensors only): a shard-local concatenation along the rank dim is impossible,
because FSDP2 fixes each parameter's shape and every forward needs the whole rank-2r factors.
`commit_` (the final merge) puts the concatenated adapter in place of the user's one (under
FSDP2: as whole plain tensors on every rank) and doubles r in its config. PEFT is imported
lazily; nothing here runs for a model without LoRA layers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wise_callback.sharding import is_dtensor, local_tensor
from wise_callback.weights import (
    Snapshot,
    check_alpha,
    name_listing,
    named_float_tensors,
    pair_by_name,
    sweep_pairs,
)

TEMPORARY_ADAPTER = "wise_ft_interpolant"
"""The adapter name under which `alpha_sweep` installs the interpolant for the block's duration."""


def has_lora(module: torch.nn.Module) -> bool:
    """Whether `module` holds PEFT tuner layers (cheap: False unless peft was imported)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    wrappers = sys.modules.get("peft.utils.other")
    kinds = tuple(
        cls
        for cls in (
            getattr(tuners, "BaseTunerLayer", None),
            getattr(wrappers, "AuxiliaryTrainingWrapper", None),
        )
        if cls is not None
    )
    return bool(kinds) and any(isinstance(m, kinds) for m in module.modules())


@dataclass
class AdaptedLayer:
    """One adapted layer: its module path, the PEFT layer and where its factors live."""

    name: str
    module: Any
    embedding: bool

    @property
    def factor_names(self) -> tuple[str, str]:
        """Attribute names of the A and B containers (Linear: modules, Embedding: parameters)."""
        return ("lora_embedding_A", "lora_embedding_B") if self.embedding else ("lora_A", "lora_B")

    def keys(self, adapter: str) -> tuple[str, str]:
        """The tensor names of A and B for `adapter`, relative to the root module."""
        suffix = "" if self.embedding else ".weight"
        a, b = self.factor_names
        return f"{self.name}.{a}.{adapter}{suffix}", f"{self.name}.{b}.{adapter}{suffix}"

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (getattr(self.module, f)[adapter] for f in self.factor_names)
        return (a, b) if self.embedding else (a.weight, b.weight)


class LoraModel:
    """The one active LoRA adapter of a module (a PeftModel, or anything holding one), checked.

    Refuses what the interpolation cannot honour: other PEFT methods, several active adapters,
    LoRA variants (DoRA, ...), `lora_bias`, merged adapters, non-Linear/Embedding LoRA layers, and
    trainable parameters outside the adapter (they would be neither snapshotted nor saved).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer as PeftLoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

        self.root = module
        layers, wrappers, active = [], [], set()
        for name, sub in module.named_modules():
            if isinstance(sub, ModulesToSaveWrapper):
                wrappers.append((name, sub))
                active.add(tuple(sub.active_adapters))
            elif isinstance(sub, (AuxiliaryTrainingWrapper, BaseTunerLayer)) and not isinstance(
                sub, PeftLoraLayer
            ):
                raise ValueError(
                    f"{name} is a {type(sub).__name__}: WiSE-FT for PEFT supports LoRA adapters "
                    "(and modules_to_save) only"
                )
            elif isinstance(sub, PeftLoraLayer):
                layers.append((name, sub))
                active.add(tuple(sub.active_adapters))
        if (TEMPORARY_ADAPTER,) in active:
            raise RuntimeError("the model is inside another alpha_sweep/interpolated block")
        if len(active) != 1 or len(next(iter(active))) != 1:
            raise ValueError(
                f"WiSE-FT needs exactly one active LoRA adapter, found {sorted(active)}; "
                "call model.set_adapter(name) first"
            )
        self.adapter: str = next(iter(active))[0]
        self.layers = [
            layer for name, sub in layers if (layer := self._layer(name, sub)) is not None
        ]
        if not self.layers:
            raise ValueError(f"no LoRA layer holds the active adapter {self.adapter!r}")
        self.saved_modules = {
            name: wrapper.modules_to_save[self.adapter]
            for name, wrapper in wrappers
            if self.adapter in wrapper.modules_to_save
        }
        self._check_nothing_else_trains()

    def _layer(self, name: str, module: Any) -> AdaptedLayer | None:
        adapter = self.adapter
        embedding = adapter in module.lora_embedding_A
        if not embedding and adapter not in module.lora_A:
            return None
        problem = None
        if adapter in module.lora_variant:
            problem = f"a LoRA variant ({type(module.lora_variant[adapter]).__name__}, e.g. DoRA)"
        elif module.lora_bias.get(adapter, False):
            problem = "lora_bias=True"
        elif module.merged:
            problem = "adapters merged into the base weights (call unmerge_adapter first)"
        elif not embedding and not (
            type(module.lora_A[adapter]) is nn.Linear and type(module.lora_B[adapter]) is nn.Linear
        ):
            problem = f"LoRA factors of type {type(module.lora_A[adapter]).__name__}"
        if problem:
            raise ValueError(f"{name}: {problem} is not supported by WiSE-FT's exact interpolation")
        return AdaptedLayer(name, module, embedding)

    def _check_nothing_else_trains(self) -> None:
        ours = set(self.tensors())
        others = [n for n, p in self.root.named_parameters() if p.requires_grad and n not in ours]
        if others:
            raise ValueError(
                "trainable parameters outside the LoRA adapter and modules_to_save would be "
                f"neither interpolated nor saved with it: {name_listing(others)}; add their "
                "modules to modules_to_save or freeze them"
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """What training changes, by name: A and B of every layer, then the modules_to_save
        copies' floating-point tensors (local shards under FSDP2)."""
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            pairs = zip(layer.keys(self.adapter), layer.factors(self.adapter), strict=True)
            for key, factor in pairs:
                tensors[key] = local_tensor(factor).detach()
        for name, module in self.saved_modules.items():
            for key, tensor in named_float_tensors(module).items():
                tensors[f"{name}.modules_to_save.{self.adapter}.{key}"] = tensor
        return tensors

    def layout(self) -> dict[str, Any]:
        """What a snapshot records besides tensors: adapter name, each layer's rank and scaling."""
        return {
            "adapter": self.adapter,
            "layers": {
                layer.name: {
                    "r": layer.module.r[self.adapter],
                    "scaling": float(layer.module.scaling[self.adapter]),
                }
                for layer in self.layers
            },
        }

    def pair(self, snapshot: Snapshot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Check that `snapshot` is of this adapter's layout; the modules_to_save pairs."""
        layout = snapshot.lora
        if layout is None:
            raise ValueError(
                "the snapshot holds no LoRA layout (it was captured from a model without LoRA "
                "layers); capture it from this PeftModel"
            )
        if layout["adapter"] != self.adapter:
            raise ValueError(
                f"the snapshot is of adapter {layout['adapter']!r}, the model's active adapter is "
                f"{self.adapter!r}"
            )
        current = self.tensors()
        pairs = pair_by_name(current, snapshot)
        ranks = {layer.name: layer.module.r[self.adapter] for layer in self.layers}
        differ = [n for n, r in ranks.items() if layout["layers"].get(n, {}).get("r") != r]
        if differ or set(layout["layers"]) != set(ranks):
            raise ValueError(
                f"LoRA layers or ranks differ from the snapshot's: {name_listing(differ)}"
            )
        factors = {key for layer in self.layers for key in layer.keys(self.adapter)}
        return [pair for name, pair in zip(current, pairs, strict=True) if name not in factors]

    def concatenations(self, snapshot: Snapshot) -> list[Concatenation]:
        """The rank-concatenated interpolant of every layer, allocated and ready to `fill`
        (after `pair` checked the snapshot)."""
        layers = snapshot.lora["layers"] if snapshot.lora else {}
        return [
            Concatenation.build(layer, self.adapter, layers[layer.name], snapshot)
            for layer in self.layers
        ]


@dataclass
class Concatenation:
    """One layer's interpolant as a rank-(r_e + r_l) adapter: A fixed, B refilled per alpha."""

    layer: AdaptedLayer
    a: torch.Tensor
    b: torch.Tensor
    b_early: torch.Tensor
    b_latest: torch.Tensor
    rank: int
    scaling: float
    early_ratio: float
    latest_ratio: float

    @classmethod
    def build(
        cls, layer: AdaptedLayer, adapter: str, early_layout: dict[str, Any], snapshot: Snapshot
    ) -> Concatenation:
        a_latest, b_latest = (whole_tensor(t) for t in layer.factors(adapter))
        a_key, b_key = layer.keys(adapter)
        a_early = whole_tensor(snapshot.tensors[a_key], like=layer.factors(adapter)[0])
        b_early = whole_tensor(snapshot.tensors[b_key], like=layer.factors(adapter)[1])
        a_early, b_early = (t.to(b_latest.device, b_latest.dtype) for t in (a_early, b_early))
        module = layer.module
        rank = early_layout["r"] + module.r[adapter]
        scaling = peft_scaling(module.lora_alpha[adapter], rank, module.use_rslora[adapter])
        return cls(
            layer=layer,
            a=torch.cat([a_early, a_latest], dim=0),
            b=torch.empty(b_latest.shape[0], rank, dtype=b_latest.dtype, device=b_latest.device),
            b_early=b_early,
            b_latest=b_latest,
            rank=rank,
            scaling=scaling,
            early_ratio=early_layout["scaling"] / scaling,
            latest_ratio=float(module.scaling[adapter]) / scaling,
        )

    def fill(self, alpha: float) -> None:
        """B <- [(1 - alpha) s_e / s B_e, alpha s_l / s B_l], written in place."""
        fill_b(
            self.b,
            (self.b_early, (1.0 - alpha) * self.early_ratio),
            (self.b_latest, alpha * self.latest_ratio),
        )

    def install(self, adapter: str, like: str, requires_grad: bool = False) -> None:
        """Put A and B into the layer under `adapter`, configured like adapter `like`."""
        module = self.layer.module
        a = nn.Parameter(self.a, requires_grad=requires_grad)
        b = nn.Parameter(self.b, requires_grad=requires_grad)
        if self.layer.embedding:
            module.lora_embedding_A[adapter], module.lora_embedding_B[adapter] = a, b
        else:
            module.lora_A[adapter], module.lora_B[adapter] = _linear(a), _linear(b)
        module.lora_dropout[adapter] = module.lora_dropout[like]  # the same module: no copy
        module.r[adapter] = self.rank
        module.scaling[adapter] = self.scaling
        for setting in ("lora_alpha", "use_rslora", "lora_bias"):
            getattr(module, setting)[adapter] = getattr(module, setting)[like]


def uninstall(layer: AdaptedLayer, adapter: str) -> None:
    """Remove what `Concatenation.install` put under `adapter`."""
    module = layer.module
    for container in (*layer.factor_names, "lora_dropout"):
        del getattr(module, container)[adapter]
    for setting in ("r", "scaling", "lora_alpha", "use_rslora", "lora_bias"):
        getattr(module, setting).pop(adapter, None)


def fill_b(b: torch.Tensor, *parts: tuple[torch.Tensor, float]) -> None:
    """Write each (B_i, weight_i) as weight_i * B_i into consecutive rank columns of `b`."""
    start = 0
    for factor, weight in parts:
        stop = start + factor.shape[1]
        torch.mul(factor, weight, out=b[:, start:stop])
        start = stop


def peft_scaling(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    """The scaling PEFT gives a LoRA layer of this rank (peft LoraLayer.update_layer)."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def capture_layout(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and layout a snapshot of a LoRA model holds (no copies made here)."""
    model = LoraModel(module)
    return model.tensors(), model.layout()


@contextmanager
def alpha_sweep(
    module: torch.nn.Module, snapshot: Snapshot, *, allow_extrapolation: bool = False
) -> Iterator[Callable[[float], None]]:
    """`weights.alpha_sweep` for a LoRA model: the interpolant as a temporary adapter, the
    modules_to_save lerped in place; on exit the user's adapter is active again, untouched."""
    model = LoraModel(module)
    saved_pairs = model.pair(snapshot)
    with torch.no_grad():
        concatenations = model.concatenations(snapshot)
        for concatenation in concatenations:
            concatenation.fill(1.0)  # until the first set_alpha: the latest weights, as on entry
    active = {id(layer.module): layer.module._active_adapter for layer in model.layers}
    installed: list[AdaptedLayer] = []
    try:
        with sweep_pairs(saved_pairs, allow_extrapolation) as set_saved_alpha:

            def set_alpha(alpha: float) -> None:
                alpha = check_alpha(alpha, allow_extrapolation)
                set_saved_alpha(alpha)
                with torch.no_grad():
                    for concatenation in concatenations:
                        concatenation.fill(alpha)

            for concatenation in concatenations:
                concatenation.install(TEMPORARY_ADAPTER, like=model.adapter)
                installed.append(concatenation.layer)
                concatenation.layer.module._active_adapter = [TEMPORARY_ADAPTER]
            yield set_alpha
    finally:
        for layer in installed:
            layer.module._active_adapter = active[id(layer.module)]
            uninstall(layer, TEMPORARY_ADAPTER)


def commit_(module: torch.nn.Module, snapshot: Snapshot, alpha: float) -> None:
    """`weights.interpolate_` for a LoRA model, the final merge: the active adapter becomes the
    exact interpolant of rank r_e + r_l and its PEFT config says so (r and rank_pattern doubled),
    so `save_pretrained` writes an adapter that `PeftModel.from_pretrained` reloads as it is.

    The adapter's parameters are new objects afterwards: an optimizer built before does not see
    them. Under FSDP2 they are whole plain tensors on every rank (FSDP2 fixes the shapes of the
    parameters it shards; the rank-2r factors are small), the base and modules_to_save stay
    sharded, and the model runs and saves (`full_state_dict`, `save_pretrained`) as before.
    Everything is computed before the model changes.
    """
    model = LoraModel(module)
    saved_pairs = model.pair(snapshot)
    config = _config(module, model.adapter)
    with torch.no_grad():
        concatenations = model.concatenations(snapshot)
        for concatenation in concatenations:
            concatenation.fill(alpha)
        saved = [torch.lerp(e.to(t.device, t.dtype), t, alpha) for t, e in saved_pairs]
        for concatenation in concatenations:
            requires_grad = concatenation.layer.factors(model.adapter)[0].requires_grad
            concatenation.install(model.adapter, like=model.adapter, requires_grad=requires_grad)
        torch._foreach_copy_([t for t, _ in saved_pairs], saved)
    if config is not None:
        config.r = 2 * config.r
        config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}


def _config(module: torch.nn.Module, adapter: str) -> Any:
    """The LoraConfig the model saves for `adapter` (None for a bare module without one)."""
    for sub in module.modules():
        configs = getattr(sub, "peft_config", None)
        if isinstance(configs, dict) and adapter in configs:
            return configs[adapter]
    return None


def whole_tensor(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor: a DTensor gathered; with `like` (a DTensor parameter), `tensor` is this
    rank's local shard of a tensor sharded like it, gathered the same way."""
    if like is not None and is_dtensor(like):
        from torch.distributed.tensor import DTensor

        spec: Any = like  # a DTensor
        tensor = DTensor.from_local(
            tensor.to(like.device),
            spec.device_mesh,
            spec.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _linear(weight: nn.Parameter) -> nn.Linear:
    """An nn.Linear without bias around `weight` (out, in), allocated nowhere else."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = weight
    return linear
