"""The embedding job as one Ray Data graph: read -> tokenize+pack (CPU) -> embed (actor pool) -> Parquet.

Before the graph runs, the output folder says what is already done (manifest.py): committed rows
are left out of the read, and a finished job returns without starting Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import ray
from ray.data import ActorPoolStrategy

import pipeline
from pipeline.config import JobConfig
from pipeline.duplicate_ids import find_duplicate_ids
from pipeline.embed_stage import EmbedStage
from pipeline.encoder import DEFAULT_MAX_TOKENS
from pipeline.io.datasource import ShardDatasource
from pipeline.io.manifest import (
    COMMITS,
    DUPLICATES,
    ERRORS,
    FAILED,
    PARTS,
    RUN_RECORD,
    SHARDS,
    STAGING,
    atomic_write,
    join,
    parquet_bytes,
    recover,
)
from pipeline.io.schemas import output_schema
from pipeline.io.shards import Shard, discover_shards
from pipeline.io.sink import CommittedParquetSink
from pipeline.io.storage import filesystem_for
from pipeline.model.checkpoint import NEOBERT, resolve_checkpoint, weights_sha256
from pipeline.model.cpu_allocator import GLIBC_TUNABLES
from pipeline.model.embedding_defaults import EmbeddingSettingsError, resolve_embedding_defaults
from pipeline.progress import ProgressCounters, format_duration, progress_line
from pipeline.stage_reports import BatchReporter, ShardOutcomes
from pipeline.stages import tokenize_and_pack
from pipeline.tokenizer import TextTokenizer, check_chunk_overlap

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
    "duplicate_ids",
    "long_documents",
    "chunk_overlap",
    "format",
)


class SettingsMismatchError(ValueError):
    """A run would mix embeddings made with different settings into one output."""


class InputChangedError(ValueError):
    """An input shard changed since its rows were embedded into this output."""


class ErrorRateExceededError(RuntimeError):
    """More rows were dead-lettered than --max-error-rate allows; the summary is attached."""

    def __init__(self, message: str, summary: JobSummary) -> None:
        super().__init__(message)
        self.summary = summary


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
    error_counts: dict[str, int] = field(default_factory=dict)
    """Dead letters in the output by reason; 'file:<reason>' counts files that failed part way."""
    failed_files: list[str] = field(default_factory=list)
    startup_s: float | None = None
    """From the job's start to its first embedded pack: listing, Ray workers, model loading."""
    steady_tokens_per_s: float | None = None
    """Tokens after the first pack over the time after it: the rate a longer run settles at."""

    @property
    def dead_letters(self) -> int:
        return sum(n for reason, n in self.error_counts.items() if not reason.startswith("file:"))

    @property
    def error_rate(self) -> float:
        return self.dead_letters / self.rows_committed if self.rows_committed else 0.0

    def error_lines(self) -> list[str]:
        if not self.error_counts:
            return ["dead letters   none"]
        by_reason = ", ".join(f"{reason} {n:,}" for reason, n in self.error_counts.items())
        lines = [f"dead letters   {self.dead_letters:,} rows ({self.error_rate:.2%}) in errors/: {by_reason}"]
        if self.failed_files:
            lines.append(
                f"failed files   {len(self.failed_files)} could not be read to their end (first: "
                f"{self.failed_files[0]}); see _failed/, a re-run retries them"
            )
        return lines

    def lines(self) -> list[str]:
        if self.already_complete:
            return [
                f"already complete: {self.rows_committed:,} rows in {self.parts} parts; nothing to embed",
                *self.error_lines(),
                f"output         {self.output}",
            ]
        return [
            f"documents      {self.documents:,} embedded now, {self.rows_skipped:,} already committed before",
            f"committed      {self.rows_committed:,} rows in {self.parts} parts in all",
            f"tokens         {self.tokens:,}",
            f"padding waste  {self.padding_waste:.1%}",
            f"wall time      {format_duration(self.wall_s)}",
            f"throughput     {self.tokens_per_s:,.0f} tokens/s, {self.documents_per_s:,.1f} documents/s",
            *(
                [f"after start-up {self.steady_tokens_per_s:,.0f} tokens/s (first pack after {self.startup_s:.1f}s)"]
                if self.steady_tokens_per_s
                else []
            ),
            *self.error_lines(),
            f"output         {self.output}",
        ]


@dataclass(frozen=True)
class ModelFacts:
    """What the driver learns about the checkpoint without building the model."""

    source: str
    family: str
    weights_sha256: str
    hidden_size: int
    max_length: int
    pooling: str
    normalize: bool
    setting_sources: dict[str, str]
    tokenizer_json: str


def inspect_model(config: JobConfig) -> ModelFacts:
    folder = resolve_checkpoint(config.model, revision=config.revision, storage_options=_model_storage_options(config))
    defaults = resolve_embedding_defaults(
        folder, pooling=config.pooling, normalize=config.normalize, max_length=config.max_length
    )
    tokenizer = TextTokenizer.from_folder(
        folder, defaults.max_length, neobert=defaults.family == NEOBERT, lowercase=defaults.lowercase
    )
    if config.long_documents != "truncate":
        try:
            check_chunk_overlap(config.chunk_overlap, defaults.max_length)
        except ValueError as err:
            raise EmbeddingSettingsError(
                f"--chunk-overlap {config.chunk_overlap}: {err}; lower it or raise --max-length"
            ) from err
    return ModelFacts(
        source=config.model if config.revision is None else f"{config.model}@{config.revision}",
        family=defaults.family,
        weights_sha256=weights_sha256(folder),
        hidden_size=_hidden_size(folder),
        max_length=defaults.max_length,
        pooling=defaults.pooling,
        normalize=defaults.normalize,
        setting_sources=defaults.sources,
        tokenizer_json=tokenizer.to_json(),
    )


def _hidden_size(folder) -> int:
    raw = json.loads((folder / "config.json").read_text())
    # DistilBERT-style configs call it dim
    return int(raw.get("hidden_size") or raw["dim"])


def embedding_settings(config: JobConfig, model: ModelFacts) -> dict:
    """Everything that decides what the stored vectors are."""
    gpu = config.actors.gpus_per_actor > 0 or config.device.startswith("cuda")
    return {
        "model_source": model.source,
        "model_family": model.family,
        "model_weights_sha256": model.weights_sha256,
        "model_label": config.model_label,
        "tokenizer_sha256": hashlib.sha256(model.tokenizer_json.encode()).hexdigest(),
        "hidden_size": model.hidden_size,
        "pooling": model.pooling,
        "normalize": model.normalize,
        "max_length": model.max_length,
        "setting_sources": model.setting_sources,
        "output_dtype": config.output_dtype,
        "compute_dtype": config.dtype or ("bfloat16" if gpu else "float32"),
        "text_field": config.text_field,
        "id_field": config.id_field,
        "duplicate_ids": config.duplicate_ids,
        "long_documents": config.long_documents,
        "chunk_overlap": config.chunk_overlap if config.long_documents != "truncate" else None,
        "format": config.format,
        "schema": str(output_schema(model.hidden_size, config.output_dtype, chunks=config.long_documents == "chunk")),
    }


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
        return _checked_error_rate(config, _summary(config, shards, state, started, counters=None))
    log.info(
        "%d of %d shards to do (%s) -> %s with %s; %d rows already committed",
        len(todo),
        len(shards),
        _mib(todo),
        config.output,
        model.source,
        rows_before,
    )

    started_ray = _connect_ray(config)
    rejected = _check_duplicate_ids(config, shards, todo, out_fs, out_root)
    progress = ray.remote(num_cpus=0)(ProgressCounters).remote(
        total_shards=len(todo), total_bytes=sum(s.size_bytes for s in todo)
    )
    progress_started = time.monotonic() - started
    dataset = _build_graph(config, model, todo, committed, rejected, generation, progress)
    stop = threading.Event()
    watcher = threading.Thread(target=_log_progress, args=(progress, stop, config.progress_interval_s), daemon=True)
    watcher.start()
    try:
        try:
            dataset.write_datasink(
                CommittedParquetSink(config.output, config.storage, generation, _rows_per_part(config, model))
            )
        finally:
            stop.set()
            watcher.join()
    except BaseException:
        _release_failed_job(progress, started_ray)
        raise
    counters = ray.get(progress.snapshot.remote())
    ray.kill(progress)
    summary = _summary(config, shards, recover(out_fs, out_root), started, counters, rows_before, progress_started)
    _append_run(out_fs, out_root, summary)
    return _checked_error_rate(config, summary)


def _checked_error_rate(config: JobConfig, summary: JobSummary) -> JobSummary:
    if config.max_error_rate is not None and summary.error_rate > config.max_error_rate:
        raise ErrorRateExceededError(
            f"{summary.dead_letters:,} of {summary.rows_committed:,} rows dead-lettered ({summary.error_rate:.2%}), "
            f"more than --max-error-rate {config.max_error_rate:.2%}: {summary.error_counts}; see {config.output}/"
            f"{ERRORS}/",
            summary,
        )
    return summary


def _check_duplicate_ids(config: JobConfig, shards: list[Shard], todo: list[Shard], fs, root: str) -> dict:
    """With duplicate_ids flag or reject: list repeated ids in duplicates.parquet; for reject, return
    the rows to dead-letter by shard URL (row -> why)."""
    if config.duplicate_ids == "keep":
        return {}
    repeats = find_duplicate_ids(shards, config.text_field, config.id_field, config.storage)
    atomic_write(fs, join(root, DUPLICATES), parquet_bytes(repeats))
    log.info("%d rows repeat an earlier id; listed in %s", repeats.num_rows, DUPLICATES)
    if config.duplicate_ids == "flag":
        return {}
    rejected: dict[str, dict[int, str]] = {}
    pending = {s.url for s in todo}
    for r in repeats.to_pylist():
        if r["shard"] in pending:
            rejected.setdefault(r["shard"], {})[r["row"]] = (
                f"id {r['id']!r} was already seen at {r['first_shard']} row {r['first_row']}"
            )
    return rejected


def _build_graph(config: JobConfig, model: ModelFacts, todo, committed, rejected, generation: int, progress):
    """The Ray Data graph; each stage is a plain callable from stages.py."""
    gpu = config.actors.gpus_per_actor > 0
    tokens_per_batch = config.tokens_per_batch or max(DEFAULT_MAX_TOKENS["cuda" if gpu else "cpu"], model.max_length)
    outcomes = ShardOutcomes(config.output, config.storage, progress)
    documents = ray.data.read_datasource(
        ShardDatasource(
            todo,
            config.text_field,
            config.id_field,
            config.storage,
            skip={s.url: committed[s.url] for s in todo if s.url in committed},
            rejected=rejected,
            strict=config.strict,
            on_shard_read=outcomes.read_to_end,
            on_file_error=outcomes.failed,
        )
    )
    packs = documents.map_batches(
        tokenize_and_pack,
        batch_size=config.rows_per_tokenize_batch,
        batch_format="pyarrow",
        fn_kwargs=dict(
            tokenizer_json=model.tokenizer_json,
            max_length=model.max_length,
            tokens_per_batch=tokens_per_batch,
            long_documents=config.long_documents,
            chunk_overlap=config.chunk_overlap,
        ),
        num_cpus=1,
    )
    return packs.map_batches(
        EmbedStage,
        batch_size=1,
        batch_format="pyarrow",
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs=dict(
            pooling=model.pooling,
            normalize=model.normalize,
            output_dtype=config.output_dtype,
            long_documents=config.long_documents,
            device=("cuda" if gpu else "cpu") if config.device == "auto" else config.device,
            dtype=config.dtype,
            attention=config.attention,
            compile=config.compile,
            max_length=model.max_length,
            revision=config.revision,
            storage_options=_model_storage_options(config),
            on_batch_done=BatchReporter(progress),
            expected_weights_sha256=model.weights_sha256,
            torch_threads=config.actors.torch_threads or max(1, int(config.actors.cpus_per_actor)),
        ),
        compute=ActorPoolStrategy(min_size=config.actors.min_actors, max_size=config.actors.max_actors),
        **_actor_remote_args(config, gpu),
    )


def _actor_remote_args(config: JobConfig, gpu: bool) -> dict:
    args = {"num_cpus": config.actors.cpus_per_actor, "num_gpus": config.actors.gpus_per_actor}
    if config.actors.resources_per_actor:
        args["resources"] = dict(config.actors.resources_per_actor)
    if not gpu:
        # From the actor process's start: Ray Data calls the stage on a worker thread (see cpu_allocator).
        args["runtime_env"] = {"env_vars": {"GLIBC_TUNABLES": GLIBC_TUNABLES}}
    return args


def _rows_per_part(config: JobConfig, model: ModelFacts) -> int:
    bytes_per_row = model.hidden_size * (2 if config.output_dtype == "float16" else 4) + ROW_OVERHEAD_BYTES
    return max(1, int(config.target_file_mb * 2**20 // bytes_per_row))


def _summary(
    config, shards, state, started: float, counters: dict | None, rows_before: int = 0, progress_started: float = 0.0
) -> JobSummary:
    """progress_started: seconds from the job's start to the progress actor's, which counts from its own."""
    wall_s = time.monotonic() - started
    documents = counters["documents"] if counters else 0
    tokens = counters["tokens"] if counters else 0
    padded_tokens = counters["padded_tokens"] if counters else 0
    first_batch_s = counters["first_batch_s"] if counters else None
    startup_s = None if first_batch_s is None else progress_started + first_batch_s
    steady = None
    if startup_s is not None and wall_s - startup_s > 0 and tokens > counters["first_batch_tokens"]:
        steady = (tokens - counters["first_batch_tokens"]) / (wall_s - startup_s)
    return JobSummary(
        documents=documents,
        tokens=tokens,
        shards=len(shards),
        rows_committed=state.committed_rows,
        rows_skipped=rows_before,
        parts=len(state.commits),
        padding_waste=1 - tokens / padded_tokens if padded_tokens else 0.0,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s,
        documents_per_s=documents / wall_s,
        output=config.output,
        embed_nodes=counters["embed_nodes"] if counters else [],
        already_complete=counters is None,
        error_counts=state.error_counts(),
        failed_files=[f.url for f in state.failed_part_way()],
        startup_s=startup_s,
        steady_tokens_per_s=steady,
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
    for name in (RUN_RECORD, PARTS, ERRORS, COMMITS, STAGING, SHARDS, FAILED, DUPLICATES):
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _model_storage_options(config: JobConfig) -> dict:
    protocol = config.model.split("://", 1)[0] if "://" in config.model else "file"
    return config.storage.fsspec_options(protocol)


def _connect_ray(config: JobConfig) -> bool:
    """Join the cluster (config, else RAY_ADDRESS as `ray job submit` sets it), or start a local Ray.

    True when this started a local Ray of its own.
    """
    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    ray.init(num_cpus=config.num_cpus, include_dashboard=False)
    return True


def _release_failed_job(progress, started_ray: bool) -> None:
    """Give back what a failed job holds, so that a re-run in this process can start.

    Ray Data leaves the actors of a failed dataset running while they still had work in flight
    (ray-project/ray#24948): on a small machine they keep the CPUs or GPUs that a re-run's actors
    need, and the re-run waits for ever. A local Ray this job started goes down with them; a Ray the
    caller started is theirs to restart. The CLI is not affected: its process ends.
    """
    with contextlib.suppress(Exception):  # the job's own error is the one to report
        ray.kill(progress)
    if started_ray:
        ray.shutdown()


def _log_progress(progress, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        log.info("progress: %s", progress_line(ray.get(progress.snapshot.remote())))


def _mib(shards: list[Shard]) -> str:
    return f"{sum(s.size_bytes for s in shards) / 2**20:,.1f} MiB"
