"""Typed job settings, read from YAML and overridden by command-line flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SettingsError
from pipeline.model.devices import DEVICE_PATTERN, GPU_ONLY_ATTENTION, HALF_DTYPES, compute_dtype
from pipeline.model.embedding_defaults import POOLINGS

DEFAULT_MODEL = "chandar-lab/NeoBERT"
# The dead-letter rate above which a run fails (exit 8) unless max_error_rate says otherwise.
DEFAULT_MAX_ERROR_RATE = 0.05


class ConfigError(SettingsError):
    """A config file or flag has an unknown key or a bad value."""


GCS_PROTOCOLS = ("gs", "gcs")
AZURE_PROTOCOLS = ("az", "abfs", "abfss")


class StorageConfig(BaseModel):
    """How to reach object storage; the standard credential chains apply when left empty."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, a test server); None for AWS itself."""
    anon: bool = False
    """Read public buckets without credentials."""
    max_attempts: int = Field(8, ge=1)
    """S3 requests are retried with exponential backoff (botocore's standard mode) up to this many tries."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Further fsspec filesystem options, passed as they are (e.g. {"requester_pays": true})."""

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        options = dict(self.options)
        if protocol in ("s3", "s3a"):
            if self.endpoint_url:
                options["endpoint_url"] = self.endpoint_url
            if self.anon:
                options["anon"] = True
            # Outages of the endpoint are ridden out by botocore's retries (and s3fs's own, around them).
            options.setdefault("config_kwargs", {}).setdefault(
                "retries", {"max_attempts": self.max_attempts, "mode": "standard"}
            )
        elif protocol in GCS_PROTOCOLS:
            if self.anon:
                options["token"] = "anon"
            elif os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") and "token" not in options:
                # gcsfs's own chain would go on to anonymous access when the file named there is unusable.
                options["token"] = "google_default"
        elif protocol in AZURE_PROTOCOLS and self.anon:
            options["anon"] = True
        return options


class ActorPoolConfig(BaseModel):
    """The embedding actors: one model copy each, autoscaled between min_actors and max_actors."""

    model_config = ConfigDict(extra="forbid")

    min_actors: int = Field(1, ge=1)
    """Actors kept alive from the start."""
    max_actors: int = Field(1, ge=1)
    """Upper bound when Ray scales the pool up (one per GPU on GPU clusters)."""
    gpus_per_actor: float = Field(0.0, ge=0)
    """1 on GPU clusters (one model per GPU); 0 runs the model on CPU."""
    cpus_per_actor: float = Field(1.0, gt=0)
    """CPU cores reserved per actor."""
    resources_per_actor: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each actor needs, e.g. {"embed_slot": 1} on nodes started with one such
    slot, to place one actor per node or keep actors off some nodes."""
    torch_threads: int | None = Field(None, ge=1)
    """torch's intra-op threads per actor; default: cpus_per_actor. More than reserved lets a CPU
    actor use cores that light tokenize tasks share (a 2-core machine running both)."""

    @field_validator("max_actors")
    @classmethod
    def _max_not_below_min(cls, value: int, info) -> int:
        if value < info.data.get("min_actors", 1):
            raise ValueError("max_actors must be >= min_actors")
        return value


class JobConfig(BaseModel):
    """Everything one embedding run needs."""

    model_config = ConfigDict(extra="forbid")

    input: str
    """URL, folder or glob of the input shards (local, s3://, gs://, az://, hf://datasets/...)."""
    output: str
    """Folder or URL that receives the Parquet embeddings and the run record."""
    model: str = DEFAULT_MODEL
    """Hub id, local folder or fsspec URL of a NeoBERT checkpoint, or of any encoder transformers runs natively."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """Input format; auto goes by file extension (.jsonl[.gz|.zst], .parquet, .txt)."""
    fingerprint: Literal["store", "content"] = "store"
    """How a run tells an input shard changed: store (size + ETag on object stores, size + mtime on disk:
    free, but an in-place edit that keeps size and mtime goes unseen) or content (size + SHA-256 of the
    bytes: every shard is read once per run to hash it)."""
    refresh: bool = False
    """A scheduled refresh: shards that changed since they were embedded are embedded again whole, and
    shards no longer listed are recorded as deleted, in a new generation (without it, a changed shard
    is refused and a vanished one only noted)."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) holding the document text."""
    id_field: str | None = None
    """Field holding a document id; without it, ids are '<shard path>#<row>'."""
    pooling: Literal[POOLINGS] | None = None
    """cls: first-token vector; mean/max over tokens; mean_sqrt_len: sum / sqrt(length); last: last token.
    Default: what a sentence-transformers checkpoint declares, else cls for NeoBERT (its model card) and
    mean for other encoders."""
    normalize: bool | None = None
    """L2-normalise each embedding; default: yes if the checkpoint has a sentence-transformers Normalize stage."""
    max_length: int | None = Field(None, ge=2)
    """Tokens per document, special tokens included; default: a sentence-transformers max_seq_length, else
    the checkpoint's position limit, which is also the upper bound."""
    duplicate_ids: Literal["keep", "flag", "reject"] = "keep"
    """Repeated values of id_field: keep (embed all, no check), flag (embed all, list the repeats in
    duplicates/) or reject (embed the first in shard/row order, dead-letter the rest).
    flag and reject read every shard's ids once before embedding."""
    strict: bool = False
    """Stop at the first bad row or unreadable file, naming it, instead of recording it in errors/."""
    max_error_rate: float = Field(DEFAULT_MAX_ERROR_RATE, ge=0, le=1)
    """Fail the run (exit 8) when more than this fraction of rows were dead-lettered (0.01 = 1%); 1 never
    fails on dead letters. A run that embeds nothing at all fails whatever this says."""
    long_documents: Literal["truncate", "chunk", "chunk-mean"] = "truncate"
    """Documents past max_length tokens: truncate (flagged per row); chunk into windows of max_length
    tokens sharing chunk_overlap tokens, one output row per window with its character span; or
    chunk-mean, the mean of the windows' vectors, one row per document."""
    chunk_overlap: int = Field(64, ge=0)
    """Tokens each window shares with the one before it, when chunking."""
    output_dtype: Literal["float32", "float16"] = "float32"
    """Element type of the stored embeddings."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N for the embedding actors; auto is cuda when gpus_per_actor > 0, else cpu."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Compute dtype; default bfloat16 on GPU, float32 on CPU."""
    attention: Literal["auto", "varlen", "flash_attn", "sdpa"] = "auto"
    """Attention backend; auto picks the fastest one the device supports."""
    compile: bool = False
    """Fuse NeoBERT's element-wise steps (RMSNorm, RoPE, SwiGLU gate, residual adds) with torch.compile.
    Pays on GPU, where they are memory-bound; on CPU it needs a C++ compiler and minutes to build."""
    tokens_per_batch: int | None = Field(None, ge=16)
    """Token budget of one forward pass; default 8192 on CPU, 65536 on GPU."""
    rows_per_tokenize_batch: int = Field(2048, ge=1)
    """Rows tokenized and length-sorted together before packing."""
    actors: ActorPoolConfig = Field(default_factory=ActorPoolConfig)
    """The embedding actor pool."""
    target_file_mb: float = Field(256, gt=0)
    """Approximate size of each output Parquet file."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object storage settings for input, output and model URLs."""
    lease: bool = True
    """Hold the output's writer lease while writing (lease.py), so that a second run on the same output
    waits or is refused. False (--no-lease) only for stores without an exclusive create (GCS, Azure
    here), where you must make sure yourself that one run writes at a time."""
    wait_for_lease_s: float = Field(0.0, ge=0)
    """Seconds to wait for another run to release the output's lease before giving up (exit 10)."""
    lease_ttl_s: float = Field(60.0, ge=4)
    """A run renews its lease every lease_ttl_s / 4; a lease not renewed for lease_ttl_s may be taken over.
    A run on this host whose process is gone loses its lease at once."""
    ray_address: str | None = None
    """Ray cluster to join; default: RAY_ADDRESS, else a local Ray started for the job."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray started for the job (default: all)."""
    progress_interval_s: float = Field(10.0, gt=0)
    """Seconds between progress lines."""
    model_label: str | None = None
    """Free text stored with the model in the run record (the demo marks a random fallback model here)."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @model_validator(mode="after")
    def _duplicates_need_ids(self) -> JobConfig:
        if self.duplicate_ids != "keep" and self.id_field is None:
            raise ValueError(f"duplicate_ids={self.duplicate_ids} needs id_field: derived ids never repeat")
        return self

    @model_validator(mode="after")
    def _text_has_no_ids(self) -> JobConfig:
        if self.format == "text" and self.id_field is not None:
            raise ValueError("text shards are one document per line, with no fields: drop id_field (--id-field)")
        return self

    @model_validator(mode="after")
    def _device_fits_resources(self) -> JobConfig:
        gpus = self.actors.gpus_per_actor
        if self.device.startswith("cuda") and gpus == 0:
            raise ValueError(f"device {self.device} needs GPUs: set actors.gpus_per_actor (--gpus-per-actor 1)")
        if self.device == "cpu" and gpus > 0:
            raise ValueError(f"device cpu never uses the {gpus:g} GPUs per actor it would reserve: drop them")
        if self.attention in GPU_ONLY_ATTENTION:
            dtype = compute_dtype(self.actor_device, self.dtype)
            if not self.actor_device.startswith("cuda") or dtype not in HALF_DTYPES:
                raise ValueError(
                    f"attention {self.attention} runs on CUDA GPUs in {' or '.join(HALF_DTYPES)}, not on "
                    f"{self.actor_device} in {dtype}; use attention auto or sdpa"
                )
        return self

    @property
    def actor_device(self) -> str:
        """The device the embedding actors run on: device, with auto settled by gpus_per_actor."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.actors.gpus_per_actor > 0 else "cpu"

    def model_storage_options(self) -> dict[str, Any]:
        """fsspec options for the model's URL (storage settings apply to s3:// models too)."""
        protocol = self.model.split("://", 1)[0] if "://" in self.model else "file"
        return self.storage.fsspec_options(protocol)


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> JobConfig:
    """Merge a YAML file (optional) with overrides (flags; None means 'not given') and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of settings, not {type(raw).__name__}")
    for key, value in overrides.items():
        if value is None:
            continue
        target = raw
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise ConfigError(f"invalid settings{f' in {path}' if path else ''}: {problems}") from err
