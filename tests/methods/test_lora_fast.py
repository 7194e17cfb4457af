"""FusedLoRA (methods/lora_fast.py): peft's LoRA forward and gradients, in fewer memory passes."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILD_CONFIGS, FORGET, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from unpatch.batches import Batches
from unpatch.methods import lora_fast
from unpatch.methods.lora_fast import fused_lora
from unpatch.methods.packed import token_nll


def _peft(dropout: float = 0.0, dora: bool = False, bias: bool = False, lora_bias: str = "none"):
    torch.manual_seed(0)
    config = BUILD_CONFIGS["llama"]()
    config.attention_bias = bias  # q_proj and v_proj get a bias: FusedLoRA's addmm path
    model = AutoModelForCausalLM.from_config(config)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=dropout,
                     use_dora=dora, bias=lora_bias, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0; a non-zero B makes every term of the gradient count
            torch.nn.init.normal_(p, std=0.2)
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = token_nll(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_peft_loss_and_every_lora_gradient(monkeypatch, bias):
    model = _peft(bias=bias)
    batch = Batches.from_texts(FORGET, tiny_tokenizer(), 32, 4, 0)[0]
    want_loss, want = _loss_and_grads(model, batch)
    calls = []
    real = lora_fast.FusedLoRA.apply
    monkeypatch.setattr(lora_fast.FusedLoRA, "apply", lambda *a: calls.append(1) or real(*a))
    with fused_lora(model):
        got_loss, got = _loss_and_grads(model, batch)
    layers = sum(isinstance(m, LoraLinear) for m in model.modules())
    assert layers == 6 and len(calls) == layers  # 2 layers x 3 targets, each through the fused path once
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys() and len(got) == 2 * layers
    for name in want:
        scale = want[name].abs().max().item()
        assert scale > 0 and (got[name] - want[name]).abs().max().item() <= 1e-5 * scale, name


def test_input_gradient_matches_peft():
    model = _peft()
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    want_y = layer(x)
    (want_g,) = torch.autograd.grad(want_y.square().sum(), x)
    with fused_lora(model):
        got_y = layer(x)
        (got_g,) = torch.autograd.grad(got_y.square().sum(), x)
    assert got_y.shape == want_y.shape
    assert torch.allclose(got_y, want_y, rtol=1e-6, atol=1e-6) and torch.allclose(got_g, want_g, rtol=1e-5, atol=1e-6)


def test_trained_base_biases_keep_peft_forward_and_get_their_gradients():
    model = _peft(bias=True, lora_bias="all")  # peft's bias="all": q_proj's and v_proj's biases train
    batch = Batches.from_texts(FORGET, tiny_tokenizer(), 32, 4, 0)[0]
    _, want = _loss_and_grads(model, batch)
    with fused_lora(model):
        assert {n for n, m in model.named_modules() if "forward" in vars(m)} == {
            n for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.base_layer.bias is None}
        _, got = _loss_and_grads(model, batch)
    assert any(n.endswith("base_layer.bias") for n in want) and got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-5 * want[name].abs().max().item(), name


@pytest.mark.parametrize("kind", ["dropout", "dora"])
def test_other_lora_layers_keep_peft_forward(kind):
    model = _peft(dropout=0.1) if kind == "dropout" else _peft(dora=True)
    with fused_lora(model):
        assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, LoraLinear))


def test_forward_is_restored_on_exit_even_after_an_error():
    model = _peft()
    with pytest.raises(RuntimeError, match="boom"), fused_lora(model):
        assert all("forward" in vars(m) for m in model.modules() if isinstance(m, LoraLinear))
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) or "_peft_forward" in vars(m) for m in model.modules())
