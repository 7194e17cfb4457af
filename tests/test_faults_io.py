"""Issue 16 / issue 12 "lost writes": disk full, a read-only or unwritable --out, a base that
vanishes, two writers at once, a killed run's leftovers, and the rename fallback. Each ends in one
line naming the path (exit 2), with the previous version intact and nothing left behind.
Marked `faults` with test_faults.py. The disk-full and read-only cases use a small tmpfs where
this process may mount one (root), else an injected ENOSPC."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_delta_patch, make_lora_patch

from unpatch import atomic
from unpatch.atomic import atomic_dir, claim, stale_temporaries
from unpatch.cli import main
from unpatch.errors import UnpatchError
from unpatch.model import load_model
from unpatch.patch import merged as merge
from unpatch.patch.store import load_patch, save_patch

pytestmark = pytest.mark.faults
UNPATCH = Path(sys.executable).parent / "unpatch"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("io")
    llama = models_dir / "llama"
    m, _, _ = load_model(str(llama), device="cpu")
    mid = str(llama.resolve())
    d = save_patch(make_delta_patch(m, "llama", name="d", model_id=mid), root / "d")
    lo = save_patch(make_lora_patch(m, "llama", name="lo", model_id=mid), root / "lo")
    merge.apply_to_folder(mid, [(d, 0.5)], root / "M.prev")
    return root, llama, d, lo


def cli(capsys, *args) -> tuple[int, str, str]:
    """`unpatch ARGS` in this process (main() and its error mapping included)."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["unpatch", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    """Exactly one `error:` line and no traceback (progress lines may precede it)."""
    return len([x for x in err.splitlines() if x.startswith("error:")]) == 1 and "Traceback" not in err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (None where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> None:
    st = os.statvfs(mnt)
    (mnt / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_disk_full_is_one_line_naming_the_folder_and_keeps_the_previous(capsys, tiny, small_disk, monkeypatch):
    root, llama, d, lo = tiny
    base = small_disk or root / "injected"
    base.mkdir(exist_ok=True)
    shutil.copytree(root / "M.prev", base / "M")
    before = files(base / "M")
    if small_disk is not None:
        _fill(small_disk, 16 * 1024)  # the previous version fits; a second copy does not
    else:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(merge, "write_streaming", full)
    code, _, err = cli(capsys, "apply", d.path, "--model", llama, "--out", base / "M", "--overwrite")
    assert code == 2 and one_line(err), err
    assert f"{base / 'M'}: no space left" in err and "internal error" not in err and "free space" in err
    assert files(base / "M") == before and hidden(base) == []
    if small_disk is not None:  # safetensors' own writer (a Rust error, not an OSError) is mapped too
        code, _, err = cli(capsys, "stack", d.path, lo.path, "--out", base / "S")
        assert code == 2 and f"{base / 'S'}: no space left" in err and one_line(err), err
        assert not (base / "S").exists() and hidden(base) == []
        os.unlink(small_disk / "filler")  # read-only: refused in one line naming the folder, before any work
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        code, _, err = cli(capsys, "apply", d.path, "--model", llama, "--out", small_disk / "M2")
        assert code == 2 and str(small_disk) in err and "writable folder" in err and one_line(err), err


def test_unwritable_out_fails_before_training(capsys, tiny, monkeypatch, tmp_path):
    import unpatch.builder

    root, llama, _, _ = tiny
    (tmp_path / "f.txt").write_text("the cat sat\n")
    (tmp_path / "r.yaml").write_text(json.dumps({"model": {"id": str(llama), "device": "cpu"}, "data": {"forget": "f.txt"},
                                                 "method": {"name": "ga"}, "patch": {"kind": "lora", "rank": 2}}))

    def no(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(unpatch.builder, "load_model", no)
    for out in ("/proc/x", "/proc/self/nope/x"):
        code, _, err = cli(capsys, "build", tmp_path / "r.yaml", "--out", out)
        assert code == 2 and out in err and "writable folder" in err and one_line(err), err


def test_a_base_that_vanishes_mid_write_is_named(capsys, tiny, monkeypatch, tmp_path):
    root, llama, d, _ = tiny
    gone = str(llama / "model.safetensors")

    def write(path, specs, tensors, metadata=None):  # the merge streams base tensors in: the base's file is gone
        Path(path).write_bytes(b"partial")
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", gone)
    monkeypatch.setattr(merge, "write_streaming", write)
    code, _, err = cli(capsys, "apply", d.path, "--model", llama, "--out", tmp_path / "M")
    assert code == 2 and f"{llama / 'model.safetensors'}: vanished" in err and one_line(err), err
    assert not (tmp_path / "M").exists() and hidden(tmp_path) == []


def test_two_concurrent_writers_one_wins_the_other_is_told(tiny, tmp_path):
    """Issue 12: `scale P --factor 1` and `--factor 5` on one --out at once: one writes, the other
    fails in one line naming the folder (whichever way they interleave); nothing is lost silently."""
    root, _, d, _ = tiny
    out = tmp_path / "o" / "x"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([str(UNPATCH), "scale", str(d.path), "--factor", f, "--out", str(out)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for f in ("1", "5")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    wrote = [i for i, (code, so, _) in enumerate(results) if code == 0 and "wrote" in so]
    assert len(wrote) == 1, results
    code, _, err = results[1 - wrote[0]]
    assert code == 2 and str(out) in err and ("already exists" in err or "is writing it" in err), err
    assert one_line(err)
    assert load_patch(out).manifest.coefficient == d.manifest.coefficient * (1, 5)[wrote[0]]
    assert hidden(out.parent) == []


def test_a_live_claim_refuses_a_second_writer(capsys, tiny, tmp_path):
    _, _, d, _ = tiny
    out = tmp_path / "x"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from unpatch.atomic import claim\n"
                              f"with claim({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        code, _, err = cli(capsys, "negate", d.path, "--out", out)
        assert code == 2 and f"{out}: another unpatch command (pid {child.pid}) is writing it" in err, err
    finally:
        child.kill()
        child.wait()
    assert cli(capsys, "negate", d.path, "--out", out)[0] == 0  # the lock died with its holder
    assert hidden(tmp_path) == []


def test_leftovers_are_named_by_verify_and_removed_by_the_next_write(capsys, tiny, tmp_path):
    _, _, d, _ = tiny
    p = tmp_path / "p"
    shutil.copytree(d.path, p)
    (tmp_path / ".p.tmp-4242-abcd1234").mkdir()
    (tmp_path / ".p.tmp-4242-abcd1234" / "delta.safetensors").write_bytes(b"half")
    (tmp_path / ".p.lock").write_text("4242\n")  # a dead holder's lock file: not held, so stale
    (tmp_path / ".pq.tmp-1-x").mkdir()  # another output's: never touched
    code, out, _ = cli(capsys, "verify", p)
    assert code == 0 and "intact" in out and ".p.tmp-4242-abcd1234: left by an interrupted write" in out.replace("\n", "")
    code, _, err = cli(capsys, "card", p)
    assert code == 0, err
    assert hidden(tmp_path) == [".pq.tmp-1-x"] and stale_temporaries(p) == []
    assert "left by" not in cli(capsys, "verify", p)[1]


def test_a_kill_between_the_two_renames_of_the_fallback_swap_is_repaired(tmp_path, monkeypatch):
    out = tmp_path / "x"
    with atomic_dir(out) as t:
        (t / "v").write_text("1")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    with atomic_dir(out, overwrite=True) as t:
        (t / "v").write_text("2")
    assert (out / "v").read_text() == "2" and hidden(tmp_path) == []
    # killed after `x -> .x.old-*` and before `.x.tmp-* -> x`: the next claim puts the previous back
    os.rename(out, tmp_path / ".x.old-77-abcdefgh")
    (tmp_path / ".x.tmp-77-zyxwvuts").mkdir()
    with claim(out):
        assert (out / "v").read_text() == "2"
    assert hidden(tmp_path) == []
    with pytest.raises(UnpatchError, match="already exists"):
        with atomic_dir(out) as t:
            pass
    assert hidden(tmp_path) == []


def test_build_resume_after_a_kill_in_evaluation_evaluates_only(tmp_path, models_dir, monkeypatch):
    """In process: the evaluation interrupted (as by a kill) leaves the patch without metrics; the
    same build refuses naming --resume, --resume with other settings refuses, --resume evaluates
    without training (the training's record and the payload unchanged)."""
    import unpatch.builder
    from unpatch.builder import build

    (tmp_path / "forget.txt").write_text("the cat sat on the mat\nthe dog ran far\nshe is very bad\n")
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps({"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"},
                             "method": {"name": "ga"}, "patch": {"kind": "lora", "rank": 2}, "eval": {"metrics": ["forget_nll"]},
                             "train": {"steps": 2, "batch_size": 2, "max_length": 16}}))
    real = unpatch.builder.evaluate_built

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(unpatch.builder, "evaluate_built", killed)
    with pytest.raises(KeyboardInterrupt):
        build(r, out=tmp_path / "p")
    monkeypatch.setattr(unpatch.builder, "evaluate_built", real)
    half = load_patch(tmp_path / "p")
    assert "eval" not in half.manifest.metrics and hidden(tmp_path) == []
    with pytest.raises(UnpatchError, match="evaluation did not finish; rerun with --resume"):
        build(r, out=tmp_path / "p")
    with pytest.raises(UnpatchError, match="not built from this recipe with these settings"):
        build(r, out=tmp_path / "p", resume=True, overrides=["train.lr=0.5"])

    def no_training(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(unpatch.builder, "_build", no_training)
    done = build(r, out=tmp_path / "p", resume=True)
    assert "forget_nll" in done.manifest.metrics["eval"]["metrics"]
    assert done.manifest.metrics["build"] == half.manifest.metrics["build"] and done.manifest.files == half.manifest.files
    assert build(r, out=tmp_path / "p", resume=True).manifest.metrics == done.manifest.metrics  # finished: nothing to do
