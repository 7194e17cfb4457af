"""The harmful-completions part of the study (recipes/harmful.yaml; smoke.yaml = plain gradient ascent):
its scale chosen on the DEV prompts and retain texts, its numbers reported on TEST, and section 4a.

Held out: the toxicity texts after every recipe's `limit` (prompts and forget NLL), the TruthfulQA items
after the retain `limit` (retain NLL / KL). The harmful rate is judged by alt-profanity-check (default
judge) and by the home-made probe (agreement on the base's completions); degenerate completions and
distinct-2 stand beside the rate, so a broken model does not pass for a safe one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from results_measure import ALPHA, fmt_ci, fmt_p, table

from unpatch.evals.runner import Variant, evaluate
from unpatch.sources import load_texts

METRICS = ["harmful_rate", "forget_nll", "retain_nll", "kl_retain"]
SELECT = ["harmful_rate", "retain_nll"]  # what the dev choice reads


def heldout_file(work: Path, name: str, texts: list[str]) -> str:
    path = work / f"heldout_{name}.jsonl"
    path.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts), encoding="utf-8")
    return str(path)


def _row(res: dict, i: int) -> dict:
    v = res["variants"][i]
    return {"label": v["label"], "values": v["values"], "stats": v.get("stats", {})}


def forget_part(built: dict, model, tok, s, work: Path) -> dict:
    """built: {name: {"patch", "limits"}} of the toxicity recipes (harmful, smoke)."""
    if "harmful" not in built:
        return {}
    n_tox = max(b["limits"].get("forget") or 0 for b in built.values())
    n_tqa = max(b["limits"].get("retain") or 0 for b in built.values())
    toxic = heldout_file(work, "toxicity", load_texts("builtin:toxicity")[n_tox:][: s.heldout_limit + 2 * s.n_prompts])
    retain = heldout_file(work, "truthfulqa", load_texts("builtin:truthfulqa")[n_tqa:][: s.heldout_limit])
    opts = {"harmful_rate": {"prompts": toxic, "n_prompts": s.n_prompts, "max_new_tokens": s.gen_tokens, "seed": 0,
                             "train_limit": s.judge_limit},
            "forget_nll": {"source": toxic}, "retain_nll": {"source": retain}, "kl_retain": {"source": retain}}
    judge = copy.deepcopy(model)  # the probe judge's embedder stays the base while patches go on and off
    hidden = {"harmful_rate": {"embedder": judge}}
    h = built["harmful"]["patch"]
    dev = evaluate(model, tok, [Variant("base")] + [Variant(f"harmful@{sc:g}", ((h, sc),)) for sc in s.forget_scales], SELECT,
                   {m: opts[m] | {"split": "dev"} for m in SELECT}, hidden=hidden, progress_desc="harmful (dev)")
    b_ret = dev["variants"][0]["values"]["retain_nll"]["perplexity"]
    rows = [_row(dev, i) for i in range(len(dev["variants"]))]
    ok = [(r["values"]["harmful_rate"]["harmful_rate"], sc, r) for sc, r in zip(s.forget_scales, rows[1:], strict=True)
          if r["values"]["retain_nll"]["perplexity"] <= b_ret * (1 + s.max_retain_rise)]
    chosen = min(ok, key=lambda x: (x[0], x[1]))[1] if ok else None
    at = chosen if chosen is not None else min(s.forget_scales)
    variants = [Variant("base"), Variant(f"harmful@{at:g}", ((h, at),))]
    if "smoke" in built:
        variants.append(Variant("smoke@1", ((built["smoke"]["patch"], 1.0),)))
    test = evaluate(model, tok, variants, METRICS, {m: opts[m] | {"split": "test"} for m in METRICS}, hidden=hidden,
                    progress_desc="harmful (test)")
    del judge
    return {"heldout": {"toxicity_from": n_tox, "truthfulqa_from": n_tqa}, "dev_rows": rows, "recommended_scale": chosen,
            "scale": at, "test": [_row(test, i) for i in range(len(test["variants"]))],
            "settings": test["metrics"]["harmful_rate"]["settings"]}


def _rise(x: float, b: float) -> str:
    return f"{100 * (x / b - 1):+.2f}"


def forget_section(fg: dict, s: dict) -> tuple[list[str], dict]:
    md = ["### 4a. Harmful completions (`recipes/harmful.yaml`; `smoke.yaml` = plain gradient ascent, no KL)", ""]
    if not fg:
        return md + ["Not measured: harmful.yaml was not part of this run.", ""], {}
    ho, hs = fg["heldout"], fg["settings"]
    md += [f"Held out: toxicity texts from #{ho['toxicity_from']} on (prompts: {hs.get('n_prompts')} of each split, greedy, "
           f"{hs.get('max_new_tokens')} new tokens); retain = TruthfulQA items from #{ho['truthfulqa_from']} on. Scale chosen on "
           f"DEV among {s['forget_scales']}: the lowest dev harmful rate with dev retain perplexity up <= "
           f"{100 * s['max_retain_rise']:g} % (ties: smaller scale).", ""]
    rows = []
    b = fg["dev_rows"][0]["values"]
    for r in fg["dev_rows"]:
        v = r["values"]
        rows.append([r["label"], f"{v['harmful_rate']['harmful_rate']:.3f}", f"{v['retain_nll']['perplexity']:.3f}",
                     _rise(v["retain_nll"]["perplexity"], b["retain_nll"]["perplexity"])])
    md += table(["variant (dev split)", "harmful rate", "retain ppl", "retain rise %"], rows)
    chosen = fg["recommended_scale"]
    md += [f"Dev choice: {'scale ' + format(chosen, 'g') if chosen is not None else 'none within the retain budget; the lightest scale is reported, flagged'}.",
           "", "TEST split (95 % intervals; p = paired test against the base: exact McNemar for the rate, paired bootstrap "
           "for the perplexities):", ""]
    rows, b = [], fg["test"][0]
    for r in fg["test"]:
        v, st = r["values"], r["stats"]
        hr = v["harmful_rate"]
        rows.append([r["label"], fmt_ci(_ci(hr["harmful_rate"], st.get("harmful_rate")), 3),
                     "-" if r is b else fmt_p(st.get("harmful_rate", {}).get("paired", {}).get("p")),
                     f"{hr.get('judge_agreement', float('nan')):.3f}", f"{hr.get('degenerate')}/{hr.get('prompts')}",
                     f"{hr.get('distinct_2', float('nan')):.3f}",
                     fmt_ci(_st(st, "forget_nll"), 3), fmt_ci(_st(st, "retain_nll"), 3),
                     "-" if r is b else fmt_p(st.get("retain_nll", {}).get("paired", {}).get("p")),
                     _rise(v["retain_nll"]["perplexity"], b["values"]["retain_nll"]["perplexity"]),
                     fmt_ci(_st(st, "kl_retain"), 4)])
    md += table(["variant (test split)", "harmful rate", "p", "judge agreement", "degenerate", "distinct-2",
                 "forget NLL (held-out toxic)", "retain NLL", "p (retain)", "retain ppl rise %", "KL retain (nats)"], rows)
    md += ["NLL in nats per token, 95 % bootstrap interval over texts (none below 10 texts).", ""]
    other = next((k for k in b["values"]["harmful_rate"] if k.startswith("harmful_rate_")), None)
    if other:
        md += [f"Judges on the base's test completions: {hr_judge(b)} says {b['values']['harmful_rate']['harmful_rate']:.3f}, "
               f"the other ({other.removeprefix('harmful_rate_')}) {b['values']['harmful_rate'][other]:.3f}; they agree on "
               f"{b['values']['harmful_rate'].get('judge_agreement', 0):.3f} of the completions. Degenerate = empty, no letter, or "
               "repeating itself: counted apart, never as safe.", ""]
    pick = next((r for r in fg["test"][1:] if r["label"].startswith("harmful@")), None)
    acc = {}
    if pick:
        p = pick["stats"].get("harmful_rate", {}).get("paired", {}).get("p")
        acc["harmful"] = {"base": b["values"]["harmful_rate"]["harmful_rate"], "value": pick["values"]["harmful_rate"]["harmful_rate"],
                          "high": (pick["stats"].get("harmful_rate", {}).get("interval") or {}).get("high"), "p": p,
                          "label": pick["label"], "within_budget": chosen is not None, "significant": p is not None and p < ALPHA,
                          "retain_rise": 100 * (pick["values"]["retain_nll"]["perplexity"] / b["values"]["retain_nll"]["perplexity"] - 1)}
    return md, acc


def hr_judge(r: dict) -> str:
    return str(r["values"]["harmful_rate"].get("judge", "the judge"))


def _st(stats: dict, metric: str) -> dict:
    """A metric's headline (as evaluate's stats hold it) with its interval, for fmt_ci."""
    st = stats.get(metric) or {}
    iv = st.get("interval") or {}
    return {"value": st.get("value"), "low": iv.get("low"), "high": iv.get("high")}


def _ci(value: float, st: dict | None) -> dict:
    iv = (st or {}).get("interval") or {}
    return {"value": value, "low": iv.get("low"), "high": iv.get("high")}
