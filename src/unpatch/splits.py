"""The dev / test split of every benchmark the tool selects on (metric option `split: dev | test | all`).

RULE (version 1), applied to the whole source before any `limit` or type filter: within each
stratum (the item's type where the benchmark has types: CrowS-Pairs bias type, StereoSet
task/domain, BBQ category; one stratum otherwise), items are ordered by
sha256("unpatch-split-v1" + "\\x1f" + stratum + "\\x1f" + content fields joined by "\\x1f") of their
whitespace-normalised content (ties, i.e. duplicates, by position; the content is the item's texts without its labels, so
relabelling an item, e.g. swapping a pair's sentences, never moves it); even ranks are `dev`, odd
ranks `test`. So each type is split half and half (an odd count gives dev one more), the split
does not depend on row order or on how a file was copied, and `limit` / `bias_types` only take
items from one side, never move them. A different file (another copy with other items) is
another benchmark and is split on its own. Selection (scales, coefficients, learning rates,
budgets) reads `dev`; reported numbers read `test`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import UnpatchError

SPLITS = ("dev", "test", "all")
RULE = ("within each type, items ordered by the sha256 of their whitespace-normalised content "
        "(unpatch-split-v1): even ranks dev, odd ranks test (half of each type each)")
T = TypeVar("T")


def split_key(content: Sequence[str], stratum: str = "") -> bytes:
    """The sha256 that orders an item within its stratum (see RULE)."""
    text = "\x1f".join(" ".join(str(c).split()) for c in ("unpatch-split-v1", stratum, *content))
    return hashlib.sha256(text.encode("utf-8")).digest()


def check_split(metric: str, split: str) -> str:
    if split not in SPLITS:
        raise UnpatchError(f"{metric}: split {split!r} is not one of {', '.join(SPLITS)}; dev is for choosing, test for reporting")
    return split


def labels(items: Sequence[T], content: Callable[[T], Sequence[str]], stratum: Callable[[T], str] | None = None) -> list[str]:
    """The split of every item, in order (see RULE)."""
    strata = [stratum(it) if stratum else "" for it in items]
    by_stratum: dict[str, list[tuple[bytes, int]]] = {}
    for i, (it, st) in enumerate(zip(items, strata, strict=True)):
        by_stratum.setdefault(st, []).append((split_key(content(it), st), i))
    out = [""] * len(items)
    for ranked in by_stratum.values():
        for rank, (_, i) in enumerate(sorted(ranked)):
            out[i] = "dev" if rank % 2 == 0 else "test"
    return out


def select(metric: str, items: Sequence[T], split: str, content: Callable[[T], Sequence[str]],
           stratum: Callable[[T], str] | None = None) -> list[T]:
    """The items of `split` ("all" = every item), in their original order."""
    check_split(metric, split)
    if split == "all":
        return list(items)
    return [it for it, s in zip(items, labels(items, content, stratum), strict=True) if s == split]


def counts(split_labels: Sequence[str], strata: Sequence[str] | None = None) -> dict[str, int]:
    """{"dev": n, "test": n} and, with strata, {"dev/<type>": n, ...}: what the card reports."""
    out = dict(Counter(split_labels))
    if strata is not None:
        out.update({f"{s}/{t}": n for (s, t), n in sorted(Counter(zip(split_labels, strata, strict=True)).items())})
    return out
