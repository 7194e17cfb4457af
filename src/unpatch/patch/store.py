"""Patch folders on disk: save (atomically, with its card), load (checked: version, hashes,
tensors, finiteness), and rewrite (new metrics, extra files and card; the payload's bytes kept).

The format itself (names, manifest, payload encodings) is patch.format; the card's text is
patch.card: this module is the one that writes and reads folders."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..atomic import atomic_dir
from ..checks import own_file, regular_file
from ..errors import UnpatchError
from ..fingerprint import file_sha256
from ..hashcache import file_digest, file_key, known, remember
from ..safetensors_io import SafetensorsFile
from ..version import __version__
from .card import EXTRA_FILES, render_card
from .checks import check_base_covers, check_files_cover, check_fingerprint_field, check_lora_config, delta_meta, read_json
from .format import DELTA_FILE, FORMAT, FORMAT_VERSION, LORA_CONFIG, LORA_FILE, MANIFEST, PICKLED, Manifest, Patch, now
from .reuse import Buffers
from .update import LazyTensors

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------- save / load


def save_patch(patch: Patch, out: str | Path, overwrite: bool = False) -> Patch:
    """Write the patch folder atomically; returns the patch as saved (with file hashes)."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        tensors = {k: patch.tensors[k].detach().to("cpu").contiguous() for k in patch.tensors}
        if patch.kind == "delta":
            shapes = {n: list(u.shape_hint()) for n, u in patch.updates().items()}
            # one metadata key: safetensors writes several in random order, which breaks byte-identical builds
            meta = {"unpatch": json.dumps({"format": "unpatch-delta", "encodings": patch.encodings, "shapes": shapes}, sort_keys=True)}
            save_file(tensors, tmp / DELTA_FILE, metadata=meta)
            payload = [DELTA_FILE]
        else:
            save_file(tensors, tmp / LORA_FILE, metadata={"format": "pt"})
            (tmp / LORA_CONFIG).write_text(json.dumps(patch.lora_config, indent=2, sort_keys=True))
            payload = [LORA_FILE, LORA_CONFIG]
        files = {f: file_sha256(tmp / f) for f in payload}
        manifest = patch.manifest.model_copy(update={"files": files, "created": patch.manifest.created or now()})
        saved = replace(patch, manifest=manifest, path=out)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        if patch.recipe_text is not None:
            (tmp / "recipe.yaml").write_text(patch.recipe_text)
        (tmp / "README.md").write_text(patch.card_text or render_card(saved))
    return saved


def _read_manifest(folder: Path) -> Manifest:
    file = folder / MANIFEST
    if not file.exists():
        hint = " (it looks like a plain PEFT adapter)" if (folder / LORA_CONFIG).exists() else ""
        raise UnpatchError(f"{folder}: no {MANIFEST}, so not an unpatch patch{hint}; build one with `unpatch build RECIPE`")
    raw = read_json(file)  # a regular file only: a FIFO named unpatch.json would block here
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UnpatchError(f"{file}: format is {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise UnpatchError(f"{file}: unknown patch format version {raw.get('format_version')!r} (this unpatch {__version__} reads version {FORMAT_VERSION}); upgrade unpatch")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise UnpatchError(f"{file}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def _refuse_pickle(file: Path, allow_pickle: bool | None) -> UnpatchError:
    """allow_pickle None: the command has no --allow-pickle, so the message does not offer it."""
    hint = ", or pass --allow-pickle if you trust it" if allow_pickle is not None else ""
    return UnpatchError(f"{file}: pickled checkpoints can run code when loaded and are refused; convert it to safetensors{hint}")


def _load_pickled(folder: Path, allow_pickle: bool | None) -> dict[str, torch.Tensor]:
    found = sorted(p for p in folder.iterdir() if p.suffix in PICKLED)
    if not found:
        return {}
    regular_file(found[0])
    if not allow_pickle:
        raise _refuse_pickle(found[0], allow_pickle)
    import torch

    return torch.load(found[0], map_location="cpu", weights_only=True)


def _finite(tensors, key: str, buffers: Buffers) -> bool:
    """No NaN or Inf in one payload tensor; read with numpy where it has the dtype (no torch
    import), checked 1M elements at a time into one small mask (no fresh pages per tensor)."""
    if isinstance(tensors, LazyTensors) and tensors.has_arrays([key]):
        import numpy as np

        flat = buffers.read_array(tensors.file, key).reshape(-1)
        if flat.dtype.kind != "f" or not flat.size:
            return True
        mask = np.empty(min(flat.size, 1 << 20), dtype=bool)
        for at in range(0, flat.size, mask.size):
            part = flat[at: at + mask.size]
            if not np.isfinite(part, out=mask[: part.size]).all():
                return False
        return True
    import torch

    t = tensors[key]
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def load_patch(path: str | Path, allow_pickle: bool | None = False) -> Patch:
    """Load and check a patch folder: manifest version, file hashes, safetensors integrity, finiteness."""
    p = Path(path)
    if p.is_file():
        if p.suffix in PICKLED and not allow_pickle:
            raise _refuse_pickle(p, allow_pickle)
        p = p.parent if p.name == MANIFEST else p
    if not p.is_dir():
        raise UnpatchError(f"{p}: no such patch folder; build one with `unpatch build RECIPE`")
    manifest = _read_manifest(p)
    payload = DELTA_FILE if manifest.kind == "delta" else LORA_FILE
    check_files_cover(p, manifest.files, [DELTA_FILE] if manifest.kind == "delta" else [LORA_FILE, LORA_CONFIG], MANIFEST)
    check_fingerprint_field(p, manifest.base, MANIFEST)
    if (p / payload).exists():
        st = SafetensorsFile(regular_file(p / payload))
        tensors, metadata = LazyTensors(st), st.metadata
    else:
        tensors, metadata = _load_pickled(p, allow_pickle), {}
        if not tensors:
            raise UnpatchError(f"{p}: missing {payload}; the patch is incomplete, rebuild or re-download it")
    for f, digest in manifest.files.items():
        if f.endswith(".safetensors") and not (p / f).exists():
            continue  # pickled payload explicitly allowed above
        if not (p / f).exists() or file_digest(regular_file(p / f)) != digest:  # cached per file identity (hashcache)
            raise UnpatchError(f"{p / f}: content differs from the hash in {MANIFEST} (corrupt or edited); rebuild or re-download the patch")
    finite_key = file_key(p / payload) if (p / payload).exists() else None
    if finite_key is None or not known(p / payload, "finite"):
        buffers = Buffers(1)  # one at a time, into one reused buffer: a full-model delta is never held whole
        for k in tensors:
            if not _finite(tensors, k, buffers):
                raise UnpatchError(f"{p}: tensor {k!r} contains NaN or Inf; the build diverged, rebuild with a lower learning rate")
        if finite_key is not None:
            remember(p / payload, "finite", finite_key)
    lora_config = check_lora_config(p / LORA_CONFIG, read_json(p / LORA_CONFIG)) if manifest.kind == "lora" else None
    if lora_config and lora_config.get("use_dora"):
        raise UnpatchError(f"{p / LORA_CONFIG}: DoRA adapters are not supported; use plain LoRA")
    encodings, shapes = delta_meta(p / DELTA_FILE, metadata, tensors) if manifest.kind == "delta" else ({}, {})
    recipe = regular_file(p / "recipe.yaml").read_text(errors="replace") if (p / "recipe.yaml").exists() else None
    patch = Patch(manifest, tensors, lora_config, encodings, shapes, p, recipe)
    check_base_covers(patch, MANIFEST)
    return patch


# ------------------------------------------------------------------------------ rewriting a folder


def read_extras(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in EXTRA_FILES:
        f = own_file(folder, name)  # a regular file of the patch: never a link to outside it, never a FIFO
        if f is not None:
            try:
                out[name] = True if name.endswith(".png") else json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UnpatchError(f"{f}: not valid JSON ({e}); fix or delete it") from e
    return out


def rewrite_patch(path: str | Path, metrics: dict[str, Any] | None = None, files: dict[str, bytes] | None = None) -> Patch:
    """Rewrite a patch folder's manifest metrics (merged key by key), extra files and card, atomically.

    The payload files are hard-linked (copied where links fail) into a sibling temporary folder
    that then replaces the old one, so the payload's bytes and hashes never change and `unpatch
    verify` still passes; README.md and the EXTRA_FILES are not in the manifest's hashed `files`.
    """
    patch = load_patch(path, allow_pickle=None)  # verifies the payload hashes before anything is touched (None: no --allow-pickle here)
    folder = Path(path)
    if not os.access(folder.parent, os.W_OK):
        raise UnpatchError(f"{folder}: its parent folder is not writable; copy the patch somewhere writable and run this on the copy")
    manifest = patch.manifest.model_copy(update={"metrics": {**patch.manifest.metrics, **(metrics or {})}})
    files = files or {}
    with atomic_dir(folder, overwrite=True) as tmp:
        for f in folder.iterdir():
            if f.name in (MANIFEST, "README.md", *files):
                continue
            if f.is_symlink():  # a link to outside the patch is refused by name, never followed (own_file)
                if f.resolve().is_dir():
                    raise UnpatchError(f"{f}: is a symlink to the folder {f.resolve()}; a patch holds only its own files, "
                                       "replace the link with a copy or remove it")
                own_file(folder, f.name)
                _link(f, tmp / f.name)  # an inside link (e.g. into the HF cache's blobs): os.link follows it to the file
            elif f.is_dir():  # nothing of ours, but never drop what a user put there (its links stay links)
                shutil.copytree(f, tmp / f.name, symlinks=True, copy_function=_link)
            elif f.is_file():
                _link(f, tmp / f.name)
            else:
                raise UnpatchError(f"{f}: is not a regular file (a FIFO, socket or device); remove it from the patch folder")
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        saved = dataclasses.replace(patch, manifest=manifest, path=folder)
        (tmp / "README.md").write_text(render_card(saved, read_extras(tmp)))
    return load_patch(folder)


def _link(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def regenerate_card(path: str | Path) -> Path:
    """`unpatch card`: write README.md again from the manifest and the extra files."""
    rewrite_patch(path)
    return Path(path) / "README.md"
