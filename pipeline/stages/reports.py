"""What the stages report from Ray workers while a job runs.

Shards read to their end or failed part way are recorded in the output, in one record per read task
(not per shard: a million small shards must not cost a million small objects); embedded packs are
counted by the job's progress actor. Light to import: the read tasks that call these load no model code.
"""

from __future__ import annotations

import logging
import time

import ray

from pipeline.config import StorageConfig
from pipeline.io.manifest import FileFailure, ShardDone, write_read_record
from pipeline.io.readers import FileProblem
from pipeline.io.shards import Shard
from pipeline.io.storage import filesystem_for

log = logging.getLogger(__name__)

# How often a read task tells the progress actor what it read: a call per shard took a fifth of a
# read task's time on a million 2-row shards (py-spy, benchmarks/RESULTS.md).
REPORT_EVERY_S = 1.0


class ShardOutcomes:
    """Where read tasks record how their shards ended; each task takes its own recorder()."""

    def __init__(self, output_url: str, storage: StorageConfig, progress) -> None:
        self.output_url = output_url
        self.storage = storage
        self.progress = progress

    def recorder(self) -> TaskOutcomes:
        return TaskOutcomes(self)


class TaskOutcomes:
    """One read task's shard outcomes, written to the output as one record when the task ends.

    A task that dies first records nothing: its shards are read again by the next run, which skips
    their committed rows, so nothing is lost and nothing is embedded twice.
    """

    def __init__(self, outcomes: ShardOutcomes) -> None:
        self.outcomes = outcomes
        self.done: list[ShardDone] = []
        self.failures: list[FileFailure] = []
        self.unreported = [0, 0, 0]  # bytes, rows, shards read since the last report
        self.next_report = time.monotonic() + REPORT_EVERY_S

    def read_to_end(self, shard: Shard, rows: int) -> None:
        self.done.append(ShardDone(shard.url, shard.fingerprint, rows))
        self._count(shard.size_bytes, rows)

    def failed(self, shard: Shard, rows_read: int, problem: FileProblem) -> None:
        log.warning("%s: %s after %d rows (%s)", shard.url, problem.message, rows_read, problem.reason)
        self.failures.append(FileFailure(shard.url, shard.fingerprint, rows_read, problem.reason, problem.message))
        self._count(shard.size_bytes, rows_read)

    def _count(self, size_bytes: int, rows: int) -> None:
        self.unreported = [self.unreported[0] + size_bytes, self.unreported[1] + rows, self.unreported[2] + 1]
        if time.monotonic() >= self.next_report:
            self._report()

    def _report(self) -> None:
        if self.unreported[2]:
            self.outcomes.progress.shard_read.remote(*self.unreported)
        self.unreported = [0, 0, 0]
        self.next_report = time.monotonic() + REPORT_EVERY_S

    def close(self) -> None:
        self._report()
        if self.done or self.failures:
            fs, root = filesystem_for(self.outcomes.output_url, self.outcomes.storage)
            write_read_record(fs, root, self.done, self.failures)


class BatchReporter:
    """Called by the embedding actors after each pack: counts for the progress actor, and the node."""

    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, documents: int, dead_letters: int, sequences: int, tokens: int, padded_tokens: int) -> None:
        node_id = ray.get_runtime_context().get_node_id()
        self.progress.batch_embedded.remote(documents, dead_letters, sequences, tokens, padded_tokens, node_id)
