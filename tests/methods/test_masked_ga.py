"""masked_ga: the three target finders (pair diff, [[marked]] spans, word list), labels that are
-100 everywhere but on target tokens, the no-target error, and the shipped bias recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import FORGET, tiny_tokenizer

from unpatch.builder import build
from unpatch.errors import UnpatchError
from unpatch.methods.masked_ga import (
    MaskedBatches,
    MaskedGAConfig,
    examples,
    label_tokens,
    marked_spans,
    pair_spans,
    word_list_spans,
    words_pattern,
)
from unpatch.recipe import load_recipe
from unpatch.sources import Data, load_data

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def words_at(text: str, spans) -> list[str]:
    return [text[a:b] for a, b in spans]


def targets(tok, text: str, spans, max_length: int = 32) -> list[str]:
    """The tokens labelled as targets, as strings."""
    ((ids, labels),) = label_tokens(tok, [text], [spans], max_length)
    assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels, strict=True) if lab != -100]


# ------------------------------------------------------------------------------ finders


def test_pair_diff_gives_exactly_the_differing_words():
    more, less = "he is very bad", "she is very bad"
    sm, sl = pair_spans(more, less)
    assert words_at(more, sm) == ["he"] and words_at(less, sl) == ["she"]
    more, less = "the dog was very lazy", "the cat was lazy"  # a replacement and a deletion
    sm, sl = pair_spans(more, less)
    assert words_at(more, sm) == ["dog", "very"] and words_at(less, sl) == ["cat"]
    assert pair_spans("She is bad.", "she is bad.") == ([], [])  # case is not a difference
    more = "Poor people are lazy, she said."  # punctuation is a word of its own
    assert words_at(more, pair_spans(more, "Rich people are lazy, she said.")[0]) == ["Poor"]


def test_pair_diff_labels_only_the_differing_tokens():
    tok = tiny_tokenizer()
    sm, sl = pair_spans("the dog was lazy", "the cat was quick")
    assert targets(tok, "the dog was lazy", sm) == ["dog", "lazy"]
    assert targets(tok, "the cat was quick", sl) == ["cat", "quick"]
    # a target at the very start still gets a context: the BOS token is put in front; tokens
    # after the last target are cut (causal: they change no target's loss)
    ((ids, labels),) = label_tokens(tok, ["he was bad"], [pair_spans("he was bad", "she was bad")[0]], 16)
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "he"] and labels == [-100, ids[1]]


def test_marked_spans_are_stripped_and_located():
    clean, spans = marked_spans("the [[cat]] sat on [[the mat]]")
    assert clean == "the cat sat on the mat" and words_at(clean, spans) == ["cat", "the mat"]
    assert targets(tiny_tokenizer(), clean, spans) == ["cat", "the", "mat"]
    assert marked_spans("no marks [here]") == ("no marks [here]", [])


def test_word_list_matches_whole_words_case_insensitively():
    pat = words_pattern(["dog", "lazy  dog", "She"])
    text = "The Lazy dog saw a hotdog, dogs and a dog; she ran."
    assert words_at(text, word_list_spans(text, pat)) == ["Lazy dog", "dog", "she"]
    assert targets(tiny_tokenizer(), "the lazy dog and she ran", word_list_spans("the lazy dog and she ran", pat)) == ["lazy", "dog", "she"]


def test_multi_token_words_are_labelled_whole_with_a_bpe_tokenizer():
    """Byte-level BPE: leading-space tokens and words split into pieces map through offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(FORGET * 5, trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>")
    text = "the nurse is very bad"  # "nurse" is unseen: several byte pieces
    ((ids, labels),) = label_tokens(tok, [text], [pair_spans(text, "the doctor is very bad")[0]], 32)
    picked = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert picked.strip() == "nurse" and sum(lab != -100 for lab in labels) > 1


# ------------------------------------------------------------------------------ labels and batches


def test_labels_are_ignored_everywhere_but_target_tokens():
    tok = tiny_tokenizer()
    cfg = MaskedGAConfig(targets="pairs", descent_weight=1.0)
    data = Data(pairs=[("he is very bad", "she is very bad"), ("the quick brown fox jumps", "the lazy brown fox jumps"),
                       ("people are bad", "people are good")])
    items = examples(cfg, data, tok, 16, "r.yaml")
    b = MaskedBatches(items, batch_size=3, seed=0, pad_id=tok.eos_token_id).collate(items)
    for part, want in ((b, [["he"], ["quick"], ["bad"]]), (b["less"], [["she"], ["lazy"], ["good"]])):
        ids, labels = part["input_ids"], part["labels"]
        assert ids.shape == labels.shape
        keep = labels != -100
        assert torch.equal(labels[keep], ids[keep])  # a target's label is its own token
        assert [tok.convert_ids_to_tokens(ids[r][keep[r]].tolist()) for r in range(3)] == want
        assert not keep[part["attention_mask"] == 0].any()  # never on padding


def test_batches_depend_only_on_seed_and_index():
    tok = tiny_tokenizer()
    items = examples(MaskedGAConfig(targets="words", words=["dog", "cat"]), Data(forget=FORGET), tok, 16, "r.yaml")
    a, b = MaskedBatches(items, 2, 3, 0), MaskedBatches(items, 2, 3, 0)
    for i in (5, 0, 9):
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("input_ids", "labels"))


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("cfg", "data", "hint"), [
    (MaskedGAConfig(targets="pairs"), Data(pairs=[("a cat", "A cat"), ("the dog", "the dog")]), "identical"),
    (MaskedGAConfig(targets="marked"), Data(forget=FORGET), "[[word]]"),
    (MaskedGAConfig(targets="words", words=["zebra"]), Data(forget=FORGET), "method.words"),
])
def test_no_target_token_is_a_one_line_error(cfg, data, hint):
    with pytest.raises(UnpatchError) as e:
        examples(cfg, data, tiny_tokenizer(), 16, "r.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("r.yaml: method.targets: no target token") and hint in msg


def test_truncated_targets_do_not_count():
    with pytest.raises(UnpatchError, match="no target token"):
        examples(MaskedGAConfig(targets="marked"), Data(forget=["the cat sat on the [[mat]]"]), tiny_tokenizer(), 3, "r.yaml")


def test_missing_data_role_is_named():
    with pytest.raises(UnpatchError, match=r"data\.pairs: required by method masked_ga with targets: pairs"):
        examples(MaskedGAConfig(), Data(forget=FORGET), tiny_tokenizer(), 16, "r.yaml")


@pytest.mark.parametrize(("params", "msg"), [
    ({"targets": "words"}, "method: targets: words needs a non-empty `words: [...]` list"),
    ({"targets": "pairs", "words": ["x"]}, "method: `words` is only used with targets: words"),
    ({"descent_weight": -1}, "method.descent_weight: must be >= 0"),
    ({"targets": "marked", "descent_weight": 1}, "descent_weight and max_diff_words only apply to targets: pairs"),
    ({"targets": "spans"}, "method.targets: must be 'pairs', 'marked', 'words' or 'lexicon'"),
    ({"target": "pairs"}, "method.target: unknown key. Did you mean: targets?"),
])
def test_config_errors_name_the_recipe_key(tmp_path, params, msg):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"data": {"pairs": "p.csv"}, "method": {"name": "masked_ga", **params}}))
    with pytest.raises(UnpatchError) as e:
        load_recipe(p)
    assert msg in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ build + recipes


def test_marked_and_words_builds_raise_their_objective(tmp_path, models_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unpatch.methods.masked_ga import target_nll
    from unpatch.patch.apply import Applied

    (tmp_path / "forget.txt").write_text("the [[lazy]] dog\nshe is very [[bad]]\n[[he]] was a bad dog\npeople are [[good]]\n")
    for method in ({"targets": "marked"}, {"targets": "words", "words": ["lazy", "bad", "he"]}):
        raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"},
               "method": {"name": "masked_ga", **method}, "patch": {"kind": "delta"},
               "train": {"steps": 5, "lr": 0.02, "batch_size": 2, "max_length": 16}}
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump(raw))
        patch = build(p, out=tmp_path / "patch", overwrite=True)
        recipe = load_recipe(p)
        data = load_data(recipe)
        model = AutoModelForCausalLM.from_pretrained(models_dir / "llama").eval()
        tok = AutoTokenizer.from_pretrained(models_dir / "llama")
        before = target_nll(model, tok, data, recipe)
        Applied(model).apply(patch, 1.0)
        assert target_nll(model, tok, data, recipe) > before, method
        assert "examples have target tokens" in patch.manifest.notes[-1]


@pytest.mark.parametrize("name", ["gender", "race", "religion"])
def test_bias_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.method.name == "masked_ga"
    data = load_data(recipe)
    role = MaskedGAConfig.model_validate(recipe.method.params).role
    assert getattr(data, role)
    # learn from one data set, measure on another: never from CrowS-Pairs (the evaluation set)
    assert "crows" not in getattr(recipe.data, role).source
