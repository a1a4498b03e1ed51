"""Native PyTorch NeoBERT: no Ray, no code from the Hub."""

from pipeline.model.neobert import PRESETS, NeoBERT, NeoBERTConfig

__all__ = ["PRESETS", "NeoBERT", "NeoBERTConfig"]
