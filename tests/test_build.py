"""The build pipeline on tiny in-process models: ga raises the forget loss, both patch kinds
build, builds are deterministic, and a resumed build equals an uninterrupted one bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUILD_CONFIGS, FORGET, Crash, crash_at, tiny_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from unpatch.batches import Batches
from unpatch.builder import build
from unpatch.errors import UnpatchError
from unpatch.fingerprint import combine, tensor_sha256
from unpatch.patch.store import load_patch
from unpatch.targets import default_targets, target_weights


def recipe(tmp: Path, models_dir: Path, arch: str = "llama", name: str = "r.yaml", **sections) -> Path:
    (tmp / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(models_dir / arch), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": "lora", "rank": 4}, "train": {"steps": 8, "lr": 0.05, "batch_size": 4, "max_length": 16}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    p = tmp / name
    p.write_text(yaml.safe_dump(raw))
    return p


def forget_nll(model, folder: Path) -> float:
    b = Batches.from_texts(FORGET, AutoTokenizer.from_pretrained(folder), 16, len(FORGET), seed=0)[0]
    with torch.no_grad():
        return model(**b).loss.item()


def test_ga_lora_raises_forget_loss_and_loads_in_peft(tmp_path, models_dir):
    from peft import PeftModel

    patch = build(recipe(tmp_path, models_dir), out=tmp_path / "p")
    base = AutoModelForCausalLM.from_pretrained(models_dir / "llama")
    before = forget_nll(base, models_dir / "llama")
    # the base fingerprint covers the original weights of every LoRA-targeted module, bare names
    params = dict(base.named_parameters())
    assert len(patch.manifest.base.tensors) == 14
    assert all(patch.manifest.base.tensors[n] == tensor_sha256(params[n]) for n in patch.manifest.base.tensors)
    assert patch.manifest.base.fingerprint == combine(patch.manifest.base.tensors)
    assert patch.manifest.method == {"name": "ga", "params": {}} and patch.lora_config["lora_alpha"] == 16
    assert patch.lora_config["base_model_name_or_path"] == str(models_dir / "llama")
    after = forget_nll(PeftModel.from_pretrained(base, tmp_path / "p"), models_dir / "llama")
    assert after > before + 0.1, (before, after)
    assert load_patch(tmp_path / "p").patch_id == patch.patch_id
    assert not (tmp_path / "p.ckpt").exists()


def test_ga_delta_raises_forget_loss(tmp_path, models_dir):
    targets = ["q_proj", "down_proj"]
    patch = build(recipe(tmp_path, models_dir, patch={"kind": "delta", "target_modules": targets}), out=tmp_path / "p")
    base = AutoModelForCausalLM.from_pretrained(models_dir / "llama")
    names = sorted(target_weights(base, targets))
    assert sorted(patch.tensors) == names == sorted(patch.manifest.base.tensors) and len(names) == 4
    assert set(patch.encodings.values()) == {"dense"}
    before = forget_nll(base, models_dir / "llama")
    params = dict(base.named_parameters())
    with torch.no_grad():
        for n, d in patch.tensors.items():
            assert patch.manifest.base.tensors[n] == tensor_sha256(params[n])
            params[n].add_(d)
    assert forget_nll(base, models_dir / "llama") > before + 0.1


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_builds_are_deterministic(tmp_path, models_dir, kind):
    r = recipe(tmp_path, models_dir, patch={"kind": kind, "target_modules": ["v_proj", "up_proj"]})
    a, b = build(r, out=tmp_path / "a"), build(r, out=tmp_path / "b")
    for f in [f for f in a.manifest.files if f.endswith(".safetensors")]:  # tensors and metadata identical (file bytes: see the next test)
        sa, sb = safe_open(tmp_path / "a" / f, "pt"), safe_open(tmp_path / "b" / f, "pt")
        assert sa.metadata() == sb.metadata() and sorted(sa.keys()) == sorted(sb.keys())
        assert all(torch.equal(sa.get_tensor(k).view(torch.uint8), sb.get_tensor(k).view(torch.uint8)) for k in sa.keys())
    if kind == "lora":
        assert a.manifest.files == b.manifest.files
    c = build(r, out=tmp_path / "c", overrides=["train.seed=1"])
    assert c.manifest.files != a.manifest.files


def test_delta_files_are_byte_identical(tmp_path, models_dir):
    r = recipe(tmp_path, models_dir, patch={"kind": "delta", "target_modules": ["v_proj"]}, train={"steps": 1})
    first = build(r, out=tmp_path / "a").manifest.files
    assert all(build(r, out=tmp_path / f"b{i}").manifest.files == first for i in range(2))


def test_resume_after_crash_is_bit_identical(tmp_path, models_dir):
    r = recipe(tmp_path, models_dir, train={"steps": 7, "checkpoint_every": 2, "grad_accum": 2})
    clean = build(r, out=tmp_path / "clean")
    with pytest.raises(Crash):
        build(r, out=tmp_path / "p", on_step=crash_at(5))
    assert not (tmp_path / "p").exists() and (tmp_path / "p.ckpt").is_dir()  # a checkpoint, no half patch
    seen = []
    resumed = build(r, out=tmp_path / "p", resume=True, on_step=lambda s, m: seen.append(s),
                    overrides=["train.checkpoint_every=3"])  # the interval may change on resume
    assert seen == [5, 6, 7]  # continued from the step-4 checkpoint
    assert resumed.manifest.files == clean.manifest.files
    assert resumed.manifest.notes == clean.manifest.notes
    assert not (tmp_path / "p.ckpt").exists()


def test_resume_refuses_checkpoint_of_other_settings(tmp_path, models_dir):
    r = recipe(tmp_path, models_dir, train={"steps": 4, "checkpoint_every": 1})

    def crash(step, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(r, out=tmp_path / "p", on_step=crash)
    with pytest.raises(UnpatchError, match="checkpoint was made by a different recipe or settings"):
        build(r, out=tmp_path / "p", resume=True, overrides=["train.lr=0.5"])
    (tmp_path / "forget.txt").write_text("the cat sat\nthe dog ran\n")
    with pytest.raises(UnpatchError, match="checkpoint was made by a different recipe or settings"):
        build(r, out=tmp_path / "p", resume=True)


def test_existing_output_refused_before_work(tmp_path, models_dir):
    (tmp_path / "p").mkdir()
    r = recipe(tmp_path, models_dir, model={"id": str(tmp_path / "no-such-model")})
    with pytest.raises(UnpatchError, match="already exists; choose another --out or pass --overwrite"):
        build(r, out=tmp_path / "p")


def test_early_stop_and_bad_targets(tmp_path, models_dir):
    r = recipe(tmp_path, models_dir, train={"steps": 50, "early_stop": {"metric": "forget_loss", "above": 0}})
    p = build(r, out=tmp_path / "p")
    assert "stopped early: forget_loss" in p.manifest.notes[-1] and p.manifest.notes[0].startswith("Gradient ascent: 1 steps")
    r = recipe(tmp_path, models_dir, patch={"kind": "delta", "target_modules": ["nope"]})
    with pytest.raises(UnpatchError, match=r"r.yaml: patch.target_modules: none of nope is a linear layer"):
        build(r, out=tmp_path / "q")
    r = recipe(tmp_path, models_dir, patch={"target_modules": ["nope"]})
    with pytest.raises(UnpatchError, match=r"r.yaml: patch.target_modules: "):
        build(r, out=tmp_path / "q")


def test_gpt2_conv1d_both_kinds(tmp_path, models_dir):
    from peft import PeftModel

    lora = build(recipe(tmp_path, models_dir, "gpt2"), out=tmp_path / "l")
    assert lora.lora_config["fan_in_fan_out"] is True
    assert sorted(lora.lora_config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    base = AutoModelForCausalLM.from_pretrained(models_dir / "gpt2")
    before = forget_nll(base, models_dir / "gpt2")
    assert forget_nll(PeftModel.from_pretrained(base, tmp_path / "l"), models_dir / "gpt2") > before
    delta = build(recipe(tmp_path, models_dir, "gpt2", patch={"kind": "delta"}), out=tmp_path / "d")
    assert "transformer.h.0.attn.c_attn.weight" in delta.tensors and len(delta.tensors) == 8  # c_attn, 2x c_proj, c_fc per layer


def test_default_targets_per_family():
    expect = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "gpt2": ["c_attn", "c_proj", "c_fc"], "opt": ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"]}  # as each block registers them
    for arch, targets in expect.items():
        assert default_targets(AutoModelForCausalLM.from_config(BUILD_CONFIGS[arch]())) == targets
    llama = AutoModelForCausalLM.from_config(BUILD_CONFIGS["llama"]())
    assert "lm_head.weight" not in target_weights(llama, ["lm_head", "q_proj"])  # tied: appears once,
    assert "model.embed_tokens.weight" in target_weights(llama, ["lm_head"])  # under its first name


def test_batches_are_seeded_padded_and_masked():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    b = Batches.from_texts(FORGET, tok, 16, 3, seed=5)
    assert len(b) == 2 and [b.indices(i) for i in range(4)] == [Batches.from_texts(FORGET, tok, 16, 3, seed=5).indices(i) for i in range(4)]
    assert sorted(b.indices(0) + b.indices(1)) != list(range(6)) or b.indices(0) != [0, 1, 2]  # shuffled
    x = b[0]
    assert x["input_ids"].shape == x["labels"].shape == x["attention_mask"].shape
    assert ((x["labels"] == -100) == (x["attention_mask"] == 0)).all()
    assert b.indices(2) != b.indices(0) or b.indices(3) != b.indices(1)  # a new epoch, a new order


@pytest.mark.real
def test_smoke_recipe_on_smollm2(tmp_path):
    recipe_file = Path(__file__).parents[1] / "recipes" / "smoke.yaml"
    p = build(recipe_file, out=tmp_path / "smoke", overrides=["train.steps=2"], run_eval=False)
    assert p.manifest.kind == "lora" and len(p.manifest.base.tensors) == 210  # 30 layers x 7 projections
    assert p.manifest.base.revision and p.manifest.method["name"] == "ga"


@pytest.mark.real
def test_gender_recipe_card_has_model_index_and_before_after_tables(tmp_path):
    """The README's example recipe (2 steps here) writes a card that the Hub parses, with
    before/after CrowS-Pairs, StereoSet and WikiText-2 perplexity."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    recipe_file = Path(__file__).parents[1] / "recipes" / "gender.yaml"
    p = build(recipe_file, out=tmp_path / "gender", overrides=["train.steps=2"])
    card = ModelCard.load(tmp_path / "gender" / "README.md")
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.metric_name.split()[0] for r in results} >= {"crows_pairs", "stereoset", "perplexity"}
    assert all(isinstance(r.metric_value, float) for r in results)
    text = card.text
    for name in ("CrowS-Pairs", "StereoSet", "WikiText-2"):
        assert name in text, name
    evals = p.manifest.metrics["eval"]
    assert evals, "no metrics in the manifest"


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_patch_coefficient_ships_the_patch_at_that_strength(tmp_path, models_dir, kind):
    """patch.coefficient changes nothing in training: same payload, the manifest's coefficient
    is the method's times the recipe's, and --scale 1 of it equals --scale 2 of the plain build."""
    import copy

    from unpatch.model import load_model
    from unpatch.patch.apply import Applied

    one = build(recipe(tmp_path, models_dir, patch={"kind": kind}, train={"steps": 2}), out=tmp_path / "one", run_eval=False)
    two = build(recipe(tmp_path, models_dir, patch={"kind": kind, "coefficient": 2.0}, train={"steps": 2}),
                out=tmp_path / "two", run_eval=False)
    assert two.manifest.coefficient == 2 * one.manifest.coefficient
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
    model = load_model(str(models_dir / "llama"))[0]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    Applied(a).apply(one, 2.0)
    Applied(b).apply(two, 1.0)
    assert all(torch.equal(p.data, dict(b.named_parameters())[n].data) for n, p in a.named_parameters())
