"""`build`: recipe -> data -> model -> method -> patch folder.

The base fingerprint hashes the ORIGINAL base tensors the patch touches (named as in the bare
model's `named_parameters()`, so tied weights appear once). With a fixed seed, a CPU build is
bit-identical run to run (payload files; the manifest's `created` stamp differs), and a build
resumed from a checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import claim
from .build_eval import build_info, build_plan, evaluate_built, overlap_notes, settings_sha256
from .distributed import device_for, engine
from .errors import UnpatchError
from .fingerprint import combine, tensor_sha256
from .learn import evaluate_learned, evaluate_learned_fresh, learn_stage
from .methods import Context, get_method
from .methods.loop import fp32_masters, gathered_state
from .model import dtype_name, load_model, model_revision
from .patch.format import BaseRef, Manifest, Patch, library_versions, lora_config_dict
from .patch.store import load_patch, save_patch
from .recipe import Recipe, as_recipe
from .sources import Data, load_data
from .targets import choose_targets, target_weights, wrap_lora


def build(recipe_path: str | Path | Recipe | dict, out: str | Path | None = None, overwrite: bool = False, overrides: Sequence[str] = (),
          resume: bool = False, *, on_step: Callable[[int, dict[str, float]], None] | None = None, run_eval: bool = True) -> Patch:
    """Build the patch a recipe describes into `out` (default `patches/<patch.name>`) and return
    it as saved. `overrides` are `key.path=value` strings; `resume` continues from `<out>.ckpt/`,
    or, when `out` is already written (a kill came during the evaluation), only evaluates it.
    Under torchrun / accelerate launch every rank trains its share and rank 0 writes; the other
    ranks return the patch it wrote (None if it is on another machine's disk)."""
    recipe = as_recipe(recipe_path, overrides)  # a YAML path, a Recipe or a dict
    out = Path(out) if out is not None else Path("patches") / recipe.patch.name
    # rank 0 claims --out for the whole build (a concurrent writer fails now, an unwritable folder
    # too), before anything expensive; a killed run's temporaries beside it are removed
    with claim(out) if engine(recipe.model.device).main else contextlib.nullcontext():
        if resume and out.exists() and not overwrite:
            return resume_evaluation(recipe, out, run_eval)
        if out.exists() and not overwrite:
            raise UnpatchError(existing_out_message(out, recipe))
        return _build(recipe, out, overwrite, resume, on_step, run_eval)


def _build(recipe: Recipe, out: Path, overwrite: bool, resume: bool, on_step, run_eval: bool) -> Patch:
    eng = engine(recipe.model.device)  # under torchrun / accelerate launch: this process's rank
    if eng.world > 1:
        eng.log(eng.describe())
    t0 = time.perf_counter()
    plan = build_plan(recipe) if run_eval else None  # bad metric names/options fail before training
    where = str(recipe.path)
    data = load_data(recipe)  # data errors surface before the model loads
    spec = get_method(recipe.method.name)
    m = recipe.model
    model, tokenizer, ref = load_model(m.id, device_for(eng, m.device), m.dtype, m.revision, m.trust_remote_code)
    model.requires_grad_(False)
    base_dtype = dtype_name(next(model.parameters()).dtype)
    targets = choose_targets(model, recipe.patch.target_modules, where).names
    learned = None
    if recipe.learn is not None:  # learn, then forget: the unlearning patch is trained on base + a learn patch
        model, learned = learn_stage(model, tokenizer, ref, recipe, data, targets, out, overwrite, resume, eng.world)
    torch.manual_seed(recipe.train.seed)  # LoRA's A matrices are initialised at random
    if recipe.patch.kind == "lora":
        model, originals = wrap_lora(model, recipe, targets, where)
        hashes = {n: tensor_sha256(t) for n, t in originals.items()}  # frozen: still the originals after training
        originals = {}
    else:
        live = target_weights(model, targets, where)
        originals = {n: p.detach().to("cpu", copy=True) for n, p in live.items()}
        hashes = {n: tensor_sha256(t) for n, t in originals.items()}
        for p in live.values():
            p.requires_grad_(True)
    if learned is not None:  # the ORIGINAL base's: applied on the base together with the learn patch
        hashes = learned.base_hashes(hashes)

    ckpt = out.with_name(out.name + ".ckpt")
    ctx = Context(model, tokenizer, recipe, spec.config.model_validate(recipe.method.params), data,
                  ckpt_dir=ckpt, resume=resume, fingerprint=_settings_hash(recipe, data), on_step=on_step)
    result = spec.fn(ctx)
    if not eng.main:  # rank 0 alone writes the patch (atomically); the others wait for it, read it, and are done
        eng.barrier()
        return load_patch(out) if out.exists() else None  # None: another machine, without a shared disk

    lora_config, encodings, shapes = None, {}, {}
    # the method's own sign/size (task_vector: -lambda) times the strength the recipe ships the patch at
    coefficient = result.coefficient * recipe.patch.coefficient
    if recipe.patch.kind == "lora":
        from peft.utils import get_peft_model_state_dict

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in get_peft_model_state_dict(model, state_dict=gathered_state(model)).items()}
        lora_config = lora_config_dict(model.peft_config["default"], adapter_base(ref))
        # the built-in coefficient is folded into alpha, so peft loads the patch exactly as built
        lora_config.update(lora_alpha=recipe.patch.alpha * coefficient, inference_mode=True)
    else:
        params = dict(model.named_parameters())
        params.update(gathered_state(model) or {})  # FSDP / DeepSpeed: the gathered full weights
        params.update(fp32_masters(model))  # weights held in bf16/fp16: their fp32 masters are exact
        # fp32 difference: a bf16/fp16 base would lose most of a small delta if stored in its own dtype
        dense = {n: params[n].detach().to("cpu", torch.float32) - originals[n].to(torch.float32) for n in originals}
        tensors, encodings, shapes = sparsify(dense)

    manifest = Manifest(
        kind=recipe.patch.kind, name=recipe.patch.name,
        base=BaseRef(id=ref.id, revision=model_revision(ref), dtype=base_dtype, tensors=hashes, fingerprint=combine(hashes)),
        coefficient=coefficient, method={"name": spec.name, "params": dict(recipe.method.params)},
        recipe_sha256=recipe.sha256, versions=library_versions(), notes=_notes(spec.display, result) + overlap_notes(recipe, plan),
        metrics={"build": build_info(recipe, data, time.perf_counter() - t0, model)},
        lineage=learned.lineage() if learned is not None else [],
    )
    saved = save_patch(Patch(manifest, tensors, lora_config=lora_config, encodings=encodings, shapes=shapes, recipe_text=recipe.text),
                       out, overwrite)
    eng.barrier()  # the other ranks may read it now
    shutil.rmtree(ckpt, ignore_errors=True)  # the patch is whole: the checkpoint has served
    if plan is not None and learned is not None:  # base / learned / forgotten
        saved = evaluate_learned(saved, model, originals, tokenizer, plan, learned)
    elif plan is not None:  # before/after metrics for the manifest and card, on the model already loaded
        saved = evaluate_built(saved, model if eng.world == 1 else None, originals, tokenizer, plan)
    return saved


def adapter_base(ref) -> str:
    """adapter_config.json's base_model_name_or_path: for an alias or .gguf, the Hub id its
    metadata names (so AutoPeftModelForCausalLM finds a loadable base; the fingerprint in
    unpatch.json still names the exact weights), else the base as given."""
    if ref.kind in ("alias", "gguf"):
        from .hubmeta import gguf_source

        return gguf_source(ref.path)["hub_id"] or ref.id
    return ref.id


def sparsify(deltas: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[int]]]:
    """Store each delta dense, or as its changed rows where that is smaller (PCGU-style updates,
    untouched embedding rows). Returns (payload tensors, encodings, shapes)."""
    tensors, encodings, shapes = {}, {}, {}
    for n, d in deltas.items():
        shapes[n] = list(d.shape)
        rows = d.reshape(d.shape[0], -1).ne(0).any(dim=1).nonzero().flatten() if d.dim() > 0 else None
        if rows is not None and rows.numel() * (d[0].numel() + 2) < d.numel():
            tensors[f"{n}::rows"], tensors[f"{n}::values"], encodings[n] = rows, d[rows].contiguous(), "rows"
        else:
            tensors[n], encodings[n] = d, "dense"
    return tensors, encodings, shapes


# ------------------------------------------------------------------------------ helpers


def _settings_hash(recipe: Recipe, data: Data) -> str:
    """What a resumable checkpoint must match: the validated recipe (overrides included, the
    checkpoint interval excepted: it does not change the result) and the data it read."""
    h = hashlib.sha256(recipe.model_dump_json(exclude={"train": {"checkpoint_every"}}).encode())
    h.update(json.dumps(dataclasses.asdict(data)).encode())
    return h.hexdigest()


def _notes(display: str, result) -> list[str]:
    h = result.history
    keys = [k for k in (h[0] if h else {}) if k != "loss"] or ["loss"]  # method metrics say more than the raw loss
    moves = ", ".join(f"{k} {h[0][k]:.4g} -> {h[-1][k]:.4g}" for k in keys if h and k in h[-1])
    return [f"{display}: {result.steps} steps" + (f"; {moves}" if moves else "")] + list(result.notes)


# ------------------------------------------------------------------------------ an interrupted build


def _manifest_of(out: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((Path(out) / "unpatch.json").read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def existing_out_message(out: Path, recipe) -> str:
    """The refusal for a build whose --out exists: if it is this recipe's patch whose evaluation a
    kill cut short, say to add --resume (which finishes it without training again)."""
    raw = _manifest_of(out)
    metrics = raw.get("metrics") if raw else None
    if isinstance(metrics, dict) and "eval" not in metrics and (metrics.get("build") or {}).get("settings_sha256") == settings_sha256(recipe):
        return (f"{out}: already exists, built from this recipe but its evaluation did not finish; rerun with --resume to "
                "finish it (no training again), or pass --overwrite to rebuild")
    return f"{out}: already exists; choose another --out or pass --overwrite"


def resume_evaluation(recipe, out: Path, run_eval: bool) -> Patch:
    """`build --resume` where the patch is already written (a kill came during the evaluation, or
    after): check it is this recipe's, evaluate it on a fresh base load, finish manifest and card.
    The payload is not touched (patch.store.rewrite_patch links it), so its bytes are those an
    uninterrupted build writes. A finished patch is returned as it is."""
    saved = load_patch(out)  # hashes and tensors checked: a damaged patch fails here, in one line
    build = saved.manifest.metrics.get("build") or {}
    if build.get("settings_sha256") != settings_sha256(recipe):
        raise UnpatchError(f"{out}: already exists and was not built from this recipe with these settings, so --resume cannot "
                           "finish it; choose another --out or pass --overwrite to rebuild")
    if run_eval and "eval" not in saved.manifest.metrics:
        if recipe.learn is not None:  # base / learned / forgotten, the learn patch read back from <out>-learn
            saved = evaluate_learned_fresh(saved, out, build_plan(recipe))
        else:
            saved = evaluate_built(saved, None, {}, None, build_plan(recipe))
    shutil.rmtree(out.with_name(out.name + ".ckpt"), ignore_errors=True)  # a kill right after the write leaves it
    return saved
