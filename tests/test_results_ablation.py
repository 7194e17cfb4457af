"""bench/results_ablation.py without a model: the preset-vs-variant decision (McNemar on seed 0, unless the seeds
disagree) on hand-made decisions, and the RESULTS.md section rendered from a hand-made result dict alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results_ablation import BIAS, ablation_section, compare, mean_sd  # noqa: E402

from unpatch.stats import Outcomes  # noqa: E402


def decisions(xs: list[int], n_other: int = 0) -> dict:
    """CrowS-like Outcomes JSON: gender pairs with decisions xs (plus n_other race pairs, decided 1)."""
    x = [float(v) for v in xs] + [1.0] * n_other
    return Outcomes(KEY, "share", x, group=["gender"] * len(xs) + ["race-color"] * n_other, scale=100.0, binary=True,
                    ids=[f"p{i}" for i in range(len(x))], unit="pairs").to_json()


KEY = "pct_stereotype"


def test_compare_significant_when_seeds_agree():
    # variant stereotyped on 30 of 40 pairs; the preset on 10 of them: 20 discordant pairs, all one way
    var = decisions([1] * 30 + [0] * 10)
    pre = decisions([1] * 10 + [0] * 30)
    r = compare([25.0, 30.0, 28.0], [75.0, 70.0, 72.0], pre, var)
    assert (r["b"], r["c"], r["n"]) == (20, 0, 40)
    assert r["p"] < 1e-5 and r["verdict"] == "preset less stereotyped"
    r = compare([75.0, 70.0, 72.0], [25.0, 30.0, 28.0], var, pre)  # the other way round
    assert r["verdict"] == "preset more stereotyped" and r["c"] == 20


def test_compare_seeds_disagree_and_not_significant():
    var = decisions([1] * 30 + [0] * 10)
    pre = decisions([1] * 10 + [0] * 30)
    # seed 0 strongly significant, but seed 2's preset is above the variant: no claim
    r = compare([25.0, 30.0, 74.0], [75.0, 70.0, 72.0], pre, var)
    assert r["verdict"] == "seeds disagree" and r["p"] < 0.05 and r["diffs"][2] == 2.0
    # 3 pairs moved one way, 1 the other: same direction on every seed but within the noise
    pre = decisions([0, 0, 0, 1] + [1] * 36)
    var = decisions([1, 1, 1, 0] + [1] * 36)
    r = compare([92.5, 90.0, 91.0], [97.5, 95.0, 96.0], pre, var)
    assert r["verdict"] == "no significant difference" and r["p"] > 0.05 and (r["b"], r["c"]) == (3, 1)
    # different test pairs (another pair count) cannot be paired
    assert compare([1.0], [2.0], decisions([1, 0]), decisions([1, 0, 1]))["verdict"].startswith("not comparable")


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([4.0]) == (4.0, 0.0) and mean_sd([]) == (None, None)


def hand_made() -> dict:
    name = "pcgu-2406.13551"
    row = {"variant_name": "pcgu-bias", "paper": "2406.13551", "claim": BIAS[name]["claim"], "differs": BIAS[name]["differs"],
           "focus": "gender", "base_pct": 56.87, "n_pairs": 131,
           "preset": {"pct": [55.0, 54.2, 56.1], "low": [46.0, 45.3, 47.2], "high": [63.7, 62.9, 64.8],
                      "changes": [-1.87, -2.67, -0.77], "p": [0.25, 0.0312, 0.74], "ppl_rise_pct": [0.5, 0.7, 0.6],
                      "scale": 1.5, "within_budget": True, "build_seconds": [61.0, 60.2, 63.9], "steps": 25,
                      "dev_rows": [{"scale": 0.5, "pct": 56.0, "ppl_rise_pct": 0.1}, {"scale": 1.5, "pct": 55.1, "ppl_rise_pct": 0.6}]},
           "variant": {"scale": 1.0, "pct": [56.1, 56.9, 55.3], "changes": [-0.76, 0.0, -1.53], "p": [0.5, 1.0, 0.3],
                       "ppl_rise_pct": [0.3, 0.2, 0.4]},
           "vs": {"p": 0.42, "b": 3, "c": 5, "n": 131, "diffs": [-1.1, -2.7, 0.8], "verdict": "seeds disagree"}}
    forget = {"paper": "2405.15152", "claim": "75 % fewer", "differs": "answer-only", "metrics": ["forget_nll", "retain_nll"],
              "heldout": {"toxicity_from": 600, "truthfulqa_from": 600},
              "rows": {"base": {"forget_nll": {"value": 4.1, "low": 3.9, "high": 4.3}, "retain_nll": {"value": 2.2, "low": 2.1, "high": 2.3}},
                       "harmful-2405.15152@1": {"forget_nll": {"value": 4.6, "low": 4.4, "high": 4.8, "p": 0.002},
                                                "retain_nll": {"value": 2.25, "low": 2.1, "high": 2.4, "p": 0.3}}}}
    return {"mode": "full", "seeds": [0, 1, 2], "scales": [0.5, 1, 1.5, 2.5], "max_ppl_rise": 0.02, "seconds": 600.0,
            "cuts": ["presets swept at 3 scales"], "bias": {name: row, "masked-ga-2407.16951": {"failed": "UnpatchError: x", "claim": "c"}},
            "forgetting": forget}


def test_section_renders_from_the_dict_alone():
    d = json.loads(json.dumps(hand_made()))  # as --report-only reads it back
    md = "\n".join(ablation_section(d))
    assert "`pcgu-2406.13551` vs `pcgu-bias`" in md and "dynamic vs static PCGU" in md
    assert "-1.77 ± 0.95 / -0.76 ± 0.77" in md  # mean ± sd of each side's changes
    assert "n.s. (p = 0.25); p = 0.031; n.s. (p = 0.74)" in md
    assert "seeds disagree (p = 0.42, b 3 c 5 of 131)" in md and "1.5 / 1" in md
    assert BIAS["pcgu-2406.13551"]["claim"] in md and "FAILED: UnpatchError: x" in md
    assert "4.600 [4.400, 4.800], p = 0.002" in md and "2.250 [2.100, 2.400], n.s. (p = 0.30)" in md
    assert "presets swept at 3 scales" in md and "10.0 min (full mode)" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| `pcgu")]
    assert len(table) == 1 and table[0].count("|") == 9  # 8 columns
    assert "Not run: no data" in "\n".join(ablation_section({}))
