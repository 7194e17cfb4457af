"""Read and write safetensors one tensor at a time.

The `safetensors` library reads through mmap (touched pages stay resident while the file is
open) and writes only whole dicts. Streaming a merged model tensor by tensor, as mergekit's lazy
mode does, needs both ends bounded by one tensor, so this module reads with `pread` and writes
the (simple, documented) format itself: u64 header length, JSON header, raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .checks import regular_file
from .errors import UnpatchError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000


class SafetensorsFile:
    """A validated safetensors file whose tensors are read on demand (no mmap)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        regular_file(self.path)  # a FIFO named *.safetensors would block the read forever
        bad = f"{self.path}: not a valid safetensors file"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise UnpatchError(f"{bad} (too short); re-download or rebuild it")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise UnpatchError(f"{bad} (header length {n} exceeds the file); it is truncated or corrupt, re-download or rebuild it")
                header = json.loads(f.read(n))
        except OSError as e:
            raise UnpatchError(f"{self.path}: cannot read ({e.strerror})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnpatchError(f"{bad} (corrupt header); re-download or rebuild it") from e
        if not isinstance(header, dict):
            raise UnpatchError(f"{bad} (its header is not a JSON object); re-download or rebuild it")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise UnpatchError(f"{bad} (bad entry for tensor {name!r}); re-download or rebuild it") from err
            if any(d < 0 for d in shape):  # [-1, -4] has a positive size but no tensor can take it
                raise UnpatchError(f"{bad} (tensor {name!r} has negative shape {list(shape)}); re-download or rebuild it")
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise UnpatchError(f"{bad} (tensor {name!r} has {end - begin} bytes, its shape needs {nbytes})")
            if self.data_start + end > size:
                raise UnpatchError(f"{bad} (tensor {name!r} runs past the end: the file is truncated); re-download or rebuild it")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        dtype, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(buf.numpy()))
        if got != end - begin:
            raise UnpatchError(f"{self.path}: tensor {name!r} is truncated; re-download or rebuild it")
        return buf.view(dtype).reshape(shape)


def write_streaming(
    path: str | Path,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors in the order of `specs`, holding only the one being written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes
    order = iter(specs.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, t in tensors:
            want, (dtype, shape) = next(order)
            if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"write_streaming: got {name} {t.dtype} {tuple(t.shape)}, expected {want} {dtype} {shape}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
