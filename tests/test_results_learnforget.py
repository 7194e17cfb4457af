"""The study's learn-then-forget part (bench/results_learnforget.py): dev-only choice, verdict, section."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import results_learnforget as lf  # noqa: E402

from unpatch import splits  # noqa: E402

PASSAGES = [f"passage {i} " + "word " * 40 for i in range(24)]  # the learned ones (limit 24) ...
UNSEEN = [f"unseen {i} " + "word " * 40 for i in range(6)]  # ... and the rest of the book
RETAIN = [f"retain {i} " + "news " * 30 for i in range(40)]
FORGET = SimpleNamespace(manifest=SimpleNamespace(coefficient=2.0))  # the forget patch (coefficient 2)


class FakeApplied:
    """Records which scale of the forget patch is on (the fakes below score from it)."""

    def __init__(self):
        self.on: list = []

    def apply(self, patch, scale=1.0):
        self.on.append((patch, scale))

    def revert(self):
        self.on = []
        return True

    def forget_scale(self):
        return next((sc for p, sc in self.on if p is FORGET), None), any(p == "learn" for p, _ in self.on)


def run_part(monkeypatch, tmp_path, score):
    """learn_forget_part with the build, the model and the scorers faked: `score(text, scale, learned)`
    is a passage's ROUGE-L; retain ppl rises with the scale."""
    applied = FakeApplied()
    recipe = SimpleNamespace(data=SimpleNamespace(forget=SimpleNamespace(source="book.txt", column=None, chunk_words=48, limit=24),
                                                  retain=SimpleNamespace(source="builtin:xsum", column="document", limit=100)),
                             eval=SimpleNamespace(options={"forget_recall": {"prompt_tokens": 32, "gen_tokens": 24}}))
    monkeypatch.setattr(lf, "_build", lambda s, work, book, control: (recipe, FORGET, "learn", ["x"], 1.0))
    texts = {"book.txt": PASSAGES + UNSEEN, "control.txt": UNSEEN, "builtin:xsum": ["trained"] * 100 + RETAIN}
    monkeypatch.setattr(lf, "load_metric_texts", lambda metric, source, *a: texts[Path(source).name])

    def recall(model, tok, xs, k, m):
        sc, learned = applied.forget_scale()
        r = [score(x, sc, learned) for x in xs]
        return {"rouge": r, "exact": [float(v == 1.0) for v in r], "ids": list(xs), "bleu": {"value": 1.0, "low": None, "high": None}}

    def retain(model, tok, xs, ml):
        sc, learned = applied.forget_scale()
        ppl = 30.0 * (1.5 if learned else 1.0) * (1 + 0.02 * (sc or 0))
        import math

        return {"nll": [math.log(ppl) * 10] * len(xs), "tokens": [10.0] * len(xs)}

    monkeypatch.setattr(lf, "recall_items", recall)
    monkeypatch.setattr(lf, "retain_items", retain)
    s = SimpleNamespace(quick=False, build_steps=None, max_retain_rise=0.05, passages=32)
    book, control = tmp_path / "book.txt", tmp_path / "control.txt"
    book.write_text("x")
    d = lf.learn_forget_part(s, tmp_path, SimpleNamespace(requires_grad_=lambda flag: None), None, applied, {}, book, control)
    return d


def test_the_dev_choice_ignores_test_passages(monkeypatch, tmp_path):
    lab = dict(zip(PASSAGES, splits.labels(PASSAGES, lambda t: (t,)), strict=True))

    def score(test_favours, dev_favours=1.5):
        def f(x, sc, learned):
            if not learned:
                return 0.1
            if sc is None or x not in lab:
                return 0.9 if x in lab else 0.1
            best = dev_favours if lab[x] == "dev" else test_favours
            return 0.1 + 0.1 * abs(sc - best)  # lowest ROUGE-L at the favoured scale
        return f

    a = run_part(monkeypatch, tmp_path, score(test_favours=0.5))
    b = run_part(monkeypatch, tmp_path, score(test_favours=2.0))
    assert a["dev"]["chosen_scale"] == b["dev"]["chosen_scale"] == 1.5  # the test passages never moved it ...
    assert a["test"]["forgotten"]["learned"]["rouge_l"]["value"] != b["test"]["forgotten"]["learned"]["rouge_l"]["value"]
    c = run_part(monkeypatch, tmp_path, score(test_favours=0.5, dev_favours=1.0))
    assert c["dev"]["chosen_scale"] == 1.0  # ... the dev ones do
    assert a["recommended_coefficient"] == 3.0 and c["recommended_coefficient"] == 2.0
    assert a["counts"]["dev"] == a["counts"]["test"] == 12 and a["counts"]["retain_dev"] == 20
    # every scale is measured on dev (ppl rises 2 % per unit of scale: all inside the 5 % budget)
    assert [r["scale"] for r in a["dev"]["rows"]] == list(lf.SCALES)
    json.dumps(a)  # JSON-able


def test_choose_scale_budget_and_ties():
    rows = [{"scale": 0.5, "rouge_l": 0.3, "ppl": 10.0}, {"scale": 1.0, "rouge_l": 0.2, "ppl": 10.4},
            {"scale": 2.0, "rouge_l": 0.1, "ppl": 11.0}]
    assert lf.choose_scale(rows, 10.0, 0.05) == 1.0  # 2.0 is lower but 10 % over the learned ppl
    assert lf.choose_scale(rows, 10.0, 0.2) == 2.0
    assert lf.choose_scale(rows, 5.0, 0.05) is None
    tie = [{"scale": 1.5, "rouge_l": 0.2, "ppl": 1.0}, {"scale": 1.0, "rouge_l": 0.2, "ppl": 1.0}]
    assert lf.choose_scale(tie, 1.0, 0.0) == 1.0


def test_removed_share_and_its_interval():
    base, learned = [0.1] * 12, [1.0] * 12
    forgotten = [0.1] * 6 + [1.0] * 6  # half of the passages forgotten
    r = lf.removed_share(base, learned, forgotten)
    assert r["value"] == pytest.approx(0.5) and r["low"] < 0.5 < r["high"]
    assert lf.removed_share(base, base, base)["value"] is None  # no gain: no share


def fake_dict(removed=0.85, control=0.11, ppl=30.5):
    ci = lambda v, w=0.05, n=12: {"value": v, "low": v - w, "high": v + w, "n": n}  # noqa: E731
    point = lambda lr, ctl, pp: {"learned": {"rouge_l": ci(lr), "exact": ci(lr / 2), "bleu": ci(lr * 100, 5)},  # noqa: E731
                                 "unseen": {"rouge_l": ci(0.11), "exact": ci(0.0)},
                                 "control": {"rouge_l": ci(ctl, 0.02), "exact": ci(0.0)}, "retain": {"ppl": ci(pp, 2.0, 20)}}
    test = {"base": point(0.13, 0.11, 30.0), "learned": point(1.0, 0.12, 180.0), "forgotten": point(0.2, control, ppl)}
    test["forgotten"]["learned"]["rouge_l"]["p"] = 0.0004
    rm = {"value": removed, "low": removed - 0.1, "high": removed + 0.05}
    return {"book": "alice.txt", "control": "pride.txt", "overrides": [], "quick": False, "coefficient": 2.0,
            "scales": [0.5, 1.0], "max_retain_rise": 0.05, "prompt_tokens": 32, "gen_tokens": 24,
            "counts": {"learned": 24, "dev": 12, "test": 12, "unseen": 32, "control": 32, "retain_dev": 20, "retain_test": 20},
            "split_rule": splits.RULE, "scale": 1.0, "recommended_coefficient": 2.0,
            "dev": {"learned": {"rouge_l": 1.0, "ppl": 170.0}, "chosen_scale": 1.0,
                    "rows": [{"scale": 0.5, "rouge_l": 0.9, "ppl": 100.0, "ppl_rise_pct": -41.2},
                             {"scale": 1.0, "rouge_l": 0.25, "ppl": 60.0, "ppl_rise_pct": -64.7}]},
            "test": test, "removed": rm, "verdict": lf.verdict(test, rm),
            "seconds": {"build": 265.0, "dev": 100.0, "test": 80.0, "total": 445.0}}


def test_verdict_flips_on_each_condition():
    assert fake_dict()["verdict"]["met"] is True and fake_dict()["verdict"]["reached"] is True
    assert "removed 85 [75, 90] % of the gain" in fake_dict()["verdict"]["measured"]
    assert fake_dict(removed=0.79)["verdict"]["checks"]["removed_ge_80pct"] is False
    assert fake_dict(removed=0.79)["verdict"]["met"] is False
    assert fake_dict(control=0.05)["verdict"]["checks"]["control_inside_base_ci"] is False
    assert fake_dict(ppl=50.0)["verdict"]["met"] is False
    none = fake_dict()
    none["test"]["base"]["control"]["rouge_l"]["low"] = None  # no interval: not "inside"
    assert lf.verdict(none["test"], none["removed"])["met"] is False


def test_section_renders_from_the_dict_alone():
    md = "\n".join(lf.learn_forget_section(json.loads(json.dumps(fake_dict())), 7, "##"))
    assert md.startswith("## 7. Learn, then forget")
    assert lf.learn_forget_section(fake_dict())[0].startswith("### 4c. Learn, then forget")
    assert "| 1 **chosen** | 2 | 0.250 | 60.00 | -64.7 % |" in md
    assert "| base | 0.130 [0.080, 0.180] |" in md and "0.200 [0.150, 0.250] (p < 0.001)" in md
    assert "**0.850 [0.750, 0.900]**" in md and "**reached**" in md and "Recommended coefficient (dev): **2**" in md
    missed = "\n".join(lf.learn_forget_section(fake_dict(ppl=60.0)))
    assert "**missed**" in missed and "retain ppl inside: no" in missed
    skipped = lf.learn_forget_section({"skipped": "no book (no ../shared/data)"})
    assert any("Not run: no book" in line for line in skipped)


def test_part_skips_without_a_book(tmp_path):
    d = lf.learn_forget_part(SimpleNamespace(), tmp_path, None, None, None, {}, None, None)
    assert "skipped" in d and "no ../shared/data" in d["skipped"]
    with contextlib.suppress(Exception):
        json.dumps(d)
