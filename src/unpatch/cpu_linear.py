"""float32 linear layers on the CPU through oneDNN instead of MKL, for evaluation passes.

Eager `nn.Linear` on the CPU calls MKL's sgemm, and MKL chooses its kernels by CPU vendor: on an
AMD EPYC (Zen 5, full-width AVX-512, 2 cores) it reached 166-182 GFLOP/s on SmolLM2-135M's
shapes (1,000 positions x 576 -> 192...2,048), where oneDNN's `mkldnn::_linear_pointwise` (the op
torch.compile's CPU backend emits for a float32 linear in dynamic-shape mode) reached 366-422: it
JIT-compiles for the instruction set it finds. Both compute in float32 throughout; they differ in
summation order only (max |diff| 1.3e-4 on sums of 576 N(0,1) products; against float64, MKL's
error was 4.9e-5 and oneDNN's 1.2e-4), so metrics move by float rounding, never by precision.

`fast_linears(model)` routes the model's float32 CPU `nn.Linear` layers (not its output head:
`evals.head` checks that head and runs it itself, through `linear` below) to oneDNN for a block;
`linear()` is the same choice for one call. oneDNN is used only where it is safe to: the op
exists, a probe matches F.linear, no gradient is wanted (the op has no backward) and oneDNN's
float32 precision is strict (`torch.backends.mkldnn.matmul.fp32_precision` left at "none" or
"ieee"; "bf16"/"tf32" would let it round inputs down). `UNPATCH_ONEDNN=0` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

STRICT_PRECISIONS = ("none", "ieee")


@functools.cache
def _probe() -> bool:
    """True if oneDNN's linear exists here and agrees with F.linear on a small float32 case."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 5, 64), (48, 64), (48,)))
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except Exception:  # noqa: BLE001 - a build whose op is missing or broken keeps MKL
        return False


def onednn_enabled() -> bool:
    """Whether float32 CPU linears may go to oneDNN now (see the module docstring)."""
    if os.environ.get("UNPATCH_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return precision in STRICT_PRECISIONS and _probe()


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, onednn: bool | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where eligible; `onednn=None` asks onednn_enabled()."""
    if (onednn if onednn is not None else onednn_enabled()) and _eligible(x, weight) and (bias is None or bias.dtype == torch.float32):
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


def _patchable(module: torch.nn.Module) -> bool:
    """A plain float32 CPU nn.Linear whose forward nobody has re-wired (accelerate hooks it on the
    instance, and a forward already set is ours from an enclosing block)."""
    return (type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
            and "forward" not in vars(module) and not hasattr(module, "_hf_hook"))


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias, onednn=True)


@contextlib.contextmanager
def fast_linears(model):
    """Within the block, the model's float32 CPU nn.Linear layers but its output head run through
    oneDNN (when onednn_enabled()); every forward is given back afterwards, also after an error."""
    patched = []
    if onednn_enabled() and isinstance(model, torch.nn.Module):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for module in model.modules():
            if module is not head and _patchable(module):
                module.forward = functools.partial(_forward, module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
