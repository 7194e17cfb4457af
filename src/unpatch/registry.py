"""One registry for what a recipe names by string: the unlearning methods (unpatch/methods/) and the
metrics (unpatch/evals/), with the lookup, the did-you-mean and a metric's option schema.

Each package registers its entries when it is imported, and a registry imports its package the first
time a name is looked up (discovery by the package's name). So a recipe is checked against the methods
and metrics it names from down here, below the packages that themselves read recipes and data.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .checks import option_values
from .errors import UnpatchError, did_you_mean


class Registry:
    def __init__(self, kind: str, package: str, known: str, cutoff: float = 0.6):
        self.kind, self.package, self.known, self.cutoff = kind, package, known, cutoff
        self.entries: dict[str, Any] = {}

    def _discover(self) -> None:
        importlib.import_module(self.package)  # its __init__ imports every entry's module

    def get(self, name: str) -> Any:
        """The entry `name`, or an UnpatchError naming the nearest known name and all of them."""
        self._discover()
        if name in self.entries:
            return self.entries[name]
        hint = did_you_mean(name, self.entries, self.cutoff)
        raise UnpatchError(f"unknown {self.kind} {name!r}.{hint} {self.known}: {', '.join(self.names())}")

    def names(self) -> list[str]:
        self._discover()
        return sorted(self.entries)


METHODS = Registry("method", "unpatch.methods", "Known")
METRICS = Registry("metric", "unpatch.evals", "Known metrics", cutoff=0.5)


def _parameters(metric: str) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(METRICS.get(metric).fn).parameters.values())[2:]  # after model, tokenizer
    return {p.name: p for p in params}


def check_options(metric: str, options: dict[str, Any]) -> None:
    """Refuse an option the metric's function does not take (unless it takes **kwargs)."""
    params = _parameters(metric)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in options:
        if name not in params:
            hint = did_you_mean(name, params)
            raise UnpatchError(f"metric {metric!r} has no option {name!r}.{hint} Its options: {', '.join(params) or 'none'}")
    option_values(metric, METRICS.get(metric).fn, options)
