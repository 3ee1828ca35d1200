"""A small Hub-API server on 127.0.0.1 for push/download tests: the real `huggingface_hub` and `transformers`
client code talks to it as it would to huggingface.co (../shared/HUB.md says what the client needs).

It is a test fixture that speaks the protocol, not a mock of our calls: repos, branches and commits live in memory,
file bytes on disk, and every byte a client uploads is the byte a later download returns. What it covers:
create/delete repo, whoami, model info, tree, paths-info, refs, branches, preupload, LFS batch ("basic" transfer:
PUT + verify), ndjson commits (file, lfsFile, deletedFile, deletedFolder, parentCommit -> 412 when stale), and
HEAD/GET `resolve` with Range. LFS files are answered with a redirect to a second loopback port (the "CDN"), because
the client reads file metadata from the first response that redirects to another origin. Not covered: Xet (clients
must run with HF_HUB_DISABLE_XET=1), pull requests, multipart LFS, tags, gated repos.

    python tests/hub_server.py      # prints "endpoint http://127.0.0.1:PORT"; Ctrl-C stops it
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.png", "*.jpg")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
USER = "tester"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str  # where the bytes are stored
    oid: str  # git blob id
    lfs: bool


@dataclass
class Commit:
    sha: str
    parent: Optional[str]
    tree: dict[str, Entry]
    title: str
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


class HubState:
    """Repos in memory, blobs on disk (content-addressed by sha256)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.uploaded: set[str] = set()  # LFS sha256 that arrived through PUT
        self.counter = 0
        self.requests: list[tuple[str, str]] = []  # (method, path): what the client actually called

    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.root, sha256)

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as fh:
                fh.write(data)
            os.replace(path + ".tmp", path)
        return sha

    def new_sha(self) -> str:
        self.counter += 1
        return hashlib.sha1(f"{time.time_ns()}-{self.counter}".encode()).hexdigest()

    def commit(self, repo: Repo, branch: str, tree: dict[str, Entry], title: str) -> Commit:
        sha = self.new_sha()
        c = Commit(sha, repo.branches.get(branch), tree, title)
        repo.commits[sha] = c
        repo.branches[branch] = sha
        return c

    def resolve(self, repo: Repo, rev: str) -> Optional[Commit]:
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return repo.commits[repo.branches[rev[11:]]]
        return repo.commits.get(rev)


def is_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    name = os.path.basename(path)
    return any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size >= LFS_MIN_SIZE or b"\0" in sample


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    cdn_base: str

    def log_message(self, fmt, *args):  # quiet; the state records requests
        pass

    # ---- helpers ----------------------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status: int, payload=None, headers: Optional[dict] = None, raw: Optional[bytes] = None) -> None:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        if raw is None and payload is not None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status: int, code: str, message: str, headers: Optional[dict] = None) -> None:
        self.send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def repo(self, repo_type: str, repo_id: str) -> Optional[Repo]:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None:
            self.error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.private and not self.headers.get("Authorization"):
            self.error(401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def commit_of(self, repo: Repo, rev: str) -> Optional[Commit]:
        c = self.state.resolve(repo, unquote(rev))
        if c is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return c

    # ---- routing ----------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self.route()

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def do_PUT(self):
        self.route()

    def do_DELETE(self):
        self.route()

    def route(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        self.state.requests.append((self.command, path))
        with self.state.lock:
            try:
                self._route(path, query)
            except BrokenPipeError:
                pass

    def _route(self, path: str, query: dict) -> None:
        m = self.command
        if path == "/api/whoami-v2":
            return self.send(
                200,
                {
                    "type": "user",
                    "name": USER,
                    "fullname": USER,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
        if path == "/api/validate-yaml" and m == "POST":
            self.body()
            return self.send(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and m == "POST":
            return self.create_repo(json.loads(self.body() or b"{}"))
        if path == "/api/repos/delete" and m in ("POST", "DELETE"):
            data = json.loads(self.body() or b"{}")
            rid = f"{data.get('organization') or USER}/{data['name']}"
            if self.state.repos.pop((data.get("type") or "model", rid), None) is None:
                return self.error(404, "RepoNotFound", f"Repository {rid} not found")
            return self.send(200, {})
        api = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+/[^/]+)(?:/(.*))?", path)
        if api:
            return self.api(api.group(1), unquote(api.group(2)), api.group(3) or "", query)
        lfs = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if lfs and m == "POST":
            return self.lfs_batch(json.loads(self.body()))
        upload = re.fullmatch(r"/_lfs/(upload|verify)/([0-9a-f]{64})", path)
        if upload:
            return self.lfs_upload(upload.group(1), upload.group(2))
        res = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if res and m in ("GET", "HEAD"):
            kind = {"datasets": "dataset", "spaces": "space"}.get(res.group(1) or "", "model")
            return self.resolve_file(kind, unquote(res.group(2)), unquote(res.group(3)), unquote(res.group(4)))
        self.body()
        self.error(404, "NotFound", f"{m} {path} is not served by the test Hub")

    # ---- repos ------------------------------------------------------------------------------------------------

    def create_repo(self, data: dict) -> None:
        repo_type = data.get("type") or "model"
        rid = f"{data.get('organization') or USER}/{data['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.base}/{prefix}{rid}"
        if (repo_type, rid) in self.state.repos:
            return self.send(409, {"error": "You already created this repo", "url": url})
        repo = Repo(repo_type, rid, data.get("private", False) or data.get("visibility") == "private")
        sha = self.state.store(GITATTRIBUTES)
        tree = {".gitattributes": Entry(len(GITATTRIBUTES), sha, git_oid(GITATTRIBUTES), False)}
        self.state.commit(repo, "main", tree, "initial commit")
        self.state.repos[(repo_type, rid)] = repo
        self.send(200, {"url": url, "name": rid, "id": rid})

    def api(self, kind: str, rid: str, rest: str, query: dict) -> None:
        m = self.command
        body = self.body() if m in ("POST", "PUT", "DELETE") else b""
        repo = self.repo(kind, rid)
        if repo is None:
            return
        parts = rest.split("/", 1) if rest else [""]
        head, tail = parts[0], (parts[1] if len(parts) > 1 else "")
        if head in ("", "revision"):
            c = self.commit_of(repo, tail or "main")
            if c:
                self.send(200, self.info(repo, c))
            return
        if head == "refs":
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(repo.branches.items())
            ]
            return self.send(200, {"branches": branches, "tags": [], "converts": []})
        if head == "branch":
            branch = unquote(tail)
            if m == "DELETE":
                repo.branches.pop(branch, None)
                return self.send(200, {})
            if branch in repo.branches:
                return self.send(409, {"error": f"branch {branch} already exists"})
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            c = self.commit_of(repo, start)
            if c:
                repo.branches[branch] = c.sha
                self.send(200, {})
            return
        if head == "tree":
            rev, _, sub = tail.partition("/")
            c = self.commit_of(repo, rev)
            if c:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                self.send(200, self.tree(c, unquote(sub).strip("/"), recursive))
            return
        if head == "paths-info":
            c = self.commit_of(repo, tail)
            if c is None:
                return
            ctype = self.headers.get("Content-Type", "")
            paths = json.loads(body)["paths"] if "json" in ctype else parse_qs(body.decode()).get("paths", [])
            listing = self.tree(c, "", True)
            return self.send(200, [e for e in listing if e["path"] in {p.strip("/") for p in paths}])
        if head == "commits":
            c = self.commit_of(repo, tail or "main")
            out = []
            while c is not None:
                out.append(
                    {
                        "id": c.sha,
                        "title": c.title,
                        "message": "",
                        "authors": [{"user": USER}],
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.date)),
                    }
                )
                c = repo.commits.get(c.parent) if c.parent else None
            return self.send(200, out)
        if head == "preupload" and m == "POST":
            return self.preupload(repo, unquote(tail), json.loads(body))
        if head == "commit" and m == "POST":
            return self.commit(repo, unquote(tail), body)
        self.error(404, "NotFound", f"{m} /api/{kind}s/{rid}/{rest} is not served by the test Hub")

    def info(self, repo: Repo, c: Commit) -> dict:
        card = c.tree.get("README.md")
        tags: list = []
        if card is not None:
            text = open(self.state.blob_path(card.sha256), encoding="utf-8", errors="replace").read()
            match = re.match(r"^---\n(.*?)\n---", text, re.S)
            if match:
                import yaml

                tags = (yaml.safe_load(match.group(1)) or {}).get("tags") or []
        when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.date))
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": c.sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": tags,
            "lastModified": when,
            "createdAt": when,
            "siblings": [{"rfilename": p} for p in sorted(c.tree)],
        }

    def tree(self, c: Commit, sub: str, recursive: bool) -> list[dict]:
        out, dirs = [], set()
        prefix = f"{sub}/" if sub else ""
        for path in sorted(c.tree):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :]
            if "/" in rel:
                parts = rel.split("/")
                for i in range(1, len(parts) if recursive else 2):
                    dirs.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            e = c.tree[path]
            row = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
            if e.lfs:
                row["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
            out.append(row)
        out += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        return out

    # ---- uploads ----------------------------------------------------------------------------------------------

    def preupload(self, repo: Repo, rev: str, data: dict) -> None:
        c = self.commit_of(repo, rev)
        if c is None:
            return
        files = []
        for f in data.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = is_lfs(f["path"], int(f["size"]), sample)
            old = c.tree.get(f["path"])
            oid = None if old is None else (old.sha256 if lfs else old.oid)
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self.send(200, {"files": files, "commitOid": c.sha})

    def lfs_batch(self, data: dict) -> None:
        objects = []
        for obj in data.get("objects", []):
            row = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.uploaded:
                row["actions"] = {
                    "upload": {"href": f"{self.base}/_lfs/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.base}/_lfs/verify/{obj['oid']}", "header": {}},
                }
            objects.append(row)
        self.send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, action: str, oid: str) -> None:
        data = self.body()
        if action == "upload":
            if hashlib.sha256(data).hexdigest() != oid:
                return self.error(400, "BadRequest", "uploaded bytes do not match their sha256")
            self.state.store(data)
            self.state.uploaded.add(oid)
            return self.send(200, {})
        if oid not in self.state.uploaded:
            return self.error(404, "EntryNotFound", f"LFS object {oid} was never uploaded")
        self.send(200, {})

    def commit(self, repo: Repo, rev: str, body: bytes) -> None:
        if rev not in repo.branches:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev} (create the branch first)")
        head = repo.commits[repo.branches[rev]]
        tree = dict(head.tree)
        title = "commit"
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary") or title
                parent = value.get("parentCommit")
                if parent and parent != head.sha:
                    return self.error(412, "PreconditionFailed", "A commit has happened since. Please refresh.")
            elif key == "file":
                data = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                tree[value["path"]] = Entry(len(data), self.state.store(data), git_oid(data), False)
            elif key == "lfsFile":
                oid = value["oid"]
                blob = self.state.blob_path(oid)
                if not os.path.exists(blob):
                    return self.error(422, "BadRequest", f"LFS object {oid} of {value['path']} was not uploaded")
                data = open(blob, "rb").read()
                tree[value["path"]] = Entry(len(data), oid, git_oid(data), True)
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    return self.error(404, "EntryNotFound", f"{value['path']} does not exist")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(prefix)]:
                    del tree[p]
            else:
                return self.error(400, "BadRequest", f"unknown commit operation {key!r}")
        c = self.state.commit(repo, rev, tree, title)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self.send(
            200,
            {
                "commitOid": c.sha,
                "commitUrl": f"{self.base}/{prefix}{repo.repo_id}/commit/{c.sha}",
                "pullRequestUrl": None,
                "success": True,
            },
        )

    # ---- downloads --------------------------------------------------------------------------------------------

    def resolve_file(self, kind: str, rid: str, rev: str, path: str) -> None:
        repo = self.repo(kind, rid)
        if repo is None:
            return
        c = self.commit_of(repo, rev)
        if c is None:
            return
        e = c.tree.get(path)
        if e is None:
            # with the commit, as the Hub does: the client records the missing file in its cache (.no_exist)
            return self.error(404, "EntryNotFound", f"{path} does not exist at {rev}", {"X-Repo-Commit": c.sha})
        headers = {"X-Repo-Commit": c.sha, "Accept-Ranges": "bytes"}
        if e.lfs:  # to the "CDN" on another port: the client reads metadata from this response
            headers.update(
                {
                    "X-Linked-Etag": f'"{e.sha256}"',
                    "X-Linked-Size": e.size,
                    "ETag": f'"{e.oid}"',
                    "Location": f"{self.cdn_base}/blobs/{e.sha256}",
                }
            )
            return self.send(302, raw=b"", headers=headers)
        headers["ETag"] = f'"{e.oid}"'
        send_blob(self, self.state.blob_path(e.sha256), headers)


def send_blob(handler: BaseHTTPRequestHandler, path: str, headers: dict) -> None:
    """200 with the file, or 206 with the byte range the client asked for."""
    data = open(path, "rb").read()
    rng = re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range") or "")
    status = 200
    if rng:
        start = int(rng.group(1))
        end = int(rng.group(2)) if rng.group(2) else len(data) - 1
        headers = dict(headers, **{"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        data, status = data[start : end + 1], 206
    handler.send_response(status)
    for k, v in headers.items():
        handler.send_header(k, str(v))
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


class _CdnHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, fmt, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        m = re.fullmatch(r"/blobs/([0-9a-f]{64})", urlsplit(self.path).path)
        path = self.state.blob_path(m.group(1)) if m else ""
        if not m or not os.path.exists(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        send_blob(self, path, {"ETag": f'"{m.group(1)}"', "Accept-Ranges": "bytes"})


class HubServer:
    """Start with `HubServer().start()`; `endpoint` is what HF_ENDPOINT must be set to; `stop()` ends it."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="test-hub-")
        self.state = HubState(self.root)
        self._servers: list[ThreadingHTTPServer] = []

    def start(self) -> "HubServer":
        cdn = ThreadingHTTPServer(("127.0.0.1", 0), type("Cdn", (_CdnHandler,), {"state": self.state}))
        cdn_base = f"http://127.0.0.1:{cdn.server_address[1]}"
        api = ThreadingHTTPServer(
            ("127.0.0.1", 0), type("Api", (_Handler,), {"state": self.state, "cdn_base": cdn_base})
        )
        for server in (api, cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{api.server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    hub = HubServer().start()
    print(f"endpoint {hub.endpoint}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()
