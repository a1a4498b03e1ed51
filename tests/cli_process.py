"""The CLI run as a real process with its own local Ray: to completion, to a failpoint where it is killed
(the fault tests), or to its one-line error (the operator-experience and storage tests)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

RUN_TIMEOUT_S = 180


def run_cli(*args: str, env: dict | None = None, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`neobert-pipeline ARGS` in a fresh process with its own Ray temp folder; nothing outlives it.
    env adds to this process's environment; a None value removes that variable."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    environment = {**os.environ, "RAY_TMPDIR": ray_tmp, **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={k: v for k, v in environment.items() if v is not None},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    finally:
        with_signal(process.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def with_signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def embed_process(
    input_dir,
    output_dir,
    model,
    *extra: str,
    failpoint: str | None = None,
    target: str = "driver",
    once=None,
    id_field: str | None = "id",
    target_file_mb: float = 0.03,
) -> int:
    """Run `neobert-pipeline embed` to completion or to its failpoint (pipeline/faults.py), killed there
    with SIGKILL; its exit code. Nothing outlives it: the process group dies as a machine would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOBERT_PIPELINE_")}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    if failpoint:
        env["NEOBERT_PIPELINE_FAILPOINT"] = failpoint
        env["NEOBERT_PIPELINE_FAILPOINT_ONCE"] = str(once)
        if target == "worker":
            env["NEOBERT_PIPELINE_DRIVER_PID"] = "0"  # nobody to kill but the worker itself
    command = [
        *(sys.executable, "-m", "pipeline.cli", "embed", str(input_dir), str(output_dir)),
        *("--model", str(model), "--num-cpus", "2"),
        *(("--id-field", id_field) if id_field else ()),
        *("--tokens-per-batch", "512", "--rows-per-tokenize-batch", "64", "--target-file-mb", str(target_file_mb)),
        *extra,
    ]
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        with_signal(process.pid, signal.SIGKILL)  # the driver's Ray processes die with it, like a machine
    if process.returncode not in (0, -signal.SIGKILL):
        print(output.decode(errors="replace")[-5000:])
    return process.returncode
