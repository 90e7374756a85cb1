"""A local stand-in for the Hugging Face Hub's HTTP API, so that pushes and downloads can be tested offline.

`HubStandIn` runs two `ThreadingHTTPServer`s on 127.0.0.1, each in a thread:

* the Hub (`endpoint`): the endpoints `huggingface_hub` (2.x) calls for `HfApi.create_repo`, `whoami`,
  `upload_folder` / `create_commit` (README metadata validation, preupload, LFS batch and verify, the NDJSON commit),
  `repo_info` / `model_info` (`/api/models/{repo}[/revision/{rev}]`), `list_repo_tree`, and `hf_hub_download`
  (HEAD/GET `/{repo}/resolve/{rev}/{file}` with X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size,
  Content-Length; an LFS file answers 302 with a Location on the storage server, as the Hub redirects to its CDN);
* the storage (`storage_url`, another port, hence another origin as S3 and the CDN are): the presigned-style LFS
  upload URL (PUT) and LFS downloads (GET/HEAD). Like S3 it refuses requests that carry an Authorization header:
  `huggingface_hub` must not send the Hub token off the Hub.

It speaks the legacy LFS "basic" transfer, not Xet: clients must run with HF_HUB_DISABLE_XET=1 (`environment`,
`patch_process` set it), else `huggingface_hub` uploads through `hf_xet` when it is installed.

Files live per repo under `root/{namespace}/{name}/`: `blobs/{git sha1}` for regular files, `lfs/{sha256}` for LFS
objects; the commits (each a full tree of path -> blob) are kept in memory. Writes need `Authorization: Bearer
{token}`; reads of a private repo too. Every request is logged (`log`); a request no handler knows (answered 404) or
one it cannot read (answered 500) is also logged in `unhandled`, so a test can assert that the client used only
endpoints the stand-in implements, as it implements them.

    with HubStandIn(tmp_path) as hub:
        env = hub.environment(hf_home=tmp_path / "hf")   # for a fresh process
        ...
        hub.files("user/tiny-mla")                       # {path: bytes} at main
"""

import base64
import fnmatch
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml


# The .gitattributes the Hub puts in every new model repo: these patterns are stored in LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)
REGULAR_FILE_LIMIT = 10 * 2**20  # the Hub stores bigger files in LFS whatever .gitattributes says
EMPTY_AGENT_REGISTRY = {"standardEnvVars": [], "harnesses": {}}  # huggingface_hub fetches it to build user agents


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git blob stored in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    """One file of a commit's tree."""

    size: int
    git_oid: str  # of the content (regular file) or of the LFS pointer
    sha256: str | None = None  # LFS files only


@dataclass
class Commit:
    oid: str
    message: str
    tree: dict[str, Entry]
    paths_added: list[str] = field(default_factory=list)
    paths_deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)  # main's history, oldest first


class HubError(Exception):
    """An error answer: status, the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubStandIn:
    """The Hub and its LFS storage on two local ports; see the module docstring.

    Args:
        root: folder for the repos' files.
        user: the account the token belongs to (the namespace of repos created without one).
        token: the only token accepted for writes.
    """

    def __init__(self, root, user: str = "user", token: str = "hf_stand_in_token"):
        self.root, self.user, self.token = str(root), user, token
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str, int]] = []  # (server, method, path, status)
        self.unhandled: list[str] = []
        self.lock = threading.RLock()
        self.servers: list[ThreadingHTTPServer] = []

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> "HubStandIn":
        for role in ("hub", "storage"):
            handler = type(f"{role.title()}Handler", (_Handler,), {"stand_in": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name=f"hub-stand-in-{role}", daemon=True).start()
            self.servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self.servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers = []

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def environment(self, hf_home) -> dict[str, str]:
        """Environment variables that point a fresh process's huggingface_hub at the stand-in (set before it is
        imported: its constants are read at import), with its cache in `hf_home`. HF_HUB_OFFLINE and
        TRANSFORMERS_OFFLINE must be absent from that environment."""
        return {"HF_ENDPOINT": self.endpoint, "HF_TOKEN": self.token, "HF_HOME": str(hf_home),
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def patch_process(self, monkeypatch: pytest.MonkeyPatch, hf_home) -> None:
        """Points this process's (already imported) huggingface_hub and transformers at the stand-in, with every
        cache path under `hf_home`; undone with `monkeypatch`."""
        from huggingface_hub import constants, hf_api
        from transformers.utils import hub as transformers_hub

        for name, value in self.environment(hf_home).items():
            monkeypatch.setenv(name, value)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        old_home = constants.HF_HOME
        for name, value in list(vars(constants).items()):  # token, caches, markers: all read once from HF_HOME
            if isinstance(value, str) and value.startswith(old_home + os.sep):
                monkeypatch.setattr(constants, name, str(hf_home) + value[len(old_home):])
        monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)  # huggingface_hub.upload_folder & co.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers' shared HfApi, built on first use

    # ----------------------------------------------------------------------------------------- inspection

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """{path: content} of the repo at `revision`."""
        with self.lock:
            repo, commit = self._resolve(repo_id, revision, token=self.token)
            return {path: self._read(repo, entry) for path, entry in commit.tree.items()}

    def commits(self, repo_id: str) -> list[Commit]:
        """main's commits, oldest first (the first is the Hub's initial commit of .gitattributes)."""
        with self.lock:
            return list(self.repos[repo_id].commits)

    def downloads(self, repo_id: str, since: int = 0) -> list[str]:
        """Paths of `repo_id` whose content was served since log entry `since`, in order: GETs of regular files from
        the Hub, GETs of LFS objects from the storage (named by the paths that hold them)."""
        with self.lock:
            lfs_paths = {entry.sha256: path for commit in self.repos[repo_id].commits
                         for path, entry in commit.tree.items() if entry.sha256 is not None}
            served = []
            for server, method, path, status in self.log[since:]:
                path = unquote(urlsplit(path).path)
                if method != "GET" or status != 200:
                    continue
                if server == "hub" and path.startswith(f"/{repo_id}/resolve/"):
                    served.append(path[len(f"/{repo_id}/resolve/"):].split("/", 1)[1])
                elif server == "storage" and path.startswith(f"/lfs/{repo_id}/"):
                    served.append(lfs_paths[path.rsplit("/", 1)[1]])
            return served

    # ----------------------------------------------------------------------------------------- storage

    def _repo_dir(self, repo_id: str, kind: str) -> str:
        folder = os.path.join(self.root, *repo_id.split("/"), kind)
        os.makedirs(folder, exist_ok=True)
        return folder

    def _read(self, repo: Repo, entry: Entry) -> bytes:
        if entry.sha256 is not None:
            path = os.path.join(self._repo_dir(repo.repo_id, "lfs"), entry.sha256)
        else:
            path = os.path.join(self._repo_dir(repo.repo_id, "blobs"), entry.git_oid)
        with open(path, "rb") as f:
            return f.read()

    def _store_blob(self, repo_id: str, content: bytes) -> Entry:
        oid = git_blob_oid(content)
        with open(os.path.join(self._repo_dir(repo_id, "blobs"), oid), "wb") as f:
            f.write(content)
        return Entry(size=len(content), git_oid=oid)

    def _lfs_path(self, repo_id: str, sha256: str) -> str:
        return os.path.join(self._repo_dir(repo_id, "lfs"), sha256)

    def _repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token != self.token):
            raise HubError(401 if token != self.token else 404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo_id: str, revision: str, token: str | None) -> tuple[Repo, Commit]:
        repo = self._repo(repo_id, token)
        if revision == "main":
            return repo, repo.commits[-1]
        for commit in repo.commits:
            if commit.oid == revision:
                return repo, commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _is_lfs(self, commit: Commit, repo: Repo, path: str, size: int, sample: bytes) -> bool:
        attributes = commit.tree.get(".gitattributes")
        text = self._read(repo, attributes).decode() if attributes else ""
        patterns = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]
        return (size > REGULAR_FILE_LIMIT or b"\0" in sample
                or any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(os.path.basename(path), p) for p in patterns))

    def _commit(self, repo: Repo, message: str, tree: dict[str, Entry], added: list[str], deleted: list[str]) -> Commit:
        digest = hashlib.sha1(json.dumps({
            "parent": repo.commits[-1].oid if repo.commits else None, "message": message,
            "tree": {path: entry.git_oid for path, entry in sorted(tree.items())},
        }).encode())
        commit = Commit(digest.hexdigest(), message, tree, added, deleted)
        repo.commits.append(commit)
        return commit

    # ----------------------------------------------------------------------------------------- Hub endpoints

    def create_repo(self, body: dict, token: str | None) -> tuple[int, dict]:
        self._check_write(token)
        if body.get("type", "model") != "model":
            raise HubError(400, f"The stand-in holds model repos only, but found type {body.get('type')!r}")
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        repo = self.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private")
        gitattributes = self._store_blob(repo_id, DEFAULT_GITATTRIBUTES.encode())
        self._commit(repo, "initial commit", {".gitattributes": gitattributes}, [".gitattributes"], [])
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def whoami(self, token: str | None) -> dict:
        self._check_write(token)
        return {"type": "user", "name": self.user, "fullname": self.user, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": "write"}}}

    @staticmethod
    def validate_yaml(body: dict) -> tuple[int, dict]:
        content = body.get("content", "")
        if not content.startswith("---"):
            return 200, {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content.split("---")[1])
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "The metadata must be a mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, repo_id: str, revision: str, body: dict, token: str | None) -> dict:
        self._check_write(token)
        repo, commit = self._resolve(repo_id, revision, token)
        files = []
        for item in body["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = self._is_lfs(commit, repo, item["path"], item["size"], sample)
            existing = commit.tree.get(item["path"])
            oid = None if existing is None else (existing.sha256 if existing.sha256 is not None else existing.git_oid)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return {"files": files, "commitOid": commit.oid}

    def lfs_batch(self, repo_id: str, body: dict, token: str | None) -> dict:
        self._check_write(token)
        self._repo(repo_id, token)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, f"The stand-in takes LFS uploads by the basic transfer, but found {body}")
        objects = []
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not os.path.isfile(self._lfs_path(repo_id, obj["oid"])):
                item["actions"] = {
                    "upload": {"href": f"{self.storage_url}/upload/{repo_id}/{obj['oid']}?size={obj['size']}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        return {"transfer": "basic", "objects": objects}

    def lfs_verify(self, repo_id: str, body: dict, token: str | None) -> dict:
        self._check_write(token)
        path = self._lfs_path(repo_id, body["oid"])
        if not os.path.isfile(path) or os.path.getsize(path) != body["size"]:
            raise HubError(404, f"LFS object {body['oid']} of {body['size']} bytes was not uploaded")
        return {"success": True}

    def commit(self, repo_id: str, revision: str, lines: list[dict], query: dict, token: str | None) -> dict:
        self._check_write(token)
        if query.get("create_pr"):
            raise HubError(400, "The stand-in does not open pull requests")
        repo, parent = self._resolve(repo_id, revision, token)
        if revision != "main":
            raise HubError(400, f"The stand-in commits to main only, but found revision {revision!r}")
        header, operations = lines[0], lines[1:]
        if header.get("key") != "header":
            raise HubError(400, f"A commit starts with its header line, but found {header}")
        if header["value"].get("parentCommit") not in (None, parent.oid):
            raise HubError(412, f"parentCommit {header['value']['parentCommit']} is not main's head {parent.oid}")
        tree, added, deleted = dict(parent.tree), [], []
        for op in operations:
            key, value = op["key"], op["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"file {path}: expected base64 content, found {value.get('encoding')!r}")
                tree[path] = self._store_blob(repo_id, base64.b64decode(value["content"]))
                added.append(path)
            elif key == "lfsFile":
                lfs_path = self._lfs_path(repo_id, value["oid"])
                if value.get("algo", "sha256") != "sha256" or not os.path.isfile(lfs_path):
                    raise HubError(400, f"lfsFile {path}: LFS object {value['oid']} was never uploaded")
                size = os.path.getsize(lfs_path)
                if "size" in value and value["size"] != size:
                    raise HubError(400, f"lfsFile {path}: size {value['size']} but the object holds {size} bytes")
                pointer = lfs_pointer(value["oid"], size)
                self._store_blob(repo_id, pointer)
                tree[path] = Entry(size=size, git_oid=git_blob_oid(pointer), sha256=value["oid"])
                added.append(path)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                deleted.append(path)
            elif key == "deletedFolder":
                for name in [n for n in tree if n.startswith(path.rstrip("/") + "/")]:
                    deleted.append(name)
                    del tree[name]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self._commit(repo, header["value"]["summary"], tree, added, deleted)
        return {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}",
                "hookOutput": ""}

    def model_info(self, repo_id: str, revision: str, query: dict, token: str | None) -> dict:
        repo, commit = self._resolve(repo_id, revision, token)
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sibling = {"rfilename": path}
            if query.get("blobs"):
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.sha256 is not None:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": len(
                        lfs_pointer(entry.sha256, entry.size))}
            siblings.append(sibling)
        return {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": commit.oid,
                "private": repo.private, "gated": False, "disabled": False, "tags": [], "siblings": siblings,
                "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z"}

    def tree(self, repo_id: str, revision: str, folder: str, query: dict, token: str | None) -> list[dict]:
        repo, commit = self._resolve(repo_id, revision, token)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, entry in sorted(commit.tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if len(parts) > 1 and not recursive:
                continue
            item = {"type": "file", "path": path, "size": entry.size, "oid": entry.git_oid}
            if entry.sha256 is not None:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                               "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
            entries.append(item)
        if folder and not entries and not folders:
            raise HubError(404, f"{folder} does not exist at {revision}", "EntryNotFound")
        return [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)] + entries

    def resolve(self, repo_id: str, revision: str, path: str, token: str | None) -> tuple[int, dict, bytes]:
        repo, commit = self._resolve(repo_id, revision, token)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid}
        if entry.sha256 is not None:  # the Hub answers with a redirect to its CDN
            headers.update({"Location": f"{self.storage_url}/lfs/{repo_id}/{entry.sha256}",
                            "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size),
                            "ETag": f'"{entry.git_oid}"'})
            return 302, headers, b""
        headers.update({"ETag": f'"{entry.git_oid}"', "Content-Type": "application/octet-stream"})
        return 200, headers, self._read(repo, entry)

    def _check_write(self, token: str | None) -> None:
        if token != self.token:
            raise HubError(401, "Invalid credentials in Authorization header")


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to `HubStandIn`; one class per server role ("hub" or "storage")."""

    stand_in: HubStandIn
    role: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # the log is kept in stand_in.log instead of stderr
        pass

    # ----------------------------------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head_only: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)
        with self.stand_in.lock:
            self.stand_in.log.append((self.role, self.command, self.path, status))

    def _json(self, status: int, payload, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": content_type})

    def _handle(self) -> None:
        body = self._body() if self.command in ("POST", "PUT") else b""
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        try:
            with self.stand_in.lock:
                handled = (self._hub if self.role == "hub" else self._storage)(parts, query, body)
            if not handled:
                with self.stand_in.lock:
                    self.stand_in.unhandled.append(f"{self.role}: {self.command} {self.path}")
                self._json(404, {"error": f"The Hub stand-in has no endpoint {self.command} {url.path}"})
        except HubError as err:
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps({"error": err.message}).encode(), headers,
                       head_only=self.command == "HEAD")
        except Exception as err:  # a request the stand-in misreads: a 500, and a record for the test to fail on
            with self.stand_in.lock:
                self.stand_in.unhandled.append(f"{self.role}: {self.command} {self.path}: {err!r}")
            self._json(500, {"error": repr(err)})

    do_GET = do_HEAD = do_POST = do_PUT = _handle

    # ----------------------------------------------------------------------------------------- routes

    def _hub(self, parts: list[str], query: dict, body: bytes) -> bool:
        hub, method, token = self.stand_in, self.command, self._token()
        if method == "GET" and parts == ["api", "agent-harnesses"]:
            self._json(200, EMPTY_AGENT_REGISTRY)
        elif method == "GET" and parts == ["api", "whoami-v2"]:
            self._json(200, hub.whoami(token))
        elif method == "POST" and parts == ["api", "repos", "create"]:
            self._json(*hub.create_repo(json.loads(body), token))
        elif method == "POST" and parts == ["api", "validate-yaml"]:
            self._json(*hub.validate_yaml(json.loads(body)))
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if method == "GET" and rest == []:
                self._json(200, hub.model_info(repo_id, "main", query, token))
            elif method == "GET" and len(rest) == 2 and rest[0] == "revision":
                self._json(200, hub.model_info(repo_id, rest[1], query, token))
            elif method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                self._json(200, hub.tree(repo_id, rest[1], "/".join(rest[2:]), query, token))
            elif method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                self._json(200, hub.preupload(repo_id, rest[1], json.loads(body), token))
            elif method == "POST" and len(rest) == 2 and rest[0] == "commit":
                if self.headers.get("Content-Type") != "application/x-ndjson":
                    raise HubError(400, f"A commit is NDJSON, but found {self.headers.get('Content-Type')}")
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                self._json(200, hub.commit(repo_id, rest[1], lines, query, token))
            else:
                return False
        elif len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"] \
                and method == "POST":
            repo_id = f"{parts[0]}/{parts[1][:-len('.git')]}"
            if parts[5] == "batch":
                self._json(200, hub.lfs_batch(repo_id, json.loads(body), token), "application/vnd.git-lfs+json")
            elif parts[5] == "verify":
                self._json(200, hub.lfs_verify(repo_id, json.loads(body), token), "application/vnd.git-lfs+json")
            else:
                return False
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            status, headers, content = hub.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), token)
            self._send(status, content, headers, head_only=method == "HEAD")
        else:
            return False
        return True

    def _storage(self, parts: list[str], query: dict, body: bytes) -> bool:
        hub, method = self.stand_in, self.command
        if len(parts) != 4 or parts[0] not in ("upload", "lfs"):
            return False
        if "Authorization" in self.headers:  # S3 and the CDN refuse a second auth mechanism; the token must stay home
            raise HubError(400, "The storage takes no Authorization header: the Hub token was sent off the Hub")
        repo_id, sha256 = "/".join(parts[1:3]), parts[3]
        path = hub._lfs_path(repo_id, sha256)
        if parts[0] == "upload" and method == "PUT":
            if hashlib.sha256(body).hexdigest() != sha256 or len(body) != int(query["size"][0]):
                raise HubError(400, f"The uploaded body ({len(body)} bytes) does not match oid {sha256}")
            with open(path, "wb") as f:
                f.write(body)
            self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        elif parts[0] == "lfs" and method in ("GET", "HEAD"):
            if not os.path.isfile(path):
                raise HubError(404, f"No LFS object {sha256}")
            with open(path, "rb") as f:
                content = f.read()
            self._send(200, content, {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"},
                       head_only=method == "HEAD")
        else:
            return False
        return True


@pytest.fixture(scope="module")
def hub_stand_in(tmp_path_factory):
    """A running `HubStandIn` that this process's huggingface_hub and transformers talk to (token, endpoint, and a
    cache in a temporary HF_HOME), for the tests of one module."""
    root = tmp_path_factory.mktemp("hub")
    with HubStandIn(root / "storage") as hub, pytest.MonkeyPatch.context() as monkeypatch:
        hub.patch_process(monkeypatch, root / "hf_home")
        yield hub

