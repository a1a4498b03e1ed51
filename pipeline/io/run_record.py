"""The run record (_neobert_run.json): the settings that decide what the stored vectors are, the
generations of input (each one's shards in _inputs/<generation>.parquet, a columnar file, so the record
stays small at a million shards), and what each run did.

Settings are pinned by the first committed embedding: a resumed run with other settings is refused
rather than mixing vectors, while an output that holds no embedding yet (a run that failed before
its first part, or one that only dead-lettered rows) takes the new settings, dropping the dead
letters the old ones made. --overwrite removes everything the pipeline wrote, the run record last,
so an interrupted overwrite still guards the vectors it has not removed yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

import fsspec

import pipeline
from pipeline.errors import OutputConflictError
from pipeline.faults import failpoint
from pipeline.io.layout import (
    CHECKPOINTS,
    COMMITS,
    DUPLICATES,
    ERRORS,
    FAILED,
    INPUTS,
    PARTS,
    QUARANTINE,
    READS,
    RUN_RECORD,
    SHARDS,
    STAGING,
    TODO,
    VACUUM,
    atomic_write,
    join,
)
from pipeline.io.manifest import OutputState
from pipeline.io.schemas import output_schema

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.model.inspection import CheckpointFacts

log = logging.getLogger(__name__)

# Settings that change the embeddings: a resumed run must use the same ones.
PINNED_SETTINGS = (
    "model_weights_sha256",
    "tokenizer_sha256",
    "hidden_size",
    "pooling",
    "normalize",
    "max_length",
    "output_dtype",
    "compute_dtype",
    "text_field",
    "id_field",
    "duplicate_ids",
    "long_documents",
    "chunk_overlap",
    "format",
    "fingerprint",
)
# What a record written before a setting existed meant by leaving it out.
SETTINGS_BEFORE_THEY_EXISTED = {"fingerprint": "store"}
# What --overwrite removes: commit records first, so that what is left is never taken for committed
# work under the new settings, and the run record last.
OUTPUT_ENTRIES = (
    COMMITS,
    CHECKPOINTS,
    PARTS,
    ERRORS,
    STAGING,
    READS,
    SHARDS,
    FAILED,
    QUARANTINE,
    DUPLICATES,
    INPUTS,
    TODO,
    VACUUM,
    RUN_RECORD,
)
MANIFEST_VERSION = 3
"""2: generations in _inputs/; 3: _inputs/ and the checkpoint's per-shard facts sorted by URL (sorted_facts.py).
A reader takes every version up to its own and refuses a newer one, which it may misread."""


class SettingsMismatchError(OutputConflictError):
    """A run would mix embeddings made with different settings into one output."""


class InputChangedError(OutputConflictError):
    """An input shard changed since its rows were embedded into this output."""


def embedding_settings(config: JobConfig, facts: CheckpointFacts, tokenizer_json: str) -> dict:
    """Everything that decides what the stored vectors are."""
    chunks = config.long_documents != "truncate"
    return {
        "model_source": facts.source,
        "model_family": facts.family,
        "model_weights_sha256": facts.weights_sha256,
        "model_label": config.model_label,
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "hidden_size": facts.hidden_size,
        "pooling": facts.pooling,
        "normalize": facts.normalize,
        "max_length": facts.max_length,
        "setting_sources": facts.setting_sources,
        "output_dtype": config.output_dtype,
        "compute_dtype": facts.compute_dtype,
        "text_field": config.text_field,
        "id_field": config.id_field,
        "duplicate_ids": config.duplicate_ids,
        "long_documents": config.long_documents,
        "chunk_overlap": config.chunk_overlap if chunks else None,
        "format": config.format,
        "fingerprint": config.fingerprint,
        "schema": str(output_schema(facts.hidden_size, config.output_dtype, chunks=config.long_documents == "chunk")),
    }


def read_run_record(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    path = join(root, RUN_RECORD)
    if not fs.exists(path):
        return None
    record = json.loads(fs.cat_file(path))
    if record.get("manifest_version", 1) > MANIFEST_VERSION:
        raise OutputConflictError(
            f"{root} was written by a newer neobert-pipeline (manifest version {record['manifest_version']}, "
            f"this one reads up to {MANIFEST_VERSION}): upgrade neobert-pipeline to read or extend it"
        )
    return record


def open_run_record(
    fs: fsspec.AbstractFileSystem, root: str, settings: dict, state: OutputState
) -> tuple[dict, OutputState]:
    """Create the run record, or check a resumed run's settings against it (generations.py then
    says what the run does).

    Returns the record and the output's state, which is empty again when the output was reset because
    it held no embedding made with the old settings.
    """
    record = read_run_record(fs, root)
    if record is not None:
        different = _differences(record["settings"], settings)
        if different and state.embedded_rows:
            raise SettingsMismatchError(
                f"{fs.unstrip_protocol(root)} holds embeddings made with other settings ({different}); "
                "use a new output location, or --overwrite to discard the old embeddings"
            )
        if different:
            log.warning(
                "%s holds no embeddings yet, only %d dead letters made with other settings (%s): starting afresh",
                fs.unstrip_protocol(root),
                state.committed_rows,
                different,
            )
            remove_output(fs, root)
            record, state = None, OutputState()
    if record is None:
        record = {"pipeline_version": pipeline.__version__, "settings": settings, "generations": [], "runs": []}
        save_run_record(fs, root, record)
    return record, state


def save_run_record(fs: fsspec.AbstractFileSystem, root: str, record: dict) -> None:
    """Write the record; a version 1 record's inline shard lists move to _inputs/ on the way."""
    from pipeline.io.generations import upgrade_inputs  # generations builds on this module

    upgrade_inputs(fs, root, record)
    record["manifest_version"] = MANIFEST_VERSION
    atomic_write(fs, join(root, RUN_RECORD), json.dumps(record, indent=2).encode())


def _differences(stored: dict, settings: dict) -> str:
    stored = {**SETTINGS_BEFORE_THEY_EXISTED, **stored}
    different = [key for key in PINNED_SETTINGS if stored.get(key) != settings[key]]
    return "; ".join(f"{key}: stored {stored.get(key)!r}, now {settings[key]!r}" for key in different)


def append_run(fs: fsspec.AbstractFileSystem, root: str, summary) -> None:
    """Add a finished run's summary (a dataclass) to the record."""
    record = read_run_record(fs, root)
    record["runs"].append(asdict(summary))
    save_run_record(fs, root, record)


def remove_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """--overwrite: remove what this pipeline wrote there, nothing else (the writer lease stays)."""
    for name in OUTPUT_ENTRIES:
        failpoint(f"overwrite.{name}")
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
