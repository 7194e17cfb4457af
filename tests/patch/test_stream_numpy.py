"""`apply --out` of a delta streams through numpy, without importing torch, and gives the bits
the in-memory (torch) apply gives: dense and row-sparse updates, float32 and float16 bases."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import BUILD_CONFIGS, make_delta_patch, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import unpatch.patch.merged as merged_mod
from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.patch.merged import apply_to_folder, revert_folder
from unpatch.patch.store import load_patch, save_patch
from unpatch.patch.update import Update


def _base(folder, dtype):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(BUILD_CONFIGS["llama"]()).to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _delta(model, out, dtype_name: str, coefficient: float = 1.0):
    patch = make_delta_patch(model, "llama", coefficient=coefficient)
    rows = next(k for k in patch.tensors if k.endswith("::rows"))
    patch.tensors[rows] = torch.tensor([1, 1, 4])  # a repeated row: added twice, in order, by both paths
    patch = patch.with_manifest(base=patch.manifest.base.model_copy(update={"dtype": dtype_name}))
    return save_patch(patch, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [1.0, -1.0, 0.37, 2.5])
def test_streamed_apply_out_has_the_bits_of_the_in_memory_apply(tmp_path, monkeypatch, dtype, scale):
    monkeypatch.setenv("UNPATCH_CACHE", str(tmp_path / "cache"))
    folder = _base(tmp_path / "base", dtype)
    model, _, _ = load_model(str(folder), device="cpu", dtype=str(dtype).removeprefix("torch."))
    patch = load_patch(_delta(model, tmp_path / "delta", str(dtype).removeprefix("torch."), coefficient=0.3).path)

    def torch_add(*a, **k):
        raise AssertionError("apply --out of a delta went through torch")
    with monkeypatch.context() as m:
        m.setattr(Update, "add_to", torch_add)
        m.setattr(merged_mod, "CHUNK", 52)  # 13 fp32 / 26 fp16 elements: every tensor in many uneven pieces
        apply_to_folder(str(folder), [(patch, scale)], tmp_path / "merged")

    Applied(model).apply(patch, scale)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    params = dict(model.named_parameters())
    changed = 0
    for name, p in params.items():
        assert merged[name].dtype == dtype
        assert torch.equal(merged[name].view(torch.int16), p.detach().view(torch.int16)), name
        changed += name in patch.updates()
    assert changed == len(patch.updates()) > 1
    # and it reverts bit for bit to the base
    revert_folder(tmp_path / "merged", out=tmp_path / "reverted")
    base = load_file(folder / "model.safetensors")
    assert all(torch.equal(load_file(tmp_path / "reverted" / "model.safetensors")[n], base[n]) for n in base)


def test_apply_out_of_a_delta_never_imports_torch(tmp_path):
    folder = _base(tmp_path / "base", torch.float32)
    model, _, _ = load_model(str(folder), device="cpu")
    delta = _delta(model, tmp_path / "delta", "float32")
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else 'no torch'))\n"
             "from unpatch.cli import main\n"
             f"sys.argv = ['unpatch', 'apply', {str(delta.path)!r}, '--scale', '0.5', '--model', {str(folder)!r}, "
             f"'--out', {str(tmp_path / 'merged')!r}]\n"
             "main()\n")
    env = {**os.environ, "UNPATCH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no torch"), r.stdout
    assert (tmp_path / "merged" / "model.safetensors").exists()
