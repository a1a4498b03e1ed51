"""Odd inputs and odd outputs get a rule and a clear message: file names that are not UTF-8, ids of
other types, text shards with an id field, an OUTPUT that is a file, a folder that looks like a shard."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from corpus import jsonl_bytes, make_docs

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import IncompleteRunError, SettingsError
from pipeline.io.layout import DUPLICATES, ERRORS, PARTS
from pipeline.job import run_embedding_job
from pipeline.status import output_status
from pipeline.summary import RunIncompleteError
from pipeline.verify import verify_output


def run(tmp_path, model, **settings):
    config = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": str(model), **settings}
    return run_embedding_job(load_config(None, config))


def test_a_file_name_that_is_not_utf8_is_a_failed_file_and_the_rest_is_embedded(
    ray_local, tmp_path, tiny_checkpoint, capsys
):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.jsonl").write_bytes(jsonl_bytes(make_docs(5, seed=1, prefix="g")))
    bad_name = os.path.join(os.fsencode(tmp_path / "in"), b"bad-\xff.jsonl")
    with open(bad_name, "wb") as f:
        f.write(jsonl_bytes(make_docs(3, seed=2, prefix="b")))
    with pytest.raises(RunIncompleteError, match="1 input files could not be read") as failure:
        run(tmp_path, tiny_checkpoint, id_field="id")
    assert failure.value.summary.error_counts == {"file:invalid_file_name": 1}
    assert pq.read_table(tmp_path / "out" / PARTS).num_rows == 5
    assert verify_output(str(tmp_path / "out")).ok
    # The CLI prints the name escaped, and the re-run does not stop on it either.
    args = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--id-field", "id"]
    assert main(args) == IncompleteRunError.exit_code
    assert "bad-\\udcff.jsonl" in capsys.readouterr().out


def test_ids_are_strings_or_integers_and_1_is_the_same_id_as_the_string_1(ray_local, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    rows = [
        {"id": 1, "text": "an integer id"},
        {"id": "1", "text": "the same id as a string"},
        {"id": 2.5, "text": "a float id"},
        {"id": {"nested": 1}, "text": "an object id"},
        {"id": True, "text": "a boolean id"},
        {"id": "ok", "text": "a string id"},
    ]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(tmp_path, tiny_checkpoint, id_field="id", duplicate_ids="flag", max_error_rate=1)
    embedded = pq.read_table(tmp_path / "out" / PARTS)
    assert sorted(embedded.column("id").to_pylist()) == ["1", "1", "ok"]
    errors = pq.read_table(tmp_path / "out" / ERRORS).to_pylist()
    assert sorted((e["row"], e["reason"]) for e in errors) == [(2, "invalid_id"), (3, "invalid_id"), (4, "invalid_id")]
    assert "is a float (2.5); ids are strings or integers" in next(e["message"] for e in errors if e["row"] == 2)
    repeats = pq.read_table(tmp_path / "out" / DUPLICATES).to_pylist()
    assert [(r["id"], r["row"], r["first_row"]) for r in repeats] == [("1", 1, 0)]


def test_text_shards_have_no_id_field_to_give(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "lines.txt").write_text("one document\nanother document\n")
    base = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--id-field", "id"]
    assert main(base) == SettingsError.exit_code
    assert "lines.txt is a text shard" in capsys.readouterr().err
    assert main([*base, "--format", "text"]) == SettingsError.exit_code
    assert "text shards are one document per line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(3, seed=3, prefix="o")))
    (tmp_path / "out").write_text("not a folder")
    assert main(["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["leaf folders", "files beside folders"])
def test_a_listing_is_sorted_by_the_bytes_of_its_urls_however_its_folders_nest(tmp_path, layout):
    """A run's start merges the listing with the output's URL-sorted facts, so it must come sorted
    by URL bytes: a folder walk gives that order for files in leaf folders (no sort needed); files
    beside folders are sorted after ("b-c/" sorts before "b/" and "b.jsonl")."""
    from pipeline.config import StorageConfig
    from pipeline.io.shards import discover_shards
    from pipeline.io.storage import filesystem_for

    names = ["b/x.jsonl", "b-c/y.jsonl", "é/1.jsonl", "e/2.jsonl", "a0/3.jsonl", "a/z/4.jsonl", "a/b/c.jsonl"]
    if layout == "files beside folders":
        names += ["b.jsonl", "a.jsonl", "é.jsonl", "e0.jsonl"]
    for name in names:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(jsonl_bytes(make_docs(1, seed=6, prefix=name)))
    fs, folder = filesystem_for(str(tmp_path / "in"), StorageConfig())
    listed = discover_shards(fs, folder)
    assert [s.url for s in listed] == sorted((s.url for s in listed), key=str.encode)
    assert sorted(s.relative_path for s in listed) == sorted(names)


def test_a_folder_named_like_a_shard_is_searched_inside_by_a_glob_as_by_a_folder(tmp_path):
    from pipeline.config import StorageConfig
    from pipeline.io.shards import discover_shards
    from pipeline.io.storage import filesystem_for

    (tmp_path / "in" / "x.jsonl").mkdir(parents=True)
    (tmp_path / "in" / "x.jsonl" / "inside.jsonl").write_bytes(jsonl_bytes(make_docs(2, seed=4, prefix="i")))
    (tmp_path / "in" / "y.jsonl").write_bytes(jsonl_bytes(make_docs(2, seed=5, prefix="y")))
    fs, folder = filesystem_for(str(tmp_path / "in"), StorageConfig())
    by_folder = [s.relative_path for s in discover_shards(fs, folder)]
    by_glob = [s.relative_path for s in discover_shards(fs, f"{folder}/*.jsonl")]
    assert by_folder == by_glob == ["x.jsonl/inside.jsonl", "y.jsonl"]


def test_status_tells_a_finished_run_from_one_that_stopped(ray_local, tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    from pipeline.io.lease import acquire_lease
    from pipeline.io.storage import filesystem_for

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(4, seed=6, prefix="s")))
    run(tmp_path, tiny_checkpoint)
    status = output_status(str(tmp_path / "out"))
    assert not status["unfinished_run"] and status["writer"]["released"] and not status["writer"]["running"]
    # A run that took the lease and died on this host (its process is gone) before it could let go.
    fs, root = filesystem_for(str(tmp_path / "out"), load_config(None, {"input": "x", "output": "y"}).storage)
    lease = acquire_lease(fs, root)
    holder = json.loads(fs.cat_file(f"{root}/_lease/{lease.token:012d}.json"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fs.pipe_file(f"{root}/_lease/{lease.token:012d}.json", json.dumps({**holder, "pid": gone.pid}).encode())
    status = output_status(str(tmp_path / "out"))
    assert status["unfinished_run"] and not status["writer"]["running"]
    from pipeline.terminal import status_lines

    assert "last run    stopped before it finished: re-run the same command to finish it" in status_lines(status)
