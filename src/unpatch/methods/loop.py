"""The one training loop the loss-based methods share.

AdamW on the parameters that require grad, gradient accumulation and clipping, a rich progress
bar on stderr, optional early stop, and resumable checkpoints: every `checkpoint_every` steps the
trainable tensors, optimizer state, step, metric history and RNG states go to `ckpt_dir`, and
`resume=True` continues from there. The data order is a pure function of the micro-batch index
(data.Batches), so a resumed run on CPU is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..errors import UnpatchError
from ..recipe import TrainSection

# loss_fn(model, batch) -> loss, or (loss, {"metric": float, ...}) for logging / early stop
LossFn = Callable[[Any, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "state.pt"


@dataclass
class LoopResult:
    steps: int  # optimizer steps taken in total (fewer than asked if stopped early)
    history: list[dict[str, float]] = field(default_factory=list)  # per step: loss and method metrics
    stopped: str | None = None  # why it stopped early, if it did


def train_loop(model, loss_fn: LossFn, batches, train: TrainSection, *, ckpt_dir: Path | None = None,
               resume: bool = False, fingerprint: str = "", on_step: Callable[[int, dict[str, float]], None] | None = None,
               desc: str = "unlearning") -> LoopResult:
    """Run `train.steps` optimizer steps; micro-batch i of the run is `batches[i]`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UnpatchError("train: the model has no trainable parameters; check patch.target_modules")
    params = [p for _, p in named]
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    start, history = 0, []
    if resume and ckpt_dir is not None and (ckpt_dir / STATE).exists():
        start, history = _load_checkpoint(ckpt_dir, named, opt, fingerprint)
    model.train()
    stopped = None
    with _progress(desc, train.steps, start) as (bar, task):
        for step in range(start, train.steps):
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for a in range(train.grad_accum):
                out = loss_fn(model, batches[step * train.grad_accum + a])
                loss, metrics = out if isinstance(out, tuple) else (out, {})
                (loss / train.grad_accum).backward()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / train.grad_accum
            if not math.isfinite(sums["loss"]):
                raise UnpatchError(f"train: the loss became {sums['loss']} at step {step + 1}; lower train.lr or train.steps")
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            history.append(sums)
            done = step + 1
            bar.update(task, completed=done, loss=sums["loss"])
            if ckpt_dir is not None and train.checkpoint_every and done % train.checkpoint_every == 0 and done < train.steps:
                _save_checkpoint(ckpt_dir, named, opt, done, history, fingerprint)
            if on_step is not None:
                on_step(done, sums)
            stopped = _early_stop(train, history)
            if stopped:
                break
    model.eval()
    opt.zero_grad(set_to_none=True)
    return LoopResult(len(history), history, stopped)


def _early_stop(train: TrainSection, history: list[dict[str, float]]) -> str | None:
    es = train.early_stop
    if es is None or len(history) < es.window:
        return None
    if es.metric not in history[-1]:
        raise UnpatchError(f"train.early_stop.metric: this method reports no {es.metric!r} (it reports {', '.join(history[-1])})")
    mean = sum(h[es.metric] for h in history[-es.window:]) / es.window
    if es.above is not None and mean > es.above:
        return f"{es.metric} {mean:.4g} > {es.above:g} after {len(history)} steps"
    if es.below is not None and mean < es.below:
        return f"{es.metric} {mean:.4g} < {es.below:g} after {len(history)} steps"
    return None


# ------------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(ckpt_dir: Path, named, opt, step: int, history, fingerprint: str) -> None:
    # written atomically: a crash while checkpointing leaves the previous checkpoint intact
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        save_file({n: p.detach().to("cpu").contiguous() for n, p in named}, tmp / TRAINABLE)
        torch.save(opt.state_dict(), tmp / OPTIMIZER)
        torch.save({"step": step, "history": history, "fingerprint": fingerprint, "rng": _rng_state()}, tmp / STATE)


def _load_checkpoint(ckpt_dir: Path, named, opt, fingerprint: str) -> tuple[int, list[dict[str, float]]]:
    try:
        state = torch.load(ckpt_dir / STATE, weights_only=True)
        saved = load_file(ckpt_dir / TRAINABLE)
        opt_state = torch.load(ckpt_dir / OPTIMIZER, weights_only=True)
    except Exception as e:
        raise UnpatchError(f"{ckpt_dir}: unreadable checkpoint ({str(e).splitlines()[0]}); delete it and build without --resume") from e
    if state["fingerprint"] != fingerprint:
        raise UnpatchError(f"{ckpt_dir}: checkpoint was made by a different recipe or settings; delete it or build without --resume")
    if set(saved) != {n for n, _ in named}:
        raise UnpatchError(f"{ckpt_dir}: checkpoint holds other tensors than this build trains; delete it and build without --resume")
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])
    opt.load_state_dict(opt_state)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], list(state["history"])


class _progress:
    """rich progress bar on stderr (step, loss, ETA); silent when stderr is not a terminal."""

    def __init__(self, desc: str, total: int, start: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, disable=not console.is_terminal, transient=False)
        self.task = self.bar.add_task(desc, total=total, completed=start, loss=float("nan"))

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.task

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)
