"""The CLI run as a real process with its own local Ray, killed at a failpoint, for the fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

RUN_TIMEOUT_S = 180


def embed_process(
    input_dir,
    output_dir,
    model,
    *extra: str,
    failpoint: str | None = None,
    target: str = "driver",
    once=None,
    id_field: str | None = "id",
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
        *("--tokens-per-batch", "512", "--rows-per-tokenize-batch", "64", "--target-file-mb", "0.03"),
        *extra,
    ]
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the driver's Ray processes die with it, like a machine
        except ProcessLookupError:
            pass
    if process.returncode not in (0, -signal.SIGKILL):
        print(output.decode(errors="replace")[-5000:])
    return process.returncode
