"""One patch's change to one base tensor (`Update`), and lazily read payload tensors.

An update adds to a torch tensor (`add_to`) or, for dense and row encodings, to a numpy array
(`add_to_array`, what `apply --out` streams through without importing torch). Both give the same
bits: w + (c * d), each step rounded once in the base's arithmetic dtype (float32 for half
precision, rounded back at the end). torch's own `add_(d, alpha=c)` would fuse the multiply and
add on its vectorised lanes only (and not on the tail), which no numpy operation reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..safetensors_io import NUMPY, SafetensorsFile

if TYPE_CHECKING:
    import torch


class LazyTensors(Mapping):
    """Tensors of a safetensors file, read one at a time on access (never all held at once)."""

    def __init__(self, file: SafetensorsFile):
        self.file = file

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.file.entries:
            raise KeyError(key)
        return self.file.read(key)

    def __iter__(self):
        return iter(self.file.entries)

    def __len__(self) -> int:
        return len(self.file.entries)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self.file.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.shape(key)

    def array(self, key: str, span: tuple[int, int] | None = None):
        """The tensor as a numpy array (dtypes numpy has); `span` = (a, b): flat elements a..b-1."""
        return self.file.read_array(key, span)

    def has_arrays(self, keys) -> bool:
        return all(self.file.code(k) in NUMPY for k in keys)


def tensor_shape(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tensors.shape(key) if isinstance(tensors, LazyTensors) else tuple(tensors[key].shape)


@dataclass
class Update:
    """The change one patch makes to one base tensor, before `--scale`. Its tensors are read
    from `source` only when used, so a large patch is never held in memory whole."""

    name: str
    encoding: Literal["dense", "rows", "lowrank"]
    source: Mapping[str, torch.Tensor]
    keys: tuple[str, ...]  # dense: (delta,), rows: (rows, values), lowrank: (B, A)
    factor: float = 1.0
    transpose: bool = False  # LoRA on Conv1D (fan_in_fan_out) or on an embedding
    base_shape: tuple[int, ...] | None = None  # needed by rows: the row count is the base's

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.source[k] for k in self.keys)

    def shape_hint(self) -> tuple[int, ...] | None:
        """Shape of the full delta (for rows, as recorded at build time)."""
        shapes = [tensor_shape(self.source, k) for k in self.keys]
        if self.encoding == "dense":
            return shapes[0]
        if self.encoding == "rows":
            return self.base_shape
        (rows, _), (_, cols) = shapes
        return (cols, rows) if self.transpose else (rows, cols)

    def dense(self, scale: float = 1.0) -> torch.Tensor:
        """The full float32 delta this update adds at `scale`.
        For lowrank (LoRA) updates, adding it to a float32 base gives the bits `add_to` gives."""
        import torch

        if self.encoding == "rows":
            out = torch.zeros(self.base_shape, dtype=torch.float32)
            self.add_to(out, scale)
            return out
        if self.encoding == "lowrank":
            return self._lowrank(torch.float32, torch.device("cpu"), scale)
        return self.parts[0].float() * (self.factor * scale)

    def _lowrank(self, dtype: torch.dtype, device: torch.device, scale: float, scratch: bool = False) -> torch.Tensor:
        # peft computes transpose(B @ A) * scaling; multiplying in place on the product gives the
        # same values with one pass less, and folding `scale` in keeps it at one pass. With
        # `scratch`, the product goes into a reused buffer: fresh pages cost a fault each.
        import torch

        b, a = (p.to(device, dtype) for p in self.parts)
        out = _scratch(b.shape[0] * a.shape[1], dtype, device).view(b.shape[0], a.shape[1]) if scratch else None
        d = torch.matmul(b, a, out=out).mul_(self.factor * scale)
        return d.T if self.transpose else d

    def add_to(self, w: torch.Tensor, scale: float = 1.0) -> None:
        """w += scale * factor * delta, in place. LoRA follows peft's merge bit for bit:
        delta = transpose(B @ A) * scaling, then w += delta."""
        import torch

        c = self.factor * scale
        if c == 0:
            return  # scale 0 leaves the base untouched, bit for bit
        exact = w.dtype in (torch.float32, torch.float64)
        target = w if exact else w.float()  # half precision: add in fp32, round once
        if self.encoding == "dense":
            d = self.parts[0].to(target.device, target.dtype, non_blocking=True)
            target.add_(d if c == 1 else torch.mul(d, c, out=_scratch(d.numel(), d.dtype, d.device).view(d.shape)))
        elif self.encoding == "rows":
            rows, values = (p.to(target.device, non_blocking=True) for p in self.parts)
            values = values.to(target.dtype)
            target.index_add_(0, rows, values if c == 1 else values * c)
        else:
            target.add_(self._lowrank(target.dtype, target.device, scale, scratch=True))
        if not exact:
            w.copy_(target)


    def arrays_ok(self) -> bool:
        """True when `add_to_array` can do this update (dense or rows, numpy dtypes, lazily read)."""
        return self.encoding in ("dense", "rows") and isinstance(self.source, LazyTensors) and self.source.has_arrays(self.keys)

    def add_to_array(self, w, scale: float = 1.0, span: tuple[int, int] | None = None) -> None:
        """`add_to` on a numpy array (float16/32/64), with the same bits. With `span` = (a, b), `w`
        is the base's flat elements a..b-1 (dense only: the add is elementwise)."""
        import numpy as np

        if span is not None and self.encoding != "dense":
            raise ValueError(f"{self.name}: a {self.encoding} update applies to the whole tensor, not a span")
        c = self.factor * scale
        if c == 0:
            return
        exact = w.dtype in (np.float32, np.float64)
        target = w if exact else w.astype(np.float32)
        if self.encoding == "dense":
            d = self.source.array(self.keys[0], span).astype(target.dtype, copy=False)
            np.add(target, d if c == 1 else np.multiply(d, target.dtype.type(c), out=d), out=target)
        else:  # rows: np.add.at adds repeated rows one after another, in order, as index_add_ does
            rows, values = (self.source.array(k) for k in self.keys)
            values = values.astype(target.dtype, copy=False)
            np.add.at(target, rows, values if c == 1 else values * target.dtype.type(c))
        if not exact:
            w[...] = target


_SCRATCH: dict = {}  # (dtype, device) -> torch buffer


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer of at least `numel` elements (grown, never shrunk)."""
    import torch

    buf = _SCRATCH.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]
