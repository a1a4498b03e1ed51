"""NeoBERT's weights: their digest, loading them with strict checks, and writing random ones for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.model.checkpoint import WEIGHTS_FILE, sha256_of_file
from pipeline.model.neobert import NeoBERT, NeoBERTConfig
from pipeline.model.state_dict_adapter import CheckpointKeyError, to_checkpoint, to_native


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A NeoBERT encoder with where it came from."""

    model: NeoBERT
    config: NeoBERTConfig
    folder: Path
    weights_sha256: str


def load_neobert_config(folder: Path) -> NeoBERTConfig:
    with open(folder / "config.json") as f:
        return NeoBERTConfig.from_json_dict(json.load(f))


def load_neobert(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedCheckpoint:
    """Build NeoBERT from folder/config.json and load model.safetensors with strict key and shape checks.

    The file is read from storage once: hashing it (remembered by path, size and mtime, so once per node
    and file) brings it into the page cache, from which load_file maps the tensors.
    """
    config = load_neobert_config(folder)
    with torch.device("meta"):  # no random init of weights about to be replaced (seconds at full size)
        model = NeoBERT(config)
    digest = sha256_of_file(folder / WEIGHTS_FILE)
    state = to_native(load_file(folder / WEIGHTS_FILE))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointKeyError(f"{folder / WEIGHTS_FILE} lacks encoder tensors: {missing}")
    wrong_shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong_shapes:
        raise CheckpointKeyError(f"{folder / WEIGHTS_FILE} disagrees with config.json: {wrong_shapes}")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype).eval()
    return LoadedCheckpoint(model, config, folder, digest)


def neobert_shapes(config: NeoBERTConfig) -> dict[str, torch.Size]:
    """Native tensor names and shapes of a NeoBERT of this size, without allocating it."""
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in NeoBERT(config).state_dict().items()}


def write_random_checkpoint(
    folder: Path, config: NeoBERTConfig, vocab_file: Path, *, layout: str = "released", seed: int = 0
) -> Path:
    """Write a randomly initialised NeoBERT in the released file layout (or the bare-encoder layout).

    For tests and for the offline demo; weights are drawn so activations stay in a sane range.
    """
    if layout not in ("released", "bare"):
        raise ValueError(f"layout must be 'released' or 'bare', not {layout!r}")
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    native = {}
    for name, shape in neobert_shapes(config).items():
        if name.endswith("norm.weight"):
            native[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            native[name] = 0.02 * torch.randn(shape, generator=generator) * (3.0 if "embeddings" in name else 1.0)
    lm_head = None
    if layout == "released":
        lm_head = {
            "decoder.weight": 0.02 * torch.randn(config.vocab_size, config.hidden_size, generator=generator),
            "decoder.bias": torch.zeros(config.vocab_size),
        }
    save_file({k: v.contiguous() for k, v in to_checkpoint(native, lm_head).items()}, folder / WEIGHTS_FILE)
    (folder / "config.json").write_text(json.dumps(config.to_json_dict(), indent=2))
    (folder / "vocab.txt").write_bytes(Path(vocab_file).read_bytes())
    return folder
