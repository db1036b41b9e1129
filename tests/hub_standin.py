"""A local stand-in for the Hugging Face Hub: just the HTTP routes huggingface_hub 2.4 calls to publish.

Routes (read from huggingface_hub's hf_api.py, _commit_api.py and lfs.py):

    GET  /api/whoami-v2                                   HfApi.whoami
    GET  /api/agent-harnesses                             huggingface_hub's daily agent-registry fetch (empty)
    POST /api/repos/create                                HfApi.create_repo (409 when it exists)
    GET  /api/models/<ns>/<name>[/revision/<rev>]         HfApi.model_info / repo_info
    POST /api/validate-yaml                               create_commit checks README.md metadata first
    POST /api/models/<ns>/<name>/preupload/<rev>          upload mode per file: regular (inline) or lfs
    POST /<ns>/<name>.git/info/lfs/objects/batch          LFS batch: where to PUT each lfs file
    PUT  /lfs-upload/<oid>                                the LFS object itself (sha256-checked here)
    POST /api/models/<ns>/<name>/commit/<rev>             the commit (ndjson: header, file, lfsFile lines)

Every request is recorded (method, path, status, whether it carried a token); `faults` makes a
route answer given status codes before behaving (e.g. {"commit": [503]}). Tests must disable
Xet (HF_HUB_DISABLE_XET) so LFS files take the plain LFS path this server speaks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROUTES = [
    ("GET", "whoami", re.compile(r"^/api/whoami-v2$")),
    ("GET", "agent_harnesses", re.compile(r"^/api/agent-harnesses$")),
    ("POST", "create_repo", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")),
    ("GET", "repo_info", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(/revision/(?P<rev>[^/]+))?$")),
    ("POST", "lfs_batch", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_upload", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")),
]
LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".npy")


@dataclass
class Request:
    method: str
    path: str
    route: str
    status: int
    authenticated: bool
    carries_watched: bool = False  # a watched string (e.g. a token) was in the URL or body


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class HubStandIn:
    def __init__(self, users: dict[str, dict] | None = None):
        # token -> whoami answer; a token not listed gets 401.
        self.users = users or {}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.faults: dict[str, list[int]] = defaultdict(list)
        self.readmes: list[str] = []
        self.watch: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_user(self, token: str, name: str, orgs: dict[str, str] | None = None, role: str = "write") -> None:
        self.users[token] = {"type": "user", "name": name, "fullname": name.title(),
                             "orgs": [{"name": org, "roleInOrg": r} for org, r in (orgs or {}).items()],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "ptflow-test",
                                                                              "role": role}}}

    def start(self) -> "HubStandIn":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def api_requests(self) -> list[Request]:
        """Requests to the publishing API (huggingface_hub's own daily agent-registry fetch left out)."""
        return [r for r in self.requests if r.route != "agent_harnesses"]

    def routes(self, status: int | None = None) -> list[str]:
        return [r.route for r in self.api_requests() if status is None or r.status == status]

    # --- request handling ---

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub._dispatch(self)

            def do_POST(self):
                hub._dispatch(self)

            def do_PUT(self):
                hub._dispatch(self)

        return Handler

    def _dispatch(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        body = _read_body(req)
        token = (req.headers.get("authorization") or "").removeprefix("Bearer ").strip() or None
        route, match = "unknown", None
        for method, name, pattern in ROUTES:
            found = pattern.match(path)
            if method == req.command and found:
                route, match = name, found
                break
        with self._lock:
            fault = self.faults[route].pop(0) if self.faults[route] else None
        if fault is not None:
            status, payload, headers = fault, {"error": f"injected {fault}"}, {}
        elif route == "unknown":
            status, payload, headers = 404, {"error": f"stand-in has no route {req.command} {path}"}, {}
        else:
            status, payload, headers = getattr(self, f"_{route}")(match, token, body)
        with self._lock:
            watched = any(w in req.path or w.encode() in body for w in self.watch)
            self.requests.append(Request(req.command, path, route, status, token is not None, watched))
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)

    def _user(self, token):
        return self.users.get(token) if token else None

    def _denied(self, token, repo_id: str | None = None):
        user = self._user(token)
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        if repo_id is not None:
            namespace = repo_id.split("/")[0]
            allowed = {user["name"]} | {o["name"] for o in user["orgs"] if o["roleInOrg"] != "read"}
            if namespace not in allowed or user["auth"]["accessToken"]["role"] == "read":
                return 403, {"error": f"You don't have the rights to write to {repo_id}"}, {}
        return None

    def _whoami(self, match, token, body):
        return self._denied(token) or (200, self._user(token), {})

    def _agent_harnesses(self, match, token, body):
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}

    def _create_repo(self, match, token, body):
        request = json.loads(body)
        user = self._user(token)
        repo_id = f"{request.get('organization') or (user['name'] if user else '?')}/{request['name']}"
        denied = self._denied(token, repo_id)
        if denied:
            return denied
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        self.repos[repo_id] = Repo(repo_id, private=request.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _repo_info(self, match, token, body):
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
        return 200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                     "siblings": [{"rfilename": name} for name in sorted(repo.files)]}, {}

    def _validate_yaml(self, match, token, body):
        content = json.loads(body)["content"]
        self.readmes.append(content)
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
        try:
            meta = yaml.safe_load(content.split("---\n", 2)[1])
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _preupload(self, match, token, body):
        denied = self._denied(token, match["repo"])
        if denied:
            return denied
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = []
        for entry in json.loads(body)["files"]:
            sample = base64.b64decode(entry["sample"])
            binary = entry["path"].endswith(LFS_SUFFIXES) or b"\0" in sample
            files.append({"path": entry["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False})
        return 200, {"files": files}, {}

    def _lfs_batch(self, match, token, body):
        denied = self._denied(token, match["repo"])
        if denied:
            return denied
        request = json.loads(body)
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                   for o in request["objects"]]
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_upload(self, match, token, body):
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return 400, {"error": "sha256 mismatch"}, {}
        self.lfs[match["oid"]] = body
        return 200, {}, {}

    def _commit(self, match, token, body):
        denied = self._denied(token, match["repo"])
        if denied:
            return denied
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}, {}
                files[value["path"]] = self.lfs[value["oid"]]
        oid = hashlib.sha1(body).hexdigest()
        repo.files.update(files)
        repo.commits.append({"oid": oid, "summary": header["summary"], "description": header.get("description", ""),
                             "files": files, "lfs": sorted(v["value"]["path"] for v in lines if v["key"] == "lfsFile")})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}"}, {}


@contextmanager
def serve_hub(monkeypatch, tmp_path: Path) -> Iterator[HubStandIn]:
    """Point huggingface_hub at a fresh stand-in (online, no Xet, no saved login, no HF_TOKEN) for one test."""
    import huggingface_hub.constants as constants

    hub = HubStandIn().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield hub
    finally:
        hub.stop()


def _read_body(req: BaseHTTPRequestHandler) -> bytes:
    if req.headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(req.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                req.rfile.readline()
                return b"".join(chunks)
            chunks.append(req.rfile.read(size))
            req.rfile.readline()
    length = int(req.headers.get("content-length") or 0)
    return req.rfile.read(length) if length else b""
