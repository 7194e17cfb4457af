"""Padding-free NLL (methods/packed.py): the same loss and gradients as HF's padded loss."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILD_CONFIGS, FORGET, tiny_tokenizer
from transformers import AutoModelForCausalLM

from unpatch.batches import Batches
from unpatch.methods import packed


def _model(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(BUILD_CONFIGS[arch]())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_packed_loss_and_gradients_match_padded(arch):
    model = _model(arch).eval()  # no dropout: the two paths must agree to rounding
    batch = Batches.from_texts(FORGET, tiny_tokenizer(), 32, 4, 0)[0]
    assert (batch["attention_mask"] == 0).any()  # the batch really has padding to skip
    params = [p for p in model.parameters() if p.requires_grad]
    got = packed.packed_nll(model, batch)
    want = packed.padded_nll(model, batch)
    assert got is not None and abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(packed.padded_nll(model, batch), params, allow_unused=True)
    worst = max((a - b).abs().max().item() for a, b in zip(g_got, g_want, strict=True) if a is not None)
    assert worst < 1e-5
    assert packed.token_nll(model, batch).item() == pytest.approx(want.item(), rel=1e-5)
    assert packed._CHECKED[model] is True


def test_dropout_keeps_the_padded_path():
    model = _model("gpt2").train()  # GPT-2's default dropout is 0.1
    batch = Batches.from_texts(FORGET, tiny_tokenizer(), 32, 4, 0)[0]
    torch.manual_seed(3)
    got = packed.token_nll(model, batch)
    torch.manual_seed(3)
    want = packed.padded_nll(model, batch)
    assert got.item() == want.item() and model not in packed._CHECKED


def test_a_model_that_disagrees_falls_back(monkeypatch):
    model = _model("llama").eval()
    batch = Batches.from_texts(FORGET, tiny_tokenizer(), 32, 4, 0)[0]
    real = packed.packed_nll
    monkeypatch.setattr(packed, "packed_nll", lambda m, b: real(m, b) * 1.01)  # e.g. a model ignoring position ids
    with pytest.warns(UserWarning, match="padding-free batches disagree"):
        got = packed.token_nll(model, batch)
    assert packed._CHECKED[model] is False and got.item() == packed.padded_nll(model, batch).item()


def test_last_tokens_are_left_out_of_the_packed_row():
    model = _model("llama").eval()
    batch = Batches.from_texts(FORGET, tiny_tokenizer(), 32, 4, 0)[0]
    seen = []
    model.register_forward_pre_hook(lambda _m, args, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    packed.packed_nll(model, batch)
    rows, real = batch["input_ids"].shape[0], int(batch["attention_mask"].sum())
    assert seen == [torch.Size([1, real - rows])]  # each text's last token predicts nothing: not run


@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_token_nll_matches_cross_entropy_value_and_gradient(spread):
    torch.manual_seed(1)
    logits = (torch.randn(37, 501) * spread).requires_grad_()
    targets = torch.randint(0, 501, (37,))
    want = torch.nn.functional.cross_entropy(logits, targets)
    (g_want,) = torch.autograd.grad(want * 3.0, logits)
    got = packed.TokenNLL.apply(logits, targets)
    (g_got,) = torch.autograd.grad(got * 3.0, logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert (g_got - g_want).abs().max().item() < 1e-5 * g_want.abs().max().item()  # float rounding only
