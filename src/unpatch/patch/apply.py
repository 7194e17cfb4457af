"""Apply patches to a model in memory, and revert them bit for bit.

`Applied` keeps the original bytes of every base tensor before it is first changed; reverting
copies those bytes back (arithmetic subtraction would change ~3 % of fp32 elements) and re-applies
the patches that stay, so the result always equals "base + the remaining patches" exactly.
Where a parameter still holds the bytes of the file `load_model` read it from (provenance.py),
its fingerprint is the file's cached hash and its original is read back from the file at revert:
the apply itself then neither hashes nor copies. Elsewhere it hashes the tensor and keeps a CPU copy.
With `keep_originals=False` it merges for good, like peft's `merge_and_unload`: no copy (the
copy costs more than the merge itself), and `revert` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks, provenance
from ..errors import UnpatchError
from ..fingerprint import tensor_hashes
from ..provenance import Origin
from .checks import check_fingerprint, check_shapes
from .format import Patch
from .reuse import Buffers


@dataclass
class Entry:
    patch: Patch
    scale: float
    forced: bool


def check_dtype(patch: Patch, dtypes: dict[str, torch.dtype], model_label: str, force: bool) -> None:
    """A base loaded in another dtype than the patch's base cannot match its fingerprint: say that
    (the dtype is the culprit, not the model) instead of printing two fingerprints."""
    from ..model import DTYPES

    want = patch.manifest.base.dtype
    other = next(((n, d) for n, d in dtypes.items() if want in DTYPES and getattr(torch, DTYPES[want]) != d), None)
    if other and not force:
        got = str(other[1]).removeprefix("torch.")
        raise UnpatchError(f"{patch.label()}: built on a {want} base, but {model_label} holds {got} weights (tensor {other[0]!r}), "
                           f"so its fingerprint cannot match; load the model with --dtype {want}, or pass --force")


class Applied:
    """Patches applied in place to one loaded model, with everything needed to take them off."""

    def __init__(self, model: torch.nn.Module, label: str = "the model", keep_originals: bool = True):
        self.model = model
        self.label = label
        self.keep_originals = keep_originals
        # parameters, not state_dict keys: a tied lm_head/embedding is one tensor and must change once
        self.params = dict(model.named_parameters())
        self.originals: dict[str, torch.Tensor | Origin] = {}  # a CPU copy, or where in the base file
        self.entries: list[Entry] = []
        # (algorithm, name) -> hash of the base tensor, computed once: every change made here is
        # reverted to the original bytes, so they stay valid (unless someone edits the weights behind our back)
        self.hashes: dict[tuple[str, str], str] = {}

    def _origin(self, name: str) -> Origin | None:
        o = self.originals.get(name)
        return o if isinstance(o, Origin) else provenance.origin(self.model, name, self.params[name]) if o is None else None

    def base_hashes(self, names, algo: str = "sha256") -> dict[str, str]:
        todo = [n for n in names if n in self.params and (algo, n) not in self.hashes]
        from_file = {n: o for n in todo if (o := self._origin(n)) is not None}
        got = provenance.hashes(self.model, from_file, algo) if from_file else {}
        got.update(tensor_hashes({n: self.originals.get(n, self.params[n].data) for n in todo if n not in from_file}, algo))
        self.hashes.update({(algo, n): h for n, h in got.items()})
        return {n: self.hashes[(algo, n)] for n in names if (algo, n) in self.hashes}

    @torch.no_grad()
    def apply(self, patch: Patch, scale: float = 1.0, force: bool = False) -> Entry:
        checks.scale(scale, "scale")
        updates = check_shapes(patch, {n: tuple(p.shape) for n, p in self.params.items()}, self.label)
        check_dtype(patch, {n: self.params[n].dtype for n in updates}, self.label, force)
        forced = check_fingerprint(patch, self.base_hashes(updates, patch.manifest.base.hash), self.label, force)
        for name in updates:
            if self.keep_originals and name not in self.originals:
                # the revert copy only where the base file cannot give the bytes back
                self.originals[name] = self._origin(name) or self.params[name].data.to("cpu", copy=True)
        done = []
        try:
            for name, u in updates.items():
                u.add_to(self.params[name], scale)  # on the parameter, not .data: bumps its version (provenance)
                done.append(name)
        except BaseException:  # never leave the model half-patched: back to the state before this call
            if self.keep_originals:
                self._reset(list(self.entries))
            else:  # no copy to restore from: take the finished updates off arithmetically
                for name in done:
                    updates[name].add_to(self.params[name], -scale)
            raise
        entry = Entry(patch, scale, forced)
        self.entries.append(entry)
        return entry

    @torch.no_grad()
    def revert(self, patch: Patch | str | None = None) -> bool:
        """Take off one patch (by object, name or path) or all; returns True when the restored base
        tensors hash to the fingerprints the patches recorded."""
        if not self.keep_originals:
            raise UnpatchError(f"{self.label} was patched without keeping its original tensors (keep_originals=False); reload the base model instead")
        if patch is None:
            keep = []
        else:
            keep = [e for e in self.entries if not _matches(e.patch, patch)]
            if len(keep) == len(self.entries):
                names = ", ".join(e.patch.name for e in self.entries) or "none"
                raise UnpatchError(f"patch {_label(patch)!r} is not applied (applied: {names})")
        return self._reset(keep)

    def _reset(self, keep: list[Entry]) -> bool:
        """Copy the original bytes back, verify them, then re-apply `keep` in order."""
        for o in {id(o.st): o for o in self.originals.values() if isinstance(o, Origin)}.values():
            o.check()  # before anything is written: a changed base file leaves the model as it was
        buffers = Buffers(1)  # each original is copied into its parameter before the next is read
        for name, original in self.originals.items():
            param = self.params[name]
            param.copy_(original.read(buffers) if isinstance(original, Origin) else original)
            if isinstance(original, Origin):
                provenance.restored(self.model, name, param)
        verified = True
        for algo in {e.patch.manifest.base.hash for e in self.entries if not e.forced}:
            # bytes read back from an unchanged file hash to its cached hashes; copies are re-hashed
            restored = tensor_hashes({n: self.params[n].data for n, o in self.originals.items() if not isinstance(o, Origin)}, algo)
            restored.update(self.base_hashes([n for n, o in self.originals.items() if isinstance(o, Origin)], algo))
            verified &= all(restored.get(n, self.hashes.get((algo, n))) == h for e in self.entries
                            if not e.forced and e.patch.manifest.base.hash == algo for n, h in e.patch.manifest.base.tensors.items())
        self.originals.clear()
        self.entries = []
        for e in keep:
            self.apply(e.patch, e.scale, force=e.forced)
        return verified


def _label(p: Patch | str) -> str:
    return p if isinstance(p, str) else p.label()


def _matches(patch: Patch, key: Patch | str) -> bool:
    if isinstance(key, Patch):
        return patch is key or (bool(patch.patch_id) and patch.patch_id == key.patch_id)
    return key in (patch.name, str(patch.path), patch.path.name if patch.path else None)
