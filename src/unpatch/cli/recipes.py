"""CLI commands for recipes: build (or its --dry-run plan), validate, and the methods a recipe can name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UnpatchError
from .options import Out, Overwrite, console

app = typer.Typer()  # assembled into the root app by cli/__init__.py


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
    from ..model import resolve_model
    from ..recipe import load_recipe
    from ..sources import load_data

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
