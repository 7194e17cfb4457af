"""The patch algebra: scale, negate, stack, convert (lora <-> delta), inspect, verify.

Scale and negate change only the coefficient (and, for LoRA, lora_alpha), never tensor bytes,
so negate(negate(p)) is p bit for bit. Stacking LoRA patches concatenates their ranks, which is
exact: [B1*s1 | B2*s2] @ [A1; A2] = s1*B1@A1 + s2*B2@A2 (peft's `linear` combination is not).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .. import checks
from ..errors import UnpatchError
from ..fingerprint import combine
from .format import BaseRef, Patch, library_versions, lora_config_dict, lora_key, now


def _lineage(parents: list[tuple[Patch, float]], op: str) -> list[dict[str, Any]]:
    return [{"op": op, "name": p.name, "path": str(p.path) if p.path else None, "patch_id": p.patch_id,
             "kind": p.kind, "coefficient": c} for p, c in parents]


def scale_patch(patch: Patch, factor: float) -> Patch:
    """The same patch with its effect multiplied by `factor`."""
    checks.scale(factor, "factor")  # a NaN factor would write a patch that no command can load
    m = patch.manifest
    lineage = _lineage([(patch, factor)], "scale")
    if patch.kind == "delta":
        return patch.with_manifest(coefficient=m.coefficient * factor, lineage=lineage)
    cfg = dict(patch.lora_config, lora_alpha=patch.lora_config["lora_alpha"] * factor)
    cfg["alpha_pattern"] = {k: v * factor for k, v in (cfg.get("alpha_pattern") or {}).items()}
    out = patch.with_manifest(coefficient=m.coefficient * factor, lineage=lineage)
    out.lora_config = cfg
    return out


def negate_patch(patch: Patch) -> Patch:
    return scale_patch(patch, -1.0)


def merged_base(patches: list[Patch]) -> BaseRef:
    """One BaseRef over the union of the patches' tensors; refuses patches of different bases."""
    tensors: dict[str, str] = {}
    first = patches[0]
    for p in patches:
        b = p.manifest.base
        if b.dtype != first.manifest.base.dtype:
            raise UnpatchError(f"{p.label()}: built on a {b.dtype} base, {first.label()} on {first.manifest.base.dtype}; stack patches of one base")
        if b.hash != first.manifest.base.hash:  # hashes of two algorithms cannot be compared
            raise UnpatchError(f"{p.label()}: its base fingerprint is {b.hash}, {first.label()}'s is {first.manifest.base.hash}; "
                               "stack patches fingerprinted with one algorithm")
        for n, h in b.tensors.items():
            if tensors.setdefault(n, h) != h:
                raise UnpatchError(f"{p.label()}: its base differs from {first.label()}'s at tensor {n!r}; stack patches of one base")
    return BaseRef(id=first.manifest.base.id, revision=first.manifest.base.revision, dtype=first.manifest.base.dtype,
                   tensors=tensors, fingerprint=combine(tensors), hash=first.manifest.base.hash)


def _new_patch(kind: str, name: str, base: BaseRef, tensors: dict, lineage: list, method: dict, **kw) -> Patch:
    from .format import Manifest

    manifest = Manifest(kind=kind, name=name, base=base, coefficient=1.0, method=method, lineage=lineage,
                        versions=library_versions(), created=now())
    return Patch(manifest, tensors, **kw)


def stack_patches(items: list[tuple[Patch, float]], name: str = "stack") -> Patch:
    """One patch equal to sum_i c_i * patch_i. All LoRA: rank concatenation (stays LoRA, exact up
    to fp32 rounding); otherwise a dense delta."""
    if not items:
        raise UnpatchError("stack: give at least one patch")
    for _, c in items:
        checks.scale(c, "coefficient")
    base = merged_base([p for p, _ in items])
    lineage = _lineage(items, "stack")
    if all(p.kind == "lora" for p, _ in items):
        return _stack_lora(items, name, base, lineage)
    sums: dict[str, torch.Tensor] = {}
    for p, c in items:
        for n, u in p.updates().items():
            d = u.dense(c)
            sums[n] = sums[n].add_(d) if n in sums else d
    return _new_patch("delta", name, base, sums, lineage, {"name": "stack"}, encodings={n: "dense" for n in sums})


def _stack_lora(items: list[tuple[Patch, float]], name: str, base: BaseRef, lineage: list) -> Patch:
    fan = {bool(p.lora_config.get("fan_in_fan_out")) for p, _ in items}
    if any("lora_embedding" in k for p, _ in items for k in p.tensors):
        raise UnpatchError("stack: LoRA on embeddings cannot be rank-stacked; convert the patches to delta first (`unpatch convert --to delta`)")
    if len(fan) > 1:
        raise UnpatchError("stack: the LoRA patches disagree on fan_in_fan_out; they were built for different architectures")
    per_patch = [(p.updates(), c, p) for p, c in items]
    modules = sorted({n.removesuffix(".weight") for ups, _, _ in per_patch for n in ups})
    ranks = [max(ups[m + ".weight"].parts[1].shape[0] if m + ".weight" in ups else 0 for m in modules) for ups, _, _ in per_patch]
    total = sum(ranks)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        out_dim, in_dim = next(ups[m + ".weight"] for ups, _, _ in per_patch if m + ".weight" in ups).shape_hint()
        if fan == {True}:
            out_dim, in_dim = in_dim, out_dim  # Conv1D: B @ A is the transposed weight
        bs, as_ = [], []
        for (ups, c, _), r in zip(per_patch, ranks, strict=True):
            u = ups.get(m + ".weight")
            if u is None:  # zero blocks keep one uniform rank: their products add exact zeros
                bs.append(torch.zeros(out_dim, r))
                as_.append(torch.zeros(r, in_dim))
                continue
            b, a = (t.float() for t in u.parts)
            bs.append(torch.nn.functional.pad(b * (u.factor * c), (0, r - b.shape[1])))
            as_.append(torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])))
        tensors[lora_key(m, "B")] = torch.cat(bs, dim=1)
        tensors[lora_key(m, "A")] = torch.cat(as_, dim=0)
    cfg = _lora_config(total, modules, fan == {True}, base.id)
    return _new_patch("lora", name, base, tensors, lineage, {"name": "stack"}, lora_config=cfg)


def _lora_config(rank: int, modules: list[str], fan_in_fan_out: bool, base_id: str) -> dict:
    from peft import LoraConfig

    # alpha = r makes peft's scaling 1: the factors already carry every coefficient
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, fan_in_fan_out=fan_in_fan_out,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    return lora_config_dict(cfg, base_id)


def lora_to_delta(patch: Patch) -> Patch:
    """Exact: each dense delta is transpose(B @ A) * scaling, as peft's merge computes it."""
    if patch.kind != "lora":
        raise UnpatchError(f"{patch.label()}: already a delta patch")
    tensors = {n: u.dense() for n, u in patch.updates().items()}
    out = _new_patch("delta", patch.name, patch.manifest.base, tensors, _lineage([(patch, 1.0)], "convert"),
                     patch.manifest.method, encodings={n: "dense" for n in tensors}, recipe_text=patch.recipe_text)
    return out


def delta_to_lora(patch: Patch, rank: int, module_types: dict[str, str]) -> tuple[Patch, float]:
    """Truncated SVD of every delta at `rank`. `module_types` maps module name -> linear | conv1d
    | embedding (from the base architecture). Returns the patch and the relative Frobenius error
    over all tensors, ||delta - approx|| / ||delta||."""
    if patch.kind != "delta":
        raise UnpatchError(f"{patch.label()}: already a LoRA patch")
    if rank < 1:
        raise UnpatchError(f"--rank {rank}: must be >= 1")
    tensors, err2, norm2, kinds = {}, 0.0, 0.0, set()
    for name, u in patch.updates().items():
        module = name.removesuffix(".weight")
        kind = module_types.get(module) if name.endswith(".weight") else None
        if kind is None:
            raise UnpatchError(f"{patch.label()}: tensor {name!r} is not the weight of a linear or embedding layer, so it cannot become LoRA; keep the delta kind")
        kinds.add(kind)
        d = u.dense()
        target = d.T if kind in ("conv1d", "embedding") else d  # LoRA stores the transposed product there
        U, S, Vh = torch.linalg.svd(target.double(), full_matrices=False)
        k = min(rank, S.numel())
        b = torch.nn.functional.pad((U[:, :k] * S[:k]).float(), (0, rank - k))
        a = torch.nn.functional.pad(Vh[:k].float(), (0, 0, 0, rank - k))
        err2 += float(((b.double() @ a.double()) - target.double()).pow(2).sum())
        norm2 += float(target.double().pow(2).sum())
        if kind == "embedding":
            tensors[f"base_model.model.{module}.lora_embedding_B"] = b
            tensors[f"base_model.model.{module}.lora_embedding_A"] = a
        else:
            tensors[lora_key(module, "B")], tensors[lora_key(module, "A")] = b, a
    if "conv1d" in kinds and "linear" in kinds:
        raise UnpatchError(f"{patch.label()}: mixes Conv1D and Linear layers, which one LoRA config cannot describe")
    modules = sorted(n.removesuffix(".weight") for n in patch.updates())
    cfg = _lora_config(rank, modules, "conv1d" in kinds, patch.manifest.base.id)
    rel = math.sqrt(err2 / norm2) if norm2 else 0.0
    out = _new_patch("lora", patch.name, patch.manifest.base, tensors, _lineage([(patch, 1.0)], "convert"),
                     patch.manifest.method, lora_config=cfg, recipe_text=patch.recipe_text)
    return out, rel


def module_types_of(model_spec: str) -> dict[str, str]:
    """Layer kinds of a model, read from its config on the meta device (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ..model import checkpoint_folder, resolve_model

    config = AutoConfig.from_pretrained(checkpoint_folder(resolve_model(model_spec)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    types: dict[str, Any] = {}
    for name, mod in model.named_modules():
        kind = {torch.nn.Linear: "linear", Conv1D: "conv1d", torch.nn.Embedding: "embedding"}.get(type(mod))
        if kind:
            types[name] = kind
    return types


def inspect_patch(patch: Patch) -> dict[str, Any]:
    """Manifest summary and, per tensor: encoding, stored shapes, bytes and the delta's norm."""
    rows = []
    for name, u in patch.updates().items():
        stored = [tuple(patch.tensors[k].shape) for k in u.keys]
        nbytes = sum(patch.tensors[k].numel() * patch.tensors[k].element_size() for k in u.keys)
        norm = float(u.dense().norm()) if u.encoding != "rows" else float(u.parts[1].float().norm() * abs(u.factor))
        rows.append({"tensor": name, "encoding": u.encoding, "stored": stored, "bytes": nbytes, "norm": norm})
    m = patch.manifest
    files = sum((Path(patch.path) / f).stat().st_size for f in m.files) if patch.path else None
    return {"name": m.name, "kind": m.kind, "base": m.base.id, "fingerprint": m.base.fingerprint,
            "coefficient": m.coefficient, "method": m.method, "lineage": m.lineage, "patch_id": patch.patch_id,
            "bytes_on_disk": files, "tensors": rows}
