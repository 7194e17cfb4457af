"""Property tests of the patch algebra on the tiny GPT-2 / Llama / OPT models, for both kinds.

Bit-exact claims are checked as raw bytes (so -0.0 != 0.0 and NaN payloads count); claims that
involve a different order of floating-point operations are checked within fp32 tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TARGETS, make_delta_patch, make_lora_patch, state_equal, tiny_model
from safetensors.torch import load_file

from unpatch.fingerprint import combine, tensor_sha256
from unpatch.patch import algebra as ops
from unpatch.patch import merged as merge
from unpatch.patch.apply import Applied
from unpatch.patch.format import Patch
from unpatch.patch.store import load_patch, save_patch

KINDS = ["lora", "delta"]
TOL = 1e-6


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def make(kind: str, model, arch: str, seed: int = 1, name: str | None = None, **kw) -> Patch:
    if kind == "lora":
        return make_lora_patch(model, arch, seed=seed, name=name or f"lora{seed}", **kw)
    return make_delta_patch(model, arch, seed=seed, name=name or f"delta{seed}", **kw)


def applied(model, *items: tuple[Patch, float]) -> torch.nn.Module:
    """A copy of `model` with the patches applied in memory."""
    m = copy.deepcopy(model)
    a = Applied(m)
    for p, s in items:
        a.apply(p, s)
    return m


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def assert_bytes_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(raw(a[n]), raw(b[n])), f"{n} differs"


def dense_updates(p: Patch) -> dict[str, torch.Tensor]:
    return {n: u.dense() for n, u in p.updates().items()}


@pytest.fixture
def base(arch, tmp_path):
    """(model, folder): a tiny model and its save_pretrained folder."""
    model = tiny_model(arch)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    return model, folder


def saved(p: Patch, folder: Path) -> Patch:
    save_patch(p, folder)
    return load_patch(folder)


# ------------------------------------------------------------------ revert ∘ apply = identity


def test_revert_apply_is_identity_in_memory(arch, kind):
    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    p = make(kind, model, arch)
    a = Applied(model)
    a.apply(p, 0.6)
    a.apply(p, -1.7)  # the same patch twice, on the same tensors
    assert not state_equal(model, ref)
    assert a.revert() is True
    assert state_equal(model, ref)
    assert a.entries == [] and a.originals == {}


def test_revert_apply_is_identity_on_folders(arch, kind, base, tmp_path):
    model, folder = base
    p = saved(make(kind, model, arch), tmp_path / "p")
    merge.apply_to_folder(str(folder), [(p, 0.6)], tmp_path / "M1")
    report = merge.revert_folder(tmp_path / "M1", out=tmp_path / "M0")
    merge.apply_to_folder(str(folder), [(p, 0.0)], tmp_path / "B")
    assert report["mode"] == "exact" and report["verified"] is True
    m0, b, m1 = folder_tensors(tmp_path / "M0"), folder_tensors(tmp_path / "B"), folder_tensors(tmp_path / "M1")
    assert_bytes_equal(m0, b)
    assert (tmp_path / "M0" / "model.safetensors").read_bytes() == (tmp_path / "B" / "model.safetensors").read_bytes()
    # scale 0 is the base bit for bit, and the merged folder really differed
    assert_bytes_equal(b, folder_tensors(folder))
    changed = {n for n in m1 if not torch.equal(raw(m1[n]), raw(b[n]))}
    assert changed == set(p.updates())
    assert json.loads((tmp_path / "M0" / merge.LEDGER).read_text())["applied"] == []


@pytest.mark.parametrize("drop", [0, 1])
def test_revert_one_of_two_in_memory(arch, kind, drop):
    model = tiny_model(arch)
    other = "delta" if kind == "lora" else "lora"
    ps = [(make(kind, model, arch, seed=1, name="first"), 0.7), (make(other, model, arch, seed=2, name="second"), -0.4)]
    m = copy.deepcopy(model)
    a = Applied(m)
    for p, s in ps:
        a.apply(p, s)
    assert a.revert(ps[drop][0].name) is True  # by name
    keep = ps[1 - drop]
    assert state_equal(m, applied(model, keep))
    assert [e.patch.name for e in a.entries] == [keep[0].name]
    # and by object, then the last one: back to the base
    a.revert(keep[0])
    assert state_equal(m, model)


@pytest.mark.parametrize("drop", [0, 1])
def test_revert_one_of_two_on_folders(arch, kind, base, tmp_path, drop):
    model, folder = base
    other = "delta" if kind == "lora" else "lora"
    p1 = saved(make(kind, model, arch, seed=1, name="first"), tmp_path / "first")
    p2 = saved(make(other, model, arch, seed=2, name="second"), tmp_path / "second")
    ps = [(p1, 0.7), (p2, -0.4)]
    merge.apply_to_folder(str(folder), ps, tmp_path / "M12")
    report = merge.revert_folder(tmp_path / "M12", patch=ps[drop][0].name, out=tmp_path / "R")
    merge.apply_to_folder(str(folder), [ps[1 - drop]], tmp_path / "only")
    assert report["mode"] == "exact"
    assert_bytes_equal(folder_tensors(tmp_path / "R"), folder_tensors(tmp_path / "only"))
    ledger = json.loads((tmp_path / "R" / merge.LEDGER).read_text())
    assert [e["name"] for e in ledger["applied"]] == [ps[1 - drop][0].name]
    # the source folder is untouched by a revert into --out
    assert len(json.loads((tmp_path / "M12" / merge.LEDGER).read_text())["applied"]) == 2


def test_merge_without_originals_equals_default_apply_and_refuses_revert(arch, kind):
    from unpatch.errors import UnpatchError

    model = tiny_model(arch)
    p, q = make(kind, model, arch), make(kind, model, arch, seed=2)
    merged = copy.deepcopy(model)
    a = Applied(merged, keep_originals=False)
    a.apply(p, 0.6)
    a.apply(q, -1.2)  # checked against the base fingerprint, though p already changed the tensors
    assert a.originals == {}
    assert state_equal(merged, applied(model, (p, 0.6), (q, -1.2)))
    with pytest.raises(UnpatchError, match="reload the base"):
        a.revert()


# ------------------------------------------------------------------ scale


def test_scale_zero_is_base(arch, kind):
    model = tiny_model(arch)
    assert state_equal(applied(model, (make(kind, model, arch), 0.0)), model)
    assert state_equal(applied(model, (make(kind, model, arch), -0.0)), model)


@pytest.mark.parametrize("s", [0.6, -1.5, 2.0])
def test_scale_is_relative_to_as_built(arch, kind, s):
    model = tiny_model(arch)
    p = make(kind, model, arch)
    q = ops.scale_patch(p, s)
    # bookkeeping is exact: only the coefficient (and lora_alpha) change, never tensor bytes
    assert q.manifest.coefficient == p.manifest.coefficient * s
    assert q.tensors is p.tensors
    assert q.manifest.lineage[0]["op"] == "scale" and q.manifest.lineage[0]["coefficient"] == s
    if kind == "lora":
        assert q.lora_config["lora_alpha"] == p.lora_config["lora_alpha"] * s
        assert p.lora_config["lora_alpha"] == 8  # the original is not mutated
    a, b = params(applied(model, (p, s))), params(applied(model, (q, 1.0)))
    assert max_diff(a, b) <= TOL
    assert max_diff(a, params(model)) > 1e-4  # the patch did something


@pytest.mark.parametrize("s", [1.0, 2.5, -0.5])
def test_manifest_coefficient_is_applied_under_scale(arch, s):
    model = tiny_model(arch)
    raw_patch = make_delta_patch(model, arch, coefficient=1.0)
    built = make_delta_patch(model, arch, coefficient=-0.5)  # e.g. a task vector negated at build time
    got, base = params(applied(model, (built, s))), params(model)
    want = {n: base[n] + (-0.5 * s) * raw_patch.updates()[n].dense() if n in raw_patch.updates() else base[n] for n in base}
    assert max_diff(got, want) <= TOL
    assert max_diff(got, base) > 1e-4


def test_negative_scale_gives_opposite_delta(arch, kind):
    model = tiny_model(arch)
    p = make(kind, model, arch)
    base = params(model)
    plus, minus = params(applied(model, (p, 0.8))), params(applied(model, (p, -0.8)))
    dp = {n: plus[n] - base[n] for n in base}
    dm = {n: -(minus[n] - base[n]) for n in base}
    assert max_diff(dp, dm) <= TOL
    assert max(d.abs().max().item() for d in dp.values()) > 1e-4


# ------------------------------------------------------------------ stack


@pytest.mark.parametrize("kinds", [("lora", "lora"), ("delta", "delta"), ("lora", "delta")])
def test_stack_is_order_independent_and_linear(arch, kinds):
    model = tiny_model(arch)
    p1 = make(kinds[0], model, arch, seed=1, name="a")
    p2 = make(kinds[1], model, arch, seed=2, name="b")
    s12 = ops.stack_patches([(p1, 0.7), (p2, -1.2)])
    s21 = ops.stack_patches([(p2, -1.2), (p1, 0.7)])
    d12, d21 = dense_updates(s12), dense_updates(s21)
    assert d12.keys() == d21.keys() == set(p1.updates()) | set(p2.updates())
    assert max_diff(d12, d21) <= TOL
    u1, u2 = p1.updates(), p2.updates()
    want = {n: (u1[n].dense(0.7) if n in u1 else 0) + (u2[n].dense(-1.2) if n in u2 else 0) for n in d12}
    assert max_diff(d12, want) <= TOL
    assert [e["coefficient"] for e in s12.manifest.lineage] == [0.7, -1.2]
    assert s12.kind == ("lora" if kinds == ("lora", "lora") else "delta")
    # the applied results agree too
    assert max_diff(params(applied(model, (s12, 1.0))), params(applied(model, (p1, 0.7), (p2, -1.2)))) <= TOL


def test_stack_of_lora_stays_lora_with_summed_rank(arch, tmp_path):
    from peft import PeftModel

    model = tiny_model(arch)
    p1 = make_lora_patch(model, arch, seed=1, rank=4, name="a")
    p2 = make_lora_patch(model, arch, seed=2, rank=2, alpha=3, name="b", targets=TARGETS[arch][:1])  # fewer modules
    c1, c2 = 0.5, -1.5
    s = ops.stack_patches([(p1, c1), (p2, c2)], name="s")
    assert s.kind == "lora"
    assert s.lora_config["r"] == 6
    a_keys = [k for k in s.tensors if k.endswith("lora_A.weight")]
    assert len(a_keys) == len(p1.updates()) and all(s.tensors[k].shape[0] == 6 for k in a_keys)
    u1, u2 = p1.updates(), p2.updates()
    want = {n: c1 * u1[n].dense() + (c2 * u2[n].dense() if n in u2 else 0) for n in u1}
    assert max_diff(dense_updates(s), want) <= TOL
    # the stacked adapter is a valid peft adapter: peft's merge gives our applied weights bit for bit
    s = saved(s, tmp_path / "s")
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "s").merge_and_unload()
    assert state_equal(merged, applied(model, (s, 1.0)))


def test_stack_with_its_negation_is_zero(arch, kind):
    model = tiny_model(arch)
    p = make(kind, model, arch)
    for s in (ops.stack_patches([(p, 1.0), (p, -1.0)]), ops.stack_patches([(p, 1.0), (ops.negate_patch(p), 1.0)]),
              ops.stack_patches([(ops.negate_patch(p), 2.0), (p, 2.0)])):
        d = dense_updates(s)
        assert d.keys() == set(p.updates())
        assert max(t.abs().max().item() for t in d.values()) <= 1e-7
        assert max_diff(params(applied(model, (s, 1.0))), params(model)) <= 1e-7
    # and stacking p with +1 x p is 2p, not 0 (a sign bug would make these agree)
    double = dense_updates(ops.stack_patches([(p, 1.0), (p, 1.0)]))
    assert max_diff(double, {n: u.dense(2.0) for n, u in p.updates().items()}) <= TOL


# ------------------------------------------------------------------ negate


def test_negate_negate_is_identity(arch, kind, tmp_path):
    model = tiny_model(arch)
    p = make(kind, model, arch)
    nn = ops.negate_patch(ops.negate_patch(p))
    assert nn.manifest.coefficient == p.manifest.coefficient
    if kind == "lora":
        assert nn.lora_config["lora_alpha"] == p.lora_config["lora_alpha"]
    assert state_equal(applied(model, (nn, 0.6)), applied(model, (p, 0.6)))
    # also after a save/load round trip of the double negation
    assert state_equal(applied(model, (saved(nn, tmp_path / "nn"), 0.6)), applied(model, (p, 0.6)))


def test_negate_applied_is_base_minus_delta(arch, kind):
    model = tiny_model(arch)
    p = make(kind, model, arch)
    n = ops.negate_patch(p)
    assert n.manifest.coefficient == -p.manifest.coefficient
    got, base, ups = params(applied(model, (n, 1.0))), params(model), p.updates()
    for name in base:
        want = base[name] - ups[name].dense() if name in ups else base[name]
        assert torch.equal(raw(got[name]), raw(want)), name


# ------------------------------------------------------------------ convert


@pytest.mark.parametrize("factor", [1.0, -0.7])
def test_lora_to_delta_matches_peft_merge_and_unload(arch, tmp_path, factor):
    from peft import PeftModel

    model = tiny_model(arch)
    p = saved(ops.scale_patch(make_lora_patch(model, arch), factor), tmp_path / "lora")
    d = ops.lora_to_delta(p)
    assert d.kind == "delta" and set(d.encodings.values()) == {"dense"}
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").merge_and_unload()
    ours = applied(model, (d, 1.0))
    assert state_equal(merged, ours)
    assert not state_equal(ours, model)
    # the saved delta gives the same bits
    assert state_equal(merged, applied(model, (saved(d, tmp_path / "delta"), 1.0)))


def test_delta_to_lora_full_rank_and_rank_one(arch, base, tmp_path):
    from peft import PeftModel

    model, folder = base
    p = make_delta_patch(model, arch)
    types = ops.module_types_of(str(folder))
    want = dense_updates(p)
    full, rel = ops.delta_to_lora(p, 64, types)  # 64 >= every dimension of the tiny models
    assert full.kind == "lora" and full.lora_config["r"] == 64
    assert rel < 1e-5
    assert max_diff(params(applied(model, (full, 1.0))), params(applied(model, (p, 1.0)))) <= TOL
    # the converted adapter is a valid peft adapter
    full = saved(full, tmp_path / "full")
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "full").merge_and_unload()
    assert state_equal(merged, applied(model, (full, 1.0)))

    one, rel1 = ops.delta_to_lora(p, 1, types)
    assert one.lora_config["r"] == 1 and rel1 > 0.1
    got = dense_updates(one)
    err2 = sum(float((got[n].double() - want[n].double()).pow(2).sum()) for n in want)
    norm2 = sum(float(want[n].double().pow(2).sum()) for n in want)
    assert rel1 == pytest.approx(math.sqrt(err2 / norm2), rel=1e-5)
    # Eckart-Young: the best rank-1 error is the tail of the singular values
    tail = sum(float(torch.linalg.svdvals(want[n].double())[1:].pow(2).sum()) for n in want)
    assert rel1 == pytest.approx(math.sqrt(tail / norm2), rel=1e-5)


@pytest.mark.parametrize("factor", [1.0, -0.5])
def test_saved_lora_in_peft_gives_applied_logits(arch, tmp_path, factor):
    from peft import PeftModel

    model = tiny_model(arch)
    p = saved(ops.scale_patch(make_lora_patch(model, arch), factor), tmp_path / "lora")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").eval()
    ours = applied(model, (p, 1.0))
    with torch.no_grad():
        want, got, before = peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, model(input_ids=ids).logits
    assert (want - got).abs().max().item() < 1e-5
    assert (got - before).abs().max().item() > 1e-4


# ------------------------------------------------------------------ save / load, merged folders, ledger


def test_save_load_round_trip_preserves_updates(arch, kind, tmp_path):
    model = tiny_model(arch)
    p = ops.scale_patch(make(kind, model, arch), -0.3)
    out = save_patch(p, tmp_path / "p")
    q = load_patch(tmp_path / "p")
    assert q.patch_id and q.patch_id == out.patch_id
    assert q.manifest.model_dump(exclude={"files", "created"}) == p.manifest.model_dump(exclude={"files", "created"})
    assert q.lora_config == p.lora_config
    pu, qu = p.updates(), q.updates()
    assert pu.keys() == qu.keys()
    for n in pu:
        assert (pu[n].encoding, pu[n].factor, pu[n].transpose) == (qu[n].encoding, qu[n].factor, qu[n].transpose)
        assert torch.equal(raw(pu[n].dense()), raw(qu[n].dense())), n
    assert state_equal(applied(model, (q, 0.9)), applied(model, (p, 0.9)))


def test_merged_folder_loads_with_transformers(arch, kind, base, tmp_path):
    from transformers import AutoModelForCausalLM

    model, folder = base
    p = saved(make(kind, model, arch), tmp_path / "p")
    merge.apply_to_folder(str(folder), [(p, 0.6)], tmp_path / "M1")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "M1")
    ours = applied(model, (p, 0.6))
    assert state_equal(loaded, ours)
    assert not state_equal(loaded, model)


def test_ledger_records_names_scales_fingerprints(arch, kind, base, tmp_path):
    model, folder = base
    other = "delta" if kind == "lora" else "lora"
    p1 = saved(make(kind, model, arch, seed=1, name="first"), tmp_path / "first")
    p2 = saved(make(other, model, arch, seed=2, name="second"), tmp_path / "second")
    ledger = merge.apply_to_folder(str(folder), [(p1, 0.6), (p2, -1.25)], tmp_path / "M")
    assert json.loads((tmp_path / "M" / merge.LEDGER).read_text()) == ledger
    assert [(e["name"], e["scale"], e["kind"]) for e in ledger["applied"]] == [("first", 0.6, kind), ("second", -1.25, other)]
    for e, p in zip(ledger["applied"], (p1, p2), strict=True):
        assert e["patch_id"] == p.patch_id != ""
        assert e["path"] == str(p.path.resolve())
        assert e["forced"] is False
        assert e["coefficient"] == p.manifest.coefficient
        assert e["tensors"] == sorted(p.updates())
    tensors = {**p1.manifest.base.tensors, **p2.manifest.base.tensors}
    assert ledger["base"]["tensors"] == tensors
    assert ledger["base"]["fingerprint"] == combine(tensors)
    assert ledger["base"]["id"] == str(folder.resolve())
    # the recorded hashes are those of the base checkpoint's bytes
    ckpt = folder_tensors(folder)
    assert all(tensor_sha256(ckpt[n]) == h for n, h in tensors.items())
    # one patch: the ledger's base fingerprint is the patch's own
    one = merge.apply_to_folder(str(folder), [(p1, 1.0)], tmp_path / "M1")
    assert one["base"]["fingerprint"] == p1.manifest.base.fingerprint


def test_revert_without_base_is_arithmetic_and_reports_deviation(arch, kind, base, tmp_path):
    model, folder = base
    p = saved(make(kind, model, arch), tmp_path / "p")
    merge.apply_to_folder(str(folder), [(p, 0.6)], tmp_path / "M1")
    want = folder_tensors(folder)
    shutil.rmtree(folder)  # the base can no longer be read back
    report = merge.revert_folder(tmp_path / "M1", out=tmp_path / "M0")
    assert report["mode"] == "arithmetic" and str(folder) in report["reason"]
    assert 0.0 <= report["max_deviation"] <= TOL
    got = folder_tensors(tmp_path / "M0")
    assert max_diff(got, want) <= TOL
    assert max_diff(got, want) <= report["max_deviation"]  # the reported figure bounds the true deviation
    exact = all(torch.equal(raw(got[n]), raw(want[n])) for n in want)
    assert report["verified"] == exact
