"""Benchmark: learn, then forget a book (recipes/copyright.yaml, 2405.15152's copyright setting).

    python bench/learn_forget.py --book /work/shared/data/gutenberg/pg11_alice_in_wonderland.txt \
        --control /work/shared/data/gutenberg/pg1342_pride_and_prejudice.txt --out /tmp/copyright
    python bench/learn_forget.py --report-only /tmp/copyright      # the table again, from the manifest

Builds the two-stage recipe (learn patch `<out>-learn`, then the forget patch on base + it) with its
own evaluation: forget_recall (ROUGE-L / BLEU / exact match of greedy continuations; 95 % bootstrap
intervals over passages) at base / learned / forgotten on the learned passages, unseen passages of
the same book and the control book, and retain NLL. Prints `name: value` lines and the verdict of
the issue-14 target: the forget patch removes >= 80 % of the learn stage's ROUGE-L gain on learned
passages, while the control book's ROUGE-L stays inside the base's 95 % interval and retain
perplexity moves by at most --max-retain-change (default 5 %; retain_nll reports no interval).
Extra `--set key=value` pass through to the recipe (e.g. --set train.steps=20).
NOT the study's measurement: this reports the build's own evaluation on ALL learned passages, so it
cannot choose a coefficient (choosing here would tune on the reported passages). The numbers quoted in
docs/RESULTS.md come from bench/results_learnforget.py (dev / test split, paired tests), run by make results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from unpatch.patch.store import load_patch  # noqa: E402

SPLITS = ("learned", "unseen", "control")


def summary(manifest, max_retain_change: float) -> dict:
    ev = manifest.metrics["eval"]
    rows = {v["label"]: v["values"] for v in ev["variants"]}
    out: dict = {"points": {}}
    for label, values in rows.items():
        r = values["forget_recall"]
        out["points"][label] = {s: {k: r.get(f"{s}_{k}") for k in ("rouge_l", "bleu", "exact")}
                                | {"rouge_l_ci": [r.get(f"{s}/rouge_l_lo"), r.get(f"{s}/rouge_l_hi")]} for s in SPLITS if f"{s}_rouge_l" in r}
        if "retain_nll" in values:
            out["points"][label]["retain_ppl"] = math.exp(values["retain_nll"]["nll"])
    b, lrn, f = (out["points"][k] for k in ("base", "learned", "forgotten"))
    gain = lrn["learned"]["rouge_l"] - b["learned"]["rouge_l"]
    out["removed_share"] = (lrn["learned"]["rouge_l"] - f["learned"]["rouge_l"]) / gain if gain > 0 else None
    lo, hi = b["control"]["rouge_l_ci"] if "control" in b else (None, None)
    out["control_within_base_ci"] = lo is not None and lo <= f["control"]["rouge_l"] <= hi
    if "retain_ppl" in b:
        out["retain_ppl_change_pct"] = 100 * (f["retain_ppl"] / b["retain_ppl"] - 1)
    out["target_met"] = bool(out["removed_share"] is not None and out["removed_share"] >= 0.8 and out["control_within_base_ci"]
                             and abs(out.get("retain_ppl_change_pct", 0.0)) <= max_retain_change)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--book", type=Path)
    ap.add_argument("--control", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/copyright"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--report-only", type=Path)
    ap.add_argument("--max-retain-change", type=float, default=5.0)
    a = ap.parse_args()
    if a.report_only:
        patch = load_patch(a.report_only)
    else:
        if not a.book:
            ap.error("--book is required unless --report-only")
        from unpatch.builder import build

        sets = [f"data.forget.source={a.book.resolve()}"] + ([f"eval.options.forget_recall.control={a.control.resolve()}"] if a.control else [])
        t0 = time.perf_counter()
        patch = build(ROOT / "recipes" / "copyright.yaml", out=a.out, overwrite=True, overrides=sets + a.sets)
        print(f"# build + evaluation: {time.perf_counter() - t0:.0f} s")
    s = summary(patch.manifest, a.max_retain_change)
    for label, point in s["points"].items():
        for split in SPLITS:
            if split in point:
                p = point[split]
                lo, hi = p["rouge_l_ci"]
                print(f"{label}.{split}.rouge_l: {p['rouge_l']:.4f} [{lo:.4f}, {hi:.4f}]  bleu {p['bleu']:.2f}  exact {p['exact']:.3f}")
        if "retain_ppl" in point:
            print(f"{label}.retain_ppl: {point['retain_ppl']:.3f}")
    share = s["removed_share"]
    print(f"removed_share_of_learned_rouge_l_gain: {'n/a' if share is None else f'{100 * share:.1f} %'}")
    print(f"control_rouge_l_within_base_ci: {s['control_within_base_ci']}")
    if "retain_ppl_change_pct" in s:
        print(f"retain_ppl_change_pct: {s['retain_ppl_change_pct']:+.2f}")
    print(f"target_met: {s['target_met']}")
    side = Path(patch.path).with_name(Path(patch.path).name + ".learn_forget.json")  # beside the patch, not in it
    side.write_text(json.dumps(s, indent=2))
    print(f"# summary: {side}")


if __name__ == "__main__":
    main()
