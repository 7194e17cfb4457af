"""`unpatch import`: a plain PEFT LoRA adapter trained on a tiny model becomes a patch that
`verify` accepts and that applies to PeftModel's logits; a fine-tuned checkpoint becomes a task
vector that takes the base to the fine-tuned weights; adapters that do not fit are refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TARGETS
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from unpatch.cli import app
from unpatch.errors import UnpatchError
from unpatch.importer import import_adapter
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch

IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 2]])


def peft_adapter(base, arch: str, out, seed: int = 3):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    m = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.save_pretrained(out)
    return out


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r


def test_peft_adapter_becomes_a_verified_patch_with_peft_logits(tmp_path, models_dir):
    from peft import PeftModel

    folder = models_dir / "llama"
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapter = peft_adapter(base, "llama", tmp_path / "adapter")
    r = cli("import", adapter, "--model", folder, "--out", tmp_path / "p")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "lora" in r.output and "base fingerprint" in r.output
    r = cli("verify", tmp_path / "p", "--model", folder)
    assert r.exit_code == 0 and "matches base" in r.output, (r.output, r.exception)
    patch = load_patch(tmp_path / "p")
    assert patch.kind == "lora" and patch.manifest.method["name"] == "import" and len(patch.updates()) == 6  # 3 targets x 2 layers
    ours = copy.deepcopy(base)
    Applied(ours).apply(patch)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        a, b, c = ours(IDS).logits, theirs(IDS).logits, base(IDS).logits
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() > 1e-3  # peft's logits, and not the base's
    # the payload is the adapter's own tensors: peft still loads the patch folder as an adapter
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder.resolve())


def test_finetuned_checkpoint_becomes_a_task_vector(tmp_path, models_dir):
    folder = models_dir / "llama"
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # a "fine-tune" touching two tensors, one of them in a few rows only
        tuned.model.layers[0].mlp.down_proj.weight.add_(torch.randn_like(tuned.model.layers[0].mlp.down_proj.weight) * 0.01)
        tuned.model.layers[1].self_attn.q_proj.weight[:3].add_(0.02)
    tuned.save_pretrained(tmp_path / "tuned")
    patch = import_adapter(tmp_path / "tuned", str(folder), tmp_path / "tv", coefficient=1.0)
    assert patch.kind == "delta" and sorted(patch.updates()) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert patch.encodings["model.layers.1.self_attn.q_proj.weight"] == "rows"
    model = copy.deepcopy(base)
    Applied(model).apply(load_patch(tmp_path / "tv"))
    for (n, p), (_, q) in zip(model.named_parameters(), tuned.named_parameters(), strict=True):
        assert (p - q).abs().max() < 1e-6, n
    neg = import_adapter(tmp_path / "tuned", str(folder), tmp_path / "neg", coefficient=-1.0)
    assert neg.manifest.coefficient == -1.0


def test_adapters_that_do_not_fit_are_refused_in_one_line(tmp_path, models_dir):
    gpt2 = AutoModelForCausalLM.from_pretrained(models_dir / "gpt2").eval()
    adapter = peft_adapter(gpt2, "gpt2", tmp_path / "gpt2-adapter")
    llama = str(models_dir / "llama")
    with pytest.raises(UnpatchError, match=r"gpt2-adapter: does not fit base .*llama: .*does not have") as e:
        import_adapter(adapter, llama, tmp_path / "x")
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "x").exists()
    gpt2.save_pretrained(tmp_path / "gpt2-tuned")
    with pytest.raises(UnpatchError, match=r"gpt2-tuned has tensor .* that base .* lacks"):
        import_adapter(tmp_path / "gpt2-tuned", llama, tmp_path / "x")
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(tmp_path / "same")
    with pytest.raises(UnpatchError, match="the task vector is zero"):
        import_adapter(tmp_path / "same", llama, tmp_path / "x")
    (tmp_path / "empty").mkdir()
    r = cli("import", tmp_path / "empty", "--model", llama, "--out", tmp_path / "x")
    assert r.exit_code != 0 and isinstance(r.exception, UnpatchError) and "nothing to import" in str(r.exception)
