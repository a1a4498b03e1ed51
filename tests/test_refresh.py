"""Scheduled refreshes: new, rewritten and deleted shards become a generation; the current view equals a
from-scratch run over the new corpus; a refresh killed at any point and re-run, and vacuum, keep it."""

from __future__ import annotations

import shutil
import signal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from cli_process import RUN_TIMEOUT_S, embed_process
from corpus import jsonl_bytes, make_docs

from pipeline.config import StorageConfig, load_config
from pipeline.io.current import current_rows, export_current
from pipeline.io.layout import PARTS
from pipeline.job import run_embedding_job
from pipeline.status import output_status
from pipeline.vacuum import vacuum_output
from pipeline.verify import verify_output


def first_corpus() -> dict[str, list[dict]]:
    return {f"s{i}.jsonl": make_docs(12, seed=300 + i, prefix=f"s{i}-") for i in range(8)}


def refreshed(corpus: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Two shards added, one rewritten (rows changed, one deleted, one added), one deleted."""
    new = dict(corpus)
    new["t0.jsonl"] = make_docs(7, seed=400, prefix="t0-")
    new["t1.jsonl"] = make_docs(5, seed=401, prefix="t1-")
    rewritten = [dict(d) for d in corpus["s2.jsonl"]]
    rewritten[0]["text"] = "an edited first document"
    rewritten[3]["text"] = "another edit, longer than it was before the refresh"
    del rewritten[5]
    rewritten.append({"id": "s2-added", "text": "a document added to a rewritten shard"})
    new["s2.jsonl"] = rewritten
    del new["s5.jsonl"]
    return new


def write(fs, folder: str, corpus: dict[str, list[dict]]) -> None:
    fs.makedirs(folder, exist_ok=True)
    if fs.exists(folder):
        for path in fs.ls(folder):
            if path.rsplit("/", 1)[-1] not in corpus:
                fs.rm(path)
    for name, docs in corpus.items():
        data = jsonl_bytes(docs)
        path = f"{folder}/{name}"
        if not fs.exists(path) or fs.cat_file(path) != data:  # an unchanged shard keeps its mtime
            fs.pipe(path, data)


def view(url: str, storage: StorageConfig | None = None) -> dict[str, np.ndarray]:
    table = current_rows(url, storage, columns=["id", "embedding"]).read_all()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a current view holds each id once"
    return dict(zip(ids, np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), strict=True))


def assert_same_view(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for doc_id, vector in want.items():
        np.testing.assert_allclose(got[doc_id], vector, atol=1e-6, err_msg=doc_id)


def run(input_url: str, output_url: str, model, storage: StorageConfig | None = None, **settings):
    config = {"input": input_url, "output": output_url, "model": str(model), "id_field": "id", **settings}
    if storage is not None:
        config["storage"] = {"endpoint_url": storage.endpoint_url}
    return run_embedding_job(load_config(None, config))


def test_a_refresh_embeds_only_what_changed_and_its_current_view_equals_a_fresh_run(
    ray_local, s3, s3_endpoint, tiny_checkpoint
):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    bucket = s3.bucket
    corpus = first_corpus()
    write(s3, f"{bucket}/in", corpus)
    out = f"s3://{bucket}/out"
    run(f"s3://{bucket}/in", out, tiny_checkpoint, storage)

    with pytest.raises(Exception, match="--refresh"):  # changed input without --refresh: refused, naming it
        write(s3, f"{bucket}/in", refreshed(corpus))
        run(f"s3://{bucket}/in", out, tiny_checkpoint, storage)
    new = refreshed(corpus)
    summary = run(f"s3://{bucket}/in", out, tiny_checkpoint, storage, refresh=True)

    changed_rows = len(new["t0.jsonl"]) + len(new["t1.jsonl"]) + len(new["s2.jsonl"])
    assert summary.documents == changed_rows  # the model embedded those rows and no others
    assert summary.generation == 1 and summary.changes == {"added": 2, "changed": 1, "deleted": 1}
    status = output_status(out, storage)
    assert [(g["added"], g["changed"], g["deleted"]) for g in status["generations"]] == [(8, 0, 0), (2, 1, 1)]
    assert status["generations"][1]["rows_committed"] == changed_rows and status["shards"] == 9
    assert status["shards_complete"] == 9
    report = verify_output(out, storage, local_rows=0)  # on Ray, as a big output is
    assert report.ok, report.problems
    assert any("superseded" in fact for fact in report.facts)
    assert report.facts == verify_output(out, storage).facts

    write(s3, f"{bucket}/fresh-in", new)
    run(f"s3://{bucket}/fresh-in", f"s3://{bucket}/fresh-out", tiny_checkpoint, storage)
    assert_same_view(view(out, storage), view(f"s3://{bucket}/fresh-out", storage))

    # Nothing changed: no model work, said in the summary; the view is the same.
    again = run(f"s3://{bucket}/in", out, tiny_checkpoint, storage, refresh=True)
    assert again.already_complete and again.documents == 0 and again.changes is None
    assert len(output_status(out, storage)["generations"]) == 2

    # export writes the current view as plain Parquet.
    files, rows = export_current(out, f"s3://{bucket}/export", storage)
    assert files == 1 and rows == sum(len(d) for d in new.values())


def duckdb_current_ids(output: str) -> list[str]:
    """The README's DuckDB query for the current view."""
    import duckdb

    query = current_view_query().replace("OUTPUT", output)
    return [row[0] for row in duckdb.execute(f"SELECT id FROM ({query})").fetchall()]


def current_view_query() -> str:
    """The current-view query as the README prints it (the test fails if it is edited out of shape)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("WITH versions AS (")
    return readme[start : readme.index(";", start)]


@pytest.mark.timeout(5 * RUN_TIMEOUT_S)
def test_a_refresh_killed_after_a_commit_is_finished_before_the_next_refresh_starts_its_own(
    ray_local, tmp_path, tiny_checkpoint
):
    """Killed mid-way, refresh 1 leaves generation 1 unfinished; by the next night a shard changed again.
    Refresh 2 first finishes generation 1, then embeds the new change as generation 2."""
    import fsspec

    fs = fsspec.filesystem("file")
    corpus = first_corpus()
    write(fs, str(tmp_path / "in"), corpus)
    out = tmp_path / "out"
    run(str(tmp_path / "in"), str(out), tiny_checkpoint)
    night1 = refreshed(corpus)
    write(fs, str(tmp_path / "in"), night1)
    once = tmp_path / "fired"  # only the killed run needs a process of its own
    killed = embed_process(tmp_path / "in", out, tiny_checkpoint, "--refresh", failpoint="read", once=once)
    assert killed == -signal.SIGKILL and once.exists()
    night2 = {**night1, "s6.jsonl": make_docs(4, seed=600, prefix="s6-")}
    write(fs, str(tmp_path / "in"), night2)
    run(str(tmp_path / "in"), str(out), tiny_checkpoint, refresh=True)

    status = output_status(str(out))
    assert [(g["added"], g["changed"], g["deleted"]) for g in status["generations"]] == [
        (8, 0, 0),
        (2, 1, 1),
        (0, 1, 0),
    ]
    assert status["shards_complete"] == status["shards"] == 9
    report = verify_output(str(out))
    assert report.ok, report.problems
    run(str(tmp_path / "in"), str(tmp_path / "fresh"), tiny_checkpoint)
    assert_same_view(view(str(out)), view(str(tmp_path / "fresh")))


@pytest.mark.slow
@pytest.mark.timeout(10 * RUN_TIMEOUT_S)
def test_a_refresh_killed_at_every_step_and_run_again_gives_the_same_current_view(ray_local, tmp_path, tiny_checkpoint):
    """Refresh a copy of one output per failpoint, killed there with SIGKILL, then run again: each copy's
    current view is a fresh run's, and verify passes."""
    import fsspec

    fs = fsspec.filesystem("file")
    corpus = first_corpus()
    write(fs, str(tmp_path / "in"), corpus)
    base = tmp_path / "base"
    assert embed_process(tmp_path / "in", base, tiny_checkpoint) == 0
    write(fs, str(tmp_path / "in"), refreshed(corpus))
    assert embed_process(tmp_path / "in", tmp_path / "base-refreshed", tiny_checkpoint) == 0
    want = view(str(tmp_path / "base-refreshed"))  # a fresh run over the refreshed corpus
    for point in ["read", "embed", "sink.after_stage", "sink.after_commit"]:
        out = tmp_path / f"out-{point}"
        shutil.copytree(base, out)
        once = tmp_path / f"fired-{point}"
        killed = embed_process(tmp_path / "in", out, tiny_checkpoint, "--refresh", failpoint=point, once=once)
        assert killed == -signal.SIGKILL and once.exists(), point
        assert embed_process(tmp_path / "in", out, tiny_checkpoint, "--refresh") == 0, point
        report = verify_output(str(out))
        assert report.ok, (point, report.problems)
        assert_same_view(view(str(out)), want)
    assert len(want) == sum(len(d) for d in refreshed(corpus).values())


def test_vacuum_after_three_refreshes_removes_only_fully_superseded_parts_even_when_killed(
    ray_local, tmp_path, tiny_checkpoint
):
    import fsspec

    from pipeline.faults import SimulatedCrash, crash_at

    fs = fsspec.filesystem("file")
    corpus = first_corpus()
    write(fs, str(tmp_path / "in"), corpus)
    out = str(tmp_path / "out")
    run(str(tmp_path / "in"), out, tiny_checkpoint)
    for round_ in range(3):  # each night rewrites s0 again and deletes another shard
        corpus = dict(corpus)
        corpus["s0.jsonl"] = make_docs(9, seed=500 + round_, prefix="s0-")
        del corpus[f"s{7 - round_}.jsonl"]
        write(fs, str(tmp_path / "in"), corpus)
        run(str(tmp_path / "in"), out, tiny_checkpoint, refresh=True)
    before = view(out)
    parts_before = sorted(p.name for p in (tmp_path / "out" / PARTS).iterdir())
    assert sorted(duckdb_current_ids(out)) == sorted(before)  # the README's query gives the same view

    planned = vacuum_output(out, dry_run=True)
    # Generations 1 and 2 hold only s0's versions that generation 3 replaced: those parts, nothing else.
    from pipeline.io.manifest import read_state
    from pipeline.io.storage import filesystem_for

    fs_out, root = filesystem_for(out, StorageConfig())
    commits = read_state(fs_out, root).commits
    assert sorted(planned.parts) == sorted(c.part for c in commits if c.generation in (1, 2))
    assert planned.parts and sorted(p.name for p in (tmp_path / "out" / PARTS).iterdir()) == parts_before
    with crash_at("vacuum.after_checkpoint"), pytest.raises(SimulatedCrash):
        vacuum_output(out)
    report = verify_output(out)
    assert report.ok, report.problems  # withdrawn parts' files are known leftovers, not orphans
    assert_same_view(view(out), before)
    done = vacuum_output(out)
    assert done.parts == []  # the interrupted vacuum's withdrawal stands; its leftovers are now gone
    left = sorted(p.stem for p in (tmp_path / "out" / PARTS).iterdir())
    assert not set(left) & set(planned.parts) and set(left) < {p.removesuffix(".parquet") for p in parts_before}
    assert_same_view(view(out), before)
    report = verify_output(out)
    assert report.ok, report.problems
    # What is left: parts holding a current row (maybe beside superseded ones), or of the newest generation.
    from pipeline.io.current import current_shards
    from pipeline.io.generations import recorded_inputs
    from pipeline.io.ledger import current_versions
    from pipeline.io.run_record import read_run_record

    current = current_versions(recorded_inputs(fs_out, root, read_run_record(fs_out, root)))
    commits = read_state(fs_out, root).commits
    assert all(shards or c.generation == 3 for c, shards in zip(commits, current_shards(commits, current), strict=True))


def test_status_reads_shard_facts_a_batch_of_urls_at_a_time_and_counts_what_a_whole_read_counts(
    ray_local, tmp_path, tiny_checkpoint, monkeypatch
):
    """Two generations compacted into a sorted checkpoint, a third in records beside it: status,
    reading _inputs/ and the checkpoint two rows at a time, counts what the state read whole counts;
    and so it does from a checkpoint written before the facts were sorted."""
    import fsspec

    from pipeline.io import generations, sorted_facts
    from pipeline.io.compaction import CHECKPOINT_SCHEMA
    from pipeline.io.layout import CHECKPOINTS, COMMITS, READS, parquet_bytes, urls_of
    from pipeline.io.lease import acquire_lease
    from pipeline.io.ledger import INPUT_COLUMNS, committed, current_versions, ledger
    from pipeline.io.manifest import read_state
    from pipeline.io.recovery import recover
    from pipeline.io.run_record import read_run_record
    from pipeline.io.shards import discover_shards

    monkeypatch.setattr(sorted_facts, "BATCH_ROWS", 2)
    monkeypatch.setattr("pipeline.io.compaction.COMPACT_AFTER_RECORDS", 1)
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    corpus = first_corpus()
    write(fs, str(tmp_path / "in"), corpus)
    run(str(tmp_path / "in"), root, tiny_checkpoint)
    write(fs, str(tmp_path / "in"), refreshed(corpus))
    run(str(tmp_path / "in"), root, tiny_checkpoint, refresh=True)
    with acquire_lease(fs, root) as lease:
        recover(fs, root, lease.token)  # compacts every record so far into one checkpoint
    checkpoint = max((tmp_path / "out" / CHECKPOINTS).iterdir())  # the newest (those it replaced stay a while)
    monkeypatch.setattr("pipeline.io.compaction.COMPACT_AFTER_RECORDS", 1000)
    write(fs, str(tmp_path / "in"), {**refreshed(corpus), "u0.jsonl": make_docs(3, seed=500, prefix="u0-")})
    run(str(tmp_path / "in"), root, tiny_checkpoint)  # generation 2: in records beside the checkpoint

    def whole_ledger(state, versions):  # the shard ledger of the state read whole, in one piece
        return ledger(versions, state.done, committed(state.ranges()))

    def whole() -> dict:
        state = read_state(fs, root)
        record = read_run_record(fs, root)
        shards = whole_ledger(state, current_versions(generations.recorded_inputs(fs, root, record, INPUT_COLUMNS)))
        return {
            "shards": shards.num_rows,
            "shards_complete": sum(shards.column("complete").to_pylist()),
            "shards_read": shards.num_rows - shards.column("rows").null_count,
            "rows_in_shards_read": sum(r or 0 for r in shards.column("rows").to_pylist()),
        }

    steps = []
    in_step = generations.in_step
    monkeypatch.setattr(generations, "in_step", lambda *a: (steps.append(s) or s for s in in_step(*a)))
    status = output_status(root)
    assert {k: status[k] for k in whole()} == whole()
    assert status["shards"] == status["shards_complete"] == 10 and status["rows_in_shards_read"] == 12 * 7 + 7 + 5 + 3
    assert len(steps) >= 5, "read a few URLs at a time"
    unfinished = tmp_path / "unfinished"  # as if generation 2's read task had died after its commit
    shutil.copytree(tmp_path / "out", unfinished)
    for record in (unfinished / READS).iterdir():
        record.unlink()

    # verify reads the same facts the same way, and each part's claimed ranges, gathered from many
    # steps, are grouped by part where the checks run: here and on Ray alike.
    steps.clear()
    here, on_ray = verify_output(root), verify_output(root, local_rows=0)
    assert here.ok and on_ray.ok, (here.problems, on_ray.problems)
    assert here.facts == on_ray.facts and len(steps) >= 10
    current = f"{status['shards']} current input shards with {status['rows_in_shards_read']:,} rows"
    assert any(current in fact for fact in here.facts), here.facts
    part = max((tmp_path / "out" / PARTS).iterdir(), key=lambda p: pq.read_metadata(p).num_rows)
    kept = part.read_bytes()
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)  # a part that lost its last row
    for report in (verify_output(root), verify_output(root, local_rows=0)):
        assert report.problems == [
            f"part {part.stem} does not hold the rows its commit record names; repair "
            "quarantines it and a re-run embeds its rows again"
        ]
    part.write_bytes(kept)
    monkeypatch.setattr("pipeline.verify.MAX_PROBLEM_LINES", 0)  # the lines of a kind are capped and counted
    assert verify_output(str(unfinished)).problems == ["and 1 more shards with rows missing or not read to their end"]

    # The same checkpoint as written before: no range rows, each commit's ranges in its record, unsorted.
    state = read_state(fs, root)
    assert not state.file_failures
    old = pa.table(
        {
            "kind": ["commit"] * len(state.commits) + ["done"] * state.done.num_rows,
            "url": pa.concat_arrays(
                [pa.nulls(len(state.commits), pa.binary()), state.done.column("url").combine_chunks()]
            ),
            "fingerprint": [None] * len(state.commits) + state.done.column("fingerprint").to_pylist(),
            "rows": [c.rows for c in state.commits] + state.done.column("rows").to_pylist(),
            "reason": pa.nulls(len(state.commits) + state.done.num_rows, pa.string()),
            "message": pa.nulls(len(state.commits) + state.done.num_rows, pa.string()),
            "commit": [c.to_json() for c in state.commits] + [None] * state.done.num_rows,
        },
        schema=pa.schema(
            [CHECKPOINT_SCHEMA.field(n) for n in ("kind", "url", "fingerprint", "rows", "reason", "message", "commit")]
        ),
    )
    for folder in (COMMITS, READS):
        for record in (tmp_path / "out" / folder).iterdir():
            record.unlink()  # everything is in the old-style checkpoint now
    checkpoint.write_bytes(parquet_bytes(old))
    assert read_state(fs, root).committed_ranges() == state.committed_ranges()
    assert {k: output_status(root)[k] for k in whole()} == {k: status[k] for k in whole()}

    # A job's plan, from the same facts read the same way, against a listing that adds, rewrites and
    # drops shards: what the state read whole decides, also with a shard committed but not read to its end.
    def planned(folder: str, listed: list) -> generations.RunPlan:
        state, record = read_state(fs, folder, shard_facts=False), read_run_record(fs, folder)
        plan = generations.plan_run(fs, folder, record, state, listed)
        whole = read_state(fs, folder)
        current = current_versions(generations.recorded_inputs(fs, folder, record, INPUT_COLUMNS))
        assert plan.changes == generations.changes_since(current, listed)
        shards = whole_ledger(whole, current).filter(pc.invert(pc.field("complete")))
        versions = shards.select(["fingerprint", "generation"]).to_pylist()
        todo = dict(zip(urls_of(shards.column("url")), versions, strict=True))
        want: dict[int, list] = {}
        for shard in listed:
            if todo.get(shard.url, {}).get("fingerprint") == shard.fingerprint:
                want.setdefault(todo[shard.url]["generation"], []).append(shard)
        assert plan.unfinished == dict(sorted(want.items()))
        committed = {g: whole.committed_ranges(g, [s.url for s in shards]) for g, shards in want.items()}
        assert plan.committed == {g: ranges for g, ranges in committed.items() if ranges}
        return plan

    changed = {**refreshed(corpus), "u0.jsonl": make_docs(3, seed=500, prefix="u0-")}
    changed["v0.jsonl"] = make_docs(2, seed=600, prefix="v0-")
    changed["s3.jsonl"] = make_docs(4, seed=601, prefix="s3-")
    del changed["s4.jsonl"]
    write(fs, str(tmp_path / "in"), changed)
    listed = discover_shards(fs, str(tmp_path / "in"))
    plan = planned(str(unfinished), listed)

    def names(shards: list) -> list[str]:
        return [getattr(s, "url", s).rsplit("/", 1)[-1] for s in shards]

    assert [names(plan.changes.added), names(plan.changes.changed), names(plan.changes.deleted)] == [
        ["v0.jsonl"],
        ["s3.jsonl"],
        ["s4.jsonl"],
    ]
    assert {g: names(shards) for g, shards in plan.unfinished.items()} == {2: ["u0.jsonl"]}
    assert list(plan.committed) == [2] and list(plan.committed[2].values()) == [[(0, 3)]]
    assert not planned(root, listed).unfinished  # the old-format checkpoint: everything read to its end


def test_refreshes_with_reject_keep_an_ids_embedded_row_and_say_which_repeats_lost_their_first(
    ray_local, tmp_path, tiny_checkpoint, caplog, monkeypatch
):
    """--duplicate-ids reject over refreshes: a new shard repeating an id that an embedded row holds is
    the repeat, whatever the order of their shards, so the output keeps each id once; when the row an
    id kept is changed away, its rejected repeats are no longer repeats, said in the log and in
    duplicates/_done.json (those rows were dead letters already: nothing is embedded twice)."""
    import json

    import fsspec

    from pipeline.faults import SimulatedCrash, crash_at
    from pipeline.io.layout import DUPLICATES

    fs, folder, out = fsspec.filesystem("file"), str(tmp_path / "in"), str(tmp_path / "out")

    def current() -> dict[str, str]:
        table = current_rows(out, columns=["id", "shard"]).read_all()
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)), "each id in the output once"
        return dict(zip(ids, [s.rsplit("/", 1)[-1] for s in table.column("shard").to_pylist()], strict=True))

    corpus = {
        "a.jsonl": [{"id": "x1", "text": "one"}, {"id": "same", "text": "the first same"}],
        "b.jsonl": [{"id": "same", "text": "a later same"}, {"id": "x2", "text": "two"}],
    }
    write(fs, folder, corpus)
    run(folder, out, tiny_checkpoint, duplicate_ids="reject")
    assert current() == {"x1": "a.jsonl", "same": "a.jsonl", "x2": "b.jsonl"}

    # A new shard, sorting first, repeats the id of b's embedded row: the new row is the repeat.
    corpus["0.jsonl"] = [{"id": "x2", "text": "a new two"}, {"id": "x3", "text": "three"}]
    write(fs, folder, corpus)
    run(folder, out, tiny_checkpoint, duplicate_ids="reject", refresh=True)
    assert current() == {"x1": "a.jsonl", "same": "a.jsonl", "x2": "b.jsonl", "x3": "0.jsonl"}
    report = verify_output(out)
    assert report.ok, report.problems

    # a rewritten without "same": b's rejected "same" is no longer a repeat, and stays a dead letter.
    # The first try stops with the new listing written but not yet named: the last one is still there
    # to keep to.
    monkeypatch.setattr("pipeline.io.lease.TAKEOVER_GRACE_S", 0.0)
    corpus["a.jsonl"] = [{"id": "x1", "text": "one"}, {"id": "y", "text": "a new row, longer than before"}]
    write(fs, folder, corpus)
    with crash_at("duplicates.before_done"), pytest.raises(SimulatedCrash):
        run(folder, out, tiny_checkpoint, duplicate_ids="reject", refresh=True)
    with caplog.at_level("WARNING", logger="pipeline.duplicate_ids"):
        run(folder, out, tiny_checkpoint, duplicate_ids="reject", refresh=True)
    assert current() == {"x1": "a.jsonl", "y": "a.jsonl", "x2": "b.jsonl", "x3": "0.jsonl"}
    assert "1 rows were rejected as repeats of a row the input no longer has" in caplog.text
    assert f"'same' at file://{folder}/b.jsonl row 0" in caplog.text
    done = json.loads((tmp_path / "out" / DUPLICATES / "_done.json").read_text())
    assert (done["repeats"], done["no_longer_repeats"], done["generation"]) == (1, 1, 2)
    listings = [p.name for p in (tmp_path / "out" / DUPLICATES).iterdir() if not p.name.startswith("_")]
    assert listings == [done["listing"]], "the last listing, replaced once the new one is named"
    report = verify_output(out)
    assert report.ok, report.problems
