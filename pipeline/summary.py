"""What a run did, worked out from the output's state and the progress counters; and whether it is a
success. The terminal text is the CLI's (terminal.py); the run record keeps the same fields."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.config import DEFAULT_MAX_ERROR_RATE
from pipeline.errors import IncompleteRunError
from pipeline.io.manifest import FileFailure, OutputState

# Rows dead-lettered because a setting asked for it (--duplicate-ids reject), not because they were bad:
# they do not count against --max-error-rate.
POLICY_REASONS = ("duplicate_id",)


def bad_row_rate(error_counts: dict[str, int], rows: int) -> float:
    """The share of rows dead-lettered for being bad input, from dead-letter counts by reason."""
    bad = sum(
        n for reason, n in error_counts.items() if not reason.startswith("file:") and reason not in POLICY_REASONS
    )
    return bad / rows if rows else 0.0


@dataclass(frozen=True)
class JobSummary:
    """What a run did, printed by the CLI and appended to the run record."""

    documents: int
    """Documents embedded by this run."""
    tokens: int
    shards: int
    rows_committed: int
    """Input rows the output accounts for, embedded or dead-lettered, by all runs."""
    rows_embedded: int
    """Of those, the rows embedded (the rest are dead letters)."""
    rows_skipped: int
    """Rows committed before this run started."""
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
    chunk_rows: int | None = None
    """With long_documents=chunk, the output rows (one per window) this run wrote; None otherwise."""
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    generation: int | None = None
    """The output's latest generation after this run."""
    changes: dict[str, int] | None = None
    """Shards added, changed and deleted by the generation this run started; None if it started none."""

    @property
    def dead_letters(self) -> int:
        return sum(n for reason, n in self.error_counts.items() if not reason.startswith("file:"))

    @property
    def error_rate(self) -> float:
        """Rows dead-lettered for bad input (not by --duplicate-ids reject) over the rows committed."""
        return bad_row_rate(self.error_counts, self.rows_committed)

    def problems(self) -> list[str]:
        """Why the run is not a success, one sentence each; empty when it is."""
        problems = []
        if self.rows_committed and not self.rows_embedded:
            problems.append(f"nothing was embedded: all {self.rows_committed:,} input rows were dead-lettered")
        elif self.error_rate > self.max_error_rate:
            problems.append(
                f"{self.error_rate:.2%} of {self.rows_committed:,} rows dead-lettered as bad input, "
                f"more than --max-error-rate {self.max_error_rate:.2%}"
            )
        if self.failed_files:
            problems.append(f"{len(self.failed_files)} input files could not be read to their end")
        return problems


class RunIncompleteError(IncompleteRunError):
    """The job finished, but did not embed everything it should have; the summary says what it did."""

    def __init__(self, message: str, summary: JobSummary) -> None:
        super().__init__(message)
        self.summary = summary


def summarize(
    *,
    output: str,
    shards: int,
    state: OutputState,
    failed: list[FileFailure],
    started: float,
    counters: dict | None,
    rows_before: int = 0,
    progress_offset_s: float = 0.0,
    chunks: bool = False,
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
    generation: int | None = None,
    changes: dict[str, int] | None = None,
) -> JobSummary:
    """The summary of a run that started at monotonic time `started`; counters None: nothing to embed.

    progress_offset_s: seconds from the job's start to the progress actor's, which counts from its own.
    """
    wall_s = time.monotonic() - started
    counters = counters or {}
    tokens = counters.get("tokens", 0)
    documents = counters.get("documents", 0)
    padded_tokens = counters.get("padded_tokens", 0)
    first_batch_s = counters.get("first_batch_s")
    startup_s = None if first_batch_s is None else progress_offset_s + first_batch_s
    steady = None
    if startup_s is not None and wall_s > startup_s and tokens > counters["first_batch_tokens"]:
        steady = (tokens - counters["first_batch_tokens"]) / (wall_s - startup_s)
    return JobSummary(
        documents=documents,
        tokens=tokens,
        shards=shards,
        rows_committed=state.committed_rows,
        rows_embedded=state.embedded_rows,
        rows_skipped=rows_before,
        parts=len(state.commits),
        padding_waste=1 - tokens / padded_tokens if padded_tokens else 0.0,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s,
        documents_per_s=documents / wall_s,
        output=output,
        embed_nodes=counters.get("embed_nodes", []),
        already_complete=not counters,
        error_counts=state.error_counts(failed),
        failed_files=[f.url for f in failed],
        startup_s=startup_s,
        steady_tokens_per_s=steady,
        chunk_rows=counters.get("sequences", 0) if chunks else None,
        max_error_rate=max_error_rate,
        generation=generation,
        changes=changes,
    )


def checked(summary: JobSummary, first_dead_letter: str | None = None) -> JobSummary:
    """The summary of a successful run; RunIncompleteError naming every problem otherwise.

    first_dead_letter: the message of one dead letter of the commonest reason, to say what went wrong.
    """
    problems = summary.problems()
    if not problems:
        return summary
    message = "; ".join(problems)
    if summary.error_counts:
        message += f" ({', '.join(f'{reason} {n:,}' for reason, n in summary.error_counts.items())})"
    if first_dead_letter:
        message += f"; e.g. {first_dead_letter}"
    raise RunIncompleteError(f"{message}; see {summary.output}/errors/, and `verify` for the failed files", summary)
