"""`masked_ga`: masked-token gradient ascent ("MLM unlearning", Dige et al., 2407.16951).

Gradient ascent on ONLY the bias-bearing tokens of a sentence; the rest of the sentence is
context (label -100), so the model learns "not this word here" rather than "not this sentence".
The paper had GPT-4 pick the words; offline, `targets` picks them one of three ways:

- `pairs` (data.pairs): a word-level diff (difflib.SequenceMatcher, case-insensitive) of each
  (more, less) pair. Ascend on the differing words of the MORE stereotypical sentence; with
  `descent_weight > 0` also descend on the differing words of the less one (a contrastive push).
- `marked` (data.forget): spans written `[[like this]]` in the text. The brackets are stripped
  before tokenising; a text without a marked span is skipped.
- `words` (data.forget): every case-insensitive whole-word match of `words` (phrases allowed).
- `lexicon` (data.forget): the same, with the group / identity words of the lexicon the project
  ships (unpatch/resources/identity_terms.yaml: `lexicon: [gender, race, religion]`, all three by
  default). This is the paper's target: the bias-bearing group word of a hateful text ("women"),
  ascended on alone, with `descent_weight: 0` (recipes/paper/masked-ga-2407.16951.yaml).

Character spans become token positions through the fast tokenizer's `offset_mapping`: a token is
a target when its characters overlap a target span. Each text gets the tokenizer's BOS (else EOS)
token in front when the tokenizer adds none, so a target at the very start still has a context
(and scoring with lm-eval's empty-context rule sees the same thing).

loss = -NLL(target tokens of more/forget) + descent_weight * NLL(target tokens of less), each the
mean over the batch's target tokens. Unbounded below like plain GA: keep steps small or use
`train.early_stop: {metric: forget_loss, above: ...}`.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..batches import Batches, collate, pad_id
from ..errors import UnpatchError
from . import Context, MethodResult, register

Span = tuple[int, int]  # [start, end) character offsets
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")  # words (with inner apostrophes) and single punctuation marks
_MARK = re.compile(r"\[\[(.+?)\]\]", re.S)


class MaskedGAConfig(BaseModel):
    """Which tokens to ascend on. Steps, lr, batch size live in `train`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    targets: Literal["pairs", "marked", "words", "lexicon"] = "pairs"
    words: list[str] = []  # targets: words; matched case-insensitively as whole words
    lexicon: list[Literal["gender", "race", "religion"]] = []  # targets: lexicon; its groups ([] = all three)
    descent_weight: float = Field(0.0, ge=0)  # targets: pairs; weight of descent on the less sentence's diff
    max_diff_words: int | None = Field(None, gt=0)  # targets: pairs; skip pairs whose more side differs in more words

    @model_validator(mode="after")
    def _consistent(self) -> MaskedGAConfig:
        if self.targets == "words" and not [w for w in self.words if w.strip()]:
            raise ValueError("targets: words needs a non-empty `words: [...]` list")
        if self.targets != "words" and self.words:
            raise ValueError(f"`words` is only used with targets: words (targets is {self.targets})")
        if self.targets != "lexicon" and self.lexicon:
            raise ValueError(f"`lexicon` is only used with targets: lexicon (targets is {self.targets})")
        if self.targets != "pairs" and (self.descent_weight or self.max_diff_words):
            raise ValueError(f"descent_weight and max_diff_words only apply to targets: pairs (targets is {self.targets})")
        return self

    @property
    def role(self) -> str:
        return "pairs" if self.targets == "pairs" else "forget"


# ------------------------------------------------------------------------------ finding targets


def word_spans(text: str) -> list[Span]:
    return [m.span() for m in _WORD.finditer(text)]


def pair_spans(more: str, less: str) -> tuple[list[Span], list[Span]]:
    """Character spans of the words that differ between `more` and `less` (in each sentence)."""
    wm, wl = word_spans(more), word_spans(less)
    a = [more[s:e].lower() for s, e in wm]
    b = [less[s:e].lower() for s, e in wl]
    out_m, out_l = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op != "equal":
            out_m += wm[i1:i2]
            out_l += wl[j1:j2]
    return out_m, out_l


def marked_spans(text: str) -> tuple[str, list[Span]]:
    """Strip `[[...]]` markers; return the clean text and the marked spans within it."""
    clean, spans, pos = [], [], 0
    n = 0  # length of the clean text so far
    for m in _MARK.finditer(text):
        clean.append(text[pos:m.start()])
        n += m.start() - pos
        spans.append((n, n + len(m.group(1))))
        clean.append(m.group(1))
        n += len(m.group(1))
        pos = m.end()
    clean.append(text[pos:])
    return "".join(clean), spans


def words_pattern(words: list[str]) -> re.Pattern:
    # longest first, so "black people" wins over "black"; inner whitespace matches any whitespace
    alts = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in alts) + r")(?!\w)", re.I)


def word_list_spans(text: str, pattern: re.Pattern) -> list[Span]:
    return [m.span() for m in pattern.finditer(text)]


# ------------------------------------------------------------------------------ tokens and labels


def label_tokens(tokenizer, texts: list[str], spans: list[list[Span]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per text: labels are the token id on target tokens, -100 elsewhere.
    Position 0 is never a target (nothing predicts it); a BOS/EOS token is put in front when the
    tokenizer adds none. Texts whose targets all fall outside `max_length` end up without one."""
    if not getattr(tokenizer, "is_fast", False):
        raise UnpatchError("method masked_ga needs a fast tokenizer (it maps words to tokens by offset_mapping)")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True, return_offsets_mapping=True)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        ids, offsets = list(ids), [tuple(o) for o in offsets]
        if prefix is not None and (not ids or ids[0] != prefix):
            ids, offsets = [prefix, *ids][:max_length], [(0, 0), *offsets][:max_length]
        labels = [t if e > s and any(s < b and e > a for a, b in sp) else -100 for t, (s, e) in zip(ids, offsets, strict=True)]
        if labels:
            labels[0] = -100
        # causal attention: tokens after the last target change no target's loss, so drop them
        # (often half the sentence; the result is the same, the step is cheaper)
        last = max((k for k, lab in enumerate(labels) if lab != -100), default=len(labels) - 1)
        out.append((ids[: last + 1], labels[: last + 1]))
    return out


def has_target(labels: list[int]) -> bool:
    return any(x != -100 for x in labels)


def examples(cfg: MaskedGAConfig, data, tokenizer, max_length: int, where: str) -> list[dict[str, list[int]]]:
    """Tokenised training examples with target labels: {"ids", "labels"} plus, for pairs,
    {"less_ids", "less_labels"}. Raises when no example has a target token."""
    role = cfg.role
    items = getattr(data, role)
    if items is None:
        raise UnpatchError(f"{where}: data.{role}: required by method masked_ga with targets: {cfg.targets}")
    if cfg.targets == "pairs":
        diffs = [pair_spans(m, lo) for m, lo in items]
        keep = [i for i, (sm, _) in enumerate(diffs) if cfg.max_diff_words is None or len(sm) <= cfg.max_diff_words]
        more = label_tokens(tokenizer, [items[i][0] for i in keep], [diffs[i][0] for i in keep], max_length)
        less = label_tokens(tokenizer, [items[i][1] for i in keep], [diffs[i][1] for i in keep], max_length)
        out = [{"ids": m[0], "labels": m[1], "less_ids": lo[0], "less_labels": lo[1]} for m, lo in zip(more, less, strict=True)]
    else:
        if cfg.targets == "marked":
            texts, spans = zip(*(marked_spans(t) for t in items), strict=True) if items else ((), ())
        else:
            if cfg.targets == "lexicon":
                from ..lexicon import GROUPS, lexicon_words

                pattern = words_pattern(lexicon_words(tuple(cfg.lexicon) or GROUPS))
            else:
                pattern = words_pattern(cfg.words)
            texts, spans = items, [word_list_spans(t, pattern) for t in items]
        out = [{"ids": i, "labels": lab} for i, lab in label_tokens(tokenizer, list(texts), list(spans), max_length)]
    out = [x for x in out if has_target(x["labels"])]
    if not out:
        hint = {"pairs": "every pair is identical or was skipped by method.max_diff_words",
                "marked": "mark the words to forget as [[word]] in the texts",
                "words": "check method.words against the texts",
                "lexicon": "no text holds a word of the chosen method.lexicon groups"}[cfg.targets]
        raise UnpatchError(f"{where}: method.targets: no target token found in any example of data.{role} ({hint}); nothing to train on")
    return out


def _pad_labels(labels: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], dtype=torch.long)


class MaskedBatches(Batches):
    """data.Batches (same seeded order: batch i depends only on seed and i) over labelled
    examples; `batch["less"]` carries the paired less-stereotypical sentences, if any."""

    def __init__(self, items: list[dict[str, list[int]]], batch_size: int, seed: int, pad_id: int):
        super().__init__([x["ids"] for x in items], batch_size, seed, pad_id)
        self.items = items

    def __getitem__(self, i: int) -> dict:
        chosen = [self.items[j] for j in self.indices(i)]
        return self.collate(chosen)

    def collate(self, chosen: list[dict[str, list[int]]]) -> dict:
        b = collate([x["ids"] for x in chosen], self.pad_id)
        b["labels"] = _pad_labels([x["labels"] for x in chosen], b["input_ids"].shape[1])
        if "less_ids" in chosen[0]:
            less = collate([x["less_ids"] for x in chosen], self.pad_id)
            less["labels"] = _pad_labels([x["less_labels"] for x in chosen], less["input_ids"].shape[1])
            b["less"] = less
        return b


def masked_nll(model, batch) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over the labelled (target) tokens, and how many there are. 0 (with a
    graph) when there are none, so a batch without targets adds nothing rather than NaN."""
    dev = model.device
    labels = batch["labels"][:, 1:]  # label t+1 is predicted at position t
    keep = (labels != -100).any(0).nonzero().flatten()  # positions some row needs: [K]
    labels = labels[:, keep].to(dev)  # [B, K]
    # logits only where a target is predicted: the vocabulary projection is ~1/5 of the model's
    # work, and most positions are context
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                   logits_to_keep=keep.to(dev), use_cache=False).logits  # [B, K, vocab]
    n = int((labels != -100).sum())
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / max(n, 1), n


def _batches(cfg: MaskedGAConfig, data, tokenizer, recipe, where: str) -> MaskedBatches:
    t = recipe.train
    items = examples(cfg, data, tokenizer, t.max_length, where)
    seed = t.seed + ("forget", "retain", "pairs").index(cfg.role) * 7919  # as Context.batches
    return MaskedBatches(items, t.batch_size, seed, pad_id(tokenizer))


@torch.no_grad()
def target_nll(model, tokenizer, data, recipe) -> float:
    """What masked_ga pushes up, over every example once: the mean NLL of the target tokens of the
    forget texts / more sentences, minus descent_weight x that of the less sentences' targets
    (with descent_weight 0, simply the masked-token NLL of the forget data)."""
    cfg = MaskedGAConfig.model_validate(recipe.method.params)
    b = _batches(cfg, data, tokenizer, recipe, str(recipe.path))
    model.eval()
    sums = {"up": [0.0, 0], "down": [0.0, 0]}
    for k in range(0, len(b.items), b.batch_size):  # data order, no shuffling
        batch = b.collate(b.items[k: k + b.batch_size])
        for key, part in (("up", batch), ("down", batch.get("less") if cfg.descent_weight else None)):
            if part is not None:
                loss, n = masked_nll(model, part)
                sums[key][0] += loss.item() * n
                sums[key][1] += n
    up, down = (s / max(n, 1) for s, n in sums.values())
    return up - cfg.descent_weight * down


@register("masked_ga", config=MaskedGAConfig, display="Masked-token gradient ascent (MLM unlearning)",
          paper="https://arxiv.org/abs/2407.16951", needs=(), objective=target_nll, direction="up",
          example={"targets": "pairs", "descent_weight": 0.5},
          passes=lambda params, kind: (1 + (params.get("descent_weight", 0) > 0), 0))
def masked_ga(ctx: Context) -> MethodResult:
    cfg: MaskedGAConfig = ctx.config  # type: ignore[assignment]
    batches = _batches(cfg, ctx.data, ctx.tokenizer, ctx.recipe, str(ctx.recipe.path))
    w = cfg.descent_weight

    def loss_fn(model, batch):
        up, _ = masked_nll(model, batch)
        metrics = {"forget_loss": up.item()}
        loss = -up
        if w and "less" in batch:
            down, _ = masked_nll(model, batch["less"])
            metrics["less_loss"] = down.item()
            loss = loss + w * down
        return loss, metrics

    res = ctx.train(loss_fn, batches, "masked_ga")
    n_in = len(getattr(ctx.data, cfg.role))
    return MethodResult.of(res, [f"targets: {cfg.targets}; {len(batches.items)} of {n_in} examples have target tokens"])
