"""`unpatch build --dry-run`: what a build will touch, how big its patch will be and what it will
cost, BEFORE anything runs. Only the model's config is read (for a .gguf, its metadata); the
model is built on the meta device (accelerate.init_empty_weights), so parameters are counted
without allocating them: a 70B model plans in seconds on a laptop.

Exact: the touched tensors and the patch payload (LoRA: A [r, in] + B [out, r] per target module,
fp32, as peft stores them; delta: one fp32 tensor per touched weight, dense — row-sparse storage
can only make it smaller). Estimates (labelled so): memory and time, from the sizes and the
formulas below, with texts assumed `max_length` tokens long (an upper bound).

The activation estimate is distributed.py's (`activation_bytes_per_token`), where the trainer's
micro-batch choice (`choose_chunks`, used by methods/loop.py) lives beside the sharding code.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .distributed import activation_bytes_per_token, choose_chunks
from .errors import UnpatchError
from .registry import METHODS
from .targets import choose_targets, is_conv1d, target_weights


def lora_shape(module, weight: torch.Tensor) -> tuple[int, int]:
    """(out, in) of a target: Linear stores [out, in], GPT-2's Conv1D the transpose [in, out]."""
    return (weight.shape[1], weight.shape[0]) if is_conv1d(module) else (weight.shape[0], weight.shape[1])


@dataclass
class Plan:
    recipe: str
    model: str
    device: str
    dtype: str
    world: int
    total_params: int  # of the model, tied weights once
    touched: dict[str, tuple[int, int]]  # weight name -> (out, in)
    kind: str
    rank: int
    trainable: int  # parameters the optimizer updates
    patch_bytes: int  # tensor payload of the patch (delta: dense bound)
    memory: dict[str, int] = field(default_factory=dict)  # per process, bytes, estimated
    flops_per_step: float = 0.0
    flops_per_second: float | None = None  # measured on the device, None when not measured
    steps: int = 0
    data: dict[str, int] = field(default_factory=dict)
    fit: str | None = None  # on CUDA: how a micro-batch will be cut to fit the free memory
    targets: list[str] = field(default_factory=list)  # target_modules as chosen (recipe or family default)
    targets_why: str = ""  # why those: the recipe, peft's mapping, or the fallback rule

    @property
    def seconds(self) -> float | None:
        return None if not self.flops_per_second else self.steps * self.flops_per_step / self.world / self.flops_per_second


def load_config(model_id: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config only: config.json of a folder / the Hub, or a .gguf's metadata."""
    from transformers import AutoConfig

    from .model import resolve_model

    ref = resolve_model(model_id, revision)
    try:
        if ref.kind in ("alias", "gguf"):
            return AutoConfig.from_pretrained(ref.path.parent, gguf_file=ref.path.name)
        return AutoConfig.from_pretrained(ref.path or ref.id, revision=ref.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnpatchError(f"model {model_id!r}: cannot read its config ({str(e).splitlines()[0]})") from e


def make_plan(recipe_path: str | Path, overrides=(), measure: bool = True) -> Plan:
    """Plan a build without running it (see the module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .model import resolve_device, resolve_dtype
    from .recipe import load_recipe
    from .sources import load_data

    r = load_recipe(recipe_path, overrides)
    data = load_data(r)  # bad data fails here, as it would in the build
    m, t, p = r.model, r.train, r.patch
    cfg = load_config(m.id, m.revision, m.trust_remote_code)
    with init_empty_weights():  # parameters on the meta device: shapes, no memory
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=m.trust_remote_code)
    model.tie_weights()  # init_empty_weights leaves tied embeddings untied: they would count twice
    total = sum(x.numel() for x in model.parameters())
    chosen = choose_targets(model, p.target_modules, str(r.path))
    weights = target_weights(model, chosen.names, str(r.path))
    owner = {id(mod.weight): mod for _, mod in model.named_modules() if isinstance(getattr(mod, "weight", None), torch.Tensor)}
    touched = {n: lora_shape(owner[id(w)], w) for n, w in weights.items()}
    if p.kind == "lora":
        trainable = sum(p.rank * (o + i) for o, i in touched.values())
        patch_bytes = 4 * trainable  # peft keeps adapters in fp32 (autocast_adapter_dtype)
    else:
        trainable = sum(o * i for o, i in touched.values())
        patch_bytes = 4 * trainable  # build stores fp32 differences
    try:
        dev = resolve_device(m.device)
    except UnpatchError:
        if not m.device.startswith("cuda"):
            raise
        dev = None  # planning a GPU build from a machine without one: all but the time still holds
    dt = resolve_dtype(m.dtype)
    e = torch.empty((), dtype=dt).element_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train_passes, ref_passes = METHODS.get(r.method.name).passes(dict(r.method.params), p.kind)  # as the method declares
    rows = math.ceil(t.batch_size / world) * (2 if r.method.name == "pcgu" else 1)
    mem = {"weights": total * e}
    if p.kind == "lora":
        mem |= {"adapters": 4 * trainable, "gradients": 4 * trainable}
    else:
        mem |= {"gradients": e * trainable} | ({"fp32 masters + grads": 8 * trainable} if e < 4 else {})
    mem["AdamW state"] = 8 * trainable
    if METHODS.get(r.method.name).frozen_reference(dict(r.method.params), p.kind):
        mem["frozen reference"] = total * e
    mem["activations"] = rows * t.max_length * activation_bytes_per_token(cfg, e)
    # per token: forward 2N, backward to the inputs 2N (through frozen weights too), weight grads 2n
    per_token = train_passes * (4 * total + 2 * trainable) + ref_passes * 2 * total
    flops_step = float(per_token * t.batch_size * t.grad_accum * t.max_length * (2 if r.method.name == "pcgu" else 1))
    sizes = {k: len(v) for k, v in vars(data).items() if v}
    fit = None
    if dev is not None and dev.type == "cuda":  # the loop's micro-batch decision, made now (weights not yet resident)
        free = torch.cuda.mem_get_info(dev)[0]
        reserved = sum(v for k, v in mem.items() if k != "activations")
        try:
            n = choose_chunks(rows, free, reserved, t.max_length * activation_bytes_per_token(cfg, e))
            fit = f"{rows} rows per process in {n} slice(s) ({_size(free)} free on {dev})"
        except UnpatchError as err:
            fit = f"does not fit: {err}"
    where = str(dev) if dev is not None else f"{m.device} (not on this machine: time not measured)"
    return Plan(str(r.path), m.id, where, str(dt).removeprefix("torch."), world, total, touched, p.kind, p.rank,
                trainable, patch_bytes, mem, flops_step, measure_flops(dev, dt) if measure and dev is not None else None, t.steps, sizes, fit,
                chosen.names, chosen.why)


def measure_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Matmul throughput of this device at this dtype (FLOP/s), measured for ~`seconds`: a ceiling
    a training step reaches a fraction of, so the time it implies is a lower bound."""
    n = 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * done / (time.perf_counter() - t0)


def _size(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{int(b)} B"


def render(plan: Plan) -> list[str]:
    """The dry run as printed by `unpatch build --dry-run`."""
    # by leaf name AND shape: GPT-2's c_proj is [768x768] in attention but [768x3072] in the MLP
    leaves = Counter((n.rsplit(".", 2)[-2], s) for n, s in plan.touched.items())
    what = ", ".join(f"{k} x{c} [{o}x{i}]" for (k, (o, i)), c in leaves.items())
    kind = f"lora rank {plan.rank}" if plan.kind == "lora" else "delta (fp32; row-sparse storage may make it smaller)"
    per_rank = 4 * sum(o + i for o, i in plan.touched.values())  # fp32 bytes of A and B per unit of rank
    dense = 4 * sum(o * i for o, i in plan.touched.values())
    other = f"; at lora rank 8 {_size(8 * per_rank)}, rank 16 {_size(16 * per_rank)}" + (
        f"; as a dense delta {_size(dense)}" if plan.kind == "lora" else "")
    mem = " + ".join(f"{k} {_size(v)}" for k, v in plan.memory.items())
    lines = [f"dry run of {plan.recipe}: nothing loaded or trained",
             f"model    {plan.model}: {plan.total_params:,} parameters, {plan.dtype} on {plan.device}"
             + (f", {plan.world} processes" if plan.world > 1 else ""),
             "data     " + ", ".join(f"{k} {v}" for k, v in plan.data.items()),
             f"targets  {', '.join(plan.targets)}: {plan.targets_why}",
             f"touches  {len(plan.touched)} tensors: {what}",
             f"patch    {kind}: {plan.trainable:,} parameters, {plan.patch_bytes:,} bytes ({_size(plan.patch_bytes)}) of tensors{other}",
             f"memory   ~{_size(sum(plan.memory.values()))} per process (estimate: {mem})"]
    if plan.fit:
        lines.append(f"fits     {plan.fit}")
    if plan.seconds is not None:
        lines.append(f"time     ~{plan.seconds:.3g} s for {plan.steps} steps (estimate: {plan.flops_per_step / 1e9:.3g} GFLOP per step, "
                     f"texts taken as max_length long, at the {plan.flops_per_second / 1e9:.3g} GFLOP/s matmul rate measured now)")
    return lines
