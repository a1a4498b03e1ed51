"""What the job's Ray worker processes start with: light imports for the CPU stages, and malloc
settings that keep a CPU actor's large activations in the heap, and storage that still works after
a task was cancelled mid-import. Each check runs in a fresh Python."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pipeline.model.cpu_allocator import GLIBC_TUNABLES


def run_python(code: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_driver_and_the_read_pack_and_write_workers_do_not_import_torch():
    out = run_python(
        """
        import sys
        import pipeline, pipeline.stages.pack, pipeline.stages.reports, pipeline.stages.read, pipeline.progress
        import pipeline.io.sink, pipeline.config, pipeline.job, pipeline.cli
        print("torch" in sys.modules)
        """
    )
    assert out.strip() == "False"
    # ...while the package's public Encoder is still there for library users.
    assert run_python("from pipeline import Encoder; print(Encoder.__name__)").strip() == "Encoder"


# Ray Data cancels a failed dataset's running tasks with KeyboardInterrupt; the worker then serves the
# driver's next job. This stops the first import of s3fs the same way, part-way through aiohttp.
IMPORT_S3FS_INTERRUPTED_THEN_READ = """
    import importlib.abc, sys

    class CancelOnce(importlib.abc.MetaPathFinder):
        fired = False

        def find_spec(self, name, path, target=None):
            if name == "aiohttp.client_ws" and not self.fired:
                self.fired = True
                raise KeyboardInterrupt("task cancelled")

    sys.meta_path.insert(0, CancelOnce())
    try:
        import s3fs
    except KeyboardInterrupt:
        pass
    half_imported = "aiohttp.http_exceptions" in sys.modules and "aiohttp" not in sys.modules

    from pipeline.config import StorageConfig
    from pipeline.io.storage import filesystem_for

    fs, path = filesystem_for(URL, StorageConfig(endpoint_url=ENDPOINT))
    print(half_imported, type(fs).__name__, fs.cat_file(path).decode())
"""


def test_a_worker_cancelled_while_importing_s3fs_can_still_reach_s3(s3, s3_endpoint):
    s3.pipe_file(f"{s3.bucket}/doc.txt", b"still readable")
    code = (
        textwrap.dedent(IMPORT_S3FS_INTERRUPTED_THEN_READ)
        .replace("URL", repr(f"s3://{s3.bucket}/doc.txt"))
        .replace("ENDPOINT", repr(s3_endpoint))
    )
    assert run_python(code).split(" ", 2) == ["True", "S3FileSystem", "still readable\n"]


# Allocates and frees a 64 MiB tensor on a worker thread, as Ray Data calls a stage, and reports
# glibc's own accounting: bytes in mmapped blocks while it lives, and free bytes kept in the heap after.
ALLOCATE_ON_A_THREAD = """
    import ctypes, json, sys, threading
    import torch
    from pipeline.model.cpu_allocator import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    if "call" in sys.argv:
        keep_freed_memory()
    report = {}

    def work():
        block = torch.ones(16 * 2**20)  # 64 MiB of float32
        report["mmapped_while_alive"] = mallinfo2().hblkhd
        del block
        report["free_in_heap_after"] = mallinfo2().fordblks

    thread = threading.Thread(target=work) if "thread" in sys.argv else None
    work() if thread is None else (thread.start(), thread.join())
    print(json.dumps(report))
"""

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
BLOCK = 64 * 2**20


def allocation_report(*flags: str, env: dict | None = None) -> dict:
    code = textwrap.dedent(ALLOCATE_ON_A_THREAD).replace("sys.argv", repr(list(flags)))
    return json.loads(run_python(code, env))


@needs_glibc
def test_by_default_a_large_tensor_is_mmapped_and_handed_back_on_free():
    report = allocation_report("thread")
    assert report["mmapped_while_alive"] >= BLOCK
    assert report["free_in_heap_after"] < BLOCK


@needs_glibc
def test_the_actor_environment_keeps_large_blocks_in_the_heap_on_a_worker_thread():
    report = allocation_report("thread", env={"GLIBC_TUNABLES": GLIBC_TUNABLES})
    assert report["mmapped_while_alive"] < BLOCK
    assert report["free_in_heap_after"] >= BLOCK


@needs_glibc
def test_keep_freed_memory_does_the_same_for_the_calling_process_main_thread():
    report = allocation_report("call")
    assert report["mmapped_while_alive"] < BLOCK
    assert report["free_in_heap_after"] >= BLOCK
