"""The writer lease: one driver at a time writes an output.

Each holder creates `_lease/<token>.json` with an exclusive create (a conditional PUT,
If-None-Match: *, on S3 and Azure Blob; ifGenerationMatch=0 on GCS; a hard link locally), one token
above the highest there: two drivers racing for the same token cannot both win. The holder is the
highest token. While it runs it rewrites `<token>.alive` every ttl_s / 4; when it ends it writes
`<token>.released`, or after a failure `<token>.abandoned`. Every lease file has one writer (the token
is in its name), so a heartbeat is a plain overwrite, with no precondition.

Another driver may take the lease at once when it was released or abandoned, or when its holder ran
on this host and its process is gone; otherwise once its heartbeat is ttl_s old by the store's own
clock. Taking over from a holder that did not end cleanly first waits TAKEOVER_GRACE_S, so that the
commits its workers had in flight land and count. Commits name the token they were made under (the
fencing token), and the sink checks before each commit that its token is still the highest; a commit
made under a lower token after such a takeover (by the store's clock) belongs to a run that had lost
the lease: manifest.read_state sets it aside and recovery quarantines it, so its rows are embedded
again, and never twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import fsspec

from pipeline.config import AZURE_PROTOCOLS, GCS_PROTOCOLS
from pipeline.errors import PipelineError, SettingsError
from pipeline.io.layout import LEASE, atomic_write, create_exclusive, is_local, join, listing, modified_s, speaks

if TYPE_CHECKING:
    from pipeline.config import JobConfig

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0
# Before taking over a lease that was not released, wait this long: commits the last holder's workers
# had in flight land first, and count.
TAKEOVER_GRACE_S = 5.0
POLL_S = 2.0
# Lease tokens kept: the fences of the last takeovers stay known while a lost writer could still commit.
KEPT_TOKENS = 4
# Runs of this process that have let their lease go: a library caller may run again after a failure
# that kept it from marking its lease abandoned (the store was down).
_ENDED_IN_THIS_PROCESS: set[str] = set()
# Stores whose filesystem here does an exclusive create.
SUPPORTED_PROTOCOLS = ("file", "local", "s3", "s3a", *GCS_PROTOCOLS, *AZURE_PROTOCOLS)


class LeaseHeldError(PipelineError):
    """Another run holds the output's writer lease."""

    exit_code = 10


class LeaseLostError(PipelineError):
    """This run no longer holds the output's writer lease: another run took it over."""

    exit_code = 10


@dataclass(frozen=True)
class LeaseHolder:
    """Who took a lease, written once into `_lease/<token>.json`."""

    token: int
    run_id: str
    host: str
    pid: int
    started_at: str
    ttl_s: float

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, started {self.started_at}, token {self.token})"


@dataclass(frozen=True)
class LeaseState:
    """The highest token's holder and how it stands, as status shows it."""

    holder: LeaseHolder
    taken_s: float
    """When the token was taken, by the store's clock."""
    heartbeat_age_s: float
    released: bool
    """Let go after a clean end: the next run needs no grace."""
    abandoned: bool
    """Let go after a failure: its workers may still be writing."""

    @property
    def live(self) -> bool:
        return (
            not (self.released or self.abandoned)
            and self.heartbeat_age_s < self.holder.ttl_s
            and not _gone(self.holder)
        )


def lease_supported(fs: fsspec.AbstractFileSystem) -> bool:
    return speaks(fs, SUPPORTED_PROTOCOLS)


def token_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, float]:
    """Every lease token there with the store time it was taken."""
    return _tokens(listing(fs, join(root, LEASE), ".json"))


def fences(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[int, float]]:
    """(token, the store time it was taken) for each kept token that took over from a holder that did
    not end cleanly: a commit made under a lower token at or after that time is a lost writer's.

    S3 stamps times to the second: a commit in the very second of a takeover counts as lost, which
    costs re-embedding its rows, never a duplicate.
    """
    entries = listing(fs, join(root, LEASE))
    tokens = _tokens(entries)
    ordered = sorted(tokens)
    return [
        (token, tokens[token])
        for previous, token in zip(ordered, ordered[1:], strict=False)
        if join(root, LEASE, f"{previous:012d}.released") not in entries
    ]


def _tokens(entries: dict[str, float]) -> dict[int, float]:
    return {int(_stem(n)): taken for n, taken in entries.items() if n.endswith(".json") and _stem(n).isdigit()}


def read_lease(fs: fsspec.AbstractFileSystem, root: str, now_s: float | None = None) -> LeaseState | None:
    """The current (highest) lease, or None when the output has never been leased.

    The heartbeat's age is by the store's clock (now_s: this machine's, when a glance will do).
    """
    entries = listing(fs, join(root, LEASE))
    tokens = _tokens(entries)
    if not tokens:
        return None
    token = max(tokens)
    holder = LeaseHolder(**json.loads(fs.cat_file(join(root, LEASE, f"{token:012d}.json"))))
    alive = entries.get(join(root, LEASE, f"{token:012d}.alive"), tokens[token])
    released = join(root, LEASE, f"{token:012d}.released") in entries
    abandoned = join(root, LEASE, f"{token:012d}.abandoned") in entries
    age = (store_now(fs, root) if now_s is None else now_s) - alive
    return LeaseState(holder, tokens[token], age, released, abandoned)


class Lease:
    """A held lease: renewed by a heartbeat thread while the job runs, released at the end."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, holder: LeaseHolder) -> None:
        self.fs, self.root, self.holder = fs, root, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")

    @property
    def token(self) -> int:
        return self.holder.token

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join()
        _ENDED_IN_THIS_PROCESS.add(self.holder.run_id)  # even if the store cannot be told below
        # After a failure this run's workers may still be writing: the next run may take the lease at
        # once, but waits out TAKEOVER_GRACE_S first, and fences whatever they commit after that.
        if exc_type is None:
            atomic_write(self.fs, self._path("released"), b"{}")
            return
        try:
            atomic_write(self.fs, self._path("abandoned"), b"{}")
        except Exception as err:  # the run's own error is the one to report; the lease then ages out
            log.warning("could not mark the writer lease abandoned (%s); it expires by itself", err)

    def _beat(self) -> None:
        while not self._stop.wait(self.holder.ttl_s / 4):
            try:
                atomic_write(self.fs, self._path("alive"), json.dumps({"token": self.token}).encode())
            except Exception as err:  # a missed beat is retried at the next one; the lease lasts ttl_s
                log.warning("could not renew the writer lease (%s); retrying", err)

    def _path(self, kind: str) -> str:
        return join(self.root, LEASE, f"{self.token:012d}.{kind}")


def acquire_lease(
    fs: fsspec.AbstractFileSystem, root: str, *, wait_s: float = 0.0, ttl_s: float = DEFAULT_TTL_S
) -> Lease:
    """Take the output's writer lease, waiting up to wait_s for a live holder to let go."""
    deadline = time.monotonic() + wait_s
    waited_for = None
    while True:
        current = read_lease(fs, root)
        if current is not None and current.live:
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"{fs.unstrip_protocol(root)} is being written by {current.holder.describe()}, "
                    f"last heartbeat {current.heartbeat_age_s:.0f}s ago; wait for it (--wait-for-lease SECONDS), "
                    f"or, if it is dead, for its lease to expire {current.holder.ttl_s:.0f}s after its last heartbeat"
                )
            if waited_for != current.holder.token:
                log.info("waiting for %s to release %s", current.holder.describe(), fs.unstrip_protocol(root))
                waited_for = current.holder.token
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            continue
        token = current.holder.token + 1 if current else 1
        if current is not None and not current.released:
            # Commits its workers had in flight land before this token exists, and count; later ones do not.
            log.info("taking over the writer lease from %s, which stopped before its end", current.holder.describe())
            time.sleep(TAKEOVER_GRACE_S)
        holder = LeaseHolder(
            token=token,
            run_id=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            ttl_s=ttl_s,
        )
        try:
            create_exclusive(fs, join(root, LEASE, f"{token:012d}.json"), json.dumps(asdict(holder)).encode())
        except FileExistsError:
            continue  # another driver took this token first: look again
        _forget_old_tokens(fs, root, keep_from=token - KEPT_TOKENS + 1)
        return Lease(fs, root, holder)


@contextmanager
def writer_lease(config: JobConfig, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[int]:
    """Hold the output's writer lease for the block; yields the fencing token (0 with --no-lease)."""
    if not config.lease:
        log.warning("writing %s without the writer lease (--no-lease): run one job on it at a time", config.output)
        yield 0
        return
    if not lease_supported(fs):
        raise SettingsError(
            f"{config.output}: this store cannot create a file only if it is absent here, which the writer lease "
            "needs; pass --no-lease and make sure yourself that one run writes this output at a time"
        )
    with acquire_lease(fs, root, wait_s=config.wait_for_lease_s, ttl_s=config.lease_ttl_s) as lease:
        yield lease.token


def check_lease(fs: fsspec.AbstractFileSystem, root: str, token: int) -> None:
    """Raise LeaseLostError unless token is still the output's highest lease token (0: run without a lease)."""
    if token == 0:
        return
    highest = max(token_files(fs, root), default=0)
    if highest != token:
        raise LeaseLostError(
            f"this run's writer lease on {fs.unstrip_protocol(root)} (token {token}) was taken over by token "
            f"{highest}; its work stops here, and the run holding the lease finishes the output"
        )


def _forget_old_tokens(fs: fsspec.AbstractFileSystem, root: str, keep_from: int) -> None:
    # The last holders' files stay (status and fencing read them); older ones are history.
    for name in listing(fs, join(root, LEASE)):
        if _stem(name).isdigit() and int(_stem(name)) < keep_from:
            fs.rm(name)


def store_now(fs: fsspec.AbstractFileSystem, root: str) -> float:
    """Now, by the store's clock: a local file's mtime is ours; S3 stamps a probe object."""
    if is_local(fs):
        return time.time()
    probe = join(root, LEASE, f"clock-{uuid.uuid4().hex[:8]}")
    fs.pipe_file(probe, b"")
    try:
        fs.invalidate_cache(join(root, LEASE))  # adlfs answers info from its last listing of the folder
        return modified_s(fs.info(probe))
    finally:
        fs.rm(probe)


def _gone(holder: LeaseHolder) -> bool:
    """The holder ran on this host and its process is gone (or is this process, and its run ended):
    its lease can go at once."""
    if holder.host != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        return holder.run_id in _ENDED_IN_THIS_PROCESS
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, as another user
        return False
    return False


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0]
