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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import UnpatchError
from ..fingerprint import combine
from ..version import __version__
from .update import Update, tensor_shape

if TYPE_CHECKING:
    import torch

FORMAT = "unpatch-patch"
FORMAT_VERSION = 1
MANIFEST = "unpatch.json"
DELTA_FILE = "delta.safetensors"
LORA_FILE = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
AUDIT_FILE = "audit.json"  # `unpatch audit`'s report, kept beside the payload (audit.py writes it)


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
    import torch
    import transformers

    return {"unpatch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- save / load


