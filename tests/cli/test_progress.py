"""unpatch.progress: timestamped heartbeat lines at a steady rate off a terminal, nested tasks on
a terminal sharing one rich display, third-party bars off; and the CLI's build / eval / sweep
showing progress when piped (no terminal), with no transformers "Loading weights" noise."""

from __future__ import annotations

import re
import time

import yaml
from conftest import FORGET

from unpatch import progress
from unpatch.methods import packed

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def test_heartbeat_lines_are_timestamped_and_steady(monkeypatch, capsys):
    monkeypatch.setenv("UNPATCH_PROGRESS_SECONDS", "0.05")
    with progress.task("outer", 4, unit="things", terminal=False) as t:
        with progress.task("inner", 10, unit="items", log=False, terminal=False) as inner:
            inner.advance(5)
            t.advance(status="half")
            time.sleep(0.4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("outer: started (4 things)") and lines[-1].endswith("outer: done in 0 s (half)")
    beats = [ln for ln in lines if "outer 1/4 things (half)" in ln]
    assert len(beats) >= 3, lines  # ~8 expected in 0.4 s at 0.05 s; a loaded machine still gives 3
    assert all(STAMP.match(ln) for ln in lines), lines
    assert all("inner 5/10 items" in ln for ln in beats)  # the inner task rides on the outer's line
    assert not any("inner: started" in ln for ln in lines)  # log=False: no start/done lines of its own
    assert not progress.active()


def test_heartbeat_stops_and_failure_is_reported(monkeypatch, capsys):
    monkeypatch.setenv("UNPATCH_PROGRESS_SECONDS", "0.05")
    try:
        with progress.task("job", terminal=False):
            raise KeyError("x")
    except KeyError:
        pass
    time.sleep(0.2)  # a leaked heartbeat thread would print here
    err = capsys.readouterr().err
    assert err.strip().endswith("job: started") and "job 0" not in err  # no "done" line; the error says what happened


def test_nested_terminal_bars_share_one_display():
    # rich allows one live display at a time: a second Progress inside the first would raise LiveError
    with progress.task("outer", 2, terminal=True) as t:
        with progress.task("inner", 3, log=False, terminal=True) as inner:
            inner.advance(3)
        t.advance(2)
    assert not progress.active()


def test_disabled_task_shows_nothing(capsys):
    with progress.task("rank 1", 3, enabled=False, terminal=False) as t:
        t.advance()
    assert capsys.readouterr().err == "" and not progress.active()


def test_console_off_a_terminal_does_not_wrap_paths(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    path = "/very/long/" + "x" * 150 + "/patch"
    progress.console().print(f"wrote {path}")
    assert f"wrote {path}" in capsys.readouterr().out  # one line, never cut at 80 columns


def test_piped_build_shows_training_and_evaluation_progress(tmp_path, models_dir, monkeypatch, capfd):
    (tmp_path / "forget.txt").write_text("\n".join(FORGET) + "\n")
    (tmp_path / "crows.csv").write_text("sent_more,sent_less,bias_type\n" + "the cat is bad,the dog is bad,race-color\n" * 4)
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": "lora", "rank": 4}, "train": {"steps": 6, "lr": 0.05, "batch_size": 4, "max_length": 16},
           "eval": {"metrics": ["crows_pairs", "forget_nll"], "options": {"crows_pairs": {"source": "crows.csv"}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    # in process (a subprocess costs ~10 s of imports): what `unpatch build ... 2>&1 | cat` runs, stderr not a terminal
    from unpatch.cli import app

    monkeypatch.setenv("UNPATCH_PROGRESS_SECONDS", "0.01")  # progress raises it to its floor, 0.05 s
    monkeypatch.delenv("COLUMNS", raising=False)
    progress.quiet_third_party()
    monkeypatch.setattr("unpatch.cli.recipes.console", progress.console())  # the console main() builds, under capture
    real_nll = packed.token_nll  # 6 tiny steps take a few ms: make each last 30 ms, so training outlives a heartbeat
    monkeypatch.setattr(packed, "token_nll", lambda m, b: (time.sleep(0.03), real_nll(m, b))[1])
    app(["build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "p")], prog_name="unpatch", standalone_mode=False)
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert any(STAMP.match(ln) and "steps" in ln and "started" in ln for ln in lines), err
    assert any(STAMP.match(ln) and "loss" in ln and "steps" in ln for ln in lines), err  # heartbeat lines during training
    assert any(STAMP.match(ln) and "build: evaluating base vs patch: done" in ln for ln in lines), err
    assert "Loading weights" not in err and "\r" not in err  # no tqdm from transformers
    assert any(f"wrote {tmp_path / 'p'} " in ln for ln in out.splitlines()), out  # the path on one line
