"""Pydantic validation errors of a recipe as one line: `recipes/x.yaml: train.lr: must be > 0`,
with a did-you-mean for unknown keys."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError

from . import errors


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
