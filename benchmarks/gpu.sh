#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in one go, on a machine with an NVIDIA GPU:
# the parity tests on the GPU paths; (b) with eager element-wise steps, its profile by kind of work
# and a table of attention backends x token budgets; (b) with each block compiled whole; then (a), (b) and (c) on the released 28 x 768 shape with torch.compile'd element-wise steps,
# with the profile, the minimum cosine against CPU float32, and the figures written to
# benchmarks/results/<device>-latest.json ((c) needs ray installed there).
# Run from the repository root: `make bench-gpu` (or `PYTHON=python3 bash benchmarks/gpu.sh`).
set -euo pipefail
PYTHON=${PYTHON:-python}
DOCS=${DOCS:-4000}
SHAPE=${SHAPE:-neobert}  # SHAPE=tiny DOCS=24 checks the script itself on a CPU machine
RESULTS=${RESULTS:-benchmarks/results}

$PYTHON -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_batching.py
# Eager: the profile, and (b) with each attention backend at each token budget (the table that sets the defaults).
$PYTHON -m benchmarks.throughput --shape "$SHAPE" --docs "${SWEEP_DOCS:-$((DOCS / 2))}" --skip-baseline --skip-job \
    --profile --sweep ${BUDGETS:-32768 65536 131072 262144}
# Each encoder block compiled whole (a setting still to be decided by this measurement).
$PYTHON -m benchmarks.throughput --shape "$SHAPE" --docs "$DOCS" --skip-baseline --skip-job --compile-blocks --profile
job=()
$PYTHON -c "import ray" 2>/dev/null || { job=(--skip-job); echo "(c) left out: ray is not installed here"; }
$PYTHON -m benchmarks.throughput --shape "$SHAPE" --docs "$DOCS" --baseline-batch 32 --compile --profile \
    --results-dir "$RESULTS" "${job[@]}"
