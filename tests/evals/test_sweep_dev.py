"""Selection on dev only: the sweep's recommendation never reads a test item; sweep.json, the card
and `eval --json` carry dev and test numbers with 95 % intervals and paired p-values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FORGET, make_delta_patch

from unpatch.evals.runner import Variant, evaluate, parse_metric_options
from unpatch.evals.sweep import sweep, write_sweep
from unpatch.model import load_model
from unpatch.patch.card import render_card
from unpatch.patch.card_tables import eval_summary
from unpatch.patch.store import save_patch
from unpatch.splits import labels

WORDS = ["cat", "dog", "fox", "man", "woman", "child", "friend", "nurse", "doctor", "farmer", "king", "queen"]
PAIRS = [(f"the {w} is {a}", f"the {w} is {b}", t) for w in WORDS for a, b, t in (("bad", "good", "gender"), ("lazy", "quick", "race-color"))]


def write(path: Path, pairs) -> Path:
    path.write_text("sent_more,sent_less,bias_type\n" + "".join(f"{a},{b},{t}\n" for a, b, t in pairs))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("sweepdev")
    crows = write(root / "crows.csv", PAIRS)
    split = labels(PAIRS, lambda p: sorted(p[:2]), lambda p: p[2])
    # the same file with every TEST pair relabelled (sentences swapped): test outcomes flip, dev items untouched
    flipped = write(root / "flipped.csv", [(b, a, t) if s == "test" else (a, b, t) for (a, b, t), s in zip(PAIRS, split, strict=True)])
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(FORGET[i % 8:] + FORGET[:i % 8]) for i in range(32)) + "\n")
    model, tok, _ = load_model(str(models_dir / "gpt2"), device="cpu")
    patch = save_patch(make_delta_patch(model, "gpt2", name="swept", model_id=str((models_dir / "gpt2").resolve())), root / "p")
    return root, model, tok, patch, crows, flipped, text


def run(setup, crows):
    root, model, tok, patch, _, _, text = setup
    names = ["crows_pairs", "perplexity"]
    opts = parse_metric_options([f"crows_pairs.source={crows}", f"perplexity.source={text}"], names)
    return sweep(model, tok, patch, [0.0, 1.0, 4.0, 16.0], names, opts, max_ppl_increase=1.0)


def test_recommendation_reads_dev_only(setup):
    a, b = run(setup, setup[4]), run(setup, setup[5])
    assert a["selected_on"] == "dev" and a["splits"]["crows_pairs"] == "dev and test"
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["dev"] == rb["dev"] and ra["value"] == rb["value"]  # dev numbers: the same items, the same values
    assert any(ra["test"]["value"] != rb["test"]["value"] for ra, rb in zip(a["rows"], b["rows"], strict=True))  # test did change
    assert a["recommended_scale"] == b["recommended_scale"]
    row = a["rows"][1]
    for part in ("dev", "test"):
        lo, hi = row[part]["interval"]
        assert lo <= row[part]["value"] <= hi and 0 <= row[part]["p"] <= 1
        assert row[part]["split"] == part and row[part]["perplexity_interval"][0] <= row[part]["perplexity_value"]
    assert a["rows"][0]["test"]["p"] == 1.0  # scale 0 is the base: no change at all


def test_sweep_json_and_card_name_the_splits(setup):
    sw = run(setup, setup[4])
    saved = write_sweep(setup[3].path, sw)
    body = json.loads((saved.path / "sweep.json").read_text())
    assert body["selected_on"] == "dev" and all({"dev", "test"} <= set(r) for r in body["rows"])
    assert saved.manifest.metrics["sweep"]["selected_on"] == "dev"
    card = (saved.path / "README.md").read_text()
    assert "read on the **dev** split only" in card and "(test) [95 % interval]" in card and "perplexity (dev)" in card


def test_eval_results_carry_intervals_and_the_card_judges_by_them(setup):
    root, model, tok, patch, crows, _, text = setup
    names = ["crows_pairs", "perplexity"]
    opts = parse_metric_options([f"crows_pairs.source={crows}", f"perplexity.source={text}"], names)
    ev = evaluate(model, tok, [Variant("base"), Variant("swept", ((patch, 1.0),)), Variant("big", ((patch, 4.0),))], names, opts)
    base, small, large = ev["variants"]
    assert "paired" not in base["stats"]["crows_pairs"] and base["stats"]["crows_pairs"]["interval"]["method"] == "clopper-pearson"
    assert small["stats"]["crows_pairs"]["paired"]["test"] == "exact McNemar"
    pp = large["stats"]["perplexity"]
    assert pp["paired"]["test"].startswith("paired bootstrap") and 0 < pp["paired"]["p"] <= 1 and pp["interval"]["n"] >= 2
    assert ev["metrics"]["crows_pairs"]["settings"]["split"] == "test"
    json.dumps(ev)  # JSON-able as it is
    saved = patch.with_manifest(metrics={"eval": {**ev, "variants": [base, small]}})
    card = render_card(saved)
    p = small["stats"]["crows_pairs"]["paired"]["p"]
    assert "vs base (paired test)" in card and "split (n)" in card and "test (" in card
    row = next(line for line in card.splitlines() if line.startswith("| crows_pairs ("))
    assert ("better (p" in row or "worse (p" in row) == (p < 0.05) and "[" in row
    line = eval_summary(saved.manifest)[0]
    assert line.startswith("crows_pairs pct_stereotype: ") and line.count("[") == 2
