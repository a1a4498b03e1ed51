"""Batch NeoBERT embeddings over object storage with Ray Data."""

from pipeline.encoder import Encoder

__all__ = ["Encoder"]
__version__ = "0.1.0"
