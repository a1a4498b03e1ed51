"""A benchmark's scratch folder, deleted when the benchmark exits: a run writes corpora, outputs and
checkpoints of hundreds of MB, and a machine that runs benchmarks often should not fill up with them."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
