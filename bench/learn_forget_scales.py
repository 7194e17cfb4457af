"""Benchmark: the forget patch of a learn-then-forget build at other strengths, on base + learn patch.

    python bench/learn_forget_scales.py /tmp/copyright --book BOOK.txt --control OTHER.txt --scales 0,1,2,3,4

Loads SmolLM2-135M once, applies `<patch>-learn`, then the forget patch at each scale (reverted bit
for bit in between; scale 0 = the learned model) and prints ROUGE-L of 8 learned passages (with its
95 % bootstrap interval), of 8 control passages, and retain perplexity on 30 XSum articles.
Exploration only: it reads the learned passages it reports, so do not pick a coefficient from it; the
study's dev-only choice (and its test numbers) is bench/results_learnforget.py.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unpatch.evals.forgetting import load_metric_texts, token_nll  # noqa: E402
from unpatch.evals.recall import _split  # noqa: E402
from unpatch.model import load_model  # noqa: E402
from unpatch.patch.apply import Applied  # noqa: E402
from unpatch.patch.store import load_patch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patch", type=Path)
    ap.add_argument("--book", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--learned", type=int, default=24, help="the recipe's data.forget.limit")
    ap.add_argument("--chunk-words", type=int, default=48)
    ap.add_argument("--scales", default="0,1,2,3,4")
    a = ap.parse_args()
    forget = load_patch(a.patch)
    learn = load_patch(a.patch.with_name(a.patch.name + "-learn"))
    model, tok, _ = load_model(forget.manifest.base.id)
    model.requires_grad_(False)
    book = load_metric_texts("bench", a.book, None, None, a.chunk_words)[: a.learned]
    ctrl = load_metric_texts("bench", a.control, None, None, a.chunk_words)
    retain = load_metric_texts("bench", "builtin:xsum", "document", 30)
    applied = Applied(model)
    applied.apply(learn)
    for s in (float(x) for x in a.scales.split(",")):
        t0 = time.perf_counter()
        applied.apply(forget, s)
        lrn, ctl = _split(model, tok, book, 8, 32, 24, 8), _split(model, tok, ctrl, 8, 32, 24, 8)
        ppl = math.exp(token_nll(model, tok, retain, None, 2048, "bench")["nll"])
        print(f"scale {s:g}: learned rouge_l {lrn['rouge_l']:.4f} [{lrn['/rouge_l_lo']:.4f}, {lrn['/rouge_l_hi']:.4f}] "
              f"exact {lrn['exact']:.3f}; control rouge_l {ctl['rouge_l']:.4f}; retain ppl {ppl:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        applied.revert(forget)


if __name__ == "__main__":
    main()
