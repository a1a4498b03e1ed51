#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in one go, on a machine with an NVIDIA GPU:
# the parity tests on the GPU paths, then (a) and (b) on the released 28 x 768 shape with eager and
# torch.compile'd element-wise steps, then (c), the job on local Ray (needs ray installed there).
# Run from the repository root: `make bench-gpu` (or `PYTHON=python3 bash benchmarks/gpu.sh`).
set -euo pipefail
PYTHON=${PYTHON:-python}
DOCS=${DOCS:-4000}

$PYTHON -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_batching.py
$PYTHON -m benchmarks.throughput --shape neobert --docs "$DOCS" --baseline-batch 32 --skip-job
$PYTHON -m benchmarks.throughput --shape neobert --docs "$DOCS" --skip-baseline --skip-job --compile
if $PYTHON -c "import ray" 2>/dev/null; then
    $PYTHON -m benchmarks.throughput --shape neobert --docs "$DOCS" --skip-baseline --compile
else
    echo "(c) left out: ray is not installed here"
fi
