"""The manifest at scale, without Ray: many small shards in few read tasks, one read record per task,
and the commit and read records compacted into one checkpoint, crash-safe at every step; outputs of
manifest version 1 still load and are upgraded."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import jsonl_bytes, make_docs

from pipeline.config import StorageConfig
from pipeline.faults import SimulatedCrash, crash_at
from pipeline.io import compaction, todo
from pipeline.io.generations import recorded_inputs
from pipeline.io.layout import CHECKPOINTS, COMMITS, FAILED, INPUTS, PARTS, READS, RUN_RECORD, SHARDS, TODO, urls_of
from pipeline.io.lease import acquire_lease
from pipeline.io.manifest import read_state
from pipeline.io.recovery import recover, repair
from pipeline.io.run_record import MANIFEST_VERSION, append_run, read_run_record
from pipeline.io.shards import discover_shards
from pipeline.io.sink import CommittedParquetSink
from pipeline.io.storage import filesystem_for
from pipeline.stages.read import ShardDatasource
from pipeline.stages.reports import ShardOutcomes

STORAGE = StorageConfig()


class ProgressCalls:
    """Stands in for the progress actor's handle: records what the read tasks report."""

    def __init__(self) -> None:
        self.calls = []
        self.shard_read = self

    def remote(self, *args) -> None:
        self.calls.append(args)


def write_corpus(folder, small: int, rows: int = 3) -> None:
    folder.mkdir()
    for i in range(small):
        (folder / f"s{i:04d}.jsonl").write_bytes(jsonl_bytes(make_docs(rows, seed=i, prefix=f"s{i}-")))
    (folder / "zz-huge.jsonl").write_bytes(jsonl_bytes(make_docs(400, seed=99, prefix="huge-")))


def run_read_tasks(source: ShardDatasource, parallelism: int) -> pa.Table:
    tasks = source.get_read_tasks(parallelism)
    return [table for task in tasks for table in task.read_fn()], tasks


def done_facts(state) -> dict:
    """(URL, fingerprint) -> rows of every shard version the state says was read to its end."""
    done = state.done
    keys = zip(urls_of(done.column("url")), done.column("fingerprint").to_pylist(), strict=True)
    return dict(zip(keys, done.column("rows").to_pylist(), strict=True))


def state_facts(state) -> tuple:
    return (
        sorted(c.part for c in state.commits),
        state.committed_ranges(),
        done_facts(state),
        {key: f.rows_read for key, f in state.file_failures.items()},
        state.error_counts(),
    )


@pytest.fixture(autouse=True)
def replaced_checkpoints_go_at_once(monkeypatch):
    """These tests count checkpoints: one replaced goes at once, not CHECKPOINT_GRACE_S later (tested
    on its own below)."""
    monkeypatch.setattr(compaction, "CHECKPOINT_GRACE_S", 0.0)


def test_a_read_task_ships_its_own_shards_not_the_whole_listing(tmp_path):
    """The driver keeps a million shards as columns, and each read task gets a copy of its own rows: an
    Arrow slice would pickle the whole listing's buffers into every task."""
    from ray import cloudpickle

    write_corpus(tmp_path / "in", small=300)
    fs, path = filesystem_for(str(tmp_path / "in"), STORAGE)
    shards = discover_shards(fs, path)
    tasks = ShardDatasource(shards, "text", "id", STORAGE).get_read_tasks(20)
    listing_bytes = len(cloudpickle.dumps(shards))
    assert len(tasks) >= 10
    assert max(len(cloudpickle.dumps(task)) for task in tasks) < listing_bytes / 3


def test_the_jobs_read_tasks_take_runs_of_a_shards_file_and_leave_out_its_committed_rows(tmp_path, monkeypatch):
    """The job writes its shards to read into the output (_todo/): a task carries its rows' numbers, not
    its shards, and reads them, with the rows already committed, where it runs."""
    from ray import cloudpickle

    monkeypatch.setattr(todo, "ROW_GROUP_SHARDS", 7)  # runs cross row groups
    write_corpus(tmp_path / "in", small=300)
    fs, path = filesystem_for(str(tmp_path / "in"), STORAGE)
    shards = discover_shards(fs, path)
    committed = {shards[5].url: [(0, 1), (2, 3)], shards[-1].url: [(10, 400)]}
    to_read = todo.write_shards_to_read(todo.todo_url(str(tmp_path / "out"), "000003"), STORAGE, shards, committed)
    assert (tmp_path / "out" / TODO / "000003.parquet").is_file()
    assert (len(to_read), to_read.size_bytes, to_read.committed_rows) == (len(shards), shards.size_bytes, 2 + 390)

    from_file, from_listing = (
        ShardDatasource(to_read, "text", "id", STORAGE),
        ShardDatasource(shards, "text", "id", STORAGE),
    )
    tasks = from_file.get_read_tasks(20)
    assert [t.metadata.size_bytes for t in tasks] == [t.metadata.size_bytes for t in from_listing.get_read_tasks(20)]
    assert max(len(cloudpickle.dumps(task)) for task in tasks) < 4_000  # whatever the corpus
    runs = [run.read() for run in from_file.groups(20)]
    assert [s for listed, _ in runs for s in listed] == list(shards)
    assert {url: ranges for _, of_run in runs for url, ranges in of_run.items()} == committed

    rows = pa.concat_tables(table for task in tasks for table in task.read_fn())
    kept = {(r["shard"], r["row"]) for r in rows.select(["shard", "row"]).to_pylist()}
    every = {(s.url, row) for s in shards for row in range(400 if "huge" in s.url else 3)}
    left_out = {(shards[5].url, 0), (shards[5].url, 2)} | {(shards[-1].url, row) for row in range(10, 400)}
    assert rows.num_rows == len(kept) and kept == every - left_out

    todo.remove_shards_to_read(*filesystem_for(str(tmp_path / "out"), STORAGE))
    assert not (tmp_path / "out" / TODO).exists()


def test_small_shards_share_read_tasks_sized_by_bytes_and_each_task_writes_one_read_record(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.stages.reports.REPORT_EVERY_S", 3600.0)
    write_corpus(tmp_path / "in", small=300)
    fs, path = filesystem_for(str(tmp_path / "in"), STORAGE)
    shards = discover_shards(fs, path)
    progress = ProgressCalls()
    source = ShardDatasource(
        shards, "text", "id", STORAGE, outcomes=ShardOutcomes(str(tmp_path / "out"), STORAGE, progress)
    )

    tables, tasks = run_read_tasks(source, parallelism=10)
    groups = source.groups(parallelism=10)

    # About one task per tenth of the bytes; the huge shard alone; every shard once, in path order.
    assert 5 <= len(tasks) <= 11 and len(groups) == len(tasks)
    assert [s for group in groups for s in group] == list(shards)
    assert list(groups[-1]) == [shards[-1]] and shards[-1].url.endswith("zz-huge.jsonl")
    assert [t.metadata.size_bytes for t in tasks] == [group.size_bytes for group in groups]
    assert sum(t.num_rows for t in tables) == 300 * 3 + 400
    assert len(list((tmp_path / "out" / READS).iterdir())) == len(tasks)
    out_fs, root = filesystem_for(str(tmp_path / "out"), STORAGE)
    assert done_facts(read_state(out_fs, root)) == {
        (s.url, s.fingerprint): (400 if "huge" in s.url else 3) for s in shards
    }
    # Counted for the progress actor in one call per task here (REPORT_EVERY_S: an hour), not one a shard.
    assert len(progress.calls) == len(tasks)
    assert [sum(column) for column in zip(*progress.calls, strict=True)] == [
        shards.size_bytes,
        300 * 3 + 400,
        len(shards),
    ]


def committed_output(tmp_path, parts: int = 6, first: int = 0):
    """An output with `parts` committed parts (one shard each) and a read record per shard (from part
    `first` on: the others are there already)."""
    out = str(tmp_path / "out")
    fs, root = filesystem_for(out, STORAGE)
    sink = CommittedParquetSink(out, STORAGE, generation=0, rows_per_part=10)
    for i in range(first, parts):
        url = f"file:///in/{i}.jsonl"
        table = pa.table(
            {
                "id": [f"{i}-{r}" for r in range(4)],
                "embedding": [[float(r)] * 4 for r in range(4)],
                "n_tokens": [3] * 4,
                "truncated": [False] * 4,
                "shard": [url] * 4,
                "row": list(range(4)),
                "error": [None, None, None, "empty_text"],
                "error_message": [None, None, None, "the text is empty"],
                "excerpt": [None, None, None, ""],
            }
        )
        sink.write([table.cast(_stream_schema())], ctx=None)
        outcomes = ShardOutcomes(out, STORAGE, ProgressCalls()).recorder()
        shard = type("S", (), {"url": url, "fingerprint": f"size={i}", "size_bytes": 1})()
        outcomes.read_to_end(shard, 4)
        outcomes.close()
    return fs, root


def _stream_schema():
    from pipeline.io.schemas import stream_schema

    return stream_schema(4, "float32")


def test_compaction_folds_every_record_into_one_checkpoint_and_the_state_reads_the_same(tmp_path, monkeypatch):
    fs, root = committed_output(tmp_path)
    before = state_facts(read_state(fs, root))
    monkeypatch.setattr(compaction, "COMPACT_AFTER_RECORDS", 1)
    with acquire_lease(fs, root) as lease:
        recover(fs, root, lease.token)
        assert not list((tmp_path / "out" / COMMITS).iterdir()) and not list((tmp_path / "out" / READS).iterdir())
        assert [p.name for p in (tmp_path / "out" / CHECKPOINTS).iterdir()] == ["0000000001.parquet"]
        assert state_facts(read_state(fs, root)) == before

        # New records after a checkpoint are read beside it, and the next compaction replaces it.
        committed_output(tmp_path, parts=8)  # parts 0-5 again (same names, idempotent) and 6-7 new
        grown = state_facts(read_state(fs, root))
        assert len(grown[0]) == 8
        recover(fs, root, lease.token)
    assert [p.name for p in (tmp_path / "out" / CHECKPOINTS).iterdir()] == ["0000000002.parquet"]
    assert state_facts(read_state(fs, root)) == grown


def test_a_few_records_that_name_many_shards_are_compacted_too(tmp_path, monkeypatch):
    """A run of large read tasks leaves few records, each naming thousands of shards: folded into
    the sorted checkpoint, their facts are read a batch at a time (status) instead of whole."""
    fs, root = committed_output(tmp_path)
    state = read_state(fs, root)
    assert 0 < len(state.records) < compaction.COMPACT_AFTER_RECORDS
    monkeypatch.setattr(compaction, "COMPACT_AFTER_FACTS", state.facts_in_records + 1)
    with acquire_lease(fs, root) as lease:
        recover(fs, root, lease.token)
        assert not (tmp_path / "out" / CHECKPOINTS).exists(), "fewer facts than the threshold: left as they are"
        monkeypatch.setattr(compaction, "COMPACT_AFTER_FACTS", state.facts_in_records)
        recover(fs, root, lease.token)
    assert [p.name for p in (tmp_path / "out" / CHECKPOINTS).iterdir()] == ["0000000001.parquet"]
    assert read_state(fs, root).facts_in_records == 0
    assert state_facts(read_state(fs, root)) == state_facts(state)


def test_records_that_name_more_facts_than_a_fold_holds_are_compacted_a_batch_at_a_time(tmp_path, monkeypatch):
    """A run whose records name a million shards (all committed in its last minute, or left by a
    crash) is folded into the checkpoint a batch of FOLD_FACTS at a time, never held whole; a crash
    between two batches loses and doubles nothing, and the next recovery folds the rest."""
    fs, root = committed_output(tmp_path, parts=9)  # 9 commit and 9 read records, a shard fact each
    before = read_state(fs, root)
    monkeypatch.setattr(compaction, "FOLD_FACTS", 4)
    monkeypatch.setattr(compaction, "COMPACT_AFTER_FACTS", 2)
    folded, real_compact = [], compaction.compact

    def compact(fs, root, state, token, **kwargs):
        if len(folded) == 2 and crashing:
            raise SimulatedCrash("between two batches")
        folded.append(state.facts_in_records)
        return real_compact(fs, root, state, token, **kwargs)

    monkeypatch.setattr(compaction, "compact", compact)
    with acquire_lease(fs, root) as lease:
        crashing = True
        with pytest.raises(SimulatedCrash):
            recover(fs, root, lease.token)
        assert folded == [4, 4]
        assert [p.name for p in (tmp_path / "out" / CHECKPOINTS).iterdir()] == ["0000000002.parquet"]
        assert state_facts(read_state(fs, root)) == state_facts(before)
        assert read_state(fs, root).facts_in_records == 10

        crashing = False
        state = recover(fs, root, lease.token)
    assert folded == [4, 4, 4, 4, 2], "the rest, a batch at a time"
    assert [p.name for p in (tmp_path / "out" / CHECKPOINTS).iterdir()] == ["0000000005.parquet"]
    assert not list((tmp_path / "out" / COMMITS).iterdir()) and not list((tmp_path / "out" / READS).iterdir())
    assert state_facts(read_state(fs, root)) == state_facts(before)
    assert state.committed_rows == before.committed_rows == 36


def test_a_replaced_checkpoint_stays_a_while_for_the_readers_that_started_on_it(tmp_path, monkeypatch):
    """`status` reads the checkpoint a batch at a time, and a fold replaces it every second or so: a
    checkpoint stays until the one that replaced it is CHECKPOINT_GRACE_S old (by the store's clock),
    so a reader that started on it finishes; then the next compaction deletes it."""
    import os

    from pipeline.io.compaction import DONE, shard_facts_in_batches

    monkeypatch.setattr(compaction, "CHECKPOINT_GRACE_S", 600.0)
    monkeypatch.setattr(compaction, "COMPACT_AFTER_RECORDS", 1)
    folder = tmp_path / "out" / CHECKPOINTS
    fs, root = committed_output(tmp_path, parts=3)
    with acquire_lease(fs, root) as lease:
        recover(fs, root, lease.token)
        reader = read_state(fs, root, shard_facts=False)  # a status starts on checkpoint 1
        committed_output(tmp_path, parts=5, first=3)
        recover(fs, root, lease.token)
        committed_output(tmp_path, parts=7, first=5)
        recover(fs, root, lease.token)
        assert sorted(p.name for p in folder.iterdir()) == [f"000000000{n}.parquet" for n in (1, 2, 3)]
        read_on = pa.concat_tables(shard_facts_in_batches(fs, reader, DONE))  # still checkpoint 1's
        assert sorted(urls_of(read_on.column("url"))) == [f"file:///in/{i}.jsonl" for i in range(3)]

        def age(name: str) -> None:  # as if written ten minutes ago
            aged = (folder / name).stat().st_mtime - 601
            os.utime(folder / name, (aged, aged))

        age("0000000002.parquet")  # replaced checkpoint 1 ten minutes ago
        committed_output(tmp_path, parts=8, first=7)
        recover(fs, root, lease.token)
        assert sorted(p.name for p in folder.iterdir()) == [f"000000000{n}.parquet" for n in (2, 3, 4)]
        age("0000000003.parquet")
        age("0000000004.parquet")
        recover(fs, root, lease.token)  # nothing to compact: a finished output's next run removes them too
    assert sorted(p.name for p in folder.iterdir()) == ["0000000004.parquet"]
    assert len(read_state(fs, root).commits) == 8


@pytest.mark.parametrize("point", ["compact.after_checkpoint", "compact.after_records"])
def test_a_crash_at_each_compaction_step_loses_and_doubles_nothing(tmp_path, monkeypatch, point):
    fs, root = committed_output(tmp_path)
    before = read_state(fs, root)
    monkeypatch.setattr("pipeline.io.compaction.COMPACT_AFTER_RECORDS", 1)
    with acquire_lease(fs, root) as lease:
        with crash_at(point), pytest.raises(SimulatedCrash):
            recover(fs, root, lease.token)
        after = read_state(fs, root)
        assert state_facts(after) == state_facts(before)
        assert after.committed_rows == before.committed_rows == 24
        recover(fs, root, lease.token)  # the next run's recovery finishes the compaction
    assert not list((tmp_path / "out" / COMMITS).iterdir())
    assert len(list((tmp_path / "out" / CHECKPOINTS).iterdir())) == 1
    assert state_facts(read_state(fs, root)) == state_facts(before)


def test_a_compaction_that_leaves_the_checkpoints_facts_in_its_file_writes_what_a_whole_one_writes(
    tmp_path, monkeypatch
):
    """Recovery at a run's start reads the state without the checkpoint's per-shard facts, and its
    compaction merges them with the records' a few URLs at a time (BATCH_ROWS=2): the checkpoint it
    writes is the one a compaction of the whole state writes. Also with the last compaction's records
    still there (it stopped before deleting them), and with failed reads: one of a version the
    checkpoint says was read to its end (history), one of a version no read finished."""
    from pipeline.io import sorted_facts
    from pipeline.io.readers import FileProblem

    monkeypatch.setattr(sorted_facts, "BATCH_ROWS", 2)
    monkeypatch.setattr(compaction, "COMPACT_AFTER_RECORDS", 1)
    fs, root = committed_output(tmp_path)
    with acquire_lease(fs, root) as lease:
        with crash_at("compact.after_checkpoint"), pytest.raises(SimulatedCrash):
            recover(fs, root, lease.token)  # checkpoint 1 written; no record deleted yet
    for record in (tmp_path / "out" / READS).iterdir():
        record.unlink()  # the read records deleted, the commit records not yet: both in the checkpoint
    committed_output(tmp_path, parts=9, first=6)  # three new parts beside them
    failures = ShardOutcomes(root, STORAGE, ProgressCalls()).recorder()
    for url, fingerprint in (("file:///in/0.jsonl", "size=0"), ("file:///in/z.jsonl", "size=9")):
        shard = type("S", (), {"url": url, "fingerprint": fingerprint, "size_bytes": 1})()
        failures.failed(shard, 2, FileProblem("unreadable_file", "broken"))
    failures.close()
    shutil.copytree(tmp_path / "out", tmp_path / "whole" / "out")
    whole_fs, whole_root = filesystem_for(str(tmp_path / "whole" / "out"), STORAGE)

    with acquire_lease(fs, whole_root) as lease:  # the whole state read, compacted as it is
        assert compaction.compact(fs, whole_root, read_state(fs, whole_root), lease.token)
    with acquire_lease(fs, root) as lease:
        state = recover(fs, root, lease.token, shard_facts=False)
        assert state.facts_in_checkpoint
    streamed, whole = (sorted((f / CHECKPOINTS).iterdir()) for f in (tmp_path / "out", tmp_path / "whole" / "out"))
    assert [p.name for p in streamed] == [p.name for p in whole] == ["0000000002.parquet"]
    assert pq.read_table(streamed[0]).equals(pq.read_table(whole[0]))
    state = read_state(fs, root)
    assert len(state.commits) == 9 and state.committed_rows == 36
    assert list(state.file_failures) == [("file:///in/z.jsonl", "size=9")]
    assert state.error_counts() == {"empty_text": 9, "file:unreadable_file": 1}
    parquet = pq.ParquetFile(streamed[0])
    groups = [parquet.read_row_group(g, columns=["kind"]).column("kind") for g in range(parquet.num_row_groups)]
    assert [g.to_pylist() for g in groups] == [
        *[["done"] * 2] * 4,
        ["done"],
        *[["range"] * 2] * 4,
        ["range"],
        *[["commit"] * 2] * 4,
        ["commit", "failed"],
    ], "row groups of BATCH_ROWS rows, each of one kind of shard fact"
    for kind in ("done", "range"):
        urls = pq.read_table(streamed[0], filters=[("kind", "=", kind)]).column("url").to_pylist()
        assert urls == sorted(urls) and len(urls) == 9


def test_repair_withdraws_a_broken_part_that_only_the_checkpoint_names(tmp_path, monkeypatch):
    fs, root = committed_output(tmp_path)
    monkeypatch.setattr("pipeline.io.compaction.COMPACT_AFTER_RECORDS", 1)
    with acquire_lease(fs, root) as lease:
        recover(fs, root, lease.token)
        victim = sorted((tmp_path / "out" / PARTS).iterdir())[0]
        victim.write_bytes(b"not parquet")
        report = repair(fs, root, chunks=False, lease_token=lease.token)
    assert len(report.actions) == 1 and "cannot be read" in report.actions[0]
    state = read_state(fs, root)
    assert victim.stem not in {c.part for c in state.commits} and len(state.commits) == 5
    assert not (tmp_path / "out" / PARTS / victim.name).exists()


def test_an_output_of_manifest_version_1_loads_and_is_upgraded_on_its_next_run(tmp_path, monkeypatch):
    fs, root = committed_output(tmp_path, parts=2)
    out = tmp_path / "out"
    # Rewrite it the way version 1 kept it: a file per shard read or failed, inputs in the run record.
    for record in (out / READS).iterdir():
        done = json.loads(record.read_text())["done"][0]
        (out / SHARDS).mkdir(exist_ok=True)
        (out / SHARDS / f"{done['url'][-7]}.json").write_text(json.dumps(done))
        record.unlink()
    failure = {
        "url": "file:///in/x-\udcff.jsonl",
        "fingerprint": "size=9",
        "rows_read": 2,
        "reason": "binary_file",
        "message": "binary",
    }
    (out / FAILED).mkdir()
    (out / FAILED / "x.json").write_text(json.dumps(failure))
    inputs = [{"url": f"file:///in/{i}.jsonl", "format": "jsonl", "fingerprint": f"size={i}"} for i in range(2)]
    inputs.append({"url": failure["url"], "format": "jsonl", "fingerprint": "size=9"})
    (out / RUN_RECORD).write_text(
        json.dumps(
            {
                "settings": {"model_source": "m", "model_weights_sha256": "0" * 64},
                "generations": [{"generation": 0, "input": "file:///in", "inputs": inputs}],
                "runs": [],
            }
        )
    )

    from pipeline.status import output_status

    status = output_status(str(out))  # read-only: the record stays as it is
    assert status["shards"] == 3 and [(g["added"], g["changed"]) for g in status["generations"]] == [(3, 0)]
    assert status["shards_failed_part_way"] == 1 and status["shards_complete"] == 2
    assert status["dead_letters_by_reason"] == {"empty_text": 2, "file:binary_file": 1}
    assert "manifest_version" not in read_run_record(fs, root)
    state = read_state(fs, root)
    assert {url: rows for (url, _), rows in done_facts(state).items()} == {
        "file:///in/0.jsonl": 4,
        "file:///in/1.jsonl": 4,
    }
    assert state.error_counts() == {"empty_text": 2, "file:binary_file": 1}
    record = read_run_record(fs, root)
    assert urls_of(recorded_inputs(fs, root, record).column("url")) == [i["url"] for i in inputs]

    monkeypatch.setattr("pipeline.io.compaction.COMPACT_AFTER_RECORDS", 1)
    with acquire_lease(fs, root) as lease:
        recover(fs, root, lease.token)
    append_run(fs, root, _Summary())
    assert not list((out / SHARDS).iterdir()) and not list((out / FAILED).iterdir())
    upgraded = read_run_record(fs, root)
    assert upgraded["manifest_version"] == MANIFEST_VERSION and "inputs" not in upgraded["generations"][0]
    assert (out / INPUTS / "000000.parquet").exists()
    assert urls_of(recorded_inputs(fs, root, upgraded).column("url")) == [i["url"] for i in inputs]
    assert state_facts(read_state(fs, root)) == state_facts(state)


def test_an_output_of_a_newer_manifest_version_is_refused_by_name(tmp_path):
    from pipeline.errors import OutputConflictError
    from pipeline.status import output_status

    fs, root = committed_output(tmp_path, parts=1)
    (tmp_path / "out" / RUN_RECORD).write_text(json.dumps({"manifest_version": MANIFEST_VERSION + 1}))
    with pytest.raises(OutputConflictError, match=f"newer neobert-pipeline .manifest version {MANIFEST_VERSION + 1}"):
        output_status(root)


class _Summary:
    """append_run takes a dataclass."""

    __dataclass_fields__ = {}


def test_repeated_ids_are_listed_once_per_input_and_a_changed_input_reads_only_its_new_shards(
    ray_local, tmp_path, monkeypatch
):
    import pipeline.duplicate_ids as duplicate_ids
    from pipeline.config import load_config

    read: list[list[str]] = []  # the shards each listing read from the input
    datasource = duplicate_ids.ShardDatasource

    def recording(shards, *args):
        listed, _ = shards.run_of(0, len(shards)).read()  # the pass's shards, from its file in the output
        read.append([s.url.rsplit("/", 1)[-1] for s in listed])
        return datasource(shards, *args)

    monkeypatch.setattr(duplicate_ids, "ShardDatasource", recording)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes([{"id": "x", "text": "one"}, {"id": "y", "text": "two"}]))
    (tmp_path / "in" / "b.jsonl").write_bytes(jsonl_bytes([{"id": "x", "text": "again"}]))
    config = load_config(
        None,
        {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": "unused", "id_field": "id"}
        | {"duplicate_ids": "reject"},
    )
    fs, path = filesystem_for(config.input, STORAGE)

    def listed(config=config) -> tuple[list[str], dict]:
        shards = discover_shards(fs, path)
        repeats = duplicate_ids.rows_to_reject(config, shards)
        return shards.urls(), repeats.for_shards(shards.urls())

    (url_a, url_b), repeats = listed()
    assert repeats == {url_b: {0: f"id 'x' was already seen at {url_a} row 0"}} and read == [["a.jsonl", "b.jsonl"]]
    assert list((tmp_path / "out" / TODO).iterdir()) == []  # the pass's shards file goes once they are read
    assert listed()[1] == repeats and len(read) == 1  # a resumed run over the same input reuses the list

    # A listing made before listings had folders of their own (its files straight in duplicates/) is
    # reused the same way, and replaced by the next one.
    folder = tmp_path / "out" / "duplicates"
    done = json.loads((folder / "_done.json").read_text())
    for file in (folder / done["listing"]).iterdir():
        file.rename(folder / file.name)
    (folder / done["listing"]).rmdir()
    (folder / "_done.json").write_text(json.dumps({"input_sha256": done["input_sha256"], "repeats": 1}))
    assert listed()[1] == repeats and len(read) == 1

    (tmp_path / "in" / "c.jsonl").write_bytes(jsonl_bytes([{"id": "y", "text": "later"}]))
    (folder / "_ids" / "000099").mkdir()  # a pass interrupted before its shard list
    (folder / "listing-interrupted").mkdir()  # a listing interrupted before _done.json named it
    (folder / "listing-interrupted" / "part.parquet").write_bytes(b"not parquet")
    (_, _, url_c), grown = listed()
    assert read[-1] == ["c.jsonl"], "only the new shard is read"
    assert grown == {**repeats, url_c: {0: f"id 'y' was already seen at {url_a} row 1"}}
    assert not (folder / "_ids" / "000099").exists()
    listing = json.loads((folder / "_done.json").read_text())["listing"]
    assert sorted(p.name for p in folder.iterdir()) == ["_done.json", "_ids", listing]
    fresh = config.model_copy(update={"output": str(tmp_path / "fresh")})
    assert listed(fresh)[1] == grown, "as a first listing of the same input finds"

    # A refresh: b rewritten without the repeat, c deleted. The ids of their old versions are kept
    # but no longer count: nothing repeats.
    (tmp_path / "in" / "b.jsonl").write_bytes(jsonl_bytes([{"id": "z", "text": "rewritten, longer"}]))
    (tmp_path / "in" / "c.jsonl").unlink()
    assert listed() == ([url_a, url_b], {}) and read[-1] == ["b.jsonl"]

    # An input without a repeat lists none, and its read tasks find nothing to reject.
    (tmp_path / "unique").mkdir()
    (tmp_path / "unique" / "a.jsonl").write_bytes(jsonl_bytes([{"id": "p", "text": "one"}, {"id": "q", "text": "two"}]))
    unique = config.model_copy(update={"input": str(tmp_path / "unique"), "output": str(tmp_path / "out-unique")})
    fs, path = filesystem_for(unique.input, STORAGE)
    none = duplicate_ids.rows_to_reject(unique, discover_shards(fs, path))
    assert none.for_shards([discover_shards(fs, path)[0].url]) == {}
