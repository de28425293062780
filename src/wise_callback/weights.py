"""The weight engine: snapshot an early checkpoint and build theta(alpha) in place.

    theta(alpha) = (1 - alpha) * theta_early + alpha * theta_latest      # alpha = weight on latest

Tensors are paired by *name* (never by position): every floating-point parameter and buffer of the
module, frozen ones included, tied weights once. Under FSDP2 (DTensor parameters) only the local
shards are touched: interpolation is elementwise, so no rank needs another rank's data.

A module holding PEFT LoRA layers (a `peft.PeftModel`) is handled by `wise_callback.lora`, imported
only then: its snapshot holds the adapter and modules_to_save only, and theta(alpha) is the exact
interpolant of the effective weights (see that module). Otherwise this module imports nothing of
the project but the leaf `files` and `sharding` modules.
"""

from __future__ import annotations

import json
import math
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wise_callback.files import write_atomically
from wise_callback.sharding import local_tensor

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

STAGING_BYTES = 64 * 2**20
"""Size of the buffer through which a snapshot on another device or in another dtype streams."""

_FORMAT_KEY = "wise_callback.snapshot"
_FORMAT_VERSION = "1"
_LIST_LIMIT = 10


def named_float_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point parameters and buffers by name, as plain (local) tensors.

    Tied weights appear once, under their first name. DTensors (FSDP2) give their local shard.
    """
    tensors: dict[str, torch.Tensor] = {}
    named = [*module.named_parameters(remove_duplicate=True), *module.named_buffers()]
    for name, tensor in named:
        if tensor is None or not tensor.is_floating_point():
            continue
        tensors[name] = local_tensor(tensor).detach()
    return tensors


def snapshot_names(module: torch.nn.Module) -> list[str]:
    """The tensor names a snapshot of `module` holds (of a LoRA model: adapter and
    modules_to_save only), e.g. to check that a snapshot file belongs to the model."""
    lora = _lora(module)
    return list(lora.capture_layout(module)[0] if lora else named_float_tensors(module))


@dataclass(eq=False)
class Snapshot:
    """A copy of a module's floating-point parameters and buffers, keyed by name.

    Under FSDP2 `tensors` holds this rank's local shards (each rank saves and loads its own
    file). `step` is the training step it was taken at, if known. `lora` is set for a snapshot of
    a LoRA model: adapter name and each layer's rank and scaling (`wise_callback.lora`).
    """

    tensors: dict[str, torch.Tensor]
    step: int | None = None
    lora: dict[str, Any] | None = None
    _checked: dict[str, tuple[weakref.ref[torch.Tensor], int]] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def capture(
        cls,
        module: torch.nn.Module,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        step: int | None = None,
    ) -> Snapshot:
        """Copy the module's weights to `device` (CPU by default, pinned when an accelerator is
        in use so that interpolation can stream it back fast), optionally cast to `dtype`. Of a
        LoRA model only the adapter and modules_to_save are copied, never the frozen base."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Snapshot dtype must be a floating-point dtype, got {dtype}")
        device = torch.device(device)
        lora = _lora(module)
        if lora:
            tensors, layout = lora.capture_layout(module)
        else:
            tensors, layout = named_float_tensors(module), None
        copies: dict[str, torch.Tensor] = {}
        asynchronous = False
        with torch.no_grad():
            for name, tensor in tensors.items():
                pin = device.type == "cpu" and tensor.device.type != "cpu"
                copy = torch.empty(
                    tensor.shape, dtype=dtype or tensor.dtype, device=device, pin_memory=pin
                )
                copy.copy_(tensor, non_blocking=pin)
                asynchronous |= pin
                copies[name] = copy
        if asynchronous:
            torch.accelerator.synchronize()
        return cls(copies, step=step, lora=layout)

    @property
    def nbytes(self) -> int:
        """Total size of the stored tensors in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def check_finite(self) -> None:
        """Raise ValueError naming the tensors that hold NaN or infinity.

        A tensor is re-checked only when it was replaced or changed in place since its last check
        (identity and version counter), so repeated interpolations skip a pass over the snapshot.
        """
        bad = []
        for name, tensor in self.tensors.items():
            ref, version = self._checked.get(name, (None, -1))
            if ref is not None and ref() is tensor and version == tensor._version:
                continue
            if not bool(torch.isfinite(tensor).all()):
                bad.append(name)
            else:
                self._checked[name] = (weakref.ref(tensor), tensor._version)
        if bad:
            raise ValueError(f"snapshot has non-finite values (NaN or inf) in: {name_listing(bad)}")

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (no pickle) with names, shapes, dtypes and step; atomically,
        so an interrupted save never leaves a partial file at `path`."""
        path = Path(path)
        manifest = {n: [str(t.dtype), list(t.shape)] for n, t in self.tensors.items()}
        metadata = {
            _FORMAT_KEY: _FORMAT_VERSION,
            "step": "" if self.step is None else str(self.step),
            "tensors": json.dumps(manifest),
        }
        if self.lora is not None:
            metadata["lora"] = json.dumps(self.lora)
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self.tensors.items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Snapshot:
        """Read a file written by `save`; clear errors for a missing, truncated or foreign file.

        On CPU the tensors are pinned when an accelerator is present, like `capture` does.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"snapshot file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                if metadata.get(_FORMAT_KEY) != _FORMAT_VERSION:
                    raise ValueError(
                        f"{path} is a safetensors file but not a wise-callback snapshot"
                    )
                manifest = json.loads(metadata["tensors"])
                if set(manifest) != set(f.keys()):
                    raise ValueError(f"{path}: tensors do not match the snapshot's own manifest")
                tensors = {name: f.get_tensor(name) for name in manifest}  # the capture's order
        except SafetensorError as err:
            raise ValueError(
                f"{path} is not a complete safetensors file (truncated?): {err}"
            ) from err
        found = {n: [str(t.dtype), list(t.shape)] for n, t in tensors.items()}
        if found != manifest:
            raise ValueError(f"{path}: tensors do not match the snapshot's own manifest")
        if torch.device(device).type == "cpu" and torch.accelerator.is_available():
            tensors = {name: t.pin_memory() for name, t in tensors.items()}  # fast streaming
        step = int(metadata["step"]) if metadata["step"] else None
        lora = json.loads(metadata["lora"]) if "lora" in metadata else None
        return cls(tensors, step=step, lora=lora)


def interpolate_(
    module: torch.nn.Module,
    snapshot: Snapshot,
    alpha: float,
    *,
    allow_extrapolation: bool = False,
) -> None:
    """In place: theta <- (1 - alpha) * theta_early + alpha * theta, theta_early from `snapshot`.

    One fused `torch._foreach_lerp_` per (device, dtype) group, computed in the module's dtype.
    A snapshot on another device or in another dtype streams through a staging buffer of
    `STAGING_BYTES` per group, never copied over whole. All inputs are checked, and the staging
    buffers allocated, before any weight changes. A LoRA model ends up holding the interpolated
    adapter of rank r_early + r_latest (`wise_callback.lora.commit_`).
    """
    alpha = check_alpha(alpha, allow_extrapolation)
    lora = _lora(module)
    if lora:
        lora.commit_(module, snapshot, alpha)
        return
    rows = [(target, early, None) for target, early in _pair(module, snapshot)]
    with torch.no_grad():
        for targets, earlies, _ in _batches(rows):
            torch._foreach_lerp_(targets, earlies, 1.0 - alpha)


@contextmanager
def alpha_sweep(
    module: torch.nn.Module, snapshot: Snapshot, *, allow_extrapolation: bool = False
) -> Iterator[Callable[[float], None]]:
    """Evaluate several alphas with one backup and one restore.

    Yields `set_alpha(alpha)`, which puts theta(alpha) into the module (any alphas, any order, one
    pass over the weights each). On exit, also when the body raises, the weights the module held
    on entry are back bit for bit. The backup sits beside the weights (same device and dtype): the
    extra memory is one copy of the module's floating-point weights (of a LoRA model: the
    modules_to_save, plus the rank-concatenated adapter; its base is never written to).
    """
    lora = _lora(module)
    if lora:
        sweep = lora.alpha_sweep(module, snapshot, allow_extrapolation=allow_extrapolation)
    else:
        sweep = sweep_pairs(_pair(module, snapshot), allow_extrapolation)
    with sweep as set_alpha:
        yield set_alpha


@contextmanager
def sweep_pairs(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], allow_extrapolation: bool = False
) -> Iterator[Callable[[float], None]]:
    """`alpha_sweep` over (module tensor, snapshot tensor) pairs from `pair_by_name`."""
    with torch.no_grad():
        rows = [(target, early, target.clone()) for target, early in pairs]
    active = True

    def set_alpha(alpha: float) -> None:
        if not active:
            raise RuntimeError("set_alpha was called after its alpha_sweep block ended")
        alpha = check_alpha(alpha, allow_extrapolation)
        with torch.no_grad():
            for targets, earlies, backups in _batches(rows):
                for target, early, backup in zip(targets, earlies, backups, strict=True):
                    torch.lerp(early, backup, alpha, out=target)

    try:
        yield set_alpha
    finally:
        active = False
        with torch.no_grad():
            for members in _by_device_dtype(rows).values():
                torch._foreach_copy_([t for t, _, _ in members], [b for _, _, b in members])


@contextmanager
def interpolated(
    module: ModuleT, snapshot: Snapshot, alpha: float, *, allow_extrapolation: bool = False
) -> Iterator[ModuleT]:
    """Inside the block the module holds theta(alpha); on exit (also on an exception) the
    original weights are restored bit for bit."""
    alpha = check_alpha(alpha, allow_extrapolation)
    with alpha_sweep(module, snapshot, allow_extrapolation=allow_extrapolation) as set_alpha:
        set_alpha(alpha)
        yield module


def check_alpha(alpha: float, allow_extrapolation: bool = False) -> float:
    """`alpha` as a float, or ValueError unless it is a finite number in [0, 1] (any finite
    number with `allow_extrapolation`)."""
    if isinstance(alpha, (bool, str, bytes)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}: {alpha!r}")
    try:
        value = float(alpha)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}: {alpha!r}") from err
    if not math.isfinite(value):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha={value} is outside [0, 1] (alpha is the weight on the latest weights); "
            "pass allow_extrapolation=True (--allow-extrapolation) to extrapolate on purpose"
        )
    return value


def name_listing(names: list[str]) -> str:
    """The first few names, comma-separated, and how many more there are (for error messages)."""
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return f"{shown} (and {more} more)" if more > 0 else shown


def name_mismatch(
    ours: Iterable[str], theirs: Iterable[str], only_ours: str, only_theirs: str
) -> str:
    """What differs between two name sets, e.g. "only in A: x, y; only in B: z" ("" if none)."""
    ours, theirs = list(ours), list(theirs)
    our_set, their_set = set(ours), set(theirs)
    parts = [
        f"{label}: {name_listing(names)}"
        for label, names in (
            (only_ours, [n for n in ours if n not in their_set]),
            (only_theirs, [n for n in theirs if n not in our_set]),
        )
        if names
    ]
    return "; ".join(parts)


def _lora(module: torch.nn.Module) -> Any:
    """The `wise_callback.lora` module when `module` holds PEFT layers, else None."""
    if "peft" not in sys.modules:
        return None
    from wise_callback import lora

    return lora if lora.has_lora(module) else None


def _pair(module: torch.nn.Module, snapshot: Snapshot) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if snapshot.lora is not None:
        raise ValueError(
            "the snapshot is of a LoRA adapter (adapter and modules_to_save only) but the module "
            "has no LoRA layers"
        )
    return pair_by_name(named_float_tensors(module), snapshot)


def pair_by_name(
    current: dict[str, torch.Tensor], snapshot: Snapshot
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(module tensor, snapshot tensor) by name, in `current`'s order, after checking names,
    shapes and finiteness."""
    mismatch = name_mismatch(
        current, snapshot.tensors, "missing from the snapshot", "not in the module"
    )
    if mismatch:
        raise ValueError("snapshot does not match the module; " + mismatch)
    for name, tensor in current.items():
        early = snapshot.tensors[name]
        if early.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name}: module has {tuple(tensor.shape)}, "
                f"snapshot has {tuple(early.shape)}"
            )
        if not early.is_floating_point():
            raise ValueError(f"snapshot tensor {name} has non-floating dtype {early.dtype}")
    snapshot.check_finite()
    return [(tensor, snapshot.tensors[name]) for name, tensor in current.items()]


Row = tuple[torch.Tensor, torch.Tensor, Any]
"""(module tensor, snapshot tensor, backup of the module tensor or None)."""
Batch = tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]


def _by_device_dtype(rows: list[Row]) -> dict[tuple[torch.device, torch.dtype], list[Row]]:
    """Rows grouped by the module tensor's (device, dtype): the unit of one fused call."""
    groups: dict[tuple[torch.device, torch.dtype], list[Row]] = {}
    for row in rows:
        groups.setdefault((row[0].device, row[0].dtype), []).append(row)
    return groups


def _batches(rows: list[Row]) -> Iterator[Batch]:
    """Rows as column batches for fused calls, snapshot side on the module's device and dtype.

    Snapshot tensors that already match are used as they are, one batch per (device, dtype). The
    others stream through one staging buffer of `STAGING_BYTES` per (device, dtype), allocated
    before the first batch is handed out, as flat slices that fill it (copied without blocking when
    pinned; the same stream orders the refill after the previous batch's use). A non-contiguous
    module tensor, which cannot be sliced flat, is converted whole.
    """
    groups = _by_device_dtype(rows)
    staging = {
        (device, dtype): torch.empty(STAGING_BYTES // dtype.itemsize, dtype=dtype, device=device)
        for (device, dtype), members in groups.items()
        if any(not _matches(target, early) for target, early, _ in members)
    }
    for key, members in groups.items():
        ready = [row for row in members if _matches(row[0], row[1])]
        if ready:
            yield _columns(ready)
        pending: list[Row] = []
        used = 0
        for target, early, backup in members:
            if _matches(target, early):
                continue
            if not target.is_contiguous():
                yield _columns([(target, early.to(target.device, target.dtype), backup)])
                continue
            buffer, flat_early = staging[key], early.reshape(-1)
            for start in range(0, target.numel(), buffer.numel()):
                count = min(buffer.numel(), target.numel() - start)
                if used + count > buffer.numel():
                    yield _columns(pending)
                    pending, used = [], 0
                piece = buffer[used : used + count]
                piece.copy_(flat_early[start : start + count], non_blocking=early.is_pinned())
                part = slice(start, start + count)
                flat_backup = None if backup is None else backup.view(-1)[part]
                pending.append((target.view(-1)[part], piece, flat_backup))
                used += count
        if pending:
            yield _columns(pending)


def _matches(target: torch.Tensor, early: torch.Tensor) -> bool:
    return target.device == early.device and target.dtype == early.dtype


def _columns(rows: list[Row]) -> Batch:
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
