"""The papers' settings (recipes/paper/): they validate, the method options they need do what the
papers say (masked_ga on lexicon words, PCGU re-ranked on the first differing token with
advantaged-only updates, ga_kl on answer tokens with K random answers), the project's own pronoun
pairs differ in one word, and (marked real) every preset builds on SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUILD_CONFIGS, save_tiny_llama, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from unpatch.builder import build
from unpatch.errors import UnpatchError
from unpatch.recipe import load_recipe
from unpatch.sources import Data, load_pairs

PRESETS = sorted((Path(__file__).parents[2] / "recipes" / "paper").glob("*.yaml"))


def test_every_paper_setting_has_a_preset_that_validates():
    from typer.testing import CliRunner

    from unpatch.cli import app

    names = {p.stem for p in PRESETS}
    assert {"masked-ga-2407.16951", "task-vector-2406.13551", "pcgu-2406.13551", "harmful-2405.15152",
            "copyright-2405.15152"} <= names
    res = CliRunner().invoke(app, ["validate", *map(str, PRESETS)])
    assert res.exit_code == 0, res.output
    assert res.output.count(": ok (") == len(PRESETS)
    for p in PRESETS:  # each names the paper's settings and where ours differs
        text = p.read_text()
        assert "The paper, as written" in text and "must differ" in text


def test_pronoun_pairs_differ_in_exactly_one_word():
    from unpatch.methods.masked_ga import pair_spans

    pairs = load_pairs("builtin:pronoun_pairs")
    assert len(pairs) == 200 and len(set(pairs)) == 200
    for more, less in pairs:
        sm, sl = pair_spans(more, less)
        assert len(sm) == len(sl) == 1
        assert (more[slice(*sm[0])], less[slice(*sl[0])]) in (("he", "she"), ("his", "her"))


# ------------------------------------------------------------------------------ masked_ga: lexicon


def group_tokenizer() -> PreTrainedTokenizerFast:
    words = "<unk> <s> </s> the women and muslims are here black cat sat he said".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("groups, want", [([], {"women", "muslims", "black"}), (["gender"], {"women"}),
                                          (["religion", "race"], {"muslims", "black"})])
def test_masked_ga_lexicon_targets_the_group_words_only(groups, want):
    from unpatch.methods.masked_ga import MaskedGAConfig, examples

    tok = group_tokenizer()
    cfg = MaskedGAConfig(targets="lexicon", lexicon=groups)
    texts = ["the women and muslims are here", "the black cat sat", "he said the cat sat"]
    items = examples(cfg, Data(forget=texts), tok, 32, "r.yaml")
    got = {tok.convert_ids_to_tokens(t) for x in items for t in x["labels"] if t != -100}
    assert got == want


def test_masked_ga_lexicon_errors_name_the_key():
    from pydantic import ValidationError

    from unpatch.methods.masked_ga import MaskedGAConfig, examples

    with pytest.raises(ValidationError, match="`lexicon` is only used with targets: lexicon"):
        MaskedGAConfig(targets="pairs", lexicon=["gender"])
    with pytest.raises(ValidationError, match="lexicon"):
        MaskedGAConfig(targets="lexicon", lexicon=["age"])
    with pytest.raises(UnpatchError, match=r"r.yaml: method.targets: no target token .* method.lexicon groups"):
        examples(MaskedGAConfig(targets="lexicon"), Data(forget=["the cat sat"]), group_tokenizer(), 32, "r.yaml")


# ------------------------------------------------------------------------------ ga_kl: answers


def ga_kl_context(tmp: Path, models_dir: Path, **params):
    from unpatch.methods import Context
    from unpatch.methods.ga_kl import GAKLConfig
    from unpatch.sources import load_data

    (tmp / "forget.txt").write_text("the cat sat\nA: on the mat\nthe dog ran far and the fox ran\n")
    (tmp / "retain.txt").write_text("he is very good\nshe was quick\n")
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.json", "retain": "retain.txt"},
           "method": {"name": "ga_kl", **params}, "train": {"steps": 2, "lr": 0.01, "batch_size": 2, "max_length": 16}}
    (tmp / "forget.json").write_text('["the cat sat\\nA: on the mat", "the dog ran far and the fox ran"]')
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp / "r.yaml")
    cfg = GAKLConfig.model_validate(recipe.method.params)
    return Context(None, tiny_tokenizer(), recipe, cfg, load_data(recipe))


def test_ga_kl_answer_only_ascends_on_the_answer_tokens(tmp_path, models_dir):
    from unpatch.methods.ga_kl import Streams

    tok = tiny_tokenizer()
    plain = Streams(ga_kl_context(tmp_path, models_dir), ga_kl_context(tmp_path, models_dir).config)[0]["forget"]
    ctx = ga_kl_context(tmp_path, models_dir, answer_only=True)
    s = Streams(ctx, ctx.config)
    b = s[0]["forget"]
    assert torch.equal(b["input_ids"], plain["input_ids"])  # the same tokens, fewer of them scored
    for r, j in enumerate(s.forget.indices(0)):
        ids = [t for t, m in zip(b["input_ids"][r].tolist(), b["attention_mask"][r].tolist(), strict=True) if m]
        scored = [t for t, lab in zip(ids, b["labels"][r].tolist(), strict=False) if lab != -100]
        text = tok.decode(scored)
        # "the cat sat\nA: on the mat": answer "on the mat"; a plain text: its second half (prompt_fraction 0.5)
        assert text == ("on the mat" if j == 0 else "and the fox ran"), (j, text)
        assert (plain["labels"][r] != -100).sum() > (b["labels"][r] != -100).sum()


def test_ga_kl_random_answers_draws_k_per_prompt(tmp_path, models_dir):
    from unpatch.methods.ga_kl import Streams

    one = ga_kl_context(tmp_path, models_dir)
    three = ga_kl_context(tmp_path, models_dir, random_answers=3)
    r1, r3 = Streams(one, one.config)[1]["random"], Streams(three, three.config)[1]["random"]
    assert r1["input_ids"].shape[0] == 2 and r3["input_ids"].shape[0] == 6
    # every row scores its answer only: the prompt part is context
    s = Streams(three, three.config)
    for r, j in enumerate(k for k in s.forget.indices(1) for _ in range(3)):
        assert (r3["labels"][r, : len(s.prompts[j])] == -100).all() and (r3["labels"][r] != -100).any()


# ------------------------------------------------------------------------------ pcgu: the paper's loop


@pytest.fixture(scope="module")
def sharp_models(tmp_path_factory) -> Path:
    """The tiny llama with init 0.2 (not 0.02): at 0.02 its logits are near uniform whatever a few
    rows do, so no update could move a log-probability measurably."""
    root = tmp_path_factory.mktemp("sharp")
    save_tiny_llama(root / "llama", init=0.2)
    return root


def pcgu_recipe(tmp: Path, models_dir: Path, **method) -> Path:
    pairs = [("he is very bad", "she is very bad"), ("he was a lazy dog", "she was a lazy dog"),
             ("the cat is good", "the dog is good"), ("he ran far", "she ran far")]
    (tmp / "pairs.csv").write_text("sent_more,sent_less\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"pairs": "pairs.csv"},
           "method": {"name": "pcgu", "k_percent": 10, **method}, "patch": {"kind": "delta", "target_modules": ["q_proj", "down_proj"]},
           "train": {"steps": 3, "lr": 0.01, "batch_size": 4, "max_length": 16}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "r.yaml"


def test_first_diff_scores_the_differing_token_given_the_prefix():
    from unpatch.methods.pcgu import PairBatches
    from unpatch.methods.pcgu_paper import DiffPairs, first_diffs, pair_scores

    assert first_diffs([[1, 5, 6, 7], [1, 5], [1, 4]], [[1, 5, 9, 7], [1, 5], [2, 4]]) == [2, None, None]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BUILD_CONFIGS["llama"]()).eval()
    pb = PairBatches([("the cat is good", "the dog is good"), ("he ran far", "she ran far")], tiny_tokenizer(), 16, 2, 0)
    diffs = first_diffs(pb.more, pb.less)
    assert diffs == [2, 1]  # after [BOS, the] / after [BOS]
    batch = DiffPairs(pb, diffs).take([0, 1])
    with torch.no_grad():
        got = pair_scores(model, batch, "first_diff")
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), -1)
    ids = batch["input_ids"]
    want = torch.stack([logp[r, d - 1, ids[r, d]] for r, d in enumerate(batch["diff"].tolist())])
    assert torch.allclose(got, want, atol=1e-5)
    assert ids[0, 2] != ids[2, 2] and torch.equal(ids[0, :2], ids[2, :2])  # shared prefix, then the differing word


def test_pcgu_reranked_advantaged_lowers_the_preferred_side_in_few_rows(tmp_path, sharp_models):
    models_dir = sharp_models
    from transformers import AutoTokenizer

    from unpatch.methods.pcgu import PairBatches
    from unpatch.methods.pcgu_paper import DiffPairs, first_diffs, pair_scores, sides
    from unpatch.patch.apply import Applied

    patch = build(pcgu_recipe(tmp_path, models_dir, rerank_every=1, score="first_diff", update="advantaged"),
                  out=tmp_path / "p", run_eval=False)
    assert "re-ranked" in patch.manifest.notes[1] and "3 times" in patch.manifest.notes[1], patch.manifest.notes
    base = AutoModelForCausalLM.from_pretrained(models_dir / "llama").eval()
    rows = {n: base.get_parameter(n).shape[0] for n in patch.manifest.base.tensors}
    changed = sum(patch.tensors[f"{n}::rows"].numel() if f"{n}::rows" in patch.tensors else rows[n] for n in rows)
    assert 0 < changed <= 3 * -(-sum(rows.values()) // 10)  # at most 3 re-rankings x the top 10 %
    pairs = load_pairs(str(tmp_path / "pairs.csv"))
    pb = PairBatches(pairs, AutoTokenizer.from_pretrained(models_dir / "llama"), 16, 4, 0)
    batch = DiffPairs(pb, first_diffs(pb.more, pb.less)).take(list(range(len(pairs))))
    with torch.no_grad():
        before = pair_scores(base, batch, "first_diff")
        adv_before, _ = sides(before, "advantaged")
        Applied(base).apply(patch)
        after = pair_scores(base, batch, "first_diff")
    chosen = (before[:4] >= before[4:])  # the side the base preferred, per pair
    adv_after = torch.where(chosen, after[:4], after[4:])
    assert adv_after.mean() < adv_before.mean() - 0.05, (adv_before, adv_after)


def test_pcgu_rerank_limits_are_one_line_errors(tmp_path, models_dir):
    r = pcgu_recipe(tmp_path, models_dir, rerank_every=2)
    with pytest.raises(UnpatchError, match=r"r.yaml: train.weight_decay: must be 0 with method.rerank_every"):
        build(r, out=tmp_path / "a", run_eval=False, overrides=["train.weight_decay=0.1"])
    with pytest.raises(UnpatchError, match=r"r.yaml: train.checkpoint_every: must be a multiple of method.rerank_every \(2\)"):
        build(r, out=tmp_path / "b", run_eval=False, overrides=["train.checkpoint_every=3"])
    with pytest.raises(UnpatchError, match=r"r.yaml: method.score: must be 'sentence' or 'first_diff' \(got 'token'\)"):
        load_recipe(r, ["method.score=token"])


# ------------------------------------------------------------------------------ the real model


@pytest.mark.real
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_on_smollm2(tmp_path, preset):
    small = ["train.steps=1", "train.batch_size=1", "train.max_length=24"]  # the cheapest build that runs every stage
    if "copyright" in preset.stem:
        small += ["learn.steps=1", "learn.batch_size=1"]
    p = build(preset, out=tmp_path / "p", overrides=small, run_eval=False)
    assert p.manifest.method["name"] == load_recipe(preset).method.name and p.manifest.base.tensors
    if "copyright" in preset.stem:
        assert p.manifest.lineage[0]["role"] == "learn" and (tmp_path / "p-learn" / "unpatch.json").is_file()


def test_pcgu_static_first_diff_changes_exactly_the_ranked_rows(tmp_path, sharp_models):
    """rerank_every 0 with the paper's score and update: ranked once from the base on the first
    differing token, so the patch changes exactly the top-k % rows of THAT ranking."""
    import math

    from transformers import AutoTokenizer

    from unpatch.builder import target_weights
    from unpatch.methods.pcgu import PairBatches, rank_rows
    from unpatch.methods.pcgu_paper import DiffPairs, first_diffs
    from unpatch.methods.pcgu_rows import row_partitions, select_rows

    patch = build(pcgu_recipe(tmp_path, sharp_models, score="first_diff", update="advantaged", k_percent=20),
                  out=tmp_path / "p", run_eval=False)
    model = AutoModelForCausalLM.from_pretrained(sharp_models / "llama").eval()
    model.requires_grad_(False)
    for p in target_weights(model, ["q_proj", "down_proj"]).values():
        p.requires_grad_(True)
    parts = row_partitions(model)
    pb = PairBatches(load_pairs(str(tmp_path / "pairs.csv")), AutoTokenizer.from_pretrained(sharp_models / "llama"), 16, 4, 0)
    pairs = DiffPairs(pb, first_diffs(pb.more, pb.less))
    masks = select_rows(rank_rows(model, pairs, parts, len(pairs), 4, "first_diff"), 20)
    total = sum(m.numel() for m in masks.values())
    changed = {}
    for n in masks:
        rows = torch.zeros(masks[n].numel(), dtype=torch.bool)
        if f"{n}::rows" in patch.tensors:
            rows[patch.tensors[f"{n}::rows"]] = True
        elif n in patch.tensors:
            rows = patch.tensors[n].ne(0).any(dim=1)
        changed[n] = rows
    assert sum(int(m.sum()) for m in masks.values()) == math.ceil(total * 20 / 100)
    assert all(torch.equal(changed[n], masks[n]) for n in masks)
    assert "score first_diff" in patch.manifest.notes[1] and "update advantaged" in patch.manifest.notes[1]
