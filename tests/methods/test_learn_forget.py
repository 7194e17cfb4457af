"""Learn, then forget (recipe `learn:`, 2405.15152's copyright setting) on a tiny in-process model:
the learn patch is its own patch, the forget patch is trained on base + it and names it in its
lineage, and the card shows recall at base / learned / forgotten on learned, unseen and control
passages. Plus the forget_recall metric itself and the recipe's one-line errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, save_tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from unpatch.builder import build
from unpatch.errors import UnpatchError
from unpatch.evals import get_metric
from unpatch.evals.recall import bootstrap_interval
from unpatch.learn import removed_gain
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch
from unpatch.recipe import load_recipe

CONTENT = [w for w in WORDS if w not in ("<s>", "</s>")]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """The tiny llama with a larger init (0.2, not 0.02): at 0.02 its tied 32-wide embedding gives
    near-uniform logits that a 60-step LoRA cannot sharpen, so nothing could be memorised."""
    root = tmp_path_factory.mktemp("learn-models")
    save_tiny_llama(root / "llama", init=0.2)
    return root


def book(path: Path, seed: int, words: int) -> Path:
    rng = random.Random(seed)  # a random word sequence: nothing a tiny model can guess without learning it
    path.write_text(" ".join(rng.choice(CONTENT) for _ in range(words)) + "\n")
    return path


def learn_recipe(tmp: Path, models_dir: Path, kind: str = "lora", **extra) -> Path:
    book(tmp / "book.txt", 1, 12 * 16)  # 16 passages of 12 words: 8 learned, 8 unseen
    book(tmp / "control.txt", 2, 12 * 8)
    book(tmp / "retain.txt", 3, 12 * 8)
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"},
           "data": {"forget": {"source": "book.txt", "chunk_words": 12, "limit": 8},
                    "retain": {"source": "retain.txt", "chunk_words": 12}},
           "method": {"name": "ga_kl", "eps1": 1.0, "eps2": 0.0, "eps3": 1.0},
           "patch": {"kind": kind, "rank": 4, "alpha": 8, **({"target_modules": ["q_proj", "v_proj", "down_proj"]} if kind == "delta" else {})},
           "train": {"steps": 6, "lr": 0.02, "batch_size": 4, "max_length": 16},
           "learn": {"steps": 60, "lr": 0.02, "batch_size": 8, "rank": 8, "alpha": 16},
           "eval": {"metrics": ["forget_recall", "retain_nll"],
                    "options": {"forget_recall": {"control": str(tmp / "control.txt"), "passages": 8,
                                                  "prompt_tokens": 4, "gen_tokens": 6}}}}
    raw.update(extra)
    p = tmp / "copyright.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_learn_then_forget_card_shows_three_points(tmp_path, models_dir, kind):
    patch = build(learn_recipe(tmp_path, models_dir, kind), out=tmp_path / "p")
    learn = load_patch(tmp_path / "p-learn")
    assert learn.kind == "lora" and learn.manifest.method["name"] == "learn" and learn.lora_config["r"] == 8
    # the forget patch names the learn patch beneath it, and both hash the ORIGINAL base
    (parent,) = patch.manifest.lineage
    assert parent["role"] == "learn" and parent["patch_id"] == learn.patch_id
    base = AutoModelForCausalLM.from_pretrained(models_dir / "llama")
    params = dict(base.named_parameters())
    from unpatch.fingerprint import tensor_sha256

    assert all(tensor_sha256(params[n]) == h for n, h in patch.manifest.base.tensors.items())
    applied = Applied(base)
    applied.apply(learn)
    applied.apply(patch)  # stacks on the base without --force
    assert applied.revert()

    ev = patch.manifest.metrics["eval"]
    assert [v["label"] for v in ev["variants"]] == ["base", "learned", "forgotten"]
    base_v, learned_v, forgotten_v = (v["values"]["forget_recall"] for v in ev["variants"])
    # learning made the learned passages recallable; the forget patch took (some of) it away
    assert learned_v["learned_rouge_l"] > base_v["learned_rouge_l"] + 0.5, (base_v, learned_v)
    assert forgotten_v["learned_rouge_l"] < learned_v["learned_rouge_l"], (learned_v, forgotten_v)
    for split in ("learned", "unseen", "control"):
        assert learned_v[f"{split}/passages"] == 8
        assert learned_v[f"{split}/rouge_l_lo"] <= learned_v[f"{split}_rouge_l"] <= learned_v[f"{split}/rouge_l_hi"]
    share = patch.manifest.metrics["learn"]["forget_recall.learned_rouge_l"]
    gain = learned_v["learned_rouge_l"] - base_v["learned_rouge_l"]
    assert share["removed"] == pytest.approx((learned_v["learned_rouge_l"] - forgotten_v["learned_rouge_l"]) / gain)
    card = (tmp_path / "p" / "README.md").read_text()
    assert "| base | learned | forgotten |" in card
    for key in ("learned_rouge_l", "learned_bleu", "learned_exact", "unseen_rouge_l", "control_rouge_l", "control_exact"):
        assert f"| {key} |" in card
    assert "p-learn" in card  # the lineage section names the learn patch


def test_resume_reuses_the_learn_patch_and_finishes_an_interrupted_evaluation(tmp_path, models_dir):
    r = learn_recipe(tmp_path, models_dir)
    first = build(r, out=tmp_path / "p", run_eval=False)
    learn_id = load_patch(tmp_path / "p-learn").patch_id
    (tmp_path / "p2-learn").mkdir()
    with pytest.raises(UnpatchError, match=r"p2-learn: already exists"):  # before any training
        build(r, out=tmp_path / "p2", run_eval=False)
    import shutil

    shutil.rmtree(tmp_path / "p")
    again = build(r, out=tmp_path / "p", run_eval=False, resume=True)  # the learn patch is reused as it is
    assert load_patch(tmp_path / "p-learn").patch_id == learn_id
    assert again.patch_id == first.patch_id  # deterministic: the same forget patch on the same learn patch
    assert "eval" not in again.manifest.metrics
    # a kill during the evaluation: --resume measures the three points on a fresh base load, no training
    done = build(r, out=tmp_path / "p", resume=True)
    assert done.patch_id == first.patch_id
    assert [v["label"] for v in done.manifest.metrics["eval"]["variants"]] == ["base", "learned", "forgotten"]
    assert "forget_recall.learned_rouge_l" in done.manifest.metrics["learn"]
    shutil.rmtree(tmp_path / "p")
    with pytest.raises(UnpatchError, match=r"p-learn: a learn patch from other settings or data"):
        build(r, out=tmp_path / "p", run_eval=False, resume=True, overrides=["learn.steps=3"])


def test_learn_needs_forget_data_and_rejects_unknown_keys(tmp_path, models_dir):
    r = learn_recipe(tmp_path, models_dir)
    with pytest.raises(UnpatchError, match=r"copyright.yaml: learn.stpes: .*"):
        load_recipe(r, ["learn.stpes=3"])
    raw = yaml.safe_load(r.read_text())
    raw["data"] = {"pairs": "x.csv"}
    raw["method"] = {"name": "pcgu"}
    raw["patch"] = {"kind": "delta"}
    r.write_text(yaml.safe_dump(raw))
    with pytest.raises(UnpatchError, match=r"copyright.yaml: learn: needs data.forget"):
        load_recipe(r)


def test_forget_recall_splits_and_errors(tmp_path):
    torch.manual_seed(0)
    from conftest import BUILD_CONFIGS

    model = AutoModelForCausalLM.from_config(BUILD_CONFIGS["llama"]()).eval()
    tok = tiny_tokenizer()
    b = book(tmp_path / "b.txt", 1, 12 * 10)
    fn = get_metric("forget_recall")
    out = fn(model, tok, source=str(b), chunk_words=12, limit=4, passages=3, prompt_tokens=4, gen_tokens=6)
    assert out["learned/passages"] == 3 and out["unseen/passages"] == 3 and not any(k.startswith("control") for k in out)
    assert 0 <= out["learned_rouge_l"] <= 1 and 0 <= out["unseen_exact"] <= 1
    everything = fn(model, tok, source=str(b), chunk_words=12, passages=3, prompt_tokens=4, gen_tokens=6)
    assert not any(k.startswith("unseen") for k in everything)  # no limit: every passage counts as learned
    with pytest.raises(UnpatchError, match=r"forget_recall: no passage of .* has more than 40 tokens"):
        fn(model, tok, source=str(b), chunk_words=12, prompt_tokens=40)
    with pytest.raises(UnpatchError, match=r"forget_recall: unknown option 'pasages'"):
        fn(model, tok, source=str(b), pasages=3)


def test_bootstrap_interval_and_removed_gain():
    lo, hi = bootstrap_interval([0.0, 1.0] * 20)
    assert 0.3 < lo < 0.5 < hi < 0.7
    assert bootstrap_interval([0.25] * 5) == (0.25, 0.25)
    res = {"variants": [{"label": lab, "values": {"forget_recall": {"learned_rouge_l": v, "learned/passages": 4}}}
                        for lab, v in (("base", 0.1), ("learned", 0.9), ("forgotten", 0.3))]}
    share = removed_gain(res)["forget_recall.learned_rouge_l"]
    assert share["removed"] == pytest.approx(0.75) and "forget_recall.learned/passages" not in removed_gain(res)
