"""CLI commands for patches as files: apply (to a folder, or in memory with --prompt), revert, the
algebra (stack, scale, negate, convert), inspect and verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import checks
from ..errors import UnpatchError
from .options import AllowPickle, Device, Dtype, Force, ModelOpt, Out, Overwrite, _load, _need_out, _scales, console

app = typer.Typer()  # assembled into the root app by cli/__init__.py


@app.command()
def apply(
    patches: Annotated[list[str], typer.Argument(help="Patch folders, applied in order.")],
    scale: Annotated[list[float] | None, typer.Option("--scale", "-s", help="Per patch, relative to as built (1 = as built).")] = None,
    model: ModelOpt = None,
    out: Out = None,
    force: Force = False,
    overwrite: Overwrite = False,
    device: Device = "auto",
    dtype: Dtype = "float32",
    prompt: Annotated[str | None, typer.Option("--prompt", help="Without --out: show base vs patched greedy continuations.")] = None,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="With --prompt: send it as raw text, not as a user turn of the tokenizer's chat template.")] = False,
    allow_pickle: AllowPickle = False,
):
    """Apply patches: write a merged model folder with --out, or try them in memory."""
    scale = checks.scales(scale, "--scale")  # before any work: a NaN scale writes an all-NaN model
    loaded = [_load(p, allow_pickle) for p in patches]
    pairs = list(zip(loaded, _scales(scale or [], len(loaded)), strict=True))
    model = model or loaded[0].manifest.base.id
    if out is not None:
        from ..patch.merged import apply_to_folder

        ledger = apply_to_folder(model, pairs, out, force=force, overwrite=overwrite)
        table = Table("patch", "scale", "tensors", "forced", title=f"{out} = {model} + patches")
        for e in ledger["applied"]:
            table.add_row(e["name"], f"{e['scale']:g}", str(len(e["tensors"])), "yes" if e["forced"] else "no")
        console.print(table)
        return
    from ..model import load_model
    from ..patch.apply import Applied

    m, tok, ref = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    chat = not no_chat_template
    before = _continue(m, tok, prompt, chat=chat) if prompt else None
    applied = Applied(m, f"model {ref.id}", keep_originals=False)  # one-shot: nothing to revert to
    for p, s in pairs:
        e = applied.apply(p, s, force=force)
        console.print(f"applied {p.label()} × {s:g} to {len(p.updates())} tensors" + (" [yellow](forced)[/]" if e.forced else ""))
    if prompt:
        console.print(f"[bold]base:[/]    {before}\n[bold]patched:[/] {_continue(m, tok, prompt, chat=chat)}", highlight=False)
    else:
        console.print("[dim]in memory only: pass --out DIR to write the merged model, or --prompt TEXT to try it[/]")


def _continue(model, tok, prompt: str, tokens: int = 30, chat: bool = True) -> str:
    """Greedy continuation; an instruct model's tokenizer has a chat template, and then the prompt
    goes in as a user turn (what the model was tuned on) unless `chat` is False."""
    import torch

    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return f"{prompt} -> " + tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    ids = tok(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return prompt + tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@app.command()
def revert(
    merged: Annotated[Path, typer.Argument(help="A merged folder written by `unpatch apply --out`.")],
    patch: Annotated[str | None, typer.Option("--patch", "-p", help="Take off only this patch (name or path); default all.")] = None,
    out: Out = None,
    overwrite: Overwrite = False,
):
    """Take patches off a merged folder: bit-exact from the base, verified by fingerprint."""
    from ..patch.merged import revert_folder

    r = revert_folder(merged, patch=patch, out=out, overwrite=overwrite)
    where = out or merged
    if r["mode"] == "exact":
        console.print(f"reverted into {where}: bit-exact from the base; fingerprint {'verified' if r['verified'] else 'NOT verified'}")
    else:
        console.print(f"[yellow]reverted into {where} arithmetically[/] ({r['reason']}); deviation from the base at most {r['max_deviation']:.3g} (float rounding bound); "
                      f"fingerprint {'matches' if r['verified'] else 'does not match'} the base")


@app.command()
def stack(
    patches: Annotated[list[str], typer.Argument(help="Patch folders to combine.")],
    coef: Annotated[list[float] | None, typer.Option("--coef", "-c", help="Coefficient per patch (default 1).")] = None,
    out: Out = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the stacked patch.")] = None,
    overwrite: Overwrite = False,
):
    """Combine N patches into one (sum of coefficient × patch), recording the lineage."""
    from ..patch.algebra import stack_patches
    from ..patch.store import save_patch

    out = _need_out(out, "stack")
    coef = checks.scales(coef, "--coef")
    loaded = [_load(p) for p in patches]
    result = stack_patches(list(zip(loaded, _scales(coef or [], len(loaded), "--coef"), strict=True)), name or out.name)
    saved = save_patch(result, out, overwrite)
    console.print(f"wrote {saved.path} ({saved.kind}, {len(saved.updates())} tensors)")


@app.command("scale")
def scale_cmd(
    patch: Annotated[str, typer.Argument()],
    factor: Annotated[float, typer.Option("--factor", "-f", help="Multiply the patch's effect by this.")],
    out: Out = None,
    overwrite: Overwrite = False,
):
    """Write a copy of a patch whose effect is multiplied by --factor."""
    from ..patch.algebra import scale_patch
    from ..patch.store import save_patch

    factor = checks.scale(factor, "--factor")
    saved = save_patch(scale_patch(_load(patch), factor), _need_out(out, "scale"), overwrite)
    console.print(f"wrote {saved.path} (coefficient {saved.manifest.coefficient:g})")


@app.command()
def negate(patch: Annotated[str, typer.Argument()], out: Out = None, overwrite: Overwrite = False):
    """Write a copy of a patch with the opposite effect."""
    from ..patch.algebra import negate_patch
    from ..patch.store import save_patch

    saved = save_patch(negate_patch(_load(patch)), _need_out(out, "negate"), overwrite)
    console.print(f"wrote {saved.path} (coefficient {saved.manifest.coefficient:g})")


@app.command()
def convert(
    patch: Annotated[str, typer.Argument()],
    to: Annotated[str, typer.Option("--to", help="delta (exact) or lora (truncated SVD).")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank for --to lora.")] = 16,
    model: ModelOpt = None,
    out: Out = None,
    overwrite: Overwrite = False,
):
    """Convert lora -> delta (exact) or delta -> lora (truncated SVD; prints the relative error)."""
    from ..patch.algebra import delta_to_lora, lora_to_delta, module_types_of
    from ..patch.store import save_patch

    if to == "lora":
        checks.rank(rank, "--rank")
    p = _load(patch)
    out = _need_out(out, "convert")
    if to == "delta":
        saved = save_patch(lora_to_delta(p), out, overwrite)
        console.print(f"wrote {saved.path} (delta, exact)")
    elif to == "lora":
        result, rel = delta_to_lora(p, rank, module_types_of(model or p.manifest.base.id))
        saved = save_patch(result, out, overwrite)
        console.print(f"wrote {saved.path} (lora rank {rank}); relative error {rel:.4g}")
    else:
        raise UnpatchError(f"--to {to!r}: use delta or lora")


@app.command()
def inspect(patch: Annotated[str, typer.Argument()],
            as_json: Annotated[Path | None, typer.Option("--json", help="Write the full info as JSON to this file (- for stdout), as eval and sweep do.")] = None):
    """Show a patch's manifest, tensors, sizes and norms."""
    from ..patch.algebra import inspect_patch

    info = inspect_patch(_load(patch))
    if as_json is not None:
        if str(as_json) == "-":
            print(json.dumps(info, indent=2))
            return
        from ..atomic import atomic_write_text

        atomic_write_text(as_json, json.dumps(info, indent=2) + "\n")
        console.print(f"wrote {as_json}")
    console.print(f"[bold]{info['name']}[/] kind={info['kind']} base={info['base']} coefficient={info['coefficient']:g} "
                  f"method={info['method'].get('name', '-')} id={info['patch_id'][:12]} bytes={info['bytes_on_disk']}")
    table = Table("tensor", "encoding", "stored", "bytes", "‖Δ‖")
    for r in info["tensors"]:
        table.add_row(r["tensor"], r["encoding"], " ".join(map(str, r["stored"])), f"{r['bytes']:,}", f"{r['norm']:.4g}")
    console.print(table)


@app.command()
def verify(patch: Annotated[str, typer.Argument()], model: ModelOpt = None):
    """Check a patch's integrity (hashes, tensors, finiteness) and, with --model, that it fits that base."""
    from ..model import checkpoint_folder, resolve_model
    from ..patch.merged import Checkpoint, check_against

    p = _load(patch)
    updates = p.updates()
    console.print(f"{p.label()}: intact ({p.kind}, {len(updates)} tensors, id {p.patch_id[:12]})")
    if p.path is not None:  # a killed writer's leftovers beside it: named, so nobody wonders where the disk went
        from ..atomic import stale_temporaries

        for left in stale_temporaries(p.path):
            console.print(f"[yellow]warning:[/] {left}: left by an interrupted write of {p.path.name}; the next command writing "
                          f"{p.path.name} removes it, or delete it yourself", highlight=False, soft_wrap=True)
    if model:
        check_against(p, Checkpoint(checkpoint_folder(resolve_model(model))), f"model {model}")
        console.print(f"matches base {model} (fingerprint {p.manifest.base.fingerprint[:16]})")
