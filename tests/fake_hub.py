"""A fake Hugging Face Hub: a real HTTP server on 127.0.0.1 with the endpoints `huggingface_hub` calls to create a
repository, commit files (preupload, then the ndjson commit), create a branch, and download a file (HEAD and GET of
``/{repo}/resolve/{revision}/{path}`` with ``ETag`` and ``X-Repo-Commit``). Nothing of ours is mocked: the test
drives `huggingface_hub` itself, pointed at this server as it would be at a mirror (``HF_ENDPOINT``).

Bounded: loopback only, request bodies up to `MAX_BODY` bytes, a socket timeout per request, shut down after the test.
Tests use it through its `hub` fixture: ``pytest_plugins = ["fake_hub"]`` in the test module.
"""

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import transformers.utils.hub
from huggingface_hub import constants, hf_api

TOKEN = "hf_fake_token_for_tests"
MAX_BODY = 4 * 2**20
REQUEST_TIMEOUT_S = 10


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    private: bool = False

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.commits.get(self.branches.get(branch, ""), {})
        sha = hashlib.sha1(f"{branch}{len(self.commits)}{message}".encode()).hexdigest()
        self.commits[sha] = {**parent, **files}
        self.branches[branch] = sha
        return sha

    def files_at(self, revision: str) -> dict[str, bytes] | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class FakeHub:
    """The server's state: repositories by id, and every request seen (method, path, Authorization header)."""

    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.repos[repo_id].files_at(revision)[path]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head=False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, extra=None, head=False) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ValueError(f"request body of {length} bytes")
            return self.rfile.read(length)

        def _record(self) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

        def do_HEAD(self) -> None:
            self._record()
            self._resolve(head=True)

        def do_GET(self) -> None:
            self._record()
            self._resolve(head=False)

        def do_POST(self) -> None:
            self._record()
            path = urlsplit(self.path).path
            body = self._body()
            with hub.lock:
                if path == "/api/repos/create":
                    return self._create_repo(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # "", "api", "models", owner, name, action, revision...
                if len(parts) >= 7 and parts[:3] == ["", "api", "models"]:
                    repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], unquote("/".join(parts[6:]))
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if action == "preupload":
                        return self._preupload(json.loads(body))
                    if action == "commit":
                        return self._commit(repo_id, repo, revision, body)
                    if action == "branch":
                        return self._branch(repo, revision)
                self._error(404, None, f"no such endpoint {path}")

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            repo = hub.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
            repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init")
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _preupload(self, payload: dict) -> None:
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in payload["files"]
            ]
            self._json(200, {"files": files, "commitOid": None})

        def _commit(self, repo_id: str, repo: FakeRepo, revision: str, body: bytes) -> None:
            if revision not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            if any(line["key"] not in ("header", "file") for line in lines):
                return self._error(400, None, "the fake hub takes regular files only")
            sha = repo.commit(revision, files, header["summary"])
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

        def _branch(self, repo: FakeRepo, branch: str) -> None:
            if branch in repo.branches:
                return self._error(409, None, "Reference already exists")
            repo.branches[branch] = repo.branches["main"]
            self._json(200, {})

        def _resolve(self, head: bool) -> None:
            parts = urlsplit(self.path).path.split("/")  # "", owner, name, "resolve", revision, path...
            if len(parts) < 6 or parts[3] != "resolve":
                return self._error(404, None, "not found", head=head)
            repo_id, revision, path = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
            with hub.lock:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found", head=head)
                files = repo.files_at(revision)
                if files is None:
                    return self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
                sha = repo.branches.get(revision, revision)
                if path not in files:
                    return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha}, head=head)
                content = files[path]
            headers = {"ETag": f'"{_git_blob_sha(content)}"', "X-Repo-Commit": sha}
            self._send(200, content, {"Content-Type": "application/octet-stream", **headers}, head=head)

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1 as `huggingface_hub`'s endpoint (as ``HF_ENDPOINT`` makes it), online, with an empty
    cache of its own and a token in ``HF_TOKEN``. ``HF_ENDPOINT`` is read when `huggingface_hub` is imported, so the
    constants it set are patched."""
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # clients made before this fixture read the endpoint then: huggingface_hub's module-level one (behind
        # `create_repo` & co.) and the one `transformers` makes on first use (behind `push_to_hub`), dropped here
        monkeypatch.setattr(hf_api.api, "endpoint", fake.url)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        yield fake
