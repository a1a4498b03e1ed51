"""What the driver learns and checks before the cluster starts: the model's facts, a sample of the input,
and the settings that cannot work with them. A mistake found here costs seconds, not a cluster's start.
"""

from __future__ import annotations

import bz2
import json
import logging
import lzma
import os
import zlib
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.errors import SettingsError
from pipeline.io.shards import Shard
from pipeline.io.storage import filesystem_for
from pipeline.model.inspection import CheckpointFacts, inspect_checkpoint
from pipeline.tokenizer import TextTokenizer, check_chunk_overlap

log = logging.getLogger(__name__)

# Bytes read from the start of the first shard to see its fields and how many rows a byte holds.
SAMPLE_BYTES = 1 << 20
SAMPLE_RECORDS = 200
MIN_SAMPLE_RECORDS = 10
# Set by `ray job submit` in the entrypoint's environment.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# What a corrupt or unreadable shard raises while sampled (zstandard's errors are plain Exceptions).
_UNREADABLE = (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class InputSample:
    """What the start of the first shard shows."""

    shard: Shard
    fields: list[str] | None
    """Fields (JSONL) or columns (Parquet) seen; None for plain text or when nothing could be read."""
    rows_per_byte: float | None
    """Rows per stored byte (compressed where the shard is), to estimate the corpus's rows."""


def inspect_model(config: JobConfig) -> tuple[CheckpointFacts, TextTokenizer]:
    """The checkpoint's facts and tokenizer as the actors will see them; settings it cannot honour refused."""
    device = config.actor_device
    facts = inspect_checkpoint(
        config.model,
        revision=config.revision,
        storage_options=config.model_storage_options(),
        pooling=config.pooling,
        normalize=config.normalize,
        max_length=config.max_length,
        device=device,
        dtype=config.dtype,
        fetch_weights=False,
    )
    facts.refuse_native_options(config.attention, config.compile)
    if config.long_documents != "truncate":
        try:
            check_chunk_overlap(config.chunk_overlap, facts.max_length)
        except SettingsError as err:
            raise SettingsError(
                f"--chunk-overlap {config.chunk_overlap}: {err}; lower it or raise --max-length"
            ) from err
    tokenizer = TextTokenizer.from_folder(
        facts.folder, facts.max_length, neobert=facts.is_neobert, lowercase=facts.lowercase
    )
    return facts, tokenizer


def check_paths(config: JobConfig, out_fs, out_root: str) -> None:
    """OUTPUT must be a folder; under `ray job submit`, no path may be relative."""
    if out_fs.isfile(out_root):
        raise SettingsError(f"OUTPUT {config.output} is a file; give a folder (or URL prefix) for the embeddings")
    if RAY_JOB_ENV not in os.environ:
        return
    # Inside `ray job submit`, a relative local path lands in Ray's temporary copy of the working directory.
    for name, url in (("INPUT", config.input), ("OUTPUT", config.output), ("--model", config.model)):
        if "://" not in url and not os.path.isabs(url) and (name != "--model" or os.path.exists(url)):
            raise SettingsError(
                f"{name} {url!r} is a relative path; under `ray job submit` it would resolve inside Ray's "
                "temporary copy of the working directory and be lost with it: use an absolute path on storage "
                "every node shares, or an object-store URL (s3://...)"
            )


def sample_input(config: JobConfig, shards: list[Shard]) -> InputSample:
    """Read the start of the first non-empty shard: its fields and its rows per byte."""
    shard = next((s for s in shards if s.size_bytes), shards[0])
    fs, path = filesystem_for(shard.url, config.storage)
    try:
        if shard.format == "parquet":
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                rows = parquet.metadata.num_rows
                return InputSample(shard, parquet.schema_arrow.names, rows / shard.size_bytes if rows else None)
        with fs.open(path, "rb") as f:
            head = f.read(SAMPLE_BYTES)
        lines = _decompressed(head, path).split(b"\n")[:-1]  # complete lines only
    except _UNREADABLE as err:  # the job records an unreadable shard with its reason; outages still stop here
        log.info("could not sample %s before the job (%s); the job will report it", shard.url, err)
        return InputSample(shard, None, None)
    rows_per_byte = len(lines) / len(head) if lines else None
    if shard.format == "text":
        return InputSample(shard, None, rows_per_byte)
    fields: dict[str, None] = {}
    records = 0
    for line in lines[:SAMPLE_RECORDS]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            fields |= dict.fromkeys(record)
            records += 1
    # A few odd rows at the start prove nothing about the corpus: they are the job's to dead-letter.
    return InputSample(shard, list(fields) if records >= MIN_SAMPLE_RECORDS else None, rows_per_byte)


def check_input_fields(config: JobConfig, shards: list[Shard], sample: InputSample) -> None:
    """Refuse a text or id field that the first shard does not have: every row would be a dead letter."""
    text = next((s for s in shards if s.format == "text"), None)
    if text is not None and config.id_field is not None:
        raise SettingsError(
            f"--id-field {config.id_field!r}: {text.url} is a text shard, one document per line with no fields; "
            "drop --id-field (ids are then <shard path>#<row>)"
        )
    if sample.fields is None:
        return
    for flag, name in (("--text-field", config.text_field), ("--id-field", config.id_field)):
        if name is not None and name not in sample.fields:
            kind = "columns" if sample.shard.format == "parquet" else "fields in its first rows"
            raise SettingsError(
                f"{flag} {name!r}: the first shard {sample.shard.url} has no such field; its {kind}: "
                f"{sample.fields}; set {flag} to one of them"
            )


def _decompressed(head: bytes, path: str) -> bytes:
    """As much of the file's start as decompresses (a prefix of a compressed stream is fine)."""
    name = path.lower()
    if name.endswith(".gz"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
    if name.endswith((".zst", ".zstd")):
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(head)
        except zstandard.ZstdError as err:
            raise ValueError(f"zstd data is corrupt ({err})") from err
    if name.endswith(".bz2"):
        return bz2.BZ2Decompressor().decompress(head)
    if name.endswith(".xz"):
        return lzma.LZMADecompressor().decompress(head)
    return head
