"""Tensor hashes of safetensors files, read in small chunks and cached on disk per file identity.

Why the cache is safe: an entry is keyed by (device, inode, size, mtime_ns, ctime_ns) of the file
and is used only while a fresh stat returns the same five numbers. Any write through the file
system updates ctime to "now", and user space cannot set ctime back (utime sets mtime and atime
only, and bumps ctime too); replacing the file (download, save_pretrained, rename) gives a new
inode; another disk gives another device. The one hole is a write in the same clock tick as the
stat that was cached ("racy git"): an entry is therefore stored only when the file's ctime is at
least RACY_SECONDS older than the stat taken before hashing, and the file is stat-ed again after
hashing to make sure nothing changed while it was read. Entries live under
UNPATCH_CACHE/hashes (one small JSON per file path); a cache that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .fingerprint import hasher, header, threads
from .safetensors_io import SafetensorsFile

RACY_SECONDS = 2.0
MAX_ENTRIES = 4096  # files remembered (each entry a few KB), least recently used dropped first
_LOCK = threading.Lock()
_MEMO: dict[str, tuple[list[int], dict[str, dict[str, str]]]] = {}  # path -> (key, algo -> name -> hash)


def file_key(path: str | Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def cache_root() -> Path:
    """unpatch's cache folder (UNPATCH_CACHE, else XDG_CACHE_HOME/unpatch): these hashes, and model.py's dequantised GGUFs."""
    root = os.environ.get("UNPATCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unpatch"
    return Path(root)


def _entry_path(path: str) -> Path:
    return cache_root() / "hashes" / f"{hashlib.sha256(path.encode()).hexdigest()[:32]}.json"


def _lookup(path: str, key: list[int]) -> dict[str, dict[str, str]]:
    with _LOCK:
        memo = _MEMO.get(path)
    if memo and memo[0] == key:
        return memo[1]
    try:
        raw = json.loads(_entry_path(path).read_text())
        if raw.get("path") == path and raw.get("key") == key and isinstance(raw.get("hashes"), dict):
            os.utime(_entry_path(path))  # recently used: pruned last
            with _LOCK:
                _MEMO[path] = (key, raw["hashes"])
            return raw["hashes"]
    except (OSError, ValueError):
        pass
    return {}


def _store(path: str, key: list[int], hashes: dict[str, dict[str, str]]) -> None:
    with _LOCK:
        _MEMO[path] = (key, hashes)
    try:
        entry = _entry_path(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        _replace(entry, json.dumps({"path": path, "key": key, "hashes": hashes}))
        entries = list(entry.parent.glob("*.json"))
        if len(entries) > MAX_ENTRIES:  # temporary folders come and go: forget the least recently written
            entries.sort(key=lambda e: e.stat().st_mtime_ns)
            for old in entries[: len(entries) - MAX_ENTRIES // 2]:  # by mtime: written or last hit
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full cache only costs speed


def _replace(entry: Path, text: str) -> None:
    """Write a temporary sibling, then os.replace it over the entry: a reader sees the old entry or
    the new one, never half of one. Two writers of one entry each rename a whole file of the same
    content, so neither needs to wait for the other (atomic.py's claims guard outputs, not this)."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, entry)
    finally:
        tmp.unlink(missing_ok=True)


def cached(path: str | Path, algo: str, key: list[int] | None = None) -> dict[str, str]:
    """The cached hashes of a file for `algo` (possibly only some tensors), if its identity is unchanged."""
    path = str(Path(path).resolve())
    key = key or file_key(path)
    return dict(_lookup(path, key).get(algo, {}))


def file_hashes(st: SafetensorsFile, algo: str, names=None) -> dict[str, str]:
    """Hashes of tensors `names` (default all) of one safetensors file, as tensor_hash would give
    for each tensor read from it. Misses are hashed in 8 MB chunks (bounded memory) and cached.
    These are the hashes of the file as it is now: a caller holding bytes read earlier must
    compare the file's key with the one it saw then (provenance.Origin.check)."""
    path = str(st.path.resolve())
    names = list(st.keys()) if names is None else list(names)
    before = file_key(path)
    have = _lookup(path, before)
    got = dict(have.get(algo, {}))
    todo = [n for n in names if n not in got]
    if todo:
        got.update(_hash_tensors(st, todo, algo))
        _keep(path, before, have, algo, got)
    return {n: got[n] for n in names}


def file_digest(path: str | Path) -> str:
    """sha256 of a whole file (fingerprint.file_sha256), cached like the tensor hashes."""
    path = str(Path(path).resolve())
    before = file_key(path)
    have = _lookup(path, before)
    if "" in have.get("file-sha256", {}):
        return have["file-sha256"][""]
    h = hashlib.sha256()
    _feed(h, path, 0, before[2])
    digest = h.hexdigest()
    _keep(path, before, have, "file-sha256", {"": digest})
    return digest


def known(path: str | Path, fact: str) -> bool:
    """True if `remember(path, fact)` was called while the file had its current identity."""
    path = str(Path(path).resolve())
    return _lookup(path, file_key(path)).get("facts", {}).get(fact) == "yes"


def remember(path: str | Path, fact: str, key: list[int]) -> None:
    """Record that `fact` holds for the file as it was at `key` (e.g. "every tensor is finite")."""
    path = str(Path(path).resolve())
    _keep(path, key, _lookup(path, key), "facts", {fact: "yes"})


def _keep(path: str, key: list[int], have: dict, section: str, values: dict[str, str]) -> None:
    """Add `values` to the entry when the file still has `key` and is old enough (module docstring)."""
    if file_key(path) == key and time.time_ns() - key[4] > RACY_SECONDS * 1e9:
        merged = {a: dict(v) for a, v in have.items()}
        merged.setdefault(section, {}).update(values)
        _store(path, key, merged)


CHUNK = 8 << 20  # bytes read at a time: hashing streams through a small buffer, so memory stays bounded


def _feed(h, path: str, start: int, size: int) -> None:
    """h.update() with `size` bytes of the file from `start`, through one reused buffer (a
    whole-file mmap would count the file's pages in our RSS; hashlib and blake3 drop the GIL)."""
    buf = bytearray(min(CHUNK, size) or 1)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while size > 0:
            got = f.readinto(view[: min(CHUNK, size)])
            if not got:
                raise OSError(f"{path}: shorter than its safetensors header says")
            h.update(view[:got])
            size -= got


def _hash_tensors(st: SafetensorsFile, names: list[str], algo: str) -> dict[str, str]:
    def one(name: str) -> str:
        dtype, shape, begin, end = st.entries[name]
        h = hasher(algo)
        h.update(header(dtype, shape))
        _feed(h, str(st.path), st.data_start + begin, end - begin)
        return h.hexdigest()

    with ThreadPoolExecutor(max_workers=threads()) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))
