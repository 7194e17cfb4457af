"""Tiny in-process models (hidden size 32) and patches with known contents."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from huggingface_hub import constants
from huggingface_hub.utils import _http
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

from unpatch.fingerprint import combine, tensor_sha256
from unpatch.patch.format import BaseRef, Manifest, Patch, library_versions, lora_config_dict

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "opt": lambda: OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "opt": ["q_proj", "v_proj", "fc1"]}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


@pytest.fixture(params=sorted(CONFIGS))
def arch(request) -> str:
    return request.param


def base_ref(model: torch.nn.Module, names, model_id: str = "tiny") -> BaseRef:
    params = dict(model.named_parameters())
    tensors = {n: tensor_sha256(params[n].data) for n in names}
    return BaseRef(id=model_id, dtype="float32", tensors=tensors, fingerprint=combine(tensors))


def make_lora_patch(model, arch: str, seed: int = 1, rank: int = 4, alpha: float = 8, name: str = "lora",
                    model_id: str = "tiny", targets=None) -> Patch:
    """A LoRA patch with random A and B (peft's init_lora_weights=False), built through peft."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS[arch], lora_dropout=0.0,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():  # B random but small, like a trained adapter
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight" for k in state}
    manifest = Manifest(kind="lora", name=name, base=base_ref(model, modules, model_id), versions=library_versions())
    return Patch(manifest, state, lora_config_dict(peft_model.peft_config["default"], model_id))


def make_delta_patch(model, arch: str, seed: int = 2, name: str = "delta", coefficient: float = 1.0,
                     model_id: str = "tiny") -> Patch:
    """A dense delta on the target weights plus a row-sparse one on the first target."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = sorted(n for n in params if n.endswith(".weight") and any(f".{t}." in n for t in TARGETS[arch]))
    tensors, encodings, shapes = {}, {}, {}
    for n in names[1:]:
        tensors[n] = torch.randn(params[n].shape, generator=gen) * 0.01
        encodings[n] = "dense"
    rows_name = names[0]
    tensors[f"{rows_name}::rows"] = torch.tensor([0, 3, 5])
    tensors[f"{rows_name}::values"] = torch.randn(3, *params[rows_name].shape[1:], generator=gen) * 0.01
    encodings[rows_name], shapes[rows_name] = "rows", list(params[rows_name].shape)
    manifest = Manifest(kind="delta", name=name, base=base_ref(model, names, model_id), coefficient=coefficient,
                        versions=library_versions())
    return Patch(manifest, tensors, encodings=encodings, shapes=shapes)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every parameter equal bit for bit (compared as raw bytes, so -0.0 != 0.0)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[n].data.view(torch.int32), pb[n].data.view(torch.int32)) for n in pa)


# ---------------------------------------------------------------- tiny models on disk, for builds

WORDS = "the a cat dog sat on mat ran far and quick brown fox jumps over lazy he she is was very bad good people are".split()
FORGET = ["the cat sat on the mat", "the dog ran far", "she is very bad", "he was a lazy dog",
          "the quick brown fox jumps over the lazy dog", "people are good", "a cat is a cat", "the fox ran"]
BUILD_CONFIGS = {  # with bos/eos ids inside the tiny vocabulary

    "llama": lambda: LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for arch in ("llama", "gpt2"):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(BUILD_CONFIGS[arch]()).save_pretrained(root / arch)
        tiny_tokenizer().save_pretrained(root / arch)
    return root

# ------------------------------------------------------------------------------ helpers several test files share


CROWS_ROWS = [("the cat is bad", "the dog is bad", "race-color"), ("she is very bad", "he is very bad", "gender"),
              ("he was a lazy dog", "she was a lazy dog", "gender"), ("people are bad", "people are good", "race-color"),
              ("the fox ran far", "the cat ran far", "gender"), ("a dog is lazy", "a cat is lazy", "religion")]


def write_data(root: Path) -> tuple[Path, Path]:
    crows = root / "crows.csv"
    crows.write_text("sent_more,sent_less,bias_type\n" + "".join(f"{a},{b},{t}\n" for a, b, t in CROWS_ROWS))
    text = root / "text.txt"
    text.write_text(" ".join(FORGET * 6) + "\n")
    return crows, text


RETAIN = ["the fox jumps over the mat", "a good dog sat far", "people are quick", "the cat ran on and on",
          "a brown dog is good", "the mat was very good", "he sat on a mat", "she ran and ran"]
METHOD_PAIRS = [("he is very bad", "she is very bad"), ("the dog was lazy", "the cat was lazy"),
                ("people are bad", "people are good"), ("she ran far", "he ran far"),
                ("the fox is bad", "the fox is good"), ("a lazy dog sat", "a quick dog sat"),
                ("he was bad", "she was bad"), ("the cat is lazy", "the cat is quick")]


def method_recipe(tmp: Path, models_dir: Path, name: str, kind: str, **train) -> Path:
    from unpatch.methods import list_methods

    spec = {m.name: m for m in list_methods()}[name]
    (tmp / "forget.txt").write_text("\n".join(FORGET) + "\n")
    (tmp / "retain.txt").write_text("\n".join(RETAIN) + "\n")
    with open(tmp / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent_more", "sent_less"])
        w.writerows(METHOD_PAIRS)
    data = {"forget": "forget.txt", "retain": "retain.txt", "pairs": "pairs.csv"}
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": data,
           "method": {"name": name, **spec.example}, "patch": {"kind": kind, "rank": 4},
           "train": {"steps": 6, "lr": 0.02, "batch_size": 4, "max_length": 16, **train}}
    p = tmp / f"{name}-{kind}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def save_tiny_llama(folder: Path, *, vocab_from_tokenizer: bool = False, init: float | None = None) -> Path:
    """The tiny llama and its tokenizer saved as a model folder (seed 0). `vocab_from_tokenizer`:
    embeddings sized len(tokenizer) (lm-eval resizes them otherwise, which changes every score);
    `init`: the initializer_range (0.2 makes logits sharp enough for a few steps to move them)."""
    config = BUILD_CONFIGS["llama"]()
    if vocab_from_tokenizer:
        config.vocab_size = len(tiny_tokenizer())
    if init is not None:
        config.initializer_range = init
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@contextlib.contextmanager
def serving_hub(monkeypatch, fake, modules):
    """huggingface_hub talks to `fake` (an httpx MockTransport handler) with a token set, online;
    `modules` are those whose is_xet_available is turned off (hf_xet's Rust client is not seen)."""
    for mod in modules:
        monkeypatch.setattr(mod, "is_xet_available", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # "the usual places": HF_TOKEN first
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake),
                                                   event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        yield fake
    finally:
        _http.set_client_factory(_http.default_client_factory)


class Crash(Exception):
    """A kill at a chosen training step (raised from build's on_step)."""


def crash_at(step: int):
    def on_step(s, metrics):
        if s == step:
            raise Crash
    return on_step


# lm-evaluation-harness on the tiny llama (test_interop, test_lm_eval_model): a CrowS-Pairs-shaped
# multiple-choice task from a local file, so no task data is downloaded
PAIRS_LM_EVAL = [("she is very bad", "he is very bad"), ("the cat sat on the mat", "the dog sat on the mat"),
                 ("people are bad", "people are good"), ("the fox ran far", "the dog ran far")]
LM_EVAL_TASK = """task: tiny_pairs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: ""
doc_to_choice: "{{{{[sent_more, sent_less]}}}}"
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_task(root: Path) -> None:
    """pairs.jsonl and the task tiny_pairs.yaml in `root` (lm_eval's include_path)."""
    (root / "pairs.jsonl").write_text("\n".join(json.dumps({"sent_more": m, "sent_less": le}) for m, le in PAIRS_LM_EVAL))
    (root / "tiny_pairs.yaml").write_text(LM_EVAL_TASK.format(data=root / "pairs.jsonl", cache=root / "ds-cache"))


def lm_eval_llama(root: Path):
    """(base model, saved LoRA patch) of the tiny llama at root/llama, its embeddings sized to the
    tokenizer: with `peft=`, lm-eval resizes them otherwise, which would change every score."""
    from unpatch.patch.store import save_patch

    folder = save_tiny_llama(root / "llama", vocab_from_tokenizer=True)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    return base, save_patch(make_lora_patch(base, "llama", model_id=str(folder)), root / "patch")
