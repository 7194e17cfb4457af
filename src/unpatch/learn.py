"""The learn stage of a learn-then-forget recipe (`learn:`; the copyright setting of 2405.15152).

Before the unlearning, the base is LoRA-fine-tuned on data.forget (plain NLL descent, so it
memorises the text), and that adapter is saved as its own patch `<out>-learn`. It is then applied
in place (apply.Applied, originals kept), and the unlearning patch is trained on top of it. Both
patches record the fingerprint of the ORIGINAL base: LoRA and delta updates add, so
`unpatch apply <out>-learn <out>` on the base is exactly the model the forget patch was trained
on, and `unpatch apply <out>-learn` alone is the "learned" model. The forget patch names the learn
patch in its lineage (`role: learn`, applied beneath it).

The build's evaluation then measures three points on one load: base, base + learn patch
("learned"), base + learn + forget patch ("forgotten"), and records which share of the learn
stage's recall gain the forget patch removes (manifest `metrics.learn`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import check_out_path
from .errors import UnpatchError
from .fingerprint import combine, tensor_sha256
from .patch.apply import Applied
from .patch.format import BaseRef, Manifest, Patch, library_versions, lora_config_dict
from .patch.store import load_patch, save_patch
from .recipe import Recipe, TrainSection

LEARN_METHOD = "learn"  # the learn patch's manifest method name (not a registered unlearning method)


@dataclass
class Learned:
    patch: Patch  # the saved learn patch
    applied: Applied  # it, applied in place on the model the forget stage trains

    def base_hashes(self, names) -> dict[str, str]:
        """Fingerprints of the ORIGINAL base tensors (before the learn patch)."""
        return self.applied.base_hashes(list(names))

    def lineage(self) -> list[dict[str, Any]]:
        p = self.patch
        return [{"op": "built-on", "role": "learn", "name": p.name, "path": str(p.path), "patch_id": p.patch_id,
                 "coefficient": 1.0, "note": "apply this patch first: the forget patch was trained on base + it"}]


def learn_out(out: Path) -> Path:
    return out.with_name(out.name + "-learn")


def learn_train(recipe: Recipe) -> TrainSection:
    """The learn stage's training settings: `learn:` over `train:` (clipping, decay kept)."""
    lr, t = recipe.learn, recipe.train
    return t.model_copy(update={"steps": lr.steps, "lr": lr.lr, "batch_size": lr.batch_size, "grad_accum": 1,
                                "max_length": lr.max_length or t.max_length, "seed": t.seed if lr.seed is None else lr.seed,
                                "checkpoint_every": 0, "early_stop": None})


def learn_stage(model, tokenizer, ref, recipe: Recipe, data, targets: list[str], out: Path, overwrite: bool,
                resume: bool, world: int = 1) -> tuple[Any, Learned]:
    """Train (or, with --resume, reuse) the learn patch, save it beside `out`, and apply it in place.
    Returns (the bare model with the learn patch applied, Learned)."""
    if world > 1:
        raise UnpatchError(f"{recipe.path}: learn: a learn stage runs in one process only for now; build without torchrun, "
                           "or build the learn patch and the forget patch separately")
    where = learn_out(out)
    patch = _reusable(where, recipe, data) if resume else None
    if patch is None:
        check_out_path(where, overwrite)
        patch = _train(model, tokenizer, ref, recipe, data, targets, where, overwrite)
    applied = Applied(model, "the base model")
    applied.apply(patch, 1.0)  # fingerprint-checked against the base just loaded
    return model, Learned(patch, applied)


def _reusable(where: Path, recipe: Recipe, data) -> Patch | None:
    """The learn patch of an earlier run of this very build (same recipe file, `learn:` settings and
    forget texts: `--set` overrides change the latter two, not the file's hash), else an error."""
    import hashlib
    import json

    if not where.exists():
        return None
    patch = load_patch(where)
    m = patch.manifest
    digest = hashlib.sha256(json.dumps(data.forget, ensure_ascii=False).encode()).hexdigest()
    same = (m.recipe_sha256 == recipe.sha256 and m.method.get("name") == LEARN_METHOD
            and m.method.get("params") == recipe.learn.model_dump(mode="json")
            and m.metrics.get("build", {}).get("data", {}).get("forget", {}).get("sha256") == digest)
    if not same:
        raise UnpatchError(f"{where}: a learn patch from other settings or data; delete it or build with --overwrite instead of --resume")
    return patch


def _train(model, tokenizer, ref, recipe: Recipe, data, targets: list[str], where: Path, overwrite: bool) -> Patch:
    from peft.utils import get_peft_model_state_dict

    from .batches import Batches
    from .build_eval import build_info
    from .methods.loop import train_loop
    from .methods.task_vector import finetune_loss
    from .model import dtype_name, model_revision
    from .targets import wrap_lora

    t0 = time.perf_counter()
    lr, t = recipe.learn, learn_train(recipe)
    mods = list(lr.target_modules or targets)
    view = recipe.model_copy(update={"patch": recipe.patch.model_copy(update={"rank": lr.rank, "alpha": lr.alpha,
                                                                              "target_modules": mods})})
    base_dtype = dtype_name(next(model.parameters()).dtype)
    torch.manual_seed(t.seed)  # LoRA's A matrices are initialised at random
    peft_model, originals = wrap_lora(model, view, mods, f"{recipe.path}: learn")
    hashes = {n: tensor_sha256(w) for n, w in originals.items()}
    batches = Batches.from_texts(data.forget, tokenizer, t.max_length, t.batch_size, t.seed, where=f"{recipe.path}: data.forget")
    res = train_loop(peft_model, finetune_loss, batches, t, desc="learn (LoRA fine-tune on data.forget)")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    cfg = lora_config_dict(peft_model.peft_config["default"], ref.id)
    cfg.update(lora_alpha=lr.alpha, inference_mode=True)
    peft_model.unload()  # the LoRA layers out again; the base weights were never changed
    h = res.history
    manifest = Manifest(
        kind="lora", name=where.name, coefficient=1.0,
        base=BaseRef(id=ref.id, revision=model_revision(ref), dtype=base_dtype, tensors=hashes, fingerprint=combine(hashes)),
        method={"name": LEARN_METHOD, "params": lr.model_dump(mode="json")}, recipe_sha256=recipe.sha256,
        versions=library_versions(),
        notes=[f"learn stage of {recipe.patch.name}: {res.steps}-step LoRA fine-tune on data.forget"
               + (f"; forget_loss {h[0]['forget_loss']:.4g} -> {h[-1]['forget_loss']:.4g}" if h else "")],
        metrics={"build": build_info(recipe, data, time.perf_counter() - t0, model)},
    )
    return save_patch(Patch(manifest, tensors, lora_config=cfg, recipe_text=recipe.text), where, overwrite)


# ------------------------------------------------------------------------------ evaluation


def evaluate_learned(saved: Patch, model, originals: dict[str, torch.Tensor], tokenizer, plan, learned: Learned) -> Patch:
    """Base / learned / forgotten on the model the build trained, put back to the base first: the
    forget adapter unloaded (or the trained delta weights given their pre-forget bytes back), then
    the learn patch reverted bit for bit (verified by fingerprint; else the base is loaded afresh)."""
    from .model import load_model

    if hasattr(model, "peft_config") and hasattr(model, "unload"):
        model = model.unload()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in originals.items():  # delta: base + learn, as before the forget stage
            params[n].data.copy_(w)
    if not learned.applied.revert():
        base = saved.manifest.base
        model, tokenizer, _ = load_model(base.id, dtype=base.dtype, revision=base.revision)
    return three_points(saved, learned.patch, model, tokenizer, plan)


def evaluate_learned_fresh(saved: Patch, out: Path, plan) -> Patch:
    """`build --resume` after a kill during the evaluation: the same three points on a fresh load
    of the base, with the learn patch read back from `<out>-learn`."""
    from .model import load_model

    where = learn_out(out)
    if not where.exists():
        raise UnpatchError(f"{where}: the learn patch of {out} is missing, so base / learned / forgotten cannot be measured; "
                           "pass --overwrite to rebuild both")
    base = saved.manifest.base
    model, tokenizer, _ = load_model(base.id, dtype=base.dtype, revision=base.revision)
    return three_points(saved, load_patch(where), model, tokenizer, plan)


def three_points(saved: Patch, learn: Patch, model, tokenizer, plan) -> Patch:
    """Evaluate base / base + learn / base + learn + forget on `model` (the base) and write the
    results and the removed-gain shares into the forget patch's manifest and card."""
    from .evals.runner import Variant, evaluate
    from .patch.store import rewrite_patch

    model.requires_grad_(False)
    names, options = plan
    variants = [Variant("base"), Variant("learned", ((learn, 1.0),)), Variant("forgotten", ((learn, 1.0), (saved, 1.0)))]
    try:
        results = evaluate(model, tokenizer, variants, names, options)
    except UnpatchError as e:
        raise UnpatchError(f"{e} (both patches are saved: {learn.path} and {saved.path}, without metrics; "
                           "build again with --no-eval, or measure with `unpatch eval`)") from e
    return rewrite_patch(saved.path, {"eval": results, "learn": removed_gain(results)})


def removed_gain(results: dict[str, Any]) -> dict[str, Any]:
    """Per recall key of forget_recall: base, learned, forgotten and the share of the learn stage's
    gain that the forget patch removes, (learned - forgotten) / (learned - base) (None without gain)."""
    rows = {v["label"]: v["values"] for v in results["variants"]}
    out: dict[str, Any] = {}
    for metric in ("forget_recall", "verbatim_recall"):
        if metric not in rows.get("base", {}):
            continue
        for key, b in rows["base"][metric].items():
            if not isinstance(b, float) or "/" in key:
                continue
            lv, fv = rows["learned"][metric][key], rows["forgotten"][metric][key]
            gain = lv - b
            out[f"{metric}.{key}"] = {"base": b, "learned": lv, "forgotten": fv,
                                      "removed": (lv - fv) / gain if abs(gain) > 1e-12 else None}
    return out
