"""Content hashes that bind a patch to the exact base tensors it was built on.

A tensor's hash covers its dtype, shape and raw little-endian bytes (C order). Two algorithms:
`sha256` (every format-1 patch before the manifest named one: `base.hash` defaults to it) and
`blake3` (several times faster per core here; used when the `blake3` package is installed).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from .errors import UnpatchError
from .safetensors_io import code_of

HASHES = ("sha256", "blake3")
try:
    import blake3 as _blake3
except ImportError:  # optional at run time: sha256 patches need only hashlib
    _blake3 = None
DEFAULT_HASH = "blake3" if _blake3 is not None else "sha256"


def hasher(algo: str = "sha256"):
    """A fresh hashlib-style object (update/hexdigest) for `algo`."""
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake3":
        if _blake3 is None:
            raise UnpatchError("this patch's base fingerprint uses blake3, which is not installed; run `pip install blake3`")
        return _blake3.blake3()  # one thread per tensor: tensor_hashes already spreads tensors over cores
    raise UnpatchError(f"hash algorithm {algo!r}: unknown; this unpatch knows {', '.join(HASHES)}")


def header(dtype, shape) -> bytes:
    """What a tensor hash covers before the bytes: the dtype's safetensors code and the shape."""
    return f"{code_of(dtype)}{list(shape)}".encode()


def threads() -> int:
    """Hashing threads: torch's setting where torch is loaded (a user's --threads), else the cores."""
    torch = sys.modules.get("torch")
    return min(8, torch.get_num_threads() if torch is not None else (os.cpu_count() or 1))


def buffer_hash(dtype, shape, data, algo: str = "sha256") -> str:
    """Hash of a tensor given as dtype, shape and its raw bytes (e.g. a slice of an mmapped file)."""
    h = hasher(algo)
    h.update(header(dtype, shape))
    h.update(data)
    return h.hexdigest()


def tensor_hash(t, algo: str = "sha256") -> str:
    """Hash of dtype, shape and the raw little-endian bytes (C order) of one torch tensor."""
    import torch

    t = t.detach().to("cpu").contiguous()
    return buffer_hash(t.dtype, t.shape, memoryview(t.reshape(-1).view(torch.uint8).numpy()), algo)


def tensor_sha256(t) -> str:
    return tensor_hash(t, "sha256")


def tensor_hashes(tensors: Mapping, algo: str = "sha256") -> dict[str, str]:
    """Hashes of many tensors on all cores: hashlib and blake3 release the GIL on large buffers."""
    if not tensors:
        return {}
    with ThreadPoolExecutor(max_workers=threads()) as pool:
        return dict(zip(tensors, pool.map(lambda t: tensor_hash(t, algo), tensors.values()), strict=True))


def combine(hashes: dict[str, str]) -> str:
    """One hash over many named hashes (order-independent: names are sorted)."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}:{hashes[name]}\n".encode())
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
