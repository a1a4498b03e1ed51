"""Decide pooling, normalisation and max length for a checkpoint, and say where each choice came from.

Explicit options win; then what a sentence-transformers checkpoint declares; then the model's own
convention (NeoBERT: the [CLS] vector, as its model card). The driver and every actor call this, so
they agree without passing the choice around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SettingsError
from pipeline.model.checkpoint import NEOBERT, checkpoint_family, position_limit
from pipeline.model.sentence_transformers_meta import (
    UnsupportedSentenceTransformerError,
    read_sentence_transformers_meta,
)

# cls: first token; last: last token; mean/max: over all tokens; mean_sqrt_len: sum / sqrt(length).
POOLINGS = ("cls", "mean", "max", "mean_sqrt_len", "last")

OPTION = "option"


class EmbeddingSettingsError(SettingsError):
    """An explicit pooling or max_length that the checkpoint cannot honour."""


@dataclass(frozen=True)
class EmbeddingDefaults:
    """The resolved settings; sources maps each setting to where its value came from."""

    family: str
    pooling: str
    normalize: bool
    max_length: int
    lowercase: bool
    sources: dict[str, str] = field(default_factory=dict)


def resolve_embedding_defaults(
    folder: Path, *, pooling: str | None = None, normalize: bool | None = None, max_length: int | None = None
) -> EmbeddingDefaults:
    """Settings for the checkpoint in folder; arguments left None follow the checkpoint."""
    family = checkpoint_family(folder)
    limit = position_limit(folder)
    meta = read_sentence_transformers_meta(folder)
    sources: dict[str, str] = {}

    if pooling is not None:
        sources["pooling"] = OPTION
    elif meta and meta.pooling:
        pooling, sources["pooling"] = meta.pooling, meta.pooling_source
        if pooling not in POOLINGS:
            raise UnsupportedSentenceTransformerError(
                f"{folder} declares {pooling!r} pooling ({meta.pooling_source}), which the pipeline lacks; "
                f"choose one of {', '.join(POOLINGS)} with --pooling"
            )
    else:
        pooling = "cls" if family == NEOBERT else "mean"
        sources["pooling"] = "NeoBERT model card ([CLS] vector)" if family == NEOBERT else "default for encoders"
    if pooling not in POOLINGS:
        raise EmbeddingSettingsError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")

    if normalize is not None:
        sources["normalize"] = OPTION
    elif meta:
        normalize, sources["normalize"] = meta.normalize, meta.normalize_source
    else:
        normalize, sources["normalize"] = False, "default"

    if max_length is not None:
        sources["max_length"] = OPTION
    elif meta and meta.max_length:
        max_length, sources["max_length"] = min(meta.max_length, limit), meta.max_length_source
    else:
        max_length, sources["max_length"] = limit, "checkpoint config.json (position limit)"
    if not 2 <= max_length <= limit:
        raise EmbeddingSettingsError(f"max_length must be between 2 and the checkpoint's {limit}, got {max_length}")

    return EmbeddingDefaults(
        family=family,
        pooling=pooling,
        normalize=normalize,
        max_length=max_length,
        lowercase=bool(meta and meta.lowercase),
        sources=sources,
    )
