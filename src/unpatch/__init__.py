"""unpatch: build, share and apply unlearning patches for causal language models.

The Python API (unpatch.api) loads on first use, so `import unpatch` stays cheap (no torch):
build, load_patch, load_model, apply / Applied, write_merged, revert, evaluate, sweep, push, pull.

`build`, `apply`, `evaluate` and `sweep` are also submodule names (`unpatch.apply` is a module).
Those modules are made callable: `unpatch.apply(model, patch)` calls unpatch.api.apply whether
or not the module was imported before, and `import unpatch.apply as m` still gives the module.
"""

import sys
import types

__version__ = "0.1.0"

__all__ = ["Applied", "apply", "build", "evaluate", "load_model", "load_patch", "pull", "push", "revert", "sweep",
           "write_merged"]
_MODULES = ("apply", "build", "evaluate", "sweep")  # submodules that double as API functions


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _callable(module_name: str) -> None:
    """Called at the end of each module in _MODULES: calling the module calls the API function."""
    sys.modules[module_name].__class__ = _CallableModule


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)  # the module makes itself callable
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'unpatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
