"""Which parameters of a loaded model still hold the bytes of the safetensors file they came from.

`load_model` records, per parameter, the file and tensor it was read from, the file's identity
(hashcache.file_key) and the parameter's version counter. While all three still hold, the
parameter's fingerprint is the file tensor's hash (cached on disk: no hashing on the apply path)
and its original bytes can be read back from the file (no backup copy needed for a bit-exact
revert). A parameter stops counting as "from the file" as soon as
  - any in-place op changes it (optimizer steps, load_state_dict, `Applied`: each bumps
    `param._version`), or it is replaced by another tensor object;
  - the file's identity changes (any write to it: see hashcache).
Writes through `param.data` bypass the version counter; code in this library that writes through
`.data` either restores the exact bytes or works on a copy (copy.deepcopy(model) is a new module,
so it is never recorded). At load, the first and last elements of every recorded parameter are
compared with the file, which catches a loader that renames or transforms tensors.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UnpatchError
from .hashcache import file_hashes, file_key
from .safetensors_io import SafetensorsFile

_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Source
_PROBE = 64  # elements compared with the file at each end of a tensor


@dataclass
class Origin:
    """The original bytes of one parameter: tensor `name` of file `st`, as long as it keeps `key`."""

    st: SafetensorsFile
    name: str
    key: list[int]

    def check(self) -> None:
        if file_key(self.st.path) != self.key:
            raise UnpatchError(f"{self.st.path}: changed since the model was loaded from it, so its original tensors "
                               "cannot be restored from it; reload the base model")

    def read(self, buffers=None) -> torch.Tensor:
        """The original bytes (into `buffers`, a reuse.Buffers, if given: no fresh pages)."""
        self.check()
        return buffers.read(self.st, self.name) if buffers is not None else self.st.read(self.name)

    def hash(self, algo: str) -> str:
        got = file_hashes(self.st, algo, [self.name])[self.name]
        self.check()  # the hashes above are of the file as it is now: valid only if it still has our key
        return got


@dataclass
class _Source:
    origins: dict[str, Origin]
    params: dict[str, tuple[weakref.ref, int]]  # name -> (the parameter object, its version at load)
    prefetching: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def files_of(folder: Path) -> list[SafetensorsFile]:
    """The safetensors shards of a model folder (as merge.Checkpoint finds them)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [SafetensorsFile(folder / n) for n in names]
    return [SafetensorsFile(f) for f in sorted(folder.glob("*.safetensors"))]


PREFETCH_HASH = "sha256"  # what `unpatch build` records today (fingerprint.tensor_sha256)


def start(folder: Path) -> tuple[list[SafetensorsFile], list[list[int]], threading.Thread | None]:
    """Before loading `folder`: its shards, their identities, and a background thread hashing them."""
    try:
        files = files_of(Path(folder))
        keys = [file_key(st.path) for st in files]
    except (OSError, UnpatchError):
        return [], [], None
    return files, keys, prefetch(files, PREFETCH_HASH) if files else None


def prefetch(files: list[SafetensorsFile], algo: str) -> threading.Thread:
    """Hash the files in the background (a no-op on a cache hit): overlapped with loading them."""
    def run():
        for st in files:
            try:
                file_hashes(st, algo)
            except (OSError, UnpatchError, ValueError):
                pass  # then the apply path hashes what it needs itself
    th = threading.Thread(target=run, name="unpatch-prefetch-hashes", daemon=True)
    th.start()
    return th


def record(model: torch.nn.Module, files: list[SafetensorsFile], keys: list[list[int]],
           prefetching: threading.Thread | None = None) -> int:
    """Remember which parameters of `model` equal a tensor of `files` (as they were at `keys`);
    returns how many. Files whose identity changed during loading are left out."""
    where = {n: (st, k) for st, k in zip(files, keys, strict=True) if file_key(st.path) == k for n in st.keys()}
    origins, params = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in where:
                continue
            st, key = where[name]
            if st.dtype(name) != p.dtype or tuple(st.shape(name)) != tuple(p.shape) or not _probe_equal(st, name, p):
                continue
            origins[name] = Origin(st, name, key)
            params[name] = (weakref.ref(p), p._version)
    _SOURCES[model] = _Source(origins, params, prefetching)
    return len(origins)


def _probe_equal(st: SafetensorsFile, name: str, p: torch.Tensor) -> bool:
    _, _, begin, end = st.entries[name]
    n, size = p.numel(), p.element_size()  # record() checked that the dtypes agree
    flat = p.detach().reshape(-1)
    k = min(_PROBE, n)
    with open(st.path, "rb", buffering=0) as f:
        for at in {0, n - k}:
            f.seek(st.data_start + begin + at * size)
            raw = bytearray(f.read(k * size))
            if len(raw) != k * size:
                return False
            want = torch.frombuffer(raw, dtype=torch.uint8)
            if not torch.equal(flat[at: at + k].cpu().contiguous().view(torch.uint8), want):
                return False
    return True


def origin(model: torch.nn.Module, name: str, param: torch.Tensor) -> Origin | None:
    """The file tensor `param` still equals, or None (changed, replaced, file rewritten, never recorded)."""
    src = _SOURCES.get(model)
    if src is None or name not in src.origins:
        return None
    with src.lock:
        ref, version = src.params[name]
    if ref() is not param or param._version != version:
        return None
    o = src.origins[name]
    return o if file_key(o.st.path) == o.key else None


def restored(model: torch.nn.Module, name: str, param: torch.Tensor) -> None:
    """`param` was just overwritten with the exact bytes of its origin: it counts as from the file again."""
    src = _SOURCES.get(model)
    if src is not None and name in src.origins:
        with src.lock:
            src.params[name] = (weakref.ref(param), param._version)


def hashes(model: torch.nn.Module, origins: dict[str, Origin], algo: str) -> dict[str, str]:
    """Hashes of the origins' file tensors, one cache look-up per file (after the load-time
    prefetch, if it is still running: it is computing the same hashes)."""
    src = _SOURCES.get(model)
    if src is not None and src.prefetching is not None:
        src.prefetching.join()
        src.prefetching = None
    by_file: dict[Path, list[Origin]] = {}
    for o in origins.values():
        by_file.setdefault(o.st.path, []).append(o)
    out = {}
    for group in by_file.values():
        got = file_hashes(group[0].st, algo, [o.name for o in group])
        group[0].check()  # hashes of the file as it is now: valid for the loaded bytes only if unchanged
        out.update({o.name: got[o.name] for o in group})
    return out
