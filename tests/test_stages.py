"""Each stage of the graph called directly on small inputs, without Ray: read -> pack -> embed -> commit.

The sink's commit steps are crashed in this process at each failpoint (faults.crash_at) and the
output recovered, which pins the commit protocol in milliseconds instead of a killed subprocess.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEXTS
from corpus import jsonl_bytes, make_docs

from pipeline.config import StorageConfig
from pipeline.faults import SimulatedCrash, crash_at
from pipeline.io.layout import COMMITS, ERRORS, PARTS, STAGING
from pipeline.io.manifest import read_state
from pipeline.io.readers import ROW_SCHEMA
from pipeline.io.recovery import recover
from pipeline.io.schemas import output_schema
from pipeline.io.shards import discover_shards
from pipeline.io.sink import CommittedParquetSink
from pipeline.io.storage import filesystem_for
from pipeline.stages.embed import EmbedStage
from pipeline.stages.pack import tokenize_and_pack
from pipeline.stages.packs import PACK_SCHEMA, PackContractError, table_to_packs
from pipeline.stages.read import ShardDatasource

STORAGE = StorageConfig()


def read_rows(folder, **options) -> pa.Table:
    """Run every read task of the read stage in this process, as Ray would in workers."""
    fs, path = filesystem_for(str(folder), STORAGE)
    source = ShardDatasource(discover_shards(fs, path), "text", "id", STORAGE, **options)
    tables = [table for task in source.get_read_tasks(parallelism=1) for table in task.read_fn()]
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


@pytest.fixture()
def shards(tmp_path):
    (tmp_path / "in").mkdir()
    docs = [{"id": f"t{i}", "text": text} for i, text in enumerate(TEXTS)]
    lines = jsonl_bytes(docs[:4]) + b'{"id": "bad", "text": ""}\n' + jsonl_bytes(docs[4:])
    (tmp_path / "in" / "a.jsonl").write_bytes(lines)
    (tmp_path / "in" / "b.jsonl").write_bytes(jsonl_bytes(make_docs(30, seed=5, prefix="b")))
    return tmp_path / "in"


def test_the_read_stage_gives_every_row_with_its_shard_and_row_and_leaves_out_skipped_ones(shards):
    rows = read_rows(shards)
    assert rows.schema == ROW_SCHEMA and rows.num_rows == len(TEXTS) + 1 + 30
    a = rows.filter(pa.compute.ends_with(rows.column("shard"), "a.jsonl")).to_pylist()
    assert [r["row"] for r in a] == list(range(len(TEXTS) + 1))
    assert [(r["id"], r["error"]) for r in a if r["error"]] == [("bad", "empty_text")]
    url = a[0]["shard"]
    rest = read_rows(shards, skip={url: [(0, 3)]}, rejected={url: {5: "id repeats"}})
    kept = [r for r in rest.to_pylist() if r["shard"] == url]
    assert [r["row"] for r in kept] == list(range(3, len(TEXTS) + 1))
    assert [r["error"] for r in kept if r["row"] == 5] == ["duplicate_id"]


def test_the_pack_stage_makes_token_budget_packs_and_one_dead_letter_pack(shards, tiny_encoder):
    rows = read_rows(shards)
    table = tokenize_and_pack(
        rows, tokenizer_json=tiny_encoder.tokenizer.to_json(), max_length=512, tokens_per_batch=64
    )
    assert table.schema == PACK_SCHEMA
    packs = table_to_packs(table)  # each one checked against the contract
    documents = [p for p in packs if not p.dead_letters]
    dead = [p for p in packs if p.dead_letters]
    assert len(dead) == 1 and dead[0].docs["error"].to_pylist() == ["empty_text"] and dead[0].tokens == 0
    assert all(p.tokens <= 64 or p.n_docs == 1 for p in documents) and len(documents) > 3
    ids = [i for p in documents for i in p.docs["id"].to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows.to_pylist() if not r["error"])
    by_id = {r["id"]: r["text"] for r in rows.to_pylist()}
    for pack in documents:
        expected = tiny_encoder.tokenize([by_id[i] for i in pack.docs["id"].to_pylist()]).ids
        assert pack.input_ids.tolist() == np.concatenate(expected).tolist()


def test_a_pack_that_breaks_the_contract_is_refused(shards, tiny_encoder):
    table = tokenize_and_pack(
        read_rows(shards), tokenizer_json=tiny_encoder.tokenizer.to_json(), max_length=512, tokens_per_batch=64
    )
    broken = table.set_column(
        PACK_SCHEMA.get_field_index("dead_letters"), "dead_letters", pa.array([True] * table.num_rows)
    )
    with pytest.raises(PackContractError, match="dead-letter pack must hold no sequences"):
        table_to_packs(broken)


def test_the_embed_stage_turns_packs_into_output_rows_equal_to_the_encoder(shards, tiny_checkpoint, tiny_encoder):
    rows = read_rows(shards)
    packs = tokenize_and_pack(
        rows, tokenizer_json=tiny_encoder.tokenizer.to_json(), max_length=512, tokens_per_batch=64
    )
    reports = []
    stage = EmbedStage(
        str(tiny_checkpoint),
        pooling="cls",
        normalize=False,
        output_dtype="float32",
        device="cpu",
        on_batch_done=lambda *counts: reports.append(counts),
        expected_weights_sha256=tiny_encoder.facts.weights_sha256,
    )
    out = stage(packs)
    assert out.num_rows == rows.num_rows
    good = out.filter(pa.compute.is_null(out.column("error"))).to_pylist()
    by_id = {r["id"]: r["text"] for r in rows.to_pylist()}
    expected = tiny_encoder.encode([by_id[r["id"]] for r in good])
    np.testing.assert_allclose(np.array([r["embedding"] for r in good]), expected, atol=1e-5)
    assert [r["error"] for r in out.to_pylist() if r["error"]] == ["empty_text"]
    documents, dead_letters = (sum(r[i] for r in reports) for i in (0, 1))
    assert (documents, dead_letters) == (len(good), 1)


def sink_table(rows: int, hidden: int = 4) -> pa.Table:
    """A stream-schema block of `rows` embedded rows and one dead letter, for the sink."""
    from pipeline.io.schemas import stream_schema

    schema = stream_schema(hidden, "float32")
    data = {
        "id": [f"d{i}" for i in range(rows + 1)],
        "embedding": [[float(i)] * hidden for i in range(rows)] + [None],
        "n_tokens": [3] * rows + [None],
        "truncated": [False] * (rows + 1),
        "shard": ["file:///in/a.jsonl"] * (rows + 1),
        "row": list(range(rows + 1)),
        "error": [None] * rows + ["empty_text"],
        "error_message": [None] * rows + ["the text is empty"],
        "excerpt": [None] * rows + [""],
    }
    return pa.Table.from_pydict(data, schema=schema)


def listing(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("point, committed", [("sink.after_stage", False), ("sink.after_commit", True)])
def test_a_crash_at_each_commit_step_is_recovered_to_all_or_nothing(tmp_path, point, committed):
    sink = CommittedParquetSink(str(tmp_path), STORAGE, generation=0, rows_per_part=10)
    with crash_at(point), pytest.raises(SimulatedCrash):
        sink.write([sink_table(5)], ctx=None)
    (part,) = {p.name.split(".")[0] for p in (tmp_path / STAGING).iterdir()}
    staged = [f"{STAGING}/{part}.errors.parquet", f"{STAGING}/{part}.parquet"]
    assert listing(tmp_path) == sorted(staged + ([f"{COMMITS}/{part}.json"] if committed else []))

    fs, root = filesystem_for(str(tmp_path), STORAGE)
    state = recover(fs, root)
    published = [f"{COMMITS}/{part}.json", f"{ERRORS}/{part}.parquet", f"{PARTS}/{part}.parquet"]
    assert listing(tmp_path) == (published if committed else [])
    assert state.committed_rows == (6 if committed else 0) and state.embedded_rows == (5 if committed else 0)
    # A retried write of the same rows lands on the same part name: never a duplicate.
    sink.write([sink_table(5)], ctx=None)
    assert listing(tmp_path) == published
    record = json.loads((tmp_path / COMMITS / f"{part}.json").read_text())
    assert record["ranges"] == {"file:///in/a.jsonl": [[0, 6]]} and record["error_counts"] == {"empty_text": 1}
    assert (
        pq.read_table(tmp_path / PARTS).schema.field("embedding").type
        == output_schema(4, "float32").field("embedding").type
    )
    assert read_state(fs, root).committed_rows == 6


def test_listing_an_object_store_leaves_no_listing_cached_on_the_driver(s3):
    """s3fs caches every listing it makes; a driver listing a million shards would keep all their info
    dicts for the whole run. Discovery finds nested shards and the same ones twice, and empties it."""
    files = {
        f"{s3.bucket}/in/{d}/{i}.jsonl": jsonl_bytes(make_docs(1, seed=i, prefix=f"{d}{i}"))
        for d in "ab"
        for i in range(3)
    }
    files[f"{s3.bucket}/in/a/deeper/x.jsonl"] = b'{"text": "x"}\n'
    s3.pipe(files)
    found = discover_shards(s3, f"{s3.bucket}/in")
    assert [s.relative_path for s in found] == sorted(p.split("/in/", 1)[1] for p in files)
    assert not any(key.startswith(f"{s3.bucket}/in") for key in s3.dircache)
    assert discover_shards(s3, f"{s3.bucket}/in") == found  # listed again, the same
    globbed = discover_shards(s3, f"{s3.bucket}/in/a/*.jsonl")  # a glob's own listing is forgotten too
    assert [s.relative_path for s in globbed] == ["0.jsonl", "1.jsonl", "2.jsonl"]
    assert not any(key.startswith(f"{s3.bucket}/in") for key in s3.dircache)


# Counts the peak of what a take allocates; kept for the process's life, as Arrow pools must outlive their buffers.
TAKE_POOL = pa.proxy_memory_pool(pa.default_memory_pool())


def test_a_listing_is_a_memory_mapped_file_not_on_the_heap_and_leaves_no_file_behind(tmp_path, monkeypatch):
    """A million shards' columns (about 120 MB) stay out of the driver's heap: the kernel keeps them as a
    file's pages, which it can drop under pressure. The file is gone from the disk once it is mapped. A
    subset taken of it copies only its own shards, in the order asked."""
    (tmp_path / "in").mkdir()
    for i in range(3 * 700):  # several of discover_shards' chunks
        (tmp_path / "in" / f"{i:05d}.jsonl").write_bytes(b'{"text": "x"}\n')
    monkeypatch.setattr("pipeline.io.shards.LISTING_CHUNK", 700)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir()
    fs, path = filesystem_for(str(tmp_path / "in"), STORAGE)

    heap_before = pa.total_allocated_bytes()
    shards = discover_shards(fs, path)
    assert len(shards) == 3 * 700 and shards.table.nbytes > 100_000
    assert pa.total_allocated_bytes() - heap_before < shards.table.nbytes / 20
    assert [s.relative_path for s in shards] == [f"{i:05d}.jsonl" for i in range(3 * 700)]
    assert list((tmp_path / "spool").iterdir()) == []

    previous = pa.default_memory_pool()
    pa.set_memory_pool(TAKE_POOL)
    try:  # Python objects out: nothing allocated from TAKE_POOL outlives the block
        picked, none = list(shards.take([1500, 3, 700, 3])), len(shards.take([]))
    finally:
        pa.set_memory_pool(previous)
    assert 0 < TAKE_POOL.max_memory() < shards.table.nbytes / 20
    assert [s.relative_path for s in picked] == ["01500.jsonl", "00003.jsonl", "00700.jsonl", "00003.jsonl"]
    assert picked == [shards[1500], shards[3], shards[700], shards[3]] and none == 0
    with pytest.raises(IndexError):
        shards.take([5, 3 * 700])


PAGED_STORES = ["s3", "gcs", "azure"]


@pytest.mark.parametrize("kind", PAGED_STORES)
def test_an_object_store_folder_is_listed_a_page_at_a_time_with_the_fingerprints_its_library_gives(
    request, tmp_path, monkeypatch, kind
):
    """A million objects' info dicts would take the driver about a GB: S3, GCS and Azure are listed a
    page at a time, never all at once, and find what the store's library finds (fsspec's find), with
    the same fingerprints (an output embedded before must not see its shards as changed). Names in the
    store's order, sorted by their bytes."""
    from conftest import make_store

    from pipeline.io import shards
    from pipeline.io.shards import shard_fingerprint

    store = make_store(request, tmp_path, kind, folder="in")
    fs, bucket = store.fs, store.root.split("/")[0]
    page = {"s3": "_s3_page", "gcs": "_gcs_page", "azure": "_azure_page"}[kind]
    monkeypatch.setattr(
        shards, {"s3": "S3_PAGE_KEYS", "gcs": "GCS_PAGE_OBJECTS", "azure": "AZURE_PAGE_BLOBS"}[kind], 16
    )
    names = [f"{d}/{i:03d}.jsonl" for d in ("a", "a-b", "a/x", "b", "é") for i in range(8)] + ["b/_hidden.jsonl"]
    fs.pipe({f"{bucket}/in/{name}": b'{"text": "x"}\n' * (len(name) % 4 + 1) for name in names})
    fs.pipe({f"{bucket}/in/b/": b"", f"{bucket}/in-other/c.jsonl": b'{"text": "y"}\n'})  # a folder marker
    expected = [
        (fs.unstrip_protocol(name), shard_fingerprint(info))
        for name, info in sorted(fs.find(f"{bucket}/in", detail=True).items(), key=lambda i: i[0].encode())
        if name.endswith(".jsonl") and "/_" not in name
    ]
    fs.invalidate_cache()
    requests = []
    page_of = getattr(shards, page)
    monkeypatch.setattr(shards, page, lambda *args: requests.append(args[2:]) or page_of(*args))

    listed = shards._files(fs, f"{bucket}/in", {"type": "directory"})
    next(listed)
    assert len(requests) == 1  # a page asked for when it is needed
    found = shards.discover_shards(fs, f"{bucket}/in")
    assert [(s.url, s.fingerprint) for s in found] == expected and len(expected) == 40
    # 41 or 42 objects in pages of 16; GCS's emulator answers in one page whatever the page size.
    assert len(requests) == 1 + (1 if kind == "gcs" else 3)
    assert found.table.column("url").to_pylist() == sorted(found.table.column("url").to_pylist())


@pytest.mark.parametrize("kind", PAGED_STORES)
@pytest.mark.parametrize(
    "glob",
    ["in/a/*.jsonl", "in/*", "in/*/", "in/**", "in/**/*.jsonl", "in/a*/0?1.jsonl", "in/[ab]/*", "i*", "in/*/x"],
)
def test_an_object_store_glob_finds_what_fsspecs_glob_finds_listing_a_page_at_a_time(
    request, tmp_path, monkeypatch, glob, kind
):
    """A glob over a million keys is matched page by page, with fsspec's rules: a file it matches, and
    every file below a folder it matches (with "/" after the folder's name when the glob ends so)."""
    from conftest import make_store

    from pipeline.io import shards

    store = make_store(request, tmp_path, kind, folder="in")
    fs, bucket = store.fs, store.root.split("/")[0]
    page = {"s3": "_s3_page", "gcs": "_gcs_page", "azure": "_azure_page"}[kind]
    monkeypatch.setattr(shards, "S3_PAGE_KEYS", 7)
    monkeypatch.setattr(shards, "AZURE_PAGE_BLOBS", 7)
    names = [f"in/{d}/{i:03d}.jsonl" for d in ("a", "a-b", "a/x", "b", "é") for i in range(3)]
    names += ["in/top.jsonl", "in/x", "in-other/c.jsonl", "in/b/x/deep.jsonl"]
    fs.pipe({f"{bucket}/{name}": b'{"text": "x"}\n' for name in names})
    pattern = f"{bucket}/{glob}"
    fsspecs = sorted(
        n for name, info in fs.glob(pattern, detail=True).items() for n, _ in shards._files(fs, name, info)
    )
    fs.invalidate_cache()
    requests = []
    page_of = getattr(shards, page)
    monkeypatch.setattr(shards, page, lambda *args: requests.append(args[2:]) or page_of(*args))
    ours = [name for name, _ in shards._matched_files(fs, pattern)]
    if glob == "in/*/" and kind != "s3":  # gcsfs's and adlfs's glob match no folder by a final "/"; s3fs's do
        assert fsspecs == []
        fsspecs = [f"{bucket}/{name}" for name in names if name.startswith("in/") and name.count("/") > 1]
    # fsspec names a file once for itself and again for each matched folder above it; discover_shards
    # keeps one of each.
    assert ours == sorted(set(fsspecs), key=str.encode) and requests


def test_a_pack_as_large_as_the_runs_token_budget_reaches_the_model_whole(tmp_path, tiny_checkpoint, tiny_encoder):
    """--tokens-per-batch above the device's default: the embed stage runs each pack in one forward pass,
    as the pack stage cut it, instead of splitting it again under the Encoder's own default."""
    from pipeline.model.devices import DEFAULT_MAX_TOKENS

    budget = 2 * DEFAULT_MAX_TOKENS["cpu"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.jsonl").write_bytes(
        jsonl_bytes([{"id": f"d{i}", "text": " ".join(["retrieval encoder corpus"] * 60)} for i in range(40)])
    )
    rows = read_rows(tmp_path / "in")
    packs = tokenize_and_pack(
        rows, tokenizer_json=tiny_encoder.tokenizer.to_json(), max_length=512, tokens_per_batch=budget
    )
    (pack,) = table_to_packs(packs)
    assert DEFAULT_MAX_TOKENS["cpu"] < pack.tokens <= budget
    stage = EmbedStage(
        str(tiny_checkpoint), pooling="cls", normalize=False, output_dtype="float32", device="cpu", max_tokens=budget
    )
    forward_passes = []
    embed_packed = stage.encoder.embed_packed
    stage.encoder.embed_packed = lambda ids, *args: forward_passes.append(len(ids)) or embed_packed(ids, *args)

    out = stage(packs)

    assert forward_passes == [pack.tokens]
    expected = tiny_encoder.encode([r["text"] for r in rows.to_pylist()])
    np.testing.assert_allclose(np.array(out.column("embedding").to_pylist()), expected, atol=1e-5)


def test_the_job_gives_the_pack_and_embed_stages_one_token_budget(tmp_path, tiny_checkpoint, tiny_encoder, monkeypatch):
    """The budget the pack stage packs to is the one the embed stage's Encoder runs by (the graph is
    recorded, not run: Ray Data's read is replaced by a recorder of what the job asks of it)."""
    from pipeline import job
    from pipeline.config import JobConfig

    class Graph:  # stands in for a Ray Dataset: keeps what the job asked of it
        def map_batches(self, fn, **options):
            self.options = options
            return self

    monkeypatch.setattr(job.ray.data, "read_datasource", lambda source, **options: Graph())
    for tokens_per_batch in (None, 20_000):
        config = JobConfig(
            input=str(tmp_path),
            output=str(tmp_path / "out"),
            model=str(tiny_checkpoint),
            tokens_per_batch=tokens_per_batch,
        )
        plan = job._Plan(config, tiny_encoder.facts, "{}", None, 0, None, 0)
        packed = job._read_and_pack(plan, repeats=None, progress=None).options["fn_kwargs"]["tokens_per_batch"]
        embedded = job._embed(Graph(), plan, progress=None).options["fn_constructor_kwargs"]["max_tokens"]
        assert packed == embedded == job.token_budget(config, tiny_encoder.facts)
        assert packed == tokens_per_batch if tokens_per_batch else packed >= tiny_encoder.facts.max_length
