"""`verify`: prove an output's guarantees against its inputs; `repair`: make them hold again after damage."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DEFAULT_MAX_ERROR_RATE, StorageConfig
from pipeline.errors import NoInputError, as_pipeline_error
from pipeline.io.generations import FailedReads, LedgerStep, changes_since, ledger_steps
from pipeline.io.layout import ERRORS, PARTS, QUARANTINE, RUN_RECORD, urls_of
from pipeline.io.lease import acquire_lease, lease_supported
from pipeline.io.ledger import among
from pipeline.io.manifest import FileFailure, OutputState, read_state
from pipeline.io.ranges import count_rows, merge_ranges, missing, overlaps
from pipeline.io.recovery import RepairReport, repair
from pipeline.io.run_record import read_run_record
from pipeline.io.schemas import ERROR_ROWS_SCHEMA, ERRORS_SCHEMA, output_schema
from pipeline.io.shards import LISTING_SCHEMA, ShardListing, discover_shards
from pipeline.io.storage import filesystem_for
from pipeline.part_checks import (
    PartClaims,
    check_parts,
    check_parts_here,
    repeated_ids,
    repeated_ids_here,
    schema_shape,
)
from pipeline.ray_session import ray_for_checks
from pipeline.summary import bad_row_rate

MAX_LISTED = 5
MAX_PROBLEM_LINES = 100
"""Lines of one kind of problem with a shard, before the rest are counted on one line."""
LISTING_FINGERPRINTS = pa.schema([LISTING_SCHEMA.field("url"), LISTING_SCHEMA.field("fingerprint")])
# Outputs up to this many rows are checked in this process: their ids fit in a few MB, and starting
# a local Ray would take longer than the whole check.
LOCAL_CHECK_ROWS = 100_000


@dataclass
class VerifyReport:
    """Problems break a guarantee; facts describe what was checked."""

    problems: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(
    output_url: str,
    storage: StorageConfig | None = None,
    *,
    check_inputs: bool = True,
    sample: int | None = None,
    local_rows: int = LOCAL_CHECK_ROWS,
) -> VerifyReport:
    """Every input row exactly once in committed parts; no orphans; the schema the run record names.

    The parts of an output of more than local_rows rows are read on the Ray cluster (the caller's
    Ray, RAY_ADDRESS, or a local one); a smaller output's, or with sample that many random parts,
    here. Never raises for what it finds: an unreadable part or an unreachable store is a problem in
    the report.
    """
    storage = storage or StorageConfig()
    report = VerifyReport()
    try:
        _verify(output_url, storage, check_inputs, sample, local_rows, report)
    except Exception as err:
        found = as_pipeline_error(err)
        if found is None:
            raise
        report.problems.append(f"cannot read {output_url}: {found}")
    return report


def repair_output(output_url: str, storage: StorageConfig | None = None, *, wait_s: float = 0.0) -> RepairReport:
    """Quarantine what no commit record may stand for and withdraw records whose part is gone or wrong,
    holding the writer lease so no run writes meanwhile; a re-run then embeds the withdrawn rows."""
    fs, root = filesystem_for(output_url, storage or StorageConfig())
    record = read_run_record(fs, root)
    if record is None:
        raise NoInputError(f"{output_url} has no {RUN_RECORD}: not an output of neobert-pipeline")
    chunks = record["settings"].get("long_documents") == "chunk"
    if not lease_supported(fs):
        return repair(fs, root, chunks=chunks)
    with acquire_lease(fs, root, wait_s=wait_s) as lease:
        return repair(fs, root, chunks=chunks, lease_token=lease.token)


def _verify(output_url: str, storage: StorageConfig, check_inputs: bool, sample: int | None, local_rows, report):
    fs, root = filesystem_for(output_url, storage)
    record = read_run_record(fs, root)
    if record is None:
        report.problems.append(f"{output_url} has no {RUN_RECORD}: not an output of neobert-pipeline")
        return
    settings = record["settings"]
    # The checkpoint's per-shard facts stay in its file: they are read a batch of URLs at a time below.
    state = read_state(fs, root, shard_facts=False)
    _check_files(state, report)
    published = [c for c in state.commits if not state.unpublished(c)]
    checked = published if sample is None else random.sample(published, min(sample, len(published)))
    on_cluster = sample is None and state.committed_rows > local_rows  # else here: faster than starting Ray
    roots = sorted({g["input"] for g in record["generations"]}) if check_inputs else []
    mode = settings.get("fingerprint", "store")
    listings = tuple(_listing(input_root, storage, mode) for input_root in roots)
    with ray_for_checks() if on_cluster else contextlib.nullcontext():
        claims = PartClaims(checked, distributed=on_cluster)
        versions, inputs = _VersionChecks(state), _InputChecks()
        for step in ledger_steps(fs, root, record, state, listings):
            claims.add(step.ranges, among(step.ranges, step.shards))
            versions.add(step)
            if check_inputs:
                inputs.add(step.shards, pa.concat_tables([LISTING_FINGERPRINTS.empty_table(), *step.more]))
        _check_part_contents(output_url, storage, claims, settings, on_cluster, sample is None, report)
    if sample is not None:
        report.facts.append(
            f"sampled {len(checked)} of {len(published)} parts; ids were not checked for repeats (a full verify does)"
        )
    versions.report_to(report)
    if check_inputs:
        inputs.report_to(report, mode)

    dead = sum(c.error_rows for c in state.commits)
    failed = versions.failed_reads.of_current_versions()
    _check_dead_letter_rate(record, state, failed, report)
    report.facts.append(
        f"{state.committed_rows:,} rows in {len(state.commits)} committed parts: "
        f"{state.committed_rows - dead:,} embedded, {dead:,} dead-lettered in {ERRORS}/; "
        f"{versions.current:,} current input shards with {versions.total_rows:,} rows; "
        f"{len(record['generations'])} generations"
    )
    if versions.superseded:
        report.facts.append(
            f"{versions.superseded_rows:,} rows of {versions.superseded} shard versions changed or deleted since "
            "are superseded (not current; vacuum removes parts that hold nothing else)"
        )
    if failed:
        shown = [f"{f.url} ({f.reason} after {f.rows_read:,} rows)" for f in failed[:MAX_LISTED]]
        report.facts.append(f"{len(failed)} files failed part way: {_first(shown, len(failed))}")


class _Listed:
    """How many of something, and the first few (in the URL order the steps come in), for a report
    line: the driver keeps MAX_LISTED of a million."""

    def __init__(self) -> None:
        self.count, self.first = 0, []

    def extend(self, items: list) -> None:
        self.count += len(items)
        self.first.extend(items[: max(0, MAX_LISTED - len(self.first))])

    def __str__(self) -> str:
        return _first(self.first, self.count)


class _Problems:
    """Problems of one kind, one line per shard, up to MAX_PROBLEM_LINES of them; the rest counted on
    one more line (a crashed run of a million shards is not a million lines)."""

    def __init__(self, more: str) -> None:
        self.lines: list[str] = []
        self.more, self.count = more, 0

    def append(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_PROBLEM_LINES:
            self.lines.append(line)

    def report_to(self, report: VerifyReport) -> None:
        report.problems.extend(self.lines)
        if self.count > len(self.lines):
            report.problems.append(f"and {self.count - len(self.lines):,} more {self.more}")


class _VersionChecks:
    """Every version of every shard: its rows committed at most once in its generation; the current
    version's every row committed exactly once (embedded or dead-lettered). Checked as columns
    (ledger.py), a batch of URLs at a time; only the versions with something to say come back to
    Python."""

    def __init__(self, state: OutputState) -> None:
        self.file_failures = state.file_failures
        self.failed_reads = FailedReads(state)
        self.current = self.total_rows = self.superseded = self.superseded_rows = 0
        self.doubled = _Problems("shards with rows committed more than once")
        self.incomplete = _Problems("shards with rows missing or not read to their end")
        self.strays = _Listed()

    def add(self, step: LedgerStep) -> None:
        per_version, shards = step.committed, step.shards
        self.failed_reads.add(shards)
        now, known = among(per_version, shards), among(per_version, step.recorded)
        merged = per_version.column("merged").to_numpy()
        self.current += shards.num_rows
        self.superseded += step.recorded.num_rows - shards.num_rows
        self.superseded_rows += int(merged[known & ~now].sum())

        doubled = per_version.filter(per_version.column("overlapping"))
        for url, generation, found in _version_ranges(step.ranges, doubled):
            self.doubled.append(
                f"{url}: rows {_ranges(overlaps(found))} committed more than once in generation {generation}"
            )
        self.total_rows += pc.sum(shards.filter(shards.column("complete")).column("rows")).as_py() or 0
        todo = shards.filter(pc.invert(shards.column("complete")))
        version_of = dict(
            zip(
                urls_of(todo.column("url")),
                zip(todo.column("rows").to_pylist(), todo.column("fingerprint").to_pylist(), strict=True),
                strict=True,
            )
        )
        for url, _, found in _version_ranges(step.ranges, todo):
            committed_rows, (done, fingerprint) = merge_ranges(found), version_of[url]
            failure = self.file_failures.get((url, fingerprint))
            if done is None and failure is not None:
                # Accounted for as a file: its rows before the failure must each be committed once.
                gaps = missing(committed_rows, failure.rows_read)
                if gaps:
                    self.incomplete.append(f"{url}: {count_rows(gaps)} rows read before it failed are missing")
                self.total_rows += failure.rows_read
            elif done is None:
                self.incomplete.append(f"{url}: not read to its end yet (job unfinished; re-run it)")
            else:
                self.total_rows += done
                gaps = missing(committed_rows, done)
                if gaps:
                    self.incomplete.append(f"{url}: {count_rows(gaps)} of {done} rows missing, rows {_ranges(gaps)}")
        strays = per_version.filter(pa.array(~known))
        self.strays.extend(
            sorted(
                f"{url} (generation {g})"
                for url, g in zip(urls_of(strays.column("url")), strays.column("generation").to_pylist(), strict=True)
            )
        )

    def report_to(self, report: VerifyReport) -> None:
        self.doubled.report_to(report)
        self.incomplete.report_to(report)
        if self.strays.count:
            report.problems.append(
                f"{self.strays.count} committed shards are not among the recorded inputs: {self.strays}"
            )


def _version_ranges(ranges: pa.Table, versions: pa.Table) -> list[tuple[str, int, list]]:
    """(URL, generation, its committed ranges) of each of these versions, sorted; few of them: the
    ones with something to report."""
    wanted = ranges.filter(pa.array(among(ranges, versions)))
    columns = (urls_of(wanted.column("url")), *(wanted.column(c).to_pylist() for c in ("generation", "start", "end")))
    by_version: dict[tuple[str, int], list] = {}
    for url, generation, start, end in zip(*columns, strict=True):
        by_version.setdefault((url, generation), []).append((start, end))
    keys = zip(urls_of(versions.column("url")), versions.column("generation").to_pylist(), strict=True)
    return [(url, g, by_version.get((url, g), [])) for url, g in sorted(keys)]


class _InputChecks:
    """Each current version's fingerprint against the input's listing now, a batch of URLs at a time
    (not a request per shard)."""

    def __init__(self) -> None:
        self.gone, self.changed = _Listed(), _Listed()

    def add(self, current: pa.Table, listed: pa.Table) -> None:
        changes = changes_since(current, ShardListing(listed))
        self.gone.extend(changes.deleted)
        self.changed.extend(changes.changed.urls())

    def report_to(self, report: VerifyReport, mode: str) -> None:
        if self.gone.count:
            report.facts.append(
                f"{self.gone.count} input shards no longer exist (their embeddings stay current until a --refresh "
                f"records them as deleted): {self.gone}"
            )
        if self.changed.count:
            report.problems.append(
                f"{self.changed.count} input shards changed since they were embedded: {self.changed}; a --refresh "
                "run embeds them again"
            )
        else:
            report.facts.append(f"input fingerprints unchanged ({mode})")


def _listing(root: str, storage: StorageConfig, mode: str) -> pa.Table:
    """The url and fingerprint of every shard under an input root now, sorted by URL; none where every
    shard under it is gone (reported as deleted)."""
    fs, path = filesystem_for(root, storage)
    try:
        return discover_shards(fs, path, fingerprint_mode=mode).table.select(LISTING_FINGERPRINTS.names)
    except NoInputError:
        return LISTING_FINGERPRINTS.empty_table()


def _check_part_contents(
    output_url, storage, claims: PartClaims, settings: dict, on_cluster: bool, every_part: bool, report
) -> None:
    """Each part checked holds exactly its record's rows in the recorded schema; no id in two current
    rows (unless only a sample of parts is checked). On the cluster (part_checks.py), or here."""
    chunks = settings.get("long_documents") == "chunk"
    expected = {
        # Parts written before manifest version 2 have no generation column: both are right.
        PARTS: [
            schema_shape(output_schema(settings["hidden_size"], settings["output_dtype"], chunks=chunks, generation=g))
            for g in (True, False)
        ],
        ERRORS: [schema_shape(ERRORS_SCHEMA), schema_shape(ERROR_ROWS_SCHEMA)],
    }
    # Without an id field, ids are shard#row: unique exactly when every row is committed once.
    check_ids = bool(settings.get("id_field")) and every_part
    policy = settings.get("duplicate_ids", "keep")
    if on_cluster:
        parts = claims.on_cluster()
        found = check_parts(parts, output_url, storage, expected, chunks=chunks)
        if check_ids:
            _report_repeats(
                *repeated_ids(parts, output_url, storage, chunks=chunks, examples=MAX_LISTED), policy, report
            )
    else:
        parts = claims.here()
        found = check_parts_here(parts, output_url, storage, expected, chunks=chunks)
        if check_ids:
            repeated = repeated_ids_here(parts, output_url, storage, chunks=chunks, examples=MAX_LISTED)
            _report_repeats(*repeated, policy, report)
    report.problems.extend(problem for _, problem in sorted(found))


def _report_repeats(repeated: int, shown: list[str], policy: str, report) -> None:
    if not repeated:
        return
    if policy == "reject":
        report.problems.append(f"{repeated} ids appear in more than one current row: {_first(shown)}")
    else:  # the input repeats them and the run was told to keep them
        report.facts.append(
            f"{repeated} ids repeat in the input and were kept (duplicate_ids={policy}): {_first(shown)}"
        )


def _check_files(state: OutputState, report: VerifyReport) -> None:
    """Every file where the protocol puts it: published if committed, nothing published without a record."""
    unpublished = [c for c in state.commits if state.unpublished(c)]
    waiting = [c.part for c in unpublished if all(s in state.staged for s, _ in state.unpublished(c))]
    if waiting:
        report.problems.append(f"{len(waiting)} committed parts not yet published (an interrupted run; re-run)")
    lost = [c.part for c in unpublished if c.part not in waiting]
    if lost:
        report.problems.append(
            f"{len(lost)} committed parts are missing: {_first(lost)}; repair withdraws their records and a "
            "re-run embeds their rows again"
        )
    if state.fenced:
        report.problems.append(
            f"{len(state.fenced)} parts were committed by a run after it had lost the writer lease: "
            f"{_first([c.part for c in state.fenced])}; they do not count: repair (or the next run) quarantines them"
        )
    orphans = state.orphans()
    if orphans:
        report.problems.append(
            f"{len(orphans)} files without a commit record: {_first(orphans)}; repair moves them to {QUARANTINE}/"
        )
    uncommitted = state.uncommitted() + state.leftovers
    if uncommitted:
        report.problems.append(
            f"{len(uncommitted)} uncommitted leftovers from an interrupted run (a re-run removes them)"
        )


def _check_dead_letter_rate(record: dict, state, failed: list[FileFailure], report: VerifyReport) -> None:
    """Dead letters are accounted for, but an output of little else is no success."""
    rows = state.committed_rows
    ceiling = record["runs"][-1].get("max_error_rate", DEFAULT_MAX_ERROR_RATE) if record.get("runs") else None
    ceiling = DEFAULT_MAX_ERROR_RATE if ceiling is None else ceiling
    rate = bad_row_rate(state.error_counts(failed), rows)
    if rows and not state.embedded_rows:
        report.problems.append(f"nothing is embedded: all {rows:,} input rows were dead-lettered; see {ERRORS}/")
    elif rate > ceiling:
        report.problems.append(
            f"{rate:.2%} of the rows were dead-lettered as bad input, above the {ceiling:.2%} the last run "
            f"allowed; see {ERRORS}/"
        )
    else:
        report.facts.append(f"bad-input dead-letter rate {rate:.2%}, within the {ceiling:.2%} allowed")


def _first(items: list, count: int | None = None) -> str:
    """The first MAX_LISTED of items (of count in all, by default len(items))."""
    count = len(items) if count is None else count
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {count - MAX_LISTED} more" if count > MAX_LISTED else "")


def _ranges(ranges: list) -> str:
    return _first([f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in ranges])
