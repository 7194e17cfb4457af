"""`task_vector`: negation via task vector (Ilharco et al. 2023, applied to bias in 2406.13551).

Fine-tune the model on the biased / harmful texts by plain gradient DESCENT on their NLL (the
same loss `ga` ascends), which learns the bias direction tau = theta_ft - theta_base. The patch
stores tau as trained (the LoRA factors, or the dense / row-sparse delta) and records the
built-in coefficient -lam, so applying it at `--scale s` adds -s * lam * tau: the bias is
subtracted, and `--scale` tunes lambda after the build without retraining.

Why descent + negation rather than ascent (`ga`): descent is bounded (the NLL cannot go below
0), so the fine-tune stays a well-behaved language-modelling update and tau is a smooth,
mostly-linear "more of this text" direction; the paper finds its negation degrades perplexity
much less than gradient-based unlearning at the same bias reduction.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from . import Context, MethodResult, register
from .ga import forget_nll, nll


class TaskVectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # lambda of theta_base - lambda * tau; the patch's coefficient is -lam (so `--scale s` = s * lambda)
    lam: float = Field(1.0, gt=0)


def finetune_loss(model, batch):
    """Plain causal-LM fine-tuning on the biased texts: minimise their NLL."""
    loss = nll(model, batch)
    return loss, {"forget_loss": loss.item()}


# The tiny registry test fine-tunes a random 32-wide model hard (AdamW, lr 0.02): tau overshoots
# and the NLL is far from linear along it, so there a small lambda (0.25) keeps -lam*tau in the
# range where negation raises the forget NLL; real models use lam ~ 1 and tune it with --scale.
@register("task_vector", config=TaskVectorConfig, display="Task-vector negation", paper="https://arxiv.org/abs/2406.13551",
          needs=("forget",), objective=forget_nll, direction="up", example={"lam": 0.25})
def task_vector(ctx: Context) -> MethodResult:
    cfg: TaskVectorConfig = ctx.config
    res = ctx.train(finetune_loss, ctx.batches("forget"), "task_vector fine-tune")
    notes = [f"stored tau = theta_ft - theta_base of a {res.steps}-step fine-tune on data.forget; "
             f"coefficient -{cfg.lam:g} negates it (--scale s applies -s*{cfg.lam:g}*tau)"]
    return MethodResult.of(res, notes, coefficient=-cfg.lam)
