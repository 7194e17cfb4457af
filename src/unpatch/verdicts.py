"""Reading results as words: a metric's headline, the verdict its paired test allows, intervals
and ideals as text, and the number format (`fmt`) that every table of cards, reports and the CLI uses.

Below the evaluation runner and the card: both render through here, neither imports the other."""

from __future__ import annotations

from typing import Any

from .stats import p_text


def fmt(v: Any, sign: bool = False) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return f"{v:+d}" if sign else str(v)
    return f"{v:+.4g}" if sign else f"{v:.4g}"


def headline(values: dict[str, Any]) -> tuple[str, Any]:
    """A metric's headline: the first key it returned."""
    key = next(iter(values))
    return key, values[key]


def verdict(info: dict[str, Any], base: float, value: float) -> str:
    """better / worse / same, by the metric's direction (`target`: closer to the ideal)."""
    d = info["direction"]
    if d == "target":
        a, b = abs(base - info["ideal"]), abs(value - info["ideal"])
        return "same" if a == b else ("better" if b < a else "worse")
    if value == base:
        return "same"
    return "better" if (value < base) == (d == "lower") else "worse"


ALPHA = 0.05  # "better" / "worse" only when the paired test says p < ALPHA


def judged(info: dict[str, Any], base: float, value: float, paired: dict[str, Any] | None) -> str:
    """The verdict a reader may rely on: "better (p = 0.003)", "worse (p < 0.001)", "no significant
    change (p = 0.42)"; without a paired test (too few items, or none recorded) "untested": the
    words better / worse appear only with p < ALPHA."""
    raw = verdict(info, base, value)
    if paired is None or paired.get("p") is None:
        return "same" if raw == "same" else "untested"
    p = paired["p"]
    if p >= ALPHA or raw == "same":
        return f"no significant change ({p_text(p)})"
    return f"{raw} ({p_text(p)})"


def interval_text(st: dict[str, Any] | None) -> str:
    """[low, high] of a headline's 95 % interval, or "" without one."""
    iv = (st or {}).get("interval") or {}
    if iv.get("low") is None:
        return ""
    return f"[{fmt(iv['low'])}, {fmt(iv['high'])}]"


def ideal_text(info: dict[str, Any]) -> str:
    return f"ideal {info['ideal']:g}" if info["direction"] == "target" else f"{info['direction']} is better"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (metric, variant): headline value, its interval, change vs base, the paired
    test's p and the verdict it allows (`judged`); base rows first."""
    base = results["variants"][0]["values"]
    out = []
    for m, info in results["metrics"].items():
        key, b = headline(base[m])
        for v in results["variants"]:
            val = v["values"][m][key]
            first = v is results["variants"][0]
            st = v.get("stats", {}).get(m)
            paired = (st or {}).get("paired")
            out.append({"metric": m, "key": key, "variant": v["label"], "value": val, "interval": interval_text(st),
                        "change": None if first else val - b, "p": None if first or not paired else paired["p"],
                        "verdict": None if first else judged(info, b, val, paired), "ideal": ideal_text(info)})
    return out
