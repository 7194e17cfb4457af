"""cpu_linear: float32 CPU linears through oneDNN in evaluation, equal to F.linear up to float
rounding, never where a gradient is wanted, never on the output head, and given back afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_evals import SENTENCES, by_hand, char_tokenizer

from unpatch import cpu_linear
from unpatch.evals import head, scoring
from unpatch.modes import evaluating

pytestmark = pytest.mark.skipif(not cpu_linear._probe(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls that really went to oneDNN."""
    calls, real = [], cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda x, w, b: (calls.append(tuple(w.shape)), real(x, w, b))[1])
    return calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 64), (3, 50, 64), (0, 64)])
def test_linear_equals_f_linear(onednn_calls, shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen) * 3 if bias else None
    got = cpu_linear.linear(x, w, b)
    assert onednn_calls == [(96, 64)]
    assert got.shape == F.linear(x, w, b).shape
    assert torch.allclose(got.double(), F.linear(x.double(), w.double(), None if b is None else b.double()), atol=1e-4, rtol=1e-5)
    transposed = torch.randn(64, 11, generator=gen).t()  # a non-contiguous input
    assert torch.allclose(cpu_linear.linear(transposed, w, b), F.linear(transposed, w, b), atol=1e-4, rtol=1e-5)


def test_linear_keeps_f_linear_where_onednn_does_not_apply(onednn_calls, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=gen, requires_grad=True)
    x = torch.randn(4, 16, generator=gen)
    cpu_linear.linear(x, w).sum().backward()  # a gradient is wanted: the op has no backward
    assert torch.equal(w.grad, x.sum(0).expand(8, 16))
    half = cpu_linear.linear(x.bfloat16(), w.detach().bfloat16())  # not float32
    assert torch.equal(half, F.linear(x.bfloat16(), w.detach().bfloat16()))
    monkeypatch.setenv("UNPATCH_ONEDNN", "0")
    assert torch.equal(cpu_linear.linear(x, w.detach()), F.linear(x, w.detach()))
    monkeypatch.delenv("UNPATCH_ONEDNN")
    matmul = torch.backends.mkldnn.matmul
    was, matmul.fp32_precision = matmul.fp32_precision, "bf16"  # oneDNN may round inputs down
    try:
        assert not cpu_linear.onednn_enabled()
        assert torch.equal(cpu_linear.linear(x, w.detach()), F.linear(x, w.detach()))
    finally:
        matmul.fp32_precision = was
    assert cpu_linear.onednn_enabled()
    assert onednn_calls == []


def test_fast_linears_patch_the_body_not_the_head_and_give_forwards_back(onednn_calls):
    model = tiny_model("llama")
    lm_head = model.get_output_embeddings()
    body = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not lm_head]
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with cpu_linear.fast_linears(model):
            assert all("forward" in vars(m) for m in body) and "forward" not in vars(lm_head)
            assert head.plain_head(model) is lm_head  # the blocked head still applies
            got = model(input_ids=ids).logits
        assert len(onednn_calls) >= len(body)  # the probe forward and this one, every body layer
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert not any("forward" in vars(m) for m in model.modules())
        with pytest.raises(RuntimeError, match="boom"), cpu_linear.fast_linears(model):
            raise RuntimeError("boom")
        assert not any("forward" in vars(m) for m in model.modules())


def test_fast_linears_leave_rewired_and_nested_layers_alone():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    mine = q.forward = lambda x: torch.zeros(*x.shape[:-1], q.out_features)  # someone else's forward
    with evaluating(model), evaluating(model):  # nested: the inner block must not undo the outer's patch
        assert vars(q)["forward"] is mine
        k = model.model.layers[0].self_attn.k_proj
        assert "forward" in vars(k)
    assert vars(q)["forward"] is mine and "forward" not in vars(k)


def test_scores_with_and_without_onednn_agree(onednn_calls, monkeypatch):
    """sentence_logprobs through oneDNN (body and blocked head) against the model's own logits."""
    model, tok = tiny_model("llama"), char_tokenizer()
    fast = scoring.sentence_logprobs(model, tok, SENTENCES, batch_size=2)
    assert (64, 32) in onednn_calls  # the body's gate/up projections
    assert (128, 32) in onednn_calls  # the head's vocabulary block (128 tokens < VOCAB_BLOCK)
    monkeypatch.setenv("UNPATCH_ONEDNN", "0")
    count = len(onednn_calls)
    plain = scoring.sentence_logprobs(model, tok, SENTENCES, batch_size=2)
    assert len(onednn_calls) == count
    assert fast == pytest.approx(plain, abs=1e-5)
    assert fast == pytest.approx([by_hand(model, tok, s) for s in SENTENCES], abs=1e-5)


def test_npo_reference_keeps_mkl(onednn_calls):
    """The NPO reference pass is cached in place of a per-step forward that runs MKL linears."""
    from unpatch.batches import Batches
    from unpatch.methods.npo import reference_logprobs

    model, tok = tiny_model("llama"), char_tokenizer()
    seqs = [tok(s)["input_ids"] for s in SENTENCES[:-1]]
    reference_logprobs(model, Batches(seqs, batch_size=2, seed=0, pad_id=0))
    assert onednn_calls == []
