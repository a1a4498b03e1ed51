"""Joining Ray or starting a private local one, checking that the actors fit in it, and letting go."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from pipeline.config import JobConfig
from pipeline.errors import SettingsError

log = logging.getLogger(__name__)


def connect_ray(config: JobConfig) -> bool:
    """Join the cluster (config, else RAY_ADDRESS as `ray job submit` sets it), or start a private local Ray.

    True when this started a local Ray of its own. A Ray that `ray start` left running on this machine
    is joined only when asked (--ray-address auto): starting a private one never depends on it.
    """
    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    log.info(
        "starting a local Ray for this job%s; --ray-address auto joins one already running here",
        f" with {config.num_cpus} CPUs" if config.num_cpus else "",
    )
    ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


@contextlib.contextmanager
def ray_for_checks(address: str | None = None) -> Iterator[None]:
    """Ray for a check over a whole output (verify): the caller's if it has one, the cluster's
    (address, else RAY_ADDRESS as `ray job submit` sets it), or a local one started and stopped here."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def check_actors_fit(config: JobConfig, local: bool) -> None:
    """Refuse actors that a local Ray can never place (the job would wait for ever); warn on a cluster,
    whose autoscaler may still add the nodes."""
    actors = config.actors
    per_actor = {"CPU": actors.cpus_per_actor, "GPU": actors.gpus_per_actor, **actors.resources_per_actor}
    have = ray.cluster_resources()
    where = "this machine's local Ray" if local else "the cluster, for now,"
    for name, amount in per_actor.items():
        need = amount * actors.min_actors
        # A local Ray must keep a CPU for the read and pack tasks besides the actors.
        spare = 1 if local and name == "CPU" else 0
        if need and need + spare > have.get(name, 0):
            message = (
                f"{actors.min_actors} embedding actors need {need:g} {name}{' and 1 CPU to read' if spare else ''}, "
                f"but {where} has {have.get(name, 0):g}"
            )
            if local:
                raise SettingsError(
                    f"{message}; lower --min-actors or the per-actor resources, or run on a cluster (--ray-address)"
                )
            log.warning("%s; the job waits for the autoscaler to add nodes", message)


def release_failed_job(progress, started_ray: bool) -> None:
    """Give back what a failed job holds, so that a re-run in this process can start.

    Ray Data leaves the actors of a failed dataset running while they still had work in flight
    (ray-project/ray#24948): on a small machine they keep the CPUs or GPUs that a re-run's actors
    need, and the re-run waits for ever. A local Ray this job started goes down with them; a Ray the
    caller started is theirs to restart. The CLI is not affected: its process ends.
    """
    if progress is not None:
        with contextlib.suppress(Exception):  # the job's own error is the one to report
            ray.kill(progress)
    if started_ray:
        ray.shutdown()


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress and plan only with verbose; its warnings and errors always."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    if verbose:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; Ray Data's log file keeps everything
            handler.setLevel(logging.WARNING)
            handler.addFilter(_drop_progress_notices)


def _drop_progress_notices(record: logging.LogRecord) -> bool:
    # The notice that progress bars are off: they are off on purpose.
    return not record.name.startswith("ray.data._internal.progress")
