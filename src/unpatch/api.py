"""The Python API (`import unpatch`): the CLI's commands as functions, for notebooks and scripts.

    import unpatch
    patch = unpatch.build({"model": {"id": "smollm2-135m"}, "data": {"forget": "forget.txt"},
                           "method": {"name": "ga"}, "train": {"steps": 8}}, out="patches/ga")
    model, tok = unpatch.load_model("smollm2-135m")
    with unpatch.apply(model, patch, scale=0.6):       # in place; the base comes back bit for bit
        ...
    results = unpatch.evaluate(model, tok, [patch], scales=[0.5, 1.0], limit=50)

Each function is a thin layer over the library call the CLI makes, so numbers and files equal
the CLI's. `unpatch/__init__.py` imports this module lazily: `import unpatch` stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UnpatchError
from .patch.apply import Applied as _Applied
from .patch.format import Patch


class Applied(_Applied):
    """Patches applied in place to a loaded model (unpatch.patch.apply.Applied), usable as a context
    manager: leaving the `with` block reverts them, bit for bit."""

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc) -> None:
        if self.entries and not self.revert():
            raise UnpatchError("reverting did not restore the base weights' fingerprint")


def build(recipe: str | Path | dict | Any, out: str | Path | None = None, *, overwrite: bool = False,
          overrides: Sequence[str] = (), resume: bool = False, run_eval: bool = True) -> Patch:
    """Build a patch from a recipe: a YAML path, a `unpatch.recipe.Recipe`, or a dict shaped like
    the YAML (relative data paths resolve against the current folder). Same as `unpatch build`."""
    from .builder import build as run

    return run(recipe, out=out, overwrite=overwrite, overrides=overrides, resume=resume, run_eval=run_eval)


def load_patch(ref: str | Path, allow_pickle: bool = False) -> Patch:
    """A patch folder, or a Hub id `owner/name[@rev]` (downloaded into the HF cache once)."""
    from .hub import resolve_patch

    return resolve_patch(str(ref), allow_pickle=allow_pickle)


def load_model(spec: str = "smollm2-135m", device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer) for a Hub id, folder, .gguf or alias (default: the offline SmolLM2-135M)."""
    from .model import load_model as load

    model, tok, _ = load(spec, device=device, dtype=dtype)
    return model, tok


def _patches(patches) -> list[Patch]:
    items = patches if isinstance(patches, list | tuple) else [patches]
    return [p if isinstance(p, Patch) else load_patch(p) for p in items]


def _scales(scale, n: int) -> list[float]:
    scales = list(scale) if isinstance(scale, list | tuple) else [scale] * n
    if len(scales) != n:
        raise UnpatchError(f"scale: got {len(scales)} values for {n} patches; give one, or one per patch")
    return [float(s) for s in scales]


def apply(model, patches, scale: float | Sequence[float] = 1.0, *, force: bool = False) -> Applied:
    """Apply patches (objects, folders or Hub ids) to a loaded model in place; returns the
    `Applied` record (`with unpatch.apply(...):` reverts on exit; or call `revert`)."""
    items = _patches(patches)
    applied = Applied(model, "the model")
    for p, s in zip(items, _scales(scale, len(items)), strict=True):
        applied.apply(p, s, force=force)
    return applied


def write_merged(patches, out: str | Path, *, model: str | None = None, scale: float | Sequence[float] = 1.0,
          force: bool = False, overwrite: bool = False) -> Path:
    """`unpatch apply --out`: write base + patches as a merged folder (from_pretrained-loadable,
    with a ledger and a card). The base defaults to the first patch's."""
    from .patch.merged import apply_to_folder

    items = _patches(patches)
    apply_to_folder(model or items[0].manifest.base.id, list(zip(items, _scales(scale, len(items)), strict=True)), out,
                    force=force, overwrite=overwrite)
    return Path(out)


def revert(target, patch: str | None = None, *, out: str | Path | None = None, overwrite: bool = False):
    """Take patches off: an `Applied` (in memory; returns True when the fingerprint verifies), or
    a merged folder (`unpatch revert`; returns the report: mode, verified, max_deviation)."""
    if isinstance(target, _Applied):
        return target.revert(patch)
    from .patch.merged import revert_folder

    return revert_folder(target, patch=patch, out=out, overwrite=overwrite)


def _options(metrics, options, limit):
    from .evals.runner import parse_metric_options, parse_metrics

    names = parse_metrics(metrics)
    items = [f"{m}.{k}={v}" for m, kv in (options or {}).items() for k, v in kv.items()] if isinstance(options, dict) else list(options or [])
    return names, parse_metric_options(items, names, limit)


def evaluate(model, tokenizer, patches=(), scales: Sequence[float] = (1.0,), *, metrics: str | Sequence[str] | None = None,
             options: dict[str, dict[str, Any]] | Sequence[str] | None = None, limit: int | None = None,
             force: bool = False) -> dict[str, Any]:
    """`unpatch eval`: the base, then every patch at every scale, on this one loaded model.
    `options` as {"crows_pairs": {"limit": 50}} or ["crows_pairs.limit=50"]."""
    from .evals.runner import evaluate as run
    from .evals.runner import variants_for

    names, opts = _options(metrics, options, limit)
    return run(model, tokenizer, variants_for(_patches(list(patches)) if patches else [], list(scales)), names, opts, force=force)


def sweep(model, tokenizer, patch, scales: str | Sequence[float] = "0:1.5:0.25", *, metrics: str | Sequence[str] | None = None,
          options: dict[str, dict[str, Any]] | Sequence[str] | None = None, limit: int | None = None,
          max_ppl_increase: float | None = 0.02, write: bool = False, force: bool = False) -> dict[str, Any]:
    """`unpatch sweep`: the patch at every scale and the recommended one; `write=True` also writes
    sweep.json / sweep.png / the card into the patch folder."""
    from .evals.sweep import PPL, parse_scales, write_sweep
    from .evals.sweep import sweep as run

    (p,) = _patches(patch)
    names, opts = _options(metrics, options, limit)
    grid = parse_scales(scales) if isinstance(scales, str) else [float(s) for s in scales]
    sw = run(model, tokenizer, p, grid, names, opts, max_ppl_increase=max_ppl_increase if PPL in names else None, force=force)
    if write:
        write_sweep(p.path, sw)
    return sw


def push(patch: str | Path, repo: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False) -> str:
    """`unpatch push`: verify and upload a patch folder; returns the commit (or PR) URL."""
    from .hub import push as run

    return run(patch, repo, private=private, revision=revision, create_pr=create_pr)


def pull(ref: str) -> Path:
    """`unpatch pull`: download a patch into the HF cache (checked); returns its folder."""
    from .hub import pull as run

    p = load_patch(run(ref))
    return p.path
