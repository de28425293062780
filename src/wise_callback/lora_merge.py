"""Offline WiSE-FT merge of two PEFT LoRA adapter folders into the exact interpolated adapter.

    W(alpha) = W0 + (1 - alpha) * s * B_e @ A_e + alpha * s * B_l @ A_l

is written as one adapter of rank 2r: A = [A_e; A_l], B = [(1 - alpha) c B_e, alpha c B_l], with
c = s(r) / s(2r) (2, or sqrt(2) with rsLoRA) so that PEFT's scaling for the doubled rank holds;
modules_to_save tensors are lerped. Both adapters must share their LoRA configuration (rank,
alpha, patterns, targets): then every layer's scaling ratio is c, whatever its alpha. The output
config is LATEST's with r and rank_pattern doubled, built in a temporary folder beside OUT_DIR
and renamed into place once complete; every check runs before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wise_callback.files import replace_folder
from wise_callback.lora import fill_b, peft_scaling
from wise_callback.merge import OTHER_WEIGHT_SUFFIXES, _check_output
from wise_callback.weights import check_alpha, name_mismatch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SHARED_SETTINGS = (
    "peft_type",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
)
"""Settings both adapters must agree on for the interpolant to be one adapter of rank 2r."""
A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
"""Name endings of A factors (rank on dim 0); B's name swaps A for B (rank on dim 1)."""


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a PEFT adapter (adapter_config.json) rather than a full model."""
    return (Path(folder) / CONFIG).is_file()


def merge_adapters(
    early_dir: str | os.PathLike,
    latest_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    alpha: float,
    *,
    force: bool = False,
    allow_extrapolation: bool = False,
) -> Path:
    """Write the exact interpolated LoRA adapter of EARLY and LATEST at `out_dir`."""
    alpha = check_alpha(alpha, allow_extrapolation)
    early, latest = Path(early_dir), Path(latest_dir)
    configs = [_read_config(folder) for folder in (early, latest)]
    out = Path(out_dir)
    _check_output(out, [early, latest], force)
    _check_same_settings(configs[0], configs[1], early, latest)
    tensors = interpolated_adapter(
        _read_tensors(early), _read_tensors(latest), alpha, configs[1].get("use_rslora", False)
    )
    config = {**configs[1], "r": 2 * configs[1]["r"]}
    config["rank_pattern"] = {k: 2 * v for k, v in (configs[1].get("rank_pattern") or {}).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in sorted(latest.iterdir()):
            weights = path.name in (CONFIG, WEIGHTS) or path.name.endswith(OTHER_WEIGHT_SUFFIXES)
            if path.is_file() and not weights:
                shutil.copy2(path, tmp / path.name)
        for path in tmp.iterdir():
            with path.open("rb") as file:
                os.fsync(file.fileno())
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def interpolated_adapter(
    early: dict[str, torch.Tensor],
    latest: dict[str, torch.Tensor],
    alpha: float,
    use_rslora: bool = False,
) -> dict[str, torch.Tensor]:
    """The rank-2r adapter tensors of theta(alpha), keyed like PEFT's saved adapter (A and B
    paired by name: B's name is A's with A replaced by B)."""
    _check_same_tensors(early, latest)
    ratio = peft_scaling(1.0, 1, use_rslora) / peft_scaling(1.0, 2, use_rslora)
    b_of_a = {}
    for name in latest:
        suffix = next((s for s in A_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            b_name = name[: -len(suffix)] + suffix.replace("_A", "_B")
            if b_name not in latest:
                raise ValueError(f"the adapters hold {name} but no {b_name}")
            b_of_a[name] = b_name
    b_names = set(b_of_a.values())
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in latest.items():
        if name in b_of_a:
            b_name = b_of_a[name]
            compute = torch.promote_types(tensor.dtype, torch.float32)
            b_latest = latest[b_name]
            b = torch.empty(b_latest.shape[0], 2 * b_latest.shape[1], dtype=compute)
            early_part = (early[b_name].to(compute), (1.0 - alpha) * ratio)
            fill_b(b, early_part, (b_latest.to(compute), alpha * ratio))
            merged[name] = torch.cat([early[name].to(tensor.dtype), tensor])
            merged[b_name] = b.to(b_latest.dtype)
        elif name in b_names:
            continue  # written with its A
        elif tensor.is_floating_point():  # modules_to_save
            merged[name] = torch.lerp(early[name].to(tensor.dtype), tensor, alpha)
        else:
            merged[name] = tensor
    return merged


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA is supported")
    for setting in ("use_dora", "lora_bias"):
        if config.get(setting):
            raise ValueError(f"{path}: {setting}=true is not supported by the exact merge")
    return config


def _check_same_settings(early: dict, latest: dict, early_dir: Path, latest_dir: Path) -> None:
    def canonical(value: Any) -> Any:
        return sorted(value) if isinstance(value, list) else value

    differ = [
        f"{key} ({early.get(key)!r} in {early_dir}, {latest.get(key)!r} in {latest_dir})"
        for key in SHARED_SETTINGS
        if canonical(early.get(key)) != canonical(latest.get(key))
    ]
    if differ:
        raise ValueError("the adapters' LoRA settings differ: " + "; ".join(differ))


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {WEIGHTS} (a pickled adapter_model.bin is not supported; "
            "re-save it with safe_serialization=True)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise ValueError(f"{path} is not a complete safetensors file (truncated?): {err}") from err


def _check_same_tensors(early: dict[str, torch.Tensor], latest: dict[str, torch.Tensor]) -> None:
    mismatch = name_mismatch(sorted(latest), sorted(early), "only in LATEST", "only in EARLY")
    if mismatch:
        raise ValueError("the adapters hold different tensors; " + mismatch)
    for name, tensor in latest.items():
        if early[name].shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name}: EARLY has {tuple(early[name].shape)}, "
                f"LATEST has {tuple(tensor.shape)}"
            )
