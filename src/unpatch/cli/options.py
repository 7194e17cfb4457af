"""Options and helpers the command modules share, declared once: --out, --overwrite, --force,
--model, --device, --dtype, --allow-pickle, the console every command prints to, and how a patch
argument (a folder or a Hub id) is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import progress
from ..errors import UnpatchError

console = progress.console()  # off a terminal: no wrapping of paths / JSON in logs

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
