"""`npo`: Negative Preference Optimization (Zhang et al. 2024, https://arxiv.org/abs/2404.05868).

DPO with only a "losing" answer: the forget texts are pushed below the reference model's
likelihood, but with a bounded, self-damping loss instead of gradient ascent's unbounded one:

    L_NPO = -(2/beta) * mean_i log sigmoid(-beta * (log pi_theta(y_i) - log pi_ref(y_i)))
    loss  = L_NPO(forget) + alpha * NLL(retain)          (alpha = 0: plain NPO; > 0: NPO + RT)

log pi(y_i) is the SUM of the token log-probs of forget text i (real tokens only), as in
open-unlearning's `compute_dpo_loss` (win_inputs=None), which this matches term for term; NLL is
the mean token cross-entropy (as `ga`). At theta = ref the loss is (2/beta) log 2, and as
beta -> 0 its gradient tends to gradient ascent's.

The reference is the base model. `kind: lora`: the same model with the adapter switched off
(under no_grad), on the very same padded batch, so no second copy is held. `kind: delta`: the
trained weights are the base weights, so the reference log-probs of every forget text are
computed once before training (fixed batches, eval mode: deterministic) and looked up per batch.
Defaults beta=0.1, alpha=1 are open-unlearning's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..batches import Batches, collate
from ..errors import UnpatchError
from ..modes import evaluating
from . import Context, MethodResult, register
from .ga import forget_nll, nll


class NPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    beta: float = Field(0.1, gt=0)  # inverse temperature; small beta ~ gradient ascent
    alpha: float = Field(1.0, ge=0)  # weight of the retain NLL (needs data.retain when > 0)


def sequence_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token log-probs per sequence [batch], real tokens scored per sequence [batch])."""
    ids = batch["input_ids"].to(model.device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(model.device)).logits[:, :-1].float()
    labels = batch["labels"].to(model.device)[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [batch, length-1]
    return -ce.sum(-1), (labels != -100).sum(-1)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(-beta * (logp - ref_logp)); equals (2/beta) log 2 at logp == ref_logp."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


@torch.no_grad()
def reference_logprobs(model, forget: Batches) -> torch.Tensor:
    """log pi_ref of every forget sequence, in fixed batches of the stream's size (delta kind)."""
    out, n = [], forget.batch_size
    # MKL linears, as the training forwards use, so a cached reference equals one recomputed per step
    with evaluating(model, onednn=False):
        for k in range(0, len(forget.seqs), n):
            out.append(sequence_logprobs(model, collate(forget.seqs[k: k + n], forget.pad_id))[0].cpu())
    return torch.cat(out)


class Streams:
    """Micro-batch i = forget batch (+ the indices of its texts) and, with alpha > 0, a retain batch."""

    def __init__(self, ctx: Context, alpha: float):
        self.forget = ctx.batches("forget")
        self.retain = ctx.batches("retain") if alpha else None

    def __getitem__(self, i: int):
        return {"forget": self.forget[i], "idx": self.forget.indices(i),
                "retain": self.retain[i] if self.retain is not None else None}


def make_loss(cfg: NPOConfig, ref_table: torch.Tensor | None):
    def loss_fn(model, b):
        logp, count = sequence_logprobs(model, b["forget"])
        if ref_table is not None:
            ref = ref_table[b["idx"]].to(logp.device)
        else:  # LoRA: the base is the same model with the adapter off
            with torch.no_grad(), model.disable_adapter():
                ref = sequence_logprobs(model, b["forget"])[0]
        loss = npo_loss(logp, ref, cfg.beta)
        metrics = {"npo_loss": loss.item(), "forget_loss": float(-logp.detach().sum() / count.sum()),
                   "log_ratio": float((logp.detach() - ref).mean())}
        if b["retain"] is not None:
            r = nll(model, b["retain"])
            loss = loss + cfg.alpha * r
            metrics["retain_loss"] = r.item()
        return loss, metrics
    return loss_fn


@register("npo", config=NPOConfig, display="Negative preference optimization", paper="https://arxiv.org/abs/2404.05868",
          needs=("forget",), objective=forget_nll, direction="up", example={"beta": 0.1, "alpha": 1.0},
          passes=lambda params, kind: (1 + (params.get("alpha", 0) > 0), int(kind == "lora")))
def npo(ctx: Context) -> MethodResult:
    cfg: NPOConfig = ctx.config  # type: ignore[assignment]
    if cfg.alpha and ctx.data.retain is None:
        raise UnpatchError(f"{ctx.recipe.path}: data.retain: required by method 'npo' when method.alpha > 0; "
                           "add retain texts or set method.alpha: 0")
    streams = Streams(ctx, cfg.alpha)
    table = reference_logprobs(ctx.model, streams.forget) if ctx.recipe.patch.kind != "lora" else None
    return MethodResult.of(ctx.train(make_loss(cfg, table), streams, "npo"))
