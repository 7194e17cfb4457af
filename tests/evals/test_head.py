"""The vocabulary-blocked output head (evals/head.py): equal to log_softmax over the full logits,
used only where a model's logits are its head's output, and by every text-scoring metric."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_evals import SENTENCES, by_hand, char_tokenizer

from unpatch.evals import forgetting, get_metric, head, perplexity, scoring


@pytest.mark.parametrize("bias", [False, True])
def test_target_logprobs_equal_full_log_softmax(monkeypatch, bias):
    """Rows across row blocks, a vocabulary that is no multiple of the block, targets on block
    edges, repeated rows and repeated targets."""
    monkeypatch.setattr(head, "VOCAB_BLOCK", 1000)
    monkeypatch.setattr(head, "ROW_BLOCK", 7)
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 5003, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.5, generator=gen)
        if bias:
            lin.bias.normal_(0, 3.0, generator=gen)
    hidden = torch.randn(20, 24, generator=gen)
    rows = torch.tensor([0, 0, 6, 7, 13, 14, 19, 19, 3, 5])
    targets = torch.tensor([0, 999, 1000, 1999, 5002, 5000, 4321, 4321, 17, 2500])
    want = torch.log_softmax(lin(hidden).double(), dim=-1)[rows, targets]
    got = head.target_logprobs(hidden, lin, rows, targets)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=0)


def test_target_logprobs_of_huge_logits_stay_finite():
    """Logits of several hundred overflow exp in float32: each block is shifted by its maximum."""
    lin = torch.nn.Linear(4, 3000)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.linspace(300.0, 600.0, 3000))
    rows, targets = torch.tensor([0, 1]), torch.tensor([2999, 0])
    want = torch.log_softmax(lin(torch.ones(2, 4)).double(), dim=-1)[rows, targets]
    assert torch.allclose(head.target_logprobs(torch.ones(2, 4), lin, rows, targets).double(), want, atol=1e-4)


def test_target_logprobs_bfloat16_head_reads_its_own_logits():
    """A bf16 head: logits in bf16 as the model computes them, reduced in float32."""
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(16, 3000, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3000, 16, generator=gen))
    hidden = torch.randn(9, 16, generator=gen).to(torch.bfloat16)
    rows, targets = torch.arange(9), torch.randint(0, 3000, (9,), generator=gen)
    want = torch.log_softmax(lin(hidden).float(), dim=-1)[rows, targets]
    assert torch.allclose(head.target_logprobs(hidden, lin, rows, targets), want, atol=0.1)


def test_plain_head_found_only_where_logits_are_the_heads_output():
    from transformers import AutoModelForCausalLM, GraniteConfig

    llama = tiny_model("llama")
    assert head.plain_head(llama) is llama.get_output_embeddings()
    torch.manual_seed(0)  # Granite divides its logits by logits_scaling after the head
    granite = AutoModelForCausalLM.from_config(GraniteConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, logits_scaling=4.0)).eval()
    assert head.plain_head(granite) is None
    tok = char_tokenizer()  # and it is scored the usual way, scaling included
    assert scoring.sentence_logprobs(granite, tok, SENTENCES, batch_size=3) == pytest.approx(
        [by_hand(granite, tok, s) for s in SENTENCES], abs=1e-5)


def test_scoring_never_runs_the_full_head(monkeypatch):
    """With a plain head the head module runs once (the 3-token probe), never on the batches."""
    model, tok = tiny_model("llama"), char_tokenizer()
    lin, calls, linear = model.get_output_embeddings(), [], torch.nn.Linear.forward

    def counted(self, x):  # on the class: a hook or a forward set on the head itself makes it not plain
        if self is lin:
            calls.append(tuple(x.shape))
        return linear(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    got = scoring.sentence_logprobs(model, tok, SENTENCES, batch_size=2)
    assert calls == [(1, 3, 32)]
    monkeypatch.undo()
    assert got == pytest.approx([by_hand(model, tok, s) for s in SENTENCES], abs=1e-5)
    lin.forward = lambda x: linear(lin, x) * 2  # a re-wired head whose output the probe would still match
    assert head.plain_head(model) is None


def test_blocked_and_full_logits_paths_agree(monkeypatch, tmp_path):
    """perplexity, the forgetting NLL and sentence scores: the blocked head against full logits."""
    model, tok = tiny_model("llama"), char_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("Some text to score, with a few words in it. " * 8, encoding="utf-8")

    def run():
        ppl = get_metric("perplexity")(model, tok, source=str(text), max_length=40, stride=15, batch_size=2)["perplexity"]
        nll = forgetting.token_nll(model, tok, SENTENCES[:-1] * 3, batch_tokens=64)["nll"]
        return ppl, nll, scoring.sentence_logprobs(model, tok, SENTENCES, batch_size=2)

    used = []
    real = head.target_logprobs
    for mod in (head, scoring):
        monkeypatch.setattr(mod, "target_logprobs", lambda *a, m=mod: (used.append(m), real(*a))[1])
    blocked = run()
    assert len(used) >= 3 and scoring in used  # each of the three ran the blocked head
    for mod in (scoring, perplexity, forgetting):
        monkeypatch.setattr(mod, "plain_head", lambda _m: None)
    full = run()
    assert blocked[0] == pytest.approx(full[0], rel=1e-6)
    assert blocked[1] == pytest.approx(full[1], rel=1e-6)
    assert blocked[2] == pytest.approx(full[2], abs=1e-5)


def test_plain_head_accepts_logits_upcast_to_float32():
    """Many models return float32 logits from a bf16 head: exact, so the blocked head still applies."""
    from transformers import LlamaForCausalLM

    class Upcast(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits.float()
            return out

    torch.manual_seed(0)
    model = Upcast(tiny_model("llama").config).to(torch.bfloat16).eval()
    assert head.plain_head(model) is model.get_output_embeddings()
    tok = char_tokenizer()
    got = scoring.sentence_logprobs(model, tok, SENTENCES, batch_size=3)
    assert got == pytest.approx([by_hand(model, tok, s) for s in SENTENCES], abs=0.05)  # bf16 rounding of other shapes
