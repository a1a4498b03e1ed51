"""The embedding job end to end on local Ray: real shards in, Parquet out, one row per document."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import jsonl_bytes, make_docs, parquet_bytes

from pipeline.cli import main
from pipeline.config import StorageConfig, load_config
from pipeline.errors import EXIT_OK, ModelError, NoInputError, OutputConflictError, SettingsError
from pipeline.io.generations import recorded_inputs
from pipeline.io.layout import PARTS, RUN_RECORD, urls_of
from pipeline.io.run_record import MANIFEST_VERSION, SettingsMismatchError
from pipeline.io.storage import filesystem_for
from pipeline.job import run_embedding_job


def run(input_url: str, output_url: str, model, **settings):
    config = load_config(None, {"input": input_url, "output": output_url, "model": str(model), **settings})
    return run_embedding_job(config)


def read_output(folder):
    return pq.read_table(folder / PARTS)


def assert_matches_encoder(table, docs_by_id: dict[str, str], encoder, **encode_options):
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(docs_by_id), "every input document exactly once"
    expected = encoder.encode([docs_by_id[i] for i in ids], **encode_options)
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    tokenized = encoder.tokenize([docs_by_id[i] for i in ids])
    assert table.column("n_tokens").to_pylist() == tokenized.lengths.tolist()
    assert table.column("truncated").to_pylist() == tokenized.truncated.tolist()


def test_jsonl_gz_shards_on_s3_embed_into_parquet_on_s3(ray_local, s3, s3_endpoint, tiny_checkpoint, tiny_encoder):
    shards = {f"in/part-{i}.jsonl.gz": make_docs(120, seed=i, prefix=f"s{i}") for i in range(3)}
    for key, docs in shards.items():
        s3.pipe(f"{s3.bucket}/{key}", jsonl_bytes(docs, "gz"))
    summary = run(
        f"s3://{s3.bucket}/in/",
        f"s3://{s3.bucket}/out",
        tiny_checkpoint,
        id_field="id",
        storage={"endpoint_url": s3_endpoint},
        tokens_per_batch=512,
    )
    table = pq.read_table(s3.find(f"{s3.bucket}/out/{PARTS}"), filesystem=s3)
    docs = {d["id"]: d["text"] for part in shards.values() for d in part}
    assert_matches_encoder(table, docs, tiny_encoder)
    assert summary.documents == summary.rows_committed == 360
    # Many 512-token packs: the summary tells start-up (to the first pack) from the rate after it.
    assert 0 < summary.startup_s < summary.wall_s
    assert summary.steady_tokens_per_s > summary.tokens_per_s
    assert not s3.exists(f"{s3.bucket}/out/_staging") or not s3.ls(f"{s3.bucket}/out/_staging")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[64]"
    # shard and row point back at the exact input line
    for row in table.slice(0, 20).to_pylist():
        key = row["shard"].removeprefix(f"s3://{s3.bucket}/")
        assert shards[key][row["row"]]["id"] == row["id"]
    record = json.loads(s3.cat(f"{s3.bucket}/out/{RUN_RECORD}"))
    assert record["settings"]["model_weights_sha256"] == tiny_encoder.facts.weights_sha256
    assert record["settings"]["pooling"] == "cls" and record["settings"]["compute_dtype"] == "float32"
    assert record["manifest_version"] == MANIFEST_VERSION and record["generations"][0]["shards"] == len(shards)
    fs, root = filesystem_for(f"s3://{s3.bucket}/out", StorageConfig(endpoint_url=s3_endpoint))
    inputs = recorded_inputs(fs, root, record)
    assert urls_of(inputs.column("url")) == [f"s3://{s3.bucket}/{k}" for k in sorted(shards)]
    assert all(p.startswith("size=") and "etag=" in p for p in inputs.column("fingerprint").to_pylist())


def test_parquet_input_without_ids_gets_stable_ids_and_loads_with_datasets(
    ray_local, tmp_path, tiny_checkpoint, tiny_encoder
):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    first, second = make_docs(50, seed=10, prefix="a"), make_docs(70, seed=11, prefix="b")
    (tmp_path / "in" / "one.parquet").write_bytes(parquet_bytes(first))
    (tmp_path / "in" / "sub" / "two.parquet").write_bytes(parquet_bytes(second))
    run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, pooling="mean", normalize=True)

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / PARTS / "*.parquet"), split="train")
    assert loaded.num_rows == 120
    expected_ids = {f"one.parquet#{i}" for i in range(50)} | {f"sub/two.parquet#{i}" for i in range(70)}
    assert set(loaded["id"]) == expected_ids
    texts = {f"one.parquet#{i}": d["text"] for i, d in enumerate(first)}
    texts |= {f"sub/two.parquet#{i}": d["text"] for i, d in enumerate(second)}
    table = read_output(tmp_path / "out")
    assert_matches_encoder(table, texts, tiny_encoder, pooling="mean", normalize=True)


def test_text_and_zstd_jsonl_shards_with_long_documents_truncated(ray_local, tmp_path, tiny_checkpoint):
    from pipeline import Encoder

    (tmp_path / "in").mkdir()
    long_docs = make_docs(5, seed=3, prefix="long", max_words=400)
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(jsonl_bytes(long_docs, "zst"))
    lines = [d["text"] for d in make_docs(30, seed=4, prefix="t")]
    (tmp_path / "in" / "b.txt").write_text("\n".join(lines) + "\n")
    run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, max_length=128, output_dtype="float16")
    table = read_output(tmp_path / "out")
    assert table.num_rows == 35
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[64]"
    encoder = Encoder.from_pretrained(str(tiny_checkpoint), device="cpu", max_length=128)
    texts = {f"a.jsonl.zst#{i}": d["text"] for i, d in enumerate(long_docs)} | {
        f"b.txt#{i}": t for i, t in enumerate(lines)
    }
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(texts)
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(got, encoder.encode([texts[i] for i in ids]), atol=2e-3, rtol=2e-3)
    truncated = dict(zip(ids, table.column("truncated").to_pylist(), strict=True))
    assert all(truncated[f"a.jsonl.zst#{i}"] for i in range(5)) and not any(truncated[f"b.txt#{i}"] for i in range(30))


def test_model_loads_from_an_s3_url(s3, s3_endpoint, tiny_checkpoint, tiny_encoder, tmp_path):
    from pipeline import Encoder

    for name in ("config.json", "model.safetensors", "vocab.txt"):
        s3.put(str(tiny_checkpoint / name), f"{s3.bucket}/models/tiny/{name}")
    encoder = Encoder.from_pretrained(
        f"s3://{s3.bucket}/models/tiny",
        device="cpu",
        cache_dir=str(tmp_path),
        storage_options={"endpoint_url": s3_endpoint},
    )
    assert encoder.facts.weights_sha256 == tiny_encoder.facts.weights_sha256
    texts = ["object storage", "model weights from a URL"]
    np.testing.assert_array_equal(encoder.encode(texts), tiny_encoder.encode(texts))


def test_rerunning_a_finished_job_embeds_nothing(ray_local, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(5, seed=1, prefix="x")))
    first = run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint)
    before = sorted(p.name for p in (tmp_path / "out" / PARTS).iterdir())
    again = run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint)
    assert first.rows_committed == again.rows_committed == 5
    assert again.already_complete and again.documents == 0
    assert sorted(p.name for p in (tmp_path / "out" / PARTS).iterdir()) == before


def test_resuming_with_other_settings_is_refused(ray_local, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(5, seed=1, prefix="x")))
    run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint)
    with pytest.raises(SettingsMismatchError, match="pooling: stored 'cls', now 'mean'.*--overwrite"):
        run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, pooling="mean")


def test_cli_embeds_and_reports_known_errors_with_exit_codes(ray_local, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(8, seed=2, prefix="c")))
    out = str(tmp_path / "out")
    assert main(["embed", str(tmp_path / "in"), out, "--model", str(tiny_checkpoint), "--id-field", "id"]) == EXIT_OK
    assert "documents      8" in capsys.readouterr().out
    assert read_output(tmp_path / "out").num_rows == 8
    assert pa.default_memory_pool().backend_name == "system", "the driver's Arrow memory (cli.use_system_allocator)"

    assert main(["embed", str(tmp_path / "nothing-here"), str(tmp_path / "o2"), "--model", str(tiny_checkpoint)]) == (
        NoInputError.exit_code
    )
    assert "does not exist" in capsys.readouterr().err
    args = ["embed", str(tmp_path / "in"), out, "--model", str(tiny_checkpoint), "--id-field", "id"]
    assert main(args) == EXIT_OK
    assert "already complete: 8 rows" in capsys.readouterr().out
    assert main([*args, "--normalize"]) == OutputConflictError.exit_code
    assert "normalize: stored False, now True" in capsys.readouterr().err
    assert main([*args, "--normalize", "--overwrite"]) == EXIT_OK
    config = tmp_path / "bad.yaml"
    config.write_text("input: x\noutput: y\npooling: median\nbatchsize: 3\n")
    assert main(["embed", "--config", str(config)]) == SettingsError.exit_code
    err = capsys.readouterr().err
    assert "pooling" in err and "batchsize: Extra inputs are not permitted" in err


@pytest.mark.parametrize("name", ["local.yaml", "s3-example.yaml", "gpu-cluster.yaml"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    config = load_config(Path(__file__).parent.parent / "configs" / name, {})
    assert config.model == "chandar-lab/NeoBERT"


def test_a_10k_document_job_commits_along_the_way_and_its_rerun_touches_no_input(
    ray_local, tmp_path, tiny_checkpoint, monkeypatch
):
    import pipeline.job
    from pipeline.verify import verify_output

    (tmp_path / "in").mkdir()
    for shard in range(10):
        docs = make_docs(1000, seed=100 + shard, prefix=f"k{shard}", max_words=12)
        (tmp_path / "in" / f"part-{shard}.jsonl.gz").write_bytes(jsonl_bytes(docs, "gz"))
    # The records it commits are compacted while it runs, as a long run's are.
    monkeypatch.setattr(pipeline.job, "COMPACT_EVERY_S", 0.05)
    monkeypatch.setattr("pipeline.io.compaction.COMPACT_AFTER_RECORDS", 2)
    compactions = []
    compact = pipeline.job.compact_while_running
    monkeypatch.setattr(pipeline.job, "compact_while_running", lambda *a: compactions.append(compact(*a)))
    first = run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, id_field="id", tokens_per_batch=4096)
    assert first.rows_committed == 10_000
    # 256 MB parts would hold it all in one part, committed at the very end; a run commits as it goes
    # (parts of at least 1,000 rows, made of whole blocks of 2,048 tokenized rows).
    assert first.parts >= 3
    assert True in compactions, "records compacted while the run wrote more"
    report = verify_output(str(tmp_path / "out"))
    assert report.ok, report.problems

    def no_reading(*args, **kwargs):
        raise AssertionError("a finished job's re-run must not read its input or start Ray")

    monkeypatch.setattr(pipeline.job, "connect_ray", no_reading)
    monkeypatch.setattr(pipeline.job, "ShardDatasource", no_reading)
    again = run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, id_field="id")
    assert again.already_complete and again.documents == 0 and again.rows_committed == 10_000


@pytest.mark.timeout(180)
def test_an_actor_that_loads_other_weights_than_the_run_record_fails_the_job(
    ray_local, tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    # As if a node held another copy of the model at the same path: the driver's digest is not the actor's.
    import pipeline.model.inspection

    monkeypatch.setattr(pipeline.model.inspection, "hash_weights", lambda folder: "0" * 64)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(20, seed=3, prefix="w")))
    args = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main(args) == ModelError.exit_code
    err = capsys.readouterr().err
    assert "driver read 000000000000..." in err and "must load the same checkpoint" in err
    assert not list((tmp_path / "out").glob(f"{PARTS}/*.parquet")), "no vector from other weights is published"


def test_the_output_answers_the_readmes_duckdb_query(ray_local, tmp_path, tiny_checkpoint, tiny_encoder):
    import duckdb

    (tmp_path / "in").mkdir()
    docs = make_docs(30, seed=9, prefix="q")
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(docs))
    run(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, id_field="id")
    query = tiny_encoder.encode(["search retrieval"])[0]
    parts = str(tmp_path / "out" / PARTS / "*.parquet")
    # DuckDB reads the fixed-size vectors as FLOAT[]: the cast gives its array functions FLOAT[64].
    found = duckdb.execute(
        "SELECT id, array_cosine_similarity(embedding::FLOAT[64], $query::FLOAT[64]) AS score "
        "FROM read_parquet($parts) ORDER BY score DESC LIMIT 5",
        {"query": query.tolist(), "parts": parts},
    ).fetchall()
    vectors = tiny_encoder.encode([d["text"] for d in docs])
    cosine = vectors @ query / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    best = np.argsort(-cosine)[:5]
    assert [i for i, _ in found] == [docs[i]["id"] for i in best]
    np.testing.assert_allclose([score for _, score in found], cosine[best], atol=1e-5)
