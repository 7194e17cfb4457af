"""Texts -> padded token batches: encoding, right-padding (collate), and the seeded, resumable
stream of batches a method trains on (Batches)."""

from __future__ import annotations

import random

import torch

from .errors import UnpatchError


def encode(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated; texts of < 2 tokens are dropped (nothing to predict)."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return [x for x in ids if len(x) >= 2]


def collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. labels = -100 on padding, so the loss ignores it (the
    pad id may be eos, a real token, so the mask is positional, not by id)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class Batches:
    """An endless, seeded stream of batches: batch `i` is a pure function of (seed, i), so a
    resumed run picks up the data order exactly where it stopped without saving any state.
    Each epoch is a fresh permutation; a ragged last batch is dropped to keep shapes steady."""

    def __init__(self, seqs: list[list[int]], batch_size: int, seed: int, pad_id: int):
        self.seqs, self.pad_id, self.seed = seqs, pad_id, seed
        self.batch_size = min(batch_size, len(seqs))
        self.per_epoch = len(seqs) // self.batch_size
        self._perm: tuple[int, list[int]] | None = None

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, max_length: int, batch_size: int, seed: int, where: str = "data") -> Batches:
        seqs = encode(texts, tokenizer, max_length)
        if not seqs:
            raise UnpatchError(f"{where}: no text is at least 2 tokens long; nothing to train on")
        return cls(seqs, batch_size, seed, pad_id(tokenizer))

    def __len__(self) -> int:
        return self.per_epoch

    def indices(self, i: int) -> list[int]:
        epoch, k = divmod(i, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(len(self.seqs)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)  # own RNG: global state untouched
            self._perm = (epoch, order)
        return self._perm[1][k * self.batch_size: (k + 1) * self.batch_size]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate([self.seqs[j] for j in self.indices(i)], self.pad_id)


def pad_id(tokenizer, fallback=None) -> int:
    """The id to right-pad with: the tokenizer's pad token; without one, `fallback` (an id, or a
    function of the tokenizer, called only then: scoring pads with its prefix token, BOS else EOS),
    else EOS, else 0. Padded positions are masked, so the choice never changes a number."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if fallback is not None:
        return fallback(tokenizer) if callable(fallback) else fallback
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
