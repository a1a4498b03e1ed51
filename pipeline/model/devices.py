"""What each kind of device runs by default: one table that the driver and the actors both read.

No torch here: the driver and the config use it before any model is loaded.
"""

from __future__ import annotations

import re

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEFAULT_COMPUTE_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
# Tokens per forward pass: large enough to keep matmuls efficient, small enough for memory.
DEFAULT_MAX_TOKENS = {"cpu": 8192, "cuda": 65536}
# Attention backends that need a CUDA GPU and a 16-bit compute dtype (see attention.py).
GPU_ONLY_ATTENTION = ("varlen", "flash_attn")
HALF_DTYPES = ("bfloat16", "float16")


def device_type(device: str) -> str:
    """cpu or cuda, for a resolved device name such as cuda:1."""
    return device.split(":", 1)[0]


def compute_dtype(device: str, requested: str | None) -> str:
    """The dtype the model computes in on device: as requested, else bfloat16 on GPU and float32 on CPU."""
    return requested or DEFAULT_COMPUTE_DTYPE[device_type(device)]
