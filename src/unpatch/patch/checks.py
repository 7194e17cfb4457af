"""The checks `load_patch` runs on what a patch folder holds, beyond the bytes matching their
hashes: the manifest must cover the payload (a `"files": {}` must not switch the hash check off),
its fingerprint must be the one its tensor hashes give, the side files must be well-formed JSON
of the expected shape, and every file must be a regular file (a FIFO would block the read).
Against a base: every changed tensor must exist with the patch's shape (check_shapes) and hash
to the patch's fingerprint (check_fingerprint). Nothing here imports torch.

Each failure is one UnpatchError naming the file and key and saying what to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checks import regular_file
from ..errors import UnpatchError
from ..fingerprint import combine

if TYPE_CHECKING:
    from .format import Patch

ENCODINGS = ("dense", "rows", "lowrank")
FIX = "rebuild or re-download the patch"


def read_json(file: Path, fix: str = FIX) -> Any:
    """Parse a JSON side file, refusing special files and non-UTF-8 bytes in one line."""
    regular_file(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnpatchError(f"{file}: not valid JSON ({' '.join(str(e).split())}); {fix}") from None
    except OSError as e:
        raise UnpatchError(f"{file}: cannot read ({e.strerror})") from None


def check_files_cover(folder: Path, files: dict[str, str], payload: list[str], manifest: str) -> None:
    """Every payload file that exists must have its hash in the manifest, and the manifest may
    list only the payload's own names (a listed `../x` or FIFO would be read outside the patch)."""
    for name in files:
        if name not in payload:
            raise UnpatchError(f"{folder / manifest}: files lists {name!r}, which is not part of a {'/'.join(payload)} patch; {FIX}")
    for name in payload:
        if (folder / name).exists() and name not in files:
            raise UnpatchError(f"{folder / manifest}: files has no hash for {name}, so its integrity cannot be checked; {FIX}")


def check_fingerprint_field(folder: Path, base, manifest: str) -> None:
    """`base.fingerprint` must be the combination of `base.tensors`: otherwise a mismatch message
    would print one fingerprint as both the expected and the found one."""
    if combine(dict(base.tensors)) != base.fingerprint:
        raise UnpatchError(f"{folder / manifest}: base.fingerprint is not the hash of base.tensors (the manifest was edited); {FIX}")


def check_lora_config(file: Path, cfg: Any) -> dict[str, Any]:
    """The keys lora_updates reads, with the types it needs."""
    if not isinstance(cfg, dict):
        raise UnpatchError(f"{file}: expected a JSON object (a peft LoraConfig); {FIX}")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UnpatchError(f"{file}: r must be a whole number >= 1 (got {r!r}); {FIX}")
    alpha = cfg.get("lora_alpha")  # negative for a negated patch (the coefficient is folded in), never 0
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha == 0:
        raise UnpatchError(f"{file}: lora_alpha must be a finite number other than 0 (got {alpha!r}); {FIX}")
    pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                                                for v in pattern.values()):
        raise UnpatchError(f"{file}: alpha_pattern must map module patterns to finite numbers; {FIX}")
    return cfg


def delta_meta(file: Path, metadata: dict[str, str], tensors) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(encodings, shapes) from delta.safetensors' `unpatch` metadata, every value checked."""
    raw = metadata.get("unpatch")
    if raw is None:
        if any("::" in k for k in tensors):
            raise UnpatchError(f"{file}: has sparse tensors but no `unpatch` metadata saying how to read them; rebuild the patch")
        return {k: "dense" for k in tensors}, {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        raise UnpatchError(f"{file}: its `unpatch` metadata is not valid JSON; {FIX}") from None
    if not isinstance(meta, dict):
        raise UnpatchError(f"{file}: its `unpatch` metadata is not a JSON object; {FIX}")
    encodings, shapes = meta.get("encodings") or {k: "dense" for k in tensors}, meta.get("shapes") or {}
    if not isinstance(encodings, dict) or not isinstance(shapes, dict):
        raise UnpatchError(f"{file}: `unpatch` metadata: encodings and shapes must be objects; {FIX}")
    for name, enc in encodings.items():
        if enc not in ENCODINGS:
            raise UnpatchError(f"{file}: `unpatch` metadata: tensor {name!r} has encoding {enc!r}; expected one of {', '.join(ENCODINGS)}")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise UnpatchError(f"{file}: `unpatch` metadata: tensor {name!r} has shape {shape!r}; a shape is a list of sizes >= 0")
    return encodings, shapes


def check_base_covers(patch, manifest: str) -> None:
    """Every tensor the payload changes has a base hash in the manifest (checked at load, so
    `verify` without --model already says the patch is not intact)."""
    missing = sorted(set(patch.updates()) - set(patch.manifest.base.tensors))
    if missing:
        raise UnpatchError(f"{patch.path / manifest}: base.tensors has no hash for {missing[0]!r}, which the payload changes "
                           f"(edited or corrupt), so the base check would skip it; {FIX}")


def check_fingerprint(patch: Patch, actual: dict[str, str], model_label: str, force: bool) -> bool:
    """Refuse a patch built for another base; returns True when the mismatch was forced through.

    The tensors checked are the ones the payload changes (patch.updates()), not the manifest's
    list: a manifest with an entry deleted would otherwise pass on any base. Every one of them
    needs a recorded hash; the message prints both fingerprints over exactly those tensors."""
    expected = patch.manifest.base.tensors
    touched = sorted(patch.updates())
    unlisted = [n for n in touched if n not in expected]
    if unlisted:  # not forceable: there is nothing to compare against, the manifest is damaged
        raise UnpatchError(f"{patch.label()}: its manifest records no base hash for tensor {unlisted[0]!r}, which the payload "
                           "changes (unpatch.json base.tensors was edited or is corrupt); rebuild or re-download the patch")
    differ = [n for n in touched if actual.get(n) != expected[n]]
    if not differ:
        return False
    if force:
        return True
    want = combine({n: expected[n] for n in touched})
    got = combine({n: actual.get(n, "missing") for n in touched})
    raise UnpatchError(
        f"{patch.label()}: built for base {patch.manifest.base.id} with fingerprint {want[:16]}, "
        f"but {model_label} has fingerprint {got[:16]} over the same {len(touched)} tensors "
        f"({len(differ)} differ, e.g. {differ[0]!r}); apply it to the base it was built on, or pass --force")


def check_shapes(patch: Patch, shapes: dict[str, tuple[int, ...]], model_label: str) -> dict:
    """Every tensor the patch changes must exist in the model with the right shape."""
    updates = patch.updates()
    for name, u in updates.items():
        if name not in shapes:
            raise UnpatchError(f"{patch.label()}: changes tensor {name!r}, which {model_label} does not have; is this the right base model?")
        want = tuple(shapes[name])
        if u.shape_hint() != want:
            raise UnpatchError(f"{patch.label()}: tensor {name!r} has shape {u.shape_hint()} in the patch but {want} in {model_label}")
        if u.encoding == "rows":  # numpy where it can: `apply --out` checks without importing torch
            rows, values = (u.source.array(k) for k in u.keys) if u.arrays_ok() else u.parts
            n = int(rows.shape[0]) if rows.ndim == 1 else -1
            if n and (int(rows.min()) < 0 or int(rows.max()) >= want[0]):
                raise UnpatchError(f"{patch.label()}: tensor {name!r} changes row {int(rows.max())}, but {model_label} has {want[0]} rows")
            if tuple(values.shape) != (n, *want[1:]):
                raise UnpatchError(f"{patch.label()}: tensor {name!r} has {tuple(values.shape)} row values for {n} rows of width {want[1:]}")
    return updates
