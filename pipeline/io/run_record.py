"""The run record (_neobert_run.json): the settings that decide what the stored vectors are, the inputs
by generation, and what each run did.

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
    COMMITS,
    DUPLICATES,
    ERRORS,
    FAILED,
    PARTS,
    QUARANTINE,
    RUN_RECORD,
    SHARDS,
    STAGING,
    atomic_write,
    join,
)
from pipeline.io.manifest import OutputState
from pipeline.io.schemas import output_schema
from pipeline.io.shards import Shard

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
OUTPUT_ENTRIES = (COMMITS, PARTS, ERRORS, STAGING, SHARDS, FAILED, QUARANTINE, DUPLICATES, RUN_RECORD)


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
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def open_run_record(
    fs: fsspec.AbstractFileSystem, root: str, settings: dict, input_url: str, shards: list[Shard], state: OutputState
) -> tuple[dict, OutputState]:
    """Create the run record, or check a resumed run against it and add new shards as a generation.

    Returns the record and the output's state, which is empty again when the output was reset because
    it held no embedding made with the old settings.
    """
    inputs = [{"url": s.url, "format": s.format, "fingerprint": s.fingerprint} for s in shards]
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
        record = {
            "pipeline_version": pipeline.__version__,
            "settings": settings,
            "generations": [{"generation": 0, "input": input_url, "inputs": inputs}],
            "runs": [],
        }
        atomic_write(fs, join(root, RUN_RECORD), json.dumps(record, indent=2).encode())
        return record, state
    known = {i["url"]: i["fingerprint"] for g in record["generations"] for i in g["inputs"]}
    changed = [s.url for s in shards if s.url in known and known[s.url] != s.fingerprint]
    if changed:
        raise InputChangedError(
            f"{len(changed)} input shards changed since they were embedded into this output "
            f"(first: {changed[0]}); use a new output location, or --overwrite to start again"
        )
    new = [i for i in inputs if i["url"] not in known]
    if new:
        record["generations"].append({"generation": len(record["generations"]), "input": input_url, "inputs": new})
        atomic_write(fs, join(root, RUN_RECORD), json.dumps(record, indent=2).encode())
        log.info("%d new shards since the last run: generation %d", len(new), len(record["generations"]) - 1)
    return record, state


def _differences(stored: dict, settings: dict) -> str:
    stored = {**SETTINGS_BEFORE_THEY_EXISTED, **stored}
    different = [key for key in PINNED_SETTINGS if stored.get(key) != settings[key]]
    return "; ".join(f"{key}: stored {stored.get(key)!r}, now {settings[key]!r}" for key in different)


def append_run(fs: fsspec.AbstractFileSystem, root: str, summary) -> None:
    """Add a finished run's summary (a dataclass) to the record."""
    record = read_run_record(fs, root)
    record["runs"].append(asdict(summary))
    atomic_write(fs, join(root, RUN_RECORD), json.dumps(record, indent=2).encode())


def remove_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """--overwrite: remove what this pipeline wrote there, nothing else (the writer lease stays)."""
    for name in OUTPUT_ENTRIES:
        failpoint(f"overwrite.{name}")
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
