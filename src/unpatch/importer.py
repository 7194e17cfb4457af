"""`unpatch import`: adapters made elsewhere become fingerprinted patches.

Two inputs (local folders; safetensors only):
  - a plain PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) -> a `lora` patch
    whose payload is the adapter's tensors unchanged (so PeftModel still loads it as it is);
  - a fine-tuned checkpoint (config.json + *.safetensors of the same architecture) -> a `delta`
    patch holding the task vector, fine-tuned - base, for every tensor that differs.

What a PEFT adapter lacks to be a patch is the fingerprint of the base it was trained on. Here
the base named by --model is checked first (every target tensor exists, with the shape the
adapter implies), and its tensors are hashed as a build would hash them (float32, as loaded).
Whether the adapter was really trained on those exact weights cannot be known; the manifest's
notes say the fingerprint was taken at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import UnpatchError
from .patch.format import LORA_CONFIG, LORA_FILE, BaseRef, Manifest, Patch, library_versions
from .patch.store import save_patch

# PEFT options that change what the adapter computes beyond W + scaling * B @ A
_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (full trained copies of layers)",
                "lora_bias": "LoRA biases", "layers_pattern": None, "trainable_token_indices": "trainable tokens"}


def import_adapter(adapter: str | Path, model: str, out: str | Path, *, name: str | None = None, coefficient: float = 1.0,
                   overwrite: bool = False, force: bool = False) -> Patch:
    """Turn `adapter` (a PEFT LoRA folder or a fine-tuned checkpoint folder) into a patch for
    base `model` at `out`. `coefficient` is the built-in strength (e.g. -1 to negate a task vector)."""
    from .atomic import check_out_path
    from .model import checkpoint_folder, model_revision, resolve_model
    from .patch.merged import Checkpoint

    src = Path(adapter)
    if not src.is_dir():
        raise UnpatchError(f"{adapter}: not a folder; give a PEFT adapter folder or a fine-tuned model folder")
    out = Path(out)
    check_out_path(out, overwrite)  # before reading anything large
    ref = resolve_model(model)
    base = Checkpoint(checkpoint_folder(ref))
    label = f"base {model}"
    name = name or src.resolve().name
    if (src / LORA_CONFIG).exists():
        patch, notes = _from_peft(src, base, label, coefficient, _adapter_base(ref))
    elif (src / "config.json").exists():
        patch, notes = _from_checkpoint(src, base, label, coefficient, force)
    else:
        raise UnpatchError(f"{src}: neither {LORA_CONFIG} (a PEFT adapter) nor config.json (a fine-tuned model); nothing to import")
    hashes = _base_hashes(base, sorted(patch.updates()))
    from .fingerprint import combine

    manifest = Manifest(kind=patch.kind, name=name, coefficient=coefficient, versions=library_versions(),
                        base=BaseRef(id=ref.id, revision=model_revision(ref), dtype="float32", tensors=hashes, fingerprint=combine(hashes)),
                        method={"name": "import", "params": {"source": str(src.resolve()), "from": notes[0]}},
                        notes=[f"imported from {src.resolve()} ({notes[0]})", *notes[1:],
                               "base fingerprint taken at import: the base given to `unpatch import --model`"])
    return save_patch(Patch(manifest, patch.tensors, lora_config=patch.lora_config, encodings=patch.encodings, shapes=patch.shapes), out, overwrite)


def _adapter_base(ref) -> str:
    from .builder import adapter_base

    return adapter_base(ref)


def _read_safetensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnpatchError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); {what}") from e


def _from_peft(src: Path, base, label: str, coefficient: float, base_id: str) -> tuple[Patch, list[str]]:
    try:
        cfg: dict[str, Any] = json.loads((src / LORA_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UnpatchError(f"{src / LORA_CONFIG}: not valid JSON ({e}); fix or re-save the adapter") from e
    if cfg.get("peft_type") != "LORA":
        raise UnpatchError(f"{src / LORA_CONFIG}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be imported")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key) and what:
            raise UnpatchError(f"{src / LORA_CONFIG}: {key} is set ({what}); only plain LoRA (W + scaling * B @ A) can be imported")
    file = src / LORA_FILE
    if not file.exists():
        pickled = [p.name for p in src.glob("adapter_model.*")]
        hint = f" ({pickled[0]} is pickled: re-save it with safe_serialization=True)" if pickled else ""
        raise UnpatchError(f"{src}: no {LORA_FILE}{hint}")
    tensors = _read_safetensors(file, "re-save the adapter")
    # peft saves the keys without the adapter name (`...q_proj.lora_A.weight`), as our patches do
    cfg = dict(cfg, base_model_name_or_path=base_id, inference_mode=True)
    cfg["lora_alpha"] = cfg["lora_alpha"] * coefficient  # the built-in coefficient rides on alpha, as in build
    if cfg.get("alpha_pattern"):
        cfg["alpha_pattern"] = {k: v * coefficient for k, v in cfg["alpha_pattern"].items()}
    patch = Patch(Manifest(kind="lora", name="import", base=_NO_BASE, versions={}), tensors, lora_config=cfg)
    _check_fit(patch, base, label, src)
    return patch, ["peft-lora", f"PEFT LoRA adapter, r={cfg.get('r')}, {len(patch.updates())} modules"]


def _from_checkpoint(src: Path, base, label: str, coefficient: float, force: bool) -> tuple[Patch, list[str]]:
    from .builder import sparsify
    from .patch.merged import Checkpoint

    tuned = Checkpoint(src)  # refuses pickled-only folders in one line
    t_shapes, b_shapes = tuned.shapes, base.shapes
    extra = sorted(set(t_shapes) - set(b_shapes))
    missing = sorted(set(b_shapes) - set(t_shapes))
    if extra or missing:
        n, where = (extra[0], f"{src} has tensor {extra[0]!r} that {label} lacks") if extra else \
            (missing[0], f"{src} lacks tensor {missing[0]!r} of {label}")
        raise UnpatchError(f"{where} ({len(extra)} extra, {len(missing)} missing); a task vector needs the same architecture")
    for n in sorted(t_shapes):
        if tuple(t_shapes[n]) != tuple(b_shapes[n]):
            raise UnpatchError(f"{src}: tensor {n!r} has shape {tuple(t_shapes[n])} but {tuple(b_shapes[n])} in {label}; "
                               "a task vector needs the same architecture")
    deltas = {}
    for n in sorted(t_shapes):
        t, b = tuned.read(n), base.read(n)
        if not (t.is_floating_point() and b.is_floating_point()):
            continue  # integer buffers (position ids) are not weights
        d = t.to(torch.float32) - b.to(torch.float32)
        if d.any():
            deltas[n] = d
    if not deltas:
        raise UnpatchError(f"{src}: every tensor equals {label}'s; the task vector is zero (is this the base itself?)")
    if not force and len(deltas) == len(t_shapes) and all(d.abs().max() > 1 for d in deltas.values()):
        raise UnpatchError(f"{src}: every tensor differs from {label} by more than 1; it does not look fine-tuned from this base "
                           "(pass --force to import it anyway)")
    tensors, encodings, shapes = sparsify(deltas)
    patch = Patch(Manifest(kind="delta", name="import", base=_NO_BASE, versions={}), tensors, encodings=encodings, shapes=shapes)
    _check_fit(patch, base, label, src)
    return patch, ["task-vector", f"task vector (fine-tuned - base) over {len(deltas)} of {len(t_shapes)} tensors"]


def _check_fit(patch: Patch, base, label: str, src: Path) -> None:
    """Every tensor the payload changes exists in the base with the right shape (one line otherwise)."""
    from .patch.checks import check_shapes

    try:
        check_shapes(patch, base.shapes, label)
    except UnpatchError as e:
        raise UnpatchError(f"{src}: does not fit {label}: {str(e).split(': ', 1)[-1]}") from None


def _base_hashes(base, names: list[str]) -> dict[str, str]:
    """sha256 of each base tensor as a build sees it: loaded in float32."""
    from .fingerprint import tensor_sha256

    return {n: tensor_sha256(base.read(n).to(torch.float32)) for n in names}


_NO_BASE = BaseRef(id="-", dtype="float32", tensors={}, fingerprint="-")  # placeholder while checking the payload
