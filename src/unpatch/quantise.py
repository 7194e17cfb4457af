"""Weight quantisation for the robustness audit: round-to-nearest at N bits per output row, and
real GGUF Q8_0 / Q4_0 round trips (the `gguf` package's llama.cpp arithmetic) where a tensor allows,
applied in place to every Linear / Conv1D weight of a model."""

from __future__ import annotations

import torch

from .errors import UnpatchError


def rtn(weight: torch.Tensor, bits: int, in_dim: int = 1) -> torch.Tensor:
    """Symmetric round-to-nearest with one absmax scale per output channel, dequantised again.

    s = absmax / qmax over the input dimension `in_dim`, qmax = 2**(bits-1) - 1 (127 at 8 bits,
    7 at 4: the symmetric grid, as in LLM.int8's absmax and GPTQ's RTN baseline);
    returns clamp(round(w / s), -qmax, qmax) * s, so |w - rtn(w)| <= s / 2 element-wise.
    An all-zero channel keeps s = 1 (it quantises to zeros either way).
    `in_dim` is 1 for nn.Linear (out, in) and 0 for GPT-2's Conv1D (in, out).
    """
    if bits < 2:
        raise UnpatchError(f"--bits {bits}: use 2 or more (symmetric RTN needs a sign and a magnitude)")
    w = weight.float()
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=in_dim, keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return (torch.clamp(torch.round(w / scale), -qmax, qmax) * scale).to(weight.dtype)


def linear_weights(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """name -> (weight, input dim) of every 2-D linear layer except the output head: weight-only
    quantisers (bitsandbytes, GPTQ, AWQ) keep lm_head in full precision, and on tied models it is
    also the embedding."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):
            out[f"{name}.weight"] = (mod.weight, 1)
        elif isinstance(mod, Conv1D):
            out[f"{name}.weight"] = (mod.weight, 0)
    return out


@torch.no_grad()
def quantise_(model: torch.nn.Module, bits: int) -> float:
    """Replace every linear weight by its RTN round trip, in place; returns the largest change."""
    worst = 0.0
    for w, in_dim in linear_weights(model).values():
        q = rtn(w.data, bits, in_dim)
        worst = max(worst, (q.float() - w.data.float()).abs().max().item())
        w.data.copy_(q)
    return worst


# GGUF block formats whose round trip the `gguf` package implements: the real llama.cpp arithmetic
GGUF_QUANTS = {8: "Q8_0", 4: "Q4_0"}


_GGUF_BLOCK = 32  # Q8_0 / Q4_0 quantise blocks of 32 along a row


def gguf_roundtrip(weight: torch.Tensor, bits: int, in_dim: int = 1) -> torch.Tensor | None:
    """`weight` quantised to GGUF Q8_0 / Q4_0 and back (gguf.quants, as llama.cpp stores it: blocks
    of 32 along the input dimension, one fp16 scale each), or None where that is not possible
    (another bit width, a row length not a multiple of 32, or no `gguf` package)."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize
    except ImportError:
        return None
    name = GGUF_QUANTS.get(bits)
    w = weight.detach().to("cpu", torch.float32)
    w = w.T if in_dim == 0 else w  # GPT-2's Conv1D stores (in, out): rows must run along the input
    if name is None or w.dim() != 2 or w.shape[-1] % _GGUF_BLOCK:
        return None
    qtype = getattr(GGMLQuantizationType, name)
    back = torch.from_numpy(dequantize(quantize(w.contiguous().numpy(), qtype), qtype).reshape(w.shape))
    back = back.T if in_dim == 0 else back
    return back.to(weight.device, weight.dtype)


def quantise_auto_(model: torch.nn.Module, bits: int) -> tuple[float, str]:
    """Real GGUF round trips (Q8_0 at 8 bits, Q4_0 at 4) where gguf supports the tensor, simulated
    per-channel RTN (`rtn`) for the rest, in place; returns (largest change, what was done)."""
    worst, real, sim = 0.0, 0, 0
    for w, in_dim in linear_weights(model).values():
        q = gguf_roundtrip(w.data, bits, in_dim)
        if q is None:
            q, sim = rtn(w.data, bits, in_dim), sim + 1
        else:
            real += 1
        worst = max(worst, (q.float() - w.data.float()).abs().max().item())
        w.data.copy_(q)
    parts = ([f"GGUF {GGUF_QUANTS[bits]} round trip (gguf.quants) of {real} tensors"] if real else []) \
        + ([f"simulated per-channel RTN of {sim} tensors"] if sim else [])
    return worst, "; ".join(parts) or "no linear weights"
