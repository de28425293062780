"""What a run leaves: the logged scalars, history.jsonl, and the merged model in `save_merged_to`.

Never deletes what we did not write: `check_merge_target` refuses, before training, a target
that is a file or a non-empty folder that is not an earlier output of ours (marked by
MERGE_INFO), and `save_merged` replaces only such a folder, atomically (a temporary folder
beside it, renamed into place; the old output is removed only after the rename).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from wise_callback.comparisons import best_record
from wise_callback.files import replace_folder, write_text_atomically
from wise_callback.sharding import full_state_dict, is_sharded

MERGE_INFO = "wiseft_merge.json"
"""The file every merged-model folder of ours holds: how it was made, and our mark on it."""


def write_history(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite history.jsonl from the records, atomically: after a resume it holds exactly the
    records of the resumed state, never those of a killed run's lost steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(dict(r)) + "\n" for r in records))


def logged_scalars(
    records: list[dict[str, Any]], timings: Mapping[str, float], select_metric: str
) -> dict[str, float]:
    """An evaluation's scalars by their logged names: `wiseft/alpha_{a:.2f}/{metric}`, where
    its time went (`wiseft/time/...`, logged only: history stays reproducible), and the best
    alpha of the evaluation (`wiseft/best/{select_metric}`, `wiseft/best_alpha`)."""
    metrics = {
        f"wiseft/alpha_{r['alpha']:.2f}/{name}": float(value)
        for r in records
        for name, value in r.items()
        if name not in ("step", "alpha") and isinstance(value, (int, float))
    }
    metrics.update({f"wiseft/time/{k}": v for k, v in timings.items()})
    best = best_record(records, select_metric)
    metrics[f"wiseft/best/{select_metric}"] = float(best[select_metric])
    metrics["wiseft/best_alpha"] = float(best["alpha"])
    return metrics


def check_merge_target(target: Path) -> None:
    """Refuse a `save_merged_to` we may not replace: a file, or a non-empty folder that is not
    an earlier merged model of ours."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"save_merged_to={str(target)!r} is an existing file, not a folder")
    if any(target.iterdir()) and not (target / MERGE_INFO).is_file():
        raise FileExistsError(
            f"save_merged_to={str(target)!r} is a non-empty folder that wise-callback did not "
            f"write (no {MERGE_INFO}); give a new or empty folder, we never replace other files"
        )


def what_to_save(
    model: torch.nn.Module, dense: bool
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The module to `save_pretrained` and its state dict (None: its own): with `dense`, a
    LoRA PeftModel's plain base model with the merged dense weights; a sharded model's full
    state dict otherwise. A collective under FSDP2: every rank calls it."""
    from wise_callback.lora import has_lora

    if dense and has_lora(model):
        from wise_callback.lora_dense import merged_dense_state_dict

        return model.get_base_model(), merged_dense_state_dict(model)  # type: ignore[operator]
    return model, full_state_dict(model) if is_sharded(model) else None


def save_merged(
    model: torch.nn.Module,
    tokenizer: Any,
    target: Path,
    info: Mapping[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """`save_pretrained` of the model (with `state_dict` when given: a sharded model's full
    one) and the tokenizer, and MERGE_INFO, into `target`, atomically."""
    check_merge_target(target)  # again: the folder may have changed during training
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging, state_dict=state_dict)  # type: ignore[operator]
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
        (staging / MERGE_INFO).write_text(json.dumps(dict(info), indent=2))
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
