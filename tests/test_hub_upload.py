"""`unpatch push` through huggingface_hub's real upload path, offline (the recording Hub of
test_hub.py, answering more endpoints): a safetensors payload goes the LFS way (preupload says
"lfs", the LFS batch API hands out an upload URL, the bytes are PUT there and the commit names
the file by its sha256), and a re-push that changes the patch's kind deletes the stale payload."""

from __future__ import annotations

import hashlib
import json

import httpx2
import pytest
from conftest import make_delta_patch, serving_hub
from test_hub import ARCH, COMMIT, FakeHub, model, with_recipe  # noqa: F401  (model: the module fixture)

from unpatch import hub
from unpatch.patch.format import DELTA_FILE, LORA_CONFIG, LORA_FILE, MANIFEST
from unpatch.patch.store import save_patch


class LfsHub(FakeHub):
    """FakeHub plus: *.safetensors as LFS uploads (batch API + PUT + verify), and a repo tree that
    already holds the files of an earlier push (`existing`)."""

    def __init__(self, existing: list[str]):
        super().__init__()
        self.existing = existing
        self.stored: dict[str, bytes] = {}  # oid -> bytes PUT to the upload URL

    def __call__(self, req: httpx2.Request) -> httpx2.Response:
        path = req.url.path
        if "/preupload/" in path:
            body = req.read()
            self.requests.append(req), self.bodies.append(body)
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular", "shouldIgnore": False}
                for f in files]})
        if path.endswith(".git/info/lfs/objects/batch"):
            body = req.read()
            self.requests.append(req), self.bodies.append(body)
            objs = json.loads(body)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "actions": {
                    "upload": {"href": f"https://huggingface.co/lfs-upload/{o['oid']}"},
                    "verify": {"href": "https://huggingface.co/me/patch.git/info/lfs/objects/verify"}}} for o in objs]})
        if path.startswith("/lfs-upload/"):
            self.requests.append(req), self.bodies.append(b"")
            self.stored[path.rsplit("/", 1)[1]] = req.read()
            return httpx2.Response(200)
        if path.endswith("/info/lfs/objects/verify"):
            self.requests.append(req), self.bodies.append(req.read())
            return httpx2.Response(200, json={})
        if "/tree/" in path:
            self.requests.append(req), self.bodies.append(b"")
            return httpx2.Response(200, json=[{"type": "file", "path": p, "size": 1, "oid": "0" * 40} for p in self.existing])
        return super().__call__(req)

    def commit_lines(self) -> list[dict]:
        return [json.loads(line) for _, body in self.find("/commit/") for line in body.decode().splitlines()]


@pytest.fixture
def lfs_hub(monkeypatch, request):
    import huggingface_hub._commit_api as commit_api
    import huggingface_hub.hf_api as hf_api

    with serving_hub(monkeypatch, LfsHub(getattr(request, "param", [])), (hf_api, commit_api)) as fake:  # the LFS path
        yield fake


def test_safetensors_payload_goes_through_lfs(lfs_hub, model, tmp_path):  # noqa: F811
    p = save_patch(with_recipe(make_delta_patch(model, ARCH)), tmp_path / "p")
    assert hub.push(p.path, "me/patch") == f"https://huggingface.co/me/patch/commit/{COMMIT}"
    data = (p.path / DELTA_FILE).read_bytes()
    oid = hashlib.sha256(data).hexdigest()
    (batch, body), = lfs_hub.find(".git/info/lfs/objects/batch")
    assert json.loads(body)["objects"] == [{"oid": oid, "size": len(data)}] and json.loads(body)["hash_algo"] == "sha256"
    assert lfs_hub.stored == {oid: data}  # the exact bytes, PUT to the URL the batch API gave
    assert lfs_hub.find("/info/lfs/objects/verify")
    lines = lfs_hub.commit_lines()
    lfs = [x["value"] for x in lines if x["key"] == "lfsFile"]
    assert lfs == [{"path": DELTA_FILE, "algo": "sha256", "oid": oid, "size": len(data)}]
    inline = {x["value"]["path"] for x in lines if x["key"] == "file"}
    assert DELTA_FILE not in inline and {MANIFEST, "README.md", "recipe.yaml"} <= inline


@pytest.mark.parametrize("lfs_hub", [[MANIFEST, LORA_FILE, LORA_CONFIG, "README.md", "recipe.yaml", "sweep.png", "notes.txt"]],
                         indirect=True)
def test_repush_deletes_files_no_longer_in_the_patch(lfs_hub, model, tmp_path):  # noqa: F811
    # the repo holds a LoRA patch (and a sweep plot, and a file the user added on the Hub);
    # the same name is now pushed as a delta patch without a sweep
    p = save_patch(with_recipe(make_delta_patch(model, ARCH)), tmp_path / "p")
    hub.push(p.path, "me/patch")
    lines = lfs_hub.commit_lines()
    deleted = sorted(x["value"]["path"] for x in lines if x["key"] == "deletedFile")
    assert deleted == sorted([LORA_FILE, LORA_CONFIG, "sweep.png"])  # stale patch files only: notes.txt stays
    added = {x["value"]["path"] for x in lines if x["key"] in ("file", "lfsFile")}
    assert {MANIFEST, DELTA_FILE, "README.md"} <= added and not added & set(deleted)
