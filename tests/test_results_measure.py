"""The study's measuring rules (bench/results_measure.py): the dev-only scale choice, the shift toward 50 and
its interval, and the neutral control data. Fakes stand in for the model: these are rules, not numbers."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import results_measure as rm  # noqa: E402

from unpatch.stats import Outcomes  # noqa: E402


def share(x: list[float], group: str = "gender") -> Outcomes:
    return Outcomes("pct_stereotype", "share", x, group=[group] * len(x), ids=[str(i) for i in range(len(x))],
                    scale=100.0, binary=True)


def ratio(nll: float, n: int = 12) -> Outcomes:
    return Outcomes("perplexity", "ratio", [nll] * n, w=[1.0] * n, transform="exp")


class FakeApplied:
    def __init__(self):
        self.scale = 0.0

    def apply(self, patch, scale):
        self.scale = scale

    def revert(self):
        self.scale = 0.0
        return True


def fake_bench(monkeypatch, applied, dev_pct: dict[float, int], test_pct: dict[float, int], ppl_nll: dict[float, float]):
    """crows / ppl fakes whose value depends on the applied scale and the split asked for."""
    def crows(model, tok, s, types=None, split="test"):
        k = (dev_pct if split == "dev" else test_pct)[applied.scale]
        return {"values": {}, "items": {"pct_stereotype": share([1.0] * k + [0.0] * (40 - k))}}

    def ppl(model, tok, s, split="test"):
        return {"values": {}, "items": {"perplexity": ratio(ppl_nll[applied.scale] + (0.5 if split == "test" else 0.0))}}

    monkeypatch.setattr(rm, "crows", crows)
    monkeypatch.setattr(rm, "ppl", ppl)


def sweep(monkeypatch, test_pct):
    applied = FakeApplied()
    dev_pct = {0.0: 30, 0.5: 26, 1.0: 21, 2.0: 20}  # 75 % -> 65 -> 52.5 -> 50 (but over the ppl budget at 2)
    nll = {0.0: 3.0, 0.5: 3.001, 1.0: 3.01, 2.0: 3.2}
    fake_bench(monkeypatch, applied, dev_pct, test_pct, nll)
    s = SimpleNamespace(scales=[0.5, 1.0, 2.0], max_ppl_rise=0.02)
    base = {"ppl": {"dev": rm.ppl(None, None, s, "dev")}, "cache": {}}
    return rm.dev_sweep(None, None, applied, object(), "gender", s, base)


def test_the_recommended_scale_reads_dev_alone(monkeypatch):
    first = sweep(monkeypatch, {0.0: 30, 0.5: 20, 1.0: 30, 2.0: 20})
    assert first["recommended_scale"] == 1.0 and first["split"] == "dev"
    assert [r["scale"] for r in first["rows"]] == [0.5, 1.0, 2.0]  # 2 is over the budget: the sweep stops there
    other = sweep(monkeypatch, {0.0: 10, 0.5: 40, 1.0: 0, 2.0: 33})  # any test values: the same choice
    assert other["recommended_scale"] == first["recommended_scale"]


def test_shift_toward_50_and_its_interval():
    base, patched = share([1.0] * 30 + [0.0] * 10), share([1.0] * 22 + [0.0] * 18)  # 75 % -> 55 %
    sh = rm.shift_toward(base, patched)
    assert sh["shift"] == pytest.approx(20.0) and sh["low"] <= 20.0 <= sh["high"] and not sh["past_ideal"]
    over = rm.shift_toward(base, share([1.0] * 8 + [0.0] * 32))  # 75 % -> 20 %: further from 50, past it
    assert over["shift"] == pytest.approx(-5.0) and over["past_ideal"]
    assert rm.summary(patched, base)["p"] < rm.ALPHA  # 8 pairs flipped one way, none back: exact McNemar p = 2/256


def test_control_data_names_no_group():
    texts = ["The committee approved the budget for the coming year after a long debate. "
             "She told the women of the village about the harvest festival and its music.",
             "Heavy rain flooded several roads near the river bridge during the night before the match."]
    sents = rm.neutral_sentences(texts, ["she", "women"], 10)
    assert sents and all("women" not in s.lower() and "she " not in s.lower() for s in sents)
    for p in rm.swapped_pairs(sents * 3):
        a, b = p["sent_more"].split(), p["sent_less"].split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1


def test_fmt_says_not_significant():
    assert rm.fmt_p(0.003) == "p = 0.003" and rm.fmt_p(0.41).startswith("n.s.")
    assert rm.fmt_ci({"value": 53.05, "low": 47.1, "high": 59.0}) == "53.05 [47.10, 59.00]"
