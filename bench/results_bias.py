"""The bias part of the study: every bias recipe built with several seeds, its scale chosen on dev, its
numbers reported on test with intervals and paired tests, and the transfer matrix with control rows.

For each bias recipe (data with a bias type): seed 0's patch is swept on the DEV split (target-type
CrowS-Pairs + WikiText-2 perplexity; results_measure.dev_sweep). At the dev-chosen scale every seed's
patch is measured on the TEST split: the target type (each seed: the change in pct and its paired
McNemar p), and for seed 0 every type, StereoSet and perplexity. A claim holds only if every seed's
change is significant (p < 0.05) and toward 50. Control rows: patches built the same way (method,
steps, lr, scale) from text that names no group (results_measure.neutral_sentences), so a shift they
cause too is a generic perturbation, not bias-specific transfer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import results_measure as rm

from unpatch.lexicon import lexicon_words
from unpatch.recipe import load_recipe
from unpatch.sources import load_texts

TO_CROWS = {"gender": "gender", "race": "race-color", "religion": "religion"}
NEUTRAL_SOURCE = "builtin:xsum"  # BBC news: read by no bias recipe and by no bias metric (WikiText is the ppl text)
NEUTRAL_N = 512  # control sentences: more than any bias recipe reads (steps x batch <= 400)
CONTROLS = {"masked_ga": "gender", "task_vector": "task-vector-bias"}  # method -> the recipe it copies


def focus_of(path: Path) -> str | None:
    r = load_recipe(path)
    src = r.data.pairs or r.data.forget
    bt = getattr(src, "bias_type", None)
    return TO_CROWS.get(bt) if isinstance(bt, str) else None


def build_seeds(recipes: list[Path], s, work: Path, failed: dict) -> dict:
    """{name: {"patches": [one per seed], "builds": [info per seed], "focus", "method"}} for the bias recipes."""
    out = {}
    for path in recipes:
        name, focus = path.stem, focus_of(path)
        patches, infos = [], []
        for seed in s.seeds:
            try:
                p, info = rm.build_recipe(path, work / "patches" / f"{name}-s{seed}", [f"train.seed={seed}"], s)
            except Exception as e:  # one broken recipe must not sink the run: reported in RESULTS.md
                failed[f"{name} seed {seed}"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                break
            patches.append(p)
            infos.append(info)
            print(f"[results] built {name} seed {seed} in {info['build_seconds']:.1f} s", flush=True)
        if len(patches) == len(s.seeds):
            out[name] = {"patches": patches, "builds": infos, "focus": focus, "method": infos[0]["method"]}
    return out


def neutral_files(work: Path) -> dict[str, str]:
    """The control data: news sentences that name no group, as texts and as one-word-swapped pairs."""
    sents = rm.neutral_sentences(load_texts({"source": NEUTRAL_SOURCE, "column": "document"}), lexicon_words(), NEUTRAL_N)
    texts, pairs = work / "neutral_texts.jsonl", work / "neutral_pairs.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in sents), encoding="utf-8")
    pairs.write_text("".join(json.dumps(p) + "\n" for p in rm.swapped_pairs(sents)), encoding="utf-8")
    return {"texts": str(texts), "pairs": str(pairs), "n_texts": len(sents)}


def build_controls(s, work: Path, failed: dict, present) -> dict:
    """One control patch per copied recipe (of those in this run): its method, steps, lr and patch settings, on neutral data."""
    todo = {m: n for m, n in CONTROLS.items() if n in present}
    files, out = (neutral_files(work) if todo else {}), {}
    for method, name in todo.items():
        path = rm.ROOT / "recipes" / f"{name}.yaml"
        r = load_recipe(path)
        if r.data.pairs is not None:
            data = [f"data.pairs={{source: {files['pairs']}}}"]
        else:
            data = [f"data.forget={{source: {files['texts']}, column: text}}"]
        try:
            p, info = rm.build_recipe(path, work / "patches" / f"control-{method}", data + ["train.seed=0"], s)
        except Exception as e:
            failed[f"control {method}"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        out[f"control ({method})"] = {"patch": p, "build": info, "copies": name, "method": method}
        print(f"[results] built control {method} in {info['build_seconds']:.1f} s", flush=True)
    return out


def measure_base(model, tok, s) -> dict:
    """The base on both splits (in memory: Outcomes kept for the paired tests)."""
    base = {"crows": {sp: rm.crows(model, tok, s, None, sp) for sp in ("dev", "test")},
            "ppl": {sp: rm.ppl(model, tok, s, sp) for sp in ("dev", "test")},
            "stereoset": {"test": rm.stereoset(model, tok, s, "test")}, "cache": {}}
    return base


def base_json(base: dict, types: list[str]) -> dict:
    c = {sp: base["crows"][sp]["items"]["pct_stereotype"] for sp in ("dev", "test")}
    return {"crows": {sp: {"all": rm.summary(o), **{t: rm.summary(o, group=t) for t in types}} for sp, o in c.items()},
            "ppl": {sp: rm.summary(base["ppl"][sp]["items"]["perplexity"]) for sp in ("dev", "test")},
            "stereoset": {"ss": rm.summary(base["stereoset"]["test"]["items"]["ss"]),
                          **{k: base["stereoset"]["test"]["values"][k] for k in ("lms", "icat", "items")}}}


def types_of(base: dict) -> list[str]:
    return sorted(set(base["crows"]["test"]["items"]["pct_stereotype"].group or []))


def full_test(model, tok, s, base: dict, types: list[str]) -> dict:
    """Every type, StereoSet and perplexity on test, paired against the base (call with the patch on)."""
    bc = base["crows"]["test"]["items"]["pct_stereotype"]
    c = rm.crows(model, tok, s, None, "test")["items"]["pct_stereotype"]
    st = rm.stereoset(model, tok, s, "test")
    return {"types": {"all": rm.summary(c, bc), **{t: rm.summary(c, bc, group=t) for t in types}},
            "shifts": {"all": rm.shift_toward(bc, c), **{t: rm.shift_toward(bc, c, group=t) for t in types}},
            "stereoset": {"ss": rm.summary(st["items"]["ss"], base["stereoset"]["test"]["items"]["ss"]),
                          **{k: st["values"][k] for k in ("lms", "icat")}},
            "ppl": rm.summary(rm.ppl(model, tok, s, "test")["items"]["perplexity"], base["ppl"]["test"]["items"]["perplexity"])}


def study_recipe(name: str, b: dict, model, tok, applied, base: dict, s, types: list[str]) -> dict:
    t, t0 = b["focus"], time.perf_counter()
    sweep = rm.dev_sweep(model, tok, applied, b["patches"][0], t, s, base)
    scale = sweep["recommended_scale"]
    at = scale if scale is not None else min(r["scale"] for r in sweep["rows"])  # none within budget: lightest, flagged
    bt = rm.base_crows(model, tok, s, base, t, "test")
    seeds = []
    for seed, patch in zip(s.seeds, b["patches"], strict=True):
        with rm.patched(applied, [(patch, at)]):
            c = rm.crows(model, tok, s, [t], "test")["items"]["pct_stereotype"]
            extra = full_test(model, tok, s, base, types) if seed == s.seeds[0] else {}
        pct = rm.summary(c, bt)
        seeds.append({"seed": seed, "pct": pct, "change": pct["value"] - pct["base"], "shift": rm.shift_toward(bt, c), **extra})
    holds = all(rm.significant(x["pct"]) and x["shift"]["shift"] > 0 for x in seeds)
    print(f"[results] {name}: dev scale {scale}; test {t} {bt.value():.2f} -> "
          + ", ".join(f"{x['pct']['value']:.2f} (p {x['pct']['p']:.3g})" for x in seeds)
          + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
    return {"focus": t, "method": b["method"], "sweep": sweep, "recommended_scale": scale, "scale": at,
            "within_budget": scale is not None, "seeds": seeds, "seed_change": rm.seed_stats([x["change"] for x in seeds]),
            "holds_across_seeds": holds, "builds": b["builds"]}


def study_control(name: str, c: dict, bias: dict, model, tok, applied, base: dict, s, types: list[str]) -> dict | None:
    copied = bias.get(c["copies"])
    if copied is None:
        return None
    with rm.patched(applied, [(c["patch"], copied["scale"])]):
        res = full_test(model, tok, s, base, types)
    return {"method": c["method"], "copies": c["copies"], "scale": copied["scale"], "build": c["build"], **res}


def bias_part(recipes: list[Path], s, work: Path, model_loader, failed: dict) -> tuple[dict, dict]:
    """Builds (seeds, controls), then measures on one loaded model. Returns (the JSON part, the in-memory
    context the later parts share: model, tok, applied, base, variants = our bias recipes' patches per seed)."""
    t0 = time.perf_counter()
    built = build_seeds([p for p in recipes if focus_of(p)], s, work, failed)
    controls = build_controls(s, work, failed, built)
    t_build = time.perf_counter() - t0
    model, tok, applied = model_loader()
    t1 = time.perf_counter()
    base = measure_base(model, tok, s)
    types = types_of(base)
    t_base = time.perf_counter() - t1
    bias = {n: study_recipe(n, b, model, tok, applied, base, s, types) for n, b in built.items()}
    ctrl = {n: r for n, c in controls.items() if (r := study_control(n, c, bias, model, tok, applied, base, s, types))}
    part = {"base": base_json(base, types), "types": types, "recipes": bias, "controls": ctrl,
            "sources": {"neutral": NEUTRAL_SOURCE, "crows": rm.SRC["crows"]},
            "seconds": {"builds": t_build, "base eval": t_base, "bias eval": time.perf_counter() - t1 - t_base}}
    variants = {n: {"patches": b["patches"], "seeds": list(s.seeds), "scale": bias[n]["scale"], "focus": b["focus"],
                    "test": {"seed_changes": [x["change"] for x in bias[n]["seeds"]], "seeds": bias[n]["seeds"]}}
                for n, b in built.items()}
    return part, {"model": model, "tok": tok, "applied": applied, "base": base, "variants": variants}
