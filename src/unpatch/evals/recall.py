"""`forget_recall`: verbatim recall of learned passages, unseen passages of the same text, and a
control text (the copyright evaluation of 2405.15152, for learn-then-forget recipes)."""

from __future__ import annotations

import random

from ..errors import UnpatchError
from . import register_metric
from .forgetting import load_metric_texts, strict_options
from .harmful import greedy_continuations
from .verbatim import corpus_bleu, rouge_l

SPLITS = ("learned", "unseen", "control")
BOOTSTRAP = 1000  # resamples of the passages for the 95 % intervals (fixed seed 0)


@register_metric("forget_recall", direction="lower", data_role="forget",
                 description="ROUGE-L / BLEU / exact match of greedy continuations of learned, unseen and control passages")
@strict_options
def forget_recall(model, tokenizer, source: str = "builtin:xsum", column: str | None = None, limit: int | None = None,
                  chunk_words: int | None = None, control: str | None = None, control_column: str | None = None,
                  passages: int = 32, prompt_tokens: int = 32, gen_tokens: int = 24, batch_size: int = 16) -> dict:
    """How much of the forget text the model reproduces verbatim, split three ways.

    `source` is read as the recipe's data.forget reads it (a .txt book cut into `chunk_words`-word
    passages; a build fills source/column/limit/chunk_words in from data.forget). The first `limit`
    passages are the LEARNED ones (what a learn stage fine-tunes on and the patch forgets); the
    passages after them are UNSEEN passages of the same text; `control` is another text (cut the
    same way) that neither stage reads. From each split `passages` passages evenly spread over it
    are used: a passage is tokenized without special tokens, its first `prompt_tokens` tokens (after
    the tokenizer's own leading specials, e.g. BOS) are the prompt, the model continues greedily
    (transformers generate, do_sample=False) for as many tokens as the passage has left, at most
    `gen_tokens`. Per split: `<split>_rouge_l` mean ROUGE-L F1 as rouge_score's `rougeL` (verbatim.
    rouge_l), `<split>_bleu` corpus BLEU as sacrebleu's corpus_bleu defaults (verbatim.corpus_bleu),
    `<split>_exact` the share of continuations equal to the true tokens; `<split>/rouge_l_lo|hi` and
    `<split>/exact_lo|hi` a 95 % percentile bootstrap over passages (1,000 resamples, seed 0), and
    `<split>/passages`. A split with no passage (no text after `limit`, no control) is left out.
    """
    if min(passages, prompt_tokens, gen_tokens) < 1:
        raise UnpatchError("forget_recall: passages, prompt_tokens and gen_tokens must be at least 1")
    if column is None and source == "builtin:xsum":
        column = "document"  # the default source's text column, as verbatim_recall reads it
    texts = load_metric_texts("forget_recall", source, column, None, chunk_words)
    cut = limit if limit is not None else len(texts)
    sets = {"learned": texts[:cut], "unseen": texts[cut:],
            "control": load_metric_texts("forget_recall", control, control_column, None, chunk_words) if control else []}
    out: dict = {}
    for split in SPLITS:
        scores = _split(model, tokenizer, sets[split], passages, prompt_tokens, gen_tokens, batch_size)
        if scores is not None:
            out.update({f"{split}_{k}" if "/" not in k else f"{split}{k}": v for k, v in scores.items()})
    if not out:
        raise UnpatchError(f"forget_recall: no passage of {source} has more than {prompt_tokens} tokens; lower prompt_tokens")
    return out


def _split(model, tokenizer, texts: list[str], n: int, k: int, m: int, batch_size: int) -> dict | None:
    """Scores of one split, or None when it has no usable passage."""
    ids = [x for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(x) > k] if texts else []
    if not ids:
        return None
    count = min(n, len(ids))
    chosen = [ids[j * len(ids) // count] for j in range(count)]  # evenly spread over the split
    lead = tokenizer("")["input_ids"]  # what the tokenizer puts before any text (a BOS, or nothing)
    gens = greedy_continuations(model, tokenizer, [lead + x[:k] for x in chosen], m, batch_size)
    truth = [x[k: k + m] for x in chosen]
    gens = [g[: len(t)] for g, t in zip(gens, truth, strict=True)]  # as long as the passage's rest
    hyp = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    ref = [tokenizer.decode(t, skip_special_tokens=True) for t in truth]
    rouge = [rouge_l(r, h) for r, h in zip(ref, hyp, strict=True)]
    exact = [float(g == t) for g, t in zip(gens, truth, strict=True)]
    r_lo, r_hi = bootstrap_interval(rouge)
    e_lo, e_hi = bootstrap_interval(exact)
    return {"rouge_l": sum(rouge) / count, "bleu": corpus_bleu(hyp, ref), "exact": sum(exact) / count,
            "/rouge_l_lo": r_lo, "/rouge_l_hi": r_hi, "/exact_lo": e_lo, "/exact_hi": e_hi, "/passages": count}


def bootstrap_interval(values: list[float], resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of `values` (own seeded RNG)."""
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]
