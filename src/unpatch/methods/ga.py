"""`ga`: plain gradient ascent on the forget texts (the GA term of Yao et al., 2405.15152).

loss = -NLL(forget), NLL being the mean causal-LM cross-entropy over the non-padding tokens of a
batch; minimising it pushes the forget texts' likelihood down. Unbounded below, so keep the step
count small or use `train.early_stop: {metric: forget_loss, above: ...}`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from . import Context, MethodResult, register


class GAConfig(BaseModel):
    """Plain gradient ascent has no parameters of its own (steps, lr etc. live in `train`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def nll(model, batch) -> torch.Tensor:
    """Mean next-token NLL over the real tokens: labels are -100 on padding (data.collate).
    Computed padding-free where the model allows it (methods/packed.py: same value up to rounding)."""
    from .packed import token_nll

    return token_nll(model, batch)


def ga_loss(model, batch):
    loss = nll(model, batch)
    return -loss, {"forget_loss": loss.item()}


@torch.no_grad()
def forget_nll(model, tokenizer, data, recipe) -> float:
    """Mean NLL of the forget texts (the objective ga pushes up)."""
    from ..batches import Batches

    t = recipe.train
    batches = Batches.from_texts(data.forget, tokenizer, t.max_length, t.batch_size, t.seed, where="data.forget")
    model.eval()
    losses = [nll(model, batches[i]).item() for i in range(max(1, len(data.forget) // t.batch_size))]
    return sum(losses) / len(losses)


@register("ga", config=GAConfig, display="Gradient ascent", paper="https://arxiv.org/abs/2405.15152", needs=("forget",),
          objective=forget_nll, direction="up")
def ga(ctx: Context) -> MethodResult:
    return MethodResult.of(ctx.train(ga_loss, ctx.batches("forget"), "ga"))
