"""The embedding job: read -> pack (CPU tasks) -> embed (actor pool) -> committed Parquet, as one Ray Data graph.

Before the graph runs, the driver checks the settings against the model and a sample of the input
(preflight.py), and the output says what is already done (io/manifest.py): committed rows are left
out of the read, and a finished job returns without starting Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import JobConfig
from pipeline.duplicate_ids import rows_to_reject
from pipeline.io.generations import Changes, add_generation, plan_run, shard_counts
from pipeline.io.lease import LeaseLostError, writer_lease
from pipeline.io.manifest import dead_letter_example
from pipeline.io.recovery import compact_while_running, recover
from pipeline.io.run_record import (
    InputChangedError,
    append_run,
    embedding_settings,
    open_run_record,
    remove_output,
)
from pipeline.io.shards import ShardListing, discover_shards
from pipeline.io.sink import CommittedParquetSink
from pipeline.io.storage import filesystem_for
from pipeline.io.todo import ShardsToRead, remove_shards_to_read, todo_url, write_shards_to_read
from pipeline.model.cpu_allocator import GLIBC_TUNABLES
from pipeline.model.devices import DEFAULT_MAX_TOKENS, device_type
from pipeline.model.inspection import CheckpointFacts
from pipeline.preflight import check_input_fields, check_paths, inspect_model, sample_input
from pipeline.progress import (
    Progress,
    ProgressCounters,
    RateWindow,
    estimate_progress,
    merge_counters,
    progress_line,
)
from pipeline.ray_session import check_actors_fit, connect_ray, release_failed_job
from pipeline.stages.embed import EmbedStage
from pipeline.stages.pack import tokenize_and_pack
from pipeline.stages.read import ShardDatasource
from pipeline.stages.reports import BatchReporter, ShardOutcomes
from pipeline.summary import JobSummary, checked, summarize

log = logging.getLogger(__name__)

# Bytes per output row besides the embedding itself (id, shard URL, counters), for part sizing.
ROW_OVERHEAD_BYTES = 200
# A run commits at least about this many parts, so that an early kill keeps most of its work.
MIN_PARTS_PER_RUN = 20
MIN_ROWS_PER_PART = 1000
# How often a running job looks whether its records are worth compacting (they are read, as status reads them).
COMPACT_EVERY_S = 60.0


@dataclass(frozen=True)
class _Plan:
    """What the graph runs: the settings, the model, and the shards still to do."""

    config: JobConfig
    facts: CheckpointFacts
    tokenizer_json: str
    todo: ShardsToRead
    generation: int
    rows_per_byte: float | None
    lease_token: int


def run_embedding_job(
    config: JobConfig, *, overwrite: bool = False, on_progress: Callable[[Progress], None] | None = None
) -> JobSummary:
    """Embed every not yet committed document of config.input into Parquet under config.output.

    on_progress gets the job's progress every config.progress_interval_s (default: a log line).
    Raises RunIncompleteError, with the summary, when the run finished without embedding what it should.
    """
    started = time.monotonic()
    in_fs, in_path = filesystem_for(config.input, config.storage)
    shards = discover_shards(in_fs, in_path, config.format, config.fingerprint)
    shard_count = len(shards)
    out_fs, out_root = filesystem_for(config.output, config.storage)
    check_paths(config, out_fs, out_root)
    sample = sample_input(config, shards)
    check_input_fields(config, shards, sample)
    facts, tokenizer = inspect_model(config)
    with writer_lease(config, out_fs, out_root) as lease_token:
        if overwrite:
            remove_output(out_fs, out_root)
        tokenizer_json = tokenizer.to_json()
        settings = embedding_settings(config, facts, tokenizer_json)
        record, state = open_run_record(
            out_fs, out_root, settings, recover(out_fs, out_root, lease_token, shard_facts=False)
        )
        planned = plan_run(out_fs, out_root, record, state, shards)
        changes = _changes_to_record(config, planned.changes, latest=len(record["generations"]) - 1)
        summary_of = partial(
            summarize,
            output=config.output,
            shards=shard_count,
            started=started,
            rows_before=state.committed_rows,
            chunks=config.long_documents == "chunk",
            max_error_rate=config.max_error_rate,
        )
        # Generations a crashed run left unfinished first, oldest first; then what changed.
        work = dict(planned.unfinished)
        if changes:
            generation = add_generation(out_fs, out_root, record, config.input, changes, refresh=config.refresh)
            log.info("generation %d: %s", generation, _described(changes))
            if changes.added or changes.changed:  # deletions alone need no model work
                work[generation] = changes.added + changes.changed
        todo = {
            generation: write_shards_to_read(
                todo_url(config.output, f"{generation:06d}"), config.storage, listed, planned.committed.get(generation)
            )
            for generation, listed in work.items()
        }
        started_ray = connect_ray(config) if todo else False
        repeats = _rows_to_reject(config, shards, started_ray) if todo else None
        changed, change_counts, failed_at_plan = bool(changes), changes.counts() if changes else None, planned.failed
        # From here on the graphs read their shards from _todo/: the listing's columns (about 120 B a
        # shard) and its subsets go, rather than stay on the driver for the whole run.
        del shards, planned, changes, work
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages for itself otherwise
        counters, progress_offset_s = None, 0.0
        for generation, shards_to_read in todo.items():
            log.info(
                "generation %d: %d of %d shards to do (%s) -> %s",
                generation,
                len(shards_to_read),
                shard_count,
                _mib(shards_to_read.size_bytes),
                config.output,
            )
            plan = _Plan(
                config,
                facts,
                tokenizer_json,
                shards_to_read,
                generation,
                sample.rows_per_byte,
                lease_token,
            )
            ran, offset_s = _run_graph(plan, repeats, started_ray, on_progress, started)
            counters, progress_offset_s = merge_counters(counters, ran), progress_offset_s or offset_s
            state = recover(out_fs, out_root, lease_token, shard_facts=False)
        if not todo:
            log.info("%s is complete: %d rows committed; nothing to embed", config.output, state.committed_rows)
        if todo or changed:  # what the output holds, or which versions are current, moved since the plan
            _, failed = shard_counts(out_fs, out_root, record, state)
        else:  # a finished re-run: the plan's pass over the output found them already
            failed = failed_at_plan
        summary = summary_of(
            state=state,
            failed=failed,
            counters=counters,
            progress_offset_s=progress_offset_s,
            generation=len(record["generations"]) - 1,
            changes=change_counts,
        )
        append_run(out_fs, out_root, summary)  # with its --max-error-rate, which verify holds the output to
        if todo:
            remove_shards_to_read(out_fs, out_root)
    return checked(summary, dead_letter_example(out_fs, out_root, state))


def _changes_to_record(config: JobConfig, changes: Changes, latest: int) -> Changes:
    """The new generation this run adds, of the listing's changes: new shards always; changed and
    deleted ones with --refresh (without it a changed shard is refused, and a vanished one only noted)."""
    if config.refresh:
        if not changes:
            log.info("nothing changed since generation %d: no model work", latest)
        return changes
    if changes.changed:
        raise InputChangedError(
            f"{len(changes.changed)} input shards changed since they were embedded into this output "
            f"(first: {changes.changed[0].url}); --refresh embeds them again as a new generation, or use a new "
            "output location, or --overwrite to start again"
        )
    if changes.deleted:
        log.warning(
            "%d embedded shards are no longer listed (first: %s): their embeddings stay; --refresh records "
            "them as deleted",
            len(changes.deleted),
            changes.deleted[0],
        )
    return Changes(changes.added, changes.added.take([]), [])


def _described(changes: Changes) -> str:
    return ", ".join(f"{n:,} shards {kind}" for kind, n in changes.counts().items() if n) or "no change"


def _rows_to_reject(config: JobConfig, shards: ShardListing, started_ray: bool):
    """With duplicate_ids flag or reject, the repeated ids listed (duplicate_ids.rows_to_reject), once the
    actors are known to fit."""
    try:
        check_actors_fit(config, local=started_ray)
        return rows_to_reject(config, shards)
    except BaseException:
        release_failed_job(None, started_ray)
        raise


def _run_graph(plan: _Plan, repeats, started_ray: bool, on_progress, started: float) -> tuple[dict, float]:
    """Read, pack, embed and commit the shards to do; the progress counters at the end, and their start."""
    config, todo = plan.config, plan.todo
    progress = None
    try:
        # On the driver's node: losing a worker node must not take the job's counters with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressCounters).remote(
            total_shards=len(todo),
            total_bytes=todo.size_bytes,
            rows_done_before=todo.committed_rows,
            rows_per_byte_guess=plan.rows_per_byte,
        )
        progress_offset_s = time.monotonic() - started
        rows = _embed(_read_and_pack(plan, repeats, progress), plan, progress)
        sink = CommittedParquetSink(
            config.output, config.storage, plan.generation, _rows_per_part(plan), plan.lease_token
        )
        with _ProgressWatcher(progress, on_progress, config.progress_interval_s), _CompactWhileRunning(plan):
            rows.write_datasink(sink)
        counters = ray.get(progress.snapshot.remote())
        ray.kill(progress)
    except BaseException:
        release_failed_job(progress, started_ray)
        raise
    return counters, progress_offset_s


def _read_and_pack(plan: _Plan, repeats, progress):
    """The read stage (a task per shard) and the pack stage (CPU tasks) of the graph."""
    config, facts = plan.config, plan.facts
    outcomes = ShardOutcomes(config.output, config.storage, progress)
    rows = ray.data.read_datasource(
        ShardDatasource(
            plan.todo,
            config.text_field,
            config.id_field,
            config.storage,
            repeats=repeats,
            strict=config.strict,
            outcomes=outcomes,
        )
    )
    return rows.map_batches(
        tokenize_and_pack,
        batch_size=config.rows_per_tokenize_batch,
        batch_format="pyarrow",
        fn_kwargs=dict(
            tokenizer_json=plan.tokenizer_json,
            max_length=facts.max_length,
            tokens_per_batch=token_budget(config, facts),
            long_documents=config.long_documents,
            chunk_overlap=config.chunk_overlap,
        ),
        num_cpus=1,
    )


def token_budget(config: JobConfig, facts: CheckpointFacts) -> int:
    """Tokens per forward pass: what the pack stage packs to and the embed stage runs in one pass."""
    return config.tokens_per_batch or max(DEFAULT_MAX_TOKENS[device_type(config.actor_device)], facts.max_length)


def _embed(packs, plan: _Plan, progress):
    """The embed stage: an autoscaling pool of actors, one model copy each."""
    config, facts = plan.config, plan.facts
    actors = config.actors
    remote_args = {"num_cpus": actors.cpus_per_actor, "num_gpus": actors.gpus_per_actor}
    if actors.resources_per_actor:
        remote_args["resources"] = dict(actors.resources_per_actor)
    if device_type(config.actor_device) == "cpu":
        # From the actor process's start: Ray Data calls the stage on a worker thread (see cpu_allocator).
        remote_args["runtime_env"] = {"env_vars": {"GLIBC_TUNABLES": GLIBC_TUNABLES}}
    return packs.map_batches(
        EmbedStage,
        batch_size=1,
        batch_format="pyarrow",
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs=dict(
            pooling=facts.pooling,
            normalize=facts.normalize,
            output_dtype=config.output_dtype,
            long_documents=config.long_documents,
            device=config.actor_device,
            dtype=facts.compute_dtype,
            attention=config.attention,
            compile=config.compile,
            max_length=facts.max_length,
            max_tokens=token_budget(config, facts),  # packs reach the model as the pack stage cut them
            revision=config.revision,
            storage_options=config.model_storage_options(),
            on_batch_done=BatchReporter(progress),
            expected_weights_sha256=facts.weights_sha256,
            torch_threads=actors.torch_threads or max(1, int(actors.cpus_per_actor)),
        ),
        compute=ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors),
        **remote_args,
    )


def _rows_per_part(plan: _Plan) -> int:
    """Rows per output part: at most target_file_mb of Parquet, and a share of the run's rows, so that a
    run commits along the way rather than all at its end (Ray Data bundles a write by rows only)."""
    config = plan.config
    bytes_per_row = plan.facts.hidden_size * (2 if config.output_dtype == "float16" else 4) + ROW_OVERHEAD_BYTES
    rows = int(config.target_file_mb * 2**20 // bytes_per_row)
    if plan.rows_per_byte:
        estimated_rows = plan.todo.size_bytes * plan.rows_per_byte
        rows = min(rows, max(MIN_ROWS_PER_PART, int(estimated_rows) // MIN_PARTS_PER_RUN))
    return max(1, rows)


class _WhileTheGraphRuns:
    """Calls tick() every interval_s on a thread of its own, from entering the block to leaving it
    (a tick under way finishes first); a tick that returns False ends the calls."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s) and self.tick():
            pass

    def tick(self) -> bool:
        raise NotImplementedError


class _ProgressWatcher(_WhileTheGraphRuns):
    """While the graph runs, hand the job's progress to on_progress (or the log) every interval_s, and
    once more when it has finished."""

    def __init__(self, progress, on_progress, interval_s: float) -> None:
        super().__init__(interval_s)
        self.progress = progress
        self.on_progress = on_progress or (lambda p: log.info("progress: %s", progress_line(p)))
        self.window = RateWindow()

    def __exit__(self, exc_type, *exc) -> None:
        super().__exit__(exc_type, *exc)
        if exc_type is None:
            self.tick()

    def tick(self) -> bool:
        try:
            snapshot = ray.get(self.progress.snapshot.remote())
        except ray.exceptions.RayError as err:  # progress is for people: the job goes on without it
            log.warning("progress is not available (%s); the job goes on", type(err).__name__)
            return False
        self.on_progress(estimate_progress(snapshot, self.window.add(snapshot["elapsed_s"], snapshot["tokens"])))
        return True


class _CompactWhileRunning(_WhileTheGraphRuns):
    """While the graph runs, fold the commit and read records it has written into a checkpoint every
    COMPACT_EVERY_S, once they are worth it (recovery.compact_while_running): a long run's status
    and a crash's recovery then read its facts a batch at a time. A failure only costs that: the
    run's own recovery compacts what is left. A compaction under way when the graph ends finishes:
    each of its steps is safe to stop after."""

    def __init__(self, plan: _Plan) -> None:
        super().__init__(COMPACT_EVERY_S)
        self.fs, self.root = filesystem_for(plan.config.output, plan.config.storage)
        self.lease_token = plan.lease_token

    def tick(self) -> bool:
        try:
            compact_while_running(self.fs, self.root, self.lease_token)
        except LeaseLostError:
            return False  # the run's own writes stop on it too
        except Exception as err:  # the run goes on; its recovery compacts what is left
            log.warning("compacting the run's records failed (%s: %s); the run goes on", type(err).__name__, err)
        return True


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:,.1f} MiB"
