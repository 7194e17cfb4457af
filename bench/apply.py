"""Benchmark: applying / merging / reverting patches on the real SmolLM2-135M, side by side in one run.

Run `python bench/apply.py [--quick]`. Prints one `name: value` line per figure; `#` lines are context.
Timings are best-of-N (N = 5, or 3 with --quick, always after one warm-up) on the model as loaded by
`unpatch.model.load_model` (read into memory, not mmapped). On a machine shared with other busy
processes, wall times of multi-threaded kernels mostly measure preemption: `--cpu-time` then times
every best-of-N with the calling thread's CPU time (time.thread_time) and one torch thread.

delta_apply_bound_fraction   bound / t_add, where t_add = raw in-place add path (`Update.add_to` over every
    update of a dense delta on all 2-D parameters; named_parameters, so the tied embedding counts once) and
    bound = 3 x delta bytes (read W, read delta, write W) / copy bandwidth; copy bandwidth = 2 x bytes / best
    time of `dst.copy_(src)` between two fp32 buffers as large as the delta.
delta_apply_seconds = t_add; delta_apply_full_seconds = `Applied(model).apply(patch, 0.6)` on a fresh `Applied`,
    i.e. t_add plus shape checks, the base fingerprint check and the revert copy. The model comes from
    load_model, so the fingerprint is the base file's cached hashes and the originals are read back from
    the file at revert (unpatch.provenance); a `#` line gives the check, and what hashing (sha256, blake3)
    and a full backup copy would cost without them.
lora_merge_time_ratio_vs_peft  MAIN: our merge over peft's `merge_and_unload()` of the same rank-16 LoRA
    (q,k,v,o,gate,up,down of all layers, random nonzero B), like for like: `Applied(model,
    keep_originals=False).apply` (no backup copy, as merge_and_unload keeps none) on a model whose base
    fingerprint this `Applied` has already checked (paid once per model load, reported on a `#` line;
    peft's `PeftModel.from_pretrained` on a fresh base copy is likewise untimed).
    lora_apply_exact_time_ratio_vs_peft: the default `Applied.apply`, which also keeps the CPU copy that
    makes revert bit-exact. lora_merge_raw_time_ratio_vs_peft: the bare add_to loop.
lora_merge_max_abs_diff_vs_peft  max |ours - peft| over all parameters after the merge (target 0).
revert_bit_exact  true iff (a) in memory: apply delta and LoRA, `Applied.revert()` -> every parameter equals
    the original as raw bytes, and (b) on folders: revert_folder(apply_to_folder(base, [(delta, 0.6)])) equals
    apply_to_folder(base, [(delta, 0.0)]) tensor by tensor as raw bytes.
apply_out_peak_over_largest_tensor  in a fresh subprocess: (peak RSS during `apply_to_folder` - RSS just
    before it) / bytes of the largest base tensor (the embedding). Peak = max of VmHWM (reset through
    /proc/self/clear_refs) and a 2 ms VmRSS sampler. apply_out_seconds: wall time of that call (with fsync).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from unpatch.fingerprint import combine, tensor_hash, tensor_hashes, tensor_sha256
from unpatch.model import checkpoint_folder, load_model, resolve_model
from unpatch.patch.apply import Applied
from unpatch.patch.format import BaseRef, Manifest, Patch, library_versions, lora_config_dict
from unpatch.patch.merged import Checkpoint, apply_to_folder, revert_folder
from unpatch.patch.store import load_patch, save_patch

MODEL = "smollm2-135m"
SCALE = 0.6
CLOCK = time.perf_counter  # time.thread_time under --cpu-time
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def best_of(n: int, fn, setup=None, teardown=None) -> float:
    """Min CLOCK time of fn() over n runs after one warm-up; setup/teardown run untimed around each."""
    times = []
    for _ in range(n + 1):
        state = setup() if setup else None
        t0 = CLOCK()
        fn(state) if setup else fn()
        times.append(CLOCK() - t0)
        teardown(state) if teardown else None
    return min(times[1:])


def copy_bandwidth(n: int, nbytes: int) -> float:
    """Bytes/s of dst.copy_(src) between two fp32 buffers (2 x bytes moved: read src, write dst).
    Each buffer is as large as the delta, so the footprint matches the apply's (this CPU may
    report an L3 of several hundred MB: smaller buffers would partly measure cache)."""
    src, dst = torch.randn(nbytes // 4), torch.randn(nbytes // 4)
    t = best_of(n, lambda: dst.copy_(src))
    return 2 * src.nbytes / t


def base_ref(model, names) -> BaseRef:
    params = dict(model.named_parameters())
    tensors = {n: tensor_sha256(params[n].data) for n in names}
    return BaseRef(id=MODEL, dtype="float32", tensors=tensors, fingerprint=combine(tensors))


def dense_delta_patch(model) -> Patch:
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in model.named_parameters() if p.dim() == 2}
    manifest = Manifest(kind="delta", name="bench-delta", base=base_ref(model, tensors), versions=library_versions())
    return Patch(manifest, tensors, encodings={n: "dense" for n in tensors})


def lora_patch(model, rank: int = 16) -> Patch:
    """Built through peft (like tests/conftest.make_lora_patch): random A, random nonzero B."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight" for k in state}
    manifest = Manifest(kind="lora", name="bench-lora", base=base_ref(model, modules), versions=library_versions())
    return Patch(manifest, state, lora_config_dict(pm.peft_config["default"], MODEL))


def raw_add(model, patch: Patch, scale: float):
    params, updates = dict(model.named_parameters()), patch.updates()
    with torch.no_grad():
        for name, u in updates.items():
            u.add_to(params[name].data, scale)


def time_applied(model, patch: Patch, scale: float, n: int, warm: bool = False) -> float:
    """Best time of the full Applied.apply; each repeat starts from the base (revert untimed).
    `warm`: one Applied for all repeats, so the base fingerprint is hashed once, as in `unpatch eval`."""
    shared = Applied(model)
    return best_of(n, lambda a: a.apply(patch, scale), setup=lambda: shared if warm else Applied(model),
                   teardown=lambda a: a.revert())


def restore(model, snap) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.data.copy_(snap[n])


def bench_delta(model, patch: Patch, n: int, bw: float, pristine) -> None:
    nbytes = sum(t.nbytes for t in patch.tensors.values())
    bound = 3 * nbytes / bw
    t_add = best_of(n, lambda: raw_add(model, patch, SCALE))
    restore(model, pristine)
    t_full = time_applied(model, patch, SCALE, n)
    a = Applied(model)
    a.apply(patch, SCALE)
    copies = sum(isinstance(o, torch.Tensor) for o in a.originals.values())
    a.revert()
    # the fingerprint check of a fresh Applied: base hashes from the file-identity cache (hashcache)
    t_check = best_of(n, lambda a: a.base_hashes(patch.updates()), setup=lambda: Applied(model))
    params = dict(model.named_parameters())
    mem = {k: params[k].data for k in patch.tensors}
    # thread CPU time sees only this thread: then hash in it (one core) instead of in the pool
    hash_all = (lambda algo: [tensor_hash(t, algo) for t in mem.values()]) if CLOCK is time.thread_time \
        else (lambda algo: tensor_hashes(mem, algo))
    cold = {algo: best_of(n, lambda algo=algo: hash_all(algo)) for algo in ("sha256", "blake3")}
    t_backup = best_of(n, lambda: {k: t.to("cpu", copy=True) for k, t in mem.items()})
    x, y = torch.randn(nbytes // 4), torch.randn(nbytes // 4)
    t_flat = best_of(n, lambda: x.add_(y, alpha=SCALE))
    print(f"# delta: {len(patch.tensors)} tensors, {nbytes / 1e6:.1f} MB; copy bandwidth {bw / 1e9:.2f} GB/s; bound {bound:.4f} s")
    print(f"delta_apply_bound_fraction: {bound / t_add:.4f}")
    print(f"delta_apply_seconds: {t_add:.4f}")
    print(f"delta_apply_full_seconds: {t_full:.4f}")
    print(f"delta_apply_full_bound_fraction: {bound / t_full:.4f}")
    print(f"# of the full apply: fingerprint check {t_check:.4f} s (the base file's cached hashes), backup copies "
          f"{copies} of {len(patch.tensors)} tensors (the rest read back from the base file at revert), add {t_add:.4f} s")
    print(f"# without the cache (once per base file version): sha256 {cold['sha256']:.4f} s ({nbytes / cold['sha256'] / 1e9:.2f} GB/s), "
          f"blake3 {cold['blake3']:.4f} s ({nbytes / cold['blake3'] / 1e9:.2f} GB/s); a full backup copy {t_backup:.4f} s")
    print(f"# reference: x.add_(y, alpha) on two flat {nbytes / 1e6:.0f} MB buffers {t_flat:.4f} s "
          f"(bound fraction {bound / t_flat:.4f})")


def bench_lora(model, patch: Patch, folder: Path, n: int, pristine) -> None:
    from peft import PeftModel

    def peft_setup():
        gc.collect()
        return PeftModel.from_pretrained(copy.deepcopy(model), folder)

    t_peft = best_of(n, lambda pm: pm.merge_and_unload(), setup=peft_setup)
    t_exact = time_applied(model, patch, 1.0, n, warm=True)
    t_hash = best_of(n, lambda a: a.base_hashes(patch.updates()), setup=lambda: Applied(model))

    def merge_setup():
        restore(model, pristine)
        a = Applied(model, keep_originals=False)
        a.base_hashes(patch.updates())
        return a

    t_full = best_of(n, lambda a: a.apply(patch, 1.0), setup=merge_setup)
    restore(model, pristine)
    t_raw = best_of(n, lambda: raw_add(model, patch, 1.0))
    restore(model, pristine)
    merged = peft_setup().merge_and_unload()
    applied = Applied(model)
    applied.apply(patch, 1.0)
    ours, theirs = dict(model.named_parameters()), dict(merged.named_parameters())
    diff = max((ours[k].data - theirs[k].data).abs().max().item() for k in ours)
    same = all(torch.equal(ours[k].data.view(torch.int32), theirs[k].data.view(torch.int32)) for k in ours)
    applied.revert()
    print(f"# lora: rank 16 on {len(patch.updates())} modules; peft merge_and_unload {t_peft:.4f} s, "
          f"ours merge {t_full:.4f} s, ours with exact-revert copy {t_exact:.4f} s, raw add_to loop {t_raw:.4f} s; "
          f"base fingerprint check once per load {t_hash:.4f} s")
    print(f"lora_merge_time_ratio_vs_peft: {t_full / t_peft:.4f}")
    print(f"lora_apply_exact_time_ratio_vs_peft: {t_exact / t_peft:.4f}")
    print(f"lora_merge_raw_time_ratio_vs_peft: {t_raw / t_peft:.4f}")
    print(f"lora_merge_max_abs_diff_vs_peft: {diff:.3e}")
    print(f"# lora merge bit-identical to peft: {str(same).lower()}")


def bench_revert(model, delta: Patch, lora: Patch, delta_dir: Path, tmp: Path, pristine) -> None:
    applied = Applied(model)
    applied.apply(delta, SCALE)
    applied.apply(lora, 1.0)
    verified = applied.revert()
    mem_ok = all(torch.equal(p.data.view(torch.int32), pristine[n].view(torch.int32)) for n, p in model.named_parameters())
    patch = load_patch(delta_dir)
    apply_to_folder(MODEL, [(patch, SCALE)], tmp / "M1")
    report = revert_folder(tmp / "M1", out=tmp / "M0")
    apply_to_folder(MODEL, [(patch, 0.0)], tmp / "B")
    m0, b = Checkpoint(tmp / "M0"), Checkpoint(tmp / "B")
    folder_ok = m0.where.keys() == b.where.keys() and all(
        torch.equal(m0.read(k).view(torch.uint8), b.read(k).view(torch.uint8)) for k in m0.where)
    print(f"# revert in memory: bit-exact {str(mem_ok).lower()}, Applied.revert() verified {str(verified).lower()}")
    print(f"# revert on folders: bit-exact {str(folder_ok).lower()}, report {report['mode']} verified "
          f"{str(report['verified']).lower()}")
    print(f"revert_bit_exact: {str(mem_ok and folder_ok).lower()}")


def child(delta_dir: str, out: str) -> None:
    """Fresh process: peak RSS of apply_to_folder above the RSS just before it."""
    def rss(field="VmRSS") -> int:
        line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    patch = load_patch(delta_dir)
    gc.collect()
    try:  # "5" resets VmHWM (the peak) to the current RSS
        hwm_reset = Path("/proc/self/clear_refs").write_text("5") > 0
    except OSError:
        hwm_reset = False
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    (th := threading.Thread(target=sample, daemon=True)).start()
    t0 = time.perf_counter()
    apply_to_folder(MODEL, [(patch, SCALE)], out)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    hwm = rss("VmHWM") if hwm_reset else 0
    print(json.dumps({"baseline": base, "sampled_peak": peak[0], "hwm": hwm, "hwm_reset": hwm_reset, "seconds": seconds}))


def bench_apply_out(delta_dir: Path, tmp: Path) -> None:
    r = subprocess.run([sys.executable, __file__, "--child", str(delta_dir), str(tmp / "child_out")],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ckpt = Checkpoint(checkpoint_folder(resolve_model(MODEL)))
    largest = max(f.nbytes(k) for f in ckpt.files for k in f.keys())
    peak = max(res["sampled_peak"], res["hwm"]) - res["baseline"]
    print(f"# apply --out child: baseline RSS {res['baseline'] / 1e6:.1f} MB, peak above it {peak / 1e6:.1f} MB "
          f"(sampled {(res['sampled_peak'] - res['baseline']) / 1e6:.1f} MB, VmHWM reset {res['hwm_reset']}), "
          f"largest tensor {largest / 1e6:.1f} MB")
    print(f"apply_out_peak_over_largest_tensor: {peak / largest:.3f}")
    print(f"apply_out_seconds: {res['seconds']:.3f}")


def main() -> None:
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 timed repeats instead of 5")
    ap.add_argument("--cpu-time", action="store_true", help="time with thread CPU time and 1 torch thread")
    ap.add_argument("--child", nargs=2, metavar=("PATCH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if args.cpu_time:
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    n, t_start = (3 if args.quick else 5), time.perf_counter()
    model, _, _ = load_model(MODEL, device="cpu")
    pristine = {k: p.detach().clone() for k, p in model.named_parameters()}
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, best of {n} after a warm-up, "
          f"{'thread CPU' if args.cpu_time else 'wall'} time; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if os.getloadavg()[0] > os.cpu_count() and not args.cpu_time:
        print("# WARNING: the machine is busy (load > CPUs): wall timings measure preemption; rerun with --cpu-time")
    bw = copy_bandwidth(n, sum(p.nbytes for p in model.parameters() if p.dim() == 2))
    delta, lora = dense_delta_patch(model), lora_patch(model)
    with tempfile.TemporaryDirectory(prefix="unpatch-bench-") as d:
        tmp = Path(d)
        delta, lora = save_patch(delta, tmp / "delta"), save_patch(lora, tmp / "lora")
        bench_delta(model, delta, n, bw, pristine)
        bench_lora(model, lora, tmp / "lora", n, pristine)
        bench_revert(model, delta, lora, tmp / "delta", tmp, pristine)
        for sub in ("M1", "M0", "B"):
            shutil.rmtree(tmp / sub)
        bench_apply_out(tmp / "delta", tmp)
    print(f"# total {time.perf_counter() - t_start:.1f} s wall; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
