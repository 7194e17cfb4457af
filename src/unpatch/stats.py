"""Per-item outcomes of a metric, 95 % intervals and paired base-vs-patch tests (the evaluation protocol).

A metric records what each scored item contributed (`record(Outcomes(...))`, a no-op unless a
caller collects with `collect()`), so its headline can be recomputed on any subset of items: on
bootstrap resamples (intervals), on the dev or the test split (the sweep), and paired item by
item against the base (tests). Kinds of headline, all of which `Outcomes.value` recomputes:
  share        scale * mean(x), x in {0, 1}                     (CrowS-Pairs % stereotyped, a rate)
  macro_share  scale * mean over groups of mean(x in group)     (StereoSet SS: macro over target terms)
  ratio        transform(sum(x) / sum(w))                        (perplexity = exp(NLL sum / tokens), NLL, KL)
  mean         scale * mean(x)                                   (scores with no denominator)
Intervals: exact Clopper-Pearson for a share of binary items, else a percentile bootstrap over
items (1,000 resamples, seed 0: the same data always gives the same interval). Paired tests:
exact two-sided McNemar on binary decisions (b = items 1 -> 0, c = 0 -> 1), else a paired
bootstrap (the same resampled items for base and patch) whose two-sided p is twice the smaller
tail of the resampled difference around 0, with the +1 correction (never exactly 0). With fewer
than MIN_BOOTSTRAP items a bootstrap says nothing (2 items have 3 distinct resamples): no
interval and no p then, rather than a confident-looking one.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000
SEED = 0
MIN_BOOTSTRAP = 10
KINDS = ("share", "macro_share", "ratio", "mean")
_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("unpatch_outcomes", default=None)


def item_id(*parts: str) -> str:
    """A short stable id of an item's content (pairs items of two runs; not a split rule)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12]


@dataclass
class Outcomes:
    """What each scored item contributed to one headline (see the module docstring)."""

    key: str  # the headline key these outcomes recompute (e.g. pct_stereotype)
    kind: str
    x: list[float]
    w: list[float] | None = None  # ratio: the denominator per item (tokens)
    group: list[str] | None = None  # macro_share: the group (target term) per item
    split: list[str] | None = None  # dev | test per item, where the metric has a split
    ids: list[str] | None = None  # content ids: pairs the items of two runs
    scale: float = 1.0
    transform: str | None = None  # "exp" (ratio only)
    binary: bool = False  # x in {0, 1}: exact intervals and McNemar apply
    unit: str = "items"  # what one item is, for the card (pairs, items, 64-token blocks, texts, prompts)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Outcomes kind {self.kind!r} is not one of {KINDS}")

    def __len__(self) -> int:
        return len(self.x)

    def value(self) -> float:
        return float(_stat(self, np.ones((1, len(self)), dtype=np.float64))[0])

    def subset(self, split: str) -> Outcomes:
        """Only the items of one split ("all" = every item)."""
        if split == "all" or self.split is None:
            return self
        return self._keep([i for i, s in enumerate(self.split) if s == split])

    def in_group(self, group: str) -> Outcomes:
        """Only the items of one group (a CrowS-Pairs bias type: its per-type interval and paired test)."""
        return self._keep([i for i, g in enumerate(self.group or []) if g == group])

    def _keep(self, keep: list[int]) -> Outcomes:
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return replace(self, x=pick(self.x), w=pick(self.w), group=pick(self.group), split=pick(self.split), ids=pick(self.ids))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, False)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Outcomes:
        return cls(**d)


def record(outcomes: Outcomes) -> None:
    """Called by a metric with its per-item outcomes; kept only inside `collect()`."""
    sink = _SINK.get()
    if sink is not None:
        sink.append(outcomes)


@contextlib.contextmanager
def collect():
    """`with collect() as got:` every Outcomes recorded in the block lands in the list `got`."""
    got: list[Outcomes] = []
    token = _SINK.set(got)
    try:
        yield got
    finally:
        _SINK.reset(token)


# ------------------------------------------------------------------------------ statistics


def _stat(o: Outcomes, counts: np.ndarray) -> np.ndarray:
    """The headline on each row of `counts` ([B, n] how often each item is drawn)."""
    x = np.asarray(o.x, dtype=np.float64)
    if o.kind == "macro_share":
        groups = sorted(set(o.group or []))
        onehot = np.array([[g == name for name in groups] for g in o.group], dtype=np.float64)  # [n, G]
        num, den = counts @ (onehot * x[:, None]), counts @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            per = num / den  # a group not drawn in a resample: nan, left out of the mean
        return o.scale * np.nanmean(per, axis=1)
    w = np.asarray(o.w, dtype=np.float64) if o.w is not None else np.ones_like(x)
    out = (counts @ x) / (counts @ w)
    if o.transform == "exp":
        return np.exp(out)
    return o.scale * out


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (as scipy's binomtest(...).proportion_ci("exact"))."""
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: b and c are the discordant counts (a binomial test of b in b + c at 1/2)."""
    from scipy.stats import binom

    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), n, 0.5)))


def interval(o: Outcomes, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """{"low", "high", "method", "level", "n"}: the headline's interval over o's items."""
    n = len(o)
    if n == 0:
        return {"low": None, "high": None, "method": "none", "level": level, "n": 0}
    if o.binary and o.kind in ("share", "mean"):
        lo, hi = clopper_pearson(int(round(sum(o.x))), n, level)
        return {"low": o.scale * lo, "high": o.scale * hi, "method": "clopper-pearson", "level": level, "n": n}
    if n < MIN_BOOTSTRAP:
        return {"low": None, "high": None, "method": f"none: {n} {o.unit} < {MIN_BOOTSTRAP}", "level": level, "n": n}
    vals = _stat(o, _resamples(n, resamples, seed))
    lo, hi = np.nanquantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"low": float(lo), "high": float(hi), "method": f"bootstrap ({resamples}, seed {seed})", "level": level, "n": n}


def paired_test(base: Outcomes, patched: Outcomes, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any] | None:
    """p-value of "no change" between two runs on the same items; None when the items differ."""
    if len(base) != len(patched) or len(base) == 0 or (base.ids and patched.ids and base.ids != patched.ids):
        return None
    if base.binary and patched.binary:
        b = sum(1 for x, y in zip(base.x, patched.x, strict=True) if x and not y)
        c = sum(1 for x, y in zip(base.x, patched.x, strict=True) if y and not x)
        return {"p": mcnemar_exact(b, c), "test": "exact McNemar", "b": b, "c": c, "n": len(base)}
    if len(base) < MIN_BOOTSTRAP:
        return {"p": None, "test": f"none: {len(base)} {base.unit} < {MIN_BOOTSTRAP} for a bootstrap", "n": len(base)}
    counts = _resamples(len(base), resamples, seed)
    diff = _stat(patched, counts) - _stat(base, counts)
    diff = diff[~np.isnan(diff)]
    observed = patched.value() - base.value()
    if observed == 0 and not np.any(diff):
        return {"p": 1.0, "test": "paired bootstrap", "n": len(base)}
    tail = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (len(diff) + 1))
    return {"p": p, "test": f"paired bootstrap ({resamples}, seed {seed})", "n": len(base)}


def p_text(p: float | None) -> str:
    """p = 0.003 / p < 0.001 / p = 0.42, for tables and verdicts."""
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"
