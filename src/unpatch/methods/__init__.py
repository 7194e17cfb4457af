"""The method registry. One file per method; each registers itself with its config class:

    @register("ga", config=GAConfig, display="Gradient ascent", paper="https://arxiv.org/abs/...")
    def ga(ctx: Context) -> MethodResult: ...

A method trains `ctx.model` in place (its trainable parameters are already chosen by the build:
LoRA adapters or the target weights) and returns the patch's built-in coefficient. Every module in
this package except `loop` is imported below, so a new method file registers by existing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ..batches import Batches
from ..errors import UnpatchError
from ..registry import METHODS
from .loop import train_loop

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..sources import Data


class NoParams(BaseModel):
    """For methods without parameters of their own: any key is an unknown key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Context:
    """Everything a method gets. `batches(role)` yields padded token batches of a data role."""

    model: Any
    tokenizer: Any
    recipe: Recipe
    config: BaseModel
    data: Data
    ckpt_dir: Path | None = None  # where the loop keeps resumable checkpoints (None: nowhere)
    resume: bool = False
    fingerprint: str = ""  # of the build's settings; a checkpoint from other settings is refused
    on_step: Callable[[int, dict[str, float]], None] | None = None  # called after each step

    def batches(self, role: str = "forget"):
        texts = getattr(self.data, role)
        if texts is None:
            raise UnpatchError(f"{self.recipe.path}: data.{role}: required by method {self.recipe.method.name!r}")
        t = self.recipe.train
        # each role gets its own order, all fixed by the seed
        seed = t.seed + ("forget", "retain", "pairs").index(role) * 7919
        return Batches.from_texts(texts, self.tokenizer, t.max_length, t.batch_size, seed, where=f"{self.recipe.path}: data.{role}")

    def train(self, loss_fn, batches, desc: str):
        """The shared loop (methods/loop.py) over `batches` with this build's checkpoints, resume,
        settings fingerprint and step hook: every method trains through here."""
        return train_loop(self.model, loss_fn, batches, self.recipe.train, ckpt_dir=self.ckpt_dir, resume=self.resume,
                          fingerprint=self.fingerprint, on_step=self.on_step, desc=desc)


@dataclass
class MethodResult:
    coefficient: float = 1.0  # the patch's built-in multiplier (e.g. -lambda for task negation)
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, res, notes: list[str] = (), coefficient: float = 1.0) -> MethodResult:
        """A method's result from the loop's (`res`): its steps and history, the method's notes, and
        the loop's "stopped early" note last when it stopped before train.steps."""
        stopped = [f"stopped early: {res.stopped}"] if res.stopped else []
        return cls(coefficient=coefficient, steps=res.steps, history=res.history, notes=[*notes, *stopped])


# objective(model, tokenizer, data, recipe) -> float: what the method pushes, measured on a model
Objective = Callable[[Any, Any, "Data", "Recipe"], float]
# passes(method params, patch kind) -> (forward+backward passes on the trained model per micro-batch,
# forwards of a frozen reference without grad): declared by each method, read by `build --dry-run`
Passes = Callable[[dict[str, Any], str], tuple[int, int]]
Needs = Callable[[dict[str, Any], str], bool]  # (method params, patch kind) -> does the method need it


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[Context], MethodResult]
    config: type[BaseModel]
    display: str
    paper: str | None
    needs: tuple[str, ...]  # data roles the method cannot run without
    kinds: tuple[str, ...]  # patch kinds it can build
    objective: Objective | None = None  # the registry-driven tests check it moves `direction`
    direction: str = "up"  # up | down
    example: dict[str, Any] = field(default_factory=dict)  # method params for a tiny test build
    passes: Passes = lambda params, kind: (1, 0)  # what the dry run's memory and time estimates count
    frozen_reference: Needs = lambda params, kind: False  # keeps a frozen copy of the base weights in memory


_REGISTRY: dict[str, MethodSpec] = METHODS.entries


def register(name: str, config: type[BaseModel] = NoParams, display: str | None = None, paper: str | None = None,
             needs: tuple[str, ...] = ("forget",), kinds: tuple[str, ...] = ("lora", "delta"),
             objective: Objective | None = None, direction: str = "up", example: dict[str, Any] | None = None,
             passes: Passes = lambda params, kind: (1, 0), frozen_reference: Needs = lambda params, kind: False):
    def deco(fn: Callable[[Context], MethodResult]):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, fn, config, display or name, paper, tuple(needs), tuple(kinds),
                                     objective, direction, dict(example or {}), passes, frozen_reference)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    return METHODS.get(name)


def list_methods() -> list[MethodSpec]:
    return [_REGISTRY[n] for n in METHODS.names()]


for _m in pkgutil.iter_modules(__path__):
    if _m.name != "loop" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
