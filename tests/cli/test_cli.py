"""The `unpatch` console script end to end on a tiny GPT-2 folder, through subprocesses.

Each subprocess pays ~2.5 s of torch import, so every command is launched once, from one
module fixture, a few at a time; the tests then check what the commands wrote and printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_delta_patch, make_lora_patch, tiny_model
from safetensors.torch import load_file

from unpatch.patch import algebra as ops
from unpatch.patch.store import load_patch, save_patch

ARCH = "gpt2"
UNPATCH = Path(sys.executable).parent / "unpatch"
COMMANDS = ["build", "apply", "revert", "stack", "scale", "negate", "convert", "inspect", "verify"]


def run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="1000")  # no line wrapping of long paths
    return subprocess.run([str(UNPATCH), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.model = tiny_model(ARCH)
        self.folder, self.other = root / "base", root / "other"
        self.model.save_pretrained(self.folder)
        tiny_model(ARCH, seed=1).save_pretrained(self.other)
        self.lora = save_patch(make_lora_patch(self.model, ARCH, seed=1, rank=4, name="lora"), root / "lora")
        self.delta2 = save_patch(make_delta_patch(self.model, ARCH, seed=5, name="delta2"), root / "delta2")
        self.delta = save_patch(make_delta_patch(self.model, ARCH, name="delta"), root / "delta")
        self.patch = {"lora": self.lora, "delta": self.delta}
        r = root
        # LoRA commands import peft (~4 s of CPU each, against ~1.5 s): only where the kind matters.
        # The LoRA algebra (rank stacking, peft equivalence) is tested in process in test_algebra.py.
        jobs = {  # slow jobs first
            "roundtrip-lora": [("apply", self.lora.path, "--model", self.folder, "--scale", "0.6", "--out", r / "M1-lora"),
                               ("revert", r / "M1-lora", "--out", r / "M0-lora")],
            "zero-lora": [("apply", self.lora.path, "--model", self.folder, "--scale", "0", "--out", r / "B-lora")],
            "convert-delta": [("convert", self.lora.path, "--to", "delta", "--out", r / "CD")],
            "convert-lora": [("convert", self.delta.path, "--to", "lora", "--rank", "4", "--model", self.folder, "--out", r / "CL")],
            "roundtrip-delta": [("apply", self.delta.path, "--model", self.folder, "--scale", "0.6", "--out", r / "M1-delta"),
                                ("revert", r / "M1-delta", "--out", r / "M0-delta")],
            "zero-delta": [("apply", self.delta.path, "--model", self.folder, "--scale", "0", "--out", r / "B-delta")],
            "stack": [("stack", self.delta.path, self.delta2.path, "--coef", "1", "--coef", "-0.5", "--out", r / "S")],
            "scale": [("scale", self.lora.path, "--factor", "0.5", "--out", r / "Q")],
            "negate": [("negate", self.delta.path, "--out", r / "N")],
            "inspect": [("inspect", self.delta.path, "--json", "-")],  # --json FILE everywhere; - is stdout
            "verify-ok": [("verify", self.delta.path, "--model", self.folder)],
            "verify-other": [("verify", self.delta.path, "--model", self.other)],
            "help": [("--help",)],
        }
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {k: pool.submit(lambda steps: [run(*s) for s in steps], v) for k, v in jobs.items()}
            self.results = {k: f.result() for k, f in futures.items()}

    def ok(self, job: str, step: int = -1) -> subprocess.CompletedProcess:
        r = self.results[job][step]
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        return r


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("cli"))


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_help_lists_every_command(env):
    out = env.ok("help").stdout
    for c in COMMANDS:
        assert re.search(rf"^\W*{c}\s", out, re.M), f"{c} missing from --help"


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_apply_revert_equals_apply_at_scale_zero(env, kind):
    env.ok(f"roundtrip-{kind}", 0)
    assert "bit-exact" in env.ok(f"roundtrip-{kind}", 1).stdout and "verified" in env.ok(f"roundtrip-{kind}", 1).stdout
    env.ok(f"zero-{kind}")
    m0 = load_file(env.root / f"M0-{kind}" / "model.safetensors")
    b = load_file(env.root / f"B-{kind}" / "model.safetensors")
    m1 = load_file(env.root / f"M1-{kind}" / "model.safetensors")
    base = load_file(env.folder / "model.safetensors")
    assert m0.keys() == b.keys() == base.keys()
    assert all(torch.equal(raw(m0[n]), raw(b[n])) and torch.equal(raw(b[n]), raw(base[n])) for n in b)
    touched = set(env.patch[kind].updates())
    assert {n for n in m1 if not torch.equal(raw(m1[n]), raw(b[n]))} == touched
    ledger = json.loads((env.root / f"M1-{kind}" / "unpatch_ledger.json").read_text())
    assert [(e["name"], e["scale"]) for e in ledger["applied"]] == [(kind, 0.6)]
    # the merged folder is the in-process apply's, bit for bit
    from unpatch.patch.apply import Applied

    m = tiny_model(ARCH)
    Applied(m).apply(load_patch(env.patch[kind].path), 0.6)
    assert all(torch.equal(raw(p.data), raw(m1[n])) for n, p in m.named_parameters())


def test_stack(env):
    env.ok("stack")
    s = load_patch(env.root / "S")
    assert s.kind == "delta" and s.name == "S" and s.manifest.coefficient == 1.0
    assert [(e["name"], e["coefficient"]) for e in s.manifest.lineage] == [("delta", 1.0), ("delta2", -0.5)]
    u1, u2, us = env.delta.updates(), env.delta2.updates(), s.updates()
    assert us.keys() == u1.keys() == u2.keys()
    for n in us:
        assert torch.allclose(us[n].dense(), u1[n].dense() - 0.5 * u2[n].dense(), atol=1e-7, rtol=0), n
    assert s.manifest.base == env.delta.manifest.base


def test_scale(env):
    assert "coefficient 0.5" in env.ok("scale").stdout
    q = load_patch(env.root / "Q")
    assert q.manifest.coefficient == 0.5
    assert q.lora_config["lora_alpha"] == env.lora.lora_config["lora_alpha"] * 0.5
    # the tensors are untouched: same payload bytes
    assert q.manifest.files["adapter_model.safetensors"] == env.lora.manifest.files["adapter_model.safetensors"]
    assert q.manifest.lineage[0]["op"] == "scale"


def test_negate(env):
    assert "coefficient -1" in env.ok("negate").stdout
    n = load_patch(env.root / "N")
    assert n.kind == "delta" and n.manifest.coefficient == -1.0
    assert n.manifest.files["delta.safetensors"] == env.delta.manifest.files["delta.safetensors"]
    for name, u in n.updates().items():
        assert torch.equal(u.dense(), -env.delta.updates()[name].dense()), name


def test_convert_to_delta(env):
    env.ok("convert-delta")
    d = load_patch(env.root / "CD")
    assert d.kind == "delta" and set(d.encodings.values()) == {"dense"}
    lu, du = env.lora.updates(), d.updates()
    assert lu.keys() == du.keys()
    assert all(torch.equal(raw(du[n].dense()), raw(lu[n].dense())) for n in lu)


def test_convert_to_lora(env):
    out = env.ok("convert-lora").stdout
    m = re.search(r"relative error\s+([0-9.eE+-]+)", out)
    assert m, out
    lp = load_patch(env.root / "CL")
    assert lp.kind == "lora" and lp.lora_config["r"] == 4 and lp.lora_config["fan_in_fan_out"] is True
    _, rel = ops.delta_to_lora(env.delta, 4, ops.module_types_of(str(env.folder)))
    assert float(m.group(1)) == pytest.approx(rel, rel=1e-3)
    want = env.delta.updates()
    got = lp.updates()
    assert got.keys() == want.keys()
    err2 = sum(float((got[n].dense().double() - want[n].dense().double()).pow(2).sum()) for n in want)
    norm2 = sum(float(want[n].dense().double().pow(2).sum()) for n in want)
    assert (err2 / norm2) ** 0.5 == pytest.approx(rel, rel=1e-4)


def test_inspect_json(env):
    info = json.loads(env.ok("inspect").stdout)
    assert info["name"] == "delta" and info["kind"] == "delta" and info["coefficient"] == 1.0
    assert info["patch_id"] == env.delta.patch_id and info["fingerprint"] == env.delta.manifest.base.fingerprint
    rows = {r["tensor"]: r for r in info["tensors"]}
    assert rows.keys() == set(env.delta.updates())
    for name, u in env.delta.updates().items():
        assert rows[name]["encoding"] == u.encoding
        assert rows[name]["norm"] == pytest.approx(float(u.dense().norm()), rel=1e-5)
    assert info["bytes_on_disk"] == (env.delta.path / "delta.safetensors").stat().st_size


def test_verify(env):
    assert "matches base" in env.ok("verify-ok").stdout
    r = env.results["verify-other"][0]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert env.delta.manifest.base.fingerprint[:16] in lines[0] and str(env.other) in lines[0]
