"""A recipe is one YAML file = one reproducible patch. `load_recipe` turns every problem into a
one-line UnpatchError of the form `recipes/x.yaml: train.lr: must be > 0`.

Sections: model, data, method, patch, train, eval. The `method` section is `name` plus the
method's own parameters, validated by the config class the method registered (unpatch.methods).
"""

from __future__ import annotations

import hashlib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .checks import COUNT_MAX, LR_MAX, RANK_MAX, SCALE_MAX, assignment, regular_file
from .errors import UnpatchError
from .recipe_checks import check_eval_options, check_needs, validate_method
from .recipe_checks import did_you_mean as _did_you_mean
from .recipe_checks import format_error as _format_error

# allow_inf_nan=False: YAML reads `.nan` / `.inf` as floats, and a NaN lr trains a NaN patch
_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class ModelSection(BaseModel):
    model_config = _FROZEN
    id: str = "smollm2-135m"
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPE_NAMES)}")
        return v


class Source(BaseModel):
    """Where texts come from: `builtin:<name>`, `hub:<dataset>[:<config>][@<split>]`, or a file
    (csv/tsv/json/jsonl/parquet/txt) relative to the recipe. A bare string means `{source: ...}`."""

    model_config = _FROZEN
    source: str
    column: str | None = None  # text column (default: `text`, or the only column there is)
    more: str = "sent_more"  # pair columns: the sentence to disfavour ...
    less: str = "sent_less"  # ... and the one to favour
    bias_type: str | list[str] | None = None  # keep only records of these bias types
    limit: int | None = Field(None, gt=0)  # first N usable examples (after filtering)
    chunk_words: int | None = Field(None, gt=0)  # txt: cut the whole text into N-word passages

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"source": v}
        if not isinstance(v, dict | Source):
            raise ValueError(f"expected builtin:<name>, hub:<dataset>, a file path, or a mapping with `source:` (got {v!r})")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if not v or v in ("builtin:", "hub:"):
            raise ValueError("empty source; give builtin:<name>, hub:<dataset> or a file path")
        return v


class DataSection(BaseModel):
    model_config = _FROZEN
    forget: Source | None = None
    retain: Source | None = None
    pairs: Source | None = None


class MethodSection(BaseModel):
    """`params` holds the method's config, validated and with its defaults filled in."""

    model_config = _FROZEN
    name: str
    params: dict[str, Any] = {}


class PatchSection(BaseModel):
    model_config = _FROZEN
    kind: Literal["lora", "delta"] = "lora"
    rank: int = Field(8, gt=0, le=RANK_MAX)
    alpha: float = Field(16.0, gt=0, le=1e6)
    target_modules: list[str] | None = None  # None: guessed from the architecture at build time
    # the strength the patch ships at (its built-in coefficient, under which --scale 1 applies it);
    # `unpatch sweep` measures which strength keeps perplexity in bounds
    coefficient: float = 1.0
    name: str | None = None  # None: the recipe file's stem

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.-]+", v):
            raise ValueError(f"{v!r} is not a plain name (letters, digits, _ . - only)")
        return v

    @field_validator("coefficient")
    @classmethod
    def _coefficient(cls, v: float) -> float:
        if v == 0 or v != v or abs(v) > SCALE_MAX:
            raise ValueError(f"must be a finite number other than 0, between -{SCALE_MAX:g} and {SCALE_MAX:g} (0 would ship a patch that does nothing)")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("empty list; leave it out to use the architecture's defaults")
        return v


class EarlyStop(BaseModel):
    """Stop once the mean of `metric` over the last `window` steps crosses a threshold."""

    model_config = _FROZEN
    metric: str = "forget_loss"
    above: float | None = None
    below: float | None = None
    window: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _one(self) -> EarlyStop:
        if self.above is None and self.below is None:
            raise ValueError("give `above` or `below`")
        return self


class TrainSection(BaseModel):
    model_config = _FROZEN
    steps: int = Field(100, gt=0, le=COUNT_MAX)
    lr: float = Field(1e-4, gt=0, le=LR_MAX)
    batch_size: int = Field(8, gt=0, le=COUNT_MAX)
    grad_accum: int = Field(1, gt=0, le=COUNT_MAX)
    max_length: int = Field(128, gt=1, le=COUNT_MAX)
    seed: int = 0
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(0, ge=0)  # 0 = off
    early_stop: EarlyStop | None = None


class EvalSection(BaseModel):
    model_config = _FROZEN
    metrics: list[str] = []  # empty: the build's cheap default set
    options: dict[str, dict[str, Any]] = {}  # metric -> its options, e.g. {stereoset: {limit: 300}}

    @model_validator(mode="after")
    def _options_for_chosen(self) -> EvalSection:
        extra = [m for m in self.options if self.metrics and m not in self.metrics]
        if extra:
            raise ValueError(f"options given for {', '.join(extra)}, which is not in eval.metrics")
        return self


class LearnSection(BaseModel):
    """Learn, then forget (the copyright setting of 2405.15152): first LoRA-fine-tune the base on
    the content (plain NLL descent on data.forget, so the model memorises it), save that as its
    own patch `<out>-learn`, and build the unlearning patch on the base with it applied. Why a
    separate patch: the base never memorised the text, so forgetting it there cannot be specific;
    the learn patch is the stand-in for a model that was trained on the book."""

    model_config = _FROZEN
    steps: int = Field(60, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, gt=0)
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    max_length: int | None = Field(None, gt=1)  # None: train.max_length
    seed: int | None = None  # None: train.seed
    target_modules: list[str] | None = None  # None: patch.target_modules, else the architecture's defaults


class Recipe(BaseModel):
    model_config = _FROZEN
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    method: MethodSection
    patch: PatchSection = PatchSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    learn: LearnSection | None = None  # a learn stage before the unlearning (see LearnSection)
    # not YAML keys: where the recipe came from, byte for byte
    path: Path | None = Field(None, exclude=True)
    text: str = Field("", exclude=True)
    sha256: str = Field("", exclude=True)

    @property
    def base_dir(self) -> Path:
        """Folder that relative data paths are resolved against."""
        return self.path.parent if self.path else Path.cwd()


SECTIONS = ("model", "data", "method", "patch", "train", "eval", "learn")


# ------------------------------------------------------------------------------ loading


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override (`key.path=value`, value parsed as YAML) and validate a recipe."""
    where = str(path)
    p = Path(path)
    if not p.exists():
        raise UnpatchError(f"{where}: no such recipe file")
    regular_file(p, "(a recipe is a YAML file)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UnpatchError(f"{where}: not a text file (byte {e.start} is not UTF-8); a recipe is a YAML file") from None
    if "\x00" in text:
        raise UnpatchError(f"{where}: not a text file (it holds NUL bytes); a recipe is a YAML file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UnpatchError(f"{where}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from e
    return _from_raw({} if raw is None else raw, overrides, where, p, text)


def as_recipe(recipe: str | Path | Recipe | dict, overrides: typing.Sequence[str] = (), *,
              base_dir: str | Path | None = None) -> Recipe:
    """A recipe from a YAML path, a `Recipe`, or a dict shaped like the YAML (the Python API).
    A dict or object is validated exactly as a file would be; relative data paths resolve against
    `base_dir` (default: the current folder), and its YAML dump is what `recipe.yaml` records."""
    if isinstance(recipe, str | Path):
        return load_recipe(recipe, overrides)
    if isinstance(recipe, Recipe):
        raw = recipe.model_dump(mode="json", exclude_none=True)
        raw["method"] = {"name": recipe.method.name, **dict(recipe.method.params)}
        base_dir = base_dir if base_dir is not None else recipe.base_dir
    elif isinstance(recipe, dict):
        import json

        raw = json.loads(json.dumps(recipe, default=str))  # a copy; Path values become strings
    else:
        raise UnpatchError(f"recipe: expected a YAML path, a Recipe or a dict, not {type(recipe).__name__}")
    section = raw.get("patch") if isinstance(raw, dict) else None
    name = re.sub(r"[^\w.-]", "_", str(section.get("name") or "recipe") if isinstance(section, dict) else "recipe")
    p = Path(base_dir or Path.cwd()) / f"{name}.yaml"  # no such file: it only anchors relative data paths
    text = yaml.safe_dump(raw, sort_keys=False)
    return _from_raw(yaml.safe_load(text), overrides, "recipe (dict)", p, text)


def _from_raw(raw: Any, overrides: typing.Sequence[str], where: str, p: Path, text: str) -> Recipe:
    if not isinstance(raw, dict):
        raise UnpatchError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    for item in overrides:
        _apply_override(raw, item, where)
    for key in raw:
        if key not in SECTIONS:
            raise UnpatchError(f"{where}: {key}: unknown key{_did_you_mean(str(key), SECTIONS)}")
    raw["method"] = validate_method(raw.get("method"), where)
    raw.setdefault("patch", {})
    if isinstance(raw["patch"], dict) and raw["patch"].get("name") is None:
        raw["patch"] = {**raw["patch"], "name": re.sub(r"[^\w.-]", "_", p.stem)}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UnpatchError(f"{where}: {_format_error(e, Recipe)}") from e
    check_needs(recipe, where)
    check_eval_options(recipe, where)
    return recipe.model_copy(update={"path": p, "text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()})


def _apply_override(raw: dict, item: str, where: str) -> None:
    key, parsed = assignment(item)
    parts = key.strip().split(".") if key is not None else []
    if key is None or not all(parts):
        raise UnpatchError(f"--set {item!r}: expected key.path=value (e.g. train.lr=1e-4)")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and parts[0] in ("data", "method") and i == len(parts) - 2:
            # `data.forget: builtin:x` + `--set data.forget.limit=5`: widen the shorthand
            child = {"source": child} if parts[0] == "data" else {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise UnpatchError(f"{where}: --set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
        node[part] = child
        node = child
    node[parts[-1]] = parsed


__all__ = ["Recipe", "Source", "load_recipe"]
