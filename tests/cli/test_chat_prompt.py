"""`unpatch apply --prompt` sends the prompt through the tokenizer's chat template when it has
one (an instruct model is tuned on user turns), and as raw text with --no-chat-template."""

from __future__ import annotations

from conftest import tiny_model, tiny_tokenizer

from unpatch.cli.patches import _continue

TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} she is{% endif %}"


def test_prompt_uses_the_chat_template_unless_told_not_to():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    seen = []
    real = model.generate

    def spy(**kw):
        seen.append(tok.decode(kw["input_ids"][0]))
        return real(**kw)

    model.generate = spy
    plain = _continue(model, tok, "the cat", tokens=3)  # no template: raw text
    tok.chat_template = TEMPLATE
    chat = _continue(model, tok, "the cat", tokens=3)
    raw = _continue(model, tok, "the cat", tokens=3, chat=False)
    assert seen[0] == seen[2] != seen[1] and seen[1] == "<s> the cat she is"  # the user turn + generation prompt
    assert chat.startswith("the cat -> ") and plain.startswith("the cat") and raw == plain


def test_hub_model_downloads_keep_tokenizer_files_and_chat_template():
    from fnmatch import fnmatch

    from unpatch.model import HUB_MODEL_FILES

    keep = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "merges.txt", "vocab.json",
            "special_tokens_map.json", "model.safetensors", "config.json", "generation_config.json", "README.md"]
    assert all(any(fnmatch(f, p) for p in HUB_MODEL_FILES) for f in keep)
    assert not any(fnmatch("pytorch_model.bin", p) for p in HUB_MODEL_FILES)  # pickles stay on the Hub
