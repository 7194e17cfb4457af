"""CLI command `unpatch import`: a PEFT LoRA adapter or a fine-tuned checkpoint -> a patch (unpatch.importer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import Force, Overwrite, console

app = typer.Typer()  # assembled into the root app by cli/__init__.py


@app.command("import", epilog="Examples:\n\n  unpatch import ./my-lora-adapter --model HuggingFaceTB/SmolLM2-135M-Instruct --out patches/my-lora\n\n"
             "  unpatch import ./biased-finetune --model ./base-model --coefficient -1 --out patches/anti-bias   # negated task vector")
def import_cmd(
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder, or a fine-tuned model folder (same architecture as the base).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The base it was trained from: Hub id, folder, .gguf or alias.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Patch folder to write (atomically).")],
    name: Annotated[str | None, typer.Option("--name", help="Patch name (default: the adapter folder's name).")] = None,
    coefficient: Annotated[float, typer.Option("--coefficient", help="Built-in strength; -1 negates (a task vector of the behaviour to remove).")] = 1.0,
    overwrite: Overwrite = False,
    force: Force = False,
):
    """Make a fingerprinted patch from an adapter trained elsewhere, after checking it fits the base."""
    from ..importer import import_adapter

    p = import_adapter(adapter, model, out, name=name, coefficient=coefficient, overwrite=overwrite, force=force)
    console.print(f"wrote {p.path} ({p.kind}, {len(p.updates())} tensors, id {p.patch_id[:12]}); base fingerprint "
                  f"{p.manifest.base.fingerprint[:16]}", highlight=False)
