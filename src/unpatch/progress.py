"""The one progress helper: a rich bar on a terminal, plain timestamped lines at a steady rate
when stderr is not one (CI, SLURM logs, `| cat`), consoles that never wrap paths or JSON in
logs, and third-party progress bars (transformers, datasets, huggingface_hub) silenced.

    with progress.task("eval", total=6, unit="runs") as t:
        t.advance(status="base crows_pairs")

Tasks nest (eval -> scoring batches): on a terminal they share one rich `Progress` (rich allows
one live display at a time); off a terminal one heartbeat thread prints every active task on one
line every UNPATCH_PROGRESS_SECONDS (default 10) seconds, so a log shows life even while one long
forward pass runs, and never floods. Outer tasks also print a start and a done line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any

_lock = threading.RLock()
_active: list[Task] = []  # innermost last
_rich: dict[str, Any] = {}  # {"progress": rich Progress} while a terminal bar is live
_beat: dict[str, Any] = {}  # {"thread", "stop"} while the heartbeat runs


def interval() -> float:
    try:
        return max(0.05, float(os.environ.get("UNPATCH_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def is_terminal() -> bool:
    """Whether progress goes to a terminal (stderr); rich's own test honours FORCE_COLOR / TTY_COMPATIBLE."""
    from rich.console import Console

    return Console(stderr=True).is_terminal


def console(stderr: bool = False):
    """A rich Console for command output. Off a terminal it never soft-wraps text (paths and JSON
    stay on one line in logs) and tables get 200 columns instead of rich's default 80."""
    from rich.console import Console

    c = Console(stderr=stderr, soft_wrap=True)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, soft_wrap=True, width=200)
    return c


def quiet_third_party() -> None:
    """Silence the tqdm bars of transformers ("Loading weights"), datasets and huggingface_hub:
    they would interleave with ours and, off a terminal, fill logs with carriage returns. Set the
    environment variables to 0 to keep them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "huggingface_hub" in sys.modules:  # imported before us: the variable was read already
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Task:
    """One unit of long work. `advance`/`update` are cheap: nothing is printed from them off a
    terminal (the heartbeat does that), and a terminal bar refreshes at rich's own rate."""

    def __init__(self, desc: str, total: float | None, unit: str, completed: float, log: bool):
        self.desc, self.total, self.unit, self.completed, self.log = desc, total, unit, completed, log
        self.status = ""
        self.t0 = time.perf_counter()
        self._rich_id = None

    def advance(self, n: float = 1, status: str | None = None) -> None:
        self.update(self.completed + n, status)

    def update(self, completed: float | None = None, status: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if status is not None:
            self.status = status
        bar = _rich.get("progress")
        if bar is not None and self._rich_id is not None:
            bar.update(self._rich_id, completed=self.completed, status=self.status)

    def line(self) -> str:
        """`desc 3/12 runs (status), 20 s, ~40 s left`: what the heartbeat prints for this task."""
        elapsed = time.perf_counter() - self.t0
        text = self.desc
        if self.total:
            text += f" {self.completed:g}/{self.total:g}" + (f" {self.unit}" if self.unit else "")
        elif self.completed:
            text += f" {self.completed:g}" + (f" {self.unit}" if self.unit else "")
        if self.status:
            text += f" ({self.status})"
        text += f", {_seconds(elapsed)}"
        if self.total and 0 < self.completed < self.total:
            text += f", ~{_seconds(elapsed * (self.total - self.completed) / self.completed)} left"
        return text


def _heartbeat(stop: threading.Event) -> None:
    while not stop.wait(interval()):
        with _lock:
            if _active:
                _emit(" | ".join(t.line() for t in _active))


def _emit(text: str) -> None:
    print(f"{_stamp()} {text}", file=sys.stderr, flush=True)


def _start_rich():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    bar.start()
    return bar


@contextmanager
def task(desc: str, total: float | None = None, *, unit: str = "", completed: float = 0, log: bool = True,
         enabled: bool = True, terminal: bool | None = None):
    """A progress task (see the module docstring). `log=False` for inner, short-lived tasks: off a
    terminal they show only in heartbeat lines. `enabled=False` (other ranks of a distributed run)
    yields a task that shows nothing. `terminal` overrides the stderr test (tests)."""
    t = Task(desc, total, unit, completed, log)
    if not enabled:
        yield t
        return
    tty = is_terminal() if terminal is None else terminal
    with _lock:
        _active.append(t)
        if tty:
            if "progress" not in _rich:
                _rich["progress"] = _start_rich()
            t._rich_id = _rich["progress"].add_task(desc, total=total, completed=completed, status="")
        else:
            if log:
                _emit(f"{desc}: started" + (f" ({total:g} {unit})".replace(" )", ")") if total else ""))
            if "thread" not in _beat:
                stop = threading.Event()
                th = threading.Thread(target=_heartbeat, args=(stop,), name="unpatch-progress", daemon=True)
                _beat.update(thread=th, stop=stop)
                th.start()
    failed = False
    try:
        yield t
    except BaseException:
        failed = True
        raise
    finally:
        with _lock:
            _active.remove(t)
            bar = _rich.get("progress")
            if bar is not None and t._rich_id is not None:
                if t.log and not failed:
                    bar.update(t._rich_id, completed=t.total or t.completed)
                else:
                    bar.remove_task(t._rich_id)  # inner bars vanish when done, as rich's transient ones do
            if not tty and t.log and not failed:  # a failure is reported by its own one-line error
                _emit(f"{desc}: done in {_seconds(time.perf_counter() - t.t0)}" + (f" ({t.status})" if t.status else ""))
            if not _active:
                if bar is not None:
                    bar.stop()
                    _rich.clear()
                if "thread" in _beat:
                    _beat["stop"].set()
                    _beat.clear()


def note(text: str) -> None:
    """A one-off message beside the progress (a result as it arrives): above the bar on a
    terminal, a timestamped line otherwise."""
    bar = _rich.get("progress")
    if bar is not None:
        bar.console.print(text, highlight=False, soft_wrap=True)
    elif is_terminal():
        console(stderr=True).print(text, highlight=False)
    else:
        _emit(text)


def active() -> bool:
    """Whether some task is showing progress now (inner work may then add its own bar)."""
    return bool(_active)


def start(desc: str, total: float | None = None, **kw) -> Task:
    """`task(...)` without a `with` block, for code that starts and stops a bar in different
    places: call `.stop()` on the returned task (exactly once)."""
    cm = task(desc, total, **kw)
    t = cm.__enter__()
    t.stop = lambda: cm.__exit__(None, None, None)  # type: ignore[attr-defined]
    return t
