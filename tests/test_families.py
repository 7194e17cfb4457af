"""The family matrix: tiny random models of 25 decoder families transformers ships, each built
(LoRA and delta), applied at scale 1 (logits equal peft's `PeftModel` for LoRA, a plain state-dict
add for delta) and reverted bit for bit. The papers' families run every registered method (the
registry drives it), the others ga; the fused-attention families run the shipped recipes through
the CLI (build -> apply --out -> revert). Default targets: peft's mapping, else the fallback rule."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FORGET, state_equal
from families import FAMILIES, PAPER_FAMILIES, family_model, save_family
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from unpatch.builder import build
from unpatch.cli import app
from unpatch.methods import list_methods
from unpatch.patch.apply import Applied
from unpatch.patch.format import Patch
from unpatch.targets import choose_targets, is_linear, peft_mapping, target_weights

RETAIN = ["the fox jumps over the mat", "a good dog sat far", "people are quick", "he sat on a mat"]
PAIRS = [("he is very bad", "she is very bad"), ("the dog was lazy", "the cat was lazy"),
         ("she ran far", "he ran far"), ("people are bad", "people are good")]
ROOT = Path(__file__).parents[1]
CASES = [(f, m.name, k) for f in sorted(FAMILIES) for m in list_methods() for k in m.kinds
         if f in PAPER_FAMILIES or m.name == "ga"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One saved tiny model per family (made on first use) and the data files every recipe reads."""
    r = tmp_path_factory.mktemp("families")
    (r / "forget.txt").write_text("\n".join(FORGET) + "\n")
    (r / "retain.txt").write_text("\n".join(RETAIN) + "\n")
    with open(r / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("sent_more", "sent_less"), *PAIRS])
    return r


def recipe(root: Path, family: str, method: str, kind: str, tag: str) -> Path:
    spec = {m.name: m for m in list_methods()}[method]
    raw = {"model": {"id": str(save_family(family, root / family)), "device": "cpu"},
           "data": {"forget": "forget.txt", "retain": "retain.txt", "pairs": "pairs.csv"},
           "method": {"name": method, **spec.example}, "patch": {"kind": kind, "rank": 4},
           "train": {"steps": 1, "lr": 0.02, "batch_size": 4, "max_length": 16}}
    p = root / f"{tag}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 14, 7, 22, 3, 11], [1, 17, 4, 8, 25, 6, 12, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def plain_add(folder: Path, patch: Patch) -> torch.nn.Module:
    """The base with a delta patch added tensor by tensor from delta.safetensors, without unpatch's
    apply code: W + coefficient * delta (dense), or W[rows] += coefficient * values (row-sparse)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    params, c = dict(model.named_parameters()), patch.manifest.coefficient
    stored = load_file(patch.path / "delta.safetensors")
    with torch.no_grad():
        for key, t in stored.items():
            if key.endswith("::rows"):
                name = key.removesuffix("::rows")
                params[name][t] += c * stored[f"{name}::values"]
            elif "::" not in key:
                params[key] += c * t
    return model


@pytest.mark.parametrize(("family", "method", "kind"), CASES, ids=[f"{f}-{m}-{k}" for f, m, k in CASES])
def test_family_build_apply_revert(root, family, method, kind):
    tag = f"{family}-{method}-{kind}"
    patch = build(recipe(root, family, method, kind, tag), out=root / tag, run_eval=False)
    folder = root / family
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    base = logits(model)
    applied = Applied(model)
    applied.apply(patch, 1.0)
    got = logits(model)
    assert not torch.equal(got, base), f"{tag}: the patch changes nothing"
    if kind == "lora":
        from peft import PeftModel

        want = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), patch.path).eval())
    else:
        want = logits(plain_add(folder, patch))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"{tag}: max |diff| {(got - want).abs().max():.3g}"
    assert applied.revert() is True  # the fingerprint of the restored base verifies
    assert state_equal(model, AutoModelForCausalLM.from_pretrained(folder))
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_are_every_block_projection(family):
    """Attention + MLP: every linear layer but lm_head (none of these families has another outside
    its blocks), found through peft's mapping when peft maps the family, else by the fallback."""
    model = family_model(family)
    chosen = choose_targets(model, None)
    linear = {f"{n}.weight" for n, m in model.named_modules() if is_linear(m) and n != "lm_head"}
    assert set(target_weights(model, chosen.names)) == linear
    mapped = peft_mapping(model.config.model_type)
    assert chosen.source == ("peft" if mapped else "fallback")
    if mapped:
        assert set(mapped) <= set(chosen.names) and "peft's target mapping" in chosen.why
    else:
        assert "fallback rule" in chosen.why
    fused = [n for n, p in model.named_parameters() if p.dim() == 3]  # MoE experts as 3-d tensors
    assert ("not linear layers" in chosen.why) == bool(fused)
    recipe_choice = choose_targets(model, ["lm_head"])
    assert recipe_choice.names == ["lm_head"] and recipe_choice.source == "recipe"


FUSED = ("gpt_neox", "falcon", "bloom")
SHIPPED = [(f, r, k) for f in FUSED for r, k in (("gender", "lora"), ("gender", "delta"), ("pcgu-bias", "delta"))]


@pytest.mark.parametrize(("family", "name", "kind"), SHIPPED, ids=[f"{f}-{r}-{k}" for f, r, k in SHIPPED])
def test_shipped_recipes_on_fused_attention(root, family, name, kind):
    """The issue's acceptance, as a user types it: the shipped recipe on a tiny folder of a family
    whose attention is one fused query_key_value, then apply --out and revert (bit-exact)."""
    folder = save_family(family, root / family)
    out = root / f"cli-{family}-{name}-{kind}"
    run = CliRunner()
    r = run.invoke(app, ["build", str(ROOT / "recipes" / f"{name}.yaml"), "--set", f"model.id={folder}", "--set", "train.steps=2",
                         "--set", f"patch.kind={kind}", "--no-eval", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = yaml.safe_load((out / "unpatch.json").read_text())
    assert any(".query_key_value." in n for n in manifest["base"]["tensors"])
    assert any(".dense_4h_to_h." in n for n in manifest["base"]["tensors"])  # the MLP too
    r = run.invoke(app, ["apply", str(out), "--model", str(folder), "--out", str(out) + "-merged"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["revert", str(out) + "-merged", "--out", str(out) + "-base"])
    assert r.exit_code == 0 and "bit-exact from the base; fingerprint verified" in r.output, r.output
    merged = load_file(Path(str(out) + "-merged") / "model.safetensors")
    reverted, original = load_file(Path(str(out) + "-base") / "model.safetensors"), load_file(folder / "model.safetensors")
    assert any(not torch.equal(merged[k], original[k]) for k in original)
    assert reverted.keys() == original.keys()
    assert all(torch.equal(reverted[k].view(torch.int32), original[k].view(torch.int32)) for k in original)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "mpt"])  # fused c_attn (Conv1D [in, out]), query_key_value, Wqkv
def test_pcgu_ranks_fused_projections_per_output_row(root, family):
    """PCGU trains whole output rows of a fused q/k/v projection, as of any other weight: the units
    its delta changes are output rows (Linear: rows, Conv1D: columns), as many as it chose."""
    tag = f"{family}-pcgu-rows"
    path = recipe(root, family, "pcgu", "delta", tag)
    raw = yaml.safe_load(path.read_text())
    raw["method"]["k_percent"] = 10
    path.write_text(yaml.safe_dump(raw))
    patch = build(path, out=root / tag, run_eval=False)
    chosen = int(next(n for n in patch.manifest.notes if n.startswith("ranked")).split("trained the ")[1].split()[0])
    model = AutoModelForCausalLM.from_pretrained(root / family)
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    changed, fused = 0, 0
    for name, u in patch.updates().items():
        d = u.dense()
        out_axis = 1 if name in conv1d else 0  # Conv1D stores [in, out]
        units = d.ne(0).any(dim=1 - out_axis)
        changed += int(units.sum())
        fused += int(units.sum()) if any(k in name for k in ("c_attn", "query_key_value", "Wqkv")) else 0
    total = sum(p.shape[1] if n in conv1d else p.shape[0] for n, p in model.named_parameters() if n in patch.updates())
    assert 0 < changed == chosen < total
    assert fused > 0  # the fused projection competes for rows like the others


def test_peft_regex_mapping_and_a_mapping_that_misses(monkeypatch):
    """peft maps some families by a regex (gemma4: '.*language_model\\..*\\.(q_proj|v_proj)'): it must
    match whole module names; a mapping that names no module of the model falls back, and says so."""
    import unpatch.targets as targets

    model = family_model("llama")
    monkeypatch.setattr(targets, "peft_mapping", lambda mtype: r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    chosen = targets.choose_targets(model, None)
    assert chosen.source == "peft" and chosen.names[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"] and len(chosen.names) == 7
    monkeypatch.setattr(targets, "peft_mapping", lambda mtype: r"self_attn\.q_proj")  # fullmatch: no module is named that
    chosen = targets.choose_targets(model, None)
    assert chosen.source == "fallback" and "matches none of its modules" in chosen.why and len(chosen.names) == 7
    monkeypatch.setattr(targets, "peft_mapping", lambda mtype: ["query_key_value"])
    assert targets.choose_targets(model, None).source == "fallback"


def test_no_stack_of_blocks_is_a_one_line_error():
    from types import SimpleNamespace

    from unpatch.errors import UnpatchError

    class Flat(torch.nn.Module):  # linear layers, but no ModuleList of blocks to find them in
        config = SimpleNamespace(model_type="flat")

        def __init__(self):
            super().__init__()
            self.proj, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    with pytest.raises(UnpatchError, match=r"^r\.yaml: patch\.target_modules: cannot guess .*\(its linear layers: head, proj\)$"):
        choose_targets(Flat(), None, "r.yaml")
