"""Interop with the tools people already use on a patched model.

Covered elsewhere (not repeated here):
  - peft loads a LoRA patch as it is and gives the logits of `Applied.apply`:
    test_algebra.py::test_saved_lora_in_peft_gives_applied_logits (also at a negative coefficient);
  - a merged folder from `unpatch apply --out` loads with `from_pretrained`, equal to the in-memory
    result: test_algebra.py::test_merged_folder_loads_with_transformers (and the CLI round trip in
    test_cli.py).
Here: lm-evaluation-harness scores a patched model — its HF backend with `peft=<patch folder>`
(what `lm_eval --model hf --model_args pretrained=...,peft=...` builds) and with a merged folder —
and its log-likelihoods equal those of the model unpatch patches in memory, within 1e-4. Offline:
a tiny model folder and requests built here; no task data is downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PAIRS_LM_EVAL as PAIRS
from conftest import lm_eval_llama, write_lm_eval_task
from transformers import AutoTokenizer

from unpatch.evals.scoring import sentence_logprobs
from unpatch.patch import merged as merge
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch

# (context, continuation): empty contexts as CrowS-Pairs is scored, and a few with a context
REQUESTS = [("", "the cat sat on the mat"), ("", "she is very bad"), ("", "people are good"),
            ("the quick brown fox", " jumps over the lazy dog"), ("he was", " a lazy dog"), ("a cat", " is a cat")]


def lm_eval_loglikelihoods(**model_args) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(device="cpu", batch_size=4, dtype="float32", **model_args)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    return lm.loglikelihood(reqs, disable_tqdm=True)


@torch.no_grad()
def by_hand(model, tok, requests=REQUESTS) -> list[float]:
    """sum log p(continuation | context), tokens split as lm-eval splits them: an empty context is
    the BOS token; otherwise the continuation's tokens are those of context+continuation after the
    context's."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for ctx, cont in requests:
        if ctx:
            whole, head = tok.encode(ctx + cont, add_special_tokens=False), tok.encode(ctx, add_special_tokens=False)
            ctx_ids, cont_ids = head, whole[len(head):]
        else:
            ctx_ids, cont_ids = [bos], tok.encode(cont, add_special_tokens=False)
        ids = torch.tensor([ctx_ids + cont_ids])
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].float(), -1)
        n = len(cont_ids)
        out.append(logp[-n:].gather(1, ids[0, -n:, None]).sum().item())
    return out


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """(base folder, patch folder, tokenizer, model patched in memory by unpatch, base model)."""
    root = tmp_path_factory.mktemp("interop")
    folder = root / "llama"  # lm_eval_llama writes it
    # vocab_size = len(tokenizer): with `peft=`, lm-eval resizes the embeddings to the tokenizer's
    # length when they differ (for adapters with added tokens), which would change every score
    base, patch = lm_eval_llama(root)
    tok = AutoTokenizer.from_pretrained(folder)
    ours = copy.deepcopy(base)
    Applied(ours).apply(load_patch(patch.path))
    return folder, patch.path, tok, ours, base


def test_lm_eval_with_peft_adapter_equals_unpatch_apply(patched):
    folder, patch_dir, tok, ours, base = patched
    theirs = lm_eval_loglikelihoods(pretrained=str(folder), peft=str(patch_dir))
    want = by_hand(ours, tok)
    assert max(abs(ll - w) for (ll, _), w in zip(theirs, want, strict=True)) < 1e-4
    # the patch matters at this tolerance, and unpatch's own scorer agrees on the empty-context ones
    assert max(abs(a - b) for a, b in zip(want, by_hand(base, tok), strict=True)) > 1e-2
    empty = [c for ctx, c in REQUESTS if not ctx]
    for ll, (theirs_ll, _) in zip(sentence_logprobs(ours, tok, empty), theirs, strict=False):
        assert abs(ll - theirs_ll) < 1e-4


def test_lm_eval_on_merged_folder_equals_peft(patched, tmp_path):
    folder, patch_dir, tok, ours, _ = patched
    merge.apply_to_folder(str(folder), [(load_patch(patch_dir), 1.0)], tmp_path / "merged")
    theirs = lm_eval_loglikelihoods(pretrained=str(tmp_path / "merged"), tokenizer=str(folder))
    want = by_hand(ours, tok)
    assert max(abs(ll - w) for (ll, _), w in zip(theirs, want, strict=True)) < 1e-4


def test_lm_eval_simple_evaluate_scores_the_patched_model(patched, tmp_path):
    """The whole harness: a CrowS-Pairs-shaped multiple-choice task (empty context, the two
    sentences as choices) from a local file, model "hf" with pretrained=<base>,peft=<patch>."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder, patch_dir, tok, ours, _ = patched
    write_lm_eval_task(tmp_path)
    out = simple_evaluate(model="hf", model_args=f"pretrained={folder},peft={patch_dir},dtype=float32", tasks=["tiny_pairs"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          device="cpu", batch_size=4, log_samples=True)
    want = {(m, le): by_hand(ours, tok, [("", m), ("", le)]) for m, le in PAIRS}
    for sample in out["samples"]["tiny_pairs"]:
        doc = sample["doc"]
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(got, want[doc["sent_more"], doc["sent_less"]], strict=True)) < 1e-4
    acc = sum(w[0] > w[1] for w in want.values()) / len(PAIRS)
    assert out["results"]["tiny_pairs"]["acc,none"] == pytest.approx(acc)
