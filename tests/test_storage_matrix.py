"""One night on every store the README names: embed from it and to it, killed after a commit, resumed,
verified; the same scenario on local disk, S3 (moto), GCS (its emulator) and Azure Blob (Azurite).
Hugging Face datasets (input only) are read through the Hub's own API, served from a folder.

Every input format is read from the store (JSONL, gzip JSONL in a subfolder, Parquet, text), the first
run is a real `neobert-pipeline embed` process killed with SIGKILL right after its first commit, and
the resumed run must leave every document embedded exactly once, equal to the model's own answer.
Credentials come from each store's standard chain: the variables conftest.py sets.
"""

from __future__ import annotations

import base64
import json
import os
import signal

import numpy as np
import pytest
from cli_process import RUN_TIMEOUT_S, embed_process, one_error_line, run_cli
from conftest import make_store
from corpus import jsonl_bytes, make_docs, parquet_bytes
from object_stores import AZURITE_KEY

from pipeline.config import StorageConfig, load_config
from pipeline.errors import StorageAccessError
from pipeline.io.current import current_rows
from pipeline.io.layout import COMMITS, join
from pipeline.job import run_embedding_job
from pipeline.status import output_status
from pipeline.verify import verify_output


def corpus() -> dict[str, list[dict]]:
    """Shard path below the input -> its documents, one shard per input format."""
    return {
        "a.jsonl": make_docs(40, seed=700, prefix="a"),
        "nested/b.jsonl.gz": make_docs(35, seed=701, prefix="b"),
        "c.parquet": make_docs(30, seed=702, prefix="c"),
        "d.txt": make_docs(25, seed=703, prefix="d"),
    }


def shard_bytes(name: str, docs: list[dict]) -> bytes:
    if name.endswith(".parquet"):
        return parquet_bytes(docs)
    if name.endswith(".txt"):
        return "".join(d["text"] + "\n" for d in docs).encode()
    return jsonl_bytes(docs, "gz" if name.endswith(".gz") else None)


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
# Local disk and S3 are killed and resumed in many other tests: in `make test-slow` only, here.
@pytest.mark.parametrize("kind", [*(pytest.param(k, marks=pytest.mark.slow) for k in ("local", "s3")), "gcs", "azure"])
def test_a_run_killed_after_a_commit_resumes_to_every_document_once_on_every_store(
    kind, request, tmp_path, ray_local, tiny_checkpoint, tiny_encoder
):
    source, output = make_store(request, tmp_path, kind, "in"), make_store(request, tmp_path, kind, "out")
    texts = {}
    for name, docs in corpus().items():
        if kind == "local":
            source.fs.makedirs(join(source.root, name).rsplit("/", 1)[0], exist_ok=True)
        source.fs.pipe_file(join(source.root, name), shard_bytes(name, docs))
        texts |= {f"{name}#{row}": doc["text"] for row, doc in enumerate(docs)}  # derived ids: no --id-field
    endpoint = ("--endpoint-url", output.storage.endpoint_url) if output.storage.endpoint_url else ()

    # Parts smaller than the smallest shard: Ray Data bundles a write by rows, in whatever order the shards
    # arrive, and with parts as large as three shards the first commit could hold the whole corpus.
    once, part_mb = tmp_path / "fired", 0.005
    killed = embed_process(
        *(source.url, output.url, tiny_checkpoint, *endpoint),
        failpoint="sink.after_commit",
        once=once,
        id_field=None,
        target_file_mb=part_mb,
    )
    assert killed == -signal.SIGKILL and once.exists()
    assert output.files(COMMITS), "killed after a commit record"
    assert not verify_output(output.url, output.storage).ok, "an interrupted output does not pass"

    settings = {"input": source.url, "output": output.url, "model": str(tiny_checkpoint), "target_file_mb": part_mb}
    if output.storage.endpoint_url:
        settings["storage"] = {"endpoint_url": output.storage.endpoint_url}
    summary = run_embedding_job(load_config(None, settings))
    assert 0 < summary.documents < len(texts), "the resumed run embeds only what the killed one had not committed"

    report = verify_output(output.url, output.storage)
    assert report.ok, report.problems
    status = output_status(output.url, output.storage)
    assert status["shards_complete"] == status["shards"] == 4 and status["writer"]["released"]
    assert not status["unfinished_run"] and status["writer"]["token"] == 2, "the resumed run took over the lease"
    table = current_rows(output.url, output.storage, columns=["id", "embedding"]).read_all()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(texts), "every document exactly once"
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors, tiny_encoder.encode([texts[i] for i in ids]), atol=1e-5)


def test_wrong_or_missing_azure_credentials_end_in_one_line_naming_the_store_and_never_the_secret(
    request, tmp_path, tiny_checkpoint
):
    source = make_store(request, tmp_path, "azure", "in")
    source.fs.pipe_file(join(source.root, "a.jsonl"), jsonl_bytes(make_docs(3, seed=1, prefix="a")))
    wrong_key = base64.b64encode(b"a wrong key that must never be printed, 64 bytes long.........").decode()
    wrong = os.environ["AZURE_STORAGE_CONNECTION_STRING"].replace(AZURITE_KEY, wrong_key)
    assert wrong_key in wrong
    args = ("embed", source.url, str(tmp_path / "out"), "--model", str(tiny_checkpoint))

    refused = run_cli(*args, env={"AZURE_STORAGE_CONNECTION_STRING": wrong})
    line = one_error_line(refused.stderr)
    assert refused.returncode == StorageAccessError.exit_code == 9
    assert "Azure Blob refused the credentials" in line and "AZURE_STORAGE_CONNECTION_STRING" in line
    for secret in (wrong_key, AZURITE_KEY):
        assert secret not in refused.stdout + refused.stderr

    missing = run_cli(*args, env=dict.fromkeys((k for k in os.environ if k.startswith("AZURE_")), None))
    assert missing.returncode == 9
    assert "no usable Azure Blob credentials" in one_error_line(missing.stderr)


def test_an_unusable_gcs_credentials_file_ends_in_one_line_naming_it_and_never_its_key(
    request, tmp_path, tiny_checkpoint
):
    source = make_store(request, tmp_path, "gcs", "in")
    source.fs.pipe_file(join(source.root, "a.jsonl"), jsonl_bytes(make_docs(3, seed=1, prefix="a")))
    secret = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3QtbmV2ZXItYmUtcHJpbnRlZA"
    key = {
        "type": "service_account",
        "client_email": "job@p.iam.gserviceaccount.com",
        "token_uri": "http://127.0.0.1:9",
    }
    key |= {"private_key": f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"}
    (tmp_path / "key.json").write_text(json.dumps(key))
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json")}

    result = run_cli("embed", source.url, str(tmp_path / "out"), "--model", str(tiny_checkpoint), env=env)
    line = one_error_line(result.stderr)
    assert result.returncode == 9
    assert "no usable GCS credentials" in line and "GOOGLE_APPLICATION_CREDENTIALS" in line
    assert secret not in result.stdout + result.stderr, "the key's material is never printed"


@pytest.mark.parametrize(("url", "library", "extra"), [("gs://b/in", "gcsfs", "gcs"), ("az://c/in", "adlfs", "azure")])
def test_a_store_whose_library_is_not_installed_names_the_extra_to_install(url, library, extra, tmp_path):
    hidden = tmp_path / "without"  # first on the path: importing the library fails as if it were not installed
    hidden.mkdir()
    (hidden / f"{library}.py").write_text(f'raise ModuleNotFoundError("No module named {library!r}", name={library!r})')
    path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    result = run_cli("embed", url, str(tmp_path / "out"), env={"PYTHONPATH": path}, timeout_s=120)
    assert result.returncode == 2
    assert f"pip install 'neobert-pipeline[{extra}]'" in one_error_line(result.stderr)


def test_a_hugging_face_dataset_is_read_through_the_hub_api_and_a_rewritten_shard_is_seen(
    hub, ray_local, tmp_path, tiny_checkpoint, tiny_encoder
):
    endpoint, repos = hub
    repo = repos / "org" / f"corpus-{tmp_path.name[-8:]}"
    (repo / "data" / "sub").mkdir(parents=True)
    (repo / "README.md").write_text("a dataset card, not a shard")
    shards = {
        "data/a.jsonl": make_docs(30, seed=710, prefix="a"),
        "data/sub/b.parquet": make_docs(25, seed=711, prefix="b"),
    }
    for name, docs in shards.items():
        (repo / name).write_bytes(shard_bytes(name, docs))
    source = f"hf://datasets/org/{repo.name}/data"
    storage = StorageConfig(options={"endpoint": endpoint})
    settings = {"input": source, "output": str(tmp_path / "out"), "model": str(tiny_checkpoint), "id_field": "id"}
    settings["storage"] = {"options": {"endpoint": endpoint}}

    def assert_view_is(docs: list[dict]) -> None:
        report = verify_output(str(tmp_path / "out"), storage)
        assert report.ok, report.problems
        table = current_rows(str(tmp_path / "out"), columns=["id", "embedding"]).read_all()
        texts = {d["id"]: d["text"] for d in docs}
        ids = table.column("id").to_pylist()
        assert sorted(ids) == sorted(texts)
        vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(vectors, tiny_encoder.encode([texts[i] for i in ids]), atol=1e-5)

    assert run_embedding_job(load_config(None, settings)).documents == 55
    assert_view_is([d for docs in shards.values() for d in docs])

    edited = [dict(d) for d in shards["data/a.jsonl"]]
    # The same length, so the same size: only the blob id (a hash of the contents) tells the edit.
    edited[4]["text"] = edited[4]["text"][::-1]
    assert edited[4]["text"] != shards["data/a.jsonl"][4]["text"]
    (repo / "data/a.jsonl").write_bytes(shard_bytes("data/a.jsonl", edited))
    summary = run_embedding_job(load_config(None, {**settings, "refresh": True}))
    assert summary.changes == {"added": 0, "changed": 1, "deleted": 0} and summary.documents == 30
    assert_view_is(edited + shards["data/sub/b.parquet"])


def test_an_azure_move_deletes_its_source_only_after_azures_copy_succeeded(request, tmp_path, monkeypatch):
    """Azure's Copy Blob may still be pending when it returns: the source must outlive it, and stays when
    the copy fails (the next run's recovery publishes it again)."""
    from pipeline.io import layout

    store = make_store(request, tmp_path, "azure")
    source, target = join(store.root, "_staging/p.parquet"), join(store.root, "parts/p.parquet")
    store.fs.pipe_file(source, b"a part")
    assert layout.azure_copy_status(store.fs, source) is None  # a plain upload was never a copy target
    statuses, seen_source = iter(["pending", "pending", "success"]), []

    def copying(fs, path):
        assert path == target
        seen_source.append(layout.exists_now(fs, source))
        return next(statuses)

    monkeypatch.setattr(layout, "azure_copy_status", copying)
    monkeypatch.setattr(layout.time, "sleep", lambda s: None)
    layout.move(store.fs, source, target)
    assert seen_source == [True, True, True] and not layout.exists_now(store.fs, source)
    assert store.fs.cat_file(target) == b"a part"

    store.fs.pipe_file(source, b"another part")
    monkeypatch.setattr(layout, "azure_copy_status", lambda fs, path: "failed")
    with pytest.raises(OSError, match="copy failed"):
        layout.move(store.fs, source, target)
    assert layout.exists_now(store.fs, source), "the source stays for the next try"
    monkeypatch.undo()
    assert layout.azure_copy_status(store.fs, target) == "success"  # what Azurite reports of a real copy
