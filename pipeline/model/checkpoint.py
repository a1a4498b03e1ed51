"""Find a checkpoint (Hub id, local folder or fsspec URL), tell NeoBERT from other encoders, load NeoBERT.

Safetensors only: pickled weights can run code when loaded and are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.model.neobert import NeoBERT, NeoBERTConfig
from pipeline.model.state_dict_adapter import CheckpointKeyError, to_checkpoint, to_native

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")
# Only these files are ever fetched: weights, tokenizer and sentence-transformers metadata; no code, no pickles.
CHECKPOINT_FILES = (
    "config.json",
    WEIGHTS_FILE,
    SHARDED_WEIGHTS_INDEX,
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",  # sentencepiece vocabularies (XLM-R, T5)
    "modules.json",
    "sentence_*_config.json",
    "config_sentence_transformers.json",
    "*_Pooling/config.json",
)
# The two kinds of checkpoint: NeoBERT runs on the native model, everything else through transformers.
NEOBERT = "neobert"
TRANSFORMERS = "transformers"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, fetched or trusted."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A NeoBERT encoder with where it came from."""

    model: NeoBERT
    config: NeoBERTConfig
    folder: Path
    weights_sha256: str


def resolve_checkpoint(
    name_or_path: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
) -> Path:
    """Local folder holding the checkpoint files, fetching them from the Hub or an fsspec URL if needed.

    storage_options go to the fsspec filesystem of a URL (e.g. {"endpoint_url": ...} for MinIO).
    """
    if "://" in name_or_path:
        folder = _fetch_url(name_or_path, cache_dir, storage_options or {})
    elif Path(name_or_path).expanduser().is_dir():
        folder = Path(name_or_path).expanduser()
    elif _HUB_ID.match(name_or_path) and not Path(name_or_path).exists():
        folder = _fetch_hub(name_or_path, revision, cache_dir)
    else:
        raise CheckpointError(
            f"{name_or_path!r} is neither a folder, a URL (s3://..., gs://...) nor a Hub id (owner/name)"
        )
    _check_weights_format(folder, name_or_path)
    return folder


def _check_weights_format(folder: Path, source: str) -> None:
    if (folder / WEIGHTS_FILE).is_file() or (folder / SHARDED_WEIGHTS_INDEX).is_file():
        return
    pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if pickles:
        raise CheckpointError(
            f"{source} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
            f"loaded and are refused; convert them to {WEIGHTS_FILE} first"
        )
    raise CheckpointError(f"{source} has no {WEIGHTS_FILE}")


def _fetch_hub(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[*CHECKPOINT_FILES, *PICKLE_WEIGHTS],
        )
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"cannot reach the Hugging Face Hub for {repo_id!r} and it is not in the local cache; "
            "download the checkpoint elsewhere and pass --model PATH (a folder or an s3:// URL)"
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"the Hub refused {repo_id!r}: {err}; check the id, revision and token") from err
    return Path(path)


def _fetch_url(url: str, cache_dir: str | None, storage_options: dict) -> Path:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    root = root.rstrip("/")
    cache = Path(cache_dir or os.environ.get("NEOBERT_PIPELINE_CACHE", "~/.cache/neobert-pipeline")).expanduser()
    folder = cache / "checkpoints" / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    present = {Path(p).name for p in fs.ls(root, detail=False)}
    if "config.json" not in present:
        raise CheckpointError(f"{url} has no config.json; is it the checkpoint folder?")
    wanted = [name for name in sorted(present) if any(fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)]
    for name in wanted:
        _download(fs, f"{root}/{name}", folder / name)
    if "modules.json" in present:  # sentence-transformers stages keep their config in subfolders
        for module in json.loads((folder / "modules.json").read_text()):
            relative = f"{module['path']}/config.json" if module.get("path") else None
            if relative and any(fnmatch(relative, pattern) for pattern in CHECKPOINT_FILES):
                (folder / module["path"]).mkdir(exist_ok=True)
                _download(fs, f"{root}/{relative}", folder / relative)
    for name in PICKLE_WEIGHTS:
        if name in present and WEIGHTS_FILE not in present:
            (folder / name).touch()  # lets the format check name the refused file without downloading it
    return folder


def _download(fs, remote: str, target: Path) -> None:
    size = fs.info(remote).get("size")
    if not target.exists() or target.stat().st_size != size:
        tmp = target.with_suffix(".partial")
        fs.get(remote, str(tmp))
        tmp.replace(target)  # a crash mid-download never leaves a half file under the real name


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_family(folder: Path) -> str:
    """NEOBERT for a NeoBERT config.json (its model_type), TRANSFORMERS for any other model type."""
    with open(folder / "config.json") as f:
        model_type = json.load(f).get("model_type")
    if not model_type:
        raise CheckpointError(f"{folder / 'config.json'} names no model_type; is it a model checkpoint?")
    return NEOBERT if str(model_type).lower() == NEOBERT else TRANSFORMERS


def weights_sha256(folder: Path) -> str:
    """Digest of the weights: of model.safetensors, or of the shard digests of a sharded checkpoint."""
    if (folder / WEIGHTS_FILE).is_file():
        return sha256_of_file(folder / WEIGHTS_FILE)
    index = json.loads((folder / SHARDED_WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    return hashlib.sha256("".join(sha256_of_file(folder / name) for name in shards).encode()).hexdigest()


def load_neobert_config(folder: Path) -> NeoBERTConfig:
    with open(folder / "config.json") as f:
        return NeoBERTConfig.from_json_dict(json.load(f))


def load_neobert(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedCheckpoint:
    """Build NeoBERT from folder/config.json and load model.safetensors with strict key and shape checks."""
    config = load_neobert_config(folder)
    with torch.device("meta"):  # no random init of weights about to be replaced (seconds at full size)
        model = NeoBERT(config)
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
    return LoadedCheckpoint(model, config, folder, weights_sha256(folder))


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
    for name, tensor in NeoBERT(config).state_dict().items():
        if name.endswith("norm.weight"):
            native[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            native[name] = (
                0.02 * torch.randn(tensor.shape, generator=generator) * (3.0 if "embeddings" in name else 1.0)
            )
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
