"""Merged model folders: `apply --out` and `revert`, streamed one tensor at a time.

A merged folder is the base checkpoint with patches added, plus `unpatch_ledger.json`: the base
(id, revision, hashes of every touched tensor) and the patches with their scales. Revert reads
the touched tensors back from the base, checks them against the ledger, and re-applies the
patches that stay: the result is bit-identical to applying just those to the base. Where the
base cannot be read back it subtracts instead and reports the largest round-trip deviation.
Peak memory is about two tensors (the one being written and one update), as in mergekit's lazy mode.
Dense and row-sparse deltas on float16/32/64 bases stream through numpy, with the same bits as the
torch path (update.py), so `apply --out` of such patches never imports torch (~3 s here); LoRA
(peft's matmul, for bit-identity with its merge) and bfloat16 tensors go through torch.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import checks
from ..atomic import atomic_dir, check_out_path, claims
from ..errors import UnpatchError
from ..fingerprint import combine, tensor_hash
from ..model import checkpoint_folder, model_revision, resolve_model
from ..safetensors_io import ITEMSIZE, NUMPY, Parts, write_streaming
from .checkpoint import INDEX, Checkpoint, check_against
from .format import PICKLED, Patch
from .reuse import Buffers, ReusingTensors
from .store import load_patch
from .update import LazyTensors

if TYPE_CHECKING:
    import torch

LEDGER = "unpatch_ledger.json"
FLOATS = ("F16", "F32", "F64")  # base dtypes the numpy path adds to
CHUNK = 4 << 20  # bytes of a base tensor per streamed piece: a few MB stay in the CPU's caches


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.suffix not in PICKLED and f.name not in (LEDGER, INDEX):
            shutil.copy2(f, dst / f.name)
    if (src / INDEX).exists():
        shutil.copy2(src / INDEX, dst / INDEX)


def _write(ckpt: Checkpoint, out: Path, produce) -> None:
    """Write every shard of `ckpt` to `out`, each tensor as `produce(name)` returns it."""
    from .. import progress

    with progress.task(f"writing {out.name}", sum(len(f.keys()) for f in ckpt.files), unit="tensors") as bar:
        def counted(n: str):
            t = produce(n)
            bar.advance()
            return t

        for f in ckpt.files:
            specs = {n: (f.code(n), f.shape(n)) for n in f.keys()}
            write_streaming(out / f.path.name, specs, ((n, counted(n)) for n in specs), metadata=f.metadata or {"format": "pt"})


def _pieces(st, name: str, ups, buf: Buffers):
    """Flat CHUNK-byte pieces of base tensor `name` with its dense updates added (write_streaming
    is done with each piece before the next is read into the same buffer)."""
    code, shape, _, _ = st.entries[name]
    n, step = math.prod(shape), max(1, CHUNK // ITEMSIZE[code])
    for a in range(0, n, step):
        span = (a, min(n, a + step))
        w = buf.read_array(st, name, span)
        for u, scale in ups:
            u.add_to_array(w, scale, span)
        yield w


def _entry(patch: Patch, scale: float, forced: bool, touched) -> dict:
    return {"name": patch.name, "path": str(patch.path.resolve()) if patch.path else None, "patch_id": patch.patch_id,
            "kind": patch.kind, "scale": scale, "coefficient": patch.manifest.coefficient, "forced": forced,
            "tensors": sorted(touched)}


@claims(lambda a: a["out"])  # held from the first check to the last rename; a killed run's temporaries go
def apply_to_folder(model: str, patches: list[tuple[Patch, float]], out: str | Path, force: bool = False,
                    overwrite: bool = False, revision: str | None = None) -> dict:
    """Write base + sum of scaled patches as a model folder loadable by from_pretrained."""
    out = Path(out)
    for _, scale in patches:
        checks.scale(scale, "scale")
    check_out_path(out, overwrite)
    ref = resolve_model(model, revision)
    folder = checkpoint_folder(ref)
    ckpt = Checkpoint(folder)
    previous = read_ledger(folder) if (folder / LEDGER).exists() else None  # checked: a torn ledger fails in one line
    base_hashes: dict[str, str] = {}
    ledger_hash = previous["base"].get("hash", "sha256") if previous else "sha256"
    plan = []
    for patch, scale in patches:
        updates, forced = check_against(patch, ckpt, f"model {ref.id}", force, raw_hashes=base_hashes, ledger_hash=ledger_hash)
        plan.append((patch, scale, forced, updates))
    by_tensor: dict[str, list] = {}
    for _patch, scale, _, updates in plan:
        for n, u in updates.items():
            by_tensor.setdefault(n, []).append((u, scale))

    # reused buffers instead of fresh memory per tensor: one for the base tensor being written
    # (write_streaming is done with it before the next is produced), two for the update's parts
    base_buf, part_bufs = Buffers(1), Buffers(2)
    for ups in by_tensor.values():
        for u, _ in ups:
            if isinstance(u.source, LazyTensors) and not isinstance(u.source, ReusingTensors):
                u.source = ReusingTensors(u.source.file, part_bufs)

    def produce(name: str):
        # numpy where it can, so torch is never imported; otherwise torch, with the same bits.
        # An untouched tensor, or one changed only by dense updates (elementwise), streams in
        # CHUNK-sized pieces through two small buffers: no fresh memory of a whole tensor
        # (zeroing fresh pages was over a third of the command's time on a busy machine).
        st, ups = ckpt.where[name], by_tensor.get(name, ())
        code = st.code(name)
        if code in (NUMPY if not ups else FLOATS) and all(u.arrays_ok() and u.encoding == "dense" for u, _ in ups):
            return Parts(code, st.shape(name), _pieces(st, name, ups, base_buf))
        if code in FLOATS and all(u.arrays_ok() for u, _ in ups):  # row-sparse: the whole tensor at once
            w = base_buf.read_array(st, name)
            for u, scale in ups:
                u.add_to_array(w, scale)
            return w
        t = base_buf.read(st, name)
        for u, scale in ups:
            u.add_to(t, scale)
        return t

    if previous:  # applying on top of a merged folder extends its ledger
        base = previous["base"]
        base["tensors"] = {**base_hashes, **base["tensors"]}
        applied = previous["applied"]
    else:
        base = {"id": ref.id, "revision": model_revision(ref), "hash": ledger_hash, "tensors": base_hashes}
        applied = []
    base["fingerprint"] = combine(base["tensors"])
    ledger = {"format": "unpatch-ledger", "format_version": 1, "base": base,
              "applied": applied + [_entry(p, s, f, u) for p, s, f, u in plan]}
    with atomic_dir(out, overwrite) as tmp:
        _copy_side_files(folder, tmp)
        _write(ckpt, tmp, produce)
        (tmp / LEDGER).write_text(json.dumps(ledger, indent=2))
        _card(tmp, ledger, out.name)
    return ledger


def _card(tmp: Path, ledger: dict, name: str) -> None:
    """README.md of the merged folder (replacing the base's card copied with the side files)."""
    from .merged_card import render_merged_card

    (tmp / "README.md").write_text(render_merged_card(ledger, name))


def _rounding_bound(merged: torch.Tensor, restored: torch.Tensor, steps: int) -> float:
    """Upper bound of |restored - base| after `steps` arithmetic reverts: applying rounded once
    per patch (merged = fl(base + d)) and reverting once more (restored = fl(merged - d)), so each
    changed element is off by at most steps * (ulp(merged) + ulp(restored)) / 2."""
    import torch

    if not steps or not merged.is_floating_point():
        return 0.0
    changed = merged != restored
    if not bool(changed.any()):
        return 0.0
    eps = torch.finfo(merged.dtype).eps

    def ulp(x: torch.Tensor) -> torch.Tensor:
        _, e = torch.frexp(x.double().abs())
        return eps * torch.pow(2.0, e.double() - 1)

    return float((steps * (ulp(merged[changed]) + ulp(restored[changed])) / 2).max())


def read_ledger(folder: Path) -> dict:
    from .checks import read_json

    file = Path(folder) / LEDGER
    if not file.exists():
        raise UnpatchError(f"{folder}: no {LEDGER}, so not a merged folder written by `unpatch apply --out`; nothing to revert")
    ledger = read_json(file, "it is not as `unpatch apply --out` wrote it; write the merged folder again")
    try:  # the keys revert reads, with their types: an edited ledger fails here in one line
        ok = ledger.get("format") == "unpatch-ledger" and isinstance(ledger["base"]["tensors"], dict) and isinstance(ledger["base"]["id"], str) \
            and all(isinstance(e["name"], str) and isinstance(e["tensors"], list) and isinstance(e["scale"], int | float)
                    and math.isfinite(e["scale"]) and "patch_id" in e for e in ledger["applied"])
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UnpatchError(f"{file}: not a valid unpatch ledger (edited or corrupt); revert needs it as `unpatch apply --out` wrote it")
    return ledger


def _load_entry_patch(entry: dict) -> Patch:
    if not entry.get("path"):
        raise UnpatchError(f"patch {entry['name']!r}: the ledger has no path to it, so it cannot be re-applied")
    patch = load_patch(entry["path"], allow_pickle=None)
    if patch.patch_id != entry["patch_id"]:
        raise UnpatchError(f"{entry['path']}: changed since it was applied (patch id differs from the ledger); restore that patch first")
    return patch


def _readable_base(ledger: dict, touched: set[str]) -> tuple[Checkpoint | None, str]:
    """The base checkpoint if it can be read back and matches the ledger, else (None, why)."""
    base = ledger["base"]
    try:
        ckpt = Checkpoint(checkpoint_folder(resolve_model(base["id"], base.get("revision"))))
    except UnpatchError as e:
        return None, str(e)
    missing = sorted(n for n in touched if n not in ckpt.where)
    actual = ckpt.hashes(sorted(set(touched) - set(missing)), base.get("hash", "sha256"))
    for n in sorted(touched):
        if n in missing or actual[n] != base["tensors"].get(n):
            return None, f"base {base['id']} no longer matches the ledger at tensor {n!r}"
    return ckpt, ""


@claims(lambda a: a["out"] or a["merged"])
def revert_folder(merged: str | Path, patch: str | None = None, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Take one patch (by name or path) or all patches off a merged folder. Returns a report:
    mode (exact | arithmetic), verified (restored tensors hash to the base), max_deviation."""
    merged = Path(merged)
    ledger = read_ledger(merged)
    entries = ledger["applied"]
    if not entries:
        raise UnpatchError(f"{merged}: no patch is applied (its ledger is empty); nothing to revert")
    gone = [e for e in entries if patch is None or patch in (e["name"], e["path"], Path(e["path"] or "").name)]
    if not gone:
        raise UnpatchError(f"patch {patch!r} is not in {merged / LEDGER} (applied: {', '.join(e['name'] for e in entries) or 'none'})")
    keep = [e for e in entries if e not in gone]
    touched = {n for e in entries for n in e["tensors"]}
    target = Path(out) if out else merged
    if out:
        check_out_path(target, overwrite)
    ckpt = Checkpoint(merged)
    base, why = _readable_base(ledger, touched)
    report = {"mode": "exact" if base else "arithmetic", "reason": why, "max_deviation": 0.0, "verified": False}
    if base:
        plan = [(_load_entry_patch(e).updates(), e["scale"]) for e in keep]
    else:
        plan = [(_load_entry_patch(e).updates(), -e["scale"]) for e in reversed(gone)]
    hashes: dict[str, str] = {}  # of restored tensors, when reverting everything
    algo = ledger["base"].get("hash", "sha256")

    def produce(name: str) -> torch.Tensor:
        if name not in touched:
            return ckpt.read(name)
        if base:
            t = base.read(name)
            hashes[name] = tensor_hash(t, algo)
            for updates, scale in plan:
                if name in updates:
                    updates[name].add_to(t, scale)
            return t
        merged_t = ckpt.read(name)
        t = merged_t.clone()
        for updates, scale in plan:
            if name in updates:
                updates[name].add_to(t, scale)
        hashes[name] = tensor_hash(t, algo)
        # the base is unreadable, so the deviation from it cannot be measured (a round trip
        # re-adding the patches gives back the merged bytes and reads 0); report the rounding bound
        steps = sum(1 for updates, _ in plan if name in updates)
        report["max_deviation"] = max(report["max_deviation"], _rounding_bound(merged_t, t, steps))
        return t

    new = dict(ledger, applied=keep)
    with atomic_dir(target, overwrite=True) as tmp:
        _copy_side_files(merged, tmp)
        _write(ckpt, tmp, produce)
        (tmp / LEDGER).write_text(json.dumps(new, indent=2))
        _card(tmp, new, Path(target).name)
    if keep:  # exact mode re-applies the kept patches to verified base bytes
        report["verified"] = base is not None
    else:
        report["verified"] = all(hashes.get(n) == h for n, h in ledger["base"]["tensors"].items() if n in touched)
    return report

