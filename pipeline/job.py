"""The embedding job as one Ray Data graph: read -> tokenize+pack (CPU) -> embed (actor pool) -> Parquet.

Before the graph runs, the output folder says what is already done (manifest.py): committed rows
are left out of the read, and a finished job returns without starting Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import ray
from ray.data import ActorPoolStrategy

import pipeline
from pipeline.config import JobConfig, StorageConfig
from pipeline.encoder import DEFAULT_MAX_TOKENS
from pipeline.io.datasource import ShardDatasource
from pipeline.io.manifest import (
    COMMITS,
    PARTS,
    RUN_RECORD,
    SHARDS,
    STAGING,
    ShardDone,
    atomic_write,
    join,
    recover,
    write_shard_done,
)
from pipeline.io.shards import Shard, discover_shards
from pipeline.io.sink import CommittedParquetSink
from pipeline.io.storage import filesystem_for
from pipeline.model.checkpoint import load_config, resolve_checkpoint, sha256_of_file
from pipeline.progress import ProgressCounters, format_duration, progress_line
from pipeline.stages import EmbedStage, output_schema, tokenize_and_pack
from pipeline.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Bytes per output row besides the embedding itself (id, shard URL, counters), for part sizing.
ROW_OVERHEAD_BYTES = 200
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
    "format",
)


class SettingsMismatchError(ValueError):
    """A run would mix embeddings made with different settings into one output."""


class InputChangedError(ValueError):
    """An input shard changed since its rows were embedded into this output."""


@dataclass(frozen=True)
class JobSummary:
    """What a run did, printed by the CLI and appended to the run record."""

    documents: int
    tokens: int
    shards: int
    rows_committed: int
    rows_skipped: int
    parts: int
    padding_waste: float
    wall_s: float
    tokens_per_s: float
    documents_per_s: float
    output: str
    embed_nodes: list[str]
    already_complete: bool = False

    def lines(self) -> list[str]:
        if self.already_complete:
            return [
                f"already complete: {self.rows_committed:,} rows in {self.parts} parts; nothing to embed",
                f"output         {self.output}",
            ]
        return [
            f"documents      {self.documents:,} embedded now, {self.rows_skipped:,} already committed before",
            f"committed      {self.rows_committed:,} rows in {self.parts} parts in all",
            f"tokens         {self.tokens:,}",
            f"padding waste  {self.padding_waste:.1%}",
            f"wall time      {format_duration(self.wall_s)}",
            f"throughput     {self.tokens_per_s:,.0f} tokens/s, {self.documents_per_s:,.1f} documents/s",
            f"output         {self.output}",
        ]


@dataclass(frozen=True)
class ModelFacts:
    """What the driver learns about the checkpoint without building the model."""

    source: str
    weights_sha256: str
    hidden_size: int
    max_length: int
    tokenizer_json: str


def inspect_model(config: JobConfig) -> ModelFacts:
    folder = resolve_checkpoint(config.model, revision=config.revision, storage_options=_model_storage_options(config))
    model_config = load_config(folder)
    max_length = config.max_length or model_config.max_length
    if max_length > model_config.max_length:
        raise ValueError(f"--max-length {max_length} exceeds the checkpoint's {model_config.max_length}")
    tokenizer = TextTokenizer.from_folder(folder, max_length)
    return ModelFacts(
        source=config.model if config.revision is None else f"{config.model}@{config.revision}",
        weights_sha256=sha256_of_file(folder / "model.safetensors"),
        hidden_size=model_config.hidden_size,
        max_length=max_length,
        tokenizer_json=tokenizer.to_json(),
    )


def embedding_settings(config: JobConfig, model: ModelFacts) -> dict:
    """Everything that decides what the stored vectors are."""
    gpu = config.actors.gpus_per_actor > 0 or config.device.startswith("cuda")
    return {
        "model_source": model.source,
        "model_weights_sha256": model.weights_sha256,
        "model_label": config.model_label,
        "tokenizer_sha256": hashlib.sha256(model.tokenizer_json.encode()).hexdigest(),
        "hidden_size": model.hidden_size,
        "pooling": config.pooling,
        "normalize": config.normalize,
        "max_length": model.max_length,
        "output_dtype": config.output_dtype,
        "compute_dtype": config.dtype or ("bfloat16" if gpu else "float32"),
        "text_field": config.text_field,
        "id_field": config.id_field,
        "format": config.format,
        "schema": str(output_schema(model.hidden_size, config.output_dtype)),
    }


class _ShardDoneRecorder:
    """Called by a read task at the end of a shard: records its row count in the output."""

    def __init__(self, output_url: str, storage: StorageConfig, progress) -> None:
        self.output_url = output_url
        self.storage = storage
        self.progress = progress

    def __call__(self, shard: Shard, rows: int) -> None:
        fs, root = filesystem_for(self.output_url, self.storage)
        write_shard_done(fs, root, ShardDone(shard.url, shard.fingerprint, rows))
        self.progress.shard_read.remote(shard.size_bytes)


class _BatchReporter:
    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, documents: int, tokens: int) -> None:
        self.progress.batch_embedded.remote(documents, tokens, ray.get_runtime_context().get_node_id())


def run_embedding_job(config: JobConfig, *, overwrite: bool = False) -> JobSummary:
    """Embed every not yet committed document of config.input into Parquet under config.output."""
    started = time.monotonic()
    in_fs, in_path = filesystem_for(config.input, config.storage)
    shards = discover_shards(in_fs, in_path, config.format)
    out_fs, out_root = filesystem_for(config.output, config.storage)
    if overwrite:
        _remove_output(out_fs, out_root)
    model = inspect_model(config)
    record = _start_run_record(out_fs, out_root, embedding_settings(config, model), config.input, shards)
    generation = len(record["generations"]) - 1

    state = recover(out_fs, out_root)
    committed = state.committed_ranges()
    todo = [s for s in shards if not state.shard_complete(s.url, committed)]
    rows_before = state.committed_rows
    if not todo:
        log.info("%s is complete: %d rows committed; nothing to embed", config.output, rows_before)
        return _summary(config, shards, state, started, counters=None)
    log.info(
        "%d of %d shards to do (%s) -> %s with %s; %d rows already committed",
        len(todo),
        len(shards),
        _mib(todo),
        config.output,
        model.source,
        rows_before,
    )

    _connect_ray(config)
    progress = ray.remote(num_cpus=0)(ProgressCounters).remote(
        total_shards=len(todo), total_bytes=sum(s.size_bytes for s in todo)
    )
    dataset = _build_graph(config, model, todo, committed, generation, progress)
    stop = threading.Event()
    watcher = threading.Thread(target=_log_progress, args=(progress, stop, config.progress_interval_s), daemon=True)
    watcher.start()
    try:
        dataset.write_datasink(
            CommittedParquetSink(config.output, config.storage, generation, _rows_per_part(config, model))
        )
    finally:
        stop.set()
        watcher.join()
    counters = ray.get(progress.snapshot.remote())
    ray.kill(progress)
    summary = _summary(config, shards, recover(out_fs, out_root), started, counters, rows_before)
    _append_run(out_fs, out_root, summary)
    return summary


def _build_graph(config: JobConfig, model: ModelFacts, todo, committed, generation: int, progress):
    """The Ray Data graph; each stage is a plain callable from stages.py."""
    gpu = config.actors.gpus_per_actor > 0
    tokens_per_batch = config.tokens_per_batch or max(DEFAULT_MAX_TOKENS["cuda" if gpu else "cpu"], model.max_length)
    documents = ray.data.read_datasource(
        ShardDatasource(
            todo,
            config.text_field,
            config.id_field,
            config.storage,
            skip={s.url: committed[s.url] for s in todo if s.url in committed},
            on_shard_read=_ShardDoneRecorder(config.output, config.storage, progress),
        )
    )
    packs = documents.map_batches(
        tokenize_and_pack,
        batch_size=config.rows_per_tokenize_batch,
        batch_format="pyarrow",
        fn_kwargs=dict(
            tokenizer_json=model.tokenizer_json, max_length=model.max_length, tokens_per_batch=tokens_per_batch
        ),
        num_cpus=1,
    )
    return packs.map_batches(
        EmbedStage,
        batch_size=1,
        batch_format="pyarrow",
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs=dict(
            pooling=config.pooling,
            normalize=config.normalize,
            output_dtype=config.output_dtype,
            device=("cuda" if gpu else "cpu") if config.device == "auto" else config.device,
            dtype=config.dtype,
            attention=config.attention,
            max_length=model.max_length,
            revision=config.revision,
            storage_options=_model_storage_options(config),
            on_batch_done=_BatchReporter(progress),
            torch_threads=config.actors.torch_threads or max(1, int(config.actors.cpus_per_actor)),
        ),
        compute=ActorPoolStrategy(min_size=config.actors.min_actors, max_size=config.actors.max_actors),
        num_cpus=config.actors.cpus_per_actor,
        num_gpus=config.actors.gpus_per_actor,
    )


def _rows_per_part(config: JobConfig, model: ModelFacts) -> int:
    bytes_per_row = model.hidden_size * (2 if config.output_dtype == "float16" else 4) + ROW_OVERHEAD_BYTES
    return max(1, int(config.target_file_mb * 2**20 // bytes_per_row))


def _summary(config, shards, state, started: float, counters: dict | None, rows_before: int = 0) -> JobSummary:
    wall_s = time.monotonic() - started
    documents = counters["documents"] if counters else 0
    tokens = counters["tokens"] if counters else 0
    return JobSummary(
        documents=documents,
        tokens=tokens,
        shards=len(shards),
        rows_committed=state.committed_rows,
        rows_skipped=rows_before,
        parts=len(state.commits),
        padding_waste=0.0,  # packs are unpadded on every attention backend
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s,
        documents_per_s=documents / wall_s,
        output=config.output,
        embed_nodes=counters["embed_nodes"] if counters else [],
        already_complete=counters is None,
    )


def _start_run_record(fs, root: str, settings: dict, input_url: str, shards: list[Shard]) -> dict:
    """Create the run record, or check a resumed run against it and add new shards as a generation."""
    path = join(root, RUN_RECORD)
    inputs = [{"url": s.url, "format": s.format, "fingerprint": s.fingerprint} for s in shards]
    if not fs.exists(path):
        record = {
            "pipeline_version": pipeline.__version__,
            "settings": settings,
            "generations": [{"generation": 0, "input": input_url, "inputs": inputs}],
            "runs": [],
        }
        atomic_write(fs, path, json.dumps(record, indent=2).encode())
        return record
    record = json.loads(fs.cat_file(path))
    different = {
        key: (record["settings"].get(key), settings[key])
        for key in PINNED_SETTINGS
        if record["settings"].get(key) != settings[key]
    }
    if different:
        listed = "; ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in different.items())
        raise SettingsMismatchError(
            f"{fs.unstrip_protocol(root)} holds embeddings made with other settings ({listed}); "
            "use a new output location, or --overwrite to discard the old embeddings"
        )
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
        atomic_write(fs, path, json.dumps(record, indent=2).encode())
        log.info("%d new shards since the last run: generation %d", len(new), len(record["generations"]) - 1)
    return record


def _append_run(fs, root: str, summary: JobSummary) -> None:
    path = join(root, RUN_RECORD)
    record = json.loads(fs.cat_file(path))
    record["runs"].append(asdict(summary))
    atomic_write(fs, path, json.dumps(record, indent=2).encode())


def _remove_output(fs, root: str) -> None:
    """--overwrite: remove what this pipeline wrote there, nothing else."""
    for name in (RUN_RECORD, PARTS, COMMITS, STAGING, SHARDS):
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _model_storage_options(config: JobConfig) -> dict:
    protocol = config.model.split("://", 1)[0] if "://" in config.model else "file"
    return config.storage.fsspec_options(protocol)


def _connect_ray(config: JobConfig) -> None:
    """Join the cluster (config, else RAY_ADDRESS as `ray job submit` sets it), or start a local Ray."""
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.num_cpus, include_dashboard=False)


def _log_progress(progress, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        log.info("progress: %s", progress_line(ray.get(progress.snapshot.remote())))


def _mib(shards: list[Shard]) -> str:
    return f"{sum(s.size_bytes for s in shards) / 2**20:,.1f} MiB"
