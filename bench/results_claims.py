"""The sentences of docs/RESULTS.md that judge the numbers: transfer, copyright specificity, and the
papers' claims held against what the run measured. Every figure is computed from the run's data;
the papers' own figures are quoted as the papers report them (PAPERS), never as our results."""

from __future__ import annotations

STUDIED = ("gender", "race-color", "religion")
MOVE = 1.0  # points of CrowS-Pairs pct: smaller changes are a few pairs (1 point = 3 gender, 6 race-color, 2 religion pairs)

PAPERS = {  # what each paper reports, as the issue and ../shared/seeds summarise it
    "2405.15152": "unlearning harmful text cuts the harmful-completion rate by 75 %",
    "2406.13551": "negating a task vector removes more CrowS-Pairs bias than PCGU at less perplexity cost "
                  "(LLaMA-2-7B: 11.8 % less bias with little perplexity change; PCGU a similar cut with perplexity degraded)",
    "2407.16951": "unlearning one bias type also lowers the bias of other types (transfer)",
}


def transfer_findings(tr: dict, bc: dict, types: list[str]) -> tuple[list[str], bool]:
    """Per patch: distance change on the other studied types, and the direction of every other type."""
    md, shows = [], False
    for n, b in tr.items():
        c, t = b["at"]["crows"], b["focus"]
        others = [o for o in STUDIED if o != t and o in types]
        dist = {o: abs(c[o] - 50) - abs(bc[o] - 50) for o in others}
        lower = [o for o in others if dist[o] <= -MOVE]
        higher = [o for o in others if dist[o] >= MOVE]
        rest = [o for o in types if o != t]
        toward = [o for o in rest if c[o] - bc[o] <= -MOVE]
        crossed = [o for o in rest if (bc[o] - 50) * (c[o] - 50) < 0 and abs(c[o] - 50) >= MOVE]
        shows |= bool(lower)
        md.append(f"- `{n}` (learned on {t}): distance on the other studied types "
                  + ", ".join(f"{o} {dist[o]:+.2f}" for o in others)
                  + f" ({len(lower)} lower and {len(higher)} higher by >= {MOVE:g} point). Its stereotype preference (pct) "
                  f"falls by >= {MOVE:g} point on {len(toward)} of the {len(rest)} other types"
                  + (f" ({', '.join(toward)})" if toward else "")
                  + f"; overall {bc['all']:.2f} -> {c['all']:.2f}"
                  + (f"; it pushes {', '.join(f'{o} ({bc[o]:.2f} -> {c[o]:.2f})' for o in crossed)} past 50, "
                     "i.e. over-corrects there" if crossed else "") + ".")
    return md, shows


def transfer_verdict(tr: dict, shows: bool) -> str:
    return (f"**Transfer of bias reduction between gender, race and religion {'shows up' if shows else 'does not show up'} "
            f"on this model**: {'some' if shows else 'no'} single-type patch lowers another studied type's distance "
            f"|pct - 50| by >= {MOVE:g} point (of {len(tr)} patches). A shift of the stereotype preference itself "
            "(the pct, in either type) is listed per patch above: it can carry over in direction while the distance, "
            "which also counts over-correction past 50, does not fall.")


def copyright_finding(v: list[dict]) -> list[str]:
    """Is the verbatim-recall drop specific to the forgotten book (vs the control book)?"""
    base = v[0]["values"]
    b0, o0, r0 = (base["verbatim_recall"]["rouge_l"], base["verbatim_recall"]["other/rouge_l"],
                  base["retain_nll"]["perplexity"])
    md = [f"Base recall: forgotten book ROUGE-L {b0:.4f}, control book {o0:.4f}"
          + (" - the base model has not memorised the forgotten book more than the control, so there is little "
             "verbatim text to remove." if b0 <= 1.25 * o0 else ".")]
    for x in v[1:]:
        r = x["values"]
        db, do = b0 - r["verbatim_recall"]["rouge_l"], o0 - r["verbatim_recall"]["other/rouge_l"]
        rise = 100 * (r["retain_nll"]["perplexity"] / r0 - 1)
        md.append(f"- {x['label']}: book ROUGE-L -{db:.4f}, control -{do:.4f}, news perplexity {rise:+.1f} %: "
                  + ("specific to the book" if db > 2 * max(do, 0) else "NOT specific (the control book drops as much)") + ".")
    return md + [""]


def paper_claims(d: dict, b_acc: dict, f_acc: dict, table) -> list[str]:
    """Section 6: each paper's claim beside the number this run measured for it (`table`: the report's renderer)."""
    md = ["## 6. Against the papers' claims", "",
          "Left: what the paper reports on its own (larger) models. Right: what this run measured on SmolLM2-135M.", ""]
    rows = []
    h = f_acc.get("harmful")
    if h and h[1] is not None:
        rows.append(["2405.15152", PAPERS["2405.15152"],
                     f"`{h[2]}`: {h[0]:.3f} -> {h[1]:.3f} ({100 * (1 - h[1] / h[0]):.1f} % fewer), retain ppl {h[3]:+.2f} %"])
    bias, bc = d["bias"], d["base"]["crows"]
    meth = {d["builds"][n]["method"]: (n, b) for n, b in bias.items() if b["focus"] == "gender"}
    if "task_vector" in meth and "pcgu" in meth:
        b0 = abs(bc["gender"] - 50)

        def at(m: str) -> str:
            n, b = meth[m]
            if b["recommended_scale"] is None:
                return f"{m} over the budget at every scale"
            dist = abs(b["at"]["crows"]["gender"] - 50)
            return f"{m} {100 * (1 - dist / b0):.1f} % less gender bias at ppl {b['at']['ppl_rise_pct']:+.2f} %"

        rows.append(["2406.13551", PAPERS["2406.13551"], f"at <= {100 * d['settings']['max_ppl_rise']:g} % ppl: "
                     f"{at('task_vector')}; {at('pcgu')}"])
    if b_acc.get("transfer_shows") is not None:
        rows.append(["2407.16951", PAPERS["2407.16951"],
                     f"transfer {'shows up' if b_acc['transfer_shows'] else 'does not show up'} (section 3)"])
    return md + table(["paper", "its claim", "measured here"], rows)
