"""Run one neobert-pipeline command in this process and print, as the last line, what the driver cost:
wall seconds, CPU seconds, peak RSS and the object-store requests it made (by S3 operation).

Used by benchmarks/scale.py: `python -m benchmarks.scale_child embed IN OUT ...`.
"""

from __future__ import annotations

import collections
import json
import sys
import time

REQUESTS: collections.Counter = collections.Counter()


def count_s3_requests() -> None:
    """Count every S3 API call this process makes (s3fs goes through aiobotocore's client)."""
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call

    async def counted(self, operation_name, api_params):
        REQUESTS[operation_name] += 1
        return await original(self, operation_name, api_params)

    AioBaseClient._make_api_call = counted


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    count_s3_requests()
    from pipeline.cli import main as cli

    started, cpu = time.monotonic(), time.process_time()
    try:
        code = cli(sys.argv[1:])
    except SystemExit as exit_:
        code = exit_.code
    print(
        "SCALE "
        + json.dumps(
            {
                "exit": code,
                "wall_s": round(time.monotonic() - started, 3),
                "cpu_s": round(time.process_time() - cpu, 3),
                "peak_rss_mb": peak_rss_mb(),
                "requests": sum(REQUESTS.values()),
                "by_operation": dict(REQUESTS),
            }
        ),
        flush=True,
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
