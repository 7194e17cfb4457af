"""Read and write safetensors one tensor at a time.

The `safetensors` library reads through mmap (touched pages stay resident while the file is
open) and writes only whole dicts. Streaming a merged model tensor by tensor, as mergekit's lazy
mode does, needs both ends bounded by one tensor, so this module reads with `pread` and writes
the (simple, documented) format itself: u64 header length, JSON header, raw little-endian data.
Dtypes are the format's own codes ("F32", "BF16", ...): nothing here imports torch, so streaming
work (`apply --out` of a delta) can run on numpy arrays and skip torch's multi-second import.
Tensors are read as torch tensors (`read`) or numpy arrays (`read_array`, where numpy has the dtype).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from .checks import regular_file
from .errors import UnpatchError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# numpy has no bfloat16 or float8: tensors of those dtypes are read through torch only
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_CODE = {n: c for c, n in _TORCH.items()}  # torch's dtype name -> code
_SHORT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # the short names model.DTYPES also takes
_MAX_HEADER = 100_000_000


def torch_dtype(code: str):
    import torch

    return getattr(torch, _TORCH[code])


def code_of(dtype) -> str:
    """The safetensors code of a torch dtype, or of a name such as "float32"."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name in ITEMSIZE:
        return name
    name = _SHORT.get(name, name)
    if name not in _CODE:
        raise UnpatchError(f"dtype {name!r}: unknown; use float32, bfloat16 or float16")
    return _CODE[name]


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
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> (dtype code, shape, begin, end)
        for name, e in header.items():
            try:
                code, shape = e["dtype"], tuple(int(s) for s in e["shape"])
                itemsize = ITEMSIZE[code]
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise UnpatchError(f"{bad} (bad entry for tensor {name!r}); re-download or rebuild it") from err
            if any(d < 0 for d in shape):  # [-1, -4] has a positive size but no tensor can take it
                raise UnpatchError(f"{bad} (tensor {name!r} has negative shape {list(shape)}); re-download or rebuild it")
            nbytes = math.prod(shape) * itemsize
            if end - begin != nbytes or begin < 0:
                raise UnpatchError(f"{bad} (tensor {name!r} has {end - begin} bytes, its shape needs {nbytes})")
            if self.data_start + end > size:
                raise UnpatchError(f"{bad} (tensor {name!r} runs past the end: the file is truncated); re-download or rebuild it")
            self.entries[name] = (code, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def code(self, name: str) -> str:
        """The dtype as the file names it ("F32", "BF16", ...)."""
        return self.entries[name][0]

    def dtype(self, name: str):
        """The torch dtype (imports torch)."""
        return torch_dtype(self.entries[name][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read_into(self, name: str, buf, start: int = 0) -> None:
        """Read the raw bytes of one tensor from byte `start` of it into `buf` (as many as `buf` holds)."""
        _, _, begin, end = self.entries[name]
        want = memoryview(buf).nbytes
        if start < 0 or begin + start + want > end:
            raise ValueError(f"read_into: bytes {start}..{start + want} of tensor {name!r} ({end - begin} bytes)")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin + start)
            got = f.readinto(buf) if want else 0
        if got != want:
            raise UnpatchError(f"{self.path}: tensor {name!r} is truncated; re-download or rebuild it")

    def read(self, name: str):
        """Read one tensor into fresh memory, as a torch tensor."""
        import torch

        code, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self.read_into(name, memoryview(buf.numpy()))
        return buf.view(torch_dtype(code)).reshape(shape)

    def read_array(self, name: str, span: tuple[int, int] | None = None):
        """Read one tensor into fresh memory, as a numpy array (dtypes numpy has: see NUMPY);
        with `span` = (a, b), only its flat (C-order) elements a..b-1, as a 1-D array."""
        import numpy as np

        code, shape, begin, end = self.entries[name]
        a, b = span or (0, math.prod(shape))
        buf = np.empty((b - a) * ITEMSIZE[code], dtype=np.uint8)
        self.read_into(name, memoryview(buf), a * ITEMSIZE[code])
        return buf.view(NUMPY[code]) if span else buf.view(NUMPY[code]).reshape(shape)


def _raw(t) -> memoryview:
    """The C-order bytes of a torch tensor or numpy array."""
    import numpy as np

    if hasattr(t, "detach"):  # torch: a CPU tensor's numpy view shares its memory
        t = t.detach().cpu().contiguous().reshape(-1).view(torch_dtype("U8")).numpy()
    return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))


class Parts:
    """One tensor given as consecutive flat pieces (numpy arrays), for write_streaming: a large
    tensor then passes through small reused buffers instead of fresh memory of its full size."""

    def __init__(self, code: str, shape: tuple[int, ...], pieces: Iterable):
        self.code, self.shape, self.pieces = code, tuple(shape), pieces


def write_streaming(
    path: str | Path,
    specs: dict[str, tuple[str, tuple[int, ...]]],
    tensors: Iterable[tuple[str, object]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors (torch or numpy) in the order of `specs` (name -> (dtype code or torch dtype,
    shape)), holding only the one being written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    specs = {n: (code_of(d), tuple(shape)) for n, (d, shape) in specs.items()}
    for name, (code, shape) in specs.items():
        nbytes = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes
    order = iter(specs.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, t in tensors:
            want, (code, shape) = next(order)
            if isinstance(t, Parts):
                if name != want or (t.code, t.shape) != (code, shape):
                    raise ValueError(f"write_streaming: got {name} {t.code} {t.shape}, expected {want} {code} {shape}")
                written = 0
                for piece in t.pieces:
                    written += f.write(_raw(piece))
                if written != math.prod(shape) * ITEMSIZE[code]:
                    raise ValueError(f"write_streaming: {name}: the parts hold {written} bytes, its shape needs {math.prod(shape) * ITEMSIZE[code]}")
                continue
            raw = _raw(t)
            if name != want or tuple(t.shape) != shape or raw.nbytes != math.prod(shape) * ITEMSIZE[code] or _code(t) != code:
                raise ValueError(f"write_streaming: got {name} {t.dtype} {tuple(t.shape)}, expected {want} {code} {shape}")
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def _code(t) -> str:
    if hasattr(t, "detach"):
        return code_of(t.dtype)
    return next(c for c, n in NUMPY.items() if t.dtype == n)
