"""`verify`: prove an output's guarantees against its inputs; `repair`: make them hold again after damage."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DEFAULT_MAX_ERROR_RATE, StorageConfig
from pipeline.errors import NoInputError, as_pipeline_error
from pipeline.io.layout import ERRORS, FAILED, PARTS, QUARANTINE, RUN_RECORD, join
from pipeline.io.lease import acquire_lease, lease_supported
from pipeline.io.manifest import OutputState, read_state
from pipeline.io.ranges import count_rows, merge_ranges, missing, overlaps
from pipeline.io.recovery import RepairReport, UnreadablePartError, load_part, part_mismatch, repair
from pipeline.io.run_record import read_run_record
from pipeline.io.schemas import ERRORS_SCHEMA, output_schema
from pipeline.io.shards import fingerprint
from pipeline.io.storage import filesystem_for
from pipeline.summary import bad_row_rate

MAX_LISTED = 5


@dataclass
class VerifyReport:
    """Problems break a guarantee; facts describe what was checked."""

    problems: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(output_url: str, storage: StorageConfig | None = None, *, check_inputs: bool = True) -> VerifyReport:
    """Every input row exactly once in committed parts; no orphans; the schema the run record names.

    Never raises for what it finds: an unreadable part or an unreachable store is a problem in the report.
    """
    storage = storage or StorageConfig()
    report = VerifyReport()
    try:
        _verify(output_url, storage, check_inputs, report)
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
    with acquire_lease(fs, root, wait_s=wait_s):
        return repair(fs, root, chunks=chunks)


def _verify(output_url: str, storage: StorageConfig, check_inputs: bool, report: VerifyReport) -> None:
    fs, root = filesystem_for(output_url, storage)
    if not fs.exists(join(root, RUN_RECORD)):
        report.problems.append(f"{output_url} has no {RUN_RECORD}: not an output of neobert-pipeline")
        return
    record = json.loads(fs.cat_file(join(root, RUN_RECORD)))
    state = read_state(fs, root)
    _check_files(state, report)

    # Each committed part holds exactly the rows its record names, embedded or dead-lettered, in the
    # recorded schemas.
    ids_by_generation: dict[int, Counter] = {}
    settings = record["settings"]
    chunks = settings.get("long_documents") == "chunk"
    expected = {
        PARTS: _schema_shape(output_schema(settings["hidden_size"], settings["output_dtype"], chunks=chunks)),
        ERRORS: _schema_shape(ERRORS_SCHEMA),
    }
    for commit in state.commits:
        if state.unpublished(commit):
            continue
        try:
            tables, schemas = load_part(fs, root, commit, ["id", "shard", "row", "chunk"])
        except UnreadablePartError as err:
            report.problems.append(f"{err}; repair quarantines it and a re-run embeds its rows again")
            continue
        for folder, shape in ((folder, _schema_shape(schema)) for folder, schema in schemas.items()):
            if shape != expected[folder]:
                report.problems.append(
                    f"{folder}/{commit.part}.parquet has columns {shape}, expected {expected[folder]}"
                )
        mismatch = part_mismatch(commit, tables, chunks=chunks)
        if mismatch:
            report.problems.append(f"{mismatch}; repair quarantines it and a re-run embeds its rows again")
        embedded = tables.get(PARTS)
        if chunks and embedded is not None:
            embedded = embedded.filter(pc.equal(embedded.column("chunk"), 0))  # one row per document
        if embedded is not None:
            ids_by_generation.setdefault(commit.generation, Counter()).update(embedded.column("id").to_pylist())
    for generation, ids in sorted(ids_by_generation.items()):
        repeated = [i for i, n in ids.items() if n > 1]
        if repeated and settings.get("duplicate_ids") == "reject":
            report.problems.append(
                f"generation {generation}: {len(repeated)} ids appear more than once: {_first(repeated)}"
            )
        elif repeated:  # the input repeats them and the run was told to keep them
            report.facts.append(
                f"generation {generation}: {len(repeated)} ids repeat in the input and were kept "
                f"(duplicate_ids={settings.get('duplicate_ids', 'keep')}): {_first(repeated)}"
            )

    # Inputs: every row of every shard committed exactly once.
    by_shard: dict[str, list] = {}
    for commit in state.commits:
        for url, ranges in commit.ranges.items():
            by_shard.setdefault(url, []).extend(ranges)
    inputs = [i for g in record["generations"] for i in g["inputs"]]
    total_rows = 0
    failed: list[str] = []
    for shard in inputs:
        url = shard["url"]
        doubled = overlaps(by_shard.get(url, []))
        if doubled:
            report.problems.append(f"{url}: rows {_ranges(doubled)} committed more than once")
        done = state.shards_done.get(url)
        failure = state.file_failures.get(url)
        if done is None and failure is not None:
            # Accounted for as a file: its rows before the failure must each be committed once.
            gaps = missing(merge_ranges(by_shard.get(url, [])), failure.rows_read)
            if gaps:
                report.problems.append(f"{url}: {count_rows(gaps)} rows read before it failed are missing")
            failed.append(f"{url} ({failure.reason} after {failure.rows_read:,} rows)")
            total_rows += failure.rows_read
            continue
        if done is None:
            report.problems.append(f"{url}: not read to its end yet (job unfinished; re-run it)")
            continue
        total_rows += done.rows
        gaps = missing(merge_ranges(by_shard.get(url, [])), done.rows)
        if gaps:
            report.problems.append(f"{url}: {count_rows(gaps)} of {done.rows} rows missing, rows {_ranges(gaps)}")
        if done.fingerprint != shard["fingerprint"]:
            report.problems.append(f"{url}: read with fingerprint {done.fingerprint}, recorded {shard['fingerprint']}")
    unknown = sorted(set(by_shard) - {i["url"] for i in inputs})
    if unknown:
        report.problems.append(f"{len(unknown)} committed shards are not among the recorded inputs: {_first(unknown)}")
    if check_inputs:
        _check_fingerprints(inputs, storage, settings.get("fingerprint", "store"), report)

    dead = sum(c.error_rows for c in state.commits)
    _check_dead_letter_rate(record, state, report)
    report.facts.append(
        f"{state.committed_rows:,} rows in {len(state.commits)} committed parts: "
        f"{state.committed_rows - dead:,} embedded, {dead:,} dead-lettered in {ERRORS}/; "
        f"{len(inputs)} input shards with {total_rows:,} rows read; {len(record['generations'])} generations"
    )
    if failed:
        report.facts.append(f"{len(failed)} files failed part way, recorded in {FAILED}/: {_first(failed)}")


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


def _check_fingerprints(inputs: list[dict], storage: StorageConfig, mode: str, report: VerifyReport) -> None:
    changed = []
    for shard in inputs:
        fs, path = filesystem_for(shard["url"], storage)
        try:
            now = fingerprint(fs, path, fs.info(path), mode)
        except FileNotFoundError:
            report.facts.append(f"{shard['url']}: no longer exists (its embeddings stay)")
            continue
        if now != shard["fingerprint"]:
            changed.append(shard["url"])
    if changed:
        report.problems.append(f"{len(changed)} input shards changed since they were embedded: {_first(changed)}")
    else:
        report.facts.append(f"input fingerprints unchanged ({mode})")


def _schema_shape(schema: pa.Schema) -> list[tuple]:
    """Column names and types, ignoring the name of a list's child field (Parquet writers differ)."""
    shape = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type):
            shape.append((f.name, f"fixed_size_list<{f.type.value_type}>[{f.type.list_size}]"))
        else:
            shape.append((f.name, str(f.type)))
    return shape


def _first(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _ranges(ranges: list) -> str:
    return _first([f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in ranges])
