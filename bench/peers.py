"""Benchmark against two more peers: mergekit (end-to-end merge) and a plain HF `Trainer` (build speed).

    .venv/bin/python bench/peers.py [--work DIR] [--steps 12] [--train-repeats 3] [--skip-mergekit] [--skip-trainer]

Prints `name: value` lines (`#` lines are context).
apply_out_time_ratio_vs_mergekit   wall time of `unpatch apply PATCH --scale -1 --out A` over `mergekit-yaml`
    task_arithmetic (base + (-1) x (ft - base), `normalize: false`, float32) writing B, both as CLI
    subprocesses (imports and writes included; best of 5 alternating runs each, after an os.sync()),
    on the same two checkpoints: the SmolLM2-135M base folder and ft = base + a seeded random dense
    delta on every 2-D weight (written by `apply --out`; PATCH is that delta). apply_out_max_abs_diff_vs_mergekit: max |A - B| over every tensor.
    mergekit is not a dependency: it is imported from --mergekit-site (default
    ~/.cache/unpatch-bench/mergekit-site; installed there with `pip install --no-deps --target` if
    missing and PyPI answers), never into the venv. If it cannot be had, `mergekit_status: unavailable`.
build_steps_per_s_ratio_vs_trainer   optimizer steps/s of `build(recipes/task-vector-bias.yaml)` (plain
    NLL descent on a rank-8 LoRA, batch 8, max_length 64) over transformers' `Trainer` running the same
    objective on the same batches in the same order (build's seeded stream, read sequentially by the
    Trainer), LoRA config, batch size, lr and step count; both timed from the end of step 1 to the
    end of step N (setup and the first step excluded); best of --train-repeats alternating runs each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
RECIPE = ROOT / "recipes" / "task-vector-bias.yaml"
SITE = Path.home() / ".cache" / "unpatch-bench" / "mergekit-site"
REPEATS = 5
MERGEKIT = ["mergekit==0.1.5", "immutables==0.21"]  # the venv already has the rest (checked with pip --dry-run)


# ------------------------------------------------------------------------------ mergekit


def mergekit_env(site: Path) -> tuple[dict | None, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    probe = [sys.executable, "-c", "import mergekit.merge, torch; print(torch.__version__)"]
    if subprocess.run(probe, env=env, capture_output=True).returncode != 0:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *MERGEKIT],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return None, "pip install --target failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        p = subprocess.run(probe, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            return None, "mergekit does not import beside this torch/transformers: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    return env, "ok"


def bench_mergekit(work: Path, site: Path) -> None:
    from safetensors import safe_open

    from unpatch.fingerprint import combine, tensor_sha256
    from unpatch.model import checkpoint_folder, load_model, resolve_model
    from unpatch.patch.format import BaseRef, Manifest, Patch, library_versions
    from unpatch.patch.merged import apply_to_folder
    from unpatch.patch.store import save_patch

    env, why = mergekit_env(site)
    if env is None:
        print(f"# mergekit: {why}")
        print("mergekit_status: unavailable")
        return
    base_dir = checkpoint_folder(resolve_model(MODEL))
    model, _, _ = load_model(MODEL, "cpu")
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    tensors = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in params.items() if p.dim() == 2}
    hashes = {n: tensor_sha256(params[n].data) for n in tensors}
    manifest = Manifest(kind="delta", name="peers-delta", base=BaseRef(id=MODEL, dtype="float32", tensors=hashes,
                        fingerprint=combine(hashes)), versions=library_versions())
    del model, params
    patch = save_patch(Patch(manifest, tensors, encodings={n: "dense" for n in tensors}), work / "delta", overwrite=True)
    apply_to_folder(MODEL, [(patch, 1.0)], work / "ft", overwrite=True)  # the "fine-tuned" checkpoint
    cfg = work / "task_arithmetic.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base_dir}\nmodels:\n  - model: {work / 'ft'}\n"
                   "    parameters:\n      weight: -1.0\nparameters:\n  normalize: false\ndtype: float32\n", encoding="utf-8")
    ours = [sys.executable, "-m", "unpatch", "apply", str(work / "delta"), "--scale", "-1", "--out", str(work / "ours")]
    theirs = [sys.executable, str(site / "bin" / "mergekit-yaml"), str(cfg), str(work / "theirs")]
    # alternating runs, best of REPEATS per tool; os.sync() first, so neither run pays for the
    # other's dirty pages being written back (the kernel throttles a writer while it flushes)
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "mergekit": []}
    for _ in range(REPEATS):
        for name, cmd, e in (("ours", ours, None), ("mergekit", theirs, env)):
            shutil.rmtree(work / {"ours": "ours", "mergekit": "theirs"}[name], ignore_errors=True)
            os.sync()
            before = os.times()
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=work, env=e, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            after = os.times()
            runs[name].append((wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)))
            if r.returncode != 0:
                print(f"# {name} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                print("mergekit_status: failed")
                return
    times = {k: min(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: min(c for _, c in v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"# {k} wall seconds per run: {', '.join(f'{w:.2f}' for w, _ in v)}")
    print(f"# ours' first run is the patch's first use: its payload hash and finiteness check are not cached yet "
          f"(ratio {runs['ours'][0][0] / runs['mergekit'][0][0]:.3f} on the first runs)")
    a, b = read_all(work / "ours", safe_open), read_all(work / "theirs", safe_open)
    common = sorted(a.keys() & b.keys())
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in common)
    print(f"# mergekit 0.1.5 from {site}; tensors compared {len(common)} (ours {len(a)}, mergekit {len(b)})")
    print(f"mergekit_status: ok\napply_out_seconds: {times['ours']:.2f}\nmergekit_seconds: {times['mergekit']:.2f}")
    print(f"apply_out_time_ratio_vs_mergekit: {times['ours'] / times['mergekit']:.3f}")
    print(f"# CPU seconds (user+sys of the child process): ours {cpu['ours']:.2f}, mergekit {cpu['mergekit']:.2f}")
    print(f"apply_out_cpu_time_ratio_vs_mergekit: {cpu['ours'] / cpu['mergekit']:.3f}")
    print(f"# load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"apply_out_max_abs_diff_vs_mergekit: {diff:.3e}")
    for d in ("ft", "ours", "theirs"):  # three full checkpoints: ~1.6 GB of scratch
        shutil.rmtree(work / d, ignore_errors=True)


def read_all(folder: Path, safe_open) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ------------------------------------------------------------------------------ Trainer


def bench_trainer(work: Path, steps: int, repeats: int) -> None:
    from unpatch.batches import Batches, encode
    from unpatch.model import load_model
    from unpatch.recipe import load_recipe
    from unpatch.sources import load_data

    recipe = load_recipe(RECIPE, [f"train.steps={steps}"])
    t = recipe.train
    _, tok, _ = load_model(MODEL, "cpu")
    seqs = encode(load_data(recipe).forget, tok, t.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # The Trainer gets build's own batches, in build's order (Context.batches: data.forget's stream
    # is seeded with train.seed) and reads them sequentially: the same texts in every step, so
    # the ratio measures the two loops, not two samplers' luck with padding.
    order = Batches(seqs, t.batch_size, t.seed, pad)
    rows = [seqs[j] for i in range(steps) for j in order.indices(i)]
    real, padded = count_positions(rows, t.batch_size)
    runs: dict[str, list[tuple[list, float]]] = {"build": [], "Trainer": []}
    for _ in range(repeats):  # alternating, so a slow spell of the machine hits both tools
        runs["build"].append(run_build(work, steps))
        runs["Trainer"].append(run_trainer(work, recipe, rows, pad))
    print(f"# same objective: NLL on {len(seqs)} StereoSet gender stereotype sentences, LoRA r{recipe.patch.rank}, "
          f"batch {t.batch_size}, max_length {t.max_length}, lr {t.lr}, {steps} steps; torch threads {torch.get_num_threads()}")
    print(f"# both run the same {steps} batches: {real} real tokens, {padded} positions once padded "
          f"({padded / real:.2f}x; the Trainer computes the padded ones)")
    print(f"# step-1 loss (LoRA B = 0, so both are the base model's loss on batch 1): "
          f"build {runs['build'][0][1]:.6f}, Trainer {runs['Trainer'][0][1]:.6f}")
    best = {}
    for name, rs in runs.items():
        for st, _ in rs:
            print(f"# {name} seconds per step 2..N: {', '.join(f'{b[0] - a[0]:.2f}' for a, b in zip(st, st[1:], strict=False))}")
        rated = [rates(st) for st, _ in rs]
        print(f"# {name} steps/s per run: {', '.join(f'{w:.3f}' for w, _ in rated)}")
        best[name] = (max(w for w, _ in rated), max(c for _, c in rated))
    (ours, ours_cpu), (theirs, theirs_cpu) = best["build"], best["Trainer"]
    print(f"# best of {repeats} alternating runs per tool")
    print(f"build_steps_per_s: {ours:.3f}\ntrainer_steps_per_s: {theirs:.3f}")
    print(f"build_steps_per_s_ratio_vs_trainer: {ours / theirs:.3f}")
    print(f"# per CPU second (process time; steadier than wall time on a shared machine): build {ours_cpu:.3f}, "
          f"Trainer {theirs_cpu:.3f} steps/s")
    print(f"build_cpu_steps_per_s_ratio_vs_trainer: {ours_cpu / theirs_cpu:.3f}")
    print(f"# load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


def run_build(work: Path, steps: int) -> tuple[list, float]:
    """One `build` of the recipe: (wall, CPU) stamps at the end of each step, and step 1's loss."""
    from unpatch.builder import build

    stamps, losses = [], []
    build(RECIPE, out=work / "tv", overwrite=True, overrides=[f"train.steps={steps}"], run_eval=False,
          on_step=lambda i, m: (stamps.append((time.perf_counter(), time.process_time())), losses.append(m["loss"])))
    return stamps, losses[0]


def run_trainer(work: Path, recipe, rows: list[list[int]], pad: int) -> tuple[list, float]:
    """One HF Trainer run of the same LoRA fine-tune on `rows`, read in order: stamps and step 1's loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from unpatch.batches import collate
    from unpatch.model import load_model
    from unpatch.targets import default_targets

    t = recipe.train
    model, _, _ = load_model(MODEL, "cpu")
    cfg = LoraConfig(r=recipe.patch.rank, lora_alpha=recipe.patch.alpha, target_modules=default_targets(model),
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(t.seed)
    model = get_peft_model(model, cfg)
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

    args = TrainingArguments(output_dir=str(work / "trainer"), per_device_train_batch_size=t.batch_size,
                             max_steps=t.steps, learning_rate=t.lr, logging_strategy="steps", logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=t.seed,
                             dataloader_num_workers=0, remove_unused_columns=False, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=[{"ids": s} for s in rows],
                      data_collator=lambda b: collate([r["ids"] for r in b], pad), callbacks=[Stamp()])
    trainer.train()
    return stamps, float(next(h["loss"] for h in trainer.state.log_history if "loss" in h))


def count_positions(rows: list[list[int]], batch_size: int) -> tuple[int, int]:
    """Real tokens, and positions after right-padding each batch to its longest text."""
    batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    return sum(map(len, rows)), sum(len(b) * max(map(len, b)) for b in batches)


def rates(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """Steps per wall second and per process-CPU second, from the end of step 1 to the end of step N."""
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    return (len(stamps) - 1) / (w1 - w0), (len(stamps) - 1) / (c1 - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--train-repeats", type=int, default=3, help="alternating runs of each training loop; the best counts")
    ap.add_argument("--mergekit-site", type=Path, default=SITE)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-trainer", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="unpatch-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_trainer:
        bench_trainer(work, args.steps, args.train_repeats)
    if not args.skip_mergekit:
        bench_mergekit(work, args.mergekit_site)


if __name__ == "__main__":
    main()
