"""Read the sentence-transformers files a checkpoint may carry, without importing sentence-transformers.

modules.json lists the stages after the transformer; we reproduce Pooling and Normalize exactly and
refuse any other stage (Dense, LayerNorm, ...) rather than return vectors the model's authors never meant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelError

MODULES_FILE = "modules.json"
# sentence-transformers has used several names for the transformer module's config over the years.
TRANSFORMER_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
)
# Legacy boolean keys of 1_Pooling/config.json -> the pipeline's pooling names.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "last",
}
# sentence-transformers' pooling_mode names that differ from the pipeline's.
_POOLING_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "last"}


class UnsupportedSentenceTransformerError(ModelError):
    """The checkpoint's sentence-transformers stages cannot be reproduced faithfully."""


@dataclass(frozen=True)
class SentenceTransformerMeta:
    """Defaults a sentence-transformers checkpoint declares; None where it declares nothing."""

    pooling: str | None
    """As declared, in the pipeline's names (may be one the pipeline lacks, e.g. 'weightedmean')."""
    pooling_source: str | None
    normalize: bool
    normalize_source: str
    max_length: int | None
    max_length_source: str | None
    lowercase: bool


def read_sentence_transformers_meta(folder: Path) -> SentenceTransformerMeta | None:
    """The defaults of folder/modules.json and the files it points to; None if there is no modules.json."""
    modules_path = folder / MODULES_FILE
    if not modules_path.is_file():
        return None
    modules = json.loads(modules_path.read_text())
    pooling = pooling_source = None
    normalize = False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling_file = folder / module.get("path", "") / "config.json"
            pooling = _pooling_mode(json.loads(pooling_file.read_text()))
            pooling_source = f"sentence-transformers {module.get('path', '')}/config.json"
        elif kind == "Normalize":
            normalize = True
        else:
            raise UnsupportedSentenceTransformerError(
                f"{modules_path} has a {kind} stage ({module.get('type')}), which the pipeline does not "
                "reproduce; its embeddings would differ from sentence-transformers'. Supported stages: "
                "Transformer, Pooling, Normalize"
            )
    transformer_config = _transformer_config(folder)
    max_length = transformer_config.get("max_seq_length")
    return SentenceTransformerMeta(
        pooling=pooling,
        pooling_source=pooling_source,
        normalize=normalize,
        normalize_source=f"sentence-transformers {MODULES_FILE} ({'a' if normalize else 'no'} Normalize stage)",
        max_length=int(max_length) if max_length else None,
        max_length_source=f"sentence-transformers {transformer_config['_file']}" if max_length else None,
        lowercase=bool(transformer_config.get("do_lower_case", False)),
    )


def _pooling_mode(config: dict) -> str:
    """The declared pooling in the pipeline's names; several concatenated poolings read as 'cls+mean'."""
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)] or "mean"  # its own fallback
    modes = [mode] if isinstance(mode, str) else list(mode)
    return "+".join(_POOLING_NAMES.get(m, m) for m in modes)


def _transformer_config(folder: Path) -> dict:
    for name in TRANSFORMER_CONFIG_FILES:
        if (folder / name).is_file():
            return {**json.loads((folder / name).read_text()), "_file": name}
    return {"_file": None}
