"""Fork server for tests/test_faults.py: imports torch and unpatch once, then runs each requested
`unpatch` command in a forked child, so a kill costs the command's own work, not a 3 s import.

Protocol (one JSON object per line): the parent writes {"argv", "cwd", "stdout", "stderr",
"out", "die_at", "log"}; this process forks, answers {"pid"} at once and {"pid", "code", "signal"} when
the child ends. In the child, every filesystem write step on the output's paths (open for writing, each write, mkdir,
rename, replace, link, unlink, rmdir, the atomic exchange, safetensors/torch saves) is counted;
with "log" each is appended there as `index<TAB>kind<TAB>path`, and with "die_at": n the child
sends itself SIGKILL just before step n, a real kill -9 at an exact point of the write path.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLUMNS", "1000")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import peft  # noqa: E402,F401
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402,F401
import transformers.models.gpt2.modeling_gpt2  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401

import unpatch.atomic  # noqa: E402
import unpatch.builder  # noqa: E402,F401
import unpatch.cli  # noqa: E402
import unpatch.evals.runner  # noqa: E402,F401
import unpatch.evals.sweep  # noqa: E402,F401
import unpatch.patch.algebra  # noqa: E402,F401
import unpatch.patch.card  # noqa: E402,F401
import unpatch.patch.merged  # noqa: E402,F401

torch.set_num_threads(1)


class _Counter:
    """Counts the steps on the output's own paths (`<scope>/<name>*`, `<scope>/.<name>*`, and the
    relative names rmtree unlinks by): caches other code writes on a first run do not shift them."""

    def __init__(self, die_at: int | None, log, scope: str | None, name: str | None):
        self.n, self.die_at, self.log, self.scope, self.name = 0, die_at, log, scope, name

    def ours(self, path) -> bool:
        p = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else ""
        if self.scope is None or not os.path.isabs(p):
            return True
        rel = os.path.relpath(p, self.scope)
        return not rel.startswith("..") and rel.split(os.sep)[0].lstrip(".").startswith(self.name)

    def tick(self, kind: str, path) -> None:
        if not self.ours(path):
            return
        self.n += 1
        if self.log is not None:
            self.log.write(f"{self.n}\t{kind}\t{path}\n")
            self.log.flush()
        if self.n == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)


class _File:
    """A file opened for writing whose every write() is a step."""

    def __init__(self, f, counter: _Counter, path):
        self._f, self._c, self._path = f, counter, path

    def write(self, data):
        self._c.tick("write", self._path)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _instrument(counter: _Counter) -> None:
    def wrap(owner, name, kind):
        real = getattr(owner, name)

        def step(*args, **kwargs):
            counter.tick(kind, next((a for a in args if isinstance(a, str | os.PathLike)), ""))
            return real(*args, **kwargs)
        setattr(owner, name, step)

    for name in ("replace", "rename", "link", "unlink", "remove", "rmdir", "mkdir"):
        wrap(os, name, name)
    wrap(unpatch.atomic, "_exchange", "exchange")
    wrap(torch, "save", "torch.save")
    real_save = safetensors.torch.save_file
    for mod in [m for k, m in sys.modules.items() if k.startswith("unpatch") and m is not None]:
        if getattr(mod, "save_file", None) is real_save:
            wrap(mod, "save_file", "save_file")
    wrap(safetensors.torch, "save_file", "save_file")
    real_open = io.open

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return f
        counter.tick("open", file)
        return _File(f, counter, file)
    io.open = opener
    import builtins

    builtins.open = opener


def _child(req: dict) -> None:
    os.chdir(req["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    log = open(req["log"], "w") if req.get("log") else None  # noqa: SIM115 - lives as long as the child
    out = req.get("out")
    _instrument(_Counter(req.get("die_at"), log, os.path.dirname(out) if out else None, os.path.basename(out) if out else None))
    sys.argv = ["unpatch", *req["argv"]]
    code = 0
    try:
        unpatch.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - reported as the exit code, like an uncaught error
        print(f"zygote child: {type(e).__name__}: {e}", file=sys.stderr)
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status),
                          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}), flush=True)


if __name__ == "__main__":
    main()
