"""Content hashes that bind a patch to the exact base tensors it was built on."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from .safetensors_io import DTYPE_NAMES


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and the raw little-endian bytes (C order) of one tensor."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{DTYPE_NAMES[t.dtype]}{list(t.shape)}".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tensor_hashes(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of many tensors on all cores: hashlib releases the GIL on large buffers."""
    with ThreadPoolExecutor(max_workers=min(8, torch.get_num_threads())) as pool:
        return dict(zip(tensors, pool.map(tensor_sha256, tensors.values()), strict=True))


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
