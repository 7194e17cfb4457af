"""ga_kl and npo: their loss terms against hand-computed values, their configs, and the recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FORGET, tiny_model, tiny_tokenizer

from unpatch.batches import Batches
from unpatch.errors import UnpatchError
from unpatch.methods import Context
from unpatch.methods.ga import nll
from unpatch.methods.ga_kl import Streams, kl_to_reference, make_reference, split_prompt
from unpatch.methods.npo import NPOConfig, make_loss, npo_loss, reference_logprobs, sequence_logprobs
from unpatch.recipe import load_recipe
from unpatch.sources import load_data

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
RETAIN = ["Q: is the fox quick\nA: the fox is very quick", "Q: who sat\nA: the cat sat on the mat", "a good dog ran far"]


def lora(model):
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0, init_lora_weights=True))  # B = 0: starts as the base


def batch(texts=FORGET, n=4):
    tok = tiny_tokenizer()
    return Batches.from_texts(texts, tok, 16, n, seed=0, where="test")


def ascend(model, b, lr=0.05):
    loss = -nll(model, b)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


# ------------------------------------------------------------------------------ ga_kl


def test_kl_is_zero_at_the_start_and_positive_after_a_step_lora():
    model = lora(tiny_model("llama"))
    ref = make_reference(model, "lora")
    retain = batch()[0]
    assert kl_to_reference(model, ref, retain).item() == 0.0  # adapter B = 0: current == reference exactly
    ascend(model, batch()[1])
    kl = kl_to_reference(model, ref, retain)
    assert kl.item() > 0 and kl.requires_grad  # the reference did not move: it is the adapter-off model


def test_kl_reference_is_a_frozen_copy_for_delta():
    model = tiny_model("llama")
    ref = make_reference(model, "delta")
    retain = batch()[0]
    assert kl_to_reference(model, ref, retain).item() == 0.0
    ascend(model, batch()[1])
    assert kl_to_reference(model, ref, retain).item() > 0


@torch.no_grad()
def test_kl_matches_the_definition():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    b = batch()[0]
    kl = kl_to_reference(model, lambda ids, mask: other(input_ids=ids, attention_mask=mask).logits, b)
    p = torch.log_softmax(other(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
    q = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
    per_token = (p.exp() * (p - q)).sum(-1)
    m = b["attention_mask"].float()
    assert kl.item() == pytest.approx(float((per_token * m).sum() / m.sum()), rel=1e-5)


def test_split_prompt():
    assert split_prompt("Q: who sat\nA: the cat", "\nA:") == ("Q: who sat\nA:", "the cat")
    assert split_prompt("no marker here", "\nA:") is None
    assert split_prompt("Q: empty\nA:  ", "\nA:") is None
    assert split_prompt("Q: x\nA: y", "") is None


def _context(tmp_path: Path, method: dict, retain=True) -> Context:
    (tmp_path / "f.txt").write_text("\n".join(FORGET))
    (tmp_path / "r.txt").write_text("\n".join(t.replace("\n", " | ") for t in RETAIN))  # one per line
    data = {"forget": "f.txt", **({"retain": "r.txt"} if retain else {})}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"data": data, "method": method, "train": {"batch_size": 4, "max_length": 16}}))
    recipe = load_recipe(p)
    from unpatch.methods import get_method

    cfg = get_method(method["name"]).config.model_validate(recipe.method.params)
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    return Context(tiny_model("llama"), tok, recipe, cfg, load_data(recipe))


def test_random_answer_pairs_score_only_the_answer(tmp_path):
    ctx = _context(tmp_path, {"name": "ga_kl", "answer_marker": " | A:"})
    s = Streams(ctx, ctx.config)
    b = s[3]
    forget_ids = [s.forget.seqs[j] for j in s.forget.indices(3)]
    for r, ids in enumerate(forget_ids):
        n = len(s.prompts[s.forget.indices(3)[r]])
        assert n == math.ceil(len(ids) * 0.5)  # plain text: its first half is the prompt
        assert b["random"]["input_ids"][r, :n].tolist() == ids[:n]
        assert (b["random"]["labels"][r, :n] == -100).all()
        answer = b["random"]["labels"][r, n:][b["random"]["labels"][r, n:] != -100].tolist()
        assert answer in s.answers  # a whole retain answer follows the prompt
    again = Streams(ctx, ctx.config)[3]
    assert torch.equal(again["random"]["input_ids"], b["random"]["input_ids"])  # a pure function of (seed, i)
    tok = ctx.tokenizer
    assert tok(" the fox is very quick", add_special_tokens=False)["input_ids"] in s.answers  # split at the marker


# ------------------------------------------------------------------------------ npo


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_npo_loss_at_the_reference_is_2_over_beta_log_2(beta):
    logp = torch.tensor([-12.0, -3.5, -40.0])
    assert npo_loss(logp, logp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    ref = torch.tensor([-11.0, -5.0, -38.0])  # and elsewhere, by hand: -(2/b) mean log(1 / (1 + e^{b (logp - ref)}))
    by_hand = -(2 / beta) * sum(math.log(1 / (1 + math.exp(beta * (a - r)))) for a, r in zip(logp.tolist(), ref.tolist(), strict=True)) / 3
    assert npo_loss(logp, ref, beta).item() == pytest.approx(by_hand, rel=1e-6)


def test_npo_loss_of_a_fresh_lora_model_is_2_over_beta_log_2():
    model = lora(tiny_model("llama"))
    b = batch()[0]
    loss, metrics = make_loss(NPOConfig(beta=0.3, alpha=0), None)(model, {"forget": b, "idx": [], "retain": None})
    assert loss.item() == pytest.approx(2 / 0.3 * math.log(2), rel=1e-6) and metrics["log_ratio"] == 0.0
    loss.backward()  # the gradient is gradient ascent's, scaled: it lowers the forget likelihood
    before = sequence_logprobs(model, b)[0].sum().item()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.05)
    assert sequence_logprobs(model, b)[0].sum().item() < before


def test_npo_delta_reference_table_matches_the_model():
    model = tiny_model("llama")
    stream = batch()
    table = reference_logprobs(model, stream)
    assert table.shape == (len(stream.seqs),)
    b, idx = stream[1], stream.indices(1)
    loss, _ = make_loss(NPOConfig(beta=0.5, alpha=0), table)(model, {"forget": b, "idx": idx, "retain": None})
    assert loss.item() == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)  # batch padding differs: float noise only


def test_npo_needs_retain_when_alpha_is_positive(tmp_path):
    from unpatch.methods.npo import npo

    ctx = _context(tmp_path, {"name": "npo", "alpha": 1.0}, retain=False)
    with pytest.raises(UnpatchError, match=r"data.retain: required by method 'npo' when method.alpha > 0"):
        npo(ctx)


# ------------------------------------------------------------------------------ configs and recipes


@pytest.mark.parametrize(("method", "message"), [
    ("{name: npo, beta: 0}", "method.beta: must be > 0 (got 0)"),
    ("{name: npo, beta: -1}", "method.beta: must be > 0 (got -1)"),
    ("{name: npo, alpha: -0.5}", "method.alpha: must be >= 0 (got -0.5)"),
    ("{name: npo, betta: 1}", "method.betta: unknown key. Did you mean: beta?"),
    ("{name: ga_kl, eps2: -1}", "method.eps2: must be >= 0 (got -1)"),
    ("{name: ga_kl, prompt_fraction: 1}", "method.prompt_fraction: must be < 1 (got 1)"),
    ("{name: ga_kl, eps1: 0, eps2: 0, eps3: 0}", "method: eps1, eps2 and eps3 are all 0, so nothing would be trained"),
])
def test_config_errors_name_the_key(tmp_path, method, message):
    (tmp_path / "f.txt").write_text("a b c\n")
    p = tmp_path / "x.yaml"
    p.write_text(f"data: {{forget: f.txt, retain: f.txt}}\nmethod: {method}\n")
    with pytest.raises(UnpatchError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: {message}") and "\n" not in str(e.value)


def test_ga_kl_needs_retain(tmp_path):
    (tmp_path / "f.txt").write_text("a b c\n")
    p = tmp_path / "x.yaml"
    p.write_text("data: {forget: f.txt}\nmethod: ga_kl\n")
    with pytest.raises(UnpatchError, match=r"data.retain: required by method 'ga_kl'"):
        load_recipe(p)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path, tmp_path):
    """Keys, method parameters and data of every shipped recipe, offline. A data file the USER
    supplies (a relative path not in the repo, e.g. copyright.yaml's book) is replaced by a
    stand-in through `--set`, exactly as a user would point the recipe at their own file."""
    raw = yaml.safe_load(path.read_text())
    overrides = []
    for role, src in (raw.get("data") or {}).items():
        s = src["source"] if isinstance(src, dict) else src
        assert not s.startswith("hub:"), f"{path.name}: data.{role} needs the network; ship offline defaults"
        if not s.startswith("builtin:") and not (path.parent / s).exists():
            stand_in = tmp_path / Path(s).name
            stand_in.write_text(" ".join(f"word{i}" for i in range(5000)))
            overrides.append(f"data.{role}.source={stand_in}")
    recipe = load_recipe(path, overrides)
    data = load_data(recipe)
    for role in ("forget", "retain", "pairs"):
        if getattr(recipe.data, role) is not None:
            assert getattr(data, role), f"{path.name}: data.{role} is empty"
