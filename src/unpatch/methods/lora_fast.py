"""A fused forward/backward for plain LoRA layers while a patch trains.

peft's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(x)) * scaling` as five autograd
nodes: the rank-r product, its scaling and the sum each make a fresh [tokens, out] tensor, and
the backward makes as many again. At training batch sizes (~100 tokens) those memory passes
cost about as much as the rank-r matrix products themselves. `FusedLoRA` computes the same
y = x W^T + b + s (x A^T) B^T with one output tensor (the rank-r product is added in place with
`addmm_`), and its backward writes the input gradient once (gy W, plus s gy B A added in place).
The values agree with peft's to float rounding (other summation order); tests/methods/
test_lora_fast.py checks outputs and gradients against peft's forward.

Only the vanilla case is fused: one active adapter, no dropout, not merged, a plain nn.Linear
base with frozen weight and bias, no DoRA or other variant, same dtype throughout, no autocast. Anything else keeps peft's
forward.
"""

from __future__ import annotations

import contextlib
import types

import torch


class FusedLoRA(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T; gradients for x, A and B (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ lora_a.t()  # [tokens, r]
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        y.addmm_(low, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, low)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        flat, weight, lora_a, lora_b, low = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        g_low = (gy @ lora_b).mul_(ctx.scaling)  # d loss / d (x A^T), [tokens, r]
        grad_b = (gy.t() @ low).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_a = g_low.t() @ flat if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gy @ weight).addmm_(g_low, lora_a).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None


def _fusable(layer) -> bool:
    base = getattr(layer, "base_layer", None)
    names = list(getattr(layer, "active_adapters", []))
    if type(base) is not torch.nn.Linear or len(names) != 1 or getattr(layer, "merged", True):
        return False
    name = names[0]
    if getattr(layer, "disable_adapters", True) or name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    if getattr(layer, "fan_in_fan_out", False) or getattr(layer, "use_dora", {}).get(name, False):
        return False
    drop = layer.lora_dropout[name]
    if not (isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and drop.p == 0)):
        return False
    a, b = layer.lora_A[name], layer.lora_B[name]
    if a.bias is not None or b.bias is not None:
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False  # FusedLoRA gives W and b no gradient (peft's bias="all" trains b)
    return len({base.weight.dtype, a.weight.dtype, b.weight.dtype}) == 1


def _fused_forward(self, x, *args, **kwargs):
    if args or kwargs or x.dtype != self.base_layer.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    return FusedLoRA.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           float(self.scaling[name]))


@contextlib.contextmanager
def fused_lora(model):
    """While inside, every vanilla peft LoRA Linear of `model` runs FusedLoRA; restored on exit."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # no peft: no LoRA layers to fuse
        yield
        return
    patched = [m for m in model.modules() if isinstance(m, Linear) and "forward" not in vars(m) and _fusable(m)]
    for m in patched:
        m._peft_forward = m.forward
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward, m._peft_forward
