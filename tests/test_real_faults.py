"""Issue 16, acceptance 1 on the real SmolLM2-135M: `build recipes/smoke.yaml --out P` killed
5 s after P appears (the evaluation is running), then the same command with --resume: exit 0,
the card has its metrics, the payload bytes equal an uninterrupted build's, and the patch was
evaluated, not trained again. Kept short: the evaluation is perplexity alone. Marked `real`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]
UNPATCH = [sys.executable, "-m", "unpatch"]
EVAL = ["--set", "eval.metrics=[perplexity]"]
SHORT = ["--set", "train.steps=2"]  # the property does not depend on the length of training


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*UNPATCH, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"unpatch {' '.join(args)} failed:\n{r.stderr[-2000:]}"
    return r


def test_build_killed_during_evaluation_resumes_the_evaluation(tmp_path):
    # the uninterrupted reference: the evaluation does not change the payload, so skip it here
    run("build", "recipes/smoke.yaml", "--out", str(tmp_path / "clean"), *SHORT, "--no-eval")
    out = tmp_path / "P"
    proc = subprocess.Popen([*UNPATCH, "build", "recipes/smoke.yaml", "--out", str(out), *SHORT, *EVAL], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not out.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build finished within 5 s of writing the patch; nothing to resume"
    killed = json.loads((out / "unpatch.json").read_text())
    assert "eval" not in killed["metrics"]
    refused = subprocess.run([*UNPATCH, "build", "recipes/smoke.yaml", "--out", str(out), *SHORT, *EVAL], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr  # says exactly what to run

    run("build", "recipes/smoke.yaml", "--out", str(out), *SHORT, *EVAL, "--resume")
    resumed = json.loads((out / "unpatch.json").read_text())
    clean = json.loads((tmp_path / "clean" / "unpatch.json").read_text())
    assert resumed["files"] == clean["files"]  # payload bytes (sha256 of each payload file)
    assert "perplexity" in resumed["metrics"]["eval"]["metrics"] and "perplexity" in (out / "README.md").read_text()
    assert resumed["metrics"]["build"] == killed["metrics"]["build"]  # the training's record untouched: not trained again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P", "clean"]  # no temporaries, no lock, no checkpoint
