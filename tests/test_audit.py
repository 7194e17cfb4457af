"""The robustness audit: RTN quantisation against hand-computed values and its error bound, the
audit on a tiny model (finite report, a fine-tune that really moves the weights, the base left
untouched), and the report file beside the patch (verify still passes, no texts inside)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from conftest import FORGET, make_lora_patch, state_equal, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from unpatch.audit import AUDIT_FILE, audit, audit_data, audit_model
from unpatch.errors import UnpatchError
from unpatch.hub import files_to_push
from unpatch.patch.store import load_patch, save_patch
from unpatch.quantise import linear_weights, quantise_, rtn

RETAIN = ["a brown dog is good", "people ran over the mat", "she sat on a mat and he ran",
          "the lazy cat was very quick", "good people are quick", "he is a brown fox"]
FAST = dict(steps=3, lr=1e-3, batch_size=4, max_length=16)


# ------------------------------------------------------------------ RTN


def test_rtn_equals_hand_computation():
    w = torch.tensor([[1.0, -0.4, 0.2, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [2.0, -1.1, 0.3, 0.01]])
    # 8 bits: s = absmax / 127 per row; w / s = [127, -50.8, 25.4, 0] and [127, -69.85, 19.05, 0.635]
    want8 = torch.tensor([[127.0, -51, 25, 0], [0, 0, 0, 0], [127, -70, 19, 1]]) * torch.tensor([[1 / 127], [1.0], [2 / 127]])
    assert torch.allclose(rtn(w, 8), want8, rtol=0, atol=1e-7)
    # 4 bits: qmax 7; w / s = [7, -2.8, 1.4, 0] and [7, -3.85, 1.05, 0.035]
    want4 = torch.tensor([[7.0, -3, 1, 0], [0, 0, 0, 0], [7, -4, 1, 0]]) * torch.tensor([[1 / 7], [1.0], [2 / 7]])
    assert torch.allclose(rtn(w, 4), want4, rtol=0, atol=1e-7)
    # GPT-2's Conv1D stores (in, out): the channel is a column
    assert torch.equal(rtn(w.T.contiguous(), 8, in_dim=0), rtn(w, 8).T)
    assert rtn(w.half(), 8).dtype == torch.float16
    with pytest.raises(UnpatchError, match="--bits 1"):
        rtn(w, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_moves_each_weight_by_at_most_half_a_step(arch):
    model = tiny_model(arch)
    before = {n: w.detach().clone() for n, (w, _) in linear_weights(model).items()}
    dims = {n: d for n, (_, d) in linear_weights(model).items()}
    head = model.get_output_embeddings().weight.detach().clone()
    worst = quantise_(model, 8)
    after = dict(model.named_parameters())
    assert before and worst > 0
    for n, w in before.items():
        absmax = w.abs().amax(dim=dims[n], keepdim=True)
        err = (after[n].detach() - w).abs()
        assert (err <= absmax / 127 / 2 * (1 + 1e-6)).all(), n  # half a quantisation step, per output channel
        assert err.max() > 0, n
    assert torch.equal(model.get_output_embeddings().weight, head)  # the head (tied: the embedding) is kept


# ------------------------------------------------------------------ the audit


@pytest.fixture(scope="module")
def tiny(models_dir):
    folder = models_dir / "llama"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    patch = make_lora_patch(model, "llama", model_id=str(folder), targets=["q_proj", "v_proj", "down_proj", "up_proj"])
    return folder, model, tok, patch


def test_audit_reports_finite_numbers_and_leaves_the_base_alone(tiny):
    _, model, tok, patch = tiny
    base = copy.deepcopy(model)
    report = audit_model(model, tok, patch, FORGET, RETAIN, **FAST)
    stages = report["stages"]
    assert list(stages) == ["base", "patched", "int8", "int4", "finetune"]
    for row in stages.values():
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    assert stages["patched"]["forget_nll"] != stages["base"]["forget_nll"]
    assert stages["patched"]["forgetting_kept"] == pytest.approx(1.0)
    assert 0 < stages["int8"]["max_weight_change"] < stages["int4"]["max_weight_change"]
    assert stages["finetune"]["max_weight_change"] > 1e-4  # the fine-tune really trained
    assert stages["finetune"]["retain_nll"] != stages["patched"]["retain_nll"]
    assert state_equal(model, base)  # patch reverted bit for bit, variants worked on a copy
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_audit_finetune_changes_weights_by_the_steps(tiny):
    _, model, tok, patch = tiny
    none = audit_model(model, tok, patch, FORGET, RETAIN, bits=(), **{**FAST, "steps": 0})
    assert list(none["stages"]) == ["base", "patched"]
    one = audit_model(model, tok, patch, FORGET, RETAIN, bits=(), **{**FAST, "steps": 1})["stages"]["finetune"]
    more = audit_model(model, tok, patch, FORGET, RETAIN, bits=(), **{**FAST, "steps": 4})["stages"]["finetune"]
    assert 0 < one["max_weight_change"] < more["max_weight_change"]


def saved_with_recipe(tiny, tmp_path):
    """A patch folder whose recipe.yaml names forget/retain files lying beside it."""
    folder, _, _, patch = tiny
    text = yaml.safe_dump({"model": {"id": str(folder)}, "data": {"forget": "forget.txt", "retain": "retain.txt"},
                           "method": {"name": "ga"}, "patch": {"kind": "lora", "rank": 4}})
    import dataclasses
    import hashlib

    p = dataclasses.replace(patch.with_manifest(recipe_sha256=hashlib.sha256(text.encode()).hexdigest()), recipe_text=text)
    saved = save_patch(p, tmp_path / "p")
    (saved.path / "forget.txt").write_text("\n".join(FORGET))
    (saved.path / "retain.txt").write_text("\n".join(RETAIN))
    return saved


def test_audit_writes_report_beside_the_patch_and_verify_passes(tiny, tmp_path):
    saved = saved_with_recipe(tiny, tmp_path)
    report, file = audit(load_patch(saved.path), bits=(8,), device="cpu", **FAST)
    assert file == saved.path / AUDIT_FILE
    on_disk = json.loads(file.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["data"] == {"forget": "forget.txt", "retain": "retain.txt", "n_forget": len(FORGET), "n_retain": len(RETAIN)}
    assert on_disk["patch"]["id"] == saved.patch_id
    assert not any(t in file.read_text() for t in FORGET + RETAIN)  # numbers and names only: it gets pushed
    again = load_patch(saved.path)  # hashes still match: audit.json is not a payload file
    assert again.patch_id == saved.patch_id
    assert AUDIT_FILE in files_to_push(again)
    assert not list(saved.path.glob(".audit.json.tmp-*"))
    assert "## Audit" in (saved.path / "README.md").read_text()  # the card is refreshed with the report


def test_audit_cli_with_source_options(tiny, tmp_path, monkeypatch):
    from unpatch.cli import app

    folder, model, _, patch = tiny
    saved = save_patch(patch, tmp_path / "p")  # no recipe: the data comes from the options
    (tmp_path / "f.txt").write_text("\n".join(FORGET))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in RETAIN))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "reports" / "a.json"
    r = CliRunner().invoke(app, ["audit", str(saved.path), "--model", str(folder), "--forget", "f.txt", "--retain", "r.jsonl",
                                 "--bits", "4", "--steps", "2", "--lr", "1e-3", "--batch-size", "4", "--max-length", "16",
                                 "--limit", "5", "--scale", "0.5", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert list(rep["stages"]) == ["base", "patched", "int4", "finetune"]
    assert rep["settings"]["scale"] == 0.5 and rep["data"]["n_forget"] == 5 and rep["data"]["retain"] == "r.jsonl"
    assert "finetune" in r.output and not (saved.path / AUDIT_FILE).exists()


def test_audit_data_errors_name_the_option(tiny, tmp_path):
    _, _, _, patch = tiny
    bare = save_patch(patch, tmp_path / "bare")
    with pytest.raises(UnpatchError, match="pass --forget SOURCE"):
        audit_data(load_patch(bare.path), None, None, None)
    saved = saved_with_recipe(tiny, tmp_path)
    (saved.path / "forget.txt").unlink()  # as after a pull: the recipe's data stays with its author
    with pytest.raises(UnpatchError, match=r"forget.txt.*pass --forget SOURCE") as e:
        audit_data(load_patch(saved.path), None, None, None)
    assert "\n" not in str(e.value)
    with pytest.raises(UnpatchError, match="--bits 1"):
        audit_model(None, None, patch, FORGET, RETAIN, bits=(8, 1))  # refused before touching a model
    f, r, names = audit_data(load_patch(saved.path), str(saved.path / "retain.txt"), None, 2)
    assert (f, r, names["forget"], names["n_retain"]) == (RETAIN[:2], RETAIN[:2], "retain.txt", 2)


def test_quantisation_is_a_real_gguf_round_trip_where_supported():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from unpatch.quantise import gguf_roundtrip, quantise_auto_

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for bits, name in ((8, "Q8_0"), (4, "Q4_0")):
        t = getattr(GGMLQuantizationType, name)
        want = torch.from_numpy(dequantize(quantize(w.numpy(), t), t))
        assert torch.equal(gguf_roundtrip(w, bits), want)  # the library's bytes, not an imitation
        assert torch.equal(gguf_roundtrip(w.T.contiguous(), bits, in_dim=0), want.T)  # Conv1D: rows along the input
    assert gguf_roundtrip(w, 6) is None and gguf_roundtrip(torch.randn(4, 33), 8) is None  # no GGUF type / not blocks of 32
    model = tiny_model("llama")
    n = len(linear_weights(model))
    err, how = quantise_auto_(model, 4)
    assert how == f"GGUF Q4_0 round trip (gguf.quants) of {n} tensors" and err > 0
    assert quantise_auto_(tiny_model("llama"), 6)[1] == f"simulated per-channel RTN of {n} tensors"
