"""Issue 14 item 3: the papers' presets (recipes/paper/) against our variants, measured like the rest of the study.

ablation_part(...) builds each bias preset with PRESET_SEEDS of the study's seeds, picks its scale on DEV (dev_sweep, seed 0),
measures every seed on the TEST split of the variant's target type (CrowS-Pairs) and test perplexity, and
compares with the lead's variants (gender / pcgu-bias / task-vector-bias) on the same pairs: per-seed paired p
vs base, and a paired McNemar between preset and variant decisions (seed 0) unless the seeds disagree on the
sign. Then (budget allowing) harmful-2405.15152 vs harmful.yaml on held-out forgetting texts. The result is
JSON-able; ablation_section(d) renders RESULTS.md's table from it alone (--report-only).
Optional settings on `s`: ablation_scales (default PRESET_SCALES), ablation_presets (default all three),
ablation_forget (default True; run only if the bias presets took < FORGET_AFTER). variants[v]["test"]
["seeds"] (results_bias.py: per seed {"pct": summary, seed 0 also "ppl": summary}) is used as measured there;
only the variant's seed-0 decisions are re-measured here (for the paired preset-vs-variant test)."""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

from unpatch.stats import Outcomes, p_text, paired_test

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "paper"
ALPHA = 0.05
KEY = "pct_stereotype"
PRESET_SCALES = [1.0]  # full mode: the paper's own strength (scale 1); a wider dev sweep did not fit the 90 min
PRESET_SEEDS: list[int] | None = [0]  # None: the study's seeds; [0] cut for time (9 preset builds did not fit), stated in the report
QUICK_PRESETS = ["masked-ga-2407.16951"]  # its variant (gender.yaml) is the one the quick study builds
FORGET_AFTER = 4 * 60  # seconds: start the forgetting comparison (a ~5 min build) only if the bias presets were this quick
# preset -> our variant, the paper, what differs (read from both recipes) and the paper's headline (seeds summaries)
BIAS = {
    "masked-ga-2407.16951": {
        "variant": "gender", "paper": "2407.16951",
        "differs": "targets: the lexicon's group words (gender, race, religion) in toxic comments vs the words that "
                   "differ in StereoSet gender pairs; descent term: none vs weight 1; full delta, 50 steps lr 1e-5 "
                   "batch 8 vs LoRA r8, 40 steps lr 1e-4",
        "claim": "MLM unlearning (50 steps, lr 1e-5) lowers gender, race and religion bias of GPT-2 with WikiText-2 "
                 "perplexity kept"},
    "pcgu-2406.13551": {
        "variant": "pcgu-bias", "paper": "2406.13551",
        "differs": "dynamic vs static PCGU: re-ranked every step on that step's pairs, gradient of the first differing "
                   "token, advantaged-only update, k 20 %, 200 pronoun pairs vs ranked once on 64 StereoSet pairs, "
                   "whole-sentence gap, k 5 %, StereoSet gender pairs; 25 steps lr 2e-5 vs 32 steps lr 2e-4",
        "claim": "PCGU cuts CrowS-Pairs bias by about as much as the task vector but degrades perplexity and task "
                 "accuracy (OPT, LLaMA-2-7B)"},
    "task-vector-2406.13551": {
        "variant": "task-vector-bias", "paper": "2406.13551",
        "differs": "targets: StereoSet stereotype sentences of every bias type vs gender only; lam 0.6 vs 0.2 "
                   "(same LoRA r8, 48 steps, lr 1e-3)",
        "claim": "negating the task vector: 11.8 % less CrowS-Pairs bias on LLaMA-2-7B with little perplexity change"},
}
FORGET = {
    "harmful-2405.15152": {
        "variant": "harmful", "paper": "2405.15152",
        "differs": "answer-only ascent (second half of each comment), 4 random TruthfulQA answers, eps3 1 vs ascent on "
                   "every token, 1 random answer, eps3 10, shipped coefficient 2",
        "claim": "gradient ascent on harmful answers cuts harmful outputs by 75 % on OPT-1.3B/2.7B, TruthfulQA kept"},
}


# ------------------------------------------------------------------------------ decisions (pure, tested)


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare(preset_pct: list[float], variant_pct: list[float], preset0: dict, variant0: dict, alpha: float = ALPHA) -> dict:
    """Preset vs variant on the same test pairs. `*_pct`: target-type pct per seed (seed i against seed i);
    `*0`: seed 0's per-pair decisions (Outcomes JSON). The exact McNemar of seed 0 decides only where every
    seed pair points the same way (preset pct above the variant's, or below); else "seeds disagree"."""
    t = paired_test(Outcomes.from_json(variant0), Outcomes.from_json(preset0))
    p = t["p"] if t else None
    diffs = [a - b for a, b in zip(preset_pct, variant_pct, strict=False)]
    signs = {(d > 0) - (d < 0) for d in diffs}
    out = {"p": p, "b": t and t.get("b"), "c": t and t.get("c"), "n": t and t.get("n"), "diffs": diffs}
    if t is None or p is None:
        return {**out, "verdict": "not comparable (different test pairs)"}
    if len(signs) > 1:
        return {**out, "verdict": "seeds disagree"}
    if p >= alpha:
        return {**out, "verdict": "no significant difference"}
    return {**out, "verdict": "preset more stereotyped" if diffs[0] > 0 else "preset less stereotyped"}


def _p(p: float | None) -> str:
    return p_text(p) if p is None or p < ALPHA else f"n.s. ({p_text(p)})"


def _ms(xs: list[float], nd: int = 2, signed: bool = True) -> str:
    m, sd = mean_sd(xs)
    if m is None:
        return "n/a"
    if len([x for x in xs if x is not None]) == 1:  # one seed: no spread to show
        return f"{m:+.{nd}f}" if signed else f"{m:.{nd}f}"
    return f"{m:+.{nd}f} ± {sd:.{nd}f}" if signed else f"{m:.{nd}f} ± {sd:.{nd}f}"


# ------------------------------------------------------------------------------ report


def ablation_section(d: dict) -> list[str]:
    """RESULTS.md: the ablation table (paper preset vs our variant), the paper's claim beside each."""
    md = ["## 5. Ablation: the papers' presets (recipes/paper/) vs our variants", ""]
    if not d or d.get("skipped"):
        return md + [f"Not run: {d.get('skipped') if d else 'no data'}.", ""]
    focus = sorted({r["focus"] for r in d.get("bias", {}).values() if "focus" in r})
    md += [f"Same protocol as the bias tables: each preset built with seeds {d['seeds']}; its scale chosen on the DEV "
           f"split (seed 0, scales {d['scales']}, WikiText-2 perplexity rise <= {100 * d['max_ppl_rise']:g} %, smallest "
           "|pct - 50|); every seed then measured at that scale on the TEST split of the target type "
           f"({', '.join(focus) or '-'}) and on test WikiText-2 perplexity (ppl rise: seed 0, as the study's own bias rows). Change = pct(patched) - pct(base) in points on the test "
           "pairs, mean ± sd over seeds; p = exact McNemar vs the base, per seed. \"vs variant\": exact McNemar between "
           "the preset's and the variant's decisions on the same test pairs (seed 0), reported only where every seed "
           "pair differs in the same direction, else \"seeds disagree\".", ""]
    rows = []
    for name, r in d.get("bias", {}).items():
        if r.get("failed"):
            rows.append([f"`{name}`", BIAS.get(name, {}).get("differs", ""), f"FAILED: {r['failed']}", "", "", "", "", r.get("claim", "")])
            continue
        v, pr, vr = r["vs"], r["preset"], r["variant"]
        sc = f"{pr['scale']:g}" + ("" if pr["within_budget"] else " (over budget)")
        rows.append([f"`{name}` vs `{r['variant_name']}`", r["differs"],
                     f"{sc} / {vr['scale']:g}",
                     f"{_ms(pr['changes'])} / {_ms(vr['changes'])}",
                     "; ".join(_p(p) for p in pr["p"]) + " / " + "; ".join(_p(p) for p in vr["p"]),
                     f"{_ms(pr['ppl_rise_pct'])} / {_ms(vr['ppl_rise_pct'])}",
                     f"{v['verdict']}" + ("" if v["p"] is None else f" ({p_text(v['p'])}, b {v['b']} c {v['c']} of {v['n']})"),
                     f"{r['claim']} ({r['paper']})"])
    md += _table(["preset vs variant", "what differs", "scale (preset / variant)", "target pct change, points",
                  "p vs base per seed", "ppl rise %", "preset vs variant (seed 0)", "paper's claim"], rows)
    for name, r in d.get("bias", {}).items():
        if not r.get("failed"):
            pr = r["preset"]
            md.append(f"- `{name}`: base {r['focus']} test pct {r['base_pct']:.2f} ({r['n_pairs']} pairs); preset per seed "
                      + ", ".join(f"{x:.2f}" for x in pr["pct"]) + f"; dev sweep {_rows(pr['dev_rows'])}; build "
                      + ", ".join(f"{x:.0f}" for x in pr["build_seconds"]) + " s per seed.")
    md += [""] + forget_section(d.get("forgetting") or {})
    if d.get("cuts"):
        md += ["Cuts made to fit the budget: " + "; ".join(d["cuts"]) + ".", ""]
    md += [f"This part took {d.get('seconds', 0) / 60:.1f} min ({d.get('mode', '?')} mode).", ""]
    return md


def _rows(rows: list[dict]) -> str:
    return ", ".join(f"{r['scale']:g}: {r['pct']:.2f} (ppl {r['ppl_rise_pct']:+.2f} %)" for r in rows) or "-"


def forget_section(f: dict) -> list[str]:
    md = ["### Forgetting preset: harmful-2405.15152 vs harmful.yaml", ""]
    if not f or f.get("skipped"):
        return md + [f"Not run: {f.get('skipped', 'not measured')}.", ""]
    md += [f"1 seed, scale 1 of each patch; held-out texts (toxic comments from #{f['heldout']['toxicity_from']}, "
           f"TruthfulQA from #{f['heldout']['truthfulqa_from']}). Value [95 % interval], paired p vs base. "
           f"Paper: {f['claim']} ({f['paper']}). What differs: {f['differs']}.", ""]
    rows = []
    for label, m in f["rows"].items():
        rows.append([label] + [(f"{m[k]['value']:.3f} [{_f(m[k]['low'])}, {_f(m[k]['high'])}]"
                                + ("" if label == "base" else f", {_p(m[k].get('p'))}")) if k in m else "n/a"
                               for k in f["metrics"]])
    return md + _table(["model"] + f["metrics"], rows)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


# ------------------------------------------------------------------------------ measuring


def ablation_part(s, work, model, tok, applied, base, variants) -> dict:
    from results_measure import base_crows, build_recipe, dev_sweep

    t_start, work = time.perf_counter(), Path(work) / "ablation"
    # presets: PRESET_SEEDS builds at PRESET_SCALES, both cut for time (s.ablation_scales = s.scales and
    # PRESET_SEEDS = None restore the study's); quick mode: 1 preset at 1 scale, no forgetting
    scales = [1.0] if s.quick else list(getattr(s, "ablation_scales", None) or PRESET_SCALES)
    ss = copy.copy(s)
    ss.scales = list(scales)
    presets = QUICK_PRESETS if s.quick else list(getattr(s, "ablation_presets", None) or BIAS)
    seeds = list(s.seeds) if s.quick or not PRESET_SEEDS else [x for x in s.seeds if x in PRESET_SEEDS]
    out = {"mode": "quick" if s.quick else "full", "seeds": seeds, "scales": list(scales),
           "max_ppl_rise": s.max_ppl_rise, "cuts": [] if list(scales) == list(s.scales) else
           [f"presets swept at {list(scales)} instead of {list(s.scales)}"], "bias": {}}
    if seeds != list(s.seeds):
        out["cuts"].append(f"presets built with seeds {seeds} instead of {list(s.seeds)}")
    if s.quick or len(presets) < len(BIAS):
        out["cuts"].append(f"{'quick mode: ' if s.quick else ''}only {', '.join(presets)}"
                           + (", no forgetting comparison" if s.quick else ""))
    for name in presets:
        spec = BIAS[name]
        vname = spec["variant"]
        if vname not in variants:
            out["bias"][name] = {"failed": f"variant {vname} not in the study", "claim": spec["claim"]}
            continue
        var, t0 = variants[vname], time.perf_counter()
        focus = var["focus"]
        try:
            built = [build_recipe(PAPER / f"{name}.yaml", work / f"{name}-seed{seed}", [f"train.seed={seed}"], s)
                     for seed in seeds]
        except Exception as e:  # one broken preset must not sink the study: shown in the table
            out["bias"][name] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "claim": spec["claim"]}
            continue
        t_built = time.perf_counter()
        sweep = dev_sweep(model, tok, applied, built[0][0], focus, ss, base)
        scale, within = sweep["recommended_scale"], sweep["recommended_scale"] is not None
        if scale is None:  # none within the budget: the lightest scale, flagged
            scale = min(scales)
        t_swept = time.perf_counter()
        b_items = base_crows(model, tok, s, base, focus, "test")
        b_ppl = base["ppl"]["test"]["items"]["perplexity"]
        b0 = b_items.in_group(focus).value()
        pre = measure(model, tok, s, applied, [(p, scale) for p, _ in built], focus, b_items, b_ppl)
        vt = var.get("test") or {}
        vscale = var["scale"] if var.get("scale") is not None else min(s.scales)  # over budget: its lightest, as the study
        lead = [x for x in vt.get("seeds") or [] if isinstance(x.get("pct"), dict)]
        if len(lead) == len(var["patches"]):  # the lead's per-seed test numbers: only seed 0's decisions measured here
            lppl = lead[0].get("ppl") or {}
            v0 = measure(model, tok, s, applied, [(var["patches"][0], vscale)], focus, b_items,
                         None if lppl.get("value") and lppl.get("base") else b_ppl)
            vres = {"pct": [x["pct"]["value"] for x in lead], "low": [x["pct"]["low"] for x in lead],
                    "high": [x["pct"]["high"] for x in lead], "changes": [x["pct"]["value"] - b0 for x in lead],
                    "p": [x["pct"].get("p") for x in lead], "seed0_items": v0["seed0_items"],
                    "ppl_rise_pct": ([100 * (lppl["value"] / lppl["base"] - 1)] if lppl.get("value") and lppl.get("base")
                                     else v0["ppl_rise_pct"])}
        else:
            vres = measure(model, tok, s, applied, [(p, vscale) for p in var["patches"]], focus, b_items, b_ppl)
        vres["scale"] = vscale
        vs = compare(pre["pct"], vres["pct"], pre.pop("seed0_items"), vres.pop("seed0_items"))
        out["bias"][name] = {"variant_name": vname, "paper": spec["paper"], "claim": spec["claim"], "differs": spec["differs"],
                             "focus": focus, "base_pct": b_items.in_group(focus).value(), "n_pairs": len(b_items.in_group(focus)),
                             "preset": {**pre, "scale": scale, "within_budget": within, "dev_rows": _json_rows(sweep["rows"]),
                                        "build_seconds": [i["build_seconds"] for _, i in built], "steps": built[0][1]["steps"]},
                             "variant": vres, "vs": vs,
                             "seconds": {"builds": t_built - t0, "dev sweep": t_swept - t_built,
                                         "test": time.perf_counter() - t_swept}}
    spent = time.perf_counter() - t_start
    if s.quick:
        out["forgetting"] = {"skipped": "quick mode"}
    elif getattr(s, "ablation_forget", True) and spent < FORGET_AFTER:
        out["forgetting"] = forgetting(s, work, model, tok, applied, variants)
    else:
        out["forgetting"] = {"skipped": f"not run for time: the bias presets took {spent / 60:.1f} min, and the comparison "
                                        f"starts only if they take under {FORGET_AFTER / 60:.0f} min"}
    out["seconds"] = time.perf_counter() - t_start
    return out


def _json_rows(rows: list[dict]) -> list[dict]:
    return [{"scale": r["scale"], "pct": r["pct"]["value"], "p": r["pct"].get("p"), "ppl_rise_pct": r["ppl_rise_pct"],
             "seconds": r.get("seconds")} for r in rows]


def measure(model, tok, s, applied, pairs, focus, b_items, b_ppl) -> dict:
    """Every seed's patch at its scale: target-type test pct [interval], paired p vs base, change in points, and
    (b_ppl given) the test perplexity rise; seed 0's decisions kept for the preset-vs-variant test."""
    from results_measure import crows, patched, ppl, summary

    ppl_seeds = getattr(s, "ablation_ppl_seeds", 1)
    res = {"pct": [], "low": [], "high": [], "changes": [], "p": [], "ppl_rise_pct": []}
    b0 = b_items.in_group(focus).value()
    for i, pair in enumerate(pairs):
        with patched(applied, [pair]):
            c = crows(model, tok, s, [focus], "test")["items"][KEY]
            # test perplexity at seed 0 only, as the study's own bias rows (ablation_ppl_seeds raises it)
            pp = ppl(model, tok, s, "test")["items"]["perplexity"] if b_ppl is not None and i < ppl_seeds else None
        sm = summary(c, b_items, group=focus)
        res["pct"].append(sm["value"])
        res["low"].append(sm["low"])
        res["high"].append(sm["high"])
        res["changes"].append(sm["value"] - b0)
        res["p"].append(sm["p"])
        if pp is not None:
            res["ppl_rise_pct"].append(100 * (pp.value() / b_ppl.value() - 1))
        if i == 0:
            res["seed0_items"] = c.in_group(focus).to_json()
    return res


def forgetting(s, work: Path, model, tok, applied, variants) -> dict:
    """harmful-2405.15152 vs harmful.yaml, seed 0, scale 1: forget / retain NLL on the held-out texts (those after
    the recipes' `limit`s, as the study's forgetting section), paired bootstrap p vs base."""
    from results_measure import build_recipe, patched, summary

    from unpatch.recipe import load_recipe
    from unpatch.sources import load_texts

    name, spec = next(iter(FORGET.items()))
    rec = load_recipe(PAPER / f"{name}.yaml")
    n_tox, n_tqa = rec.data.forget.limit or 0, rec.data.retain.limit or 0
    n = 12 if s.quick else 200
    files = {}
    for key, src, start in (("forget_nll", "builtin:toxicity", n_tox), ("retain_nll", "builtin:truthfulqa", n_tqa)):
        files[key] = work / f"heldout_{key}.jsonl"
        files[key].parent.mkdir(parents=True, exist_ok=True)
        files[key].write_text("".join(json.dumps({"text": x}) + "\n" for x in load_texts(src)[start:][:n]), encoding="utf-8")
    try:
        pre, info = build_recipe(PAPER / f"{name}.yaml", work / f"{name}-seed0", ["train.seed=0"], s)
        ours = (variants.get(spec["variant"]) or {}).get("patches")
        ours = ours[0] if ours else build_recipe(ROOT / "recipes" / f"{spec['variant']}.yaml", work / spec["variant"], [], s)[0]
    except Exception as e:
        return {"skipped": f"build failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    metrics, runs = list(files), {}
    for label, pl in (("base", []), (f"{name}@1", [(pre, 1.0)]), (f"{spec['variant']}@1", [(ours, 1.0)])):
        with patched(applied, pl):
            runs[label] = {m: _nll(model, tok, m, str(files[m])) for m in metrics}
    rows = {label: {m: summary(r[m], None if label == "base" else runs["base"][m]) for m in metrics} for label, r in runs.items()}
    return {"paper": spec["paper"], "claim": spec["claim"], "differs": spec["differs"], "metrics": metrics, "rows": rows,
            "heldout": {"toxicity_from": n_tox, "truthfulqa_from": n_tqa, "texts": n}, "build_seconds": info["build_seconds"]}


def _nll(model, tok, metric: str, source: str) -> Outcomes:
    """forget_nll / retain_nll's per-text outcomes (they take no `progress` option, so not run_metric)."""
    from unpatch.evals import get_metric
    from unpatch.stats import collect

    with collect() as got:
        get_metric(metric)(model, tok, source=source)
    return next(o for o in got if o.key == "nll")
