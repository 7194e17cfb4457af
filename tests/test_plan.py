"""`unpatch build --dry-run` (unpatch.plan) against hand computations on the tiny models, the
micro-batch decision as a pure function, and fp32 accumulation of a delta on a bf16 base."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import FORGET
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from unpatch.builder import build
from unpatch.cli import app
from unpatch.distributed import activation_bytes_per_token, choose_chunks
from unpatch.errors import UnpatchError
from unpatch.plan import make_plan, render


def recipe(tmp, models_dir, arch="llama", **sections):
    (tmp / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(models_dir / arch), "device": "cpu"}, "data": {"forget": "forget.txt"}, "method": {"name": "ga"},
           "patch": {"kind": "lora", "rank": 4}, "train": {"steps": 1, "lr": 0.05, "batch_size": 4, "max_length": 16}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "r.yaml"


def test_lora_plan_counts_by_hand_and_matches_the_build(tmp_path, models_dir):
    # tiny llama: hidden 32, intermediate 64, 4 heads of 8, 2 kv heads (k/v out 16), 2 layers, rank 4
    # per layer, r*(in+out): q 4*(32+32) + k 4*(32+16) + v 4*(32+16) + o 4*(32+32) + gate/up/down 3 * 4*(32+64) = 2048
    plan = make_plan(recipe(tmp_path, models_dir), measure=False)
    assert len(plan.touched) == 14 and plan.touched["model.layers.0.self_attn.k_proj.weight"] == (16, 32)
    assert plan.trainable == 2 * 2048 and plan.patch_bytes == 4 * 2 * 2048  # fp32 A and B
    # embed 128*32 (lm_head tied: once) + per layer (q,o 32*32; k,v 16*32; gate,up,down 64*32; 2 norms 32) + final norm 32
    assert plan.total_params == 128 * 32 + 2 * (2 * 1024 + 2 * 512 + 3 * 2048 + 2 * 32) + 32
    assert plan.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models_dir / "llama").parameters())
    assert plan.memory["weights"] == 4 * plan.total_params and plan.memory["AdamW state"] == 8 * 4096
    assert plan.memory["activations"] == 4 * 16 * activation_bytes_per_token(_cfg(models_dir), 4)
    built = build(tmp_path / "r.yaml", out=tmp_path / "p", run_eval=False)
    assert sum(t.numel() * t.element_size() for t in built.tensors.values()) == plan.patch_bytes
    assert sorted(built.manifest.base.tensors) == sorted(plan.touched)


def test_delta_plan_on_gpt2_conv1d(tmp_path, models_dir):
    r = recipe(tmp_path, models_dir, "gpt2", patch={"kind": "delta", "target_modules": ["c_attn"]}, model={"dtype": "bfloat16"})
    plan = make_plan(r, measure=False)
    # Conv1D stores [in, out]: c_attn is 32 -> 96; 2 layers; fp32 deltas
    assert plan.touched == {f"transformer.h.{i}.attn.c_attn.weight": (96, 32) for i in range(2)}
    assert plan.trainable == 2 * 96 * 32 and plan.patch_bytes == 4 * 2 * 96 * 32
    # wte 128*32 + wpe 64*32 + 2 layers (ln 2*64, c_attn 32*96+96, c_proj 32*32+32, c_fc 32*128+128, proj 128*32+32) + ln_f 64
    assert plan.total_params == 4096 + 2048 + 2 * (128 + 3168 + 1056 + 4224 + 4128) + 64 == 31616
    assert plan.dtype == "bfloat16" and plan.memory["weights"] == 2 * 31616
    assert plan.memory["fp32 masters + grads"] == 8 * 6144  # bf16 weights train through fp32 masters


def test_time_and_render(tmp_path, models_dir):
    plan = make_plan(recipe(tmp_path, models_dir, train={"steps": 10}), measure=False)
    # ga: forward 2N + backward 2N per token plus 2 per trainable parameter; 4 rows x 16 tokens per step
    assert plan.flops_per_step == (4 * plan.total_params + 2 * plan.trainable) * 4 * 16
    plan.flops_per_second = plan.flops_per_step  # one step per second
    assert plan.seconds == pytest.approx(10)
    text = "\n".join(render(plan))
    assert "touches  14 tensors" in text and "16,384 bytes" in text and "~10 s for 10 steps" in text


def test_cli_dry_run_runs_nothing(tmp_path, models_dir):
    res = CliRunner().invoke(app, ["build", str(recipe(tmp_path, models_dir)), "--dry-run", "--out", str(tmp_path / "p"),
                                   "--device", "cpu", "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    assert "touches  14 tensors" in res.output and "bfloat16 on cpu" in res.output and "GFLOP/s" in res.output
    assert not (tmp_path / "p").exists()


def test_choose_chunks_from_free_memory():
    GB = 10**9
    # 8 rows of 1 GB activations; 2.5 GB for gradients + optimizer; 15 % headroom
    assert choose_chunks(8, 20 * GB, int(2.5 * GB), GB) == 1  # 14.5 GB: all 8 rows at once
    assert choose_chunks(8, 10 * GB, int(2.5 * GB), GB) == 2  # 6 GB: 6 rows fit -> 2 slices of 4
    assert choose_chunks(8, 5 * GB, int(2.5 * GB), GB) == 8  # 1.75 GB: one row at a time
    assert choose_chunks(3, 10 * GB, int(2.5 * GB), GB) == 1  # a rank's 3 rows fit
    with pytest.raises(UnpatchError, match=r"^train.max_length: one row needs ~1.00 GB"):
        choose_chunks(8, 2 * GB, int(2.5 * GB), GB)


def test_activation_estimate_by_hand(models_dir):
    # llama tiny, fp32: 2 layers * 4 B * (10*32 + 4*64) + vocab 128 * (4 + 4 + 4)
    assert activation_bytes_per_token(_cfg(models_dir), 4) == 2 * 4 * (320 + 256) + 128 * 12


def test_bf16_delta_accumulates_in_fp32(tmp_path, models_dir):
    """lr 1e-5 is below half a bf16 ulp of these weights (~1e-4 at |w| ~ 0.02): stepping the bf16
    weights directly would round every update away. The fp32 masters keep them: the delta is the
    exact sum of AdamW's steps (~lr per step and entry), stored in fp32."""
    r = recipe(tmp_path, models_dir, patch={"kind": "delta", "target_modules": ["q_proj"]}, model={"dtype": "bfloat16"},
               train={"steps": 2, "lr": 1e-5, "max_grad_norm": None})
    p = build(r, out=tmp_path / "p", run_eval=False)
    assert p.manifest.base.dtype == "bfloat16"
    for t in p.tensors.values():
        assert t.dtype == torch.float32
        assert 0.5e-5 < float(t.abs().max()) <= 2.02e-5  # two AdamW steps of at most ~lr each
        assert float((t != 0).float().mean()) > 0.9


def _cfg(models_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(models_dir / "llama")


def test_fp16_lora_trains_with_loss_scaling(tmp_path, models_dir):
    """fp16 compute: the adapters stay fp32 (peft) and the loss is scaled so small gradients survive."""
    p = build(recipe(tmp_path, models_dir, model={"dtype": "float16"}, train={"steps": 2}), out=tmp_path / "p", run_eval=False)
    assert p.manifest.base.dtype == "float16"
    b = [t for k, t in p.tensors.items() if "lora_B" in k]
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in p.tensors.values())
    assert any(float(t.abs().max()) > 0 for t in b)  # B starts at 0: it moved
