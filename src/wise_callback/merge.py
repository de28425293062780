"""Offline WiSE-FT merge of two Hugging Face checkpoint folders, streamed tensor by tensor.

    theta = (1 - alpha) * theta_early + alpha * theta_latest      # alpha = weight on latest

Tensors are read in chunks of at most CHUNK_BYTES with plain positioned reads (no memory map, so
the inputs never pile up in RSS), interpolated in LATEST's dtype and written straight into their
place in the output shard, whose header is known in advance. Peak memory is therefore two chunks
on top of the interpreter, whatever the size of the model, its shards or its largest tensor.
The output is sharded like LATEST, keeps LATEST's config, tokenizer and other files, and is built
in a temporary folder beside OUT_DIR that is renamed into place only once complete. Every check
(alpha, folders, names, shapes, truncated files) runs before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from tqdm.auto import tqdm

from wise_callback.files import replace_folder, write_atomically
from wise_callback.weights import check_alpha, name_listing

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
OTHER_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", *PICKLE_SUFFIXES)
"""Never copied into the output: other weights (adapters, stale files) and pickles (training
state such as optimizer.pt). Skipped files are logged."""

CHUNK_BYTES = 16 * 2**20
"""Tensors are streamed in pieces of at most this many bytes: elementwise, so any split works."""
SLOTS = 3
"""Buffers per checkpoint: one piece being read, one being merged, one being written."""

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and (safetensors) absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Checkpoint:
    """The weights of one checkpoint folder: which file holds each tensor, with dtype and shape.

    Reads headers only when constructed; `read` then loads a piece of one tensor at a time with a
    positioned read (no memory map, so pages of the inputs never pile up in RSS).
    """

    def __init__(self, folder: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.folder}")
        self.pickled = False
        self.index_metadata: dict[str, Any] | None = None  # None: a single unsharded file
        self._pickled_state: dict[Path, dict[str, torch.Tensor]] = {}
        self._buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(SLOTS)]
        weight_map = self._weight_map(allow_pickle)
        self.tensors: dict[str, TensorInfo] = {}
        for file_name in sorted(set(weight_map.values())):
            path = self.folder / file_name
            infos = _pickle_infos(path, self._pickled_state) if self.pickled else _header(path)
            listed = {n for n, f in weight_map.items() if f == file_name}
            if self.index_metadata is not None and set(infos) != listed:
                raise ValueError(
                    f"{path}: the index lists {name_listing(sorted(listed - set(infos)))} there "
                    f"but the file holds {name_listing(sorted(set(infos) - listed))} instead"
                )
            self.tensors.update(infos)
        self.weight_files = {*weight_map.values()}
        if self.index_metadata is not None:
            self.weight_files.add(PICKLE_INDEX if self.pickled else SAFETENSORS_INDEX)

    def _weight_map(self, allow_pickle: bool) -> dict[str, str]:
        """Tensor name -> file name, from the index or from the single weights file."""
        folder = self.folder
        if (folder / SAFETENSORS_INDEX).is_file():
            return self._read_index(folder / SAFETENSORS_INDEX)
        if (folder / SAFETENSORS_SINGLE).is_file():
            return dict.fromkeys(_header(folder / SAFETENSORS_SINGLE), SAFETENSORS_SINGLE)
        pickled = [n for n in (PICKLE_INDEX, PICKLE_SINGLE) if (folder / n).is_file()]
        if not pickled:
            raise FileNotFoundError(
                f"no model weights in {folder}: expected {SAFETENSORS_SINGLE} or "
                f"{SAFETENSORS_INDEX} (or pickled {PICKLE_SINGLE} with --allow-pickle)"
            )
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds pickled weights ({pickled[0]}); loading a pickle can run "
                "arbitrary code. Convert them to safetensors, or pass --allow-pickle "
                "(allow_pickle=True) to load them with torch.load(weights_only=True)."
            )
        self.pickled = True
        if pickled[0] == PICKLE_INDEX:
            return self._read_index(folder / PICKLE_INDEX)
        return dict.fromkeys(
            _pickle_infos(folder / PICKLE_SINGLE, self._pickled_state), PICKLE_SINGLE
        )

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text())
            weight_map = dict(index["weight_map"])
            metadata = dict(index.get("metadata") or {})
        except (KeyError, TypeError, ValueError) as err:  # JSON and UTF-8 errors are ValueErrors
            raise ValueError(f"{path} is not a valid checkpoint index: {err}") from err
        if not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{path} is not a valid checkpoint index: a file name is not a string")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{path} names shard files that are missing: {missing}")
        self.index_metadata = metadata
        return weight_map

    def shards(self) -> dict[str, list[str]]:
        """File name -> its tensor names in storage order (so reads go front to back)."""
        layout: dict[str, list[str]] = {}
        for name, info in sorted(self.tensors.items(), key=lambda kv: (kv[1].file, kv[1].start)):
            layout.setdefault(info.file.name, []).append(name)
        return layout

    def read(self, name: str, start: int, count: int, slot: int = 0) -> torch.Tensor:
        """Elements [start, start + count) of tensor `name`, flat, in this checkpoint's reused
        buffer number `slot` (< SLOTS): valid until the next `read` into that slot. Reusing the
        buffers keeps memory flat and spares the page faults of fresh allocations."""
        info = self.tensors[name]
        nbytes = count * info.dtype.itemsize
        if self._buffers[slot].numel() < nbytes:
            self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        raw = self._buffers[slot][:nbytes]
        chunk = raw.view(info.dtype)
        if self.pickled:
            return chunk.copy_(
                self._pickled_state[info.file][name].reshape(-1)[start : start + count]
            )
        with open(info.file, "rb") as f:
            f.seek(info.start + start * info.dtype.itemsize)
            if f.readinto(raw.numpy()) != nbytes:  # type: ignore[arg-type]  # ndarray is a buffer
                raise ValueError(f"{info.file} ended early while reading {name}; truncated?")
        return chunk


def merge_checkpoints(
    early_dir: str | os.PathLike,
    latest_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    alpha: float,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    allow_extrapolation: bool = False,
    progress: bool = True,
) -> Path:
    """Write theta(alpha) = lerp(EARLY, LATEST, alpha) as a checkpoint folder at `out_dir`.

    Floating-point tensors are interpolated in LATEST's dtype; other tensors are LATEST's. The
    output is always safetensors, sharded like LATEST. Returns the output folder. Two PEFT LoRA
    adapter folders (adapter_config.json) give the exact interpolated adapter instead
    (`wise_callback.lora_merge`).
    """
    from wise_callback.lora_merge import is_adapter_folder, merge_adapters

    if is_adapter_folder(early_dir) or is_adapter_folder(latest_dir):
        return merge_adapters(
            early_dir,
            latest_dir,
            out_dir,
            alpha,
            force=force,
            allow_extrapolation=allow_extrapolation,
        )
    alpha = check_alpha(alpha, allow_extrapolation)
    early, latest = read_checkpoints(early_dir, latest_dir, allow_pickle)
    out = Path(out_dir)
    _check_output(out, [early.folder, latest.folder], force)

    layout = {_safetensors_name(f): names for f, names in latest.shards().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        total = sum(latest.tensors[n].nbytes for names in layout.values() for n in names)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="wise-ft merge", disable=not progress
        ) as bar:
            for file_name, names in layout.items():
                _write_shard(tmp / file_name, names, early, latest, alpha, bar)
        if latest.index_metadata is not None:
            weight_map = {n: f for f, names in layout.items() for n in names}
            index = {"metadata": {**latest.index_metadata, "total_size": total}}
            index["weight_map"] = dict(sorted(weight_map.items()))
            text = json.dumps(index, indent=2) + "\n"
            write_atomically(tmp / SAFETENSORS_INDEX, lambda t: t.write_text(text), fsync=True)
        _copy_other_files(latest, tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoints(
    early_dir: str | os.PathLike, latest_dir: str | os.PathLike, allow_pickle: bool = False
) -> tuple[Checkpoint, Checkpoint]:
    """EARLY and LATEST's weight listings (headers only), checked to hold the same tensors with
    the same shapes: every malformed or mismatched file is found before any work starts."""
    early = Checkpoint(early_dir, allow_pickle)
    latest = Checkpoint(latest_dir, allow_pickle)
    _check_compatible(early, latest)
    return early, latest


def _check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """OUT_DIR must not be an input, lie inside one (the merge would write into the input), or
    hold one (--force would delete it); it must be creatable, and replaced only with --force."""
    resolved = out.resolve()
    for folder in inputs:
        source = folder.resolve()
        if resolved == source:
            raise ValueError(f"output folder {out} is the input folder {folder}")
        if resolved.is_relative_to(source):
            raise ValueError(f"output folder {out} lies inside the input folder {folder}")
        if source.is_relative_to(resolved):
            raise ValueError(f"output folder {out} holds the input {folder}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a folder")
        if not force:
            raise FileExistsError(f"output folder {out} already exists; pass --force to replace it")
    ancestor = next(p for p in resolved.parents if p.exists())
    if not ancestor.is_dir():
        raise FileExistsError(f"cannot create output folder {out}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create output folder {out}: no permission to write in {ancestor}")


def _check_compatible(early: Checkpoint, latest: Checkpoint) -> None:
    """Same tensor names, same shapes, floating where the other is floating."""
    missing = sorted(set(latest.tensors) - set(early.tensors))
    unexpected = sorted(set(early.tensors) - set(latest.tensors))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"only in LATEST ({latest.folder}): {name_listing(missing)}")
        if unexpected:
            parts.append(f"only in EARLY ({early.folder}): {name_listing(unexpected)}")
        raise ValueError("the checkpoints hold different tensors; " + "; ".join(parts))
    for name, info in latest.tensors.items():
        other = early.tensors[name]
        if other.shape != info.shape:
            raise ValueError(
                f"shape mismatch for {name}: EARLY has {other.shape}, LATEST has {info.shape}"
            )
        if other.dtype.is_floating_point != info.dtype.is_floating_point:
            raise ValueError(
                f"dtype mismatch for {name}: EARLY has {other.dtype}, LATEST has {info.dtype}"
            )


def _write_shard(
    path: Path,
    names: list[str],
    early: Checkpoint,
    latest: Checkpoint,
    alpha: float,
    bar: tqdm,
) -> None:
    """Stream one safetensors shard: header first (its offsets are known), then each tensor,
    chunk by chunk."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = latest.tensors[name]
        entry = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        pieces = _pieces(names, latest)

        def load(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            name, start, count = pieces[i]
            chunk = latest.read(name, start, count, slot=i % SLOTS)
            floating = chunk.is_floating_point()
            return chunk, early.read(name, start, count, slot=i % SLOTS) if floating else None

        # A three-stage pipeline over SLOTS buffers: piece i+1 is read while piece i is merged
        # and piece i-1 is written (file I/O releases the GIL).
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            reads = deque([reader.submit(load, 0)] if pieces else [])
            writes: deque[Future[int]] = deque()
            for i in range(len(pieces)):
                chunk, other = reads.popleft().result()
                while len(writes) > SLOTS - 2:  # the slot read next is free once written
                    writes.popleft().result()
                if i + 1 < len(pieces):
                    reads.append(reader.submit(load, i + 1))
                if other is not None:
                    torch.lerp(other.to(chunk.dtype), chunk, alpha, out=chunk)
                data = chunk.view(torch.uint8).numpy()
                writes.append(writer.submit(f.write, data))  # type: ignore[arg-type]
                bar.update(chunk.numel() * chunk.element_size())
            for write in writes:
                write.result()
        f.flush()
        os.fsync(f.fileno())


def _pieces(names: list[str], latest: Checkpoint) -> list[tuple[str, int, int]]:
    """(name, first element, element count) of every CHUNK_BYTES piece, in storage order."""
    pieces = []
    for name in names:
        info = latest.tensors[name]
        numel, step = info.nbytes // info.dtype.itemsize, max(1, CHUNK_BYTES // info.dtype.itemsize)
        pieces += [(name, start, min(step, numel - start)) for start in range(0, numel, step)]
    return pieces


def _copy_other_files(latest: Checkpoint, tmp: Path) -> None:
    """LATEST's config, tokenizer and other top-level files; not its weights, not pickles."""
    skipped = []
    for path in sorted(latest.folder.iterdir()):
        if path.name in latest.weight_files:
            continue
        if not path.is_file() or path.name.endswith(OTHER_WEIGHT_SUFFIXES):
            skipped.append(path.name)
            continue
        shutil.copy2(path, tmp / path.name)
    if skipped:
        log.info(
            "not copied from %s (pickles, other weights, folders): %s",
            latest.folder,
            ", ".join(skipped),
        )


def _header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header, checking its structure and that every tensor lies inside the
    file: a malformed header is a ValueError naming the file, never a KeyError or TypeError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 0 or 8 + length > size:
            raise ValueError(f"{path} is truncated or not a safetensors file (bad header size)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return {
        name: _tensor_info(path, name, entry, 8 + length, size) for name, entry in header.items()
    }


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape, a byte range inside the file that fits."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is corrupt: the header entry of tensor {name} is not an object")
    dtype_name, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype_name!r}")
    if not _naturals(shape) or not (_naturals(offsets) and len(offsets) == 2):
        raise ValueError(
            f"{path} is corrupt: tensor {name} needs a shape and two data_offsets of integers "
            f">= 0, got shape={shape!r}, data_offsets={offsets!r}"
        )
    dtype = DTYPES[dtype_name]
    start, end = (data_start + offset for offset in offsets)
    if end - start != math.prod(shape) * dtype.itemsize or end > size:
        raise ValueError(f"{path} is truncated or corrupt: tensor {name} lies outside it")
    return TensorInfo(path, dtype, tuple(shape), start, end)


def _naturals(value: Any) -> TypeGuard[list[int]]:
    """Whether `value` is a JSON list of integers >= 0 (as shapes and offsets must be)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _pickle_infos(path: Path, cache: dict[Path, dict[str, torch.Tensor]]) -> dict[str, TensorInfo]:
    """Open a pickled state dict safely (weights_only, memory-mapped) and describe its tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"{path} could not be loaded with weights_only=True: {err}") from err
    unsupported = [n for n, t in state.items() if t.dtype not in DTYPE_NAMES]
    if unsupported:
        raise ValueError(f"{path}: unsupported dtypes for {name_listing(unsupported)}")
    cache[path] = state
    return {
        name: TensorInfo(path, t.dtype, tuple(t.shape), end=t.numel() * t.element_size())
        for name, t in state.items()
    }


def _safetensors_name(file_name: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors; others unchanged."""
    return re.sub(r"^pytorch_model(.*)\.bin$", r"model\1.safetensors", file_name)
