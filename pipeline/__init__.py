"""Batch NeoBERT embeddings over object storage with Ray Data."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.encoder import Encoder

__all__ = ["Encoder"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # Imported on first use: Ray workers that only read, tokenize or write shards never load torch.
    if name == "Encoder":
        from pipeline.encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
