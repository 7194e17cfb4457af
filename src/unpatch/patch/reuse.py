"""Reading safetensors tensors into reused buffers, for streaming merges.

A fresh tensor per read costs a page fault (and the kernel zeroing the page) for every 4 KB: on
the 538 MB SmolLM2-135M that is ~260k faults per pass, a visible share of `apply --out`. A
streaming merge holds each tensor only until it is written, so a few grown-once buffers do.
"""

from __future__ import annotations

import numpy as np

from ..safetensors_io import ITEMSIZE, NUMPY, SafetensorsFile, torch_dtype
from .update import LazyTensors


class Buffers:
    """A ring of `n` byte buffers (numpy, so streaming needs no torch), grown to the largest
    request, never shrunk. A tensor read into one is valid until `n` further reads: callers must
    be done with it by then."""

    def __init__(self, n: int = 2):
        self.ring: list[np.ndarray] = [np.empty(0, dtype=np.uint8) for _ in range(n)]
        self.next = 0

    def _raw(self, st: SafetensorsFile, name: str, span: tuple[int, int] | None = None) -> np.ndarray:
        code, _, begin, end = st.entries[name]
        start, size = (span[0] * ITEMSIZE[code], (span[1] - span[0]) * ITEMSIZE[code]) if span else (0, end - begin)
        k, self.next = self.next, (self.next + 1) % len(self.ring)
        if self.ring[k].size < size:
            self.ring[k] = np.empty(size, dtype=np.uint8)
        buf = self.ring[k][:size]
        st.read_into(name, memoryview(buf), start)
        return buf

    def read(self, st: SafetensorsFile, name: str):
        """As a torch tensor (sharing the buffer's memory)."""
        import torch

        code, shape, _, _ = st.entries[name]
        return torch.from_numpy(self._raw(st, name)).view(torch_dtype(code)).reshape(shape)

    def read_array(self, st: SafetensorsFile, name: str, span: tuple[int, int] | None = None) -> np.ndarray:
        """As a numpy array; with `span` = (a, b), flat elements a..b-1 only (1-D)."""
        code, shape, _, _ = st.entries[name]
        flat = self._raw(st, name, span).view(NUMPY[code])
        return flat if span else flat.reshape(shape)


class ReusingTensors(LazyTensors):
    """LazyTensors whose reads land in a shared ring of buffers (an Update reads at most two
    parts at a time: B and A, or rows and values, and is done with them when add_to returns)."""

    def __init__(self, file: SafetensorsFile, buffers: Buffers):
        super().__init__(file)
        self.buffers = buffers

    def __getitem__(self, key: str):
        if key not in self.file.entries:
            raise KeyError(key)
        return self.buffers.read(self.file, key)

    def array(self, key: str, span: tuple[int, int] | None = None) -> np.ndarray:
        return self.buffers.read_array(self.file, key, span)
