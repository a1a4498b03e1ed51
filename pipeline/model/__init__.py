"""Native PyTorch NeoBERT and the checkpoints it loads from: no Ray, no code from the Hub.

Imported lazily, so that torch-free modules here (devices.py) stay light for the CPU workers.
"""

from __future__ import annotations

__all__ = ["PRESETS", "NeoBERT", "NeoBERTConfig"]


def __getattr__(name: str):
    if name in __all__:
        from pipeline.model import neobert

        return getattr(neobert, name)
    raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
