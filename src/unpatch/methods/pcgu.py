"""`pcgu`: partitioned contrastive gradient unlearning (Yu et al., Findings of ACL 2023; on
decoder LMs and against task vectors in 2406.13551).

For a contrastive pair (more stereotypical sentence, less stereotypical sentence) the gradients
of the two sentences' log-likelihoods point the same way in rows that just model language, and
apart in rows that tell the two groups apart. So:
  1. partition every target weight matrix into its output rows (Linear weight [out, in]: row i
     is W[i, :]; GPT-2's Conv1D stores the transpose, [in, out]: row i is W[:, i]);
  2. accumulate g_more = d sum log p(more) / dW and g_less = d sum log p(less) / dW over the
     pairs, and rank all rows of all matrices together by cos(g_more[row], g_less[row]);
  3. train ONLY the k % least similar rows, descending on the likelihood gap
     log p(more) - log p(less) (full-sentence log-likelihood as CrowS-Pairs scores it), with the
     shared loop (AdamW, lr etc. from `train`, checkpoints) and a gradient hook that zeroes the
     other rows. (The original code descends on log p(more) alone; descending on the gap also
     lifts log p(less), which matches how CrowS-Pairs scores a pair.)
The ranking is computed ONCE, from the base weights, before training (the original recomputes
it per batch). Why: the patch then changes exactly the chosen k % of rows, so it stays
row-sparse (builder.sparsify stores only those rows) and `k_percent` means what it says; and a
resumed build recomputes the very same ranking from the base, so resume needs no extra state.
The gap is unbounded below: stop with `train.early_stop: {metric: gap, below: 0}`.

The original's choices are options (methods/pcgu_paper.py; recipes/paper/pcgu-2406.13551.yaml):
`rerank_every: N` re-ranks every N steps on the step's pairs, `score: first_diff` uses the
log-probability of the first differing token given the shared prefix instead of the sentence, and
`update: advantaged` lowers only the side the model currently prefers. Defaults keep the above.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..batches import Batches, collate, pad_id
from . import Context, MethodResult, register
from .pcgu_paper import DiffPairs, check_dynamic, diff_pairs, dynamic_loss, make_loss, pair_scores
from .pcgu_rows import row_cosines, row_partitions, select_rows, sentence_logprobs


class PCGUConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    k_percent: float = Field(10.0, gt=0, le=100)  # share of all target rows that may change
    rank_pairs: int | None = Field(None, gt=0)  # pairs whose summed gradients rank the rows (None: all)
    rerank_every: int = Field(0, ge=0)  # 0: rank once, from the base; N: re-rank every N steps (PCGU: 1)
    score: Literal["sentence", "first_diff"] = "sentence"  # first_diff: log p(first differing token | shared prefix)
    update: Literal["gap", "advantaged"] = "gap"  # advantaged: lower only the side the model prefers (PCGU)


# ------------------------------------------------------------------------------ pairs


class PairBatches:
    """Batch i = (more sentences, less sentences) of the same pairs, as ONE padded batch of 2B
    rows (more first), so a training step needs one forward pass. The order is that of
    data.Batches (a pure function of seed and i), so resumed runs see the same data."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, max_length: int, batch_size: int, seed: int):
        from ..evals.scoring import encode_for_scoring, prefix_token_id

        prefix = prefix_token_id(tokenizer)  # score sentences as lm-eval does: [BOS/EOS] + text
        more = encode_for_scoring(tokenizer, [m for m, _ in pairs], prefix)
        less = encode_for_scoring(tokenizer, [s for _, s in pairs], prefix)
        self.more = [s[:max_length] for s in more]
        self.less = [s[:max_length] for s in less]
        pad = pad_id(tokenizer, prefix)
        self.order = Batches(self.more, batch_size, seed, pad)  # used for its seeded order only
        self.pad = pad

    def __len__(self) -> int:
        return len(self.more)

    def take(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.more[j] for j in idx] + [self.less[j] for j in idx], self.pad)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.take(self.order.indices(i))


def gap_loss(model, batch):
    """Mean over the pairs of log p(more) - log p(less); descending on it narrows the gap."""
    lp = sentence_logprobs(model, batch)
    half = lp.shape[0] // 2
    gap = (lp[:half] - lp[half:]).mean()
    return gap, {"gap": gap.item()}


def rank_rows(model, pairs: PairBatches, parts, n_pairs: int, batch_size: int, score: str = "sentence") -> dict[str, torch.Tensor]:
    """Cosine per row of the gradients summed over the first n_pairs pairs (in data order);
    `score` as pcgu_paper.pair_scores (sentence log-likelihood, or the first differing token's)."""
    g = {side: {n: torch.zeros_like(w) for n, (w, _) in parts.items()} for side in ("more", "less")}
    model.eval()  # no dropout in the ranking: it must be reproducible on resume
    for start in range(0, n_pairs, batch_size):
        idx = list(range(start, min(start + batch_size, n_pairs)))
        lp = pair_scores(model, pairs.take(idx), score)
        for side, part in (("more", lp[: len(idx)]), ("less", lp[len(idx):])):
            model.zero_grad(set_to_none=True)
            part.sum().backward(retain_graph=side == "more")
            for n, (w, _) in parts.items():
                if w.grad is not None:  # a weight the sentences never reach keeps a zero gradient
                    g[side][n] += w.grad
    model.zero_grad(set_to_none=True)
    return {n: row_cosines(g["more"][n], g["less"][n], axis) for n, (_, axis) in parts.items()}


# ------------------------------------------------------------------------------ objective


@torch.no_grad()
def mean_gap(model, tokenizer, data, recipe) -> float:
    """Mean over data.pairs of log p(more) - log p(less) (lm-eval full-sentence scoring)."""
    from ..evals.scoring import sentence_logprobs as score

    more = score(model, tokenizer, [m for m, _ in data.pairs], progress=False)
    less = score(model, tokenizer, [s for _, s in data.pairs], progress=False)
    return sum(a - b for a, b in zip(more, less, strict=True)) / len(more)


@register("pcgu", config=PCGUConfig, display="Partitioned contrastive gradient unlearning",
          paper="https://aclanthology.org/2023.findings-acl.375", needs=("pairs",), kinds=("delta",),
          objective=mean_gap, direction="down", example={"k_percent": 50},
          passes=lambda params, kind: (2, 0))  # more and less sentences: two rows per pair
def pcgu(ctx: Context) -> MethodResult:
    cfg: PCGUConfig = ctx.config
    t = ctx.recipe.train
    where = str(ctx.recipe.path)

    def make(items):
        return PairBatches(items, ctx.tokenizer, t.max_length, t.batch_size, t.seed + 2 * 7919)

    pairs, dropped = diff_pairs(ctx, make, where) if cfg.score == "first_diff" else (make(ctx.data.pairs), 0)
    parts = row_partitions(ctx.model)
    n_rank = min(cfg.rank_pairs or len(pairs), len(pairs))
    reranks, ranking = [0], [False]  # re-rank count; True while the loss takes its ranking gradients
    if cfg.rerank_every:  # PCGU's own loop: the masks are rewritten by the loss every N steps
        from ..distributed import engine

        check_dynamic(cfg, t, engine().world, where)
        pairs = pairs if isinstance(pairs, DiffPairs) else DiffPairs(pairs, [0] * len(pairs))
        masks = {n: torch.zeros(w.shape[axis], dtype=torch.bool) for n, (w, axis) in parts.items()}  # every row ever chosen
        scale = {n: torch.zeros((w.shape[0], 1) if axis == 0 else (1, w.shape[1]), dtype=w.dtype, device=w.device)
                 for n, (w, axis) in parts.items()}
        loss_fn = dynamic_loss(cfg, pairs, parts, scale, masks, t.grad_accum, reranks, ranking)
    else:
        masks = select_rows(rank_rows(ctx.model, pairs, parts, n_rank, t.batch_size, cfg.score), cfg.k_percent)
        scale = {n: (masks[n][:, None] if axis == 0 else masks[n][None, :]).to(w.device, w.dtype) for n, (w, axis) in parts.items()}
        loss_fn = gap_loss if (cfg.score, cfg.update) == ("sentence", "gap") else make_loss(cfg)
    # AdamW weight decay would shrink every row; keep the base values of the rows not chosen
    keep = {n: w.detach().clone() for n, (w, _) in parts.items()} if t.weight_decay else {}
    hooks = []
    for n, (w, _) in parts.items():
        # the other rows get exactly 0 (not while the ranking reads the full gradients: autograd.grad runs hooks too)
        hooks.append(w.register_hook(lambda grad, m=scale[n]: grad if ranking[0] else grad * m))
    try:
        res = ctx.train(loss_fn, pairs, "pcgu")
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for n, base in keep.items():
            w, axis = parts[n]
            frozen = ~masks[n].to(w.device)
            if axis == 0:
                w[frozen] = base[frozen]
            else:
                w[:, frozen] = base[:, frozen]
    chosen = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    touched = sum(1 for m in masks.values() if m.any())
    if cfg.rerank_every:
        notes = [f"re-ranked {total} rows of {len(masks)} matrices {reranks[0]} times (every {cfg.rerank_every} steps, "
                 f"top {cfg.k_percent:g} %, score {cfg.score}, update {cfg.update}); {chosen} rows "
                 f"({100 * chosen / total:.3g} %) were chosen at least once, in {touched} matrices"]
    else:
        notes = [f"ranked {total} rows of {len(masks)} matrices on {n_rank} pairs (score {cfg.score}); trained the {chosen} "
                 f"({100 * chosen / total:.3g} %) least similar, in {touched} matrices (update {cfg.update})"]
    if dropped:
        notes.append(f"score first_diff: {dropped} pairs without a differing token after a shared prefix were dropped")
    return MethodResult.of(res, notes)
