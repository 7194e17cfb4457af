"""CLI commands for sharing: push and pull through the Hugging Face Hub, and the robustness audit
whose report travels with a pushed patch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import checks
from .options import Device, Dtype, Force, ModelOpt, _load, console

app = typer.Typer()  # assembled into the root app by cli/__init__.py


@app.command()
def push(
    patch: Annotated[str, typer.Argument(help="Patch folder to upload.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo id, owner/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private (a flag; existing repos keep their visibility).")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
):
    """Upload a verified patch (manifest, payload, recipe, card) to the Hugging Face Hub."""
    from ..hub import push as hub_push

    console.print(f"pushed {patch} to {repo}: {hub_push(patch, repo, private=private, revision=revision, create_pr=create_pr)}")


@app.command()
def pull(ref: Annotated[str, typer.Argument(help="owner/name[@revision]")]):
    """Download a patch into the Hugging Face cache (HF_HUB_OFFLINE=1: find it there), check it, print its folder."""
    from ..hub import pull as hub_pull
    from ..patch.store import load_patch

    p = load_patch(hub_pull(ref), allow_pickle=None)  # checks hashes and tensors, like `verify`
    print(p.path)  # plain print: scripts capture this path


@app.command()
def audit(
    patch: Annotated[str, typer.Argument(help="Patch folder or Hub id.")],
    model: ModelOpt = None,
    scale: Annotated[float, typer.Option("--scale", "-s", help="Relative to as built (1 = as built).")] = 1.0,
    forget: Annotated[str | None, typer.Option("--forget", help="Forget texts (builtin:, hub: or a file); default: the recipe's.")] = None,
    retain: Annotated[str | None, typer.Option("--retain", help="Retain texts; default: the recipe's, else builtin:wikitext-tiny.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Use the first N texts of each set (0 = all).")] = 64,
    bits: Annotated[list[int] | None, typer.Option("--bits", help="Quantisation widths to try (default 8 and 4).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Fine-tuning steps on retain data (0 = skip).")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate of the fine-tune.")] = 5e-5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per text.")] = 128,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report file (default: audit.json in the patch folder).")] = None,
    force: Force = False,
    device: Device = "auto",
    dtype: Dtype = "float32",
):
    """Does the forgetting survive 8/4-bit quantisation and a short fine-tune? Writes audit.json."""
    from ..audit import audit as run_audit
    scale = checks.scale(scale, "--scale")
    lr = checks.lr(lr, "--lr")
    for value, flag, lo in ((limit, "--limit", 0), (steps, "--steps", 0), (batch_size, "--batch-size", 1), (max_length, "--max-length", 2)):
        checks.count(value, flag, lo=lo)
    for b in bits or ():
        checks.count(b, "--bits", lo=2, hi=16)
    p = _load(patch)
    report, file = run_audit(p, model, forget=forget, retain=retain, limit=limit or None, out=out, device=device, dtype=dtype,
                             scale=scale, bits=tuple(bits or (8, 4)), steps=steps, lr=lr, batch_size=batch_size,
                             max_length=max_length, force=force)
    d = report["data"]
    table = Table("stage", "forget NLL", "retain NLL", "forgetting kept", "max |Δw|",
                  title=f"{p.name} × {scale:g} on {report['model']} (forget {d['forget']} ×{d['n_forget']}, retain {d['retain']} ×{d['n_retain']})")
    for stage, row in report["stages"].items():
        kept = row.get("forgetting_kept")
        table.add_row(stage, f"{row['forget_nll']:.4f}", f"{row['retain_nll']:.4f}", "-" if kept is None else f"{kept:.0%}",
                      f"{row['max_weight_change']:.3g}" if "max_weight_change" in row else "-")
    console.print(table)
    console.print(f"wrote {file}")
