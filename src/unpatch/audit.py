"""Robustness audit: does the forgetting survive what happens to a model after it is shared?

Two things routinely happen to released weights: they get quantised, and they get fine-tuned.
Unlearning that is only a thin layer over the weights can be undone by either (rounding erases a
small delta; a few benign gradient steps pull the model back to the base's behaviour). The audit
applies the patch, then measures forget-set and retain-set NLL after
  (a) weight quantisation at 8 and 4 bits: real GGUF Q8_0 / Q4_0 round trips (the `gguf` package's
      llama.cpp arithmetic) where the tensor allows, else simulated round-to-nearest; the report's
      settings.quantisation says which, per stage, and
  (b) a few steps of plain causal-LM fine-tuning on retain data (AdamW),
beside the base and the freshly patched model. `forgetting_kept` = (forget NLL of a stage − base)
/ (patched − base): 1 = all of the patch's effect on the forget set survives, 0 = all of it is gone.

The report goes to `audit.json` beside the patch. It holds numbers and data source names only,
never texts (it is pushed with the patch), and it is not one of the manifest's hashed payload
files, so `unpatch verify` keeps passing.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import progress
from .atomic import atomic_write_text
from .batches import Batches
from .errors import UnpatchError
from .patch.apply import Applied
from .patch.format import AUDIT_FILE, Patch, now
from .quantise import quantise_auto_
from .sources import load_texts

DEFAULT_RETAIN = "builtin:wikitext-tiny"  # normal prose, when neither --retain nor the recipe names retain data


# ---------------------------------------------------------------- metrics and fine-tuning


def finetune_(model, batches: Batches, steps: int, lr: float) -> None:
    """`steps` AdamW steps of plain causal-LM loss, in place (the benign fine-tune a user might run)."""
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    try:
        for i in range(steps):
            loss = model(**{k: v.to(dev) for k, v in batches[i].items()}).loss
            if not torch.isfinite(loss):
                raise UnpatchError(f"audit: fine-tuning diverged at step {i} (loss {loss.item()}); lower --lr")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        model.eval()
        del opt


def _nll(name: str, model, tokenizer, texts: list[str], max_length: int) -> float:
    """Mean token NLL (nats) as the registered forget_nll/retain_nll metrics define it (evals/
    forgetting.py: lm-eval's empty-context rule, token-weighted), so the audit's numbers and the
    card's are the same quantity; here on texts already loaded."""
    from .evals.forgetting import token_nll

    return token_nll(model, tokenizer, texts, max_length, metric=name)["nll"]


@torch.no_grad()
def _copy_params(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for (_, a), (_, b) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
        b.data.copy_(a.data)


@torch.no_grad()
def _max_change(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


# ---------------------------------------------------------------- the audit


def audit_model(model, tokenizer, patch: Patch, forget: list[str], retain: list[str], *, scale: float = 1.0,
                bits: tuple[int, ...] = (8, 4), steps: int = 20, lr: float = 5e-5, batch_size: int = 8,
                max_length: int = 128, seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Run the audit on a loaded base model; the model is back to its base bytes afterwards."""
    def metrics(m) -> dict[str, float]:
        return {"forget_nll": _nll("forget_nll", m, tokenizer, forget, max_length),
                "retain_nll": _nll("retain_nll", m, tokenizer, retain, max_length)}

    bad = [f"--bits {b}: use 2 or more" for b in bits if b < 2] + (["--steps: must be 0 or more"] if steps < 0 else []) \
        + ([f"--lr {lr}: must be positive"] if not lr > 0 else [])
    if bad:  # before any model work
        raise UnpatchError(f"audit: {bad[0]}")
    model.eval()
    with progress.task("audit", 2 + len(bits) + (steps > 0), unit="stages") as bar:
        bar.update(status="base")
        stages: dict[str, dict[str, Any]] = {"base": metrics(model)}
        how: dict[str, str] = {}  # per stage: real GGUF round trip or simulated
        bar.advance(status="patched")
        applied = Applied(model, "the audited model")  # keeps the original bytes: reverted at the end
        forced = applied.apply(patch, scale, force=force).forced
        try:
            stages["patched"] = metrics(model)
            work = copy.deepcopy(model)  # the variants change every weight; the patched model stays as it is
            for b in bits:
                bar.advance(status=f"int{b}")
                _copy_params(model, work)
                err, how[f"int{b}"] = quantise_auto_(work, b)
                stages[f"int{b}"] = {**metrics(work), "max_weight_change": err}
            if steps > 0:
                bar.advance(status=f"fine-tune, {steps} steps")
                _copy_params(model, work)
                torch.manual_seed(seed)  # dropout masks
                finetune_(work, Batches.from_texts(retain, tokenizer, max_length, batch_size, seed, "audit retain data"), steps, lr)
                stages["finetune"] = {**metrics(work), "max_weight_change": _max_change(model, work)}
            bar.advance(status="done")
            del work
        finally:
            applied.revert()
    gap = stages["patched"]["forget_nll"] - stages["base"]["forget_nll"]
    for name, row in stages.items():
        if name != "base":  # undefined when the patch does not move the forget NLL at all
            row["forgetting_kept"] = (row["forget_nll"] - stages["base"]["forget_nll"]) / gap if abs(gap) > 1e-9 else None
    for row in stages.values():
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise UnpatchError(f"audit: {k} is {v}; the patched model is numerically broken at this --scale")
    return {"stages": stages,
            "settings": {"scale": scale, "forced": forced, "bits": list(bits), "quantisation": how,
                         "quantised": "every 2-D linear weight except the output head, dequantised to the model dtype; "
                         "GGUF Q8_0/Q4_0 where the gguf package round-trips the tensor, else per-output-channel absmax "
                         "symmetric RTN (simulated)",
                         "finetune": {"steps": steps, "lr": lr, "batch_size": batch_size, "optimizer": "AdamW",
                                      "loss": "causal LM on retain data", "seed": seed},
                         "max_length": max_length,
                         "nll": "mean token NLL in nats, token-weighted, as the forget_nll/retain_nll metrics"}}


def audit_data(patch: Patch, forget: str | None, retain: str | None, limit: int | None) -> tuple[list[str], list[str], dict]:
    """Forget/retain texts: the options (sources as in a recipe), else the patch's recipe.yaml,
    else (retain only) builtin:wikitext-tiny. Returns the texts and their source names."""
    from .recipe import Source, load_recipe

    recipe = None
    if (forget is None or retain is None) and patch.path and (patch.path / "recipe.yaml").is_file():
        recipe = load_recipe(patch.path / "recipe.yaml")

    def pick(role: str, given: str | None, default: str | None) -> tuple[list[str], str]:
        if given is not None:
            return load_texts(given, Path.cwd(), f"--{role}"), _name(given)
        src = getattr(recipe.data, role) if recipe else None
        if role == "forget" and src is None and recipe and recipe.data.pairs:
            src = recipe.data.pairs.model_copy(update={"column": recipe.data.pairs.more})  # the sentences to disfavour
        if src is None and default:
            return load_texts(default), default
        if src is None:
            raise UnpatchError(f"{patch.label()}: no {role} data (no recipe.yaml naming data.{role}); pass --{role} SOURCE")
        try:
            return load_texts(src, recipe.base_dir, f"{patch.label()}/recipe.yaml: data.{role}"), _name(Source.model_validate(src).source)
        except UnpatchError as e:  # typical after a pull: the recipe's local data files stay with their author
            raise UnpatchError(f"{e}; pass --{role} SOURCE to audit with other data") from e

    f, fname = pick("forget", forget, None)
    r, rname = pick("retain", retain, DEFAULT_RETAIN)
    f, r = (f[:limit], r[:limit]) if limit else (f, r)
    return f, r, {"forget": fname, "retain": rname, "n_forget": len(f), "n_retain": len(r)}


def _name(source: str) -> str:
    """builtin:/hub: sources as they are; files by name only (a local path says nothing useful to others)."""
    return source if source.startswith(("builtin:", "hub:")) else Path(source).name


def audit(patch: Patch, model: str | None = None, *, forget: str | None = None, retain: str | None = None,
          limit: int | None = 64, out: str | Path | None = None, device: str = "auto", dtype: str = "float32",
          **options: Any) -> tuple[dict[str, Any], Path]:
    """Load the base, audit the patch, write the report atomically; returns (report, file)."""
    from .model import load_model

    target = Path(out) if out else _default_out(patch)
    forget_texts, retain_texts, data = audit_data(patch, forget, retain, limit)
    m, tok, ref = load_model(model or patch.manifest.base.id, device=device, dtype=dtype)
    result = audit_model(m, tok, patch, forget_texts, retain_texts, **options)
    report = {"format": "unpatch-audit", "version": 1, "created": now(), "patch": {"name": patch.name, "id": patch.patch_id},
              "model": ref.id, "data": data, **result}
    text = json.dumps(report, indent=2) + "\n"
    if patch.path is not None and target.resolve() == (Path(patch.path) / AUDIT_FILE).resolve():
        from .patch.store import rewrite_patch

        rewrite_patch(patch.path, files={AUDIT_FILE: text.encode()})  # audit.json and the card that shows it, in one swap
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    return report, target


def _default_out(patch: Patch) -> Path:
    if patch.path is None:
        raise UnpatchError("audit: the patch has no folder; pass --out FILE")
    from huggingface_hub import constants

    if Path(patch.path).resolve().is_relative_to(Path(constants.HF_HUB_CACHE).resolve()):
        # writing into a cache snapshot would make the cache disagree with the Hub
        raise UnpatchError(f"{patch.label()} is a Hub download in the HF cache; pass --out FILE for the report")
    return Path(patch.path) / AUDIT_FILE

