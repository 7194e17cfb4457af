"""Hub push/pull without a network.

push: huggingface_hub's own HfApi code runs unchanged; only its HTTP client is swapped (through
`set_client_factory`) for a recorder that answers like the Hub, so the test sees every byte that
would leave the machine. pull: a real HF cache under tmp (blobs/, snapshots/<sha>/, refs/main, as
huggingface_hub lays it out), read with HF_HUB_OFFLINE=1, in process and through the CLI.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
import torch
from conftest import FORGET, make_delta_patch, make_lora_patch, serving_hub, tiny_model
from huggingface_hub import constants
from safetensors.torch import load_file
from typer.testing import CliRunner

from unpatch import hub
from unpatch.errors import UnpatchError
from unpatch.patch.format import DELTA_FILE, MANIFEST, Patch
from unpatch.patch.store import load_patch, save_patch

ARCH = "gpt2"
UNPATCH = Path(sys.executable).parent / "unpatch"
RECIPE = "model: {id: tiny}\ndata: {forget: forget.txt}\nmethod: {name: ga}\npatch: {kind: delta}\n"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def with_recipe(p: Patch, text: str = RECIPE) -> Patch:
    p = p.with_manifest(recipe_sha256=hashlib.sha256(text.encode()).hexdigest())
    return dataclasses.replace(p, recipe_text=text)


def private_files(folder: Path) -> None:
    """What must never leave: forget texts beside the patch, a checkpoint, a nested folder."""
    (folder / "forget.txt").write_text("\n".join(FORGET) + "\n")
    (folder / "notes.md").write_text(FORGET[0])
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.safetensors").write_text(FORGET[1])
    (folder / "checkpoint" / "plot.png").write_bytes(FORGET[2].encode())


# ------------------------------------------------------------------ push, through a recording Hub


class FakeHub:
    """Answers the Hub endpoints HfApi uses for create_repo / create_branch / upload_folder and
    records every request. Unknown endpoints get 404 (and are recorded, so a test can see them)."""

    def __init__(self):
        self.requests: list[httpx2.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, req: httpx2.Request) -> httpx2.Response:
        body = req.read()
        self.requests.append(req)
        self.bodies.append(body)
        path = req.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/patch"})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/tree/" in path:
            return httpx2.Response(200, json=[])  # an empty repo: nothing stale to delete
        if "/preupload/" in path:  # every file as a regular blob: its bytes go inline into the commit
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            pr = req.url.params.get("create_pr") == "1"
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/patch/commit/" + COMMIT, "commitOid": COMMIT,
                                              "pullRequestUrl": "https://huggingface.co/me/patch/discussions/1" if pr else None})
        return httpx2.Response(404, json={"error": "not mocked"})

    def find(self, part: str) -> list[tuple[httpx2.Request, bytes]]:
        return [(r, b) for r, b in zip(self.requests, self.bodies, strict=True) if part in r.url.path]

    def committed(self) -> dict[str, bytes]:
        """path -> bytes of every file in the commit request(s)."""
        out = {}
        for _, body in self.find("/commit/"):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    out[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return out

    def everything_sent(self) -> bytes:
        """All request bytes, with base64 file contents decoded, to search for leaked text."""
        return b"\n".join(self.bodies + list(self.committed().values()) + [str(r.url).encode() for r in self.requests])


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.hf_api as hf_api

    with serving_hub(monkeypatch, FakeHub(), (hf_api,)) as fake:
        yield fake


@pytest.fixture(scope="module")
def model():
    return tiny_model(ARCH)


@pytest.mark.parametrize("kind", ["delta", "lora"])
def test_push_sends_only_the_patch_files(fake_hub, model, tmp_path, kind):
    make = make_delta_patch if kind == "delta" else make_lora_patch
    p = save_patch(with_recipe(make(model, ARCH)), tmp_path / "p")
    private_files(p.path)
    (p.path / "dose.png").write_bytes(b"\x89PNG fake plot")
    (p.path / "audit.json").write_text(json.dumps({"format": "unpatch-audit", "patch": {"name": p.name, "id": p.patch_id},
                                                   "quant8": {"forget_nll": 1.5}}))

    url = hub.push(p.path, "me/patch", private=True)

    assert url == f"https://huggingface.co/me/patch/commit/{COMMIT}"
    payload = ["delta.safetensors"] if kind == "delta" else ["adapter_model.safetensors", "adapter_config.json"]
    sent = fake_hub.committed()
    assert sorted(sent) == sorted([MANIFEST, *payload, "recipe.yaml", "README.md", "dose.png", "audit.json"])
    for name, data in sent.items():  # README.md is rendered afresh at push (no hash covers the file on disk)
        assert data == (p.path / name).read_bytes() or name == "README.md", name
    from unpatch.patch.card import render_card
    from unpatch.patch.store import read_extras

    assert sent["README.md"].decode() == render_card(p, read_extras(p.path))
    everything = fake_hub.everything_sent()
    for text in FORGET:  # no forget sentence in any request, file, or the card (the recipe names files, not texts)
        assert text.encode() not in everything, text
    assert b"checkpoint" not in everything and b"forget.txt\n" not in everything
    (create, body), = fake_hub.find("/api/repos/create")
    assert json.loads(body) == {"name": "patch", "organization": "me", "visibility": "private", "type": "model"}
    assert all(r.headers["authorization"] == "Bearer hf_test_token" for r in fake_hub.requests if "/api/models/me/" in r.url.path)
    (commit, body), = fake_hub.find("/commit/")
    assert commit.url.path == "/api/models/me/patch/commit/main"
    assert json.loads(body.decode().splitlines()[0])["value"]["summary"].startswith(f"unpatch: {p.name} ({kind}, id {p.patch_id[:12]}")


def test_push_to_branch_and_as_pull_request(fake_hub, model, tmp_path):
    p = save_patch(with_recipe(make_delta_patch(model, ARCH)), tmp_path / "p")
    hub.push(p.path, "me/patch", revision="dev")
    assert [r.url.path for r, _ in fake_hub.find("/branch/")] == ["/api/models/me/patch/branch/dev"]
    assert [r.url.path for r, _ in fake_hub.find("/commit/")] == ["/api/models/me/patch/commit/dev"]
    fake_hub.requests.clear(), fake_hub.bodies.clear()
    assert hub.push(p.path, "me/patch", create_pr=True) == "https://huggingface.co/me/patch/discussions/1"
    (commit, _), = fake_hub.find("/commit/")
    assert commit.url.params.get("create_pr") == "1"


def test_push_cli(fake_hub, model, tmp_path):
    from unpatch.cli import app

    p = save_patch(with_recipe(make_delta_patch(model, ARCH)), tmp_path / "p")
    r = CliRunner().invoke(app, ["push", str(p.path), "--repo", "me/patch", "--private", "--revision", "v1"])
    assert r.exit_code == 0, r.output
    assert f"commit/{COMMIT}" in r.output.replace("\n", "")
    assert json.loads(fake_hub.find("/api/repos/create")[0][1])["visibility"] == "private"
    assert fake_hub.find("/commit/v1")


def corrupt_payload(p: Patch) -> None:
    t = load_file(p.path / DELTA_FILE)
    k = next(iter(t))
    t[k] = t[k] + 1
    from safetensors.torch import save_file

    save_file(t, p.path / DELTA_FILE)


@pytest.mark.parametrize("damage", ["payload", "recipe", "nan"])
def test_push_refuses_a_patch_that_fails_verify(fake_hub, model, tmp_path, damage):
    p = with_recipe(make_delta_patch(model, ARCH))
    if damage == "nan":
        k = next(iter(p.tensors))
        p = dataclasses.replace(p, tensors={**p.tensors, k: torch.full_like(p.tensors[k], float("nan"))})
    p = save_patch(p, tmp_path / "p")
    if damage == "payload":
        corrupt_payload(p)
    elif damage == "recipe":  # e.g. forget texts pasted into the recipe after the build
        (p.path / "recipe.yaml").write_text(RECIPE + f"# {FORGET[0]}\n")
    with pytest.raises(UnpatchError, match="refusing to push") as e:
        hub.push(p.path, "me/patch")
    assert "\n" not in str(e.value)
    assert fake_hub.requests == []  # refused before any request


def test_push_argument_errors(fake_hub, model, tmp_path, monkeypatch):
    p = save_patch(make_delta_patch(model, ARCH), tmp_path / "p")
    with pytest.raises(UnpatchError, match="owner/name"):
        hub.push(p.path, "not-a-repo")
    with pytest.raises(UnpatchError, match="--create-pr"):
        hub.push(p.path, "me/patch", revision="dev", create_pr=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(UnpatchError, match="no Hugging Face token; run `hf auth login` or set HF_TOKEN"):
        hub.push(p.path, "me/patch")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnpatchError, match="HF_HUB_OFFLINE"):
        hub.push(p.path, "me/patch")
    assert fake_hub.requests == []


# ------------------------------------------------------------------ pull, from a real HF cache


def cache_repo(cache: Path, repo: str, folder: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay out `folder` as huggingface_hub caches a download: blobs by hash, snapshot symlinks, a ref."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import: set them in this process too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pull_offline_from_the_cache(hf_cache, model, tmp_path):
    p = save_patch(make_delta_patch(model, ARCH), tmp_path / "p")
    snap = cache_repo(hf_cache, "owner/name", p.path)
    assert hub.pull("owner/name") == snap
    assert hub.pull(f"owner/name@{COMMIT}") == snap
    q = hub.resolve_patch("owner/name")
    assert q.path == snap and q.patch_id == p.patch_id


def test_pull_offline_missing_repo_is_one_line(hf_cache):
    for ref in ("owner/missing", "owner/missing@dev"):
        with pytest.raises(UnpatchError, match="not in the local Hugging Face cache") as e:
            hub.pull(ref)
        assert "\n" not in str(e.value)
    with pytest.raises(UnpatchError, match="no local folder 'patches/gone' either"):
        hub.resolve_patch("patches/gone")
    with pytest.raises(UnpatchError, match="not a Hub patch id"):
        hub.pull("just-a-name")


def test_cli_pull_and_apply_a_hub_id_offline(hf_cache, model, tmp_path):
    """`unpatch pull` and `unpatch apply owner/name` in subprocesses, with only the env vars set."""
    from unpatch.patch.apply import Applied

    base = tmp_path / "base"
    model.save_pretrained(base)
    p = save_patch(make_delta_patch(model, ARCH), tmp_path / "p")
    snap = cache_repo(hf_cache, "owner/name", p.path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_cache.parent), HF_HUB_CACHE=str(hf_cache), HF_HUB_OFFLINE="1", COLUMNS="1000")
    jobs = [["pull", "owner/name"], ["apply", "owner/name", "--model", base, "--scale", "0.5", "--out", tmp_path / "M"],
            ["pull", "owner/missing"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        pulled, applied, missing = pool.map(
            lambda a: subprocess.run([str(UNPATCH), *map(str, a)], capture_output=True, text=True, env=env, timeout=300), jobs)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == str(snap)
    assert applied.returncode == 0, applied.stderr
    want = dict(model.named_parameters())
    Applied(want_model := tiny_model(ARCH)).apply(load_patch(p.path), 0.5)
    got = load_file(tmp_path / "M" / "model.safetensors")
    for n, t in want_model.named_parameters():
        if n in got:
            assert torch.equal(got[n], t.data), n
    assert any(not torch.equal(got[n], want[n].data) for n in got if n in want)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: patch 'owner/missing': not in the local Hugging Face cache")
    assert len(missing.stderr.strip().splitlines()) == 1
