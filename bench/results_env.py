"""bench/results.py helpers: the perf benches as subprocesses, and the run's environment."""

from __future__ import annotations

import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from unpatch.evals.runner import hardware
from unpatch.patch.format import library_versions

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def perf(s, work: Path) -> dict:
    """Run the bench scripts as subprocesses and keep their `name: value` lines."""
    py, out = sys.executable, {}
    runs = {"apply": [py, "bench/apply.py", "--quick"],
            "eval": [py, "bench/eval.py", "--limit", str(s.eval_limit)],
            "peers": [py, "bench/peers.py", "--work", str(work / "peers")]}
    for key, cmd in runs.items():
        log(f"perf: {' '.join(cmd[1:])}")
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        vals = dict(re.findall(r"^([A-Za-z_][\w.]*): (\S+)", r.stdout, re.M))
        notes = [ln[2:] for ln in r.stdout.splitlines() if ln.startswith("# ")]
        out[key] = {"cmd": " ".join(cmd[1:]), "rc": r.returncode, "values": vals, "notes": notes,
                    "seconds": time.perf_counter() - t0, "cpu_seconds": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                    "stderr": r.stderr.strip().splitlines()[-3:] if r.returncode else []}
        log(f"  rc {r.returncode}, {len(vals)} values in {out[key]['seconds']:.0f} s")
    return out


def environment(s, model) -> dict:
    vers = library_versions()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    return {"versions": vers, "python": platform.python_version(), "machine": hardware(model), "cores": torch.get_num_threads(),
            "commit": commit + ("+dirty" if dirty else ""), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
