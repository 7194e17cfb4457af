"""Registry-driven: every registered method is tested the moment it is registered.

Each method builds a patch on a tiny model from the same small data (forget texts, retain texts,
contrastive pairs) and must move its own objective (declared at registration) the right way,
for every patch kind it supports; builds are deterministic."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import method_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from unpatch.builder import build
from unpatch.methods import list_methods
from unpatch.patch.apply import Applied
from unpatch.recipe import load_recipe
from unpatch.sources import load_data

CASES = [(m.name, kind) for m in list_methods() for kind in m.kinds]


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_method_moves_its_objective(tmp_path, models_dir, name, kind):
    spec = {m.name: m for m in list_methods()}[name]
    assert spec.objective is not None, f"method {name} registers no objective to test"
    assert spec.paper and spec.paper.startswith("https://"), f"method {name} registers no paper link"
    path = method_recipe(tmp_path, models_dir, name, kind)
    patch = build(path, out=tmp_path / "patch")
    recipe = load_recipe(path)
    data = load_data(recipe)
    model = AutoModelForCausalLM.from_pretrained(models_dir / "llama").eval()
    tok = AutoTokenizer.from_pretrained(models_dir / "llama")
    tok.pad_token = tok.pad_token or tok.eos_token
    before = spec.objective(model, tok, data, recipe)
    Applied(model).apply(patch, 1.0)
    after = spec.objective(model, tok, data, recipe)
    assert (after > before) if spec.direction == "up" else (after < before), f"{name}/{kind}: {before} -> {after}"


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_method_builds_are_deterministic(tmp_path, models_dir, name):
    kind = {m.name: m for m in list_methods()}[name].kinds[0]
    path = method_recipe(tmp_path, models_dir, name, kind, steps=2)
    a = build(path, out=tmp_path / "a")
    b = build(path, out=tmp_path / "b")
    assert a.manifest.files == b.manifest.files


def test_objectives_see_the_model_they_are_given(models_dir, tmp_path):
    """Guard for the test above: an objective must depend on the weights it is handed."""
    for spec in list_methods():
        path = method_recipe(tmp_path, models_dir, spec.name, spec.kinds[0])
        recipe, data = load_recipe(path), load_data(load_recipe(path))
        model = AutoModelForCausalLM.from_pretrained(models_dir / "llama").eval()
        tok = AutoTokenizer.from_pretrained(models_dir / "llama")
        tok.pad_token = tok.pad_token or tok.eos_token
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        assert spec.objective(model, tok, data, recipe) != spec.objective(other, tok, data, recipe), spec.name
