"""Find a checkpoint (Hub id, local folder or fsspec URL), fetch its files, tell NeoBERT from other encoders.

Safetensors only: pickled weights can run code when loaded and are refused. Only the files listed in
CHECKPOINT_FILES are ever fetched: weights, tokenizer and sentence-transformers metadata; no code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from fnmatch import fnmatch
from pathlib import Path

from pipeline.errors import ModelError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (WEIGHTS_FILE, "model-*-of-*.safetensors")
PICKLE_WEIGHTS = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")
METADATA_FILES = (
    "config.json",
    SHARDED_WEIGHTS_INDEX,
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
CHECKPOINT_FILES = (*METADATA_FILES, *WEIGHT_FILES)
# The two kinds of checkpoint: NeoBERT runs on the native model, everything else through transformers.
NEOBERT = "neobert"
TRANSFORMERS = "transformers"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# These add padding_idx + 1 to every position id, so the usable length is max_position_embeddings - that.
_POSITIONS_OFFSET_BY_PAD = ("roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text")


class CheckpointError(ModelError):
    """A checkpoint could not be found, fetched or trusted."""


class UnsupportedModelError(ModelError):
    """The checkpoint's architecture is not one transformers can run without remote code."""


def cache_root(cache_dir: str | None = None) -> Path:
    """Where fetched checkpoints and weight digests are kept between runs."""
    return Path(cache_dir or os.environ.get("NEOBERT_PIPELINE_CACHE", "~/.cache/neobert-pipeline")).expanduser()


def resolve_checkpoint(
    name_or_path: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    *,
    weights: bool = True,
) -> Path:
    """Local folder holding the checkpoint files, fetching them from the Hub or an fsspec URL if needed.

    weights=False fetches only the small files from the Hub (config, tokenizer, sentence-transformers
    metadata): what the driver needs. storage_options go to the fsspec filesystem of a URL.
    """
    from_hub = False
    if "://" in name_or_path:
        folder = _fetch_url(name_or_path, cache_dir, storage_options or {})
    elif Path(name_or_path).expanduser().is_dir():
        folder = Path(name_or_path).expanduser()
    elif _HUB_ID.match(name_or_path) and not Path(name_or_path).exists():
        folder, from_hub = _fetch_hub(name_or_path, revision, cache_dir, weights=weights), True
    else:
        raise CheckpointError(
            f"{name_or_path!r} is neither a folder, a URL (s3://..., gs://...) nor a Hub id (owner/name)"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{name_or_path} has no config.json; is it the checkpoint folder?")
    if weights or not from_hub:  # a Hub snapshot without weights is checked when they are fetched
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


def _fetch_hub(repo_id: str, revision: str | None, cache_dir: str | None, *, weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*CHECKPOINT_FILES, *PICKLE_WEIGHTS] if weights else list(METADATA_FILES)
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"cannot reach the Hugging Face Hub for {repo_id!r} and it is not in the local cache; "
            "download the checkpoint elsewhere and pass --model PATH (a folder or an s3:// URL)"
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"the Hub refused {repo_id!r}: {err}; check the id, revision and token") from err
    return Path(path)


def published_weights_sha256(name_or_path: str, revision: str | None, folder: Path) -> str | None:
    """The weights' SHA-256 as the Hub publishes it (the LFS object id), without downloading them.

    The same digest weights.weights_sha256 computes from the files. None for folders and URLs, or when
    the Hub does not answer or publishes no digest for a file.
    """
    if "://" in name_or_path or Path(name_or_path).expanduser().exists() or not _HUB_ID.match(name_or_path):
        return None
    from huggingface_hub import HfApi

    index = folder / SHARDED_WEIGHTS_INDEX
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_FILE]
    try:
        infos = {i.path: i for i in HfApi().get_paths_info(name_or_path, names, revision=revision)}
    except Exception as err:  # offline, refused, or its HTTP library's own errors: hashing the files is exact too
        log.info("no published digest for %s (%s: %s); hashing its weights", name_or_path, type(err).__name__, err)
        return None
    digests = [getattr(getattr(infos.get(name), "lfs", None), "sha256", None) for name in names]
    if not all(digests):
        return None
    return digests[0] if not index.is_file() else hashlib.sha256("".join(digests).encode()).hexdigest()


def _fetch_url(url: str, cache_dir: str | None, storage_options: dict) -> Path:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    root = root.rstrip("/")
    folder = cache_root(cache_dir) / "checkpoints" / hashlib.sha256(url.encode()).hexdigest()[:16]
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
    """SHA-256 of a file, remembered by path, size and modification time so a file is hashed once."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    remembered = cache_root() / "digests" / key
    if remembered.is_file():
        return remembered.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    _remember(remembered, digest.hexdigest())
    return digest.hexdigest()


def _remember(path: Path, digest: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(path)
    except OSError:  # a read-only home only costs a second hashing next time
        pass


def weights_sha256(folder: Path) -> str:
    """Digest of the weights: of model.safetensors, or of the shard digests of a sharded checkpoint."""
    if (folder / WEIGHTS_FILE).is_file():
        return sha256_of_file(folder / WEIGHTS_FILE)
    index = json.loads((folder / SHARDED_WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    return hashlib.sha256("".join(sha256_of_file(folder / name) for name in shards).encode()).hexdigest()


def checkpoint_family(folder: Path) -> str:
    """NEOBERT for a NeoBERT config.json (its model_type), TRANSFORMERS for any other model type."""
    with open(folder / "config.json") as f:
        model_type = json.load(f).get("model_type")
    if not model_type:
        raise CheckpointError(f"{folder / 'config.json'} names no model_type; is it a model checkpoint?")
    return NEOBERT if str(model_type).lower() == NEOBERT else TRANSFORMERS


def hidden_size(folder: Path) -> int:
    """Width of the vectors the checkpoint makes, from its config.json."""
    raw = json.loads((folder / "config.json").read_text())
    width = raw.get("hidden_size") or raw.get("dim") or raw.get("d_model")  # DistilBERT: dim
    if not width:
        raise UnsupportedModelError(
            f"{folder / 'config.json'} (model type {raw.get('model_type')!r}) gives no hidden size; the pipeline "
            "runs NeoBERT and the encoders built into transformers, never code shipped with a checkpoint"
        )
    return int(width)


def position_limit(folder: Path) -> int:
    """The longest input the checkpoint was made for, [CLS] and [SEP] included."""
    config = json.loads((folder / "config.json").read_text())
    if checkpoint_family(folder) == NEOBERT:
        if "max_length" not in config:
            raise CheckpointError(f"{folder / 'config.json'} has no max_length; is it NeoBERT's released config?")
        return int(config["max_length"])
    limit = int(config.get("max_position_embeddings") or 512)
    if str(config.get("model_type", "")).lower() in _POSITIONS_OFFSET_BY_PAD:
        limit -= int(config.get("pad_token_id", 1)) + 1
    return limit
