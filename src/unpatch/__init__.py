"""unpatch: build, share and apply unlearning patches for causal language models.

The Python API (unpatch.api) loads on first use, so `import unpatch` stays cheap (no torch):
build, load_patch, load_model, apply / Applied, write_merged, revert, evaluate, sweep, push, pull.
They are plain functions: no submodule bears an API name (the library's modules are
unpatch.builder, unpatch.patch.apply, unpatch.evals.runner, unpatch.evals.sweep, ...).
"""

from .version import __version__ as __version__  # the one number (unpatch/version.py): `unpatch.__version__` reads it

__all__ = ["Applied", "apply", "build", "evaluate", "load_model", "load_patch", "pull", "push", "revert", "sweep",
           "write_merged"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'unpatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
