"""PCGU's rows: a sentence's log-likelihood, every Linear / Conv1D weight as output rows, the
cosine of the two sides' gradients per row, and the k % least similar rows. Shared by the default
ranking (pcgu.py) and the original's per-step re-ranking (pcgu_paper.py), below both."""

from __future__ import annotations

import math

import torch

from ..errors import UnpatchError
from ..targets import is_conv1d


def sentence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows] sum over each sentence of log p(token | previous), the first (prefix) token given."""
    dev = model.device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = ids[:, 1:]
    lp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (lp * mask[:, 1:]).sum(dim=1)


def row_partitions(model) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """{parameter name: (weight, row axis)} for every trainable Linear / Conv1D weight.
    Row axis 0 for Linear ([out, in]), 1 for Conv1D ([in, out]): an output unit either way."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.requires_grad and w.dim() == 2:
            if isinstance(mod, torch.nn.Linear):
                found[names[id(w)]] = (w, 0)
            elif is_conv1d(mod):
                found[names[id(w)]] = (w, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not found or set(found) != trainable:
        other = ", ".join(sorted(trainable - set(found))) or "none"
        raise UnpatchError(f"pcgu partitions Linear/Conv1D weights only; patch.target_modules selects other tensors ({other})")
    return dict(sorted(found.items()))


def row_cosines(g_more: torch.Tensor, g_less: torch.Tensor, axis: int) -> torch.Tensor:
    """cos(g_more[row], g_less[row]) per output row; rows without gradient get 2 (ranked last:
    with no signal there is nothing to tell the two sentences apart)."""
    dim = 1 - axis  # reduce over the input dimension
    dot = (g_more * g_less).sum(dim=dim)
    norms = g_more.norm(dim=dim) * g_less.norm(dim=dim)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.full_like(dot, 2.0))


def select_rows(cosines: dict[str, torch.Tensor], k_percent: float) -> dict[str, torch.Tensor]:
    """Boolean row masks: the ceil(k % of all rows) least similar rows, ranked across all matrices
    together (ties go to the earlier row, in sorted-name order: deterministic)."""
    names = sorted(cosines)
    flat = torch.cat([cosines[n].flatten().float() for n in names])
    n_keep = min(flat.numel(), max(1, math.ceil(flat.numel() * k_percent / 100 - 1e-9)))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, stable=True).indices[:n_keep]] = True
    masks, at = {}, 0
    for n in names:
        masks[n] = chosen[at: at + cosines[n].numel()].clone()
        at += cosines[n].numel()
    return masks
