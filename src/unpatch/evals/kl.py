"""kl_retain: the KL divergence from the base to the patched model on retain text, exact (the base
alongside, or a peft patch's adapters switched off) or from the base's top-k log-probs computed once
(`reference_logprobs`, which the runner finds beside the metric). The text handling is forgetting.py's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnpatchError
from ..modes import evaluating
from . import register_metric
from .forgetting import (
    BATCH_TOKENS,
    RETAIN_SOURCE,
    _device,
    _logits,
    _max_length,
    _pad_id,
    _rows,
    base_model,
    batches,
    is_peft,
    split_texts,
    strict_options,
    token_seqs,
)


@dataclass(frozen=True)
class ReferenceLogprobs:
    """The base's top-k next-token log-probs at every scored position of some texts, computed once
    (`reference_logprobs`) so the base need not stay in memory: [positions, k] per text."""

    seqs: list[list[int]]
    ids: list[torch.Tensor]  # [len(seq) - 1, k] token ids, int32
    logprobs: list[torch.Tensor]  # [len(seq) - 1, k] log p_base, float32
    top_k: int


@torch.inference_mode()
def reference_logprobs(reference, tokenizer, source: str = RETAIN_SOURCE, column: str | None = None,
                       limit: int | None = None, chunk_words: int | None = None, max_length: int | None = None,
                       top_k: int = 64, batch_tokens: int = BATCH_TOKENS, split: str = "all") -> ReferenceLogprobs:
    """Cache the base's top-k log-probs on the retain texts (same options as kl_retain)."""
    if top_k < 1:
        raise UnpatchError(f"kl_retain: top_k {top_k} must be at least 1")
    texts = split_texts("kl_retain", source, column, limit, chunk_words, split)
    seqs = token_seqs(tokenizer, texts, _max_length(reference, max_length), "kl_retain")
    ids: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    lps: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for idx, inp, tgt in batches(seqs, batch_tokens, _pad_id(tokenizer)):
        logits = _logits(reference.eval(), inp)
        for r, i in enumerate(idx):
            n = int((tgt[r] != -100).sum())
            lp = torch.log_softmax(logits[r, :n].float(), dim=-1)
            val, ix = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            ids[i], lps[i] = ix.to("cpu", torch.int32), val.cpu()
    return ReferenceLogprobs(seqs, ids, lps, top_k)


@register_metric("kl_retain", ideal=0.0, direction="lower", data_role="retain",
                 description="mean per-token KL(base || patched) on retain texts; 0 = the retain behaviour is untouched")
@strict_options
def kl_retain(model, tokenizer, reference=None, reference_logprobs: ReferenceLogprobs | None = None,
              source: str = RETAIN_SOURCE, column: str | None = None, limit: int | None = None,
              chunk_words: int | None = None, max_length: int | None = None, batch_tokens: int = BATCH_TOKENS,
              split: str = "all") -> dict[str, float]:
    """Mean per-token KL(base || patched) in nats over every position of the retain texts.

    At each position t of each text ([BOS (else EOS), *tokens] as lm-evaluation-harness scores
    text, cut to max_length), KL_t = sum_v p_base(v | <t) * (log p_base(v | <t) - log p(v | <t))
    over the full vocabulary, as torch.nn.functional.kl_div(log p, log p_base, log_target=True)
    summed over v (the KL-to-base regulariser of 2405.15152, measured); result = mean over all
    positions (token-weighted). The base is one of:
      `reference`          a model with the same tokenizer, run batch by batch beside `model` (exact);
      `reference_logprobs` from `reference_logprobs(base, tokenizer, source=...)`: the base's top-k
                           log-probs cached once (the base can then be freed). The k tokens plus one
                           "rest of vocabulary" bucket give KL over a coarser partition, a lower bound
                           of the exact KL (log-sum inequality) that is exact when k >= vocab size;
      neither, for a peft PeftModel: the same model with its adapters disabled (exact).
    Memory: one batch of at most `batch_tokens` positions of [positions, vocab] logits per model.
    Returns kl (headline), max_kl (largest per-position KL), tokens, texts, top_k (0 = exact).
    `split` as forget_nll. Per-text KL sums and token counts are recorded (`unpatch.stats`).
    """
    if reference is not None and reference_logprobs is not None:
        raise UnpatchError("kl_retain: pass reference= or reference_logprobs=, not both")
    if reference is None and reference_logprobs is None and not is_peft(model):
        raise UnpatchError("kl_retain: needs the base model; pass reference=<base model> or "
                           "reference_logprobs=reference_logprobs(base, tokenizer, ...)")
    texts = split_texts("kl_retain", source, column, limit, chunk_words, split)
    seqs = token_seqs(tokenizer, texts, _max_length(model, max_length), "kl_retain")
    if reference_logprobs is not None:
        if reference_logprobs.seqs != seqs:
            raise UnpatchError("kl_retain: reference_logprobs were computed on other texts or tokens; "
                               "build them with the same source/column/limit/max_length and tokenizer")
        return _kl_cached(model, tokenizer, seqs, reference_logprobs, batch_tokens)
    return _kl_exact(model, tokenizer, seqs, reference, batch_tokens)


@torch.inference_mode()
def _kl_exact(model, tokenizer, seqs, reference, batch_tokens: int) -> dict[str, float]:
    total, count, worst = 0.0, 0, 0.0
    with evaluating(model):
        for _, inp, tgt in batches(seqs, batch_tokens, _pad_id(tokenizer)):
            keep = (tgt.flatten() != -100).to(_device(model))
            patched = _logits(model, inp).flatten(0, 1)[keep]
            if reference is None:  # a PeftModel: its base is itself with the adapters off
                with base_model(model):
                    base = _logits(model, inp).flatten(0, 1)[keep]
            else:
                base = _logits(reference.eval(), inp).flatten(0, 1)[keep.to(_device(reference))].to(patched.device)
            if base.shape[-1] != patched.shape[-1]:
                raise UnpatchError(f"kl_retain: the reference has {base.shape[-1]} logits per token, the model {patched.shape[-1]}; they must share a vocabulary")
            for sl in _rows(len(patched), patched.shape[-1]):
                lb = torch.log_softmax(base[sl].float(), dim=-1)
                lp = torch.log_softmax(patched[sl].float(), dim=-1)
                kl = (lb.exp() * (lb - lp)).sum(-1).double()
                total += float(kl.sum())
                worst = max(worst, float(kl.max()))
            count += int(keep.sum())
    return {"kl": total / count, "max_kl": worst, "tokens": count, "texts": len(seqs), "top_k": 0}


@torch.inference_mode()
def _kl_cached(model, tokenizer, seqs, ref: ReferenceLogprobs, batch_tokens: int) -> dict[str, float]:
    total, count, worst = 0.0, 0, 0.0
    per_text = [0.0] * len(seqs)
    with evaluating(model):
        for idx, inp, tgt in batches(seqs, batch_tokens, _pad_id(tokenizer)):
            logits = _logits(model, inp)
            for r, i in enumerate(idx):
                n = int((tgt[r] != -100).sum())
                lp = torch.log_softmax(logits[r, :n].float(), dim=-1)
                lb = ref.logprobs[i].to(lp.device)
                ix = ref.ids[i].to(lp.device).long()
                lpk = lp.gather(1, ix)
                kl = (lb.exp() * (lb - lpk)).sum(-1).double()
                # the rest of the vocabulary as one bucket: the base's rest mass is 1 - sum(top-k) (float64
                # against cancellation); the model's is a logsumexp over the other tokens (no cancellation)
                rest_b = (-lb.double().exp().sum(-1)).clamp(min=-1.0).log1p()
                rest_p = lp.scatter(1, ix, float("-inf")).logsumexp(-1).double()
                if ix.shape[1] < lp.shape[1]:  # k >= vocab: no rest, the KL is exact
                    # a peaked base whose top-k mass rounds to 1 leaves an empty bucket: 0 * log 0 = 0, not nan
                    rest = rest_b.exp() * (rest_b - rest_p)
                    kl = kl + torch.where(torch.isneginf(rest_b), torch.zeros_like(rest), rest)
                total += float(kl.sum())
                per_text[i] = float(kl.sum())
                worst = max(worst, float(kl.max()))
                count += n
    _record_kl(per_text, seqs)
    return {"kl": total / count, "max_kl": worst, "tokens": count, "texts": len(seqs), "top_k": ref.top_k}


def _record_kl(per_text: list[float], seqs) -> None:
    from ..stats import Outcomes, record

    record(Outcomes("kl", "ratio", per_text, w=[float(len(s) - 1) for s in seqs], unit="texts"))
