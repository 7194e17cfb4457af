"""Dose-response of one patch: every metric at every scale on one base load, a plot, and the
recommended scale: the best objective (a bias metric's distance from its ideal) among the scales
whose perplexity rises by at most a limit over the base, both read on the dev split only; the
test split's numbers (with 95 % intervals and paired p-values) are reported beside them.

The objective is the first selected metric whose direction is `target` (CrowS-Pairs, StereoSet:
distance from 50), else the first selected metric by its own direction. Ties go to the smaller
|scale| (the lighter intervention). Scale 0 is the base bit for bit, so it costs nothing.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from .. import checks
from ..errors import UnpatchError
from ..patch.format import Patch
from ..verdicts import headline
from .runner import Variant, evaluate

PPL = "perplexity"


def parse_scales(spec: str) -> list[float]:
    """`start:stop:step` (stop included), `a,b,c`, or one number."""
    try:
        if ":" in spec:
            parts = [float(x) for x in spec.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = (checks.scale(v, f"--scales {spec!r}: {what}") for v, what in zip(parts, ("start", "stop", "step"), strict=True))
            if step <= 0 or stop < start:
                raise UnpatchError(f"--scales {spec!r}: need start <= stop and a positive step, e.g. 0:1.5:0.25")
            n = math.floor((stop - start) / step + 1e-9) + 1
            if n > 200:
                raise UnpatchError(f"--scales {spec!r}: {n} scales is too many; use a larger step")
            return [round(start + i * step, 10) for i in range(n)]
        scales = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UnpatchError(f"--scales {spec!r}: expected start:stop:step (0:1.5:0.25) or a list (0,0.5,1)") from None
    if not scales:
        raise UnpatchError(f"--scales {spec!r}: no scales given")
    for v in scales:
        checks.scale(v, f"--scales {spec!r}: scale")
    return list(dict.fromkeys(scales))


def parse_fraction(text: str, flag: str = "--max-ppl-increase") -> float:
    """`2%` -> 0.02; a bare number is a fraction (`0.02`)."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UnpatchError(f"{flag} {text!r}: expected a percentage like 2% or a fraction like 0.02") from None
    if value < 0 or not math.isfinite(value):
        raise UnpatchError(f"{flag} {text!r}: must be a finite amount >= 0")
    return value


def objective_of(results: dict[str, Any]) -> dict[str, Any]:
    """{"metric", "key", "direction", "ideal"} of the quantity to minimise or maximise."""
    infos = results["metrics"]
    name = next((m for m, i in infos.items() if i["direction"] == "target"), None) or next(iter(infos))
    key, _ = headline(results["variants"][0]["values"][name])
    return {"metric": name, "key": key, "direction": infos[name]["direction"], "ideal": infos[name]["ideal"]}


def sweep(model, tokenizer, patch: Patch, scales: list[float], metrics: list[str],
          options: dict[str, dict[str, Any]] | None = None, max_ppl_increase: float | None = 0.02,
          force: bool = False) -> dict[str, Any]:
    """Evaluate `patch` at every scale and pick the recommended one (see the module docstring).
    Without perplexity among the metrics there is no constraint (max_ppl_increase must be None).

    Selection reads the dev split only: metrics with a `split` option run once on `dev` (the
    objective and the perplexity budget) and once on `test` (reported beside it, never read by
    the choice); metrics without one run once and their numbers serve both. Each row's "dev" and
    "test" carry the objective's value, 95 % interval and paired p vs the base, and perplexity;
    the row's top-level value/distance/perplexity/ok are the dev ones the choice used."""
    from ..registry import _parameters

    if max_ppl_increase is not None and PPL not in metrics:
        raise UnpatchError(f"--max-ppl-increase needs {PPL} among the metrics (got {', '.join(metrics)}); add it, or drop the limit")
    options = {m: dict((options or {}).get(m, {})) for m in metrics}
    split_metrics = [m for m in metrics if "split" in _parameters(m)]
    variants = [Variant("base")] + [Variant(f"{s:g}", ((patch, s),)) for s in scales]
    dev_opts = {m: o | ({"split": "dev"} if m in split_metrics else {}) for m, o in options.items()}
    results = evaluate(model, tokenizer, variants, metrics, dev_opts, force=force, progress_desc=f"sweep {patch.name} (dev)")
    tested = None
    if split_metrics:
        test_opts = {m: options[m] | {"split": "test"} for m in split_metrics}
        tested = evaluate(model, tokenizer, variants, split_metrics, test_opts, force=force, progress_desc=f"sweep {patch.name} (test)")
    obj = objective_of(results)
    base = results["variants"][0]["values"]
    base_ppl = base[PPL][PPL] if PPL in base else None
    rows = []
    for i, (s, v) in enumerate(zip(scales, results["variants"][1:], strict=True)):
        value = v["values"][obj["metric"]][obj["key"]]
        row: dict[str, Any] = {"scale": s, "value": value, "values": v["values"]}
        if obj["direction"] == "target":
            row["distance"] = abs(value - obj["ideal"])
        if base_ppl is not None:
            ppl = v["values"][PPL][PPL]
            row.update(perplexity=ppl, ppl_rise_pct=100 * (ppl / base_ppl - 1))
            if max_ppl_increase is not None:
                row["ok"] = ppl <= base_ppl * (1 + max_ppl_increase)
        row["dev"] = _split_row(results, i + 1, obj, split_metrics, "dev", fallback=results)
        row["test"] = _split_row(tested, i + 1, obj, split_metrics, "test", fallback=results)
        rows.append(row)
    ok = [r for r in rows if r.get("ok", True)]
    best = min(ok, key=lambda r: (_score(r, obj), abs(r["scale"]))) if ok else None
    splits = {m: ("dev and test" if m in split_metrics else "all (no split)") for m in metrics}
    out = {"patch": patch.name, "patch_id": patch.patch_id, "scales": scales, "objective": obj,
           "max_ppl_increase": max_ppl_increase, "recommended_scale": best["scale"] if best else None,
           "selected_on": "dev", "splits": splits, "rows": rows, "base": base,
           "base_test": tested["variants"][0]["values"] if tested else base, "results": results}
    if tested:
        out["results_test"] = tested
    return out


def _split_row(results: dict[str, Any] | None, i: int, obj: dict[str, Any], split_metrics: list[str], split: str,
               fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """One scale's numbers on one split: objective value, interval, paired p vs the base, perplexity."""
    out: dict[str, Any] = {}
    for name, key, prefix in ((obj["metric"], obj["key"], ""), (PPL, PPL, "perplexity_")):
        src = results if results is not None and name in split_metrics else fallback
        if src is None or name not in src["metrics"]:
            continue
        v, b = src["variants"][i], src["variants"][0]
        value = v["values"][name][key]
        st = v.get("stats", {}).get(name, {})
        iv, paired = st.get("interval") or {}, st.get("paired") or {}
        out[f"{prefix}value" if prefix else "value"] = value
        out[f"{prefix}interval"] = [iv.get("low"), iv.get("high")] if iv else None
        out[f"{prefix}p"] = paired.get("p")
        out[f"{prefix}split"] = split if name in split_metrics else "all"
        if not prefix and obj["direction"] == "target":
            out["distance"] = abs(value - obj["ideal"])
        if prefix:
            out["ppl_rise_pct"] = 100 * (value / b["values"][name][key] - 1)
    return out


def _score(row: dict[str, Any], obj: dict[str, Any]) -> float:
    if obj["direction"] == "target":
        return row["distance"]
    return row["value"] if obj["direction"] == "lower" else -row["value"]


def plot(sw: dict[str, Any]) -> bytes:
    """PNG: the objective (left axis) and perplexity (right axis) against scale, the perplexity
    limit and the recommended scale marked. Figure without pyplot: no global state, Agg canvas."""
    from matplotlib.figure import Figure

    obj, rows = sw["objective"], sw["rows"]
    xs = [r["scale"] for r in rows]
    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    ax = fig.add_subplot()
    ykey = "distance" if obj["direction"] == "target" else "value"
    ylabel = f"{obj['metric']} |{obj['key']} - {obj['ideal']:g}|" if ykey == "distance" else f"{obj['metric']} {obj['key']}"
    ax.plot(xs, [r[ykey] for r in rows], "o-", color="C0", label=f"{ylabel} (dev: chooses)")
    test = [r.get("test", {}).get(ykey) for r in rows]
    if any(r.get("test", {}).get("split") == "test" for r in rows) and all(t is not None for t in test):
        ax.plot(xs, test, "o:", color="C0", alpha=0.6, label=f"{ylabel} (test: reported)")
    ax.set_xlabel("scale (1 = as built)")
    ax.set_ylabel(ylabel, color="C0")
    handles = ax.get_lines()
    if any("perplexity" in r for r in rows):
        ax2 = ax.twinx()
        handles += ax2.plot(xs, [r["perplexity"] for r in rows], "s--", color="C1", label="perplexity (dev)")
        if sw["max_ppl_increase"] is not None:
            limit = sw["base"][PPL][PPL] * (1 + sw["max_ppl_increase"])
            handles += [ax2.axhline(limit, color="C1", ls=":", lw=1, label=f"perplexity limit (+{100 * sw['max_ppl_increase']:g} %)")]
        ax2.set_ylabel("perplexity", color="C1")
    if sw["recommended_scale"] is not None:
        handles += [ax.axvline(sw["recommended_scale"], color="C2", lw=1.5, label=f"recommended {sw['recommended_scale']:g}")]
    # below the axes: inside, it hides the very points it explains
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title(f"{sw['patch']}: dose-response", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})  # no version stamp: same plot, same bytes
    return buf.getvalue()


def write_sweep(path: str | Path, sw: dict[str, Any]) -> Patch:
    """sweep.json + sweep.png into the patch folder, the recommendation into the manifest, the
    card regenerated; one atomic folder swap (see patch.store.rewrite_patch)."""
    from ..patch.store import rewrite_patch

    summary = {"recommended_scale": sw["recommended_scale"], "objective": sw["objective"], "selected_on": sw.get("selected_on", "all"),
               "max_ppl_increase": sw["max_ppl_increase"], "scales": sw["scales"], "file": "sweep.json", "plot": "sweep.png"}
    body = {k: v for k, v in sw.items() if k not in ("results", "results_test")} | {"metrics": sw["results"]["metrics"],
                                                                                 "hardware": sw["results"]["hardware"]}
    files = {"sweep.json": json.dumps(body, indent=2).encode(), "sweep.png": plot(sw)}
    return rewrite_patch(path, {"sweep": summary}, files)
