"""Patch format v1: a folder holding `unpatch.json` (the manifest) and the payload.

kind `delta`: `delta.safetensors`, tensors named after the base parameters they change:
  dense   `<name>`                              the whole delta
  rows    `<name>::rows` (int64), `<name>::values`  only these rows change
  lowrank `<name>::B`, `<name>::A`              delta = B @ A
The file's metadata has one key, `unpatch`: JSON with `encodings` (name -> dense | rows | lowrank)
and `shapes` (name -> base tensor shape). Without it, every tensor is read as dense.
kind `lora`: `adapter_config.json` + `adapter_model.safetensors` exactly as peft writes them, so
`PeftModel.from_pretrained(base, folder)` loads the patch as it is.

The manifest's `coefficient` is the built-in multiplier (e.g. -lambda for a negated task vector).
For `delta` it is applied underneath `--scale`; for `lora` it is also folded into the adapter's
`lora_alpha`, so peft sees the patch exactly as built (scaling = lora_alpha / r).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import save_file

from .. import __version__
from ..atomic import atomic_dir
from ..checks import regular_file
from ..errors import UnpatchError
from ..fingerprint import combine, file_sha256
from ..hashcache import file_digest, file_key, known, remember
from ..safetensors_io import SafetensorsFile
from .checks import check_base_covers, check_files_cover, check_fingerprint_field, check_lora_config, delta_meta, read_json
from .update import LazyTensors, Update, tensor_shape

FORMAT = "unpatch-patch"
FORMAT_VERSION = 1
MANIFEST = "unpatch.json"
DELTA_FILE = "delta.safetensors"
LORA_FILE = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class BaseRef(BaseModel):
    """The base model a patch belongs to, and the hashes of every base tensor it touches."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    revision: str | None = None
    dtype: str
    tensors: dict[str, str]
    fingerprint: str
    # the algorithm of `tensors` (fingerprint.tensor_hash); manifests written before the field
    # existed are sha256, so the default keeps every version-1 patch valid
    hash: Literal["sha256", "blake3"] = "sha256"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["unpatch-patch"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    kind: Literal["lora", "delta"]
    name: str
    base: BaseRef
    coefficient: float = 1.0
    method: dict[str, Any] = {}
    recipe_sha256: str | None = None
    lineage: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    files: dict[str, str] = {}
    created: str = ""


@dataclass
class Patch:
    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]  # payload as stored (a dict, or LazyTensors when loaded)
    lora_config: dict[str, Any] | None = None
    encodings: dict[str, str] = field(default_factory=dict)  # delta: name -> dense | rows | lowrank
    shapes: dict[str, list[int]] = field(default_factory=dict)  # delta: name -> base tensor shape
    path: Path | None = None
    recipe_text: str | None = None
    card_text: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def patch_id(self) -> str:
        """Content id of the payload (known once saved or loaded)."""
        return combine(self.manifest.files) if self.manifest.files else ""

    def label(self) -> str:
        return str(self.path) if self.path else self.name

    def updates(self) -> dict[str, Update]:
        return lora_updates(self) if self.kind == "lora" else delta_updates(self)

    def with_manifest(self, **changes: Any) -> Patch:
        return replace(self, manifest=self.manifest.model_copy(update=changes), path=None)


def delta_updates(patch: Patch) -> dict[str, Update]:
    t, c = patch.tensors, patch.manifest.coefficient
    out = {}
    for name, enc in patch.encodings.items():
        keys = {"dense": (name,), "rows": (f"{name}::rows", f"{name}::values"), "lowrank": (f"{name}::B", f"{name}::A")}[enc]
        missing = [k for k in keys if k not in t]
        if missing:
            raise UnpatchError(f"{patch.label()}: {DELTA_FILE} lacks tensor {missing[0]!r} that its encodings promise; rebuild the patch")
        shape = patch.shapes.get(name)
        if enc == "rows" and shape is None:
            raise UnpatchError(f"{patch.label()}: row-sparse tensor {name!r} has no recorded shape; rebuild the patch")
        out[name] = Update(name, enc, t, keys, factor=c, base_shape=tuple(shape) if shape else None)
    return out


_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$")


def lora_updates(patch: Patch) -> dict[str, Update]:
    cfg = patch.lora_config or {}

    modules: dict[str, dict[str, str]] = {}
    embedding: set[str] = set()
    for key in patch.tensors:
        m = _LORA_KEY.match(key)
        if not m:
            raise UnpatchError(f"{patch.label()}: unsupported LoRA tensor {key!r} (only plain LoRA A/B weights are supported)")
        modules.setdefault(m["module"], {})[m["ab"]] = key
        if m["emb"]:
            embedding.add(m["module"])
    out = {}
    for module, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise UnpatchError(f"{patch.label()}: LoRA module {module!r} lacks its {'A' if 'A' not in ab else 'B'} matrix")
        r = tensor_shape(patch.tensors, ab["A"])[0]
        alpha = cfg["lora_alpha"]
        if alphas := cfg.get("alpha_pattern"):
            from peft.utils.other import get_pattern_key  # peft's own rule (imported only here: peft loads slowly)

            alpha = alphas.get(get_pattern_key(alphas.keys(), module), alpha)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        transpose = bool(cfg.get("fan_in_fan_out")) or module in embedding
        out[f"{module}.weight"] = Update(f"{module}.weight", "lowrank", patch.tensors, (ab["B"], ab["A"]), scaling, transpose)
    return out


def lora_key(module: str, ab: str) -> str:
    return f"base_model.model.{module}.lora_{ab}.weight"


def lora_config_dict(config, base_id: str | None = None) -> dict[str, Any]:
    """A peft LoraConfig as the JSON peft itself writes (sets as lists, enums as values)."""
    d = config.to_dict()
    for k, v in d.items():
        if isinstance(v, set):
            d[k] = sorted(v)
        elif hasattr(v, "value"):
            d[k] = v.value
    d["base_model_name_or_path"] = base_id
    return d


def library_versions() -> dict[str, str]:
    import peft
    import safetensors
    import transformers

    return {"unpatch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- save / load


def save_patch(patch: Patch, out: str | Path, overwrite: bool = False) -> Patch:
    """Write the patch folder atomically; returns the patch as saved (with file hashes)."""
    from .card import render_card

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
    return torch.load(found[0], map_location="cpu", weights_only=True)


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
        for k in tensors:
            t = tensors[k]  # one at a time: a full-model delta is never held whole
            if t.is_floating_point() and not torch.isfinite(t).all():
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
