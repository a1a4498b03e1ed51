"""`verify`: prove an output's guarantees against its inputs; `repair`: make them hold again after damage."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DEFAULT_MAX_ERROR_RATE, StorageConfig
from pipeline.errors import NoInputError, as_pipeline_error
from pipeline.io.current import current_parts
from pipeline.io.generations import changes_since, recorded_inputs
from pipeline.io.layout import ERRORS, PARTS, QUARANTINE, RUN_RECORD, urls_of
from pipeline.io.lease import acquire_lease, lease_supported
from pipeline.io.ledger import INPUT_COLUMNS, among, committed, current_versions, ledger, recorded_versions
from pipeline.io.manifest import OutputState, read_state
from pipeline.io.ranges import count_rows, merge_ranges, missing, overlaps
from pipeline.io.recovery import RepairReport, repair
from pipeline.io.run_record import read_run_record
from pipeline.io.schemas import ERROR_ROWS_SCHEMA, ERRORS_SCHEMA, output_schema
from pipeline.io.shards import LISTING_SCHEMA, ShardListing, discover_shards
from pipeline.io.storage import filesystem_for
from pipeline.part_checks import check_parts, check_parts_here, repeated_ids, repeated_ids_here, schema_shape
from pipeline.ray_session import ray_for_checks
from pipeline.summary import bad_row_rate

MAX_LISTED = 5
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
    state = read_state(fs, root)
    inputs = recorded_inputs(fs, root, record, INPUT_COLUMNS)
    state.current = current_versions(inputs)
    _check_files(state, report)
    _check_part_contents(output_url, storage, state, record["settings"], sample, local_rows, report)
    total_rows, superseded_rows, superseded, failed = _check_versions(state, inputs, report)
    if check_inputs:
        roots = sorted({g["input"] for g in record["generations"]})
        _check_fingerprints(roots, state.current, storage, record["settings"].get("fingerprint", "store"), report)

    dead = sum(c.error_rows for c in state.commits)
    _check_dead_letter_rate(record, state, report)
    report.facts.append(
        f"{state.committed_rows:,} rows in {len(state.commits)} committed parts: "
        f"{state.committed_rows - dead:,} embedded, {dead:,} dead-lettered in {ERRORS}/; "
        f"{state.current.num_rows} current input shards with {total_rows:,} rows; "
        f"{len(record['generations'])} generations"
    )
    if superseded:
        report.facts.append(
            f"{superseded_rows:,} rows of {superseded} shard versions changed or deleted since are superseded "
            "(not current; vacuum removes parts that hold nothing else)"
        )
    if failed:
        report.facts.append(f"{len(failed)} files failed part way: {_first(failed)}")


def _check_versions(state: OutputState, inputs: pa.Table, report: VerifyReport) -> tuple[int, int, int, list[str]]:
    """Every version of every shard: its rows committed at most once in its generation; the current
    version's every row committed exactly once (embedded or dead-lettered). Checked as columns (ledger.py);
    only the versions with something to say come back to Python. (total current rows, superseded rows,
    superseded versions, files that failed part way)."""
    ranges = state.ranges()
    per_version = committed(ranges)
    recorded = recorded_versions(inputs)
    now, known = among(per_version, state.current), among(per_version, recorded)
    merged = per_version.column("merged").to_numpy()
    superseded = recorded.num_rows - state.current.num_rows
    superseded_rows = int(merged[known & ~now].sum())

    doubled = per_version.filter(per_version.column("overlapping"))
    for url, generation, found in _version_ranges(ranges, doubled):
        report.problems.append(
            f"{url}: rows {_ranges(overlaps(found))} committed more than once in generation {generation}"
        )

    shards = ledger(state.current, state.done, per_version)
    total_rows = pc.sum(shards.filter(shards.column("complete")).column("rows")).as_py() or 0
    failed: list[str] = []
    todo = shards.filter(pc.invert(shards.column("complete")))
    version_of = dict(
        zip(
            urls_of(todo.column("url")),
            zip(todo.column("rows").to_pylist(), todo.column("fingerprint").to_pylist(), strict=True),
            strict=True,
        )
    )
    for url, _, found in _version_ranges(ranges, todo):
        committed_rows, (done, fingerprint) = merge_ranges(found), version_of[url]
        failure = state.file_failures.get((url, fingerprint))
        if done is None and failure is not None:
            # Accounted for as a file: its rows before the failure must each be committed once.
            gaps = missing(committed_rows, failure.rows_read)
            if gaps:
                report.problems.append(f"{url}: {count_rows(gaps)} rows read before it failed are missing")
            failed.append(f"{url} ({failure.reason} after {failure.rows_read:,} rows)")
            total_rows += failure.rows_read
        elif done is None:
            report.problems.append(f"{url}: not read to its end yet (job unfinished; re-run it)")
        else:
            total_rows += done
            gaps = missing(committed_rows, done)
            if gaps:
                report.problems.append(f"{url}: {count_rows(gaps)} of {done} rows missing, rows {_ranges(gaps)}")
    strays = per_version.filter(pa.array(~known))
    unknown = sorted(
        f"{url} (generation {g})"
        for url, g in zip(urls_of(strays.column("url")), strays.column("generation").to_pylist(), strict=True)
    )
    if unknown:
        report.problems.append(f"{len(unknown)} committed shards are not among the recorded inputs: {_first(unknown)}")
    return total_rows, superseded_rows, superseded, failed


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


def _check_part_contents(
    output_url, storage, state: OutputState, settings: dict, sample: int | None, local_rows, report
) -> None:
    """Each published part holds exactly its record's rows in the recorded schema; no id in two current
    rows. On the cluster (part_checks.py); here for an output of at most local_rows rows, or for a
    random sample of parts."""
    chunks = settings.get("long_documents") == "chunk"
    expected = {
        # Parts written before manifest version 2 have no generation column: both are right.
        PARTS: [
            schema_shape(output_schema(settings["hidden_size"], settings["output_dtype"], chunks=chunks, generation=g))
            for g in (True, False)
        ],
        ERRORS: [schema_shape(ERRORS_SCHEMA), schema_shape(ERROR_ROWS_SCHEMA)],
    }
    published = [c for c in state.commits if not state.unpublished(c)]
    parts_of_view = current_parts(published, state.current)
    policy = settings.get("duplicate_ids", "keep")
    # Without an id field, ids are shard#row: unique exactly when every row is committed once.
    check_ids = bool(settings.get("id_field"))
    if sample is not None:
        chosen = random.sample(published, min(sample, len(published)))
        found = check_parts_here(output_url, storage, chosen, expected, chunks=chunks)
        report.facts.append(
            f"sampled {len(chosen)} of {len(published)} parts; ids were not checked for repeats (a full verify does)"
        )
    elif state.committed_rows <= local_rows:  # small: here, in less time than Ray takes to start
        found = check_parts_here(output_url, storage, published, expected, chunks=chunks)
        if check_ids:
            repeated = repeated_ids_here(output_url, storage, parts_of_view, chunks=chunks, examples=MAX_LISTED)
            _report_repeats(*repeated, policy, report)
    else:
        with ray_for_checks():
            found = check_parts(output_url, storage, published, expected, chunks=chunks)
            if check_ids:
                repeated = repeated_ids(output_url, storage, parts_of_view, chunks=chunks, examples=MAX_LISTED)
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


def _check_dead_letter_rate(record: dict, state, report: VerifyReport) -> None:
    """Dead letters are accounted for, but an output of little else is no success."""
    rows = state.committed_rows
    ceiling = record["runs"][-1].get("max_error_rate", DEFAULT_MAX_ERROR_RATE) if record.get("runs") else None
    ceiling = DEFAULT_MAX_ERROR_RATE if ceiling is None else ceiling
    rate = bad_row_rate(state.error_counts(), rows)
    if rows and not state.embedded_rows:
        report.problems.append(f"nothing is embedded: all {rows:,} input rows were dead-lettered; see {ERRORS}/")
    elif rate > ceiling:
        report.problems.append(
            f"{rate:.2%} of the rows were dead-lettered as bad input, above the {ceiling:.2%} the last run "
            f"allowed; see {ERRORS}/"
        )
    else:
        report.facts.append(f"bad-input dead-letter rate {rate:.2%}, within the {ceiling:.2%} allowed")


def _check_fingerprints(
    roots: list[str], recorded: pa.Table, storage: StorageConfig, mode: str, report: VerifyReport
) -> None:
    """Each recorded shard's fingerprint now (recorded: the current versions), from one listing of each
    input root (not a request per shard)."""
    listings = []
    for root in roots:
        fs, path = filesystem_for(root, storage)
        try:
            listings.append(discover_shards(fs, path, fingerprint_mode=mode).table)
        except NoInputError:
            pass  # every shard under it is gone: reported below
    listed = ShardListing(pa.concat_tables(listings) if listings else LISTING_SCHEMA.empty_table())
    changes = changes_since(recorded, listed)
    gone, changed = changes.deleted, changes.changed.urls()
    if gone:
        report.facts.append(
            f"{len(gone)} input shards no longer exist (their embeddings stay current until a --refresh records "
            f"them as deleted): {_first(gone)}"
        )
    if changed:
        report.problems.append(
            f"{len(changed)} input shards changed since they were embedded: {_first(changed)}; a --refresh run "
            "embeds them again"
        )
    else:
        report.facts.append(f"input fingerprints unchanged ({mode})")


def _first(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _ranges(ranges: list) -> str:
    return _first([f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in ranges])
