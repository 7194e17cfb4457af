"""`ga_kl`: gradient ascent + random-answer loss + KL to the base on normal data.

The unlearning objective of Yao et al., "Large Language Model Unlearning" (2310.10683), as used
with LoRA by 2405.15152. Per micro-batch:

    loss = -eps1 * NLL(forget)                       push the forget texts' likelihood down
           + eps2 * NLL(random answer | forget prompt)  teach a harmless reply in their place
           + eps3 * KL(p_base || p_current) on retain  stay the base model on normal data

- NLL is the mean next-token cross-entropy over the real tokens of a batch (as `ga`).
- The random-answer term pairs each forget *prompt* with an *answer* drawn at random from the
  retain (normal) data, and scores only the answer's tokens. A text holding `answer_marker`
  (default "\\nA:", the form of `builtin:truthfulqa`) splits there; a plain forget text (a toxic
  comment, a book passage) uses its first `prompt_fraction` of tokens as the prompt, and a plain
  retain text is all answer. Draws are a pure function of (seed, micro-batch index), so a
  resumed build sees the same pairs.
- `answer_only: true` (Yao et al.: forget data are prompt + harmful answer, and the ascent is on
  the answer tokens only): the ascent scores only the tokens after the prompt (the `answer_marker`
  split, else the first `prompt_fraction` of the tokens), so the prompt itself is not unlearned.
- `random_answers: K` draws K random answers per forget prompt (Yao et al. draw several); the
  random-answer NLL is the mean over all K x batch rows. K = 1 draws exactly as before.
- KL is summed over the vocabulary and averaged over the real tokens of the retain batch; it is
  exactly 0 before the first step, since the patch starts at zero.
- The reference (base) model: for `kind: lora` it is the SAME model with its adapter switched
  off (`model.disable_adapter()`, under no_grad), so no second copy is held. For `kind: delta`
  the trained weights ARE the base weights, so a frozen copy of the model is taken before
  training (one more model in memory).

Defaults eps1=0.5, eps2=1, eps3=1 are Yao et al.'s (their code's bad/random/normal weights). The
ascent is unbounded; Yao et al. stop once the forget loss passes a threshold, which here is
`train.early_stop: {metric: forget_loss, above: ...}`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..batches import Batches, collate, pad_id
from ..errors import UnpatchError
from . import Context, MethodResult, register
from .ga import forget_nll, nll

ROLE_SEED = 7919  # as Context.batches: each data role gets its own order, all fixed by the seed


class GAKLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    eps1: float = Field(0.5, ge=0)  # gradient ascent on the forget texts
    eps2: float = Field(1.0, ge=0)  # NLL of random benign answers to the forget prompts
    eps3: float = Field(1.0, ge=0)  # KL(base || current) on the retain data
    prompt_fraction: float = Field(0.5, gt=0, lt=1)  # prompt share of a forget text without a marker
    answer_marker: str = "\nA:"  # where a "question ... answer" text splits ("" = never)
    answer_only: bool = False  # ascend on the answer tokens of a forget text only (Yao et al.)
    random_answers: int = Field(1, gt=0)  # random answers drawn per forget prompt and step

    @model_validator(mode="after")
    def _something_to_do(self) -> GAKLConfig:
        if self.eps1 == self.eps2 == self.eps3 == 0:
            raise ValueError("eps1, eps2 and eps3 are all 0, so nothing would be trained; give one of them a weight")
        return self


# ------------------------------------------------------------------------------ reference model

# reference(input_ids, attention_mask) -> logits of the base model, without grad
Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_reference(model, kind: str) -> Reference:
    """The base model's logits: LoRA with the adapter off, else a frozen copy taken now (= base)."""
    if kind == "lora":
        def lora_ref(ids, mask):
            with torch.no_grad(), model.disable_adapter():
                return model(input_ids=ids, attention_mask=mask).logits
        return lora_ref
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def frozen_ref(ids, mask):
        with torch.no_grad():
            return frozen(input_ids=ids, attention_mask=mask).logits
    return frozen_ref


def kl_to_reference(model, reference: Reference, batch) -> torch.Tensor:
    """Mean over real tokens of KL(p_ref || p_cur) = sum_v p_ref (log p_ref - log p_cur)."""
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    ref_lp = F.log_softmax(reference(ids, mask).float(), dim=-1)
    cur_lp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    per_token = F.kl_div(cur_lp, ref_lp, log_target=True, reduction="none").sum(-1)  # [batch, length]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


# ------------------------------------------------------------------------------ data


def split_prompt(text: str, marker: str) -> tuple[str, str] | None:
    """(prompt incl. marker, answer) if the text holds the marker with an answer after it."""
    if marker and marker in text:
        prompt, _, answer = text.partition(marker)
        if answer.strip():
            return prompt + marker, answer.strip()
    return None


def prompt_length(tok, text: str, prompt: str) -> int:
    """Tokens of `text` (tokenized whole, as the ascent sees it) that lie inside its first
    len(prompt) characters: offsets where the tokenizer is fast, else the prompt tokenized alone."""
    if getattr(tok, "is_fast", False):
        n = 0
        for a, b in tok(text, return_offsets_mapping=True)["offset_mapping"]:
            if a >= len(prompt) and b > 0:
                break  # the first answer token
            n += 1  # a prompt token, or a leading special token (offsets (0, 0))
        return n
    return len(tok(prompt)["input_ids"])


class Streams:
    """Micro-batch i = {"forget", "random", "retain"} batches; each a pure function of (seed, i)."""

    def __init__(self, ctx: Context, cfg: GAKLConfig):
        tok, t = ctx.tokenizer, ctx.recipe.train
        self.max_length, self.seed, self.cfg = t.max_length, t.seed, cfg
        self.pad = pad_id(tok)
        where = f"{ctx.recipe.path}: data"
        # forget: whole texts for the ascent, and each one's prompt tokens for the random pairs
        seqs, self.prompts, self.n_prompt = [], [], []
        for text in ctx.data.forget:
            ids = tok(text, truncation=True, max_length=t.max_length)["input_ids"]
            if len(ids) < 2:
                continue  # nothing to predict (as data.encode)
            qa = split_prompt(text, cfg.answer_marker)
            prompt = tok(qa[0])["input_ids"] if qa else ids[: max(1, math.ceil(len(ids) * cfg.prompt_fraction))]
            seqs.append(ids)
            self.prompts.append(prompt[: t.max_length // 2])  # leave room for the answer
            # answer_only: how many leading tokens of `ids` are prompt (context, not ascended on)
            self.n_prompt.append(min(prompt_length(tok, text, qa[0]) if qa else len(prompt), len(ids) - 1))
        if not seqs:
            raise UnpatchError(f"{where}.forget: no text is at least 2 tokens long; nothing to train on")
        self.forget = Batches(seqs, t.batch_size, t.seed, self.pad)
        self.retain = ctx.batches("retain") if ctx.data.retain and cfg.eps3 else None
        # the benign answers: the answer part of each retain text, with the space that joins it on
        answers = [(split_prompt(x, cfg.answer_marker) or ("", x))[1] for x in (ctx.data.retain or [])]
        self.answers = [a for a in (tok(" " + x, add_special_tokens=False)["input_ids"] for x in answers) if a]
        if cfg.eps2 and not self.answers:
            raise UnpatchError(f"{where}.retain: method.eps2 > 0 needs retain texts to draw random answers from")

    def random_pairs(self, i: int, idx: list[int]) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + i + 2 * ROLE_SEED)  # own RNG: global state untouched
        seqs, n_prompt = [], []
        for j in idx:
            for _ in range(self.cfg.random_answers):  # K = 1: the same draws as before the option existed
                s = (self.prompts[j] + rng.choice(self.answers))[: self.max_length]
                seqs.append(s)
                n_prompt.append(len(self.prompts[j]))
        b = collate(seqs, self.pad)
        for r, n in enumerate(n_prompt):  # score the answer only: the prompt is context
            b["labels"][r, :n] = -100
        return b

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor] | None]:
        idx = self.forget.indices(i)
        forget = self.forget[i]
        if self.cfg.answer_only:  # the prompt is context: ascend on the answer tokens only
            for r, j in enumerate(idx):
                forget["labels"][r, : self.n_prompt[j]] = -100
        return {"forget": forget, "random": self.random_pairs(i, idx) if self.cfg.eps2 else None,
                "retain": self.retain[i] if self.retain is not None else None}


# ------------------------------------------------------------------------------ method


def ga_kl_loss(cfg: GAKLConfig, reference: Reference | None):
    def loss_fn(model, b):
        if cfg.eps1:
            f = nll(model, b["forget"])
        else:
            with torch.no_grad():  # still reported: it is what early stop and the notes watch
                f = nll(model, b["forget"])
        loss, metrics = -cfg.eps1 * f, {"forget_loss": f.item()}
        if b["random"] is not None:
            r = nll(model, b["random"])
            loss, metrics["random_loss"] = loss + cfg.eps2 * r, r.item()
        if b["retain"] is not None:
            kl = kl_to_reference(model, reference, b["retain"])
            loss, metrics["kl"] = loss + cfg.eps3 * kl, kl.item()
        return loss, metrics
    return loss_fn


@register("ga_kl", config=GAKLConfig, display="Gradient ascent + random answers + KL (Yao et al.)",
          paper="https://arxiv.org/abs/2405.15152", needs=("forget", "retain"),
          objective=forget_nll, direction="up", example={"eps1": 0.5, "eps2": 1.0, "eps3": 1.0},
          passes=lambda params, kind: (sum(params.get(k, 0) > 0 for k in ("eps1", "eps2", "eps3")), int(params.get("eps3", 0) > 0)),
          frozen_reference=lambda params, kind: kind == "delta" and params.get("eps3", 0) > 0)  # the KL term's base (make_reference)
def ga_kl(ctx: Context) -> MethodResult:
    cfg: GAKLConfig = ctx.config  # type: ignore[assignment]
    streams = Streams(ctx, cfg)
    reference = make_reference(ctx.model, ctx.recipe.patch.kind) if cfg.eps3 else None
    return MethodResult.of(ctx.train(ga_kl_loss(cfg, reference), streams, "ga_kl"))
