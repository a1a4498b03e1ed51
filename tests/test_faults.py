"""Crashes at any point lose nothing and duplicate nothing: kill, re-run, verify.

Each run is a real `neobert-pipeline embed` process with its own local Ray, killed with SIGKILL at
a named failpoint (pipeline/faults.py); the whole process group is then killed as a machine death
would, and a second run must finish the job with `verify` passing.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_process import RUN_TIMEOUT_S, embed_process
from conftest import after_first_commit, start_test_ray
from corpus import jsonl_bytes, make_docs

from pipeline.io.layout import COMMITS, PARTS
from pipeline.verify import verify_output


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-corpus")
    docs = {}
    for shard in range(3):
        part = make_docs(200, seed=40 + shard, prefix=f"f{shard}")
        docs |= {d["id"]: d["text"] for d in part}
        (folder / f"part-{shard}.jsonl.gz").write_bytes(jsonl_bytes(part, "gz"))
    return folder, docs


def assert_complete_and_correct(output_dir, docs, tiny_encoder):
    report = verify_output(str(output_dir))
    assert report.ok, report.problems
    table = pq.read_table(output_dir / PARTS)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(docs), "every document exactly once"
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, tiny_encoder.encode([docs[i] for i in ids]), atol=1e-5)


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
# All four run with `make test-slow`, keeping `make test` under its 15 minutes. What `make test` keeps
# of them: the kill after a commit is tests/test_storage_matrix.py's, on every store; both commit steps
# are crashed in-process by tests/test_stages.py; the kills before a commit are among test_sweep's.
@pytest.mark.slow
@pytest.mark.parametrize("point", ["read", "embed", "sink.after_stage", "sink.after_commit"])
def test_driver_killed_at_any_point_then_rerun_gives_the_uninterrupted_output(
    point, corpus, tiny_checkpoint, tiny_encoder, tmp_path
):
    input_dir, docs = corpus
    out = tmp_path / "out"
    assert embed_process(input_dir, out, tiny_checkpoint, failpoint=point, once=tmp_path / "fired") == -signal.SIGKILL
    assert (tmp_path / "fired").exists()
    if point == "sink.after_commit":
        assert list((out / COMMITS).iterdir()), "the crash came after a commit record"
    if point.startswith("sink."):
        assert not verify_output(str(out)).ok  # an interrupted output does not pass for a finished one
    assert embed_process(input_dir, out, tiny_checkpoint) == 0
    assert_complete_and_correct(out, docs, tiny_encoder)


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_an_embedding_actor_killed_mid_job_is_replaced_and_the_job_finishes(
    corpus, tiny_checkpoint, tiny_encoder, tmp_path
):
    input_dir, docs = corpus
    out = tmp_path / "out"
    code = embed_process(input_dir, out, tiny_checkpoint, failpoint="embed", target="worker", once=tmp_path / "fired")
    assert (tmp_path / "fired").exists() and code == 0
    assert_complete_and_correct(out, docs, tiny_encoder)


@pytest.fixture()
def flaky_s3(s3, s3_endpoint):
    """The test S3 server behind a proxy that the test can take down and bring back."""
    from tcp_proxy import TcpProxy

    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    yield s3, proxy
    proxy.stop()


def _write_to_s3_with_an_outage(flaky_s3, corpus, tiny_checkpoint, outage_s: float | None, max_attempts: int):
    """Run the job into S3 through the proxy; take the endpoint down after the first commit."""
    from pipeline.config import load_config
    from pipeline.job import run_embedding_job

    s3, proxy = flaky_s3
    input_dir, _ = corpus
    config = load_config(
        None,
        {
            "input": str(input_dir),
            "output": f"s3://{s3.bucket}/out",
            "model": str(tiny_checkpoint),
            "id_field": "id",
            "tokens_per_batch": 512,
            "rows_per_tokenize_batch": 64,
            "target_file_mb": 0.03,
            "storage": {"endpoint_url": proxy.url, "max_attempts": max_attempts},
        },
    )

    def outage():
        proxy.stop()
        if outage_s is not None:
            time.sleep(outage_s)
            proxy.start()

    thread, went_down = after_first_commit(s3, f"{s3.bucket}/out/{COMMITS}", outage)
    try:
        return run_embedding_job(config), config
    finally:
        thread.join(timeout=30)
        assert went_down.is_set(), "the endpoint went down mid-write"


@pytest.mark.timeout(300)
def test_s3_endpoint_down_for_seconds_mid_write_is_ridden_out_by_retries(
    ray_local, flaky_s3, corpus, tiny_checkpoint, tiny_encoder
):
    s3, proxy = flaky_s3
    _, docs = corpus
    summary, config = _write_to_s3_with_an_outage(flaky_s3, corpus, tiny_checkpoint, outage_s=3.0, max_attempts=10)
    assert summary.rows_committed == len(docs)
    report = verify_output(config.output, config.storage)
    assert report.ok, report.problems


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_endpoint_that_stays_down_fails_cleanly_and_a_rerun_finishes(
    ray_local, flaky_s3, corpus, tiny_checkpoint, tiny_encoder, tmp_path_factory
):
    s3, proxy = flaky_s3
    _, docs = corpus
    from botocore.exceptions import EndpointConnectionError

    from pipeline.cli import _user_error
    from pipeline.errors import StorageUnreachableError

    with pytest.raises(EndpointConnectionError) as failure:
        _write_to_s3_with_an_outage(flaky_s3, corpus, tiny_checkpoint, outage_s=None, max_attempts=2)
    reported = _user_error(failure.value)  # what the CLI prints: one line, and exit 7
    assert isinstance(reported, StorageUnreachableError) and reported.exit_code == 7
    assert f'Could not connect to the endpoint URL: "{proxy.url}' in str(reported) and "re-run" in str(reported)
    proxy.start()
    # A re-run is a new driver: the failed one's Ray goes with it, and with it the embedding actors
    # Ray Data leaves running (ray-project/ray#24948; see test_a_failed_job_stops_the_local_ray_it_started).
    ray_local.shutdown()
    start_test_ray(tmp_path_factory)
    from pipeline.config import load_config
    from pipeline.job import run_embedding_job

    config = load_config(
        None,
        {
            "input": str(corpus[0]),
            "output": f"s3://{s3.bucket}/out",
            "model": str(tiny_checkpoint),
            "id_field": "id",
            "storage": {"endpoint_url": proxy.url},
        },
    )
    # Nothing half-committed: every commit record names a part that holds exactly its rows.
    interrupted = verify_output(config.output, config.storage)
    assert not any("does not hold" in p or "without a commit" in p for p in interrupted.problems)
    run_embedding_job(config)
    report = verify_output(config.output, config.storage)
    assert report.ok, report.problems
    assert pq.read_table(s3.find(f"{s3.bucket}/out/{PARTS}"), filesystem=s3).num_rows == len(docs)


@pytest.mark.timeout(120)
def test_a_failed_job_stops_the_local_ray_it_started(tmp_path, tiny_checkpoint):
    import ray

    from pipeline.config import load_config
    from pipeline.errors import BadInputError
    from pipeline.job import run_embedding_job

    ray.shutdown()  # this job starts Ray itself, as a library user's script does
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(40, seed=3, prefix="s")) + b'{"text": "cut\n')
    config = load_config(
        None,
        {
            "input": str(tmp_path / "in"),
            "output": str(tmp_path / "out"),
            "model": str(tiny_checkpoint),
            "strict": True,
            "num_cpus": 2,
        },
    )
    with pytest.raises(BadInputError) as failure:
        run_embedding_job(config)
    assert "a.jsonl row 40: not valid JSON" in str(failure.value)
    assert not ray.is_initialized(), "its actors would keep their CPUs and GPUs from a re-run in this process"
