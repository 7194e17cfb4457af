"""Tiny random configs (hidden 32, 2 layers, vocab 128) of the decoder families transformers ships,
and one saved folder per family (model + the tiny word-level tokenizer) for builds."""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers as T
from conftest import WORDS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

_IDS = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64, **_IDS)
_GPT = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_IDS)

FAMILIES = {
    "gpt2": lambda: T.GPT2Config(**_GPT),  # Conv1D, fused c_attn
    "opt": lambda: T.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                               max_position_embeddings=64, word_embed_proj_dim=32, **_IDS),
    "llama": lambda: T.LlamaConfig(**_L, tie_word_embeddings=True),
    "qwen2": lambda: T.Qwen2Config(**_L),
    "qwen3": lambda: T.Qwen3Config(**_L, head_dim=8),
    "phi": lambda: T.PhiConfig(**{k: v for k, v in _L.items() if k != "num_key_value_heads"}),
    "phi3": lambda: T.Phi3Config(**_L),  # fused qkv_proj and gate_up_proj
    "gemma": lambda: T.GemmaConfig(**_L, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_L, head_dim=8),
    "mistral": lambda: T.MistralConfig(**_L),
    "mixtral": lambda: T.MixtralConfig(**_L, num_local_experts=2, num_experts_per_tok=1),
    "gptj": lambda: T.GPTJConfig(**_GPT, rotary_dim=4),
    "mpt": lambda: T.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, expansion_ratio=2, **_IDS),  # fused Wqkv
    "stablelm": lambda: T.StableLmConfig(**_L),
    "starcoder2": lambda: T.Starcoder2Config(**_L),
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(**_GPT),  # fused c_attn as a Linear
    "codegen": lambda: T.CodeGenConfig(**_GPT, rotary_dim=4, n_ctx=64),  # fused qkv_proj
    "olmo": lambda: T.OlmoConfig(**_L),
    "olmo2": lambda: T.Olmo2Config(**_L),
    "gpt_neox": lambda: T.GPTNeoXConfig(**{k: v for k, v in _L.items() if k != "num_key_value_heads"}),  # fused query_key_value
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **_IDS),
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_IDS),
    "cohere": lambda: T.CohereConfig(**_L),
    "granite": lambda: T.GraniteConfig(**_L),
    "gpt_neo": lambda: T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                      attention_types=[[["global", "local"], 1]], window_size=8, **_IDS),
}
# the papers' families and three more, for every registered method (issue 14); the others run ga
PAPER_FAMILIES = ("gpt2", "opt", "llama", "qwen2", "gpt_neox", "phi", "gemma2")


def family_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def family_tokenizer() -> PreTrainedTokenizerFast:
    """conftest's word-level tokenizer plus single letters (and byte-level "Ġ"): transformers 5
    loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever tokenizer_class says, a BPE without
    merges over this vocabulary, which then falls back to letters instead of one <unk> per text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in [*WORDS, *string.ascii_lowercase, "Ġ"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_family(family: str, folder: Path) -> Path:
    """A model folder as the Hub would hold it (config, safetensors, tokenizer); reused if there."""
    if not (folder / "config.json").exists():
        family_model(family).save_pretrained(folder)
        family_tokenizer().save_pretrained(folder)
    return folder
