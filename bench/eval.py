"""CrowS-Pairs on SmolLM2-135M: unpatch vs lm-evaluation-harness, same data, same model object, one run.

    .venv/bin/python bench/eval.py [--data crows_pairs_anonymized.csv] [--limit N]
                                   [--unpatch-batch-size 16] [--lm-eval-batch-size 16] [--sweep]

Both run in float32 on the CPU on the *same* loaded model (load time excluded from both). lm-eval
runs its own `crows_pairs_english` task (its YAML and utils.py, copied into a temp folder and
pointed at a temp copy of the CSV), through `simple_evaluate` as a user would; its time includes
its task setup. `--sweep` first times both tools on 150 pairs at batch sizes 8/16/32/64 and uses
each one's fastest. unpatch runs its float32 linears through oneDNN where it can (cpu_linear.py);
it runs a second time on MKL, the kernels lm-eval's eager HF model runs, so the gain from kernels
and the gain from doing less work are printed apart. Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crows_pairs" / "crows_pairs_anonymized.csv"
SWEEP = (8, 16, 32, 64)


def lm_eval_task(folder: Path, csv_path: Path) -> str:
    """lm-eval's crows_pairs_english, unchanged but for its dataset: a local CSV."""
    import lm_eval.tasks

    src = Path(lm_eval.tasks.__file__).parent / "crows_pairs"
    shutil.copy(src / "utils.py", folder / "utils.py")
    yaml = (src / "crows_pairs_english.yaml").read_text(encoding="utf-8")
    yaml = re.sub(r"tag:\n(  - .*\n)+", "", yaml).replace("task: crows_pairs_english", "task: crows_pairs_local")
    yaml = re.sub(r"dataset_path: .*\ndataset_name: .*\n", f"dataset_path: csv\ndataset_kwargs:\n  data_files:\n    test: {csv_path}\n", yaml)
    (folder / "crows_pairs_local.yaml").write_text(yaml, encoding="utf-8")
    return "crows_pairs_local"


def run_unpatch(model, tok, csv_path: Path, batch_size: int):
    from unpatch.evals.crows_pairs import load_crows_pairs, score_pairs, summarize

    t, c = time.perf_counter(), time.process_time()
    pairs = load_crows_pairs(str(csv_path))
    lls = score_pairs(model, tok, pairs, batch_size=batch_size, progress=False)
    res = summarize(pairs, lls)  # exactly what get_metric("crows_pairs") does
    return res, [1.0 if m > le else 0.0 for m, le in lls], time.perf_counter() - t, time.process_time() - c


def run_lm_eval(model, tok, folder: Path, task: str, batch_size: int):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t, c = time.perf_counter(), time.process_time()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(folder)),
                          log_samples=True, bootstrap_iters=0)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    decisions = [s["pct_stereotype"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    return out["results"][task], decisions, wall, cpu


def write_subset(src: Path, dst: Path, limit: int | None) -> None:
    if limit is None:
        shutil.copyfile(src, dst)
        return
    import csv

    with src.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[: limit + 1]
    with dst.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def sweep(model, tok, tmp: Path) -> tuple[int, int]:
    """Each tool's fastest batch size on the first 150 pairs."""
    sub = tmp / "sweep"
    sub.mkdir()
    write_subset(Path(args.data), sub / "crows.csv", 150)
    task = lm_eval_task(sub, sub / "crows.csv")
    ours = {bs: run_unpatch(model, tok, sub / "crows.csv", bs)[2] for bs in SWEEP}
    theirs = {bs: run_lm_eval(model, tok, sub, task, bs)[2] for bs in SWEEP}
    for bs in SWEEP:
        print(f"sweep_bs{bs}_unpatch_seconds: {ours[bs]:.2f}\nsweep_bs{bs}_lm_eval_seconds: {theirs[bs]:.2f}", flush=True)
    return min(ours, key=ours.get), min(theirs, key=theirs.get)


def cpu_name() -> str:
    """The CPU's model name (Linux), since GEMM kernels and so the ratios depend on it."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    names = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
    family = re.findall(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    return f"{names[0].strip()} (family {family[0]})" if names and family else (names[0].strip() if names else "unknown")


def main() -> None:
    import logging

    from unpatch import cpu_linear
    from unpatch.model import load_model

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if not Path(args.data).is_file():
        sys.exit(f"bench/eval.py: {args.data} not found; pass --data <crows_pairs_anonymized.csv>")
    model, tok, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    with torch.inference_mode():  # warm-up: first-call kernel setup is nobody's cost
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    with tempfile.TemporaryDirectory(prefix="unpatch-bench-") as d:
        tmp = Path(d)
        ours_bs, theirs_bs = sweep(model, tok, tmp) if args.sweep else (args.unpatch_batch_size, args.lm_eval_batch_size)
        csv_path = tmp / "crows_pairs_anonymized.csv"
        write_subset(Path(args.data), csv_path, args.limit)
        task = lm_eval_task(tmp, csv_path)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        theirs, theirs_dec, theirs_s, theirs_cpu = run_lm_eval(model, tok, tmp, task, theirs_bs)
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ours, ours_dec, ours_s, ours_cpu = run_unpatch(model, tok, csv_path, ours_bs)
        f2 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        onednn = cpu_linear.onednn_enabled()
        os.environ["UNPATCH_ONEDNN"] = "0"  # and once more on the GEMM kernels lm-eval runs (MKL)
        _, mkl_dec, mkl_s, _ = run_unpatch(model, tok, csv_path, ours_bs)
        del os.environ["UNPATCH_ONEDNN"]
    lines = {
        "pairs": ours["pairs"],
        "crows_overall_unpatch": round(ours["pct_stereotype"], 2),
        "crows_overall_lm_eval": round(100 * theirs["pct_stereotype,none"], 2),
        "crows_abs_diff": round(abs(ours["pct_stereotype"] - 100 * theirs["pct_stereotype,none"]), 4),
        "pair_decisions_differing": sum(a != b for a, b in zip(ours_dec, theirs_dec, strict=True)),
        "likelihood_diff_unpatch": round(ours["likelihood_diff"], 4),
        "likelihood_diff_lm_eval": round(theirs["likelihood_diff,none"], 4),
        "unpatch_batch_size": ours_bs,
        "lm_eval_batch_size": theirs_bs,
        "unpatch_seconds": round(ours_s, 2),
        "lm_eval_seconds": round(theirs_s, 2),
        "eval_speedup_vs_lm_eval": round(theirs_s / ours_s, 2),
        "unpatch_linear_kernels": "oneDNN" if onednn else "MKL",
        "unpatch_seconds_on_lm_eval_kernels": round(mkl_s, 2),
        "eval_speedup_vs_lm_eval_on_its_kernels": round(theirs_s / mkl_s, 2),
        "pair_decisions_differing_on_its_kernels": sum(a != b for a, b in zip(mkl_dec, theirs_dec, strict=True)),
        "unpatch_cpu_seconds": round(ours_cpu, 2),
        "lm_eval_cpu_seconds": round(theirs_cpu, 2),
        "eval_cpu_speedup_vs_lm_eval": round(theirs_cpu / ours_cpu, 2),
        "unpatch_minor_page_faults": f2 - f1,  # memory given back to the kernel and faulted in again
        "lm_eval_minor_page_faults": f1 - f0,
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for k, v in lines.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--limit", type=int, default=None, help="first N pairs only")
    p.add_argument("--unpatch-batch-size", type=int, default=32)
    p.add_argument("--lm-eval-batch-size", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="pick each tool's fastest batch size on 150 pairs first")
    args = p.parse_args()
    main()
