"""Failpoints: named places where a fault test can kill the job, like a machine dying there.

Inactive unless NEOBERT_PIPELINE_FAILPOINT names the point. Then the first process to reach it
(the first only, when NEOBERT_PIPELINE_FAILPOINT_ONCE names a marker file) kills the driver whose
pid is in NEOBERT_PIPELINE_DRIVER_PID (0: none, only this worker dies), then itself with SIGKILL:
no cleanup runs. In-process tests of a single stage use crash_at instead: the failpoint raises
SimulatedCrash, and nothing after it runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

ENV_POINT = "NEOBERT_PIPELINE_FAILPOINT"
ENV_ONCE = "NEOBERT_PIPELINE_FAILPOINT_ONCE"
ENV_DRIVER_PID = "NEOBERT_PIPELINE_DRIVER_PID"


_crash_here: set[str] = set()


class SimulatedCrash(BaseException):
    """A failpoint armed by crash_at fired: as if the process died there (a BaseException, like a kill)."""


@contextmanager
def crash_at(name: str) -> Iterator[None]:
    """Within this block, the failpoint `name` raises SimulatedCrash in this process."""
    _crash_here.add(name)
    try:
        yield
    finally:
        _crash_here.discard(name)


def failpoint(name: str) -> None:
    if name in _crash_here:
        raise SimulatedCrash(name)
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
