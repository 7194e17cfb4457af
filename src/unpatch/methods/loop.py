"""The one training loop the loss-based methods share.

AdamW on the parameters that require grad, gradient accumulation and clipping, progress on
stderr (unpatch.progress: a bar on a terminal, timestamped lines in logs), optional early stop,
and resumable checkpoints: every `checkpoint_every` steps the trainable tensors, optimizer state, step, metric history and RNG states go to `ckpt_dir`, and
`resume=True` continues from there. The data order is a pure function of the micro-batch index
(data.Batches), so a resumed run on CPU is bit-identical to an uninterrupted one.

Scale (see unpatch.distributed): under torchrun / accelerate launch each rank runs its pieces of
every step and DDP (or FSDP / DeepSpeed) averages the gradients; only rank 0 writes checkpoints.
On CUDA a micro-batch that would not fit is cut into row slices (plan.choose_chunks), the step
unchanged. Trainable weights held in bf16/fp16 (a delta patch on a low-precision base) get fp32
master copies: AdamW's small updates would round away in 8 mantissa bits, and the delta is then
read from the masters (`fp32_masters`), not from the rounded weights. An fp16 model also gets
dynamic loss scaling (fp16 underflows small gradients; bf16 does not).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import progress
from ..atomic import atomic_dir
from ..batches import Batches
from ..distributed import activation_bytes_per_token, choose_chunks, engine, schedule, splittable, take
from ..errors import UnpatchError
from ..recipe import TrainSection
from .lora_fast import fused_lora

# loss_fn(model, batch) -> loss, or (loss, {"metric": float, ...}) for logging / early stop
LossFn = Callable[[Any, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"  # no pickle
_LOW = (torch.bfloat16, torch.float16)
# model -> what the build must read instead of the live weights: fp32 masters, or a gathered state
_MASTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GATHERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class LoopResult:
    steps: int  # optimizer steps taken in total (fewer than asked if stopped early)
    history: list[dict[str, float]] = field(default_factory=list)  # per step: loss and method metrics
    stopped: str | None = None  # why it stopped early, if it did


def fp32_masters(model) -> dict[str, torch.Tensor]:
    """{parameter name: fp32 trained value} for trainable weights held in bf16/fp16 ({} otherwise).
    Where a method changed a weight after the loop (pcgu puts its frozen rows back), the live
    weight wins: a master is trusted only where it still rounds to the weight."""
    live = dict(model.named_parameters())
    return {n: torch.where(m.to(live[n].dtype) == live[n].detach(), m, live[n].detach().float())
            for n, m in _MASTERS.get(model, {}).items()}


def gathered_state(model) -> dict[str, torch.Tensor] | None:
    """The full trained state dict when FSDP / DeepSpeed sharded the model, else None."""
    return _GATHERED.get(model)


def _fused_adamw(params, eng) -> bool | None:
    """torch's fused AdamW (one kernel for all tensors; ~5x faster than its per-tensor loop on 420
    LoRA tensors on CPU) where it is supported: CPU or CUDA floating point, not sharded."""
    ok = not eng.sharded and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return True if ok else None


def train_loop(model, loss_fn: LossFn, batches, train: TrainSection, *, ckpt_dir: Path | None = None,
               resume: bool = False, fingerprint: str = "", on_step: Callable[[int, dict[str, float]], None] | None = None,
               desc: str = "unlearning", split_rows: bool | None = None) -> LoopResult:
    """Run `train.steps` optimizer steps; micro-batch i of the run is `batches[i]`.

    `split_rows`: may a micro-batch be cut into row slices (across ranks, or to fit a GPU)? That
    is exact only when the loss is a mean over the batch's labelled tokens. None (auto): yes for
    plain token batches of a data.Batches (ga, task_vector, masked_ga without pairs); a method
    whose loss over such batches is not a token mean passes False."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UnpatchError("train: the model has no trainable parameters; check patch.target_modules")
    eng = engine()
    if eng.sharded and (train.checkpoint_every or resume):
        raise UnpatchError(f"train.checkpoint_every: checkpoints and --resume are not supported under {eng.kind} yet; "
                           "set train.checkpoint_every: 0 (or use DDP)")
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    masters = {n: p.detach().float().clone() for n, p in named if p.dtype in _LOW} if not eng.sharded else {}
    # fp16 (not bf16: its exponent range is fp32's) underflows small gradients: scale the loss
    # dynamically, skip steps that overflow (torch.amp.GradScaler); fp32 / bf16 runs are untouched
    dev = next(model.parameters()).device
    fp16 = not eng.sharded and any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler(dev.type) if fp16 else None
    held = [(n, masters.get(n, p)) for n, p in named]  # what AdamW updates and checkpoints hold
    params = [p for _, p in held]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=_fused_adamw(params, eng))
    start, history = 0, []
    if resume and ckpt_dir is not None and (ckpt_dir / STATE).exists():
        start, history = _load_checkpoint(ckpt_dir, held, opt, fingerprint)
        _sync_from_masters(named, masters)
    if eng.world > 1 and eng.all_sum([float(start)])[0] != start * eng.world:
        raise UnpatchError(f"{ckpt_dir}: not every process sees this checkpoint; put --out on a disk all machines share, "
                           "or build without --resume")
    G = train.grad_accum
    probe = batches[start * G]
    can_split = splittable(probe) and (isinstance(batches, Batches) if split_rows is None else split_rows)
    pieces = schedule(G, eng.world, eng.rank, _rows(probe), can_split, _chunks(model, probe, params, train) if can_split else 1,
                      method=desc.split()[0])
    handle, opt = eng.wrap(model, opt, len(pieces))
    if eng.sharded:  # FSDP2 / ZeRO-3 replace the parameters: clip what the wrapper holds now
        params = [p for p in handle.parameters() if p.requires_grad]
    runner = model if handle is model else _Proxy(handle, model)  # methods still read model.device etc.
    model.train()
    stopped = None
    fused = fused_lora(model) if not eng.sharded else contextlib.nullcontext()  # FSDP / ZeRO-3 own the parameters
    with fused, progress.task(desc, train.steps, unit="steps", completed=start, enabled=eng.main) as bar:
        for step in range(start, train.steps):
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for k, piece in enumerate(pieces):
                part, share = take(batches[step * G + piece.micro], piece)
                out = loss_fn(runner, part)
                loss, metrics = out if isinstance(out, tuple) else (out, {})
                # DDP averages over ranks and the step averages its micro-batches: see distributed.py
                scaled = loss * (share * eng.world) / G
                eng.backward(scaler.scale(scaled) if scaler else scaled, handle, sync=k == len(pieces) - 1)
                for key, v in {"loss": loss.item(), **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * share / G
            if eng.world > 1:  # every rank must see the same metrics: early stop decides the same
                sums = dict(zip(sorted(sums), eng.all_sum([sums[key] for key in sorted(sums)]), strict=True))
            if not math.isfinite(sums["loss"]):
                raise UnpatchError(f"train: the loss became {sums['loss']} at step {step + 1}; lower train.lr or train.steps")
            _grads_to_masters(named, masters)
            if scaler:
                scaler.unscale_(opt)  # clip the true gradients
            if train.max_grad_norm is not None:
                eng.clip(params, train.max_grad_norm)
            if scaler:
                scaler.step(opt)  # skipped when a gradient overflowed
                scaler.update()
            else:
                opt.step()
            _sync_from_masters(named, masters)
            history.append(sums)
            done = step + 1
            bar.update(done, status=f"loss {sums['loss']:.4f}")
            if eng.main and ckpt_dir is not None and train.checkpoint_every and done % train.checkpoint_every == 0 and done < train.steps:
                _save_checkpoint(ckpt_dir, held, opt, done, history, fingerprint)
            if on_step is not None:
                on_step(done, sums)
            stopped = _early_stop(train, history)
            if stopped:
                break
    model.eval()
    opt.zero_grad(set_to_none=True)
    if masters:
        _MASTERS[model] = masters
    state = eng.full_state(handle)
    if state is not None:
        _GATHERED[model] = state
    return LoopResult(len(history), history, stopped)


class _Proxy:
    """Calls go through the DDP/FSDP wrapper (it syncs gradients); attributes (device, config,
    disable_adapter ...) come from the bare model, as the methods expect."""

    def __init__(self, handle, model):
        self._handle, self._model = handle, model

    def __call__(self, *args, **kwargs):
        return self._handle(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _rows(batch) -> int:
    return batch["input_ids"].shape[0] if splittable(batch) else 1


def _chunks(model, batch, params, train: TrainSection) -> int:
    """How many row slices a rank's share of a micro-batch needs to fit the GPU (1 off CUDA)."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(dev)
    trainable = sum(p.numel() for p in params)
    reserved = trainable * (4 + 8)  # fp32 gradients + AdamW's two moments, not allocated yet
    e = next(model.parameters()).element_size()
    per_row = activation_bytes_per_token(model.config, e) * batch["input_ids"].shape[1]
    return choose_chunks(-(-_rows(batch) // engine().world), free, reserved, per_row)


def _grads_to_masters(named, masters: dict[str, torch.Tensor]) -> None:
    for n, p in named:
        if n in masters:
            masters[n].grad = None if p.grad is None else p.grad.float()
            p.grad = None


@torch.no_grad()
def _sync_from_masters(named, masters: dict[str, torch.Tensor]) -> None:
    for n, p in named:
        if n in masters:
            p.copy_(masters[n])  # rounds to the compute dtype; the master keeps the fp32 value


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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of every RNG the loop draws from: the torch CPU/CUDA byte states, and
    Python's Mersenne twister state (ints, JSON as they are)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _save_checkpoint(ckpt_dir: Path, named, opt, step: int, history, fingerprint: str) -> None:
    """Checkpoint as safetensors + JSON only (no pickle: a checkpoint dir is a place anyone with
    write access could plant a file that `--resume` would unpickle). Written atomically: a crash
    while checkpointing leaves the previous checkpoint intact."""
    opt_sd = opt.state_dict()
    opt_tensors, opt_values = {}, {}
    for idx, st in opt_sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                opt_values[f"{idx}.{key}"] = value
    rng_tensors, rng_json = _rng_state()
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        save_file({n: p.detach().to("cpu").contiguous() for n, p in named}, tmp / TRAINABLE)
        save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER)
        state = {"format": "unpatch-checkpoint", "version": 2, "step": step, "history": history, "fingerprint": fingerprint,
                 "rng": rng_json, "param_groups": opt_sd["param_groups"], "optimizer_values": opt_values}
        (tmp / STATE).write_text(json.dumps(state))


def _load_checkpoint(ckpt_dir: Path, named, opt, fingerprint: str) -> tuple[int, list[dict[str, float]]]:
    try:
        state = json.loads((ckpt_dir / STATE).read_text(encoding="utf-8"))
        saved = load_file(ckpt_dir / TRAINABLE)
        blobs = load_file(ckpt_dir / OPTIMIZER)
        step, history, groups = int(state["step"]), list(state["history"]), state["param_groups"]
    except Exception as e:  # torn, truncated or edited files: one line, never a traceback
        raise UnpatchError(f"{ckpt_dir}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "delete it and build without --resume") from e
    if state.get("fingerprint") != fingerprint:
        raise UnpatchError(f"{ckpt_dir}: checkpoint was made by a different recipe or settings; delete it or build without --resume")
    if set(saved) != {n for n, _ in named}:
        raise UnpatchError(f"{ckpt_dir}: checkpoint holds other tensors than this build trains; delete it and build without --resume")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, t in blobs.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = t
    for key, value in state.get("optimizer_values", {}).items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])
    try:
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise UnpatchError(f"{ckpt_dir}: the optimizer state does not fit this build ({e}); delete it and build without --resume") from e
    torch.set_rng_state(blobs["rng.torch"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [blobs[k] for k in sorted((k for k in blobs if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return step, history
