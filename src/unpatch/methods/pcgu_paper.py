"""PCGU as Yu et al. (2023) run it: pcgu's `rerank_every`, `score: first_diff` and `update: advantaged`.

- score `first_diff`: a pair's two sentences share a prefix and differ from one token on (the
  pronoun or group word of builtin:pronoun_pairs). Each side is scored by log p(its token at the
  first differing position | the shared prefix): the decoder analogue of PCGU's masked-token logit.
  Pairs without a differing token inside the shorter sentence are dropped (noted on the card).
- update `advantaged`: per pair, the side the CURRENT model finds more likely is the advantaged one
  (PCGU decides this by the model, not by the data's order); the loss is the mean log p of the
  advantaged sides, so descending lowers them and leaves the disadvantaged term alone. Rows are
  then ranked by cos(g_advantaged, g_disadvantaged), oriented the same way.
- `rerank_every: N`: the ranking is recomputed every N steps from the step's own micro-batch (the
  first one of the step) and the current weights, and the top-k % least similar rows get that
  step's update (the other rows' gradients are zeroed). AdamW's moments still move a row a little
  after it leaves the top-k; the patch stores the union of the rows that changed.

Limits: one process (the ranking takes its own gradients with autograd.grad); weight decay must be
0 (AdamW's decay would move every row); `train.checkpoint_every` a multiple of N, so a resumed
build re-ranks on the same steps and stays bit-identical.
"""

from __future__ import annotations

import torch

from ..errors import UnpatchError
from .pcgu_rows import row_cosines, select_rows, sentence_logprobs


def first_diffs(more: list[list[int]], less: list[list[int]]) -> list[int | None]:
    """Index of the first token where each pair differs (after the shared prefix), or None."""
    out = []
    for a, b in zip(more, less, strict=True):
        d = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        out.append(d if d is not None and d > 0 else None)  # position 0 has no context to predict it from
    return out


class DiffPairs:
    """pcgu.PairBatches whose batches carry `diff` ([2B] first differing position per row) and
    which remembers the last micro-batch index asked for (the loss re-ranks by step)."""

    def __init__(self, pairs, diffs: list[int]):
        self.pairs, self.diffs, self.last_index = pairs, diffs, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def _with_diff(self, batch: dict, idx: list[int]) -> dict:
        d = torch.tensor([self.diffs[j] for j in idx], dtype=torch.long)
        return {**batch, "diff": torch.cat([d, d])}

    def take(self, idx: list[int]) -> dict:
        return self._with_diff(self.pairs.take(idx), idx)

    def __getitem__(self, i: int) -> dict:
        self.last_index = i
        return self.take(self.pairs.order.indices(i))


def diff_pairs(ctx, make_pairs, where: str) -> tuple[DiffPairs, int]:
    """PairBatches over the pairs that have a first differing token; (them, how many were dropped)."""
    pairs = make_pairs(ctx.data.pairs)
    diffs = first_diffs(pairs.more, pairs.less)
    keep = [i for i, d in enumerate(diffs) if d is not None]
    if not keep:
        raise UnpatchError(f"{where}: data.pairs: no pair has a differing token after a shared prefix; method.score: first_diff needs such pairs")
    if len(keep) < len(diffs):
        pairs = make_pairs([ctx.data.pairs[i] for i in keep])
    return DiffPairs(pairs, [diffs[i] for i in keep]), len(diffs) - len(keep)


def pair_scores(model, batch: dict, score: str) -> torch.Tensor:
    """[2B] per row: the sentence log-likelihood (`sentence`) or log p(token at `diff` | prefix)."""
    if score == "sentence":
        return sentence_logprobs(model, batch)
    dev = model.device
    ids, mask, d = batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["diff"].to(dev)
    keep, inverse = torch.unique(d - 1, return_inverse=True)  # logits only where a differing token is predicted
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits  # [rows, K, vocab]
    rows = torch.arange(ids.shape[0], device=dev)
    lg = logits[rows, inverse].float()  # [rows, vocab]
    return lg.gather(-1, ids[rows, d].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1)


def sides(lp: torch.Tensor, update: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) side per pair: (more, less), or (advantaged, disadvantaged) by the model."""
    half = lp.shape[0] // 2
    more, less = lp[:half], lp[half:]
    if update == "gap":
        return more, less
    adv = (more >= less).detach()
    return torch.where(adv, more, less), torch.where(adv, less, more)


def pcgu_loss(lp: torch.Tensor, update: str) -> tuple[torch.Tensor, dict[str, float]]:
    """gap: mean log p(more) - log p(less); advantaged: mean log p(advantaged side). `gap` is
    always reported (early stop on it works for both)."""
    half = lp.shape[0] // 2
    gap = (lp[:half] - lp[half:]).mean()
    if update == "gap":
        return gap, {"gap": gap.item()}
    adv, _ = sides(lp, update)
    loss = adv.mean()
    return loss, {"gap": gap.item(), "advantaged": loss.item()}


def make_loss(cfg):
    def loss_fn(model, batch):
        return pcgu_loss(pair_scores(model, batch, cfg.score), cfg.update)
    return loss_fn


def dynamic_loss(cfg, pairs: DiffPairs, parts: dict, scale: dict, ever: dict, grad_accum: int, counter: list[int],
                 ranking: list[bool]):
    """The loss of a re-ranking build: on the first micro-batch of every `rerank_every`-th step it
    ranks the rows on that micro-batch (cosine of the two sides' gradients, autograd.grad, so the
    step's own .grad is untouched), writes the new row masks into `scale` (read by the gradient
    hooks, which pass gradients through unmasked while `ranking[0]` is set) and marks the rows in
    `ever`; then it returns the step's loss on the same forward."""
    names = list(parts)
    weights = [parts[n][0] for n in names]

    def loss_fn(model, batch):
        i = pairs.last_index
        lp = pair_scores(model, batch, cfg.score)
        if i % grad_accum == 0 and (i // grad_accum) % cfg.rerank_every == 0:
            first, second = sides(lp, cfg.update)
            ranking[0] = True
            try:
                ga = torch.autograd.grad(first.sum(), weights, retain_graph=True, allow_unused=True)
                gb = torch.autograd.grad(second.sum(), weights, retain_graph=True, allow_unused=True)
            finally:
                ranking[0] = False
            cos = {n: row_cosines(torch.zeros_like(w) if a is None else a, torch.zeros_like(w) if b is None else b, parts[n][1])
                   for n, w, a, b in zip(names, weights, ga, gb, strict=True)}
            for n, m in select_rows(cos, cfg.k_percent).items():
                axis = parts[n][1]
                scale[n].copy_((m[:, None] if axis == 0 else m[None, :]).to(scale[n].dtype))
                ever[n] |= m
            counter[0] += 1
        return pcgu_loss(lp, cfg.update)
    return loss_fn


def check_dynamic(cfg, train, world: int, where: str) -> None:
    if world > 1:
        raise UnpatchError(f"{where}: method.rerank_every: re-ranking runs in one process only; build without torchrun or set rerank_every: 0")
    if train.weight_decay:
        raise UnpatchError(f"{where}: train.weight_decay: must be 0 with method.rerank_every (AdamW's decay would move rows PCGU did not choose)")
    if train.checkpoint_every % cfg.rerank_every:
        raise UnpatchError(f"{where}: train.checkpoint_every: must be a multiple of method.rerank_every ({cfg.rerank_every}), "
                           "so a resumed build re-ranks on the same steps")
