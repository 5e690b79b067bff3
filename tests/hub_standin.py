"""A stand-in for the Hugging Face Hub, for `factory publish`'s tests. It is not the Hub: it is a small HTTP
server on 127.0.0.1 (port 0, in a thread) that answers only the calls huggingface_hub makes to publish a
dataset, the way the Hub answers them (routes and JSON read from huggingface_hub's hf_api.py, _commit_api.py
and lfs.py):

- `POST /api/repos/create`: creates a dataset repo with a `main` branch (409 if it exists), or refuses with
  `refuse_create` (e.g. 403); `GET /api/datasets/<repo>` (what create_repo asks after a refusal) refuses too;
- `POST /api/datasets/<repo>/branch/<branch>`: creates a branch from main (409 if it exists);
- `POST /api/validate-yaml`: the card's metadata header must be a YAML mapping;
- `POST /api/datasets/<repo>/preupload/<rev>`: Parquet files are `lfs` (as the Hub's default .gitattributes
  makes them), the rest `regular`;
- `POST /datasets/<repo>.git/info/lfs/objects/batch`: LFS upload and verify actions pointing back here, then
  `PUT /lfs/upload/<oid>` (the body must hash to the oid) and `POST /lfs/verify/<oid>`;
- `POST /api/datasets/<repo>/commit/<rev>`: the NDJSON commit (inline `file`s and uploaded `lfsFile`s); answers
  the commit id and URL.

The client must not use xet (HF_HUB_DISABLE_XET): xet uploads go to a storage service this does not imitate.
Every request is kept (method, path, headers, body), and every commit with its files' bytes. Any other call
is answered 404 and listed in `unexpected`, so a test sees what it did not foresee.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"
Answer = tuple[int, Any, dict[str, str]]  # status, JSON body (None: empty), extra headers


@dataclass
class Received:
    """One request as the stand-in received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Commit:
    """One commit: its files by path, and how each arrived (`file` inline or `lfsFile` through LFS)."""

    repo_id: str
    revision: str
    oid: str
    summary: str
    description: str
    files: dict[str, bytes] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)


@dataclass
class Repo:
    """A dataset repo: its visibility and each branch's head commit id."""

    private: bool
    branches: dict[str, str]


class HubStandIn:
    """The stand-in server; use it as a context manager and point HF_ENDPOINT at `url`."""

    def __init__(self, refuse_create: int | None = None, lfs_suffixes: tuple[str, ...] = (".parquet",)) -> None:
        self.refuse_create = refuse_create
        self.lfs_suffixes = lfs_suffixes
        self.requests: list[Received] = []
        self.unexpected: list[str] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._routes: list[tuple[str, re.Pattern[str], Any]] = [
            ("POST", re.compile(r"/api/repos/create"), self._create_repo),
            ("GET", re.compile(rf"/api/datasets/{REPO}(?:/revision/(?P<rev>.+))?"), self._repo_info),
            ("POST", re.compile(rf"/api/datasets/{REPO}/branch/(?P<branch>.+)"), self._create_branch),
            ("POST", re.compile(r"/api/validate-yaml"), self._validate_yaml),
            ("POST", re.compile(rf"/api/datasets/{REPO}/preupload/(?P<rev>.+)"), self._preupload),
            ("POST", re.compile(rf"/datasets/{REPO}\.git/info/lfs/objects/batch"), self._lfs_batch),
            ("PUT", re.compile(r"/lfs/upload/(?P<oid>[0-9a-f]{64})"), self._lfs_put),
            ("POST", re.compile(r"/lfs/verify/(?P<oid>[0-9a-f]{64})"), self._lfs_verify),
            ("POST", re.compile(rf"/api/datasets/{REPO}/commit/(?P<rev>.+)"), self._commit),
        ]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # ------------------------------------------------------------------------------------------ checks
    def token_leaks(self, token: str) -> list[str]:
        """Every place the token reached other than an `Authorization: Bearer <token>` header."""
        leaks = []
        for r in self.requests:
            if token in r.path:
                leaks.append(f"{r.method} {r.path}: in the path")
            for name, value in r.headers:
                if token in value and not (name.lower() == "authorization" and value == f"Bearer {token}"):
                    leaks.append(f"{r.method} {r.path}: in header {name}")
            if token.encode() in r.body:
                leaks.append(f"{r.method} {r.path}: in the body")
        return leaks

    # ------------------------------------------------------------------------------------------ routing
    def answer(self, method: str, path: str, body: bytes) -> Answer:
        for verb, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if verb == method and match:
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self._lock:
                    return handler(body, **groups)
        self.unexpected.append(f"{method} {path}")
        return _error(404, f"the Hub stand-in does not answer {method} {path}")

    def _create_repo(self, body: bytes) -> Answer:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if self.refuse_create:
            return self._refusal(repo_id)
        if payload.get("type") != "dataset":
            return _error(400, "the stand-in only makes dataset repos")
        if repo_id in self.repos:
            return _error(409, "You already created this dataset repo", url=f"{self.url}/datasets/{repo_id}")
        first = _oid("initial", repo_id)
        self.repos[repo_id] = Repo(payload.get("visibility") == "private", {"main": first})
        return 200, {"url": f"{self.url}/datasets/{repo_id}", "name": repo_id}, {}

    def _refusal(self, repo_id: str) -> Answer:
        owner = repo_id.split("/")[0]
        return _error(self.refuse_create or 403, f'You don\'t have the rights to create a dataset under "{owner}"')

    def _repo_info(self, body: bytes, repo: str, rev: str = "main") -> Answer:
        if self.refuse_create:
            return self._refusal(repo)
        return _error(404, "Repository not found", code="RepoNotFound")

    def _create_branch(self, body: bytes, repo: str, branch: str) -> Answer:
        if repo not in self.repos:
            return _error(404, "Repository not found", code="RepoNotFound")
        heads = self.repos[repo].branches
        if branch in heads:
            return _error(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        heads[branch] = heads[start]
        return 200, {}, {}

    def _validate_yaml(self, body: bytes) -> Answer:
        content = json.loads(body)["content"]
        header = content.split("---")[1] if content.startswith("---") else ""
        try:
            metadata = yaml.safe_load(header)
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata header is not a mapping"}]}, {}
        return 200, {"warnings": []}, {}

    def _branch_problem(self, repo: str, rev: str) -> Answer | None:
        if repo not in self.repos:
            return _error(404, "Repository not found", code="RepoNotFound")
        if rev not in self.repos[repo].branches:
            return _error(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return None

    def _preupload(self, body: bytes, repo: str, rev: str) -> Answer:
        problem = self._branch_problem(repo, rev)
        if problem:
            return problem
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(self.lfs_suffixes) else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in json.loads(body)["files"]
        ]
        return 200, {"files": files, "commitOid": self.repos[repo].branches[rev]}, {}

    def _lfs_batch(self, body: bytes, repo: str) -> Answer:
        if repo not in self.repos:
            return _error(404, "Repository not found", code="RepoNotFound")
        objects = []
        for obj in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/lfs/verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, body: bytes, oid: str) -> Answer:
        if hashlib.sha256(body).hexdigest() != oid:
            return _error(400, "the uploaded content does not hash to its oid")
        self.lfs[oid] = body
        return 200, None, {}

    def _lfs_verify(self, body: bytes, oid: str) -> Answer:
        asked = json.loads(body)
        if oid not in self.lfs or len(self.lfs[oid]) != asked.get("size"):
            return _error(422, f"object {oid} was not uploaded")
        return 200, {}, {}

    def _commit(self, body: bytes, repo: str, rev: str) -> Answer:
        problem = self._branch_problem(repo, rev)
        if problem:
            return problem
        commit = Commit(repo, rev, "", "", "")
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                commit.summary, commit.description = value["summary"], value.get("description", "")
            elif item["key"] == "file":
                commit.files[value["path"]] = base64.b64decode(value["content"])
                commit.kinds[value["path"]] = "file"
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return _error(422, f"{value['path']}: its LFS object {value['oid']} was never uploaded")
                commit.files[value["path"]] = self.lfs[value["oid"]]
                commit.kinds[value["path"]] = "lfsFile"
            else:
                return _error(400, f"the stand-in does not take {item['key']} operations")
        parent = self.repos[repo].branches[rev]
        commit.oid = _oid(parent, *sorted((p, hashlib.sha256(b).hexdigest()) for p, b in commit.files.items()))
        self.repos[repo].branches[rev] = commit.oid
        self.commits.append(commit)
        url = f"{self.url}/datasets/{repo}/commit/{commit.oid}"
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}, {}


def _oid(*parts: Any) -> str:
    """A 40-hex commit id, like git's."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


def _error(status: int, message: str, code: str | None = None, **extra: Any) -> Answer:
    """An error as the Hub sends it: JSON `error`, and the message (and code) in X-Error-* headers."""
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, {"error": message, **extra}, headers


class _Handler(BaseHTTPRequestHandler):
    """Reads each request whole (Content-Length or chunked), records it, and sends the stand-in's answer."""

    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        self.hub.requests.append(Received(self.command, self.path, list(self.headers.items()), body))
        try:
            status, payload, headers = self.hub.answer(self.command, urlsplit(self.path).path, body)
        except Exception as exc:  # a malformed request: answer it, as a server would, instead of hanging up
            status, payload, headers = _error(400, f"{type(exc).__name__}: {exc}")
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
