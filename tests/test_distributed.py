"""A build under `torchrun --nproc_per_node 2` (two CPU processes, gloo) equals the one-process
build, and the rules that share a step between ranks (unpatch.distributed) as pure functions.

Tolerances. "rows" mode (ga: each rank takes half the rows of every batch) changes the shapes of
the matmuls and the order in which the gradient is summed (per-rank sums, then a fp32 all-reduce),
so gradients differ from the one-process ones by fp32 rounding (~1e-7 relative). AdamW divides by
sqrt(v) + 1e-8, which amplifies that for gradient entries near 1e-8, so after 4 steps at lr 0.05 the
patches differ by ~1e-5 relative (Frobenius; measured 1.2e-5 here). 1e-4 leaves margin and is still
four orders below what a different seed gives (~1). "micro" mode (ranks take whole micro-batches)
is exact on 2 ranks: each micro-batch is computed as on one process, the loss scales are powers of
two, and a sum of two terms has one rounding whichever order: the patch is bit-identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FORGET, method_recipe

from unpatch.builder import build
from unpatch.distributed import Piece, schedule, splittable, take
from unpatch.errors import UnpatchError
from unpatch.patch.store import load_patch


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("UNPATCH_DEBUG", None)
    # --standalone: a private rendezvous on a free port (other test runs may share the machine)
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "unpatch", "build", *args, "--no-eval"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def relative_difference(a, b) -> float:
    assert sorted(a.tensors) == sorted(b.tensors)
    num = sum(float((a.tensors[k].float() - b.tensors[k].float()).pow(2).sum()) for k in a.tensors)
    den = sum(float(a.tensors[k].float().pow(2).sum()) for k in a.tensors)
    return (num / den) ** 0.5


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_build_matches_one_process(tmp_path, models_dir):
    (tmp_path / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": "lora", "rank": 4}, "train": {"steps": 4, "lr": 0.05, "batch_size": 4, "max_length": 16}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = torchrun("r.yaml", "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stdout + run.stderr
    assert "rank 0/2" in log and "rank 1/2" in log and "world size 2" in log and "gloo" in log  # really two ranks
    assert log.count("wrote ") == 1  # rank 0 writes and reports; rank 1 waits for it
    assert not list(tmp_path.glob(".two.tmp-*")) and not (tmp_path / "two.ckpt").exists()
    one = build(tmp_path / "r.yaml", out=tmp_path / "one", run_eval=False)
    two = load_patch(tmp_path / "two")
    assert two.manifest.base.fingerprint == one.manifest.base.fingerprint
    assert two.manifest.notes == one.manifest.notes  # the all-reduced metrics: same loss history to 4 digits
    assert relative_difference(one, two) < 1e-4
    other = build(tmp_path / "r.yaml", out=tmp_path / "seed1", overrides=["train.seed=1"], run_eval=False)
    assert relative_difference(one, other) > 0.1  # the tolerance is far below a real difference


def test_two_process_opaque_batches_take_turns_exactly(tmp_path, models_dir):
    """masked_ga on pairs: its batch carries the paired sentences, so ranks take whole micro-batches."""
    r = method_recipe(tmp_path, models_dir, "masked_ga", "lora", steps=2, grad_accum=2)
    run = torchrun(str(r), "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    one = build(r, out=tmp_path / "one", run_eval=False)
    two = load_patch(tmp_path / "two")
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)


def test_schedule_rows_and_micro_batches():
    # rows: each rank a contiguous slice of every micro-batch; chunks cut it further
    assert schedule(2, 2, 1, rows=4, can_split=True) == [Piece(0, 1, 2), Piece(1, 1, 2)]
    assert schedule(1, 2, 0, rows=8, can_split=True, chunks=2) == [Piece(0, 0, 4), Piece(0, 1, 4)]
    assert schedule(1, 2, 0, rows=3, can_split=True, chunks=4) == [Piece(0, 0, 2)]  # at least one row a piece
    # one process: the classic loop, or memory chunks
    assert schedule(3, 1, 0, rows=4, can_split=False, chunks=4) == [Piece(0), Piece(1), Piece(2)]
    assert schedule(1, 1, 0, rows=4, can_split=True, chunks=2) == [Piece(0, 0, 2), Piece(0, 1, 2)]
    # opaque batches: whole micro-batches in turn, or a one-line refusal
    assert schedule(4, 2, 1, rows=1, can_split=False) == [Piece(1), Piece(3)]
    with pytest.raises(UnpatchError, match=r"^train.grad_accum: method pcgu's batches cannot be split by rows.*multiple of 2"):
        schedule(1, 2, 0, rows=1, can_split=False, method="pcgu")
    with pytest.raises(UnpatchError, match="train.batch_size: 1 rows cannot be shared by 2 processes"):
        schedule(1, 2, 0, rows=1, can_split=True)


def test_pieces_weighted_by_tokens_give_the_batch_mean():
    """sum(share * piece's token mean) == the whole batch's token mean, for ragged rows."""
    ids = torch.arange(5 * 6).reshape(5, 6).double()  # float64: the check is of the weights, not of rounding
    labels = ids.clone().long()
    for row, n in enumerate([6, 2, 5, 3, 4]):  # real lengths; padding is -100
        labels[row, n:] = -100
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    assert splittable(batch) and not splittable({**batch, "less": batch}) and not splittable([batch])

    def token_mean(b):  # what a causal-LM loss averages: labels[:, 1:] that are not -100
        lab = b["labels"][:, 1:]
        return b["input_ids"][:, 1:][lab != -100].mean()

    for parts in (2, 3, 5):
        pieces = [take(batch, Piece(0, k, parts)) for k in range(parts)]
        assert sum(p["input_ids"].shape[0] for p, _ in pieces) == 5
        assert sum(s for _, s in pieces) == pytest.approx(1.0)
        assert sum(s * float(token_mean(p)) for p, s in pieces) == pytest.approx(float(token_mean(batch)), rel=1e-12)
    assert take(batch, Piece(0))[0] is batch
