"""`--dry-run` at the papers' model sizes (GPT-2, OPT-1.3B / 2.7B, Llama-2-7B) from configs built
here (config.json only: nothing downloaded, the model is planned on the meta device). Parameter
counts against the published ones; LoRA and delta sizes against the hand formula per target."""

from __future__ import annotations

import pytest
import yaml
from conftest import FORGET
from transformers import GPT2Config, LlamaConfig, OPTConfig
from typer.testing import CliRunner

from unpatch.cli import app
from unpatch.plan import make_plan, render


def _opt(h: int, layers: int, heads: int) -> OPTConfig:
    return OPTConfig(hidden_size=h, num_hidden_layers=layers, ffn_dim=4 * h, num_attention_heads=heads, vocab_size=50272,
                     max_position_embeddings=2048, word_embed_proj_dim=h)


# name: (config, published parameter count, layers, [(in, out) of each target per layer])
PAPERS = {
    "gpt2": (GPT2Config(), 124_439_808, 12,  # Conv1D: c_attn 768->2304, attn c_proj, c_fc 768->3072, mlp c_proj
             [(768, 2304), (768, 768), (768, 3072), (3072, 768)]),
    "opt-1.3b": (_opt(2048, 24, 32), 1_315_758_080, 24, [(2048, 2048)] * 4 + [(2048, 8192), (8192, 2048)]),
    "opt-2.7b": (_opt(2560, 32, 32), 2_651_596_800, 32, [(2560, 2560)] * 4 + [(2560, 10240), (10240, 2560)]),
    "llama-2-7b": (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
                   6_738_415_616, 32, [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]),
}


def recipe(tmp, folder, kind: str):
    (tmp / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(folder), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": kind, "rank": 8}, "train": {"steps": 10, "batch_size": 8, "max_length": 128}}
    (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(raw))
    return tmp / f"{kind}.yaml"


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_size_dry_run(tmp_path, name, capsys):
    cfg, published, layers, shapes = PAPERS[name]
    cfg.save_pretrained(tmp_path / name)  # config.json alone, as the Hub serves it before any weight
    lora = make_plan(recipe(tmp_path, tmp_path / name, "lora"), measure=False)
    assert lora.total_params == published
    assert len(lora.touched) == layers * len(shapes)
    assert lora.trainable == layers * sum(8 * (i + o) for i, o in shapes) and lora.patch_bytes == 4 * lora.trainable
    assert lora.targets_why.startswith(f"peft's target mapping for {cfg.model_type}")
    delta = make_plan(recipe(tmp_path, tmp_path / name, "delta"), measure=False)
    assert delta.trainable == layers * sum(i * o for i, o in shapes) and delta.patch_bytes == 4 * delta.trainable
    lines = render(lora) + render(delta)
    targets = [ln for ln in lines if ln.startswith("targets  ")]
    assert len(targets) == 2 and all(", ".join(lora.targets) in ln for ln in targets)
    with capsys.disabled():  # the estimates, printed where `pytest -s` shows them
        print(f"\n--- {name} ---\n" + "\n".join(lines))


def test_cli_dry_run_names_targets_and_why(tmp_path):
    cfg = PAPERS["llama-2-7b"][0]
    cfg.save_pretrained(tmp_path / "llama")
    r = CliRunner().invoke(app, ["build", str(recipe(tmp_path, tmp_path / "llama", "lora")), "--dry-run"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert "6,738,415,616 parameters" in r.output
    assert ("targets  q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: peft's target mapping for llama "
            "(q_proj, v_proj) finds the decoder blocks (model.layers)") in r.output
    r = CliRunner().invoke(app, ["build", str(recipe(tmp_path, tmp_path / "llama", "lora")), "--dry-run",
                                 "--set", "patch.target_modules=[v_proj]"], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "targets  v_proj: the recipe's patch.target_modules (v_proj)" in r.output, r.output
    assert "touches  32 tensors" in r.output


def test_render_groups_targets_by_shape(tmp_path):
    """GPT-2's c_proj is two shapes (attention 768->768, MLP 3072->768): both are shown."""
    PAPERS["gpt2"][0].save_pretrained(tmp_path / "gpt2")
    text = "\n".join(render(make_plan(recipe(tmp_path, tmp_path / "gpt2", "lora"), measure=False)))
    assert "c_proj x12 [768x768]" in text and "c_proj x12 [768x3072]" in text and "c_attn x12 [2304x768]" in text
