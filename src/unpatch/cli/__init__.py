"""The `unpatch` command line: every command parses, makes one library call, and prints.

Errors a user can fix arrive as UnpatchError and print as one line (exit code 2); set
UNPATCH_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.table import Table

from .. import checks, progress
from ..errors import UnpatchError

app = typer.Typer(help="Build, apply, stack and revert unlearning patches for causal language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = progress.console()  # off a terminal: no wrapping of paths / JSON in logs


def _version(value: bool) -> None:
    if value:
        from ..version import __version__

        print(f"unpatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Build, apply, stack and revert unlearning patches for causal language models."""

# options shared by several commands, declared once
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (written atomically).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
Force = Annotated[bool, typer.Option("--force", help="Apply even if the base fingerprint differs (recorded in the ledger).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Base model: Hub id, folder, .gguf or alias (default: the patch's base).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:n].")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Load pickled .bin/.pt payloads (they can run code).")]


def _load(path: str, allow_pickle: bool | None = None):
    """None: the command has no --allow-pickle (a refusal then does not suggest it)."""
    from ..hub import resolve_patch

    return resolve_patch(path, allow_pickle=allow_pickle)  # a folder, or a Hub id (owner/name[@rev])


def _need_out(out: Path | None, what: str) -> Path:
    if out is None:
        raise UnpatchError(f"{what}: --out is required (the folder to write)")
    return out


def _scales(scales: list[float], n: int, flag: str = "--scale") -> list[float]:
    if not scales:
        return [1.0] * n
    if len(scales) == 1:
        return scales * n
    if len(scales) != n:
        raise UnpatchError(f"{flag}: got {len(scales)} values for {n} patches; give one, or one per patch")
    return scales


@app.command()
def build(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/gender.yaml")],
    out: Out = None,
    overwrite: Overwrite = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: train.steps=20")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of an interrupted build.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the before/after metrics for the card (faster).")] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda[:n] (default: the recipe's model.device).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Compute dtype: float32, bfloat16, float16 (default: the recipe's).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be touched, the patch size, memory and time; run nothing.")] = False,
):
    """Build a patch from a recipe (model + data + method)."""
    from ..builder import build as run_build
    from ..distributed import engine

    overrides = [*(set_ or []), *([f"model.device={device}"] if device else []), *([f"model.dtype={dtype}"] if dtype else [])]
    if dry_run:
        from ..plan import make_plan, render

        for line in render(make_plan(recipe, overrides)):
            console.print(line, highlight=False, soft_wrap=True)
        return
    patch = run_build(recipe, out=out, overwrite=overwrite, overrides=overrides, resume=resume, run_eval=not no_eval)
    if not engine().main:
        return  # under torchrun / accelerate launch, rank 0 reports for all
    console.print(f"wrote [bold]{patch.path}[/] ({patch.kind}, {len(patch.updates())} tensors, id {patch.patch_id[:12]})")
    for note in patch.manifest.notes:
        console.print(f"  {note}", highlight=False)
    from ..patch.card_tables import eval_summary

    for line in eval_summary(patch.manifest):
        console.print(f"  {line}", highlight=False)


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="YAML recipe(s) to check without running them (e.g. recipes/paper/*.yaml).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: train.steps=20")] = None,
):
    """Check recipes (keys, types, method parameters, data sources) without building; stops at the first bad one."""
    from ..build_eval import build_plan
    from ..data import load_data
    from ..model import resolve_model
    from ..recipe import load_recipe

    for recipe in recipes:
        r = load_recipe(recipe, set_ or [])
        try:  # a folder must exist and hold config.json, an alias its package; a Hub id is checked for form only (offline)
            resolve_model(r.model.id, r.model.revision)
        except UnpatchError as e:
            raise UnpatchError(f"{recipe}: model.id: {e}") from None
        data = load_data(r)
        build_plan(r)  # metric names and options of the eval section
        sizes = ", ".join(f"{k} {len(v)}" for k, v in vars(data).items() if v)
        learn = f"; learn {r.learn.steps} steps first" if r.learn is not None else ""
        console.print(f"{recipe}: ok ({r.method.name}, {r.patch.kind}, {r.train.steps} steps{learn}; data: {sizes or 'none'})")


@app.command()
def methods():
    """List the unlearning methods with their papers."""
    from rich.table import Column

    from ..methods import list_methods

    # the link is what people copy: never cut it, however narrow the terminal
    table = Table("name", "method", Column("paper", overflow="fold", min_width=32), "kinds", "needs")
    for m in list_methods():
        table.add_row(m.name, m.display, m.paper or "-", ", ".join(m.kinds), ", ".join(m.needs))
    console.print(table)


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


# more commands live in their own modules (one per concern); importing them registers them on `app`
from . import evaluation, examples, importing, share  # noqa: E402,F401  eval, sweep, card, metrics; import; push, pull

examples.attach(app)  # examples in every --help: after every command is registered


def _click_types(name: str) -> tuple[type, ...]:
    import typer._click.exceptions as bundled
    import typer.exceptions as typer_exc

    return tuple({getattr(m, name) for m in (bundled, typer_exc, click.exceptions) if hasattr(m, name)})


_USAGE = _click_types("ClickException")
_EXIT = _click_types("Exit")
_ABORT = _click_types("Abort")


def _usage_line(e: Exception) -> str:
    """click's message on one line, with the command to ask for help (click prints usage + 2 lines)."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    return f"{msg} (see `{ctx.command_path} --help`)" if ctx is not None else msg


def main() -> None:
    debug = os.environ.get("UNPATCH_DEBUG") == "1"
    progress.quiet_third_party()  # before transformers / huggingface_hub are imported: their bars stay off
    # peft probes a property transformers 5 deprecates; the warning says nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        code = app(prog_name="unpatch", standalone_mode=False)
    except UnpatchError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except _USAGE as e:  # typer >= 0.26 raises its own bundled click's exceptions, older ones click's
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `unpatch`: typer has printed the help already
            if e.format_message().strip():
                print(e.format_message(), file=sys.stderr)
            sys.exit(2)
        print(f"error: {_usage_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code or 2)
    except _EXIT as e:  # --version, --help under standalone_mode=False
        sys.exit(getattr(e, "exit_code", 0))
    except (*_ABORT, KeyboardInterrupt):
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: still one line unless debugging
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set UNPATCH_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
