"""`neobert-pipeline`: the command line. It owns the terminal; the library only logs."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, load_config
from pipeline.model.pooling import POOLINGS

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
EXIT_NO_INPUT = 3
EXIT_OUTPUT_CONFLICT = 4
EXIT_MODEL = 5
EXIT_BAD_INPUT = 6
EXIT_STORAGE_UNREACHABLE = 7
EXIT_INCOMPLETE = 8

# flag -> dotted config key; a flag left out keeps the config file's (or the default) value.
EMBED_FLAGS: list[tuple[str, str, dict]] = [
    ("--model", "model", dict(help="Hub id, folder or URL of the checkpoint (default chandar-lab/NeoBERT)")),
    ("--revision", "revision", dict(help="Hub revision to pin")),
    ("--format", "format", dict(choices=["auto", "jsonl", "parquet", "text"])),
    ("--text-field", "text_field", dict(help="field/column with the text (default: text)")),
    ("--id-field", "id_field", dict(help="field/column with the document id (default: derived from shard and row)")),
    ("--pooling", "pooling", dict(choices=list(POOLINGS), help="default: as the checkpoint declares")),
    ("--normalize", "normalize", dict(action=argparse.BooleanOptionalAction, help="L2-normalise embeddings")),
    ("--max-length", "max_length", dict(type=int, help="tokens per document, at most the checkpoint's")),
    ("--output-dtype", "output_dtype", dict(choices=["float32", "float16"])),
    ("--long-documents", "long_documents", dict(choices=["truncate", "chunk", "chunk-mean"])),
    ("--chunk-overlap", "chunk_overlap", dict(type=int, help="tokens shared by neighbouring windows (default 64)")),
    ("--duplicate-ids", "duplicate_ids", dict(choices=["keep", "flag", "reject"])),
    ("--strict", "strict", dict(action="store_const", const=True, help="stop at the first bad row or file")),
    (
        "--max-error-rate",
        "max_error_rate",
        dict(type=float, help="fail (exit 8) if more than this fraction of rows is dead-lettered, e.g. 0.01"),
    ),
    ("--device", "device", dict(help="auto, cpu or cuda")),
    ("--dtype", "dtype", dict(choices=["float32", "bfloat16", "float16"], help="compute dtype")),
    ("--attention", "attention", dict(choices=["auto", "varlen", "flash_attn", "sdpa"])),
    (
        "--compile",
        "compile",
        dict(action="store_const", const=True, help="fuse element-wise steps with torch.compile (for GPUs)"),
    ),
    ("--tokens-per-batch", "tokens_per_batch", dict(type=int, help="token budget of one forward pass")),
    ("--rows-per-tokenize-batch", "rows_per_tokenize_batch", dict(type=int)),
    ("--min-actors", "actors.min_actors", dict(type=int)),
    ("--max-actors", "actors.max_actors", dict(type=int)),
    ("--gpus-per-actor", "actors.gpus_per_actor", dict(type=float)),
    ("--cpus-per-actor", "actors.cpus_per_actor", dict(type=float)),
    ("--target-file-mb", "target_file_mb", dict(type=float)),
    ("--endpoint-url", "storage.endpoint_url", dict(help="S3-compatible endpoint (MinIO, ...)")),
    ("--anon", "storage.anon", dict(action="store_const", const=True, help="anonymous object storage access")),
    ("--ray-address", "ray_address", dict(help="Ray cluster to join (default: RAY_ADDRESS or a local Ray)")),
    ("--num-cpus", "num_cpus", dict(type=int, help="CPUs of the local Ray")),
    ("--progress-interval", "progress_interval_s", dict(type=float, help="seconds between progress lines")),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neobert-pipeline", description="Batch NeoBERT embeddings on Ray Data.")
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
    for name, help_text in (
        ("verify", "check that every input row is in OUTPUT exactly once (exit 0 only if so)"),
        ("status", "show how far the job writing OUTPUT got"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("output", help="the job's output folder or URL")
        command.add_argument("--endpoint-url", help="S3-compatible endpoint")
        command.add_argument("--anon", action="store_true", help="anonymous object storage access")
        if name == "verify":
            command.add_argument("--skip-inputs", action="store_true", help="do not re-list the inputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "embed":
        return _embed(args)
    return _inspect(args)


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig
    from pipeline.verify import output_status, verify_output

    storage = StorageConfig(endpoint_url=args.endpoint_url, anon=args.anon)
    if args.command == "status":
        print("\n".join(output_status(args.output, storage)))
        return EXIT_OK
    report = verify_output(args.output, storage, check_inputs=not args.skip_inputs)
    for fact in report.facts:
        print(f"ok       {fact}")
    for problem in report.problems:
        print(f"PROBLEM  {problem}")
    print("verify: all guarantees hold" if report.ok else f"verify: {len(report.problems)} problems")
    return EXIT_OK if report.ok else EXIT_FAILED


def _embed(args: argparse.Namespace) -> int:
    from pipeline.embed_stage import ModelMismatchError
    from pipeline.encoder import CompileError
    from pipeline.faults import arm_driver
    from pipeline.io.readers import BadInputError
    from pipeline.io.shards import NoInputError
    from pipeline.job import ErrorRateExceededError, InputChangedError, SettingsMismatchError, run_embedding_job
    from pipeline.model.checkpoint import CheckpointError
    from pipeline.model.embedding_defaults import EmbeddingSettingsError
    from pipeline.model.sentence_transformers_meta import UnsupportedSentenceTransformerError
    from pipeline.model.transformers_encoder import UnsupportedModelError

    overrides = {key: getattr(args, key) for _, key, _ in EMBED_FLAGS}
    overrides.update(input=args.input, output=args.output)
    known_errors = {
        ConfigError: EXIT_BAD_SETTINGS,
        NoInputError: EXIT_NO_INPUT,
        SettingsMismatchError: EXIT_OUTPUT_CONFLICT,
        InputChangedError: EXIT_OUTPUT_CONFLICT,
        CheckpointError: EXIT_MODEL,
        ModelMismatchError: EXIT_MODEL,
        UnsupportedModelError: EXIT_MODEL,
        UnsupportedSentenceTransformerError: EXIT_MODEL,
        EmbeddingSettingsError: EXIT_BAD_SETTINGS,
        CompileError: EXIT_BAD_SETTINGS,
        BadInputError: EXIT_BAD_INPUT,
    }
    try:
        from botocore.exceptions import EndpointConnectionError

        known_errors[EndpointConnectionError] = EXIT_STORAGE_UNREACHABLE
    except ImportError:  # no S3 support installed, so no S3 errors either
        pass
    _hide_ray_tracebacks_of((*known_errors, ErrorRateExceededError))
    try:
        config = load_config(args.config, overrides)
        arm_driver()
        summary = run_embedding_job(config, overwrite=args.overwrite)
    except ErrorRateExceededError as err:
        _print_summary(err.summary)
        return _fail(EXIT_INCOMPLETE, err)
    except Exception as err:
        # Errors raised inside Ray tasks arrive wrapped with a remote traceback: show the cause alone.
        cause = _root_cause(err)
        code = next((code for kind, code in known_errors.items() if isinstance(cause, kind)), None)
        if code is None:
            raise
        if code == EXIT_STORAGE_UNREACHABLE:
            return _fail(code, f"{cause}; committed work is kept: re-run the same command once storage answers")
        return _fail(code, cause)
    _print_summary(summary)
    if summary.failed_files:
        return _fail(EXIT_INCOMPLETE, f"{len(summary.failed_files)} input files could not be read to their end")
    return EXIT_OK


def _print_summary(summary) -> None:
    print("\nembedding finished")
    for line in summary.lines():
        print(f"  {line}")


class _KnownErrorFilter(logging.Filter):
    """Drops Ray Data's console records about an error this CLI reports itself in one line.

    Ray Data logs an exception raised in a read task as an internal error, with two tracebacks; the
    records still reach Ray Data's log file. Errors of any other kind keep their traceback.
    """

    def __init__(self, known: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        seen = set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, self.known):
                return False
            err = getattr(err, "cause", None) or _actor_init_error(err) or err.__cause__ or err.__context__
        return True


def _hide_ray_tracebacks_of(known: tuple[type[BaseException], ...]) -> None:
    import ray.data  # noqa: F401  (configures Ray Data's logging, whose handlers get the filter)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_KnownErrorFilter(known))


def _root_cause(err: BaseException) -> BaseException:
    """The user-facing exception inside Ray's task-error wrappers."""
    import ray.exceptions

    while True:
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, BaseException):
            err = err.cause
        elif (init_error := _actor_init_error(err)) is not None:
            err = init_error
        else:
            return err


def _actor_init_error(err: BaseException) -> BaseException | None:
    """What the constructor of an actor raised, for an ActorDiedError that says so (first of its args)."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.ActorDiedError) and err.args and isinstance(err.args[0], BaseException):
        return err.args[0]
    return None


def _fail(code: int, err: BaseException | str) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
