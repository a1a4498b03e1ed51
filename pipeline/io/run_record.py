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
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

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
    atomic_write,
    join,
    parquet_bytes,
    url_column,
    urls_of,
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
    RUN_RECORD,
)
INPUTS_SCHEMA = pa.schema(
    [("url", pa.binary()), ("format", pa.string()), ("size_bytes", pa.int64()), ("fingerprint", pa.string())]
)
MANIFEST_VERSION = 2


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


def recorded_inputs(fs: fsspec.AbstractFileSystem, root: str, record: dict) -> pa.Table:
    """Every generation's input shards (INPUTS_SCHEMA), from _inputs/ or, in an older record, from the
    record itself."""
    tables = []
    for generation in record["generations"]:
        if "inputs" in generation:  # manifest version 1
            tables.append(_inputs_table(generation["inputs"]))
        else:
            with fs.open(join(root, generation["inputs_file"]), "rb") as f:
                tables.append(pq.read_table(f, schema=INPUTS_SCHEMA))
    return pa.concat_tables(tables) if tables else INPUTS_SCHEMA.empty_table()


def recorded_urls(inputs: pa.Table) -> list[str]:
    return urls_of(inputs.column("url"))


def _inputs_table(inputs: list[dict]) -> pa.Table:
    """A version 1 record's inline inputs as INPUTS_SCHEMA."""
    columns = {
        "url": url_column([i["url"] for i in inputs]),
        "format": [i.get("format") for i in inputs],
        "size_bytes": [i.get("size_bytes") for i in inputs],
        "fingerprint": [i["fingerprint"] for i in inputs],
    }
    return pa.table(columns, schema=INPUTS_SCHEMA)


def open_run_record(
    fs: fsspec.AbstractFileSystem, root: str, settings: dict, input_url: str, shards: list[Shard], state: OutputState
) -> tuple[dict, OutputState]:
    """Create the run record, or check a resumed run against it and add new shards as a generation.

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
        _add_generation(fs, root, record, input_url, shards)
        return record, state
    inputs = recorded_inputs(fs, root, record)
    known = dict(zip(recorded_urls(inputs), inputs.column("fingerprint").to_pylist(), strict=True))
    changed = [s.url for s in shards if s.url in known and known[s.url] != s.fingerprint]
    if changed:
        raise InputChangedError(
            f"{len(changed)} input shards changed since they were embedded into this output "
            f"(first: {changed[0]}); use a new output location, or --overwrite to start again"
        )
    new = [s for s in shards if s.url not in known]
    if new:
        _add_generation(fs, root, record, input_url, new)
        log.info("%d new shards since the last run: generation %d", len(new), len(record["generations"]) - 1)
    return record, state


def _add_generation(fs: fsspec.AbstractFileSystem, root: str, record: dict, input_url: str, shards: list[Shard]):
    """Its shards' file first, then the record that names it: a crash between leaves a file the next run
    writes again."""
    number = len(record["generations"])
    inputs_file = f"{INPUTS}/{number:06d}.parquet"
    table = pa.table(
        {
            "url": url_column([s.url for s in shards]),
            "format": [s.format for s in shards],
            "size_bytes": [s.size_bytes for s in shards],
            "fingerprint": [s.fingerprint for s in shards],
        },
        schema=INPUTS_SCHEMA,
    )
    atomic_write(fs, join(root, inputs_file), parquet_bytes(table))
    record["generations"].append(
        {
            "generation": number,
            "input": input_url,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": len(shards),
            "bytes": sum(s.size_bytes for s in shards),
            "inputs_file": inputs_file,
        }
    )
    _save(fs, root, record)


def _save(fs: fsspec.AbstractFileSystem, root: str, record: dict) -> None:
    """Write the record; an older one's inline shard lists move to _inputs/ on the way."""
    for generation in record["generations"]:
        if "inputs" in generation:
            inputs = generation.pop("inputs")
            generation["inputs_file"] = f"{INPUTS}/{generation['generation']:06d}.parquet"
            generation["shards"] = len(inputs)
            table = _inputs_table(inputs)
            atomic_write(fs, join(root, generation["inputs_file"]), parquet_bytes(table))
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
    _save(fs, root, record)


def remove_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """--overwrite: remove what this pipeline wrote there, nothing else (the writer lease stays)."""
    for name in OUTPUT_ENTRIES:
        failpoint(f"overwrite.{name}")
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
