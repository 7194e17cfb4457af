"""`lm_eval --model unpatch --model_args pretrained=BASE,patch=P,scale=s`: the registered lm-eval
model scores the base with the patch applied in memory, and equals lm-eval's own `hf` model on
the merged folder (`unpatch apply --scale s --out`). Offline: a tiny model and a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAIRS_LM_EVAL as PAIRS
from conftest import lm_eval_llama, write_lm_eval_task

from unpatch.patch.merged import apply_to_folder

LM_EVAL = Path(sys.executable).parent / "lm_eval"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_model")
    folder = root / "llama"
    _, patch = lm_eval_llama(root)
    apply_to_folder(str(folder), [(patch, 0.6)], root / "merged")
    write_lm_eval_task(root)
    return root, folder, patch.path


def loglikelihoods(samples: list[dict]) -> dict[str, list[float]]:
    return {s["doc"]["sent_more"]: [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in s["filtered_resps"]] for s in samples}


def test_lm_eval_cli_model_unpatch_equals_merged_folder(setup):
    root, folder, patch = setup
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([str(LM_EVAL), "--model", "unpatch", "--model_args", f"pretrained={folder},patch={patch},scale=0.6,dtype=float32",
                        "--tasks", "tiny_pairs", "--include_path", str(root), "--device", "cpu", "--batch_size", "4",
                        "--output_path", str(root / "out"), "--log_samples"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((root / "out").rglob("results_*.json")).read_text())
    samples = [json.loads(line) for f in (root / "out").rglob("samples_tiny_pairs_*.jsonl") for line in f.read_text().splitlines()]
    assert results["config"]["model"] == "unpatch" and len(samples) == len(PAIRS)

    # lm-eval's own HF model on the merged folder, asked for the same log-likelihoods (empty context, each sentence)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(root / "merged"), tokenizer=str(folder), device="cpu", batch_size=4, dtype="float32")
    docs = [s["doc"] for s in samples]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=("", d[k]), idx=0) for d in docs for k in ("sent_more", "sent_less")]
    merged = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = [v for s in samples for v in loglikelihoods([s])[s["doc"]["sent_more"]]]
    assert max(abs(a - b) for a, b in zip(ours, merged, strict=True)) < 1e-4, (ours, merged)
    acc = sum(merged[2 * i] > merged[2 * i + 1] for i in range(len(docs))) / len(docs)
    assert results["results"]["tiny_pairs"]["acc,none"] == pytest.approx(acc)  # the merged model's score
    # and the patch did something: the merged weights (the comparison's reference) differ from the base's
    from safetensors.torch import load_file

    a, b = load_file(folder / "model.safetensors"), load_file(root / "merged" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
