"""`neobert-pipeline sync`: each target follows an output through a refresh to exactly the rows a fresh
embedding of the new corpus gives; a sync killed mid-batch converges; bad targets get one clear line.

PostgreSQL (with pgvector) is a real server on 127.0.0.1 started here; LanceDB and Qdrant's local
mode need no server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from conftest import start_test_ray
from pg_server import PASSWORD, start_postgres, stop_postgres
from test_refresh import assert_same_view, first_corpus, refreshed, run, view, write

from pipeline.cli import main as cli
from pipeline.config import StorageConfig
from pipeline.errors import TargetConflictError, TargetMismatchError
from pipeline.sync.run import sync_output

KINDS = ["pgvector", "lancedb", "qdrant", "iceberg"]
KILL_TIMEOUT_S = 120


@dataclass
class Outputs:
    before: str
    """The output after its first run (a copy, as it was before the refresh)."""
    after: str
    """The same output after a refresh: 2 shards added, 1 rewritten, 1 deleted."""
    fresh: str
    """A from-scratch embedding of the refreshed corpus."""
    corpus: dict


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_checkpoint) -> Outputs:
    import ray

    if not ray.is_initialized():
        start_test_ray(tmp_path_factory)
    base = tmp_path_factory.mktemp("sync")
    fs = fsspec.filesystem("file")
    corpus = first_corpus()
    write(fs, str(base / "in"), corpus)
    run(str(base / "in"), str(base / "out"), tiny_checkpoint)
    shutil.copytree(base / "out", base / "before")
    new = refreshed(corpus)
    write(fs, str(base / "in"), new)
    run(str(base / "in"), str(base / "out"), tiny_checkpoint, refresh=True)
    write(fs, str(base / "fresh-in"), new)
    # Repeats rejected: its view cannot repeat an id, so an empty target takes it by plain append.
    run(str(base / "fresh-in"), str(base / "fresh"), tiny_checkpoint, duplicate_ids="reject")
    return Outputs(str(base / "before"), str(base / "out"), str(base / "fresh"), new)


@pytest.fixture(scope="module")
def postgres():
    server, process = start_postgres()
    yield server
    stop_postgres(process, server.folder)


@pytest.fixture(scope="module")
def iceberg_catalog(tmp_path_factory, s3_endpoint):
    """The catalog `tests`, configured as a user does, by pyiceberg's environment variables: a SQL
    catalog, the warehouse in a bucket of its own on S3. One for the module: pyiceberg reads its
    environment once per process, so every test here, and each sync process it starts, sees this one."""
    import pyiceberg.catalog
    import s3fs
    from pyiceberg.utils.config import Config

    bucket = f"iceberg-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    settings = {
        "TYPE": "sql",
        "URI": f"sqlite:///{tmp_path_factory.mktemp('iceberg')}/catalog.db",
        "WAREHOUSE": f"s3://{bucket}/warehouse",
        "S3__ENDPOINT": s3_endpoint,
        "S3__REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as env:
        for key, value in settings.items():
            env.setenv(f"PYICEBERG_CATALOG__TESTS__{key}", value)
        env.setattr(pyiceberg.catalog, "_ENV_CONFIG", Config())  # read again, now that it is set
        yield


@pytest.fixture()
def target(request, tmp_path, postgres):
    """(kind, URL) of an empty target of the kind the test is parametrised with."""
    kind = request.param
    if kind == "pgvector":
        return kind, postgres.url()
    if kind == "lancedb":
        return kind, f"lancedb://{tmp_path}/lance"
    if kind == "iceberg":
        request.getfixturevalue("iceberg_catalog")
        return kind, "iceberg://tests/lake"  # each test syncs into tables of its own name
    return kind, f"qdrant+local://{tmp_path}/qdrant"


def table_name() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def stored(kind: str, url: str, table: str) -> dict[str, tuple[np.ndarray, tuple]]:
    """id -> (vector, (shard, row, generation)) as the target holds them, read back by its own client."""
    if kind == "pgvector":
        import psycopg

        with psycopg.connect(url) as db:
            rows = db.execute(f"SELECT id, embedding::real[], shard, row, generation FROM {table}").fetchall()
        return {r[0]: (np.array(r[1], np.float32), tuple(r[2:])) for r in rows}
    if kind == "lancedb":
        import lancedb

        table_rows = lancedb.connect(url.removeprefix("lancedb://")).open_table(table).to_arrow().to_pylist()
        return {
            r["id"]: (np.array(r["embedding"], np.float32), (r["shard"], r["row"], r["generation"])) for r in table_rows
        }
    if kind == "iceberg":
        from pyiceberg.catalog import load_catalog

        lake = load_catalog("tests").load_table(f"lake.{table}").scan().to_arrow().to_pylist()
        return {r["id"]: (np.array(r["embedding"], np.float32), (r["shard"], r["row"], r["generation"])) for r in lake}
    from qdrant_client import QdrantClient

    client = QdrantClient(path=url.removeprefix("qdrant+local://"))
    points, _ = client.scroll(table, limit=100_000, with_vectors=True, with_payload=True)
    client.close()
    return {
        p.payload["id"]: (
            np.array(p.vector, np.float32),
            (p.payload["shard"], p.payload["row"], p.payload["generation"]),
        )
        for p in points
    }


def output_view(output: str) -> dict[str, tuple]:
    from pipeline.io.current import current_rows

    table = current_rows(output, columns=["id", "shard", "row", "generation"]).read_all()
    return {r["id"]: (r["shard"], r["row"], r["generation"]) for r in table.to_pylist()}


@pytest.mark.parametrize("target", KINDS, indirect=True)
def test_a_target_follows_a_refresh_to_the_rows_of_a_fresh_embedding(outputs, target):
    kind, url = target
    table = table_name()
    first = sync_output(outputs.before, url, table=table, batch_rows=25)
    assert (first.inserted, first.updated, first.deleted) == (first.view_rows, 0, 0) and first.view_rows == 96
    assert sync_output(outputs.before, url, table=table).written == 0  # nothing new: nothing written

    second = sync_output(outputs.after, url, table=table, batch_rows=25)
    # s2 rewritten: 11 rows kept their id (updated), one is new, one gone; t0 and t1 new; s5 deleted.
    assert (second.inserted, second.updated, second.deleted) == (7 + 5 + 1, 11, 12 + 1)
    assert second.target_rows == second.view_rows == sum(len(docs) for docs in outputs.corpus.values())
    assert sync_output(outputs.after, url, table=table, create_index=True).written == 0
    if kind == "pgvector":  # the HNSW index, built after loading: cosine for normalised output, else inner product
        import json

        import psycopg

        normalised = json.loads((Path(outputs.after) / "_neobert_run.json").read_text())["settings"]["normalize"]

        with psycopg.connect(url) as db:
            (definition,) = db.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'", [table]
            ).fetchone()
        assert ("vector_cosine_ops" if normalised else "vector_ip_ops") in definition

    fresh_table = table_name()
    sync_output(outputs.fresh, url, table=fresh_table)
    got, want = stored(kind, url, table), stored(kind, url, fresh_table)
    assert_same_view({k: v for k, (v, _) in got.items()}, {k: v for k, (v, _) in want.items()})
    assert_same_view({k: v for k, (v, _) in got.items()}, view(outputs.after))
    assert {k: where for k, (_, where) in got.items()} == output_view(outputs.after)  # provenance kept


@pytest.mark.parametrize("target", KINDS, indirect=True)
def test_a_sync_killed_in_the_middle_of_a_batch_and_run_again_converges(outputs, target, tmp_path):
    kind, url = target
    # Into an empty table (appended, the fresh output's ids being unique), then after a refresh (merged).
    fresh_table = table_name()
    kill_sync_in_a_batch(outputs.fresh, url, fresh_table, tmp_path / "fired-fresh")
    again = sync_output(outputs.fresh, url, table=fresh_table)
    assert again.target_rows == again.view_rows
    # PostgreSQL and Iceberg rolled the killed batch back; LanceDB and Qdrant kept it, now unchanged.
    assert (again.unchanged > 0) == (kind in ("lancedb", "qdrant"))
    assert_same_view({k: v for k, (v, _) in stored(kind, url, fresh_table).items()}, view(outputs.fresh))

    table = table_name()
    sync_output(outputs.before, url, table=table)
    kill_sync_in_a_batch(outputs.after, url, table, tmp_path / "fired")

    again = sync_output(outputs.after, url, table=table)
    assert again.target_rows == again.view_rows
    assert {k: where for k, (_, where) in stored(kind, url, table).items()} == output_view(outputs.after)
    assert_same_view({k: v for k, (v, _) in stored(kind, url, table).items()}, view(outputs.after))
    assert sync_output(outputs.after, url, table=table).written == 0


def kill_sync_in_a_batch(output: str, url: str, table: str, once: Path) -> None:
    """`neobert-pipeline sync` in a process of its own, SIGKILLed at its first batch's failpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOBERT_PIPELINE_")}
    env.update(NEOBERT_PIPELINE_FAILPOINT="sync.in_batch", NEOBERT_PIPELINE_FAILPOINT_ONCE=str(once))
    command = [sys.executable, "-m", "pipeline.cli", "sync", output, "--to", url, "--table", table, "--batch-rows", "4"]
    killed = subprocess.run(command, env=env, capture_output=True, timeout=KILL_TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]


def test_lancedb_on_object_storage(outputs, s3, s3_endpoint):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    url = f"lancedb+s3://{s3.bucket}/lance"
    first = sync_output(outputs.after, url, storage)
    assert first.inserted == first.target_rows == first.view_rows == sum(len(d) for d in outputs.corpus.values())
    assert sync_output(outputs.after, url, storage).written == 0
    assert s3.exists(f"{s3.bucket}/lance/embeddings.lance")


def test_bad_targets_get_one_line_and_their_exit_code(outputs, postgres, tmp_path, capsys):
    table = table_name()
    wrong = postgres.url(password="not-the-password")
    assert cli(["sync", outputs.after, "--to", wrong, "--table", table]) == 11
    err = capsys.readouterr().err.strip()
    assert "refused the credentials" in err and "not-the-password" not in err and len(err.splitlines()) == 1

    closed = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_closed_port()}/postgres"
    assert cli(["sync", outputs.after, "--to", closed]) == 11
    assert "could not be reached" in capsys.readouterr().err

    import psycopg

    with psycopg.connect(postgres.url(), autocommit=True) as db:
        db.execute(
            f"CREATE EXTENSION IF NOT EXISTS vector; CREATE TABLE {table} (id text PRIMARY KEY, embedding vector(3))"
        )
    assert cli(["sync", outputs.after, "--to", postgres.url(), "--table", table]) == 12
    assert "exists with columns id text, embedding vector(3)" in capsys.readouterr().err

    lance = f"lancedb://{tmp_path}/lance"
    import lancedb

    lancedb.connect(str(tmp_path / "lance")).create_table("other", schema=pa.schema([("id", pa.string())]))
    assert cli(["sync", outputs.after, "--to", lance, "--table", "other"]) == 12

    assert cli(["sync", outputs.after, "--to", lance]) == 0
    with pytest.raises(TargetConflictError, match="another output"):
        sync_output(outputs.fresh, lance)  # the same table, another output's log

    table_rows = lancedb.connect(str(tmp_path / "lance")).open_table("embeddings")
    one_id = table_rows.to_arrow().column("id")[0].as_py()
    table_rows.delete(f"id = '{one_id}'")  # someone else changed the target
    rows = sum(len(docs) for docs in outputs.corpus.values())
    with pytest.raises(TargetMismatchError, match=f"holds {rows - 1} rows but the output's current view has {rows}"):
        sync_output(outputs.after, lance)

    assert cli(["sync", outputs.after, "--to", "iceberg://no_such_catalog/lake.docs"]) == 11
    assert "PYICEBERG_CATALOG__NO_SUCH_CATALOG__URI" in capsys.readouterr().err

    assert cli(["sync", outputs.after, "--to", "mysql://host/db"]) == 2
    assert "not a sync target" in capsys.readouterr().err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_refresh_job_syncs_after_embedding(outputs, tiny_checkpoint, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "refresh_job", Path(__file__).resolve().parents[1] / "jobs/refresh.py"
    )
    refresh_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh_job)
    write(fsspec.filesystem("file"), str(tmp_path / "in"), dict(list(outputs.corpus.items())[:2]))
    lance = f"lancedb://{tmp_path}/lance"
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--id-field", "id", "--quiet"]
    assert refresh_job.main([*args, "--sync-to", lance, "--sync-table", "docs"]) == 0
    synced = stored("lancedb", lance, "docs")
    assert {k: where for k, (_, where) in synced.items()} == output_view(str(tmp_path / "out"))


def test_chunked_output_rows_are_keyed_by_document_and_chunk():
    from pipeline.errors import BadInputError
    from pipeline.sync.rows import part_columns, target_schema, to_target_rows

    schema = target_schema(2, "float32", chunks=True)
    part = pa.table(
        {
            "id": ["doc#1", "doc#1", "b"],  # a document id may hold '#': the chunk is after the last one
            "chunk": pa.array([0, 1, 0], pa.int32()),
            "char_start": [0, 10, 0],
            "char_end": [10, 20, 5],
            "embedding": pa.array([[1, 0], [0, 1], [1, 1]], pa.list_(pa.float32(), 2)),
            "n_tokens": pa.array([3, 3, 2], pa.int32()),
            "truncated": [False, False, False],
            "shard": ["s", "s", "s"],
            "row": [0, 0, 1],
            "generation": pa.array([0, 0, 0], pa.int32()),
        }
    )
    assert set(part_columns(schema)) <= set(part.column_names)
    rows = to_target_rows(part, schema, "part-x")
    assert rows.column("id").to_pylist() == ["doc#1#0", "doc#1#1", "b#0"]
    assert rows.column("document_id").to_pylist() == ["doc#1", "doc#1", "b"]
    with pytest.raises(BadInputError, match="'b#0' appears more than once in part-x"):
        to_target_rows(pa.concat_tables([part, part.slice(2)]), schema, "part-x")


def test_float16_output_is_stored_as_halfvec(postgres):
    import psycopg

    from pipeline.sync.rows import target_schema
    from pipeline.sync.targets.pgvector import PgvectorTarget

    schema = target_schema(3, "float16", chunks=False)
    vectors = np.array([[0.5, -1.25, 2.0], [1e-3, 0.0, -0.75]], np.float16)
    rows = pa.table(
        {
            "id": ["a", "b"],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3),
            "shard": ["s", "s"],
            "row": [0, 1],
            "generation": pa.array([0, 0], pa.int32()),
            "n_tokens": pa.array([2, 2], pa.int32()),
            "truncated": [False, True],
        },
        schema=schema,
    )
    table = table_name()
    target = PgvectorTarget(postgres.url(), table)
    target.prepare(schema)
    assert (target.upsert(rows).inserted, target.upsert(rows).unchanged) == (2, 2)
    target.close()
    with psycopg.connect(postgres.url()) as db:
        kind = db.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = 'embedding'",
            [table],
        ).fetchone()[0]
        got = db.execute(f"SELECT id, embedding::vector::real[], truncated FROM {table} ORDER BY id").fetchall()
    assert kind == "halfvec(3)"
    assert [(i, t) for i, _, t in got] == [("a", False), ("b", True)]
    np.testing.assert_array_equal(np.array([v for _, v, _ in got], np.float32), vectors.astype(np.float32))
