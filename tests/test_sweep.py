"""A randomized sweep of kill -9s, with a second driver now and then: `make test-slow` (not in `make test`),
on every store (local disk, and the S3, GCS and Azure servers): each one's exclusive create is what keeps
the second driver out.

Each trial starts a real `neobert-pipeline embed`, kills its whole process group at a random moment
(as a machine dying would), starts a second driver at a random moment in a third of the trials, then
runs the job to its end. Every trial must end with verify passing, every document exactly once, and
vectors equal to an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import EVERY_STORE
from corpus import jsonl_bytes, make_docs

from pipeline.config import StorageConfig
from pipeline.io.layout import PARTS
from pipeline.verify import verify_output

TRIALS_PER_STORE = 15
RUN_TIMEOUT_S = 240


def start(input_dir, output: str, model, storage: StorageConfig, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    command = [sys.executable, "-m", "pipeline.cli", "embed", str(input_dir), output, "--model", str(model)]
    command += ["--id-field", "id", "--num-cpus", "2", "--tokens-per-batch", "512"]
    command += ["--rows-per-tokenize-batch", "64", "--target-file-mb", "0.03", "--quiet", *extra]
    if storage.endpoint_url:
        command += ["--endpoint-url", storage.endpoint_url]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def finish(process: subprocess.Popen) -> int:
    try:
        process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        kill(process)
    return process.returncode


@pytest.mark.slow
@pytest.mark.timeout(TRIALS_PER_STORE * 3 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("store", EVERY_STORE, indirect=True)
def test_random_kills_and_second_drivers_never_lose_or_duplicate_a_row(store, tmp_path, tiny_checkpoint, tiny_encoder):
    rng = random.Random(20261127)
    (tmp_path / "in").mkdir()
    docs = {}
    for shard in range(3):
        part = make_docs(200, seed=70 + shard, prefix=f"w{shard}")
        docs |= {d["id"]: d["text"] for d in part}
        (tmp_path / "in" / f"part-{shard}.jsonl.gz").write_bytes(jsonl_bytes(part, "gz"))
    ids = sorted(docs)
    expected = dict(zip(ids, tiny_encoder.encode([docs[i] for i in ids]), strict=True))
    killed_mid_run = 0
    for trial in range(TRIALS_PER_STORE):
        output = f"{store.url}/trial-{trial}"
        kill_at, second_at = rng.uniform(2.0, 12.0), rng.uniform(0.0, 14.0) if trial % 3 == 0 else None
        first = start(tmp_path / "in", output, tiny_checkpoint, store.storage)
        second, started = None, time.monotonic()
        while time.monotonic() - started < max(kill_at, second_at or 0.0):
            elapsed = time.monotonic() - started
            if second_at is not None and second is None and elapsed >= second_at:
                second = start(tmp_path / "in", output, tiny_checkpoint, store.storage, "--wait-for-lease", "300")
            if elapsed >= kill_at and first.poll() is None:
                killed_mid_run += 1
                kill(first)
            time.sleep(0.05)
        if first.poll() is None:
            killed_mid_run += 1
            kill(first)
        if second is not None:
            assert finish(second) == 0, f"trial {trial}: the second driver failed"
        assert finish(start(tmp_path / "in", output, tiny_checkpoint, store.storage)) == 0, f"trial {trial}"
        report = verify_output(output, store.storage)
        assert report.ok, (trial, report.problems)
        table = pq.read_table(f"{store.root}/trial-{trial}/{PARTS}", filesystem=store.fs)
        got = table.column("id").to_pylist()
        assert sorted(got) == ids, f"trial {trial}: every document exactly once"
        vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(vectors, np.stack([expected[i] for i in got]), atol=1e-5)
    print(f"{store.url}: {TRIALS_PER_STORE} trials, {killed_mid_run} killed mid-run")
    assert killed_mid_run >= TRIALS_PER_STORE // 2
