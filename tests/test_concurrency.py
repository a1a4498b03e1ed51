"""Exactly once against a second driver, an interrupted --overwrite, damage and silent edits: real jobs
on local disk and on the S3 server, each ending with verify and every document exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import S3_FIRST, Store
from corpus import jsonl_bytes, make_docs

from pipeline.config import StorageConfig, load_config
from pipeline.faults import SimulatedCrash, crash_at
from pipeline.io.layout import COMMITS, PARTS, QUARANTINE, RUN_RECORD, join
from pipeline.io.run_record import InputChangedError, SettingsMismatchError
from pipeline.job import run_embedding_job
from pipeline.verify import verify_output

RUN_TIMEOUT_S = 180


def write_shards(folder, names: list[str], rows: int = 60) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    docs = {}
    for name in names:
        part = make_docs(rows, seed=hash(name) % 1000, prefix=name)
        docs |= {d["id"]: d["text"] for d in part}
        (folder / f"{name}.jsonl").write_bytes(jsonl_bytes(part))
    return docs


def output_ids(store: Store) -> list[str]:
    store.fs.invalidate_cache()
    return pq.read_table(join(store.root, PARTS), filesystem=store.fs).column("id").to_pylist()


def job(input_dir, store: Store, model, overwrite: bool = False, **settings):
    config = {"input": str(input_dir), "output": store.url, "model": str(model), "id_field": "id"}
    config |= {"storage": {"endpoint_url": store.storage.endpoint_url}, "tokens_per_batch": 512}
    return run_embedding_job(load_config(None, {**config, **settings}), overwrite=overwrite)


def local_store(tmp_path) -> Store:
    return Store(fsspec.filesystem("file"), str(tmp_path / "out"), str(tmp_path / "out"), StorageConfig())


def assert_exactly_once(store: Store, docs: dict[str, str]) -> None:
    report = verify_output(store.url, store.storage)
    assert report.ok, report.problems
    ids = output_ids(store)
    assert sorted(ids) == sorted(docs), "every document exactly once"


def start_cli(input_dir, store: Store, model, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    command = [sys.executable, "-m", "pipeline.cli", "embed", str(input_dir), store.url, "--model", str(model)]
    command += ["--id-field", "id", "--num-cpus", "2", "--tokens-per-batch", "512", "--target-file-mb", "0.05"]
    if store.storage.endpoint_url:
        command += ["--endpoint-url", store.storage.endpoint_url]
    return subprocess.Popen(
        [*command, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, output


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("wait", [True, False], ids=["second-waits", "second-refused"])
@pytest.mark.parametrize("store", S3_FIRST, indirect=True)
def test_two_drivers_on_one_output_leave_every_row_exactly_once(store, tmp_path, tiny_checkpoint, wait):
    docs = write_shards(tmp_path / "in", ["a", "b", "c"])
    # Both may wait: on a loaded machine the one started second can take the lease first.
    waiting = ["--wait-for-lease", "300"] if wait else []
    first = start_cli(tmp_path / "in", store, tiny_checkpoint, *waiting)
    docs |= write_shards(tmp_path / "in", ["d", "e"])  # new shards arrive between the two starts
    time.sleep(0.5)
    second = start_cli(tmp_path / "in", store, tiny_checkpoint, *waiting)
    (code1, out1), (code2, out2) = finish(first), finish(second)
    if wait:
        assert (code1, code2) == (0, 0), out1[-3000:] + out2[-3000:]
        assert "waiting for run " in out1 + out2, "one of them waited for the other"
    else:
        assert sorted([code1, code2]) == [0, 10], out1[-3000:] + out2[-3000:]
        refused = out1 if code1 == 10 else out2
        assert "error: " in refused and "is being written by run " in refused and "--wait-for-lease" in refused
        code, out = finish(start_cli(tmp_path / "in", store, tiny_checkpoint))  # the refused one, again
        assert code == 0, out[-3000:]
    assert_exactly_once(store, docs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["overwrite._commits", "overwrite.parts", "overwrite._neobert_run.json"])
@pytest.mark.parametrize("store", S3_FIRST, indirect=True)
def test_an_interrupted_overwrite_never_leaves_old_vectors_under_new_settings(
    ray_local, store, tmp_path, tiny_checkpoint, point
):
    docs = write_shards(tmp_path / "in", ["a", "b"])
    job(tmp_path / "in", store, tiny_checkpoint, target_file_mb=0.02)
    mean = dict(pooling="mean", target_file_mb=0.02)
    with crash_at(point), pytest.raises(SimulatedCrash):  # killed before removing that entry
        job(tmp_path / "in", store, tiny_checkpoint, overwrite=True, **mean)
    if point == "overwrite._commits":  # nothing removed yet: the old vectors still guard their settings
        with pytest.raises(SettingsMismatchError, match="pooling: stored 'cls', now 'mean'"):
            job(tmp_path / "in", store, tiny_checkpoint, **mean)
        return
    job(tmp_path / "in", store, tiny_checkpoint, **mean)  # no commit left: all of it again, with mean pooling
    assert_exactly_once(store, docs)
    assert b'"pooling": "mean"' in store.fs.cat_file(join(store.root, RUN_RECORD))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("store", S3_FIRST, indirect=True)
def test_repair_and_one_rerun_make_a_damaged_output_whole(ray_local, store, tmp_path, tiny_checkpoint, capsys):
    from pipeline.cli import main

    docs = write_shards(tmp_path / "in", ["a", "b", "c"], rows=80)
    job(tmp_path / "in", store, tiny_checkpoint, target_file_mb=0.01, rows_per_tokenize_batch=32)
    fs, parts = store.fs, store.files(PARTS)
    assert len(parts) >= 4, "enough parts to damage each a different way"
    deleted, copied, unrecorded, truncated = parts[:4]
    fs.rm(join(store.root, PARTS, deleted))  # a part lost
    fs.copy(join(store.root, PARTS, copied), join(store.root, PARTS, "part-copy-of-another.parquet"))
    fs.rm(join(store.root, COMMITS, unrecorded.replace(".parquet", ".json")))  # its record lost, the part kept
    data = fs.cat_file(join(store.root, PARTS, truncated))
    fs.pipe_file(join(store.root, PARTS, truncated), data[: len(data) // 2])

    report = verify_output(store.url, store.storage)  # sees all of it, and raises nothing
    problems = " | ".join(report.problems)
    assert "committed parts are missing" in problems and "without a commit record" in problems
    assert "cannot be read" in problems

    endpoint = ["--endpoint-url", store.storage.endpoint_url] if store.storage.endpoint_url else []
    assert main(["repair", store.url, *endpoint]) == 0
    printed = capsys.readouterr().out
    assert printed.count("repaired ") == 4 and "re-run the job" in printed
    assert store.files(f"{QUARANTINE}/{PARTS}") == sorted(["part-copy-of-another.parquet", unrecorded, truncated])
    job(tmp_path / "in", store, tiny_checkpoint, target_file_mb=0.01, rows_per_tokenize_batch=32)
    assert_exactly_once(store, docs)


@pytest.mark.timeout(300)
def test_an_edit_that_keeps_size_and_mtime_is_caught_by_content_fingerprints(ray_local, tmp_path, tiny_checkpoint):
    local = local_store(tmp_path)
    write_shards(tmp_path / "in", ["a", "b"])
    job(tmp_path / "in", local, tiny_checkpoint, fingerprint="content")
    shard = tmp_path / "in" / "a.jsonl"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[20:24] = b"EDIT"  # same size
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: the store's fingerprint is blind to it
    with pytest.raises(InputChangedError, match="a.jsonl"):
        job(tmp_path / "in", local, tiny_checkpoint, fingerprint="content")
    assert any("changed since they were embedded" in p for p in verify_output(local.url).problems)


def test_verify_of_an_unreachable_store_is_a_line_in_its_report_not_a_traceback():
    report = verify_output("s3://bucket/out", StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1))
    assert not report.ok and len(report.problems) == 1
    assert report.problems[0].startswith("cannot read s3://bucket/out: Could not connect to the endpoint URL")
