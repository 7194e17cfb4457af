"""The papers' claims held against what the run measured (the last section of docs/RESULTS.md). Every figure is
computed from the run's data; the papers' own figures are quoted as the papers report them (PAPERS), never as ours."""

from __future__ import annotations

from results_bias_report import cut_of, rise
from results_measure import fmt_ci, fmt_p, table

PAPERS = {  # what each paper reports, as the issue and ../shared/seeds summarise it
    "2405.15152": "unlearning harmful text cuts the harmful-completion rate by 75 %",
    "2406.13551": "negating a task vector removes more CrowS-Pairs bias than PCGU at less perplexity cost "
                  "(LLaMA-2-7B: 11.8 % less bias with little perplexity change; PCGU a similar cut with perplexity degraded)",
    "2407.16951": "unlearning one bias type also lowers the bias of other types (transfer)",
}


def paper_claims(d: dict, b_acc: dict, f_acc: dict) -> list[str]:
    """Section 7: each paper's claim beside the number this run measured for it (test split, dev-chosen scales)."""
    md = ["## 7. Against the papers' claims", "",
          "Left: what the paper reports on its own (larger) models. Right: what this run measured on SmolLM2-135M "
          "(test split, scales chosen on dev).", ""]
    rows = []
    h = f_acc.get("harmful")
    if h:
        rows.append(["2405.15152", PAPERS["2405.15152"],
                     f"`{h['label']}`: {h['base']:.3f} -> {h['value']:.3f} ({100 * (1 - h['value'] / h['base']):.1f} % fewer, "
                     f"{fmt_p(h['p'])}), retain ppl {h['retain_rise']:+.2f} %" if h["base"] else f"`{h['label']}`: base rate 0"])
    rec = d["bias"]["recipes"]
    meth = {r["method"]: r for r in rec.values() if r["focus"] == "gender"}
    if "task_vector" in meth and "pcgu" in meth:
        def at(m: str) -> str:
            r = meth[m]
            if not r["within_budget"]:
                return f"{m} over the budget at every scale"
            s0 = r["seeds"][0]
            c = cut_of(s0["shift"], s0["pct"]["base"])
            return f"{m} cut {fmt_ci(c, 1)} % of the gender distance ({fmt_p(s0['pct']['p'])}) at ppl {rise(s0['ppl']):+.2f} %"

        rows.append(["2406.13551", PAPERS["2406.13551"], f"at <= {100 * d['settings']['max_ppl_rise']:g} % ppl (dev): "
                     f"{at('task_vector')}; {at('pcgu')}"])
    if b_acc.get("transfer_shows") is not None:
        rows.append(["2407.16951", PAPERS["2407.16951"],
                     f"bias-specific transfer {'shows up' if b_acc['transfer_shows'] else 'does not show up'} (section 3, against its control row)"])
    return md + table(["paper", "its claim", "measured here"], rows)
