"""CLI commands for measuring patches: eval, sweep, card, metrics (thin over evaluate/sweep/card)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .. import checks
from ..errors import UnpatchError
from .options import AllowPickle, Device, Dtype, Force, ModelOpt, _load, console

Metrics = Annotated[str | None, typer.Option("--metrics", help="Comma-separated metric names (default: crows_pairs,perplexity; see `unpatch metrics`).")]
MetricOpt = Annotated[list[str] | None, typer.Option("--metric-opt", "-O", help="Metric option metric.key=value, e.g. crows_pairs.limit=100 or perplexity.max_tokens=null (repeatable).")]
Limit = Annotated[int | None, typer.Option("--limit", help="Shorthand: limit=N for every selected metric that takes a limit.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the full results as JSON to this file (- for stdout).")]
err = Console(stderr=True)

app = typer.Typer()  # assembled into the root app by cli/__init__.py


def _progress(variant, metric: str, values: dict[str, Any]) -> None:
    from ..progress import note

    key, value = next(iter(values.items()))
    note(f"{variant.label}: {metric} {key} = {value:.4g}" if isinstance(value, float) else f"{variant.label}: {metric} done")


def _write_json(path: Path, results: dict[str, Any]) -> None:
    """`--json FILE` writes the full results to FILE in every command; `--json -` to stdout, and
    then the human-readable table goes to stderr so stdout stays one JSON document."""
    from ..atomic import atomic_write_text

    if str(path) == "-":
        print(json.dumps(results, indent=2), flush=True)
        console.file = sys.stderr
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


@app.command("eval")
def eval_cmd(
    patch: Annotated[list[str] | None, typer.Option("--patch", "-p", help="Patch folder or Hub id (repeatable).")] = None,
    scale: Annotated[list[float] | None, typer.Option("--scale", "-s", help="Scale(s); every patch is evaluated at every scale (default 1).")] = None,
    model: ModelOpt = None,
    metrics: Metrics = None,
    metric_opt: MetricOpt = None,
    limit: Limit = None,
    json_out: JsonOut = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    force: Force = False,
    allow_pickle: AllowPickle = False,
):
    """Compare the base with each patch at each scale, on one model load (patches applied and reverted in place)."""
    from ..evals.runner import evaluate, parse_metric_options, parse_metrics, variants_for
    from ..model import load_model
    from ..verdicts import table_rows

    scale = checks.scales(scale, "--scale")
    checks.count(limit, "--limit", lo=1)
    patches = [_load(p, allow_pickle) for p in patch or []]
    if model is None and not patches:
        raise UnpatchError("eval: give --model, or at least one --patch (its base is then the model)")
    names = parse_metrics(metrics)
    options = parse_metric_options(metric_opt or [], names, limit)  # bad options fail before the model loads
    m, tok, ref = load_model(model or patches[0].manifest.base.id, device=device, dtype=dtype, allow_pickle=allow_pickle)
    results = evaluate(m, tok, variants_for(patches, scale or [1.0]), names, options, force=force, on_result=_progress)
    results["model"] = ref.id
    if json_out:
        _write_json(json_out, results)
    _print_table(results, title=f"{ref.id}: base vs patched ({results['seconds']:.1f} s on {results['hardware']})", rows=table_rows(results))
    if json_out and str(json_out) != "-":
        console.print(f"wrote {json_out}")


def _print_table(results: dict[str, Any], title: str, rows: list[dict[str, Any]]) -> None:
    from ..verdicts import fmt

    metrics = list(results["metrics"])
    table = Table("variant", title=title)
    for r in rows[:: len(results["variants"])]:  # the base row of each metric names its headline
        table.add_column(f"{r['metric']}\n{r['key']} ({r['ideal']})", justify="right")
        table.add_column("95 % interval", justify="right")
        table.add_column("change vs base (paired test)", justify="right")
    colour = {"better": "green", "worse": "red"}  # anything else (not significant, untested) is dim
    for i, v in enumerate(results["variants"]):
        cells = [v["label"]]
        for j in range(len(metrics)):
            r = rows[j * len(results["variants"]) + i]
            cells.append(fmt(r["value"]))
            cells.append(r.get("interval") or "-")
            word = (r["verdict"] or "").split(" (")[0]
            cells.append("" if r["change"] is None else f"[{colour.get(word, 'dim')}]{fmt(r['change'], sign=True)} {r['verdict']}[/]")
        table.add_row(*cells)
    console.print(table)


@app.command()
def sweep(
    patch: Annotated[str, typer.Argument(help="Patch folder (the sweep is written into it).")],
    scales: Annotated[str, typer.Option("--scales", help="start:stop:step (stop included) or a list a,b,c.")] = "0:1.5:0.25",
    model: ModelOpt = None,
    metrics: Metrics = None,
    metric_opt: MetricOpt = None,
    limit: Limit = None,
    max_ppl_increase: Annotated[str | None, typer.Option("--max-ppl-increase", help="Largest allowed perplexity rise over the base: 2% or 0.02 (default 2% when perplexity is measured).")] = None,
    json_out: JsonOut = None,
    no_write: Annotated[bool, typer.Option("--no-write", help="Only print; leave the patch folder as it is.")] = False,
    device: Device = "auto",
    dtype: Dtype = "float32",
    force: Force = False,
):
    """Dose-response: every metric at every scale (one base load), a plot, and the recommended scale."""
    from ..evals.runner import parse_metric_options, parse_metrics
    from ..evals.sweep import PPL, parse_fraction, parse_scales, write_sweep
    from ..evals.sweep import sweep as run_sweep
    from ..model import load_model

    grid = parse_scales(scales)  # finite and in range, before the patch or model is read
    checks.count(limit, "--limit", lo=1)
    p = _load(patch)
    names = parse_metrics(metrics)
    options = parse_metric_options(metric_opt or [], names, limit)
    limit_frac = parse_fraction(max_ppl_increase) if max_ppl_increase is not None else (0.02 if PPL in names else None)
    m, tok, ref = load_model(model or p.manifest.base.id, device=device, dtype=dtype)
    sw = run_sweep(m, tok, p, grid, names, options, max_ppl_increase=limit_frac, force=force)
    if json_out:
        _write_json(json_out, sw)
    obj = sw["objective"]
    first = sw["rows"][0]
    dev, test = f"({first['dev'].get('split', 'all')})", f"({first['test'].get('split', 'all')})"
    seconds = sw["results"]["seconds"] + sw.get("results_test", {}).get("seconds", 0)
    table = Table("scale", f"{obj['metric']} {obj['key']}\n{dev}", *([f"distance\n{dev}"] if "distance" in first else []),
                  *([f"perplexity\n{first['dev'].get('perplexity_split', 'all')}", "rise %", "ok"] if "perplexity" in first else []),
                  f"{obj['key']} {test}\n95 % interval", f"p vs base\n{test}",
                  title=f"{p.name} on {ref.id}: sweep ({seconds:.1f} s); chosen on dev, reported on test")
    from ..stats import p_text
    from ..verdicts import fmt

    for r in sw["rows"]:
        mark = "[bold green]" if r["scale"] == sw["recommended_scale"] else ""
        cells = [fmt(r["scale"]), fmt(r["value"])] + ([fmt(r["distance"])] if "distance" in r else [])
        if "perplexity" in r:
            cells += [fmt(r["perplexity"]), f"{r['ppl_rise_pct']:+.2f}", {True: "yes", False: "no"}.get(r.get("ok"), "-")]
        t = r["test"]
        iv = t.get("interval") or [None, None]
        cells += [fmt(t.get("value")) + (f" [{fmt(iv[0])}, {fmt(iv[1])}]" if iv[0] is not None else ""),
                  p_text(t.get("p")) if "p" in t else "-"]
        table.add_row(*[mark + c for c in cells])
    console.print(table)
    rec = sw["recommended_scale"]
    console.print(f"recommended scale: [bold]{rec:g}[/]" if rec is not None else "[yellow]no scale keeps the perplexity rise within the limit[/]")
    if not no_write:
        saved = write_sweep(p.path, sw)
        console.print(f"wrote {saved.path}/sweep.json, sweep.png, README.md; recommendation in {saved.path}/unpatch.json")


@app.command()
def card(patch: Annotated[str, typer.Argument(help="Patch folder.")]):
    """Regenerate a patch's README.md (model card) from its manifest and extra files."""
    from ..patch.store import regenerate_card

    console.print(f"wrote {regenerate_card(patch)}")


@app.command("metrics")
def metrics_cmd():
    """List the evaluation metrics with their ideal values and options."""
    import inspect

    from ..evals import get_metric, list_metrics

    table = Table("name", "better", "options", "description")
    for name in list_metrics():
        mt = get_metric(name)
        opts = ", ".join(p for p in list(inspect.signature(mt.fn).parameters)[2:] if p != "progress")
        table.add_row(name, f"ideal {mt.ideal:g}" if mt.direction == "target" else mt.direction, opts, mt.description)
    console.print(table)
