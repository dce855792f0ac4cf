"""``llmquant push`` against a local fake of the model hub (127.0.0.1 only; no other traffic).

Scope of the fake (:class:`FakeHub`): exactly the HTTP calls ``huggingface_hub`` makes for
``create_repo``, ``create_branch`` and ``create_commit`` of a model repository over the *legacy LFS*
transfer (the tests switch ``hf_xet`` off through ``huggingface_hub.constants.HF_HUB_DISABLE_XET``; the
fake does not speak Xet):

- ``POST /api/repos/create`` (409 if the repo exists), ``GET /api/models/{repo}`` (repo info, used by
  ``create_repo(exist_ok=True)`` after a 401/403), ``POST /api/models/{repo}/branch/{branch}``
- ``POST /api/validate-yaml`` (parses the card's YAML header; 400 if it does not parse)
- ``POST /api/models/{repo}/preupload/{rev}``: ``.safetensors`` files and files over 10 kB go by LFS
- ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer; no upload action for a blob it has),
  ``PUT /lfs/{oid}`` (the blob; its sha256 must equal the oid)
- ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (header, base64 files, LFS pointers to
  blobs it holds); applied atomically to the branch, recorded with its message.

Every API call must carry ``Authorization: Bearer <the expected token>`` (else 401), ``forbid`` turns
every API call into a 403. Not modelled: Xet, multipart LFS, pull requests, deletions, copies, the
hub's metadata validation rules beyond "the YAML parses", rate limits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from llmquant import pipeline
from llmquant.api import save_quantized
from llmquant.cli import main
from llmquant.config import QuantScheme, RTNConfig

TOKEN = "hf_llmquantTestToken0123456789abcdef"


class FakeHub:
    """State of the fake hub: repositories (private flag, branches of files), LFS blobs, commits."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token, self.forbid = token, False
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.uploads: list[str] = []
        self.validated_yaml: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if size == 0:
                        return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            body = self._body()
            hub.requests.append((method, path))
            if method == "PUT" and path.startswith("/lfs/"):  # pre-signed storage URL: no token
                return self._send(*_put_blob(hub, path[len("/lfs/") :], body))
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            if hub.forbid:
                return self._send(
                    403, {"error": "You don't have the rights to create a model under this namespace"}
                )
            self._send(*_api(hub, method, path, body, base=hub.url))

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler


def _put_blob(hub: FakeHub, oid: str, body: bytes) -> tuple[int, dict]:
    if hashlib.sha256(body).hexdigest() != oid:
        return 400, {"error": "sha256 mismatch"}
    hub.blobs[oid] = body
    hub.uploads.append(oid)
    return 200, {}


def _api(hub: FakeHub, method: str, path: str, body: bytes, base: str) -> tuple[int, dict]:
    if method == "POST" and path == "/api/repos/create":
        return _create_repo(hub, json.loads(body), base)
    if method == "POST" and path == "/api/validate-yaml":
        return _validate_yaml(hub, json.loads(body)["content"])
    if method == "POST" and path.endswith("/info/lfs/objects/batch"):
        return _lfs_batch(hub, json.loads(body), base)
    parts = path.split("/")
    if len(parts) < 5 or parts[:3] != ["", "api", "models"]:
        return 404, {"error": f"not modelled: {method} {path}"}
    repo_id, rest = "/".join(parts[3:5]), parts[5:]
    if repo_id not in hub.repos:
        return 404, {"error": "Repository not found"}
    if method == "GET" and not rest:
        return 200, {"id": repo_id, "private": hub.repos[repo_id]["private"], "sha": "0" * 40}
    if method == "POST" and rest[:1] == ["branch"]:
        branches = hub.repos[repo_id]["branches"]
        if rest[1] in branches:
            return 409, {"error": "Reference already exists"}
        branches[rest[1]] = dict(branches["main"])
        return 200, {}
    if method == "POST" and rest[:1] == ["preupload"]:
        files = json.loads(body)["files"]
        modes = [_upload_mode(f) for f in files]
        return 200, {"files": [{"path": f["path"], "uploadMode": m, "shouldIgnore": False} for f, m in modes]}
    if method == "POST" and rest[:1] == ["commit"]:
        return _commit(hub, repo_id, "/".join(rest[1:]), body, base)
    return 404, {"error": f"not modelled: {method} {path}"}


def _create_repo(hub: FakeHub, payload: dict, base: str) -> tuple[int, dict]:
    repo_id = f"{payload['organization']}/{payload['name']}"
    if repo_id in hub.repos:
        return 409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"}
    private = payload.get("visibility") == "private" or payload.get("private") is True
    hub.repos[repo_id] = {"private": private, "type": payload.get("type"), "branches": {"main": {}}}
    return 200, {"url": f"{base}/{repo_id}"}


def _validate_yaml(hub: FakeHub, content: str) -> tuple[int, dict]:
    if not content.startswith("---\n"):
        return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
    try:
        header = yaml.safe_load(content[4 : content.index("\n---\n", 4)])
    except (ValueError, yaml.YAMLError) as exc:
        return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}
    hub.validated_yaml.append(header)
    return 200, {"errors": [], "warnings": []}


def _upload_mode(entry: dict) -> tuple[dict, str]:
    lfs = entry["path"].endswith(".safetensors") or entry["size"] > 10_000
    return entry, "lfs" if lfs else "regular"


def _lfs_batch(hub: FakeHub, payload: dict, base: str) -> tuple[int, dict]:
    objects = []
    for obj in payload["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in hub.blobs:  # a blob the hub has needs no upload (what makes pushes resumable)
            entry["actions"] = {"upload": {"href": f"{base}/lfs/{obj['oid']}"}}
        objects.append(entry)
    return 200, {"transfer": "basic", "objects": objects}


def _commit(hub: FakeHub, repo_id: str, revision: str, body: bytes, base: str) -> tuple[int, dict]:
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    header, files = lines[0], {}
    for line in lines[1:]:
        value = line["value"]
        if line["key"] == "file":
            files[value["path"]] = base64.b64decode(value["content"])
        elif line["key"] == "lfsFile":
            if value["oid"] not in hub.blobs:
                return 422, {"error": f"LFS object {value['oid']} not found"}
            files[value["path"]] = hub.blobs[value["oid"]]
        else:
            return 400, {"error": f"not modelled: {line['key']}"}
    branches = hub.repos[repo_id]["branches"]
    if revision not in branches:
        return 404, {"error": f"Invalid rev id: {revision}"}
    branches[revision].update(files)
    oid = hashlib.sha1(body).hexdigest()
    hub.commits.append(
        {"repo": repo_id, "revision": revision, "summary": header["value"]["summary"], "files": files}
    )
    return 200, {"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake hub, HF_ENDPOINT/HF_TOKEN pointing at it, no login cache, Xet off."""
    import huggingface_hub.constants as constants

    fake = FakeHub()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # read at import (e.g. for the client's
    # agent-harness registry lookup); HF_ENDPOINT above is what llmquant passes to HfApi
    hosts: list[str] = []
    create_connection = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        hosts.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test traffic goes to 127.0.0.1 only, not {address[0]}")
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join()
    assert set(hosts) <= {"127.0.0.1"}, hosts


@pytest.fixture
def checkpoint(make_tiny_llama, tmp_path) -> Path:
    result = pipeline.quantize(make_tiny_llama(), RTNConfig(QuantScheme(4, 32, True)), progress=False)
    return save_quantized(result, tmp_path / "tiny-w4", format="gptq", base_model="org/tiny-base")


def _folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _no_token_anywhere(*texts: str, folders: tuple[Path, ...] = (), hub: FakeHub | None = None) -> None:
    for text in texts:
        assert TOKEN not in text
    for folder in folders:
        for name, data in _folder(folder).items():
            assert TOKEN.encode() not in data, name
    if hub is not None:
        for commit in hub.commits:
            assert all(TOKEN.encode() not in data for data in commit["files"].values())


# ---------------------------------------------------------------------------------------------------
# pushes that succeed
# ---------------------------------------------------------------------------------------------------
def test_push_delivers_every_file_in_one_commit(hub, checkpoint, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    argv = ["push", str(checkpoint), "me/tiny-w4", "--private", "--revision", "dev", "--commit-message", "w4"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert [(c["repo"], c["revision"], c["summary"]) for c in hub.commits] == [("me/tiny-w4", "dev", "w4")]
    local = _folder(checkpoint)
    assert hub.commits[0]["files"] == local  # every file, byte-identical, in that one commit
    assert hub.files("me/tiny-w4", "dev") == local and hub.files("me/tiny-w4", "main") == {}
    assert hub.repos["me/tiny-w4"]["private"] is True
    assert {"README.md", "model.safetensors", "config.json", "quant_log.json"} <= set(local)
    assert hub.uploads and set(hub.blobs) == set(hub.uploads)  # the weights went through LFS
    header = hub.validated_yaml[0]
    assert header["base_model"] == "org/tiny-base" and header["base_model_relation"] == "quantized"
    assert 'snapshot_download("me/tiny-w4")' in local["README.md"].decode()  # snippets name the repo
    assert "me/tiny-w4" in out and "dev" in out
    _no_token_anywhere(out, err, caplog.text, folders=(checkpoint,), hub=hub)


def test_push_again_sends_no_blob_twice(hub, checkpoint, capsys) -> None:
    """A second push (e.g. after an interrupted one) re-sends only what the hub lacks; public by default."""
    assert main(["push", str(checkpoint), "me/tiny"]) == 0
    uploads = list(hub.uploads)
    assert main(["push", str(checkpoint), "me/tiny"]) == 0
    assert hub.uploads == uploads and len(hub.commits) == 2
    assert hub.repos["me/tiny"]["private"] is False
    assert hub.files("me/tiny") == _folder(checkpoint)


def test_save_quantized_push_to_hub(hub, make_tiny_llama, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    result = pipeline.quantize(make_tiny_llama(), RTNConfig(QuantScheme(4, 32, False)), progress=False)
    path = save_quantized(result, tmp_path / "asym", format="gptq_v2", push_to_hub="org/asym", private=True)
    assert len(hub.commits) == 1 and hub.files("org/asym") == _folder(path)
    assert 'snapshot_download("org/asym")' in (path / "README.md").read_text()
    _no_token_anywhere(caplog.text, folders=(path,), hub=hub)


# ---------------------------------------------------------------------------------------------------
# refusals and errors: one line, exit 2, nothing committed, no token in the output
# ---------------------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("setup", "repo", "message"),
    [
        ("no_token", "me/tiny", "no hub token: set HF_TOKEN"),
        ("wrong_token", "me/tiny", "refused: the token was rejected (401)"),
        ("forbidden", "me/tiny", "refused: the token may not write there (403)"),
        ("ok", "not a repo!", "invalid repository id 'not a repo!'"),
        ("ok", "justaname", "give it as owner/name"),
        ("unreachable", "me/tiny", "the hub is unreachable"),
    ],
)
def test_push_errors_are_one_line(hub, checkpoint, monkeypatch, capsys, setup, repo, message) -> None:
    if setup == "no_token":
        monkeypatch.delenv("HF_TOKEN")
    elif setup == "wrong_token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    elif setup == "forbidden":
        hub.forbid = True
    elif setup == "unreachable":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    card = (checkpoint / "README.md").read_bytes()
    assert main(["push", str(checkpoint), repo]) == 2
    assert (checkpoint / "README.md").read_bytes() == card  # a failed push leaves the folder as it was
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmquant: error: ") and message in lines[0], err
    assert not hub.commits and out == ""
    _no_token_anywhere(out, err)


def test_refuses_a_folder_that_does_not_verify(hub, checkpoint, tiny_llama_dir, capsys) -> None:
    assert main(["push", str(tiny_llama_dir), "me/float"]) == 2  # not quantized
    assert "refusing to push" in capsys.readouterr().err
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]["meta"]["verified"]  # e.g. another tool's checkpoint
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["push", str(checkpoint), "me/foreign"]) == 2
    assert "not written and verified by llmquant" in capsys.readouterr().err
    config["quantization_config"]["meta"]["verified"] = True
    config["quantization_config"]["bits"] = 8  # the tensors no longer match what the config says
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["push", str(checkpoint), "me/broken"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not verify" in err[0]
    assert hub.requests == []  # nothing was sent
