"""Registers `--model unpatch` with lm-evaluation-harness without importing it (see
unpatch/lm_eval_model.py). Loaded at interpreter start by `unpatch-lm-eval.pth`, so it must stay
cheap: stdlib only, and nothing happens until `lm_eval.models` itself is imported, at which
point a lazy placeholder "unpatch.lm_eval_model:UnpatchLM" joins lm-eval's model registry."""

import importlib.abc
import importlib.util
import sys

TARGET = "lm_eval.models"
MODEL = "unpatch.lm_eval_model:UnpatchLM"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                from lm_eval.api.registry import model_registry

                if "unpatch" not in model_registry:
                    model_registry.register("unpatch", target=MODEL)
            except Exception:  # another lm-eval layout: `import unpatch.lm_eval_model` still works
                pass

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path) and TARGET not in sys.modules:
        sys.meta_path.insert(0, _Finder())


install()
