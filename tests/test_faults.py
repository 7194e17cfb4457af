"""Issue 16: kill -9 at seeded random moments of every writing command, then rerun it.

For build (training, write and evaluation phases), apply --out, revert --out, stack, sweep and
card, each command is run once uninterrupted (the reference), then killed >= 5 times: at exact
filesystem steps of its write path (a real SIGKILL the child sends itself, see fault_zygote.py)
drawn at random with a fixed seed, and at random wall-clock moments. After each kill:
- --out is absent, the previous complete version, or the new complete version;
- the same command (build: with --resume) finishes and gives the reference's bytes (a build
  killed during its evaluation is evaluated, not trained again), or, when the kill came after
  the output was complete, refuses in one line naming it;
- nothing is left beside --out: no temporary, no lock, no checkpoint.
Commands run in children forked from one process that imported torch once (fault_zygote.py).
Marked `faults` (`make test-fast` skips it)."""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import FORGET, make_delta_patch, make_lora_patch, write_data

from unpatch.model import load_model
from unpatch.patch.store import load_patch, save_patch

pytestmark = pytest.mark.faults
HERE = Path(__file__).resolve().parent
KILLS = 5  # kills at random write steps, per command (build: per phase)
TIME_KILLS = 2  # and at random wall-clock moments, per command
PAYLOAD = (".safetensors", "adapter_config.json")


class Zygote:
    """The fork server: run(argv) -> (exit code, signal, stderr)."""

    def __init__(self, cwd: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fault_zygote.py")], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.cwd, self.n = cwd, 0
        assert "ready" in self._read(300)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the fault zygote stopped answering"
        line = self.proc.stdout.readline()
        assert line, "the fault zygote died"
        return json.loads(line)

    def run(self, argv, out: Path | None = None, die_at: int | None = None, kill_after: float | None = None, log: Path | None = None):
        self.n += 1
        err = self.cwd / f"run{self.n}.err"
        req = {"argv": [str(a) for a in argv], "cwd": str(self.cwd), "stdout": str(self.cwd / f"run{self.n}.out"),
               "stderr": str(err), "out": str(out) if out else None, "die_at": die_at, "log": str(log) if log else None}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid, t0 = self._read(60)["pid"], time.monotonic()
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended (and was reaped) first
                pass
        done = self._read(600)
        return done["code"], done["signal"], err.read_text(), time.monotonic() - t0

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _strip(obj):
    if isinstance(obj, dict):
        # wall-clock stamps (created, *seconds): the only bytes two identical runs may differ in
        return {k: _strip(v) for k, v in obj.items() if k != "created" and not k.endswith("seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def state(out: Path) -> dict | None:
    """What a reader sees at `out`: None, or each file's bytes (JSON and card without wall-clock stamps)."""
    if not out.exists():
        return None
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(f.relative_to(out))
        if f.name == "README.md":  # the card prints the stamps too
            text = re.sub(r"\d{4}-\d\d-\d\dT[\d:+.-]+", "<when>", f.read_text())
            files[rel] = re.sub(r"\b[\d.]+ s\b", "<s> s", text).encode()
        elif f.suffix == ".json":
            files[rel] = json.dumps(_strip(json.loads(f.read_text())), sort_keys=True).encode()
        else:
            files[rel] = f.read_bytes()
    return files


def _diff(a: dict | None, b: dict | None) -> str:
    """Which files (and, in JSON, which top-level keys) differ: for the failure message."""
    if a is None or b is None:
        return f"{'absent' if a is None else 'present'} vs {'absent' if b is None else 'present'}"
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            try:
                out += [f"{k}: {d}" for d in _leaves(json.loads(a[k]), json.loads(b[k]))]
            except (KeyError, ValueError):
                out.append(k)
    return "; ".join(out)


def _leaves(a, b, at: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for x in sorted(set(a) | set(b)) for d in _leaves(a.get(x), b.get(x), f"{at}.{x}")]
    return [] if a == b else [f"{at}: {str(a)[:200]} != {str(b)[:200]}"]


def payload(s: dict | None) -> dict:
    return {k: v for k, v in (s or {}).items() if k.endswith(PAYLOAD)}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") or p.name == f"{out.name}.ckpt")


@dataclass
class Job:
    name: str
    argv: list
    out: Path
    prepare: object  # () -> None: put the state before the command back
    rerun: list | None = None  # default: argv
    refuse_when_done: bool = False  # without --overwrite, a rerun after a finished write says "already exists"
    kills: list = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("faults")
    z = Zygote(root)
    llama, gpt2 = models_dir / "llama", models_dir / "gpt2"
    crows, text = write_data(root)
    (root / "forget.txt").write_text("\n".join(FORGET) + "\n")
    recipe = {"model": {"id": str(llama), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
              "patch": {"kind": "lora", "rank": 4}, "eval": {"metrics": ["forget_nll"]},
              "train": {"steps": 12, "lr": 0.05, "batch_size": 4, "max_length": 16, "checkpoint_every": 2}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    m, _, _ = load_model(str(llama), device="cpu")
    mid = str(llama.resolve())
    d = save_patch(make_delta_patch(m, "llama", name="d", model_id=mid), root / "d")
    lo = save_patch(make_lora_patch(m, "llama", name="lo", model_id=mid), root / "lo")
    g, _, _ = load_model(str(gpt2), device="cpu")
    gid = str(gpt2.resolve())
    pristine = {n: save_patch(make_delta_patch(g, "gpt2", name=n, model_id=gid), root / f"{n}.orig") for n in ("sw", "cd")}
    (root / "cd.orig" / "audit.json").write_text(json.dumps({"int8": {"forget_nll": 2.5}}))  # the card then changes
    assert z.run(["apply", d.path, lo.path, "--model", llama, "--out", root / "M0"])[0] == 0  # what revert takes apart
    assert z.run(["apply", d.path, "--model", llama, "--scale", "0.5", "--out", root / "M.prev"])[0] == 0

    def fresh(out):
        return lambda: shutil.rmtree(out, ignore_errors=True)

    def copy_of(src, out):
        def prepare():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(src, out)
        return prepare

    opts = ["-O", f"crows_pairs.source={crows}", "-O", f"perplexity.source={text}"]
    jobs = {
        "build": Job("build", ["build", "r.yaml", "--out", root / "B"], root / "B", fresh(root / "B"),
                     rerun=["build", "r.yaml", "--out", root / "B", "--resume"]),
        "apply": Job("apply", ["apply", d.path, lo.path, "--model", llama, "--scale", "1", "--scale", "0.5", "--out", root / "M",
                               "--overwrite"], root / "M", copy_of(root / "M.prev", root / "M")),
        "revert": Job("revert", ["revert", root / "M0", "--patch", "lo", "--out", root / "R"], root / "R", fresh(root / "R"),
                      refuse_when_done=True),
        "stack": Job("stack", ["stack", d.path, lo.path, "--coef", "1", "--coef", "-0.5", "--out", root / "S"], root / "S",
                     fresh(root / "S"), refuse_when_done=True),
        "sweep": Job("sweep", ["sweep", root / "sw", "--model", gpt2, "--scales", "0,1", *opts, "--max-ppl-increase", "50%"],
                     root / "sw", copy_of(pristine["sw"].path, root / "sw")),
        "card": Job("card", ["card", root / "cd"], root / "cd", copy_of(pristine["cd"].path, root / "cd")),
    }
    yield z, root, jobs
    z.close()


def _phases(log: Path, out: Path) -> dict[str, list[int]]:
    """Step numbers of a reference build by phase: training (checkpoints), write (the patch's
    temporary folder up to its rename), evaluation (everything after: the card rewrite)."""
    steps = [line.split("\t") for line in log.read_text().splitlines()]
    tmp = f".{out.name}.tmp-"
    first = next(int(n) for n, _, p in steps if tmp in p)
    swap = next(int(n) for n, k, p in steps if int(n) >= first and k in ("rename", "exchange") and tmp in p)
    return {"training": list(range(1, first)), "write": list(range(first, swap + 1)), "evaluation": list(range(swap + 1, len(steps) + 1))}


@pytest.mark.parametrize("name", ["build", "apply", "revert", "stack", "sweep", "card"])
def test_kill_9_anywhere_then_rerun_finishes(world, name):
    z, root, jobs = world
    job: Job = jobs[name]
    rng = random.Random(f"issue16-{name}")
    job.prepare()
    before = state(job.out)
    log = root / f"{name}.ref.log"
    code, _, err, seconds = z.run(job.argv, job.out, log=log)
    assert code == 0, err
    new = state(job.out)
    assert new is not None and new != before and not leftovers(job.out)
    total = len(log.read_text().splitlines())
    if name == "build":
        groups = {ph: rng.sample(steps, min(KILLS, len(steps))) for ph, steps in _phases(log, job.out).items()}
        assert all(len(g) >= 3 for g in groups.values()), {k: len(v) for k, v in groups.items()}
    else:
        groups = {"step": rng.sample(range(1, total + 1), min(KILLS, total))}
    groups["time"] = [rng.uniform(0.05, 0.95) * seconds for _ in range(TIME_KILLS)]

    killed = 0
    for phase, points in groups.items():
        for point in points:
            job.prepare()
            kw = {"kill_after": point} if phase == "time" else {"die_at": point}
            code, sig, err, _ = z.run(job.argv, job.out, **kw)
            where = f"{name}: killed at {phase} {point:.3g}" if phase == "time" else f"{name}: killed before {phase} step {point}/{total}"
            if sig != signal.SIGKILL:  # a time-based kill that came after the end: not a kill
                assert phase == "time" and code == 0, f"{where}: exit {code}, {err[-800:]}"
                continue
            killed += 1
            seen = state(job.out)
            # 1. --out is absent, the previous version, or the new one (a build: its payload, evaluated or not)
            if name == "build":
                assert seen is None or payload(seen) == payload(new), where
                if phase in ("training", "write"):
                    assert seen is None, f"{where}: a patch folder appeared before its write finished"
                if phase == "evaluation":
                    assert seen is not None, where
                if seen is not None:
                    load_patch(job.out)  # whole: every hash in its manifest holds
                built = json.loads((job.out / "unpatch.json").read_text())["metrics"]["build"] if seen else None
            else:
                assert seen in (before, new), f"{where}: --out is neither the previous nor the new version"
            # 2. the same command finishes the job with the reference's bytes
            rlog = root / f"{name}.rerun.log"
            code, _, err, _ = z.run(job.rerun or job.argv, job.out, log=rlog)
            if job.refuse_when_done and seen == new:
                assert code == 2 and "already exists" in err and str(job.out) in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1, where
            else:
                assert code == 0, f"{where}: the rerun failed: {err[-800:]}"
            after = state(job.out)
            assert after == new, f"{where}: the rerun's output differs from an uninterrupted run's: {_diff(after, new)}"
            if name == "build" and seen is not None:  # evaluated, not trained again
                again = json.loads((job.out / "unpatch.json").read_text())["metrics"]
                assert again["build"] == built and "eval" in again, where
                assert not [s for s in rlog.read_text().splitlines() if "B.ckpt" in s and "\tmkdir\t" in s], f"{where}: trained again"
            # 3. nothing left behind
            assert not leftovers(job.out), f"{where}: left {leftovers(job.out)}"
    assert killed >= KILLS, f"{name}: only {killed} kills landed"
