"""The Hugging Face Hub's read API for dataset repositories, served from a local folder on 127.0.0.1.

    python tests/hub_server.py PORT FOLDER

FOLDER/<org>/<name>/... is the dataset repository `org/name` at revision `main`. Served are the
paths huggingface_hub's HfFileSystem reads through (HF_ENDPOINT pointed here): repository info
(`/api/datasets/<repo>/revision/<rev>`), the tree listing (`/api/datasets/<repo>/tree/<rev>/<path>`,
paged with a `Link: <...>; rel="next"` header as the Hub pages it), `paths-info`, and file downloads
(`/datasets/<repo>/resolve/<rev>/<path>`, with HTTP ranges). Blob ids are git's blob hashes of the
file contents, as on the Hub. Only the read side: no uploads, no Xet storage, no authentication.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE = 2  # entries per tree page: small, so that every listing in a test crosses pages
REVISION_SHA = "0" * 40


def blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def entry(root: Path, path: Path) -> dict:
    name = path.relative_to(root).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(), "path": name}
    return {"type": "file", "oid": blob_id(path), "size": path.stat().st_size, "path": name}


class HubHandler(BaseHTTPRequestHandler):
    folder: Path

    def log_message(self, *args) -> None:  # the tests read the pipeline's log, not this one's
        pass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", url.path)
        if not match or not (root := self._repo(match[1])):
            return self._json({"error": "Repository not found"}, HTTPStatus.NOT_FOUND)
        length = int(self.headers.get("content-length", 0))
        paths = urllib.parse.parse_qs(self.rfile.read(length).decode()).get("paths", [])  # a form, as HfApi posts
        found = [entry(root, root / p) for p in paths if (root / p).exists()]
        self._json(found)

    def _answer(self, send_body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        if match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if not self._repo(match[1]):
                return self._json({"error": "Repository not found"}, HTTPStatus.NOT_FOUND)
            return self._json({"_id": match[1], "id": match[1], "sha": REVISION_SHA, "private": False})
        if match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(match[1], (match[3] or "/").lstrip("/"), url.query)
        if match := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._file(match[1], match[3], send_body)
        self._json({"error": f"no such API path: {path}"}, HTTPStatus.NOT_FOUND)

    def _repo(self, repo_id: str) -> Path | None:
        root = self.folder / repo_id
        return root if root.is_dir() else None

    def _tree(self, repo_id: str, below: str, query: str) -> None:
        root = self._repo(repo_id)
        if root is None or not (root / below).is_dir():
            return self._json({"error": "Entry not found"}, HTTPStatus.NOT_FOUND)
        params = urllib.parse.parse_qs(query)
        recursive = params.get("recursive", ["False"])[0].lower() == "true"
        found = (root / below).rglob("*") if recursive else (root / below).iterdir()
        entries = [entry(root, p) for p in sorted(found)]
        start = int(params.get("cursor", ["0"])[0])
        headers = {}
        if start + PAGE < len(entries):
            following = urllib.parse.urlencode({**{k: v[0] for k, v in params.items()}, "cursor": start + PAGE})
            link = f"http://{self.headers['host']}{urllib.parse.urlsplit(self.path).path}?{following}"
            headers["Link"] = f'<{link}>; rel="next"'
        self._json(entries[start : start + PAGE], headers=headers)

    def _file(self, repo_id: str, name: str, send_body: bool) -> None:
        root = self._repo(repo_id)
        path = root / name if root else None
        if path is None or not path.is_file():
            return self._json({"error": "Entry not found"}, HTTPStatus.NOT_FOUND)
        data = path.read_bytes()
        status, body = HTTPStatus.OK, data
        if ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", "")):
            first = int(ranged[1])
            last = min(int(ranged[2]) if ranged[2] else len(data) - 1, len(data) - 1)
            status, body = HTTPStatus.PARTIAL_CONTENT, data[first : last + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{blob_id(path)}"')
        self.send_header("X-Repo-Commit", REVISION_SHA)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _json(self, value, status: HTTPStatus = HTTPStatus.OK, headers: dict | None = None) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, text in (headers or {}).items():
            self.send_header(key, text)
        self.end_headers()
        self.wfile.write(body)


def main(port: int, folder: str) -> None:
    HubHandler.folder = Path(folder)
    ThreadingHTTPServer(("127.0.0.1", port), HubHandler).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
