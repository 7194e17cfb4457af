"""The fast verified apply: file-backed fingerprints and originals, the hash cache, blake3 and v1 sha256 patches."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import BUILD_CONFIGS, make_delta_patch, make_lora_patch, state_equal, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import unpatch.patch.apply as apply_mod
from unpatch import hashcache
from unpatch.errors import UnpatchError
from unpatch.fingerprint import combine, tensor_hash
from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.patch.format import MANIFEST, BaseRef
from unpatch.patch.merged import apply_to_folder, revert_folder
from unpatch.patch.store import load_patch, save_patch
from unpatch.provenance import Origin
from unpatch.safetensors_io import SafetensorsFile


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A tiny llama saved as safetensors, old enough for its hashes to be cached, and a private cache."""
    monkeypatch.setenv("UNPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashcache, "RACY_SECONDS", 0.0)
    hashcache._MEMO.clear()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(BUILD_CONFIGS["llama"]()).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def no_memory_hashing(monkeypatch):
    real = apply_mod.tensor_hashes

    def guard(tensors, algo="sha256"):
        assert not tensors, f"hashed {sorted(tensors)} in memory"
        return real(tensors, algo)
    monkeypatch.setattr(apply_mod, "tensor_hashes", guard)


def test_loaded_model_applies_without_hashing_or_copying(folder, monkeypatch):
    model, _, _ = load_model(str(folder), device="cpu")
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta, lora = make_delta_patch(model, "llama"), make_lora_patch(model, "llama")
    no_memory_hashing(monkeypatch)
    a = Applied(model)
    a.apply(delta, 0.7)
    a.apply(lora, 1.0)
    assert a.originals and all(isinstance(o, Origin) for o in a.originals.values())  # no backup copy
    assert not all(torch.equal(p, pristine[n]) for n, p in model.named_parameters())
    assert a.revert() is True
    assert all(torch.equal(p.view(torch.int32), pristine[n].view(torch.int32)) for n, p in model.named_parameters())
    Applied(model).apply(delta, 1.0)  # reverted from the file: trusted again, still without hashing


def test_changed_weights_are_rehashed_and_refused(folder):
    model, _, _ = load_model(str(folder), device="cpu")
    delta = make_delta_patch(model, "llama")
    name = next(iter(delta.manifest.base.tensors))
    with torch.no_grad():  # an optimizer step would do this (bumps the version counter)
        dict(model.named_parameters())[name].add_(1e-3)
    with pytest.raises(UnpatchError, match="fingerprint"):
        Applied(model).apply(delta, 1.0)


def test_revert_refuses_when_base_file_changed(folder):
    model, _, _ = load_model(str(folder), device="cpu")
    delta = make_delta_patch(model, "llama")
    a = Applied(model)
    a.apply(delta, 1.0)
    patched = {n: p.detach().clone() for n, p in model.named_parameters()}
    os.utime(folder / "model.safetensors")  # any write changes ctime
    with pytest.raises(UnpatchError, match="changed since the model was loaded"):
        a.revert()
    assert all(torch.equal(p, patched[n]) for n, p in model.named_parameters())  # left as it was


def test_hash_cache_is_keyed_by_file_identity(folder, monkeypatch):
    st = SafetensorsFile(folder / "model.safetensors")
    first = hashcache.file_hashes(st, "sha256")
    assert first == {n: tensor_hash(st.read(n)) for n in st.keys()}
    entry = json.loads(next((folder.parent / "cache" / "hashes").glob("*.json")).read_text())
    assert entry["key"] == hashcache.file_key(st.path) and entry["hashes"]["sha256"] == first
    # rewrite one tensor's bytes in place, same size: the key changes, so the cache is not used
    name = st.keys()[0]
    _, _, begin, end = st.entries[name]
    with open(st.path, "r+b") as f:
        f.seek(st.data_start + begin)
        f.write(bytes(end - begin))
    hashcache._MEMO.clear()
    again = hashcache.file_hashes(SafetensorsFile(st.path), "sha256")
    assert again[name] != first[name] and again[name] == tensor_hash(torch.zeros(st.shape(name)))
    # a file changed within RACY_SECONDS is hashed but never cached
    monkeypatch.setattr(hashcache, "RACY_SECONDS", 3600.0)
    os.utime(st.path)
    hashcache.file_hashes(SafetensorsFile(st.path), "sha256")
    entry = json.loads(next((folder.parent / "cache" / "hashes").glob("*.json")).read_text())
    assert entry["key"] != hashcache.file_key(st.path)


def test_version1_sha256_manifest_still_verifies_and_applies(tmp_path):
    """A manifest written before `base.hash` existed (no such key) is sha256, loads, checks and applies."""
    model = tiny_model("llama")
    saved = save_patch(make_delta_patch(model, "llama"), tmp_path / "p")
    raw = json.loads((tmp_path / "p" / MANIFEST).read_text())
    del raw["base"]["hash"]
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(raw, indent=2))
    old = load_patch(tmp_path / "p")
    assert old.manifest.base.hash == "sha256" and old.patch_id == saved.patch_id
    a = Applied(model)
    a.apply(old, 1.0)
    assert a.revert() is True and state_equal(model, tiny_model("llama"))
    with pytest.raises(UnpatchError, match="fingerprint"):
        Applied(tiny_model("llama", seed=5)).apply(old, 1.0)


def test_blake3_fingerprint(tmp_path):
    pytest.importorskip("blake3")
    model = tiny_model("llama")
    p = make_delta_patch(model, "llama")
    params = dict(model.named_parameters())
    b3 = {n: tensor_hash(params[n].data, "blake3") for n in p.manifest.base.tensors}
    assert all(b3[n] != p.manifest.base.tensors[n] for n in b3)
    fast = p.with_manifest(base=BaseRef(id="tiny", dtype="float32", tensors=b3, fingerprint=combine(b3), hash="blake3"))
    fast = load_patch(save_patch(fast, tmp_path / "b3").path)
    assert fast.manifest.base.hash == "blake3"
    a = Applied(model)
    a.apply(fast, 1.0)
    assert a.revert() is True
    mislabelled = p.with_manifest(base=p.manifest.base.model_copy(update={"hash": "blake3"}))
    with pytest.raises(UnpatchError, match="fingerprint"):
        Applied(model).apply(mislabelled, 1.0)


def test_apply_out_uses_cached_hashes_and_reverts_exactly(folder, tmp_path):
    model, _, _ = load_model(str(folder), device="cpu")
    delta = save_patch(make_delta_patch(model, "llama"), tmp_path / "d")
    ledger = apply_to_folder(str(folder), [(delta, 0.5)], tmp_path / "m")
    assert ledger["base"]["hash"] == "sha256"
    assert hashcache.cached(folder / "model.safetensors", "sha256")  # the base's hashes are on disk now
    report = revert_folder(tmp_path / "m", out=tmp_path / "r")
    assert report["mode"] == "exact" and report["verified"] is True
    a, b = SafetensorsFile(folder / "model.safetensors"), SafetensorsFile(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(a.read(n).view(torch.uint8), b.read(n).view(torch.uint8)) for n in a.keys())
