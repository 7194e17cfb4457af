"""The model card: golden file (volatile fields normalised), model-index that huggingface_hub
parses back, extra files (sweep, audit) rendered, and `build` writing metrics into manifest and card.
Regenerate the golden file with UPDATE_GOLDEN=1 after an intended change."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FORGET, make_lora_patch, write_data
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from unpatch.builder import build
from unpatch.evals.runner import Variant, evaluate, parse_metric_options
from unpatch.evals.sweep import sweep, write_sweep
from unpatch.model import load_model
from unpatch.patch.card import render_card
from unpatch.patch.store import load_patch, regenerate_card, save_patch

GOLDEN = Path(__file__).parents[1] / "golden" / "card.md"
DECIMAL = r"-?\d+\.\d+(?:e[-+]?\d+)?"
RECIPE = "model: {id: example/tiny-gpt2}\ndata: {forget: forget.txt}\nmethod: {name: ga}\ntrain: {steps: 8}\n"
VERSIONS = {"unpatch": "0.0.0", "torch": "2.x", "transformers": "5.x", "peft": "0.x", "safetensors": "0.x"}
AUDIT = {"format": "unpatch-audit", "version": 1, "stages": {"patched": {"forget_nll": 5.5, "forgetting_kept": 1.0},
                                                             "int4": {"forget_nll": 5.25, "forgetting_kept": 0.75}},
         "settings": {"scale": 1.0, "bits": [8, 4]}, "data": {"forget": "forget.txt", "n_forget": 8}}


def normalise(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "<tmp>")
    text = re.sub(r"\| evaluation wall time \| [\d.]+ s \|", "| evaluation wall time | <s> s |", text)
    return re.sub(r"on (CPU|GPU) [^;]*;", "on <hardware>;", text)


@pytest.fixture(scope="module")
def card_patch(tmp_path_factory, models_dir):
    """A LoRA patch 'built' on the tiny GPT-2, measured for real, with a sweep and an audit.json."""
    tmp = tmp_path_factory.mktemp("card")
    crows, text = write_data(tmp)
    model, tok, _ = load_model(str(models_dir / "gpt2"), device="cpu")
    names = ["crows_pairs", "perplexity"]
    opts = parse_metric_options([f"crows_pairs.source={crows}", f"perplexity.source={text}"], names)
    patch = make_lora_patch(model, "gpt2", name="tiny-ga", model_id="example/tiny-gpt2")
    ev = evaluate(model, tok, [Variant("base"), Variant("tiny-ga", ((patch, 1.0),))], names, opts)
    build_info = {"seconds": 12.5, "hardware": "CPU test-cpu (2 threads)",
                  "data": {"forget": {"source": "forget.txt", "items": 8, "sha256": "ab" * 32}}}
    patch = patch.with_manifest(created="2026-01-01T00:00:00+00:00", method={"name": "ga", "params": {}}, versions=VERSIONS,
                                recipe_sha256="cd" * 32, metrics={"eval": ev, "build": build_info})
    patch.recipe_text = RECIPE
    saved = save_patch(patch, tmp / "p")
    sw = sweep(model, tok, saved, [0.0, 0.5, 1.0, 2.0], names, opts, max_ppl_increase=0.05)
    write_sweep(saved.path, sw)
    (saved.path / "audit.json").write_text(json.dumps(AUDIT))
    regenerate_card(saved.path)
    return tmp, load_patch(saved.path)


def test_card_matches_golden(card_patch):
    tmp, patch = card_patch
    got = normalise((patch.path / "README.md").read_text(), tmp)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(got)
    want = GOLDEN.read_text()
    # Decimals are compared to 1e-6 relative or one unit of their last printed digit, the rest
    # character for character: the last printed digit of a measured float moves with float
    # rounding (AVX2 vs AVX-512 BLAS kernels gave 131.588474 vs 131.588473 for the same perplexity;
    # a difference of two such numbers, 0.08011 - 0.08321, printed -0.0031 or -0.003101).
    assert re.sub(DECIMAL, "<x>", got) == re.sub(DECIMAL, "<x>", want)
    pairs = list(zip(re.findall(DECIMAL, got), re.findall(DECIMAL, want), strict=True))
    assert pairs and all(math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1.01 * last_digit(a, b)) for a, b in pairs)


def last_digit(*printed: str) -> float:
    """The value of one unit in the finest last digit among the printed decimals."""
    return min(10.0 ** (int(e or 0) - len(frac)) for frac, e in (re.match(r"-?\d+\.(\d+)(?:e([-+]?\d+))?", x).groups() for x in printed))


def test_model_index_parses_back(card_patch):
    _, patch = card_patch
    card = ModelCard.load(patch.path / "README.md")
    assert card.data.base_model == "example/tiny-gpt2" and card.data.library_name == "peft"
    name, results = model_index_to_eval_results(metadata_load(patch.path / "README.md")["model-index"])
    assert name == "tiny-ga" and len(results) == len(card.data.eval_results) == 5  # 3 crows_pairs floats + 2 perplexity
    patched = patch.manifest.metrics["eval"]["variants"][-1]["values"]
    for r in results:
        metric = r.metric_name.split()[0]
        assert r.metric_value == pytest.approx(patched[metric][r.metric_type], abs=1e-6)
        assert r.task_type == "text-generation"
    # dataset names say exactly what was scored; metric names do not repeat ("perplexity", not "perplexity perplexity")
    assert {r.dataset_name for r in results} == {f"crows.csv: {patched['crows_pairs']['pairs']} pairs scored",
                                                 f"text.txt: {patched['perplexity']['tokens']} tokens scored"}
    assert "perplexity" in {r.metric_name for r in results}
    assert card.data.pipeline_tag == "text-generation"


def test_card_sections(card_patch):
    _, patch = card_patch
    text = (patch.path / "README.md").read_text()
    for heading in ("## Evaluation", "## Scale sweep", "## Audit", "## Metric settings", "## Build", "## Recipe"):
        assert heading in text
    assert "| int4 | 5.25 | 0.75 |" in text and "![bias distance and perplexity against scale](sweep.png)" in text
    assert "`max_length=64`" in text  # perplexity's resolved window is recorded


def test_card_without_metrics_still_renders(models_dir, tmp_path):
    model, _, _ = load_model(str(models_dir / "gpt2"), device="cpu")
    patch = save_patch(make_lora_patch(model, "gpt2", model_id=str(models_dir / "gpt2")), tmp_path / "p")
    card = ModelCard.load(patch.path / "README.md")
    assert card.data.base_model is None and "model-index" not in card.content  # a local base is no Hub id
    assert render_card(patch).startswith("---\n")


def test_build_writes_metrics_card_and_keeps_hashes(tmp_path, models_dir):
    (tmp_path / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": "delta", "target_modules": ["v_proj"]}, "train": {"steps": 2, "lr": 0.05, "batch_size": 4, "max_length": 16},
           "eval": {"metrics": ["forget_nll", "perplexity"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    patch = build(tmp_path / "r.yaml", out=tmp_path / "p")
    ev, info = patch.manifest.metrics["eval"], patch.manifest.metrics["build"]
    assert [v["label"] for v in ev["variants"]] == ["base", "r"]
    assert ev["metrics"]["forget_nll"]["settings"]["source"] == str((tmp_path / "forget.txt").resolve())  # the recipe's own data
    assert ev["variants"][1]["values"]["forget_nll"]["nll"] > ev["variants"][0]["values"]["forget_nll"]["nll"]  # ga forgets
    assert info["data"]["forget"]["items"] == len(FORGET) and len(info["data"]["forget"]["sha256"]) == 64 and info["seconds"] > 0
    card = (tmp_path / "p" / "README.md").read_text()
    assert "forget_nll" in card and FORGET[0] not in card  # hashes, never the forget texts
    # the build's numbers are exactly what `unpatch eval` measures on a fresh load
    model, tok, _ = load_model(str(models_dir / "llama"), device="cpu")
    loaded = load_patch(tmp_path / "p")  # file hashes still valid after the metrics rewrite
    again = evaluate(model, tok, [Variant("base"), Variant("r", ((loaded, 1.0),))], ["forget_nll", "perplexity"],
                     {m: ev["metrics"][m]["options"] for m in ev["metrics"]})
    assert [v["values"] for v in again["variants"]] == [v["values"] for v in ev["variants"]]

    shutil.rmtree(tmp_path / "p")
    quick = build(tmp_path / "r.yaml", out=tmp_path / "p", run_eval=False)
    assert "eval" not in quick.manifest.metrics and "build" in quick.manifest.metrics


def test_overlap_of_learnt_and_measured_data_is_warned_on_the_card(tmp_path, models_dir):
    """A metric reading the very file the recipe learns from is flagged (build output and card);
    the forget_nll metric reads it on purpose and is not."""
    (tmp_path / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": "lora", "rank": 2}, "train": {"steps": 1, "batch_size": 4, "max_length": 16},
           "eval": {"metrics": ["forget_nll", "perplexity"], "options": {"perplexity": {"source": "forget.txt"}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    patch = build(tmp_path / "r.yaml", out=tmp_path / "p")
    warned = [n for n in patch.manifest.notes if "overlap" in n]
    assert len(warned) == 1 and "perplexity" in warned[0] and "data.forget" in warned[0]
    assert warned[0] in (tmp_path / "p" / "README.md").read_text()
    raw["eval"]["options"] = {}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    clean = build(tmp_path / "r.yaml", out=tmp_path / "q")
    assert not [n for n in clean.manifest.notes if "overlap" in n]
