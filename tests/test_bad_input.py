"""Dirty corpora: every bad row ends in errors/, every bad file in a read record, each with its reason."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpus import jsonl_bytes, make_docs, parquet_bytes

from pipeline.cli import main
from pipeline.config import StorageConfig
from pipeline.errors import EXIT_OK, BadInputError, IncompleteRunError
from pipeline.io.layout import ERRORS, PARTS, READS
from pipeline.io.manifest import read_state
from pipeline.io.storage import filesystem_for
from pipeline.status import output_status
from pipeline.verify import verify_output

# Each planted bad row: (raw JSONL line, expected reason code).
BAD_LINES = [
    (b'{"id": "b-json", "text": "unterminated', "malformed_json"),
    (b'{"id": "b-notext", "body": "the text is under another key"}', "missing_text"),
    (b'{"id": "b-null", "text": null}', "null_text"),
    (b'{"id": "b-number", "text": 42}', "non_string_text"),
    (b'{"id": "b-empty", "text": ""}', "empty_text"),
    (b'{"id": "b-space", "text": "  \\t \\n "}', "empty_text"),
    (b'{"id": "b-utf8", "text": "caf\xe9 latin-1 bytes"}', "invalid_utf8"),
    (b'{"id": "b-nul", "text": "binary\\u0000inside"}', "nul_bytes"),
    (b'{"text": "a document without its id"}', "missing_id"),
    (b'["an", "array"]', "not_an_object"),
    (b"", "empty_line"),
]


def write_dirty_corpus(folder) -> dict[str, str]:
    """Every case of the catalogue beside good rows; returns the good documents by id."""
    folder.mkdir()
    good = {}

    docs = make_docs(12, seed=1, prefix="mixed")
    good |= {d["id"]: d["text"] for d in docs}
    lines = [json.dumps(d).encode() for d in docs]
    for i, (line, _) in enumerate(BAD_LINES):
        lines.insert(1 + 2 * i, line)  # bad rows between good ones
    (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    huge = {"id": "huge", "text": "ten megabytes of words " * (10 * 2**20 // 23)}
    small = make_docs(2, seed=2, prefix="beside-huge")
    (folder / "huge.jsonl").write_bytes(jsonl_bytes([small[0], huge, small[1]]))
    good |= {d["id"]: d["text"] for d in [*small, huge]}

    cut = gzip.compress(jsonl_bytes(make_docs(400, seed=3, prefix="cut")))
    (folder / "truncated.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    (folder / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "binary.jsonl").write_bytes(bytes(range(256)) * 64)

    wide = [{**d, "lang": "en", "score": 0.5} for d in make_docs(5, seed=4, prefix="wide")]
    narrow = make_docs(5, seed=5, prefix="narrow")
    (folder / "wide.parquet").write_bytes(parquet_bytes(wide))
    (folder / "narrow.parquet").write_bytes(parquet_bytes(narrow))
    (folder / "no-text-column.parquet").write_bytes(
        parquet_bytes([{"id": d["id"], "body": d["text"]} for d in make_docs(3, seed=6, prefix="body")])
    )
    good |= {d["id"]: d["text"] for d in [*wide, *narrow]}
    return good


EXPECTED_COUNTS = {
    "empty_line": 1,
    "empty_text": 2,
    "file:binary_file": 1,
    "file:corrupt_compression": 1,
    "file:missing_column": 1,
    "file:unreadable_parquet": 1,
    "invalid_utf8": 1,
    "malformed_json": 1,
    "missing_id": 1,
    "missing_text": 1,
    "non_string_text": 1,
    "not_an_object": 1,
    "nul_bytes": 1,
    "null_text": 1,
}


@pytest.mark.timeout(240)
def test_a_corpus_with_every_kind_of_bad_input_runs_to_completion(ray_local, tmp_path, tiny_checkpoint, capsys):
    good = write_dirty_corpus(tmp_path / "in")
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "in"), str(out), "--model", str(tiny_checkpoint), "--id-field", "id"]
    args += ["--max-error-rate", "0.5"]  # 11 of 69 rows are bad on purpose
    code = main(args)
    captured = capsys.readouterr()
    assert code == IncompleteRunError.exit_code  # finished, but some files could not be read to their end
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert "dead letters   11 rows" in captured.out and "failed files   4" in captured.out

    embedded = pq.read_table(out / PARTS)
    cut_rows = [i for i in embedded.column("id").to_pylist() if i.startswith("cut-")]
    assert sorted(set(embedded.column("id").to_pylist()) - set(cut_rows)) == sorted(good)
    huge = embedded.filter(np.array(embedded.column("id").to_pylist()) == "huge")
    assert huge.column("truncated").to_pylist() == [True] and huge.column("n_tokens").to_pylist() == [512]

    errors = pq.read_table(out / ERRORS).to_pylist()
    by_row = {(e["shard"].rsplit("/", 1)[-1], e["row"]): e for e in errors}
    for i, (line, reason) in enumerate(BAD_LINES):
        error = by_row[("mixed.jsonl", 1 + 2 * i)]
        assert error["reason"] == reason, error
        assert error["message"] and error["excerpt"] == line.decode("utf-8", "backslashreplace")[:200]
    assert by_row[("mixed.jsonl", 1)]["id"] is None  # unknown: the line did not parse
    assert by_row[("mixed.jsonl", 3)]["id"] == "b-notext"

    records = [json.loads(p.read_text())["failed"] for p in (out / READS).iterdir()]
    failures = {f["url"].rsplit("/", 1)[-1]: f for record in records for f in record}
    assert {name: f["reason"] for name, f in failures.items()} == {
        "truncated.jsonl.gz": "corrupt_compression",
        "corrupt.parquet": "unreadable_parquet",
        "binary.jsonl": "binary_file",
        "no-text-column.parquet": "missing_column",
    }
    assert failures["truncated.jsonl.gz"]["rows_read"] == len(cut_rows) > 0
    assert "Columns: ['id', 'body']" in failures["no-text-column.parquet"]["message"]

    report = verify_output(str(out))
    assert report.ok, report.problems
    (failed_files,) = [fact for fact in report.facts if "files failed part way" in fact]
    assert failed_files.startswith("4 files failed part way: ") and "truncated.jsonl.gz (" in failed_files
    fs, root = filesystem_for(str(out), StorageConfig())
    assert read_state(fs, root).error_counts() == EXPECTED_COUNTS
    status = output_status(str(out))
    rows = len(good) + len(cut_rows) + len(BAD_LINES)
    assert status["rows_committed"] == status["rows_in_shards_read"] == rows
    assert status["rows_dead_lettered"] == len(BAD_LINES) and status["shards_failed_part_way"] == 4
    assert status["dead_letters_by_reason"] == EXPECTED_COUNTS

    # A re-run retries only the failed files: nothing is embedded or dead-lettered twice.
    assert main(args) == IncompleteRunError.exit_code
    assert verify_output(str(out)).ok
    assert pq.read_table(out / PARTS).num_rows == embedded.num_rows
    assert pq.read_table(out / ERRORS).num_rows == len(errors)


def test_strict_mode_stops_at_the_first_bad_row_with_its_location(ray_local, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "in").mkdir()
    lines = jsonl_bytes(make_docs(4, seed=5, prefix="m")) + b'{"text": "unterminated\n'
    (tmp_path / "in" / "broken.jsonl").write_bytes(lines)
    args = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--strict"]
    assert main(args) == BadInputError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "broken.jsonl row 4: not valid JSON" in ours[0]


def test_max_error_rate_fails_the_run_with_the_counts(ray_local, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "in").mkdir()
    docs = make_docs(18, seed=7, prefix="r")
    body = jsonl_bytes(docs) + b'{"text": ""}\n{"text": null}\n'
    (tmp_path / "in" / "a.jsonl").write_bytes(body)  # 2 bad rows of 20: a 10% error rate
    args = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main([*args, "--max-error-rate", "0.05"]) == IncompleteRunError.exit_code
    captured = capsys.readouterr()
    assert "10.00% of 20 rows dead-lettered as bad input, more than --max-error-rate 5.00%" in captured.err
    assert "(empty_text 1, null_text 1)" in captured.err
    assert not verify_output(str(tmp_path / "out")).ok  # held to the ceiling its run was given
    assert main([*args, "--max-error-rate", "0.10"]) == EXIT_OK  # the same output, now within the limit
    assert verify_output(str(tmp_path / "out")).ok


def test_an_s3_object_that_answers_403_is_recorded_and_the_rest_embedded(
    ray_local, s3, s3_endpoint, tiny_checkpoint, tmp_path
):
    import boto3

    from pipeline.config import load_config
    from pipeline.job import run_embedding_job
    from pipeline.summary import RunIncompleteError

    s3.pipe(f"{s3.bucket}/in/open.jsonl", jsonl_bytes(make_docs(6, seed=8, prefix="open")))
    s3.pipe(f"{s3.bucket}/in/secret.jsonl", jsonl_bytes(make_docs(6, seed=9, prefix="secret")))
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{s3.bucket}/in/secret.jsonl",
            }
        ],
    }
    boto3.client("s3", endpoint_url=s3_endpoint).put_bucket_policy(Bucket=s3.bucket, Policy=json.dumps(deny))
    config = load_config(
        None,
        {
            "input": f"s3://{s3.bucket}/in/",
            "output": str(tmp_path / "out"),
            "model": str(tiny_checkpoint),
            "storage": {"endpoint_url": s3_endpoint},
        },
    )
    with pytest.raises(RunIncompleteError, match="1 input files could not be read to their end") as failure:
        run_embedding_job(config)
    summary = failure.value.summary
    assert summary.rows_committed == 6
    assert summary.error_counts == {"file:permission_denied": 1}
    assert summary.failed_files == [f"s3://{s3.bucket}/in/secret.jsonl"]

    # Gone from the listing (without --refresh it stays the current version): nothing is left to do,
    # and the re-run still names the file that was never read to its end.
    s3.rm(f"{s3.bucket}/in/secret.jsonl")
    with pytest.raises(RunIncompleteError, match="1 input files could not be read to their end") as again:
        run_embedding_job(config)
    assert again.value.summary.already_complete and again.value.summary.failed_files == summary.failed_files


@pytest.mark.parametrize("policy", ["keep", "flag", "reject"])
def test_duplicate_ids_are_kept_flagged_or_rejected(ray_local, tmp_path, tiny_checkpoint, policy):
    from pipeline.config import load_config
    from pipeline.io.layout import DUPLICATES
    from pipeline.job import run_embedding_job

    (tmp_path / "in").mkdir()
    first = [{"id": "x1", "text": "one"}, {"id": "same", "text": "the first same"}]
    second = [{"id": "same", "text": "a later same"}, {"id": "x2", "text": "two"}, {"id": "same", "text": "again"}]
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(first))
    (tmp_path / "in" / "b.jsonl").write_bytes(jsonl_bytes(second))
    out = tmp_path / "out"
    settings = {"input": str(tmp_path / "in"), "output": str(out), "model": str(tiny_checkpoint)}
    summary = run_embedding_job(load_config(None, {**settings, "id_field": "id", "duplicate_ids": policy}))

    here = verify_output(str(out))
    assert here.ok and any("ids repeat in the input and were kept" in f for f in here.facts) == (policy != "reject")
    if policy == "flag":  # the way a big output is checked, on Ray, finds the same
        on_ray = verify_output(str(out), local_rows=0)
        assert (here.problems, here.facts) == (on_ray.problems, on_ray.facts)
    embedded = pq.read_table(out / PARTS)
    if policy == "keep":
        assert embedded.num_rows == 5 and not (out / DUPLICATES).exists()
        return
    repeats = pq.read_table(out / DUPLICATES).sort_by([("shard", "ascending"), ("row", "ascending")]).to_pylist()
    assert [
        (r["shard"].rsplit("/", 1)[-1], r["row"], r["first_shard"].rsplit("/", 1)[-1], r["first_row"]) for r in repeats
    ] == [
        ("b.jsonl", 0, "a.jsonl", 1),
        ("b.jsonl", 2, "a.jsonl", 1),
    ]
    if policy == "flag":
        assert embedded.num_rows == 5 and summary.error_counts == {}
        return
    assert summary.error_counts == {"duplicate_id": 2}
    from pipeline.terminal import summary_lines

    # The printed share counts every dead letter; only the ceiling leaves out rows rejected on purpose.
    assert any(line.startswith("dead letters   2 rows (40.00%)") for line in summary_lines(summary))
    kept = embedded.to_pylist()
    assert sorted(r["id"] for r in kept) == ["same", "x1", "x2"]
    assert [r["row"] for r in kept if r["id"] == "same"] == [1] and all(
        "a.jsonl" in r["shard"] for r in kept if r["id"] == "same"
    )
    errors = pq.read_table(out / ERRORS).to_pylist()
    assert {e["row"] for e in errors} == {0, 2} and all(
        "already seen at" in e["message"] and "a.jsonl row 1" in e["message"] for e in errors
    )


def test_a_shard_that_vanished_after_listing_is_reported_once_with_its_rows_read(tmp_path):
    from pipeline.io.readers import read_shard
    from pipeline.io.shards import discover_shards

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "gone.jsonl").write_bytes(jsonl_bytes(make_docs(3, seed=12, prefix="g")))
    fs, path = filesystem_for(str(tmp_path / "in"), StorageConfig())
    (shard,) = discover_shards(fs, path)
    (tmp_path / "in" / "gone.jsonl").unlink()
    failures, ends = [], []
    tables = list(
        read_shard(
            shard, "text", None, StorageConfig(), on_end=ends.append, on_file_error=lambda *a: failures.append(a)
        )
    )
    assert tables == [] and ends == []
    assert [(rows, problem.reason) for rows, problem in failures] == [(0, "file_vanished")]


def test_a_corrupt_parquet_page_is_a_file_failure_but_an_unreachable_endpoint_is_not(tmp_path):
    from pipeline.io.readers import read_shard
    from pipeline.io.shards import Shard, discover_shards

    data = bytearray(parquet_bytes(make_docs(200, seed=13, prefix="p")))
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # a page in the middle, footer intact
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pages.parquet").write_bytes(bytes(data))
    fs, path = filesystem_for(str(tmp_path / "in"), StorageConfig())
    (shard,) = discover_shards(fs, path)
    failures = []
    list(read_shard(shard, "text", None, StorageConfig(), on_file_error=lambda *a: failures.append(a)))
    assert [problem.reason for _, problem in failures] == ["unreadable_parquet"]

    # Nothing listens on this port: the job must stop (and be resumed later), not record the file.
    unreachable = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    remote = Shard("s3://bucket/a.jsonl", "a.jsonl", "jsonl", 10, "size=10")
    from botocore.exceptions import EndpointConnectionError

    with pytest.raises(EndpointConnectionError):
        list(read_shard(remote, "text", None, unreachable, on_file_error=lambda *a: failures.append(a)))
    assert len(failures) == 1, "an outage must stop the job, not be recorded as a bad file"
