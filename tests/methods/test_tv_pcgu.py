"""task_vector and pcgu on tiny models: the negation algebra of task vectors, and PCGU's row
selection (which rows, how many, in which orientation), its effect, config errors and resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FORGET, Crash, crash_at
from conftest import METHOD_PAIRS as PAIRS
from transformers import AutoModelForCausalLM, AutoTokenizer

from unpatch.batches import Batches
from unpatch.builder import build
from unpatch.errors import UnpatchError
from unpatch.methods.loop import train_loop
from unpatch.methods.pcgu import PairBatches, mean_gap, rank_rows
from unpatch.methods.pcgu_rows import row_cosines, row_partitions, select_rows
from unpatch.methods.task_vector import finetune_loss
from unpatch.patch.apply import Applied
from unpatch.recipe import load_recipe
from unpatch.sources import load_data
from unpatch.targets import default_targets, target_weights


def write_recipe(tmp: Path, models_dir: Path, method: dict, arch: str = "llama", kind: str = "delta", **train) -> Path:
    (tmp / "forget.txt").write_text("\n".join(FORGET) + "\n")
    with open(tmp / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent_more", "sent_less"])
        w.writerows(PAIRS)
    data = {"forget": "forget.txt"} if method["name"] == "task_vector" else {"pairs": "pairs.csv"}
    raw = {"model": {"id": str(models_dir / arch), "device": "cpu"}, "data": data, "method": method,
           "patch": {"kind": kind, "rank": 4, "alpha": 8}, "train": {"steps": 4, "lr": 0.01, "batch_size": 4, "max_length": 16, **train}}
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def load(models_dir: Path, arch: str = "llama"):
    model = AutoModelForCausalLM.from_pretrained(models_dir / arch).eval()
    tok = AutoTokenizer.from_pretrained(models_dir / arch)
    tok.pad_token = tok.pad_token or tok.eos_token  # as unpatch.model.load_model does
    return model, tok


# ------------------------------------------------------------------------------ task_vector


def plain_finetune_tau(models_dir: Path, recipe_path: Path) -> dict[str, torch.Tensor]:
    """tau = theta_ft - theta_base of a separate plain fine-tune (the shared loop, NLL descent)."""
    recipe = load_recipe(recipe_path)
    model, tok = load(models_dir)
    model.requires_grad_(False)
    live = target_weights(model, default_targets(model))
    base = {n: p.detach().clone() for n, p in live.items()}
    for p in live.values():
        p.requires_grad_(True)
    t = recipe.train
    train_loop(model, finetune_loss, Batches.from_texts(load_data(recipe).forget, tok, t.max_length, t.batch_size, t.seed), t)
    return {n: (live[n].detach() - base[n]) for n in live}


def test_task_vector_delta_is_the_negated_finetune(tmp_path, models_dir):
    lam, s = 0.7, 1.5
    path = write_recipe(tmp_path, models_dir, {"name": "task_vector", "lam": lam})
    patch = build(path, out=tmp_path / "p")
    assert patch.manifest.coefficient == -lam
    tau = plain_finetune_tau(models_dir, path)
    assert sorted(patch.tensors) == sorted(tau) and all(torch.equal(patch.tensors[n], tau[n]) for n in tau)
    model, _ = load(models_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    Applied(model).apply(patch, s)
    for n, p in model.named_parameters():
        want = base[n] - s * lam * tau[n] if n in tau else base[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)


def test_task_vector_lora_applies_minus_lambda_tau(tmp_path, models_dir):
    lam, s, alpha, rank = 2.0, 0.5, 8.0, 4
    patch = build(write_recipe(tmp_path, models_dir, {"name": "task_vector", "lam": lam}, kind="lora"), out=tmp_path / "p")
    assert patch.manifest.coefficient == -lam
    assert patch.lora_config["lora_alpha"] == -lam * alpha  # folded in, so peft loads the negation as built
    model, _ = load(models_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    Applied(model).apply(patch, s)
    params = dict(model.named_parameters())
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in patch.tensors}
    assert modules
    for m in modules:
        a = patch.tensors[f"base_model.model.{m}.lora_A.weight"]
        b = patch.tensors[f"base_model.model.{m}.lora_B.weight"]
        tau = (b @ a) * (alpha / rank)  # the fine-tune's own delta, at the recipe's (positive) alpha
        assert tau.abs().max() > 0
        torch.testing.assert_close(params[f"{m}.weight"].detach(), base[f"{m}.weight"] - s * lam * tau, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ pcgu: by hand


def test_row_cosines_and_selection_by_hand():
    # 3 output rows of a Linear ([out, in]): row 0 same direction, row 1 opposite, row 2 orthogonal
    gm = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    gl = torch.tensor([[3.0, 0.0], [-2.0, -2.0], [5.0, 0.0]])
    cos = row_cosines(gm, gl, axis=0)
    torch.testing.assert_close(cos, torch.tensor([1.0, -1.0, 0.0]))
    # the same weights stored as GPT-2 Conv1D ([in, out]) partition by columns: same cosines
    torch.testing.assert_close(row_cosines(gm.T, gl.T, axis=1), cos)
    # a row without gradient is never preferred
    assert row_cosines(torch.zeros(1, 2), torch.ones(1, 2), axis=0).item() == 2.0
    # ranked across matrices together: the 2 least similar of 5 rows (40 %) are b[0] and a[1]
    masks = select_rows({"a": cos, "b": torch.tensor([-3.0, 0.5])}, 40)
    assert masks["a"].tolist() == [False, True, False] and masks["b"].tolist() == [True, False]
    assert sum(int(m.sum()) for m in select_rows({"a": cos, "b": torch.zeros(2)}, 100).values()) == 5
    assert sum(int(m.sum()) for m in select_rows({"a": cos}, 1).values()) == 1  # at least one row


def test_row_partitions_know_conv1d(models_dir):
    model, _ = load(models_dir, "gpt2")
    model.requires_grad_(False)
    for p in target_weights(model, ["c_attn", "c_fc"]).values():
        p.requires_grad_(True)
    parts = row_partitions(model)
    assert parts and all(axis == 1 for _, axis in parts.values())  # Conv1D: output units are columns
    model.transformer.ln_f.weight.requires_grad_(True)  # a LayerNorm has no output rows
    with pytest.raises(UnpatchError, match="Linear/Conv1D weights only"):
        row_partitions(model)


# ------------------------------------------------------------------------------ pcgu: builds


def changed_rows(patch, axis: int = 0) -> dict[str, torch.Tensor]:
    """Per tensor, which output rows the delta changes (columns for Conv1D)."""
    out = {}
    for n, u in patch.updates().items():
        d = u.dense()
        out[n] = d.ne(0).any(dim=1 - axis)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pcgu_changes_exactly_the_k_percent_least_similar_rows(tmp_path, models_dir, arch):
    k = 25
    path = write_recipe(tmp_path, models_dir, {"name": "pcgu", "k_percent": k}, arch=arch)
    patch = build(path, out=tmp_path / "p")
    # the ranking, recomputed independently on the base
    recipe = load_recipe(path)
    model, tok = load(models_dir, arch)
    model.requires_grad_(False)
    for p in target_weights(model, default_targets(model)).values():
        p.requires_grad_(True)
    parts = row_partitions(model)
    t = recipe.train
    pairs = PairBatches(load_data(recipe).pairs, tok, t.max_length, t.batch_size, t.seed)
    masks = select_rows(rank_rows(model, pairs, parts, len(pairs), t.batch_size), k)
    axis = 1 if arch == "gpt2" else 0
    changed = changed_rows(patch, axis)
    total = sum(m.numel() for m in masks.values())
    assert sorted(changed) == sorted(masks)
    assert sum(int(c.sum()) for c in changed.values()) == math.ceil(total * k / 100)
    assert all(torch.equal(changed[n], masks[n]) for n in masks)  # exactly the least similar rows
    if arch == "llama":  # Linear rows are stored rows: few changed ones are stored sparse
        assert "rows" in patch.encodings.values()


def test_pcgu_narrows_the_gap(tmp_path, models_dir):
    path = write_recipe(tmp_path, models_dir, {"name": "pcgu", "k_percent": 20}, steps=6)
    patch = build(path, out=tmp_path / "p")
    recipe, model, tok = load_recipe(path), *load(models_dir)
    data = load_data(recipe)
    before = mean_gap(model, tok, data, recipe)
    Applied(model).apply(patch, 1.0)
    after = mean_gap(model, tok, data, recipe)
    assert after < before - 0.05, (before, after)
    assert any("least similar" in n for n in patch.manifest.notes)


def test_pcgu_weight_decay_keeps_other_rows(tmp_path, models_dir):
    path = write_recipe(tmp_path, models_dir, {"name": "pcgu", "k_percent": 10}, weight_decay=0.5)
    changed = changed_rows(build(path, out=tmp_path / "p"))
    total = sum(c.numel() for c in changed.values())
    assert sum(int(c.sum()) for c in changed.values()) == math.ceil(total * 0.1)


def test_pcgu_resume_equals_uninterrupted(tmp_path, models_dir):
    path = write_recipe(tmp_path, models_dir, {"name": "pcgu", "k_percent": 30}, steps=5, checkpoint_every=2)
    clean = build(path, out=tmp_path / "clean")
    with pytest.raises(Crash):
        build(path, out=tmp_path / "p", on_step=crash_at(3))
    seen = []
    resumed = build(path, out=tmp_path / "p", resume=True, on_step=lambda s, m: seen.append(s))
    assert seen == [3, 4, 5]
    assert resumed.manifest.files == clean.manifest.files


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(("method", "kind", "match"), [
    ({"name": "pcgu", "k_percent": 0}, "delta", r"method\.k_percent: must be > 0"),
    ({"name": "pcgu", "k_percent": 150}, "delta", r"method\.k_percent: must be <= 100"),
    ({"name": "pcgu", "rank_pairs": 0}, "delta", r"method\.rank_pairs: must be > 0"),
    ({"name": "pcgu", "k": 5}, "delta", r"method\.k: unknown key"),
    ({"name": "pcgu"}, "lora", r"patch\.kind: method 'pcgu' builds only delta patches"),
    ({"name": "task_vector", "lam": 0}, "delta", r"method\.lam: must be > 0"),
    ({"name": "task_vector", "lamda": 1}, "lora", r"method\.lamda: unknown key\. Did you mean: lam\?"),
])
def test_config_errors_name_the_key(tmp_path, models_dir, method, kind, match):
    with pytest.raises(UnpatchError, match=match):
        load_recipe(write_recipe(tmp_path, models_dir, method, kind=kind))
