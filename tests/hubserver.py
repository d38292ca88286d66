"""A local imitation of the Hugging Face hub on 127.0.0.1, for the ``hf://`` download tests.

It answers what ``huggingface_hub`` and a downloader ask of the hub for dataset repos: repo
info at a revision (``/api/datasets/{repo}/revision/{rev}``, giving the commit), the tree
listing (``/api/datasets/{repo}/tree/{rev}/{path}``, paginated with ``Link`` headers as the
hub does), and resolve URLs (``/datasets/{repo}/resolve/{rev}/{path}``). A file kept in LFS
is answered with a redirect to a CDN with the hub's ``X-Linked-Size``, ``X-Linked-Etag`` and
``X-Repo-Commit`` headers; the CDN is a ``FileServer`` (which can drop connections and serve
wrong bytes) holding the LFS objects by sha256, on another port, behind a signed URL. A file
kept in git is served by the hub itself. A private repo answers 401 without its token, and
errors carry the hub's ``X-Error-Code``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.httpserver import FileServer

CDN_SIGNATURE = "X-Amz-Signature=cdn-signature-secret"
"""The query string of every CDN redirect, which logs must not show."""


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """A dataset repo: its commits (oldest first) and which paths are in LFS."""

    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    lfs_suffixes: tuple[str, ...] = (".zst", ".gz", ".parquet")
    token: str | None = None
    """Set for a private repo: requests must carry ``Bearer {token}``."""

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)

    def in_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)


class HubServer:
    """The hub's API and resolve endpoints on one port, its CDN on another."""

    def __init__(self, root: Path, page_size: int = 3):
        (root / "cdn").mkdir(parents=True, exist_ok=True)
        self.cdn_root = root / "cdn"
        self.cdn = FileServer(str(self.cdn_root))
        self.repos: dict[str, HubRepo] = {}
        self.page_size = page_size
        self.requests: list[tuple[str, str | None]] = []
        """(path, Authorization header) of every request to the hub itself."""
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def push(
        self,
        repo_id: str,
        files: dict[str, bytes],
        token: str | None = None,
        commit: str | None = None,
    ) -> str:
        """Commit ``files`` (the whole tree) to ``repo_id``'s main, as ``commit`` (a real
        repo's, to serve a config pinned to it) or a hash of the tree; returns the commit."""
        repo = self.repos.setdefault(repo_id, HubRepo(token=token))
        tree = json.dumps({p: hashlib.sha256(d).hexdigest() for p, d in sorted(files.items())})
        commit = (
            commit or hashlib.sha1(f"{repo_id}:{len(repo.commits)}:{tree}".encode()).hexdigest()
        )
        repo.commits.append((commit, dict(files)))
        for path, data in files.items():
            if repo.in_lfs(path):
                (self.cdn_root / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return commit

    def cdn_path(self, data: bytes) -> str:
        """The CDN path an LFS object is served at (for ``cdn.misbehave``)."""
        return "/" + hashlib.sha256(data).hexdigest()

    def _entry(self, repo: HubRepo, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if repo.in_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, repo: HubRepo, files: dict[str, bytes], folder: str, recursive: bool) -> list:
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if recursive or "/" not in rest:
                entries[path] = self._entry(repo, path, data)
            if "/" in rest:
                sub = prefix + rest.split("/")[0]
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": "0" * 40})
        return sorted(entries.values(), key=lambda e: e["path"])

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the tests read ``hub.requests`` instead."""

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Type", "application/json")
                body = json.dumps({"error": code}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, payload: object, link: str | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if link:
                    self.send_header("Link", f'<{link}>; rel="next"')
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                with hub._lock:
                    hub.requests.append((unquote(parts.path), self.headers.get("Authorization")))
                segments = parts.path.strip("/").split("/")
                if segments[:2] == ["api", "datasets"] and len(segments) >= 6:
                    self._api(segments[2:], parse_qs(parts.query))
                elif segments[0] == "datasets" and len(segments) >= 6 and segments[3] == "resolve":
                    self._resolve(segments[1:])
                else:
                    self._error(404, "RepoNotFound")

            def _repo(self, owner: str, name: str) -> HubRepo | None:
                repo = hub.repos.get(f"{owner}/{name}")
                if repo is None:
                    self._error(404, "RepoNotFound")
                    return None
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(401, "RepoNotFound")
                    return None
                return repo

            def _api(self, segments: list[str], query: dict[str, list[str]]) -> None:
                owner, name, action, revision, *path = segments
                repo = self._repo(owner, name)
                if repo is None:
                    return
                found = repo.files_at(unquote(revision))
                if found is None:
                    self._error(404, "RevisionNotFound")
                    return
                commit, files = found
                if action == "revision":
                    siblings = [{"rfilename": p} for p in sorted(files)]
                    self._json({"id": f"{owner}/{name}", "sha": commit, "siblings": siblings})
                    return
                folder = unquote("/".join(path)).strip("/")
                if folder and not any(p.startswith(folder + "/") for p in files):
                    self._error(404, "EntryNotFound")
                    return
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                entries = hub._tree(repo, files, folder, recursive)
                start = int(query.get("cursor", ["0"])[0])
                page = entries[start : start + hub.page_size]
                link = None
                if start + hub.page_size < len(entries):
                    here = urlsplit(self.path)
                    link = f"{hub.url}{here.path}?recursive={recursive}&cursor={start + len(page)}"
                self._json(page, link)

            def _resolve(self, segments: list[str]) -> None:
                owner, name, _, revision, *path = segments
                repo = self._repo(owner, name)
                if repo is None:
                    return
                found = repo.files_at(unquote(revision))
                path_in_repo = unquote("/".join(path))
                if found is None or path_in_repo not in found[1]:
                    self._error(404, "EntryNotFound" if found else "RevisionNotFound")
                    return
                commit, files = found
                data = files[path_in_repo]
                self.send_response(302 if repo.in_lfs(path_in_repo) else 200)
                self.send_header("X-Repo-Commit", commit)
                if repo.in_lfs(path_in_repo):
                    sha256 = hashlib.sha256(data).hexdigest()
                    self.send_header("ETag", f'"{sha256}"')
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    location = f"{hub.cdn.url}/{quote(sha256)}?{CDN_SIGNATURE}"
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_header("ETag", f'"{git_blob_id(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    @contextmanager
    def running(self) -> Iterator[HubServer]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            with self.cdn.running():
                yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()
