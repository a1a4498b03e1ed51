"""gcp-storage-emulator on 127.0.0.1, honouring the create precondition that real GCS enforces.

    python tests/gcs_emulator.py PORT

The emulator ignores `ifGenerationMatch`, so a create-only upload (`ifGenerationMatch=0`, which
gcsfs sends for `pipe_file(..., mode="create")` and the writer lease relies on) would silently
overwrite. Here an upload whose precondition does not hold gets 412 Precondition Failed, as from
GCS; everything else is the emulator's own code. Run as a process of its own: the tests stop it by
its pid.
"""

from __future__ import annotations

import logging
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def insert_with_preconditions(request, response, storage, *args, **kwargs):
    expected = request.query.get("ifGenerationMatch")
    name = _object_name(request)
    if expected and name is not None and int(expected[0]) != _generation(storage, request.params["bucket_name"], name):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions did not hold."}})
        return None
    return objects.insert(request, response, storage, *args, **kwargs)


def _with_preconditions(handler):
    return insert_with_preconditions if handler is objects.insert else handler


def main(port: int) -> None:
    server.HANDLERS = tuple(
        (pattern, {method: _with_preconditions(handler) for method, handler in methods.items()})
        for pattern, methods in server.HANDLERS
    )
    logging.basicConfig(level=logging.WARNING)
    server.create_server("127.0.0.1", port, in_memory=True).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
