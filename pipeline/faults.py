"""Failpoints: named places where a fault test can kill the job, like a machine dying there.

Inactive unless NEOBERT_PIPELINE_FAILPOINT names the point. Then the first process to reach it
(the first only, when NEOBERT_PIPELINE_FAILPOINT_ONCE names a marker file) kills the driver whose
pid is in NEOBERT_PIPELINE_DRIVER_PID (0: none, only this worker dies), then itself with SIGKILL:
no cleanup runs.
"""

from __future__ import annotations

import os
import signal

ENV_POINT = "NEOBERT_PIPELINE_FAILPOINT"
ENV_ONCE = "NEOBERT_PIPELINE_FAILPOINT_ONCE"
ENV_DRIVER_PID = "NEOBERT_PIPELINE_DRIVER_PID"


def failpoint(name: str) -> None:
    if os.environ.get(ENV_POINT) != name:
        return
    once = os.environ.get(ENV_ONCE)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # already fired once
    driver = os.environ.get(ENV_DRIVER_PID)
    if driver and int(driver) not in (0, os.getpid()):
        os.kill(int(driver), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def arm_driver() -> None:
    """In the driver, before Ray starts: let failpoints in workers find and kill this process."""
    if os.environ.get(ENV_POINT) and not os.environ.get(ENV_DRIVER_PID):
        os.environ[ENV_DRIVER_PID] = str(os.getpid())
