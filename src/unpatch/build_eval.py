"""The measuring step of `build`: which metrics a recipe asks for, what the build records about
itself (wall time, hardware, data by hash), and base vs the new patch on the model already loaded."""

from __future__ import annotations

from typing import Any

from .errors import UnpatchError
from .evals.runner import Variant, evaluate, hardware, parse_metric_options, parse_metrics
from .patch.format import Patch
from .registry import METRICS, _parameters, check_options


def build_plan(recipe) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(metrics, options) a build evaluates: the recipe's `eval.metrics`, else DEFAULT_METRICS.
    Metrics that declare a data role (forget_nll, forget_recall: forget; retain_nll, kl_retain:
    retain) read the recipe's own data of that role by default."""
    names = parse_metrics(list(recipe.eval.metrics) or None)
    options = parse_metric_options([], names)
    for m, given in recipe.eval.options.items():
        if m not in options:
            raise UnpatchError(f"{recipe.path}: eval.options.{m}: not a metric this build runs ({', '.join(names)})")
        try:
            check_options(m, given)
        except UnpatchError as e:
            raise UnpatchError(f"{recipe.path}: eval.options.{m}: {e}") from None
        given = dict(given)
        src = given.get("source")
        if isinstance(src, str) and not src.startswith(("builtin:", "hub:")):  # a file, relative to the recipe
            path = recipe.base_dir / src
            if not path.exists():
                raise UnpatchError(f"{recipe.path}: eval.options.{m}.source: no such file {str(path)!r}; "
                                   "give a path relative to the recipe, builtin:<name> or hub:<dataset>")
            given["source"] = str(path.resolve())
        options[m].update(given)
    for m in names:
        role = METRICS.get(m).data_role
        src = getattr(recipe.data, role) if role else None
        if src is not None and "source" in _parameters(m):
            path = recipe.base_dir / src.source
            given = {"source": str(path.resolve()) if path.exists() else src.source, "column": src.column,
                     "limit": src.limit, "chunk_words": src.chunk_words}
            mine = recipe.eval.options.get(m, {})  # an option the recipe sets for this metric wins over the data section's
            options[m].update({k: v for k, v in given.items() if v is not None and k in _parameters(m) and k not in mine})
    return names, options


def overlap_notes(recipe, plan) -> list[str]:
    """A warning per metric that reads data the recipe also learns from (forget or pairs): its
    numbers are then not held out. Metrics named after a data role (forget_nll, ...) read the
    recipe's data on purpose and are not flagged."""
    if plan is None:
        return []
    names, options = plan
    learnt = {role: src.source for role in ("forget", "pairs") if (src := getattr(recipe.data, role, None)) is not None}

    def where(source: str) -> str:
        path = recipe.base_dir / source
        return str(path.resolve()) if path.exists() else source

    out = []
    for m in names:
        if any(r in m for r in ("forget", "retain", "kl_")):
            continue
        param = _parameters(m).get("source")
        read = options[m].get("source", param.default if param is not None else None)
        for role, src in learnt.items():
            if isinstance(read, str) and where(read) == where(src):
                out.append(f"warning: overlap: the {m} numbers read {src}, which this recipe learns from "
                           f"(data.{role}); they are not held-out figures")
    return out


def build_info(recipe, data, seconds: float, model) -> dict[str, Any]:
    """Wall time, hardware, and each data role by source, size and sha256 of its content (the
    texts themselves never leave the machine through a card)."""
    import hashlib
    import json

    roles = {}
    for role, items in vars(data).items():
        if items:
            digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
            roles[role] = {"source": getattr(recipe.data, role).source, "items": len(items), "sha256": digest}
    from .hubmeta import base_source

    # the Hub id / licence the base comes from (a GGUF's metadata names them), for the card's front
    # matter: recorded now, because the card may be rewritten where the GGUF is not installed
    return {"seconds": round(seconds, 3), "hardware": hardware(model), "data": roles, "base_source": base_source(recipe.model.id),
            "settings_sha256": settings_sha256(recipe)}


def settings_sha256(recipe) -> str:
    """The validated recipe (overrides included, the checkpoint interval excepted: it does not change
    the result): what `build --resume` checks a finished patch against before evaluating it."""
    import hashlib

    return hashlib.sha256(recipe.model_dump_json(exclude={"train": {"checkpoint_every"}}).encode()).hexdigest()


def evaluate_built(saved: Patch, model, originals: dict[str, Any], tokenizer, plan) -> Patch:
    """Base vs the freshly built patch at scale 1, written into the manifest and card; the numbers
    equal `unpatch eval --patch <out>`. The model the build trained is put back to the base (a
    peft wrapper unloaded, trained delta weights given their original bytes back) and checked
    against the fingerprint; `model=None` (a multi-process build: sharded weights) or a failed
    check loads the base afresh instead."""
    import torch

    from .fingerprint import tensor_hashes
    from .model import load_model
    from .patch.store import rewrite_patch

    if model is not None:
        if hasattr(model, "peft_config"):
            model = model.unload()  # LoRA layers out; the frozen base weights were never changed
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in originals.items():
                params[n].data.copy_(t)
        want = saved.manifest.base.tensors
        if set(want) - set(params) or tensor_hashes({n: params[n].data for n in want}) != want:
            model = None
    if model is None:
        base = saved.manifest.base
        model, tokenizer, _ = load_model(base.id, dtype=base.dtype, revision=base.revision)
    model.requires_grad_(False)
    names, options = plan
    try:
        results = evaluate(model, tokenizer, [Variant("base"), Variant(saved.name, ((saved, 1.0),))], names, options,
                           progress_desc="build: evaluating base vs patch")
    except UnpatchError as e:  # the training is not lost: say where it is
        raise UnpatchError(f"{e} (the patch itself is saved in {saved.path}, without metrics; measure it with "
                           f"`unpatch eval --patch {saved.path}` once fixed, or build with --no-eval)") from e
    return rewrite_patch(saved.path, {"eval": results})
