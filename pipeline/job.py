"""The embedding job as one Ray Data graph: read -> tokenize+pack (CPU) -> embed (actor pool) -> Parquet."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

import pipeline
from pipeline.config import JobConfig
from pipeline.encoder import DEFAULT_MAX_TOKENS
from pipeline.io.datasource import ShardDatasource
from pipeline.io.shards import Shard, discover_shards
from pipeline.io.storage import arrow_filesystem, filesystem_for
from pipeline.model.checkpoint import load_config, resolve_checkpoint, sha256_of_file
from pipeline.progress import ProgressCounters, format_duration, progress_line
from pipeline.stages import EmbedStage, output_schema, tokenize_and_pack
from pipeline.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

RUN_RECORD = "_neobert_run.json"
# Bytes per output row besides the embedding itself (id, shard URL, counters), for file sizing.
ROW_OVERHEAD_BYTES = 200


class OutputExistsError(FileExistsError):
    """The output location already holds embeddings."""


@dataclass(frozen=True)
class JobSummary:
    """What a finished run did, printed by the CLI and stored in the run record."""

    documents: int
    tokens: int
    shards: int
    rows_written: int
    files_written: int
    padding_waste: float
    wall_s: float
    tokens_per_s: float
    documents_per_s: float
    output: str
    embed_nodes: list[str]

    def lines(self) -> list[str]:
        return [
            f"documents      {self.documents:,} (rows written: {self.rows_written:,} in {self.files_written} files)",
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
        tokenizer_json=tokenizer._tokenizer.to_str(),
    )


class _ShardReadReporter:
    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, shard: Shard) -> None:
        self.progress.shard_read.remote(shard.size_bytes)


class _BatchReporter:
    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, documents: int, tokens: int) -> None:
        self.progress.batch_embedded.remote(documents, tokens, ray.get_runtime_context().get_node_id())


def run_embedding_job(config: JobConfig) -> JobSummary:
    """Embed every document of config.input into Parquet under config.output."""
    started = time.monotonic()
    in_fs, in_path = filesystem_for(config.input, config.storage)
    shards = discover_shards(in_fs, in_path, config.format)
    out_fs, out_path = filesystem_for(config.output, config.storage)
    _check_output_is_free(out_fs, out_path, config.output)
    model = inspect_model(config)
    log.info("%d shards (%s) -> %s with %s", len(shards), _bytes(shards), config.output, model.source)

    _connect_ray(config)
    progress = ray.remote(num_cpus=0)(ProgressCounters).remote(
        total_shards=len(shards), total_bytes=sum(s.size_bytes for s in shards)
    )
    device_is_gpu = config.actors.gpus_per_actor > 0
    tokens_per_batch = config.tokens_per_batch or max(
        DEFAULT_MAX_TOKENS["cuda" if device_is_gpu else "cpu"], model.max_length
    )
    embed_options = dict(
        pooling=config.pooling,
        normalize=config.normalize,
        output_dtype=config.output_dtype,
        device=("cuda" if device_is_gpu else "cpu") if config.device == "auto" else config.device,
        dtype=config.dtype,
        attention=config.attention,
        max_length=model.max_length,
        revision=config.revision,
        storage_options=_model_storage_options(config),
        on_batch_done=_BatchReporter(progress),
        torch_threads=config.actors.torch_threads or max(1, int(config.actors.cpus_per_actor)),
    )
    bytes_per_row = model.hidden_size * (2 if config.output_dtype == "float16" else 4) + ROW_OVERHEAD_BYTES
    rows_per_file = max(1, config.target_file_mb * 2**20 // bytes_per_row)

    documents = ray.data.read_datasource(
        ShardDatasource(shards, config.text_field, config.id_field, config.storage, _ShardReadReporter(progress))
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
    embeddings = packs.map_batches(
        EmbedStage,
        batch_size=1,
        batch_format="pyarrow",
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs=embed_options,
        compute=ActorPoolStrategy(min_size=config.actors.min_actors, max_size=config.actors.max_actors),
        num_cpus=config.actors.cpus_per_actor,
        num_gpus=config.actors.gpus_per_actor,
    )

    stop = threading.Event()
    watcher = threading.Thread(target=_log_progress, args=(progress, stop, config.progress_interval_s), daemon=True)
    watcher.start()
    try:
        embeddings.write_parquet(out_path, filesystem=arrow_filesystem(out_fs), min_rows_per_file=rows_per_file)
    finally:
        stop.set()
        watcher.join()
    counters = ray.get(progress.snapshot.remote())
    ray.kill(progress)

    files = sorted(p for p in out_fs.find(out_path) if p.endswith(".parquet"))
    rows_written = sum(pq.ParquetFile(out_fs.open(p, "rb")).metadata.num_rows for p in files)
    wall_s = time.monotonic() - started
    summary = JobSummary(
        documents=counters["documents"],
        tokens=counters["tokens"],
        shards=len(shards),
        rows_written=rows_written,
        files_written=len(files),
        padding_waste=0.0,  # packs are unpadded on every attention backend
        wall_s=wall_s,
        tokens_per_s=counters["tokens"] / wall_s,
        documents_per_s=counters["documents"] / wall_s,
        output=config.output,
        embed_nodes=counters["embed_nodes"],
    )
    _write_run_record(out_fs, out_path, config, model, shards, summary)
    return summary


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


def _check_output_is_free(fs, path: str, url: str) -> None:
    if fs.exists(path) and any(p.endswith((".parquet", RUN_RECORD)) for p in fs.find(path)):
        raise OutputExistsError(
            f"{url} already holds embeddings; choose a new output location (or delete the old one first)"
        )


def _log_progress(progress, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        log.info("progress: %s", progress_line(ray.get(progress.snapshot.remote())))


def _bytes(shards: list[Shard]) -> str:
    return f"{sum(s.size_bytes for s in shards) / 2**20:,.1f} MiB"


def _write_run_record(fs, path: str, config: JobConfig, model: ModelFacts, shards, summary: JobSummary) -> None:
    """Self-describing output: what model and settings made these embeddings, from which inputs."""
    settings = config.model_dump(exclude={"storage", "ray_address", "progress_interval_s"})
    record = {
        "pipeline_version": pipeline.__version__,
        "model": {
            "source": model.source,
            "weights_sha256": model.weights_sha256,
            "hidden_size": model.hidden_size,
            "tokenizer_sha256": hashlib.sha256(model.tokenizer_json.encode()).hexdigest(),
            "label": config.model_label,
        },
        "embedding": {
            "pooling": config.pooling,
            "normalize": config.normalize,
            "max_length": model.max_length,
            "output_dtype": config.output_dtype,
            "compute_dtype": config.dtype or ("bfloat16" if config.actors.gpus_per_actor > 0 else "float32"),
            "schema": str(output_schema(model.hidden_size, config.output_dtype)),
        },
        "settings": settings,
        "inputs": [{"url": s.url, "format": s.format, "fingerprint": s.fingerprint} for s in shards],
        "summary": asdict(summary),
    }
    with fs.open(f"{path.rstrip('/')}/{RUN_RECORD}", "w") as f:
        json.dump(record, f, indent=2)


def read_run_record(output_folder: Path) -> dict:
    return json.loads((Path(output_folder) / RUN_RECORD).read_text())
