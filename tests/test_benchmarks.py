"""The throughput benchmark runs end to end on the tiny model and writes the figures the GPU issue
asks for: what a GPU session runs unattended must work before a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_throughput_benchmark_writes_its_figures_and_a_profile_by_kind_of_work(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--shape", "tiny", "--docs", "24", "--baseline-batch", "4"]
        + ["--skip-job", "--profile", "--sweep", "2048", "--dtype", "bfloat16", "--fp32-sample", "8"]
        + ["--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (written,) = tmp_path.glob("*-latest.json")
    figures = json.loads(written.read_text())

    assert figures["shape"]["name"] == "tiny" and figures["documents"] == 24
    assert figures["a_tokens_per_s"] > 0 and figures["b_tokens_per_s"] > 0
    assert figures["c_tokens_per_s"] is None  # --skip-job
    assert figures["padding_waste"]["b"] == 0 < figures["padding_waste"]["a"]
    assert 0 < figures["b_matmul_fraction"] and figures["matmul_flops_per_s"] > 0
    # bfloat16 on CPU against float32: close, not equal
    assert 0.9 < figures["min_cosine_vs_fp32"] < 1.0
    assert figures["settings"]["dtype"] == "bfloat16" and figures["settings"]["tokens_per_batch"] > 0
    profile = figures["profile"]
    assert set(profile["ms"]) >= {"matmul", "attention", "norm", "rope", "activation"}
    assert all(ms > 0 for family, ms in profile["ms"].items() if family in ("matmul", "attention", "norm"))
    assert sum(profile["ms"].values()) >= profile["wall_ms"] * 0.99
    assert "one pack of" in run.stdout and "matmul" in run.stdout
    (swept,) = figures["sweep"]  # the CPU has one attention backend
    assert swept["attention"] == "sdpa" and swept["tokens_per_batch"] == 2048 and swept["tokens_per_s"] > 0
