"""The snapshot's file: written once when taken, found again when a run resumes.

The trainer's checkpoints do not hold the snapshot (it would double their size): it is written
once as `wiseft-snapshot-step{N}.safetensors` (one file per rank, `-rank{r}-of-{w}`, when the
model is sharded with FSDP2) into the run's snapshot folder, by default beside the checkpoints.
The checkpoint holds its name and folder; a resumed run looks beside the checkpoint it resumes
from first, then where the file was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wise_callback.weights import Snapshot, snapshot_names

if TYPE_CHECKING:
    from wise_callback.core import RunContext


class SnapshotFiles:
    """The name template (`{rank}` filled in per rank) and folder of a run's snapshot file."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.saved_in: str | None = None

    def save(self, snapshot: Snapshot, context: RunContext, sharded: bool) -> Path:
        """Write this rank's snapshot (rank zero only, unless sharded); return its path."""
        suffix = f"-rank{{rank}}-of-{context.world_size}" if sharded else ""
        self.name = f"wiseft-snapshot-step{snapshot.step}{suffix}.safetensors"
        folder = context.snapshot_dir
        path = folder / self.name.format(rank=context.rank)
        if sharded or context.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            snapshot.save(path)
        self.saved_in = str(folder.resolve())
        return path

    def load(self, context: RunContext, device: str | torch.device) -> Snapshot:
        """The snapshot of a resumed run, checked against the model's tensor names."""
        assert self.name is not None
        name = self.name.format(rank=context.rank)
        places = []
        if context.resume_dir is not None:
            places.append(context.resume_dir / name)
        if self.saved_in is not None:
            places.append(Path(self.saved_in) / name)
        for path in places:
            if path.is_file():
                snapshot = Snapshot.load(path, device=device)
                if set(snapshot.tensors) != set(snapshot_names(context.model)):
                    raise ValueError(f"{path} is the snapshot of another model (tensor names)")
                return snapshot
        raise FileNotFoundError(
            f"the checkpoint names the snapshot file {name!r}, but it is in none of: "
            f"{[str(p) for p in places]}; copy it beside the checkpoint"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot_file": self.name, "snapshot_saved_in": self.saved_in}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.name = state["snapshot_file"]
        self.saved_in = state["snapshot_saved_in"]
