"""Real object-store servers for the tests, each a process on 127.0.0.1 stopped by its pid.

- S3: moto's standalone server.
- GCS: gcp-storage-emulator (tests/gcs_emulator.py, which adds GCS's create precondition).
- Azure Blob: Azurite, from the npm install in tests/azurite that `make` performs.
- The Hugging Face Hub's read API over a local folder (tests/hub_server.py).

Clients find them through each store's standard settings (an endpoint URL for S3,
STORAGE_EMULATOR_HOST for GCS, a connection string for Azure), set by the fixtures in conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).parent
AZURITE = TESTS / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's one well-known development account (documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


# Logs of the servers running now: a failing test's report ends with their last lines (conftest.py),
# because a server's own error (a 500's traceback) is otherwise lost with the CI machine.
RUNNING_LOGS: set[Path] = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(command: list[str], url: str, log_path: Path) -> Iterator[str]:
    """Start command, wait until url answers over HTTP (any status), yield url; stop it by pid."""
    log = open(log_path, "w")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent, start_new_session=True
    )
    deadline = time.monotonic() + 60
    RUNNING_LOGS.add(log_path)
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means it is serving
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start on {url}; see {log_path}") from None
                time.sleep(0.05)
        yield url
    finally:
        RUNNING_LOGS.discard(log_path)
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    server.wait(timeout=10)


@contextmanager
def moto_server(folder: Path) -> Iterator[str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, f"http://127.0.0.1:{port}", folder / "moto.log") as url:
        yield url


@contextmanager
def gcs_emulator(folder: Path, port: int) -> Iterator[str]:
    command = [sys.executable, str(TESTS / "gcs_emulator.py"), str(port)]
    with serving(command, f"http://127.0.0.1:{port}", folder / "gcs.log") as url:
        yield url


def azurite_connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


@contextmanager
def azurite(folder: Path, port: int) -> Iterator[str]:
    """Azurite's blob service; yields the connection string for its development account."""
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run `make` (it installs Azurite with npm into tests/azurite)")
    command = [
        str(AZURITE),
        *("--blobHost", "127.0.0.1", "--blobPort", str(port)),
        *("--inMemoryPersistence", "--silent", "--skipApiVersionCheck", "--disableTelemetry"),
    ]
    with serving(command, f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", folder / "azurite.log"):
        yield azurite_connection_string(port)


@contextmanager
def hub_server(folder: Path, repos: Path) -> Iterator[str]:
    """The Hub's dataset read API over repos/<org>/<name>/; yields its endpoint (HF_ENDPOINT)."""
    port = free_port()
    command = [sys.executable, str(TESTS / "hub_server.py"), str(port), str(repos)]
    with serving(command, f"http://127.0.0.1:{port}", folder / "hub.log") as url:
        yield url
