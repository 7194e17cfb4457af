"""The README's performance table, generated from the outputs of bench/apply.py, bench/eval.py and bench/peers.py.

    .venv/bin/python bench/apply.py --quick > /tmp/apply.txt
    .venv/bin/python bench/eval.py --limit 300 > /tmp/eval.txt
    .venv/bin/python bench/peers.py > /tmp/peers.txt
    .venv/bin/python bench/perf_table.py /tmp/apply.txt /tmp/eval.txt /tmp/peers.txt [--write README.md]

Reads their `name: value` lines (and the load average each printed) and prints a markdown table;
`--write` replaces the block between the PERF markers of the README with it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BEGIN, END = "<!-- perf-table:begin (bench/perf_table.py) -->", "<!-- perf-table:end -->"
# (key, what it measures, peer, target, higher is better)
ROWS = [
    ("delta_apply_full_bound_fraction", "verified in-memory apply of a dense 538 MB delta, fraction of the copy-bandwidth bound",
     "memory bandwidth", ">= 0.5", True),
    ("lora_merge_time_ratio_vs_peft", "LoRA merge time over peft `merge_and_unload` (bit-identical result)", "peft", "< 1", False),
    ("eval_speedup_vs_lm_eval", "CrowS-Pairs scoring speed-up over lm-evaluation-harness (same decisions)", "lm-eval", ">= 3.0", True),
    ("apply_out_time_ratio_vs_mergekit", "`unpatch apply --out` time over `mergekit-yaml` task_arithmetic, process start to file",
     "mergekit", "<= 0.34", False),
    ("build_steps_per_s_ratio_vs_trainer", "build optimizer steps/s over a plain HF Trainer on the same objective",
     "transformers Trainer", ">= 1.5", True),
    # the same ratios in process CPU time: steadier than wall time when other jobs share the cores
    ("eval_cpu_speedup_vs_lm_eval", "the same, CPU time", "lm-eval", ">= 3.0", True),
    ("apply_out_cpu_time_ratio_vs_mergekit", "the same, CPU time (user+sys)", "mergekit", "<= 0.34", False),
    ("build_cpu_steps_per_s_ratio_vs_trainer", "the same, steps per CPU second", "transformers Trainer", ">= 1.5", True),
]
CONTEXT = {"revert_bit_exact": "revert bit-exact", "pair_decisions_differing": "CrowS pair decisions differing from lm-eval",
           "lora_merge_max_abs_diff_vs_peft": "LoRA merge max |diff| vs peft",
           "apply_out_max_abs_diff_vs_mergekit": "apply --out max |diff| vs mergekit",
           "unpatch_linear_kernels": "unpatch's float32 linear kernels in eval",
           "eval_speedup_vs_lm_eval_on_its_kernels": "CrowS speed-up with unpatch on lm-eval's kernels (MKL)",
           "pair_decisions_differing_on_its_kernels": "decisions differing on them",
           "cpu": "CPU"}


def parse(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (value, load average): the first load printed after the value, else the last before it."""
    values: dict[str, tuple[str, str]] = {}
    pending: list[str] = []
    load = "?"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := re.search(r"load average (?:now )?([0-9.]+)", line) or re.match(r"^load_average_1min: ([0-9.]+)", line):
            load = m[1]
            for k in pending:
                values[k] = (values[k][0], load)
            pending = []
        elif m := re.match(r"^([a-z0-9_]+): (\S.*)$", line.strip()):
            values[m[1]] = (m[2], load)
            pending.append(m[1])
    return values


def table(files: list[Path]) -> str:
    found: dict[str, tuple[str, str]] = {}  # key -> (value, load)
    for f in files:
        for k, v in parse(f).items():
            found.setdefault(k, v)
    lines = ["| figure | value | target | met | against | load (1 min) |", "|---|---|---|---|---|---|"]
    for key, what, peer, target, higher in ROWS:
        if key not in found:
            lines.append(f"| {what} | not measured | {target} | - | {peer} | - |")
            continue
        v, load = found[key]
        bound = float(target.split()[-1])
        met = (float(v) >= bound) if higher else (float(v) <= bound if "=" in target else float(v) < bound)
        lines.append(f"| {what} (`{key}`) | {v} | {target} | {'yes' if met else 'no'} | {peer} | {load} |")
    extra = [f"{label}: {found[k][0]}" for k, label in CONTEXT.items() if k in found]
    if extra:
        lines.append("")
        lines.append("Checked in the same runs: " + "; ".join(extra) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outputs", nargs="+", type=Path)
    ap.add_argument("--write", type=Path, help="README to update between the perf-table markers")
    args = ap.parse_args()
    text = table(args.outputs)
    if args.write:
        readme = args.write.read_text(encoding="utf-8")
        if BEGIN not in readme or END not in readme:
            raise SystemExit(f"{args.write}: no {BEGIN} ... {END} block to replace")
        head, rest = readme.split(BEGIN, 1)
        args.write.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
