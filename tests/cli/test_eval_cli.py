"""`unpatch eval` / `sweep` on a tiny GPT-2 folder with tiny local data: many variants on one load
equal separate runs exactly, the table and JSON hold base and variants, the sweep's recommended
scale meets its constraint, and bad inputs fail as one line naming the culprit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_delta_patch, make_lora_patch, write_data

from unpatch.errors import UnpatchError
from unpatch.evals.runner import Variant, evaluate, parse_metric_options, parse_metrics, variants_for
from unpatch.evals.sweep import parse_fraction, parse_scales, sweep, write_sweep
from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch, save_patch
from unpatch.verdicts import table_rows

UNPATCH = Path(sys.executable).parent / "unpatch"
class Env:
    """A tiny GPT-2 folder, two saved patches, the data files, and the CLI runs (two at a time)."""

    def __init__(self, root: Path, models_dir: Path):
        self.root, self.folder = root, models_dir / "gpt2"
        self.crows, self.text = write_data(root)
        model, _, _ = load_model(str(self.folder), device="cpu")
        mid = str(self.folder.resolve())
        self.lora = save_patch(make_lora_patch(model, "gpt2", name="lora", model_id=mid), root / "lora")
        self.delta = save_patch(make_delta_patch(model, "gpt2", name="delta", model_id=mid), root / "delta")
        self.swept = save_patch(make_delta_patch(model, "gpt2", name="swept", model_id=mid), root / "swept")
        self.carded = save_patch(make_delta_patch(model, "gpt2", name="carded", model_id=mid), root / "carded")
        (self.carded.path / "audit.json").write_text(json.dumps({"int8": {"forget_nll": 2.5}}))
        self.opts = ["-O", f"crows_pairs.source={self.crows}", "-O", f"perplexity.source={self.text}"]
        r = root
        jobs = {
            "eval": ("eval", "--model", self.folder, "--patch", self.lora.path, "--patch", self.delta.path, "--scale", "0.5",
                     "--scale", "1", "--metrics", "crows_pairs,perplexity", *self.opts, "--json", r / "out.json"),
            "sweep": ("sweep", self.swept.path, "--model", self.folder, "--scales", "0:1:0.5", *self.opts, "--max-ppl-increase", "50%"),
            "card": ("card", self.carded.path),
            "bad-metric": ("eval", "--model", self.folder, "--metrics", "crows_pair"),
            "bad-opt": ("eval", "--model", self.folder, "--metrics", "perplexity", "-O", "perplexity.windw=3"),
        }
        with ThreadPoolExecutor(max_workers=2) as pool:
            self.results = dict(zip(jobs, pool.map(lambda a: run(*a), jobs.values()), strict=True))


def run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="1000")
    return subprocess.run([str(UNPATCH), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def env(tmp_path_factory, models_dir) -> Env:
    return Env(tmp_path_factory.mktemp("eval"), models_dir)


def options(env: Env) -> dict:
    return parse_metric_options([f"crows_pairs.source={env.crows}", f"perplexity.source={env.text}"], ["crows_pairs", "perplexity"])


def test_many_variants_on_one_load_equal_separate_runs(env):
    names, opts = ["crows_pairs", "perplexity"], options(env)
    variants = variants_for([env.lora, env.delta], [0.5, 1.0, 0.0])
    assert [v.label for v in variants] == ["base", "lora@0.5", "lora@1", "lora@0", "delta@0.5", "delta@1", "delta@0"]
    model, tok, _ = load_model(str(env.folder), device="cpu")
    together = evaluate(model, tok, variants, names, opts)
    for v, row in zip(variants, together["variants"], strict=True):
        fresh, tok2, _ = load_model(str(env.folder), device="cpu")  # a separate run: its own load, patched for good
        applied = Applied(fresh, keep_originals=False)
        for p, s in v.patches:
            applied.apply(p, s)
        alone = evaluate(fresh, tok2, [Variant("base")], names, opts)["variants"][0]["values"]
        assert row["values"] == alone, v.label  # exact, not approximate
    base = together["variants"][0]["values"]
    assert together["variants"][3]["values"] == base  # scale 0 is the base
    assert together["variants"][2]["values"] != base  # ... and the patch does change something
    assert together["metrics"]["perplexity"]["settings"]["source"] == str(env.text)
    assert together["metrics"]["crows_pairs"]["direction"] == "target"
    rows = table_rows(together)
    assert rows[0]["variant"] == "base" and rows[0]["change"] is None
    assert rows[1]["verdict"].startswith(("better (p", "worse (p", "no significant change (p", "same"))  # judged by the paired test
    assert together["variants"][2]["stats"]["crows_pairs"]["paired"]["test"] == "exact McNemar"


def test_cli_eval_table_and_json(env):
    r = env.results["eval"]
    assert r.returncode == 0, r.stderr
    # piped (not a terminal): timestamped progress lines on stderr (unpatch.progress), no tqdm noise
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d eval: started \(10 metric runs\)$", r.stderr, re.M), r.stderr
    assert re.search(r" eval: done in ", r.stderr) and "Loading weights" not in r.stderr
    for label in ("base", "lora@0.5", "lora@1", "delta@0.5", "delta@1"):
        assert label in r.stdout
    assert "ideal 50" in r.stdout and "lower is better" in r.stdout
    out = json.loads((env.root / "out.json").read_text())
    assert [v["label"] for v in out["variants"]] == ["base", "lora@0.5", "lora@1", "delta@0.5", "delta@1"]
    assert out["model"] == str(env.folder.resolve())
    # every headline carries its 95 % interval, and every patched variant its paired test vs the base
    for v in out["variants"]:
        st = v["stats"]["crows_pairs"]
        assert st["interval"]["method"] == "clopper-pearson" and st["interval"]["low"] <= st["value"] <= st["interval"]["high"]
        assert ("paired" in st) == (v["label"] != "base") and (v["label"] == "base" or 0 <= st["paired"]["p"] <= 1)
    assert "interval" in r.stdout and "paired" in r.stdout  # the table's columns (rich may wrap the headers)
    model, tok, _ = load_model(str(env.folder), device="cpu")
    ref = evaluate(model, tok, variants_for([env.lora], [1.0]), ["crows_pairs", "perplexity"], options(env))
    assert out["variants"][2]["values"]["crows_pairs"] == ref["variants"][1]["values"]["crows_pairs"]
    assert out["variants"][2]["values"]["perplexity"]["perplexity"] == pytest.approx(ref["variants"][1]["values"]["perplexity"]["perplexity"], rel=1e-9)


def test_cli_bad_inputs_are_one_line(env):
    for job, needle in (("bad-metric", "'crows_pair'"), ("bad-opt", "'windw'")):
        r = env.results[job]
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Did you mean: crows_pairs?" in env.results["bad-metric"].stderr


def test_bad_inputs_library():
    with pytest.raises(UnpatchError, match="not selected"):
        parse_metric_options(["stereoset.limit=3"], ["perplexity"])
    with pytest.raises(UnpatchError, match="metric.option=value"):
        parse_metric_options(["perplexity=3"], ["perplexity"])
    with pytest.raises(UnpatchError, match="--metrics: empty"):
        parse_metrics(" , ")
    with pytest.raises(UnpatchError, match="'0:1'"):
        parse_scales("0:1")
    with pytest.raises(UnpatchError, match="positive step"):
        parse_scales("1:0:0.5")
    with pytest.raises(UnpatchError, match="'two'"):
        parse_fraction("two")
    assert parse_scales("0:1.5:0.25") == [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert parse_scales("1,0.5") == [1.0, 0.5] and parse_fraction("2%") == 0.02 and parse_fraction("0.1") == 0.1
    assert parse_metric_options(["perplexity.max_tokens=null"], ["perplexity"], limit=3) == {"perplexity": {"source": "builtin:wikitext-tiny", "max_tokens": None, "split": "test"}}
    assert parse_metric_options([], ["crows_pairs"], limit=3)["crows_pairs"]["limit"] == 3


def test_sweep_recommends_a_scale_within_the_limit(env, tmp_path):
    import shutil

    shutil.copytree(env.delta.path, tmp_path / "p")
    patch = load_patch(tmp_path / "p")
    model, tok, _ = load_model(str(env.folder), device="cpu")
    limit = 0.5
    sw = sweep(model, tok, patch, [0.0, 0.5, 1.0, 2.0, 4.0], ["crows_pairs", "perplexity"], options(env), max_ppl_increase=limit)
    base_ppl = sw["base"]["perplexity"]["perplexity"]
    ok = [r for r in sw["rows"] if r["perplexity"] <= base_ppl * (1 + limit)]
    assert [r["ok"] for r in sw["rows"]] == [r in ok for r in sw["rows"]] and sw["rows"][0]["ok"]
    best = min(r["distance"] for r in ok)
    rec = next(r for r in sw["rows"] if r["scale"] == sw["recommended_scale"])
    assert rec["ok"] and rec["distance"] == best
    saved = write_sweep(tmp_path / "p", sw)
    assert saved.patch_id == patch.patch_id and load_patch(tmp_path / "p").manifest.files == patch.manifest.files
    assert (tmp_path / "p" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "p" / "sweep.json").read_text())["recommended_scale"] == sw["recommended_scale"]
    assert saved.manifest.metrics["sweep"]["recommended_scale"] == sw["recommended_scale"]
    card = (tmp_path / "p" / "README.md").read_text()
    assert f"Recommended scale: {sw['recommended_scale']:g}" in card and "](sweep.png)" in card
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary folder left behind


def test_sweep_without_perplexity_cannot_have_a_limit(env):
    model, tok, _ = load_model(str(env.folder), device="cpu")
    with pytest.raises(UnpatchError, match="needs perplexity"):
        sweep(model, tok, env.delta, [1.0], ["crows_pairs"], options(env), max_ppl_increase=0.02)


def test_cli_sweep_writes_into_the_patch(env):
    r = env.results["sweep"]
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d sweep swept.*: started", r.stderr, re.M), r.stderr
    assert "recommended scale" in r.stdout
    assert (env.swept.path / "sweep.png").exists() and (env.swept.path / "sweep.json").exists()
    p = load_patch(env.swept.path)  # hashes still valid
    assert p.manifest.metrics["sweep"]["scales"] == [0.0, 0.5, 1.0]


def test_cli_card_regenerates_the_readme(env):
    r = env.results["card"]
    assert r.returncode == 0, r.stderr
    assert "| int8 | 2.5 |" in (env.carded.path / "README.md").read_text()
    assert load_patch(env.carded.path).patch_id == env.carded.patch_id


def test_a_refused_patch_leaves_the_base_untouched(env):
    import copy

    from conftest import state_equal, tiny_model

    model, tok, _ = load_model(str(env.folder), device="cpu")
    before = copy.deepcopy(model)
    foreign = make_delta_patch(tiny_model("gpt2", seed=1), "gpt2", name="foreign")  # same shapes, another base
    mix = Variant("mix", ((env.lora, 1.0), (foreign, 1.0)))
    with pytest.raises(UnpatchError, match="fingerprint"):
        evaluate(model, tok, [Variant("base"), mix], ["perplexity"], {"perplexity": {"source": str(env.text)}})
    assert state_equal(model, before)
