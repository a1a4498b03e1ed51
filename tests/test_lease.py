"""The writer lease and the fencing of a lost writer's commits, on every store (local disk, and the S3,
GCS and Azure servers), without Ray.

Each test plays the drivers and workers in this process (a worker of a dead run is a commit written
with its old token); tests/test_concurrency.py runs real jobs against each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import fsspec
import pyarrow as pa
import pytest
from conftest import EVERY_STORE, Store

from pipeline.io.layout import COMMITS, LEASE, PARTS, QUARANTINE, STAGING, atomic_write, join, move, parquet_bytes
from pipeline.io.lease import LeaseHeldError, LeaseLostError, acquire_lease, check_lease, read_lease
from pipeline.io.manifest import CommitRecord, read_state
from pipeline.io.recovery import compact_while_running, recover


def dead_pid() -> int:
    """The pid of a process that has exited: a driver killed on this host."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def commit_part(store: Store, rows: tuple[int, int], token: int, *, publish: bool = True) -> CommitRecord:
    """Write one part of `rows` of a shard the way the sink does, under lease token `token`."""
    url = "file:///in/a.jsonl"
    record = CommitRecord(f"part-{token}-{rows[0]}", rows[1] - rows[0], {url: [rows]}, 0, {}, token)
    data = parquet_bytes(
        pa.table({"id": [str(r) for r in range(*rows)], "shard": [url] * record.rows, "row": list(range(*rows))})
    )
    atomic_write(store.fs, join(store.root, STAGING, f"{record.part}.parquet"), data)
    atomic_write(store.fs, join(store.root, COMMITS, f"{record.part}.json"), record.to_json())
    if publish:
        move(
            store.fs,
            join(store.root, STAGING, f"{record.part}.parquet"),
            join(store.root, PARTS, f"{record.part}.parquet"),
        )
    return record


@pytest.mark.parametrize("store", EVERY_STORE, indirect=True)
def test_a_second_driver_is_refused_with_the_holder_named_and_a_waiting_one_gets_the_lease(store):
    with acquire_lease(store.fs, store.root) as first:
        with pytest.raises(LeaseHeldError, match=rf"being written by run {first.holder.run_id} \(pid \d+ on "):
            acquire_lease(store.fs, store.root)
        state = read_lease(store.fs, store.root)
        assert state.live and state.holder == first.holder

        def release_soon():
            time.sleep(1.0)
            first.__exit__(None, None, None)

        threading.Thread(target=release_soon).start()
        started = time.monotonic()
        with acquire_lease(store.fs, store.root, wait_s=30) as second:
            assert second.token == first.token + 1 and time.monotonic() - started >= 0.9
        first._stop.set()  # the with-block's own exit below finds it already released
    assert read_lease(store.fs, store.root).released


@pytest.mark.parametrize("store", EVERY_STORE, indirect=True)
def test_two_drivers_racing_for_a_free_output_get_one_lease_between_them(store):
    outcomes, barrier = [], threading.Barrier(4)

    def race():
        barrier.wait()
        try:
            outcomes.append(acquire_lease(store.fs, store.root))
        except LeaseHeldError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    leases = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(leases) == 1 and len(outcomes) == 4 and leases[0].token == 1
    assert store.files(LEASE) == ["000000000001.json"]


@pytest.mark.parametrize("store", EVERY_STORE, indirect=True)
def test_a_dead_drivers_lease_is_taken_over_and_its_late_commit_is_fenced_and_quarantined(store, monkeypatch):
    import pipeline.io.compaction
    import pipeline.io.lease

    monkeypatch.setattr(pipeline.io.lease, "TAKEOVER_GRACE_S", 0.0)
    old = acquire_lease(store.fs, store.root)  # never released: its driver dies
    kept = commit_part(store, (0, 10), old.token)
    # The driver was on this host and is gone: its lease goes at once, without waiting for the TTL.
    holder = json.loads(store.fs.cat_file(join(store.root, LEASE, "000000000001.json")))
    atomic_write(
        store.fs, join(store.root, LEASE, "000000000001.json"), json.dumps({**holder, "pid": dead_pid()}).encode()
    )
    time.sleep(1.1)  # S3 stamps times to the second: the takeover comes after the last good commit
    new = acquire_lease(store.fs, store.root)
    assert new.token == 2
    with pytest.raises(LeaseLostError, match="taken over by token 2"):
        check_lease(store.fs, store.root, old.token)  # what the dead run's sink checks before each commit
    time.sleep(1.1)
    late = commit_part(store, (10, 20), old.token)  # a worker of the dead run that committed anyway
    state = read_state(store.fs, store.root)
    assert [c.part for c in state.commits] == [kept.part] and [c.part for c in state.fenced] == [late.part]
    # The new holder's compaction while its graph runs folds the kept commit and leaves the late one.
    monkeypatch.setattr(pipeline.io.compaction, "COMPACT_AFTER_RECORDS", 1)
    assert compact_while_running(store.fs, store.root, new.token)
    assert store.files(COMMITS) == [f"{late.part}.json"]
    state = read_state(store.fs, store.root)
    assert [c.part for c in state.commits] == [kept.part] and [c.part for c in state.fenced] == [late.part]
    recover(store.fs, store.root, new.token)  # what the new holder does before and after its graph
    assert store.files(PARTS) == [f"{kept.part}.parquet"] and store.files(COMMITS) == []
    assert f"{late.part}.parquet" in store.files(f"{QUARANTINE}/{PARTS}")
    assert read_state(store.fs, store.root).committed_ranges() == {"file:///in/a.jsonl": [(0, 10)]}


@pytest.mark.parametrize("store", EVERY_STORE, indirect=True)
def test_recovery_beside_a_live_writer_never_loses_a_committed_part(store):
    from pipeline.io.schemas import stream_schema
    from pipeline.io.sink import CommittedParquetSink

    schema = stream_schema(2, "float32")
    sink = CommittedParquetSink(store.url, store.storage, 0, rows_per_part=1)

    def block(start: int) -> pa.Table:
        row = {"id": f"d{start}", "embedding": [1.0, 2.0], "n_tokens": 3, "truncated": False}
        row |= {"shard": "file:///in/a.jsonl", "row": start, "error": None, "error_message": None, "excerpt": None}
        return pa.Table.from_pylist([row], schema=schema)

    stop = threading.Event()
    errors = []

    def recover_in_a_loop():
        while not stop.is_set():
            try:
                recover(store.fs, store.root)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    looper = threading.Thread(target=recover_in_a_loop)
    looper.start()
    try:
        for start in range(30):
            sink.write([block(start)], ctx=None)
    finally:
        stop.set()
        looper.join()
    assert errors == []
    state = recover(store.fs, store.root)
    assert state.committed_ranges() == {"file:///in/a.jsonl": [(0, 30)]}
    assert all(not state.unpublished(c) for c in state.commits), "every committed part is published"
    assert len(store.files(PARTS)) == 30 and store.files(STAGING) == []


def test_a_store_without_an_exclusive_create_is_refused_unless_told_to_go_without():
    from pipeline.config import load_config
    from pipeline.errors import SettingsError
    from pipeline.io.lease import writer_lease

    fs = fsspec.filesystem("memory")  # no exclusive create: stands for a store the lease does not know
    config = load_config(None, {"input": "x", "output": "memory://out"})
    with pytest.raises(SettingsError, match="--no-lease"), writer_lease(config, fs, "/out"):
        pass
    with writer_lease(config.model_copy(update={"lease": False}), fs, "/out") as token:
        assert token == 0  # commits then carry no fencing token
