"""Metric registry: one file per metric, each registered with its ideal value and direction.

A metric is a function `(model, tokenizer, **options) -> dict[str, float | int]`; the first key
is its headline number. `direction` says which way is better: "lower", "higher", or "target"
(closest to `ideal` is best, e.g. CrowS-Pairs at 50 %).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..registry import METRICS

DIRECTIONS = ("lower", "higher", "target")
METRIC_MODULES = ("crows_pairs", "perplexity", "forgetting", "kl", "stereoset", "harmful", "verbatim", "recall", "bbq")  # every module here registers its metrics on import


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., dict[str, Any]]
    ideal: float | None
    direction: str
    description: str
    data_role: str | None = None  # a recipe data role (forget / retain) whose data a build scores by default

    def __call__(self, model, tokenizer, **options) -> dict[str, Any]:
        return self.fn(model, tokenizer, **options)


_REGISTRY: dict[str, Metric] = METRICS.entries


def register_metric(name: str, *, ideal: float | None = None, direction: str = "lower", description: str = "",
                    data_role: str | None = None):
    """Decorator: register `fn(model, tokenizer, **options) -> dict` under `name`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"metric {name!r}: direction must be one of {DIRECTIONS}, not {direction!r}")
    if direction == "target" and ideal is None:
        raise ValueError(f"metric {name!r}: direction 'target' needs an ideal value")

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"metric {name!r} is registered twice")
        doc = description or (fn.__doc__ or "").strip().split("\n", 1)[0]
        _REGISTRY[name] = Metric(name, fn, ideal, direction, doc, data_role)
        return fn

    return wrap


def get_metric(name: str) -> Metric:
    """The registered metric `name`, or an UnpatchError that suggests the nearest name."""
    return METRICS.get(name)


def list_metrics() -> list[str]:
    return METRICS.names()


for _module in METRIC_MODULES:
    importlib.import_module(f"{__name__}.{_module}")
