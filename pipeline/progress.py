"""Progress of a running job: counters the stages report to, and the estimates a person plans by.

Rows are counted when the embed stage has handled them (embedded or dead-lettered), not when read:
Ray Data reads ahead, so shards read says little about how far the job is. The rows still to do are
known once every shard has been read; until then they are estimated from bytes, at the rows per
byte of the shards read so far. The rate is taken over a sliding window, so the ETA follows the
job's current pace rather than its average since start-up.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ProgressCounters:
    """What has been done so far; the job's progress actor holds one of these."""

    total_shards: int = 0
    total_bytes: int = 0
    rows_done_before: int = 0
    """Rows of these shards committed by earlier runs: the read stage skips them."""
    rows_per_byte_guess: float | None = None
    """From a sample of the first shard, until a shard has been read to its end."""
    shards_read: int = 0
    bytes_read: int = 0
    """Sizes of the shards read to their end (or failed part way)."""
    rows_in_shards_read: int = 0
    documents: int = 0
    dead_letters: int = 0
    sequences: int = 0
    """Documents, or with chunking their windows: the output rows of chunk mode."""
    tokens: int = 0
    padded_tokens: int = 0
    started_s: float = field(default_factory=time.monotonic)
    embed_nodes: set[str] = field(default_factory=set)
    first_batch_s: float | None = None
    """Seconds from this actor's start to the first embedded pack: workers started, model loaded."""
    first_batch_tokens: int = 0

    def shard_read(self, size_bytes: int, rows: int, shards: int = 1) -> None:
        """shards more read to their end (or failed part way), of size_bytes and rows together."""
        self.shards_read += shards
        self.bytes_read += size_bytes
        self.rows_in_shards_read += rows

    def batch_embedded(
        self, documents: int, dead_letters: int, sequences: int, tokens: int, padded_tokens: int, node_id: str
    ) -> None:
        if self.first_batch_s is None and documents:
            self.first_batch_s = time.monotonic() - self.started_s
            self.first_batch_tokens = tokens
        self.documents += documents
        self.dead_letters += dead_letters
        self.sequences += sequences
        self.tokens += tokens
        self.padded_tokens += padded_tokens
        self.embed_nodes.add(node_id)

    def snapshot(self) -> dict:
        return {
            "total_shards": self.total_shards,
            "total_bytes": self.total_bytes,
            "rows_done_before": self.rows_done_before,
            "rows_per_byte_guess": self.rows_per_byte_guess,
            "shards_read": self.shards_read,
            "bytes_read": self.bytes_read,
            "rows_in_shards_read": self.rows_in_shards_read,
            "documents": self.documents,
            "dead_letters": self.dead_letters,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "elapsed_s": time.monotonic() - self.started_s,
            "embed_nodes": sorted(self.embed_nodes),
            "first_batch_s": self.first_batch_s,
            "first_batch_tokens": self.first_batch_tokens,
        }


@dataclass(frozen=True)
class Progress:
    """Where a running job stands, in what a person plans by."""

    rows_done: int
    """Input rows handled by this run: embedded or dead-lettered."""
    rows_total: int | None
    """Rows this run has to handle; None while nothing tells how many rows a byte holds."""
    rows_total_known: bool
    """True once every shard has been read, so rows_total is a count, not an estimate."""
    dead_letters: int
    tokens_done: int
    tokens_total: int | None
    tokens_per_s: float
    """Over the sliding window."""
    eta_s: float | None
    elapsed_s: float

    @property
    def fraction(self) -> float | None:
        if self.rows_total is None:
            return None
        return min(1.0, self.rows_done / self.rows_total) if self.rows_total else 1.0


class RateWindow:
    """Tokens and rows per second over the last window_s seconds of snapshots."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, elapsed_s: float, tokens: int) -> float:
        """Record a snapshot; the tokens per second over the window it closes."""
        self._samples.append((elapsed_s, tokens))
        while len(self._samples) > 2 and elapsed_s - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        (t0, k0), (t1, k1) = self._samples[0], self._samples[-1]
        if len(self._samples) == 1 or t1 <= t0:
            return tokens / elapsed_s if elapsed_s > 0 else 0.0
        return (k1 - k0) / (t1 - t0)


def merge_counters(first: dict | None, then: dict) -> dict:
    """Two graph runs' snapshots as one run's (a run that finished an earlier generation, then its own)."""
    if first is None:
        return then
    merged = dict(then)
    for key in ("documents", "dead_letters", "sequences", "tokens", "padded_tokens", "shards_read", "bytes_read"):
        merged[key] = first[key] + then[key]
    merged["embed_nodes"] = sorted(set(first["embed_nodes"]) | set(then["embed_nodes"]))
    merged["first_batch_s"] = first["first_batch_s"] if first["first_batch_s"] is not None else then["first_batch_s"]
    merged["first_batch_tokens"] = (
        first["first_batch_tokens"] if first["first_batch_s"] is not None else then["first_batch_tokens"]
    )
    return merged


def estimate_progress(snapshot: dict, tokens_per_s: float) -> Progress:
    """How far the job is and how long it has to go, from a counters snapshot and the current rate."""
    rows_done = snapshot["documents"] + snapshot["dead_letters"]
    known = snapshot["shards_read"] >= snapshot["total_shards"]
    rows_total = None
    if known:
        rows_total = snapshot["rows_in_shards_read"] - snapshot["rows_done_before"]
    else:
        rows_per_byte = snapshot["rows_per_byte_guess"]
        if snapshot["bytes_read"] > 0:
            rows_per_byte = snapshot["rows_in_shards_read"] / snapshot["bytes_read"]
        if rows_per_byte is not None:
            rows_total = round(snapshot["total_bytes"] * rows_per_byte) - snapshot["rows_done_before"]
    if rows_total is not None:
        rows_total = max(rows_total, rows_done)
    tokens_total = None
    if rows_total is not None and rows_done:
        tokens_total = round(snapshot["tokens"] * rows_total / rows_done)
    eta_s = None
    if tokens_total is not None and tokens_per_s > 0:
        eta_s = max(0.0, (tokens_total - snapshot["tokens"]) / tokens_per_s)
    return Progress(
        rows_done=rows_done,
        rows_total=rows_total,
        rows_total_known=known,
        dead_letters=snapshot["dead_letters"],
        tokens_done=snapshot["tokens"],
        tokens_total=tokens_total,
        tokens_per_s=tokens_per_s,
        eta_s=eta_s,
        elapsed_s=snapshot["elapsed_s"],
    )


def progress_line(progress: Progress) -> str:
    """e.g. '12,000 of ~48,000 rows (25%), 3,400,000 of ~13,600,000 tokens, 25,000 tok/s, ETA 6m10s'."""
    approx = "" if progress.rows_total_known else "~"
    if progress.rows_total is None:
        rows = f"{progress.rows_done:,} rows (of a total not known until a shard is read to its end)"
        tokens = f"{progress.tokens_done:,} tokens"
    else:
        rows = f"{progress.rows_done:,} of {approx}{progress.rows_total:,} rows ({progress.fraction:.0%})"
        finished = progress.rows_total_known and progress.rows_done == progress.rows_total
        tokens = f"{progress.tokens_done:,} tokens"
        if progress.tokens_total is not None and not finished:
            tokens = f"{progress.tokens_done:,} of ~{progress.tokens_total:,} tokens"
    dead = f", {progress.dead_letters:,} dead-lettered" if progress.dead_letters else ""
    eta = format_duration(progress.eta_s) if progress.eta_s is not None else "unknown"
    return f"{rows}{dead}, {tokens}, {progress.tokens_per_s:,.0f} tok/s, ETA {eta}"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
