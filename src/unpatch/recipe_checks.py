"""What a recipe is checked against beyond its own schema: the method it names (its parameters,
the data roles and patch kinds it needs) and the metrics' options, through the registry; and
pydantic's validation errors as one line: `recipes/x.yaml: train.lr: must be > 0`, with a
did-you-mean for unknown keys."""

from __future__ import annotations

import math
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from . import errors
from .errors import UnpatchError
from .registry import METHODS, check_options


def format_error(e: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    """The first error (unknown keys first: usually the root cause) as `key.path: message`."""
    errors = sorted(e.errors(), key=lambda er: er["type"] != "extra_forbidden")
    er = errors[0]
    loc = tuple(x for x in er["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    key = ".".join(str(x) for x in prefix + loc) or "(top level)"
    if er["type"] == "extra_forbidden":
        known = fields_at(root, loc[:-1])
        return f"{key}: unknown key{did_you_mean(str(loc[-1]), known)}"
    if er["type"] == "missing":
        return f"{key}: required key missing"
    ctx = er.get("ctx") or {}
    for t, op in (("greater_than", ">"), ("greater_than_equal", ">="), ("less_than", "<"), ("less_than_equal", "<=")):
        if er["type"] == t:
            bound = next(iter(ctx.values()))
            return f"{key}: must be {op} {bound:g} (got {er['input']!r})" if isinstance(bound, float) else f"{key}: must be {op} {bound} (got {er['input']!r})"
    msg = er["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if not isinstance(er.get("input"), dict | list) and er["type"] != "value_error":
        msg += f" (got {er['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{key}: {msg}{more}"


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, for did-you-mean on unknown keys."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        sub = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sub:
            return []
        model = sub[0]
    return [n for n, f in model.model_fields.items() if not f.exclude]


def did_you_mean(word: str, known: typing.Iterable[str]) -> str:
    hint = errors.did_you_mean(word, known)
    return f".{hint}" if hint else ""


# ------------------------------------------------------------------------------ against the registry


def validate_method(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        raise UnpatchError(f"{where}: method: missing; add e.g. `method: {{name: ga}}`")
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise UnpatchError(f"{where}: method: expected a mapping with `name` and the method's parameters")
    params = dict(raw)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise UnpatchError(f"{where}: method.name: missing; e.g. `name: ga`")
    try:
        spec = METHODS.get(name)  # imports the methods (and torch) on first use
    except UnpatchError as e:
        raise UnpatchError(f"{where}: method.name: {e}") from e
    try:
        cfg = spec.config.model_validate(params)
    except ValidationError as e:
        raise UnpatchError(f"{where}: {format_error(e, spec.config, ('method',))}") from e
    dumped = cfg.model_dump(mode="json")
    for key, value in _floats(dumped, ("method",)):
        if not math.isfinite(value):  # method configs are the methods' own; one check covers all of them
            raise UnpatchError(f"{where}: {key}: must be a finite number (got {value!r})")
    return {"name": name, "params": dumped}


def _floats(node: Any, path: tuple) -> typing.Iterator[tuple[str, float]]:
    if isinstance(node, float):
        yield ".".join(path), node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _floats(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _floats(v, (*path, str(i)))


def check_eval_options(recipe, where: str) -> None:
    """Each eval option must be one the metric takes, of the type it declares (`limit: abc` would
    otherwise surface only after training, or never): so validate and --dry-run catch it too."""
    if not recipe.eval.options:
        return
    for metric, given in recipe.eval.options.items():
        try:
            check_options(metric, given)
        except UnpatchError as e:
            raise UnpatchError(f"{where}: eval.options.{metric}: {e}") from None


def check_needs(recipe, where: str) -> None:
    spec = METHODS.get(recipe.method.name)
    for role in spec.needs:
        if getattr(recipe.data, role) is None:
            raise UnpatchError(f"{where}: data.{role}: required by method {spec.name!r}; add e.g. `{role}: builtin:toxicity`")
    if recipe.patch.kind not in spec.kinds:
        raise UnpatchError(f"{where}: patch.kind: method {spec.name!r} builds only {' or '.join(spec.kinds)} patches")
    if recipe.learn is not None and recipe.data.forget is None:
        raise UnpatchError(f"{where}: learn: needs data.forget (the content to learn, then forget); add e.g. `forget: {{source: book.txt, chunk_words: 48}}`")
