"""What the CLI prints: the final summary, progress while a job runs, and the status of an output."""

from __future__ import annotations

import sys

from pipeline.progress import Progress, format_duration, progress_line
from pipeline.summary import JobSummary


def summary_lines(summary: JobSummary) -> list[str]:
    """The summary of a run, a few aligned lines."""
    committed = (
        f"committed      {summary.rows_committed:,} input rows in {summary.parts} parts in all: "
        f"{summary.rows_embedded:,} embedded, {summary.rows_committed - summary.rows_embedded:,} dead-lettered"
    )
    generation = []
    if summary.changes is not None:
        described = ", ".join(f"{n:,} {kind}" for kind, n in summary.changes.items())
        generation = [f"generation     {summary.generation}: shards {described}"]
    if summary.already_complete:
        return [
            f"already complete: {summary.rows_committed:,} rows in {summary.parts} parts; nothing to embed",
            *generation,
            committed,
            *_error_lines(summary),
            f"output         {summary.output}",
        ]
    lines = [
        f"documents      {summary.documents:,} embedded now, {summary.rows_skipped:,} rows already committed before",
        *generation,
        committed,
    ]
    if summary.chunk_rows is not None:
        lines.append(
            f"chunk rows     {summary.chunk_rows:,} output rows for {summary.documents:,} documents: one per window, "
            "the same id on each; (id, chunk) is the unique key"
        )
    lines += [
        f"tokens         {summary.tokens:,}",
        f"padding waste  {summary.padding_waste:.1%}",
        f"wall time      {format_duration(summary.wall_s)}",
        f"throughput     {summary.tokens_per_s:,.0f} tokens/s, {summary.documents_per_s:,.1f} documents/s",
    ]
    if summary.steady_tokens_per_s:
        lines.append(
            f"after start-up {summary.steady_tokens_per_s:,.0f} tokens/s (first pack after {summary.startup_s:.1f}s)"
        )
    return [*lines, *_error_lines(summary), f"output         {summary.output}"]


def _error_lines(summary: JobSummary) -> list[str]:
    if not summary.error_counts:
        return ["dead letters   none"]
    by_reason = ", ".join(f"{reason} {n:,}" for reason, n in summary.error_counts.items())
    share = summary.dead_letters / summary.rows_committed if summary.rows_committed else 0.0
    lines = [f"dead letters   {summary.dead_letters:,} rows ({share:.2%}) in errors/: {by_reason}"]
    if summary.failed_files:
        lines.append(
            f"failed files   {len(summary.failed_files)} could not be read to their end (first: "
            f"{summary.failed_files[0]}); `verify` lists them all, a re-run retries them"
        )
    return lines


def print_summary(summary: JobSummary, title: str = "embedding finished") -> None:
    print(f"\n{title}")
    for line in summary_lines(summary):
        print(f"  {line}")


class ProgressDisplay:
    """A progress bar on an interactive terminal, else one plain line per update on stdout."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None

    def __call__(self, progress: Progress) -> None:
        if not self.interactive:
            print(f"progress: {progress_line(progress)}", flush=True)
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(unit="rows", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows{postfix}")
        self._bar.total = progress.rows_total
        self._bar.n = progress.rows_done
        eta = format_duration(progress.eta_s) if progress.eta_s is not None else "?"
        self._bar.set_postfix_str(f"{progress.tokens_per_s:,.0f} tok/s, ETA {eta}", refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


MAX_GENERATIONS_SHOWN = 5


def status_lines(status: dict) -> list[str]:
    """status.output_status as a few lines."""
    if not status["started"]:
        return [f"{status['output']}: no run record; no job has started writing here"]
    rows = f"{status['rows_committed']:,} committed"
    if status["rows_in_shards_read"]:
        rows += f" of {status['rows_in_shards_read']:,} in shards read so far"
    errors = ", ".join(f"{reason} {n:,}" for reason, n in status["dead_letters_by_reason"].items()) or "none"
    lines = [
        f"output      {status['output']}",
        f"model       {status['model_source']} ({status['model_weights_sha256'][:12]})",
        f"rows        {rows}: {status['rows_embedded']:,} embedded, {status['rows_dead_lettered']:,} dead-lettered",
        f"shards      {status['shards_complete']} of {status['shards']} complete, {status['shards_read']} read to "
        f"the end, {status['shards_failed_part_way']} failed part way",
        f"parts       {status['parts_committed']} committed, {status['uncommitted_leftovers']} uncommitted leftovers",
        f"errors      {errors}",
    ]
    for g in status["generations"][-MAX_GENERATIONS_SHOWN:]:
        kind = "refresh" if g["refresh"] else "run"
        when = g["created"] or "date not recorded"
        lines.append(
            f"generation  {g['generation']} ({kind}, {when}): shards {g['added']:,} added, "
            f"{g['changed']:,} changed, {g['deleted']:,} deleted; {g['rows_committed']:,} rows committed"
        )
    if len(status["generations"]) > MAX_GENERATIONS_SHOWN:
        lines.append(f"            ({len(status['generations']) - MAX_GENERATIONS_SHOWN} earlier generations: --json)")
    writer = status["writer"]
    if writer and writer["running"]:
        lines.append(
            f"writing     run {writer['run_id']} (pid {writer['pid']} on {writer['host']}, since "
            f"{writer['started_at']}), last heartbeat {writer['heartbeat_age_s']:.0f}s ago"
        )
    if status["unfinished_run"]:
        lines.append("last run    stopped before it finished: re-run the same command to finish it")
    elif status["last_run"]:
        last = status["last_run"]
        done = "found it complete" if last["already_complete"] else f"{last['documents']:,} documents embedded"
        lines.append(f"last run    {done} in {last['wall_s']:.0f}s, finished")
    return lines
