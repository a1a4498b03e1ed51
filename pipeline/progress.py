"""Progress of a running job: counters the stages report to, and the lines a person watches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class ProgressCounters:
    """What has been done so far; the job's progress actor holds one of these."""

    total_shards: int = 0
    total_bytes: int = 0
    shards_read: int = 0
    bytes_read: int = 0
    documents: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    started_s: float = field(default_factory=time.monotonic)
    embed_nodes: set[str] = field(default_factory=set)
    first_batch_s: float | None = None
    """Seconds from this actor's start to the first embedded pack: workers started, model loaded."""
    first_batch_tokens: int = 0

    def shard_read(self, size_bytes: int) -> None:
        self.shards_read += 1
        self.bytes_read += size_bytes

    def batch_embedded(self, documents: int, tokens: int, padded_tokens: int, node_id: str) -> None:
        if self.first_batch_s is None:
            self.first_batch_s = time.monotonic() - self.started_s
            self.first_batch_tokens = tokens
        self.documents += documents
        self.tokens += tokens
        self.padded_tokens += padded_tokens
        self.embed_nodes.add(node_id)

    def snapshot(self) -> dict:
        return {
            "total_shards": self.total_shards,
            "total_bytes": self.total_bytes,
            "shards_read": self.shards_read,
            "bytes_read": self.bytes_read,
            "documents": self.documents,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "elapsed_s": time.monotonic() - self.started_s,
            "embed_nodes": sorted(self.embed_nodes),
            "first_batch_s": self.first_batch_s,
            "first_batch_tokens": self.first_batch_tokens,
        }


def progress_line(snapshot: dict) -> str:
    """e.g. '12,000 docs, 3,400,000 tokens, 25,000 tok/s, shards 3/10 read, ETA 2m10s'."""
    elapsed = max(snapshot["elapsed_s"], 1e-9)
    tokens_per_s = snapshot["tokens"] / elapsed
    eta = "unknown"
    if snapshot["bytes_read"] and snapshot["total_bytes"]:
        fraction = snapshot["bytes_read"] / snapshot["total_bytes"]
        eta = format_duration(elapsed * (1 - fraction) / fraction)
    return (
        f"{snapshot['documents']:,} docs, {snapshot['tokens']:,} tokens, {tokens_per_s:,.0f} tok/s, "
        f"shards {snapshot['shards_read']}/{snapshot['total_shards']} read, ETA {eta}"
    )


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
