"""End-to-end on the real SmolLM2-135M through the CLI: build -> apply -> revert, both kinds.
Marked `real` (skip locally with `make test-fast`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]
UNPATCH = [sys.executable, "-m", "unpatch"]


def run(*args: str) -> str:
    r = subprocess.run([*UNPATCH, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"unpatch {' '.join(args)} failed:\n{r.stderr[-2000:]}"
    return r.stdout


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_build_apply_revert_is_bit_exact(tmp_path, kind):
    patch, m1, m0, b = (tmp_path / n for n in ("P", "M1", "M0", "B"))
    # the delta build trains two projections only: a dense delta of all seven is 400 MB to write for CI
    sets = ["--set", f"patch.kind={kind}"] + (["--set", "patch.target_modules=[q_proj,v_proj]"] if kind == "delta" else [])
    run("build", "recipes/smoke.yaml", "--out", str(patch), "--no-eval", *sets)
    run("apply", str(patch), "--model", "smollm2-135m", "--scale", "0.6", "--out", str(m1))
    run("revert", str(m1), "--out", str(m0))
    run("apply", str(patch), "--model", "smollm2-135m", "--scale", "0", "--out", str(b))

    reverted, base, merged = tensors(m0), tensors(b), tensors(m1)
    assert reverted.keys() == base.keys()
    for name in base:  # compare raw bytes: -0.0 vs 0.0 would count as a difference
        assert torch.equal(reverted[name].view(torch.uint8), base[name].view(torch.uint8)), name
    changed = [n for n in base if not torch.equal(merged[n], base[n])]
    assert changed, "the patch at scale 0.6 changed nothing"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(m1)
    params = dict(model.named_parameters())
    assert torch.equal(params[changed[0]].data, merged[changed[0]])


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    """A build killed with SIGKILL at a random moment after its first checkpoint, then resumed,
    writes the same patch files (sha256 in the manifest) as an uninterrupted build."""
    import json
    import random
    import signal
    import time

    sets = ["--set", "train.steps=16", "--set", "train.checkpoint_every=2", "--no-eval"]
    run("build", "recipes/smoke.yaml", "--out", str(tmp_path / "clean"), *sets)
    out, ckpt = tmp_path / "P", tmp_path / "P.ckpt"
    proc = subprocess.Popen([*UNPATCH, "build", "recipes/smoke.yaml", "--out", str(out), *sets], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0.0, 2.0)  # somewhere in the next 14 steps, possibly mid-checkpoint
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the build ended before the kill (delay {delay:.2f} s)"
    assert not out.exists(), "a killed build left a patch folder"
    run("build", "recipes/smoke.yaml", "--out", str(out), "--resume", *sets)
    clean = json.loads((tmp_path / "clean" / "unpatch.json").read_text())
    resumed = json.loads((out / "unpatch.json").read_text())
    payload = {k: v for k, v in clean["files"].items() if k.endswith(".safetensors")}
    assert payload and {k: resumed["files"][k] for k in payload} == payload, f"killed after {delay:.2f} s"


def test_gender_lora_same_logits_through_peft_and_unpatch_apply(tmp_path):
    """Issue 5: a LoRA patch of recipes/gender.yaml (2 steps here) gives the same logits through
    `PeftModel.from_pretrained` as through unpatch's in-memory apply; merged through peft, the
    weights are the same bits."""
    from peft import PeftModel

    from unpatch.model import load_model
    from unpatch.patch.apply import Applied
    from unpatch.patch.store import load_patch

    run("build", "recipes/gender.yaml", "--out", str(tmp_path / "g"), "--no-eval", "--set", "train.steps=2")
    patch = load_patch(tmp_path / "g")
    ours, tok, _ = load_model("smollm2-135m")
    theirs, _, _ = load_model("smollm2-135m")
    Applied(ours).apply(patch, 1.0)
    peft_model = PeftModel.from_pretrained(theirs, tmp_path / "g").eval()
    ids = tok(["The nurse said that she would be late.", "My neighbour is a mechanic."], return_tensors="pt", padding=True)
    with torch.inference_mode():
        a, b = ours(**ids).logits, peft_model(**ids).logits
    # unmerged LoRA: same function, other rounding (float32, logits ~20: ~1e-5 relative); a wrong
    # scaling or target would be off by > 1e-2
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    merged = peft_model.merge_and_unload()
    mine = dict(ours.named_parameters())
    assert all(torch.equal(p.data, mine[n].data) for n, p in merged.named_parameters())
