"""wise-callback: WiSE-FT against diversity collapse in SFT, as a drop-in Lightning or Hugging Face
Trainer callback.

Public names are imported lazily so that `wise-ft merge` and the metrics never pay for importing
Lightning or vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Snapshot": "wise_callback.weights",
    "interpolate_": "wise_callback.weights",
    "interpolated": "wise_callback.weights",
    "alpha_sweep": "wise_callback.weights",
    "WiSEFTCallback": "wise_callback.callback",
    "WiSEFTTrainerCallback": "wise_callback.hf_callback",
}
__all__ = [
    "Snapshot",
    "WiSEFTCallback",
    "WiSEFTTrainerCallback",
    "__version__",
    "alpha_sweep",
    "interpolate_",
    "interpolated",
]

if TYPE_CHECKING:
    from wise_callback.callback import WiSEFTCallback
    from wise_callback.hf_callback import WiSEFTTrainerCallback
    from wise_callback.weights import Snapshot, alpha_sweep, interpolate_, interpolated


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'wise_callback' has no attribute {name!r}")
