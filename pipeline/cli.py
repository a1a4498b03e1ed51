"""`neobert-pipeline`: the command line. It owns the terminal; the library only logs.

Every error a user can cause ends as one `error:` line and the exit code its class carries
(errors.py); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import pyarrow as pa

import pipeline
from pipeline.config import DEFAULT_MAX_ERROR_RATE, load_config
from pipeline.errors import EXIT_OK, PipelineError, as_pipeline_error
from pipeline.model.embedding_defaults import POOLINGS

# flag -> dotted config key; a flag left out keeps the config file's (or the default) value.
EMBED_FLAGS: list[tuple[str, str, dict]] = [
    ("--model", "model", dict(help="Hub id, folder or URL of the checkpoint (default chandar-lab/NeoBERT)")),
    ("--revision", "revision", dict(help="Hub revision (branch, tag or commit) to pin")),
    ("--format", "format", dict(choices=["auto", "jsonl", "parquet", "text"], help="input format (default: auto)")),
    (
        "--fingerprint",
        "fingerprint",
        dict(choices=["store", "content"], help="how changed inputs are told: store size+ETag/mtime, or content hash"),
    ),
    (
        "--refresh",
        "refresh",
        dict(
            action="store_const",
            const=True,
            help="embed changed shards again and record deleted ones, as a new generation (a nightly refresh)",
        ),
    ),
    ("--text-field", "text_field", dict(help="field/column with the text (default: text)")),
    ("--id-field", "id_field", dict(help="field/column with the document id (default: derived from shard and row)")),
    ("--pooling", "pooling", dict(choices=list(POOLINGS), help="default: as the checkpoint declares")),
    ("--normalize", "normalize", dict(action=argparse.BooleanOptionalAction, help="L2-normalise embeddings")),
    ("--max-length", "max_length", dict(type=int, help="tokens per document, at most the checkpoint's")),
    ("--output-dtype", "output_dtype", dict(choices=["float32", "float16"], help="stored vectors (default float32)")),
    (
        "--long-documents",
        "long_documents",
        dict(choices=["truncate", "chunk", "chunk-mean"], help="documents past --max-length (default truncate)"),
    ),
    ("--chunk-overlap", "chunk_overlap", dict(type=int, help="tokens shared by neighbouring windows (default 64)")),
    (
        "--duplicate-ids",
        "duplicate_ids",
        dict(choices=["keep", "flag", "reject"], help="repeated --id-field values (default keep: no check)"),
    ),
    ("--strict", "strict", dict(action="store_const", const=True, help="stop at the first bad row or file")),
    (
        "--max-error-rate",
        "max_error_rate",
        dict(
            type=float,
            help=f"fail (exit 8) above this fraction of dead-lettered rows (default {DEFAULT_MAX_ERROR_RATE})",
        ),
    ),
    ("--device", "device", dict(help="auto, cpu, cuda or cuda:N (default auto: cuda when --gpus-per-actor > 0)")),
    ("--dtype", "dtype", dict(choices=["float32", "bfloat16", "float16"], help="compute dtype (default by device)")),
    (
        "--attention",
        "attention",
        dict(choices=["auto", "varlen", "flash_attn", "sdpa"], help="attention backend (default auto)"),
    ),
    (
        "--compile",
        "compile",
        dict(action="store_const", const=True, help="fuse element-wise steps with torch.compile (for GPUs)"),
    ),
    ("--tokens-per-batch", "tokens_per_batch", dict(type=int, help="token budget of one forward pass")),
    ("--rows-per-tokenize-batch", "rows_per_tokenize_batch", dict(type=int, help="rows tokenized together")),
    ("--min-actors", "actors.min_actors", dict(type=int, help="embedding actors kept alive (default 1)")),
    ("--max-actors", "actors.max_actors", dict(type=int, help="most embedding actors, one per GPU (default 1)")),
    ("--gpus-per-actor", "actors.gpus_per_actor", dict(type=float, help="GPUs per actor: 1 on GPU clusters")),
    ("--cpus-per-actor", "actors.cpus_per_actor", dict(type=float, help="CPU cores per actor (default 1)")),
    ("--target-file-mb", "target_file_mb", dict(type=float, help="largest output Parquet file (default 256)")),
    ("--endpoint-url", "storage.endpoint_url", dict(help="S3-compatible endpoint (MinIO, ...)")),
    ("--anon", "storage.anon", dict(action="store_const", const=True, help="anonymous object storage access")),
    (
        "--wait-for-lease",
        "wait_for_lease_s",
        dict(type=float, help="seconds to wait for another run writing OUTPUT to finish (default 0: exit 10)"),
    ),
    (
        "--no-lease",
        "lease",
        dict(action="store_const", const=False, help="write without the writer lease (stores without one)"),
    ),
    ("--ray-address", "ray_address", dict(help="Ray cluster to join, or auto (default: RAY_ADDRESS, else a new one)")),
    ("--num-cpus", "num_cpus", dict(type=int, help="CPUs of the local Ray (default all)")),
    ("--progress-interval", "progress_interval_s", dict(type=float, help="seconds between progress lines")),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neobert-pipeline", description="Batch NeoBERT embeddings on Ray Data.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {pipeline.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a corpus into Parquet")
    embed.add_argument("input", nargs="?", help="folder, glob or URL of the input shards")
    embed.add_argument("output", nargs="?", help="folder or URL for the embeddings")
    embed.add_argument("--config", help="YAML settings file (flags override it)")
    embed.add_argument(
        "--overwrite", action="store_true", help="discard embeddings already in OUTPUT instead of resuming"
    )
    for flag, key, options in EMBED_FLAGS:
        if "action" not in options and "choices" not in options:
            options = {"metavar": flag.lstrip("-").upper().replace("-", "_"), **options}
        embed.add_argument(flag, dest=key, default=None, **options)
    loudness = embed.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="no progress, only warnings, errors and the summary")
    loudness.add_argument("--verbose", action="store_true", help="also Ray Data's own per-operator progress")
    embed.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="the pipeline's own logs (default INFO)"
    )
    for name, help_text in (
        ("verify", "check that every input row is in OUTPUT exactly once (exit 0 only if so)"),
        ("status", "show how far the job writing OUTPUT got"),
        ("repair", "set aside damaged or stray parts so that a re-run makes OUTPUT whole again"),
        ("export", "write OUTPUT's current view (every current row, once) as plain Parquet under DEST"),
        ("vacuum", "delete the parts of OUTPUT that hold no current row (rewritten or deleted shards)"),
        ("sync", "make a vector database or table (--to URL) hold exactly OUTPUT's current view"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("output", help="the job's output folder or URL")
        command.add_argument("--endpoint-url", help="S3-compatible endpoint")
        command.add_argument("--anon", action="store_true", help="anonymous object storage access")
        if name == "verify":
            command.add_argument("--skip-inputs", action="store_true", help="do not re-list the inputs")
            command.add_argument("--repair", action="store_true", help="repair first (see `repair`), then verify")
            command.add_argument(
                "--sample",
                type=_positive_int,
                metavar="PARTS",
                help="a quick check: read only this many random parts here, not every part on the cluster "
                "(the manifest and inputs are still checked in full; ids are not checked for repeats)",
            )
        if name == "status":
            command.add_argument("--json", action="store_true", help="print the status as one JSON object")
        if name == "export":
            command.add_argument("dest", help="folder or URL to write the Parquet files to (must be empty)")
            command.add_argument("--dead-letters", action="store_true", help="export the current dead letters")
            command.add_argument("--rows-per-file", type=_positive_int, default=1_000_000, metavar="ROWS")
        if name == "vacuum":
            command.add_argument(
                "--keep-generations",
                type=_positive_int,
                default=1,
                metavar="N",
                help="keep every part of the newest N generations, current or not (default 1)",
            )
            command.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
        if name == "sync":
            command.add_argument(
                "--to",
                required=True,
                metavar="URL",
                help="postgresql://user@host:port/db, lancedb:///dir, lancedb+s3://bucket/prefix, "
                "qdrant://host:port/collection (the password from PGPASSWORD or ~/.pgpass, not the URL)",
            )
            command.add_argument("--table", help="the table or collection to keep (default: embeddings)")
            command.add_argument("--batch-rows", type=_positive_int, default=20_000, metavar="ROWS")
            command.add_argument(
                "--create-index", action="store_true", help="build a vector index after loading (HNSW in PostgreSQL)"
            )
            command.add_argument("--json", action="store_true", help="print the summary as one JSON object")
        if name in ("verify", "repair", "vacuum"):
            command.add_argument(
                "--wait-for-lease", type=float, default=0.0, help="seconds to wait for a run writing OUTPUT"
            )
    return parser


def use_system_allocator() -> None:
    """The driver's Arrow memory from the system allocator, unless ARROW_DEFAULT_MEMORY_POOL says
    otherwise: Arrow's default (mimalloc) keeps more of what the driver's batches of shard facts
    freed (a finished re-run of 10^6 shards peaked at 522-535 MB with it, 461-463 MB without;
    benchmarks/RESULTS.md). Ray's workers are other processes and keep Arrow's default."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, not raised
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    use_system_allocator()
    level = "WARNING" if getattr(args, "quiet", False) else (getattr(args, "log_level", None) or "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "embed":
            return _embed(args)
        from pipeline.output_commands import run_output_command

        return run_output_command(args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return user_error.exit_code


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def embed_config(args: argparse.Namespace):
    """The JobConfig of parsed `embed` arguments: the flags over the --config file."""
    overrides = {key: getattr(args, key) for _, key, _ in EMBED_FLAGS}
    return load_config(args.config, {**overrides, "input": args.input, "output": args.output})


def _embed(args: argparse.Namespace) -> int:
    from pipeline.faults import arm_driver
    from pipeline.job import run_embedding_job
    from pipeline.ray_session import quiet_ray_data
    from pipeline.summary import RunIncompleteError
    from pipeline.terminal import ProgressDisplay, print_summary

    config = embed_config(args)
    quiet_ray_data(verbose=args.verbose)
    _hide_ray_tracebacks_of_user_errors()
    arm_driver()
    display = ProgressDisplay()
    try:
        summary = run_embedding_job(config, overwrite=args.overwrite, on_progress=None if args.quiet else display)
    except RunIncompleteError as err:
        display.close()
        print_summary(err.summary)
        raise
    display.close()
    print_summary(summary)
    return EXIT_OK


def _user_error(err: BaseException) -> PipelineError | None:
    """The error a user can act on behind err, unwrapping Ray's task and actor errors; None for a bug."""
    import ray.exceptions

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, BaseException):
            err = err.cause  # the wrapper is an instance of its cause's class too, but says only where it ran
            continue
        found = as_pipeline_error(err)
        if found is not None:
            return found
        err = _actor_init_error(err) or err.__cause__ or err.__context__
    return None


def _actor_init_error(err: BaseException) -> BaseException | None:
    """What the constructor of an actor raised, for an ActorDiedError that says so (first of its args)."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.ActorDiedError) and err.args and isinstance(err.args[0], BaseException):
        return err.args[0]
    return None


def _hide_ray_tracebacks_of_user_errors() -> None:
    """Ray Data logs an exception raised in a task as an internal error, with two tracebacks; for an error
    this CLI reports itself in one line, drop those console records (Ray Data's log file keeps them)."""
    import ray.data  # noqa: F401  (configures Ray Data's logging, whose handlers get the filter)

    def not_a_user_error(record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return err is None or _user_error(err) is None

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(not_a_user_error)


if __name__ == "__main__":
    sys.exit(main())
