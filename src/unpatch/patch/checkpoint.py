"""A model folder's safetensors shards read tensor by tensor (`Checkpoint`), and the check of a
patch against them (`check_against`: shapes, and the fingerprint from the on-disk hash cache).
Torch-free: `apply --out` and `verify --model` of a delta never need it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UnpatchError
from ..fingerprint import tensor_hash
from ..hashcache import file_hashes
from ..safetensors_io import SafetensorsFile, code_of, torch_dtype
from .checks import check_fingerprint, check_shapes
from .format import PICKLED, Patch

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The safetensors shards of a model folder, read tensor by tensor."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX).exists():
            names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
            files = [folder / n for n in names]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLED]
            what = f"only pickled weights ({pickled[0]}), which are refused; convert them to safetensors" if pickled else "no *.safetensors weights"
            raise UnpatchError(f"{folder}: {what}")
        self.files = [SafetensorsFile(f) for f in files]
        self.where = {name: f for f in self.files for name in f.keys()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: f.shape(n) for n, f in self.where.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    def hashes(self, names, algo: str) -> dict[str, str]:
        """Hashes of the tensors as stored, from the on-disk cache where the files are unchanged."""
        by_file: dict[SafetensorsFile, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        return {n: h for f, ns in by_file.items() for n, h in file_hashes(f, algo, ns).items()}


def check_against(patch: Patch, ckpt: Checkpoint, label: str, force: bool = False,
                  raw_hashes: dict[str, str] | None = None, ledger_hash: str = "sha256") -> tuple[dict, bool]:
    """Shapes and fingerprint of `patch` against a checkpoint; returns (updates, forced).
    `raw_hashes` collects the `ledger_hash` hashes of the checkpoint tensors as stored (for the ledger)."""
    updates = check_shapes(patch, ckpt.shapes, label)
    code, algo = code_of(patch.manifest.base.dtype), patch.manifest.base.hash
    same = [n for n in updates if ckpt.where[n].code(n) == code]
    actual = ckpt.hashes(same, algo)
    for n in updates:
        if n not in actual:  # stored in another dtype: hash the exact upcast, as the patch saw it
            actual[n] = tensor_hash(ckpt.read(n).to(torch_dtype(code)), algo)
    if raw_hashes is not None:
        raw_hashes.update(ckpt.hashes([n for n in updates if n not in raw_hashes], ledger_hash))
    return updates, check_fingerprint(patch, actual, label, force)
