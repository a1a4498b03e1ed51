"""One inspection of a checkpoint that the driver and every actor share: what it is and how it embeds.

The driver inspects before the job starts (to pin the run record and build the tokenizer) without
loading the model, and, for a Hub checkpoint, without downloading its weights when the Hub publishes
their digest. Each actor inspects the same way before loading the model, so both sides derive every
fact with the same code. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SettingsError
from pipeline.model.checkpoint import (
    NEOBERT,
    hidden_size,
    published_weights_sha256,
    resolve_checkpoint,
)
from pipeline.model.checkpoint import weights_sha256 as hash_weights
from pipeline.model.devices import compute_dtype
from pipeline.model.embedding_defaults import resolve_embedding_defaults


@dataclass(frozen=True)
class CheckpointFacts:
    """Everything about a checkpoint that decides what its vectors are, worked out once."""

    source: str
    """As given (Hub id, folder or URL), with @revision when one is pinned."""
    folder: Path
    """Local folder with its files (a Hub snapshot inspected by the driver may lack the weights)."""
    family: str
    """NEOBERT (the native model) or TRANSFORMERS (any other encoder, run by transformers)."""
    hidden_size: int
    max_length: int
    """Tokens per document, special tokens included: an option, sentence-transformers' or the position limit."""
    pooling: str
    normalize: bool
    lowercase: bool
    """sentence-transformers' do_lower_case: lowercase texts before tokenizing."""
    compute_dtype: str
    weights_sha256: str | None
    """SHA-256 of the weights file (of the shard digests when sharded); None until the loader reads them."""
    setting_sources: dict[str, str] = field(default_factory=dict)
    """Where pooling, normalize and max_length came from (an option, the checkpoint, a default)."""

    @property
    def is_neobert(self) -> bool:
        return self.family == NEOBERT

    def refuse_native_options(self, attention: str, compile: bool) -> None:
        """An attention backend or torch.compile asked of a model that transformers runs is refused."""
        if not self.is_neobert and attention != "auto":
            raise SettingsError(f"--attention {attention} applies to NeoBERT; {self.source} runs on transformers")
        if not self.is_neobert and compile:
            raise SettingsError(f"--compile applies to NeoBERT; {self.source} runs on transformers' own modules")


def inspect_checkpoint(
    name_or_path: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    fetch_weights: bool = True,
    digest: bool = True,
) -> CheckpointFacts:
    """Find the checkpoint, resolve its embedding settings (arguments left None follow the checkpoint)
    and, with digest, the SHA-256 of its weights.

    fetch_weights=False (the driver) fetches only the small files of a Hub checkpoint, and takes the
    digest the Hub publishes; the weights are fetched only where it publishes none. digest=False leaves
    weights_sha256 to a loader that reads the weights anyway (weights.load_neobert).
    """
    folder = resolve_checkpoint(
        name_or_path, revision=revision, cache_dir=cache_dir, storage_options=storage_options, weights=fetch_weights
    )
    defaults = resolve_embedding_defaults(folder, pooling=pooling, normalize=normalize, max_length=max_length)
    weights_sha256 = None
    if digest:
        weights_sha256 = None if fetch_weights else published_weights_sha256(name_or_path, revision, folder)
        if weights_sha256 is None:
            if not fetch_weights:
                folder = resolve_checkpoint(
                    name_or_path, revision=revision, cache_dir=cache_dir, storage_options=storage_options
                )
            weights_sha256 = hash_weights(folder)
    return CheckpointFacts(
        source=name_or_path if revision is None else f"{name_or_path}@{revision}",
        folder=folder,
        family=defaults.family,
        hidden_size=hidden_size(folder),
        max_length=defaults.max_length,
        pooling=defaults.pooling,
        normalize=defaults.normalize,
        lowercase=defaults.lowercase,
        compute_dtype=compute_dtype(device, dtype),
        weights_sha256=weights_sha256,
        setting_sources=defaults.sources,
    )
