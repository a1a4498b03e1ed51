"""What the stages report from Ray workers while a job runs.

Shards read to their end or failed part way are recorded in the output; embedded packs are counted
by the job's progress actor. Light to import: the read tasks that call these load no model code.
"""

from __future__ import annotations

import logging

import ray

from pipeline.config import StorageConfig
from pipeline.io.layout import FAILED
from pipeline.io.manifest import FileFailure, ShardDone, write_file_failure, write_shard_done
from pipeline.io.readers import FileProblem
from pipeline.io.shards import Shard
from pipeline.io.storage import filesystem_for

log = logging.getLogger(__name__)


class ShardOutcomes:
    """Called by read tasks when a shard ends: read to its end, or failed part way. Recorded in the output."""

    def __init__(self, output_url: str, storage: StorageConfig, progress) -> None:
        self.output_url = output_url
        self.storage = storage
        self.progress = progress

    def read_to_end(self, shard: Shard, rows: int) -> None:
        fs, root = filesystem_for(self.output_url, self.storage)
        write_shard_done(fs, root, ShardDone(shard.url, shard.fingerprint, rows))
        self.progress.shard_read.remote(shard.size_bytes, rows)

    def failed(self, shard: Shard, rows_read: int, problem: FileProblem) -> None:
        log.warning("%s: %s after %d rows (%s); recorded in %s/", shard.url, problem.message, rows_read, FAILED, FAILED)
        fs, root = filesystem_for(self.output_url, self.storage)
        write_file_failure(
            fs, root, FileFailure(shard.url, shard.fingerprint, rows_read, problem.reason, problem.message)
        )
        self.progress.shard_read.remote(shard.size_bytes, rows_read)


class BatchReporter:
    """Called by the embedding actors after each pack: counts for the progress actor, and the node."""

    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, documents: int, dead_letters: int, sequences: int, tokens: int, padded_tokens: int) -> None:
        node_id = ray.get_runtime_context().get_node_id()
        self.progress.batch_embedded.remote(documents, dead_letters, sequences, tokens, padded_tokens, node_id)
