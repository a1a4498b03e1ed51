"""Where one pack's forward pass spends its time, by kind of work: matmul, attention, norm (+ residual),
RoPE, activation, and what is left (unlabelled element-wise ops, copies, idle gaps and launch overhead).

The model is not changed for it: the benchmark labels each element-wise step and the attention call
with torch.profiler.record_function for the profiled pass only, and counts aten::linear as matmul.
On a GPU a label's time is the device time of the kernels launched inside it; on CPU, its CPU time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.timing import timed
from pipeline import Encoder

FAMILIES = ("matmul", "attention", "norm", "rope", "activation")
LEFT = "other (unlabelled ops, copies, idle, launches)"


def profile_pack(encoder: Encoder, flat_ids: np.ndarray, cu_seqlens: np.ndarray, warmup: int = 2) -> dict:
    """Milliseconds by family of one forward pass over this pack, and the pass's wall time."""
    device = encoder.device
    model, attention = encoder.model, encoder._attention
    for _ in range(warmup):
        encoder.embed_packed(flat_ids, cu_seqlens)
    ops = model.ops
    # Blocks compiled whole are one graph each: labels inside would be ignored, and swapping the steps
    # would make torch.compile build them again. Only their matmuls are told apart.
    whole_blocks = ops.name == "in compiled blocks"
    labelled = dataclasses.replace(
        ops,
        rms_norm=_labelled("norm", ops.rms_norm),
        add_rms_norm=_labelled("norm", ops.add_rms_norm),
        heads_with_rope=_labelled("rope", ops.heads_with_rope),
        silu_mul=_labelled("activation", ops.silu_mul),
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if not whole_blocks:
        model.ops, encoder._attention = labelled, _labelled("attention", attention)
    try:
        with profile(activities=activities) as prof:
            _, wall_s = timed(lambda: encoder.embed_packed(flat_ids, cu_seqlens), device)
        wall_ms = wall_s * 1e3
    finally:
        model.ops, encoder._attention = ops, attention
    on_gpu = device.type == "cuda"
    ms = dict.fromkeys(FAMILIES, 0.0)
    busy_ms = 0.0
    events = prof.key_averages()
    # aten::linear holds its mm; inside a compiled graph the mm is called directly.
    matmuls = ("aten::linear",) if any(e.key == "aten::linear" for e in events) else ("aten::mm", "aten::addmm")
    for event in events:
        inclusive = (event.device_time_total if on_gpu else event.cpu_time_total) / 1e3
        if event.key in ms:
            ms[event.key] += inclusive
        elif event.key in matmuls:
            ms["matmul"] += inclusive
        if on_gpu:
            busy_ms += event.self_device_time_total / 1e3
    ms[LEFT] = max(0.0, wall_ms - sum(ms.values()))
    return {"wall_ms": wall_ms, "tokens": int(cu_seqlens[-1]), "ms": ms, "device_busy_ms": busy_ms if on_gpu else None}


def profile_table(profile_: dict) -> str:
    """The profile as the lines benchmarks/RESULTS.md keeps."""
    wall = profile_["wall_ms"]
    lines = [f"one pack of {profile_['tokens']:,} tokens: {wall:.2f} ms"]
    lines += [f"  {family:<48}{ms:9.2f} ms {ms / wall:6.1%}" for family, ms in profile_["ms"].items()]
    if profile_["device_busy_ms"] is not None:
        busy = profile_["device_busy_ms"]
        lines.append(
            f"  {'GPU busy (all kernels) / idle':<48}{busy:9.2f} ms {busy / wall:6.1%} / {1 - busy / wall:.1%}"
        )
    return "\n".join(lines)


def _labelled(label: str, fn):
    def run(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return run
