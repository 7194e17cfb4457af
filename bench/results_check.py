"""Check a generated RESULTS.md: every markdown table parses, and its key numbers agree with results.json.

    python bench/results_check.py DIR      # DIR holds RESULTS.md + results.json (make results-quick runs it)
Exits 1 with one line naming the file and the failed check; the tests import check_report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?(e[+-]?\d+)?( \*)?$")


class ReportError(Exception):
    pass


def need(ok: bool, what: str) -> None:
    if not ok:
        raise ReportError(what)


def parse_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table: (header cells, rows of cells); ReportError if a table is malformed."""
    tables, block = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in block]
            head, sep, rows = cells[0], cells[1], cells[2:]
            need(all(re.fullmatch(r":?-+:?", c) for c in sep), f"bad separator row: {block[1]}")
            need(len(sep) == len(head) and all(len(r) == len(head) for r in rows), f"ragged table under {block[0]}")
            tables.append((head, rows))
            block = []
    return tables


def table_after(md: str, heading: str) -> tuple[list[str], list[list[str]]]:
    need(heading in md, f"no section {heading!r}")
    return parse_tables(md.split(heading, 1)[1])[0]


def check_report(out: Path) -> None:
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    tables = parse_tables(md)
    need(len(tables) >= 6, f"only {len(tables)} tables")
    if data["mode"] == "quick":
        need("QUICK MODE" in md and "not run" in md, "quick mode does not say what it skipped")
    need("## Protocol" in md and "DEV only" in md and "Seeds:" in md, "the split / selection / seeds protocol is not stated")
    bias = data["bias"]["recipes"]
    if bias:
        head, rows = table_after(md, "### 1a.")
        need(head[:5] == ["recipe", "method", "target", "scale (dev)", "base pct"], "1a: unexpected header")
        for r in rows:
            b = bias[r[0]]
            need(abs(float(r[4]) - b["seeds"][0]["pct"]["base"]) <= 0.005, f"1a: {r[0]}'s base pct differs from results.json")
            need(re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\]", r[5]) is not None, f"1a: {r[0]} has no interval: {r[5]!r}")
        head, rows = table_after(md, "### 1c.")
        need({r[0] for r in rows} == set(bias), "1c: recipes differ from results.json")
        need((out / "method_comparison.png").stat().st_size > 1000 or not any(b["focus"] == "gender" for b in bias.values()),
             "method_comparison.png missing or empty")
    head, rows = table_after(md, "## 0. Targets")
    need(bool(rows) and all(r[2] in ("reached", "NOT reached") for r in rows), "0: a verdict is neither reached nor NOT reached")
    if data["forgetting"]:
        head, rows = table_after(md, "### 4a.")
        need(rows[0][0] == "base" and 0 <= float(rows[0][1]) <= 1, "4a: base harmful rate is not a fraction")


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "docs")
    try:
        check_report(out)
    except (ReportError, OSError, ValueError, KeyError, IndexError) as e:
        sys.exit(f"{out / 'RESULTS.md'}: check failed: {e}")
    print(f"{out / 'RESULTS.md'}: tables parse and agree with results.json")


if __name__ == "__main__":
    main(sys.argv[1:])
