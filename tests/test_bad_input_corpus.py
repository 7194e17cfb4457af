"""The bad-input corpus (issue 12): careless and hostile inputs through the real entry point.

Each case asserts the exit code (2), ONE stderr line `error: ...` naming the culprit (option,
file, key or tensor), no traceback, and that nothing was written or changed: the case's output
folder stays empty and every file of the shared world keeps its bytes and mtime. Inputs are
built once per module on tiny GPT-2 models (tests/test_bad_input.py's World, extended here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_bad_input import World, assert_cli_error, leftovers

from unpatch.cli import main
from unpatch.fingerprint import combine, file_sha256


def _rehash(folder: Path, name: str) -> None:
    """Put a (deliberately damaged) file's true hash into the manifest, so the check under test
    is the one behind the hash check, not the hash check itself."""
    m = folder / "unpatch.json"
    raw = json.loads(m.read_text())
    raw["files"][name] = file_sha256(folder / name)
    m.write_text(json.dumps(raw))


class Corpus(World):
    def __init__(self, root: Path):
        super().__init__(root)
        self.outside = root / "secret.txt"  # a file outside every patch: must never leak in
        self.outside.write_text("not for the Hub")
        (root / "forget.txt").write_text("the cat sat on the mat\nthe dog ran far\n")
        self.recipe = root / "r.yaml"
        self.recipe.write_text(f"model: {{id: {self.base}}}\ndata: {{forget: forget.txt}}\nmethod: {{name: ga}}\n"
                               "patch: {kind: lora, rank: 4}\ntrain: {steps: 2, lr: 1.0e-3}\n")
        self.recipe_opts = root / "r-opts.yaml"
        self.recipe_opts.write_text(self.recipe.read_text() + "eval: {metrics: [forget_nll], options: {forget_nll: {limit: abc}}}\n")
        self.recipe_nan_opt = root / "r-nan.yaml"
        self.recipe_nan_opt.write_text(self.recipe.read_text() + "eval: {metrics: [forget_nll], options: {forget_nll: {limit: .nan}}}\n")
        self.binary_recipe = root / "binary.yaml"
        self.binary_recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
        self.fifo_recipe = root / "fifo.yaml"
        os.mkfifo(self.fifo_recipe)

        # the base check must not be a list the manifest can shorten
        first = sorted(self.delta.manifest.base.tensors)[0]
        self.dropped_tensor = first
        self.dropped = self._manifest("delta", "dropped", lambda m: self._drop(m, [first]))
        self.no_tensors = self._manifest("delta", "no-tensors", lambda m: self._drop(m, list(m["base"]["tensors"])))
        self.stale_fp = self._manifest("delta", "stale-fp", lambda m: m["base"].update(fingerprint="0" * 64))
        self.one_hash = self._manifest("delta", "one-hash", lambda m: self._edit_hash(m, first))
        self.no_files = self._manifest("delta", "no-files", lambda m: m.update(files={}))
        flipped = bytearray((self.no_files / "delta.safetensors").read_bytes())
        flipped[-1] ^= 0x01
        (self.no_files / "delta.safetensors").write_bytes(bytes(flipped))
        self.outside_files = self._manifest("delta", "outside-files", lambda m: m["files"].update({"../secret.txt": "0" * 64}))
        self.binary_manifest = self._copy("delta", "binary-manifest", "unpatch.json", b"\x00\xff\xfe\x01" * 8)

        # side files that are well hashed but malformed
        self.cfg_junk = self._copy("lora", "cfg-junk", "adapter_config.json", b"{not json")
        _rehash(self.cfg_junk, "adapter_config.json")
        self.cfg_alpha = self._lora_cfg("cfg-alpha", lambda c: c.update(lora_alpha="abc"))
        self.cfg_list = self._copy("lora", "cfg-list", "adapter_config.json", b"[1, 2]")
        _rehash(self.cfg_list, "adapter_config.json")
        self.cfg_edited = self._copy("lora", "cfg-edited", "adapter_config.json", b"{}")  # hash NOT updated
        self.meta_junk = self._delta_meta("meta-junk", lambda meta: "{not json")
        self.meta_enc = self._delta_meta("meta-enc", lambda meta: json.dumps(dict(meta, encodings={k: "sparse" for k in meta["encodings"]})))
        self.meta_neg = self._delta_meta("meta-neg", lambda meta: json.dumps(dict(meta, shapes={k: [-3, 32] for k in meta["shapes"]})))
        self.neg_shape = root / "neg-shape"
        shutil.copytree(self.delta.path, self.neg_shape)
        f = self.neg_shape / "delta.safetensors"
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
        header[name]["shape"] = [-header[name]["shape"][0], -header[name]["shape"][1]]  # same byte count
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # offsets are relative to the data start: only the length changes
        f.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
        _rehash(self.neg_shape, "delta.safetensors")
        self.neg_tensor = name

        # merged folders with a damaged ledger
        self.ledger_junk = self._merged("ledger-junk", "{torn")
        self.ledger_shape = self._merged("ledger-shape", json.dumps({"format": "unpatch-ledger", "base": {}, "applied": "x"}))

        # special files where a patch file should be
        self.fifo_payload = self._fifo("delta", "fifo-payload", "delta.safetensors")
        self.fifo_lora = self._fifo("lora", "fifo-lora", "adapter_model.safetensors")
        self.fifo_manifest = self._fifo("delta", "fifo-manifest", "unpatch.json")
        self.fifo_recipe_copy = self._fifo("delta", "fifo-recipe-copy", "recipe.yaml")

        # files outside the patch, linked in
        self.link_readme = self._link("link-readme", "README.md", self.outside)
        self.link_audit = self._link("link-audit", "audit.json", self.outside)
        self.link_plot = self._link("link-plot", "plot.png", self.outside)
        self.link_sweep = self._link("link-sweep", "sweep.json", self.outside)
        (root / "outside-dir").mkdir()
        (root / "outside-dir" / "x.txt").write_text("outside")
        self.link_dir = self._link("link-dir", "extra", root / "outside-dir")

        # reports that are regular files but not about this patch
        self.foreign_audit = root / "foreign-audit"
        shutil.copytree(self.lora.path, self.foreign_audit)
        (self.foreign_audit / "audit.json").write_text(json.dumps({"format": "unpatch-audit", "patch": {"id": "f" * 64}}))
        self.stray_sweep = root / "stray-sweep"
        shutil.copytree(self.lora.path, self.stray_sweep)
        (self.stray_sweep / "sweep.json").write_text(json.dumps({"recommended_scale": 9.0, "scales": [9.0]}))

        self.fifo_base = root / "fifo-base"  # a base whose weights file is a FIFO
        shutil.copytree(self.base, self.fifo_base)
        (self.fifo_base / "model.safetensors").unlink()
        os.mkfifo(self.fifo_base / "model.safetensors")

        # a base holding only pickled weights
        self.pickle_base = root / "pickle-base"
        shutil.copytree(self.base, self.pickle_base)
        import torch

        torch.save(load_file(self.pickle_base / "model.safetensors"), self.pickle_base / "pytorch_model.bin")
        (self.pickle_base / "model.safetensors").unlink()

    def _manifest(self, src: str, dst: str, edit) -> Path:
        shutil.copytree(self.root / src, self.root / dst)
        m = self.root / dst / "unpatch.json"
        raw = json.loads(m.read_text())
        edit(raw)
        m.write_text(json.dumps(raw))
        return self.root / dst

    @staticmethod
    def _drop(m: dict, names: list[str]) -> None:
        for n in names:
            del m["base"]["tensors"][n]
        m["base"]["fingerprint"] = combine(m["base"]["tensors"])  # consistent: only the list is short

    @staticmethod
    def _edit_hash(m: dict, name: str) -> None:
        m["base"]["tensors"][name] = hashlib.sha256(b"another base").hexdigest()
        m["base"]["fingerprint"] = combine(m["base"]["tensors"])

    def _lora_cfg(self, dst: str, edit) -> Path:
        shutil.copytree(self.root / "lora", self.root / dst)
        f = self.root / dst / "adapter_config.json"
        cfg = json.loads(f.read_text())
        edit(cfg)
        f.write_text(json.dumps(cfg))
        _rehash(self.root / dst, "adapter_config.json")
        return self.root / dst

    def _delta_meta(self, dst: str, meta_text) -> Path:
        from safetensors import safe_open

        shutil.copytree(self.root / "delta", self.root / dst)
        f = self.root / dst / "delta.safetensors"
        with safe_open(f, "pt") as st:
            meta = json.loads(st.metadata()["unpatch"])
        save_file(load_file(f), f, metadata={"unpatch": meta_text(meta)})
        _rehash(self.root / dst, "delta.safetensors")
        return self.root / dst

    def _merged(self, dst: str, ledger: str) -> Path:
        shutil.copytree(self.merged, self.root / dst)
        (self.root / dst / "unpatch_ledger.json").write_text(ledger)
        return self.root / dst

    def _fifo(self, src: str, dst: str, name: str) -> Path:
        shutil.copytree(self.root / src, self.root / dst)
        (self.root / dst / name).unlink(missing_ok=True)
        os.mkfifo(self.root / dst / name)
        return self.root / dst

    def _link(self, dst: str, name: str, target: Path) -> Path:
        shutil.copytree(self.root / "lora", self.root / dst)
        (self.root / dst / name).unlink(missing_ok=True)
        (self.root / dst / name).symlink_to(target)
        return self.root / dst


@pytest.fixture(scope="module")
def c(tmp_path_factory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with its kind, size, mtime (files) or link target: a write shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else None)
    return out


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so main() cannot swallow it."""


@pytest.fixture
def cli(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_corpus_dummy")  # push must fail on the patch, not on a missing token

    def alarm(*_):
        raise Hang("the command blocked")

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["unpatch", *map(str, args)])
        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(60)  # a FIFO read would block forever: fail the case instead of the suite
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run


P = "unused"  # a patch argument that is never reached: the option is refused first
# id -> (argv (corpus, out) -> list, needles (corpus) -> list): exit 2, one line, all needles in it
CASES = {
    # --- non-finite and out-of-range numbers, refused before any work
    "apply-scale-nan": (lambda c, o: ["apply", c.delta.path, "--scale", "nan", "--model", c.base, "--out", o / "m"], lambda c: ["--scale", "nan", "finite"]),
    "apply-scale-inf": (lambda c, o: ["apply", c.delta.path, "--scale", "inf", "--out", o / "m"], lambda c: ["--scale", "inf"]),
    "apply-scale-neg-inf": (lambda c, o: ["apply", c.delta.path, "--scale", "-inf"], lambda c: ["--scale", "-inf"]),
    "apply-scale-huge": (lambda c, o: ["apply", c.delta.path, "--scale", "1e9", "--out", o / "m"], lambda c: ["--scale", "1000"]),
    "apply-scale-second-nan": (lambda c, o: ["apply", c.delta.path, c.lora.path, "-s", "1", "-s", "nan", "--out", o / "m"], lambda c: ["--scale", "nan"]),
    "apply-scale-abc": (lambda c, o: ["apply", c.delta.path, "--scale", "abc"], lambda c: ["'--scale'"]),
    "scale-factor-nan": (lambda c, o: ["scale", c.delta.path, "--factor", "nan", "--out", o / "s"], lambda c: ["--factor", "nan"]),
    "scale-factor-inf": (lambda c, o: ["scale", c.lora.path, "--factor", "inf", "--out", o / "s"], lambda c: ["--factor", "inf"]),
    "scale-factor-huge": (lambda c, o: ["scale", c.lora.path, "--factor", "-1e12", "--out", o / "s"], lambda c: ["--factor"]),
    "scale-factor-abc": (lambda c, o: ["scale", c.lora.path, "--factor", "abc", "--out", o / "s"], lambda c: ["'--factor'"]),
    "scale-factor-missing": (lambda c, o: ["scale", c.lora.path, "--out", o / "s"], lambda c: ["--factor"]),
    "stack-coef-nan": (lambda c, o: ["stack", c.delta.path, c.lora.path, "--coef", "nan", "--out", o / "s"], lambda c: ["--coef", "nan"]),
    "stack-coef-inf": (lambda c, o: ["stack", c.delta.path, "--coef", "inf", "--out", o / "s"], lambda c: ["--coef", "inf"]),
    "stack-coef-huge": (lambda c, o: ["stack", c.delta.path, "--coef", "1e300", "--out", o / "s"], lambda c: ["--coef"]),
    "eval-scale-inf": (lambda c, o: ["eval", "--patch", c.delta.path, "--scale", "inf", "--model", c.base], lambda c: ["--scale", "inf"]),
    "eval-scale-nan": (lambda c, o: ["eval", "--patch", c.delta.path, "--scale", "nan"], lambda c: ["--scale", "nan"]),
    "eval-limit-zero": (lambda c, o: ["eval", "--patch", c.delta.path, "--limit", "0"], lambda c: ["--limit", "0"]),
    "eval-limit-negative": (lambda c, o: ["eval", "--patch", c.delta.path, "--limit", "-5"], lambda c: ["--limit", "-5"]),
    "eval-limit-abc": (lambda c, o: ["eval", "--patch", c.delta.path, "--limit", "abc"], lambda c: ["'--limit'"]),
    "eval-option-type": (lambda c, o: ["eval", "--patch", c.delta.path, "--metrics", "perplexity", "-O", "perplexity.max_length=abc"],
                         lambda c: ["perplexity", "'max_length'", "abc"]),
    "eval-option-nan": (lambda c, o: ["eval", "--patch", c.delta.path, "--metrics", "perplexity", "-O", "perplexity.max_length=.nan"],
                        lambda c: ["'max_length'", "finite"]),
    "sweep-scales-nan": (lambda c, o: ["sweep", c.delta.path, "--scales", "0,nan", "--no-write"], lambda c: ["--scales", "nan"]),
    "sweep-scales-inf-stop": (lambda c, o: ["sweep", c.delta.path, "--scales", "0:inf:1", "--no-write"], lambda c: ["--scales", "stop", "inf"]),
    "sweep-scales-nan-step": (lambda c, o: ["sweep", c.delta.path, "--scales", "0:1:nan"], lambda c: ["--scales", "step"]),
    "sweep-scales-huge": (lambda c, o: ["sweep", c.delta.path, "--scales", "0,1e9"], lambda c: ["--scales", "1000"]),
    "sweep-scales-reversed": (lambda c, o: ["sweep", c.delta.path, "--scales", "1:0:0.5"], lambda c: ["--scales", "start <= stop"]),
    "sweep-scales-abc": (lambda c, o: ["sweep", c.delta.path, "--scales", "a:b:c"], lambda c: ["--scales", "start:stop:step"]),
    "sweep-ppl-nan": (lambda c, o: ["sweep", c.delta.path, "--max-ppl-increase", "nan"], lambda c: ["--max-ppl-increase", "finite"]),
    "convert-rank-zero": (lambda c, o: ["convert", c.delta.path, "--to", "lora", "--rank", "0", "--out", o / "c"], lambda c: ["--rank", "0"]),
    "convert-rank-huge": (lambda c, o: ["convert", c.delta.path, "--to", "lora", "--rank", "100000000", "--out", o / "c"], lambda c: ["--rank", "100000000"]),
    "convert-rank-abc": (lambda c, o: ["convert", c.delta.path, "--to", "lora", "--rank", "abc"], lambda c: ["'--rank'"]),
    "audit-lr-nan": (lambda c, o: ["audit", c.lora.path, "--lr", "nan", "--out", o / "a.json"], lambda c: ["--lr", "nan"]),
    "audit-lr-zero": (lambda c, o: ["audit", c.lora.path, "--lr", "0", "--out", o / "a.json"], lambda c: ["--lr", "0"]),
    "audit-lr-huge": (lambda c, o: ["audit", c.lora.path, "--lr", "50", "--out", o / "a.json"], lambda c: ["--lr", "50"]),
    "audit-scale-inf": (lambda c, o: ["audit", c.lora.path, "--scale", "inf", "--out", o / "a.json"], lambda c: ["--scale", "inf"]),
    "audit-steps-negative": (lambda c, o: ["audit", c.lora.path, "--steps", "-1", "--out", o / "a.json"], lambda c: ["--steps", "-1"]),
    "audit-bits-one": (lambda c, o: ["audit", c.lora.path, "--bits", "1", "--out", o / "a.json"], lambda c: ["--bits", "1"]),
    "audit-limit-negative": (lambda c, o: ["audit", c.lora.path, "--limit", "-3", "--out", o / "a.json"], lambda c: ["--limit", "-3"]),
    # --- recipes: validate and build --dry-run check what a build would use
    "recipe-lr-nan": (lambda c, o: ["validate", c.recipe, "--set", "train.lr=.nan"], lambda c: ["r.yaml", "train.lr", "finite"]),
    "recipe-lr-inf": (lambda c, o: ["validate", c.recipe, "--set", "train.lr=.inf"], lambda c: ["train.lr", "finite"]),
    "recipe-lr-huge": (lambda c, o: ["validate", c.recipe, "--set", "train.lr=5"], lambda c: ["train.lr", "<= 1"]),
    "recipe-rank-huge": (lambda c, o: ["validate", c.recipe, "--set", "patch.rank=100000000"], lambda c: ["patch.rank", "100000000"]),
    "dry-run-rank-huge": (lambda c, o: ["build", c.recipe, "--dry-run", "--set", "patch.rank=100000000"], lambda c: ["patch.rank"]),
    "dry-run-lr-nan": (lambda c, o: ["build", c.recipe, "--dry-run", "--set", "train.lr=.nan", "--out", o / "b"], lambda c: ["train.lr"]),
    "recipe-alpha-inf": (lambda c, o: ["validate", c.recipe, "--set", "patch.alpha=.inf"], lambda c: ["patch.alpha"]),
    "recipe-coefficient-nan": (lambda c, o: ["validate", c.recipe, "--set", "patch.coefficient=.nan"], lambda c: ["patch.coefficient"]),
    "recipe-steps-huge": (lambda c, o: ["validate", c.recipe, "--set", "train.steps=100000000000"], lambda c: ["train.steps"]),
    "recipe-method-param-inf": (lambda c, o: ["validate", c.recipe, "--set", "method.name=npo", "--set", "method.beta=.inf"],
                                lambda c: ["method.beta", "finite"]),
    "recipe-data-limit-zero": (lambda c, o: ["validate", c.recipe, "--set", "data.forget.limit=0"], lambda c: ["data.forget.limit"]),
    "recipe-eval-option-abc": (lambda c, o: ["validate", c.recipe_opts], lambda c: ["r-opts.yaml", "eval.options.forget_nll", "'limit'", "abc"]),
    "dry-run-eval-option-abc": (lambda c, o: ["build", c.recipe_opts, "--dry-run"], lambda c: ["r-opts.yaml", "eval.options.forget_nll", "'limit'"]),
    "recipe-eval-option-nan": (lambda c, o: ["validate", c.recipe_nan_opt], lambda c: ["eval.options.forget_nll", "'limit'", "finite"]),
    "recipe-model-missing": (lambda c, o: ["validate", c.recipe, "--set", f"model.id={o / 'nowhere'}"], lambda c: ["model.id", "nowhere"]),
    "recipe-binary": (lambda c, o: ["validate", c.binary_recipe], lambda c: [str(c.binary_recipe), "not a text file"]),
    "recipe-fifo": (lambda c, o: ["validate", c.fifo_recipe], lambda c: [str(c.fifo_recipe), "FIFO"]),
    # --- the base check cannot be shortened or emptied away
    "fingerprint-entry-dropped": (lambda c, o: ["verify", c.dropped], lambda c: [str(c.dropped), repr(c.dropped_tensor), "base.tensors"]),
    "fingerprint-entry-dropped-apply": (lambda c, o: ["apply", c.dropped, "--model", c.other, "--out", o / "m"], lambda c: [repr(c.dropped_tensor)]),
    "fingerprint-all-dropped": (lambda c, o: ["verify", c.no_tensors, "--model", c.other], lambda c: [str(c.no_tensors), "base.tensors"]),
    "fingerprint-all-dropped-force": (lambda c, o: ["apply", c.no_tensors, "--model", c.base, "--out", o / "m", "--force"], lambda c: ["base.tensors"]),
    "fingerprint-field-stale": (lambda c, o: ["verify", c.stale_fp], lambda c: [str(c.stale_fp), "base.fingerprint"]),
    "fingerprint-one-hash-edited": (lambda c, o: ["verify", c.one_hash, "--model", c.base], lambda c: ["fingerprint", "1 differ", "--force"]),
    "files-emptied-and-byte-flipped": (lambda c, o: ["verify", c.no_files], lambda c: [str(c.no_files), "delta.safetensors", "no hash"]),
    "files-lists-outside": (lambda c, o: ["verify", c.outside_files], lambda c: ["../secret.txt"]),
    "manifest-binary": (lambda c, o: ["verify", c.binary_manifest], lambda c: [str(c.binary_manifest / "unpatch.json"), "JSON"]),
    # --- side files: corrupt, wrong shape, negative sizes
    "adapter-config-junk": (lambda c, o: ["verify", c.cfg_junk], lambda c: [str(c.cfg_junk / "adapter_config.json"), "not valid JSON"]),
    "adapter-config-alpha": (lambda c, o: ["apply", c.cfg_alpha, "--model", c.base, "--out", o / "m"], lambda c: ["adapter_config.json", "lora_alpha", "finite"]),
    "adapter-config-list": (lambda c, o: ["inspect", c.cfg_list], lambda c: ["adapter_config.json", "JSON object"]),
    "adapter-config-edited": (lambda c, o: ["verify", c.cfg_edited], lambda c: ["adapter_config.json", "differs from the hash"]),
    "delta-metadata-junk": (lambda c, o: ["verify", c.meta_junk], lambda c: [str(c.meta_junk / "delta.safetensors"), "metadata", "JSON"]),
    "delta-metadata-encoding": (lambda c, o: ["inspect", c.meta_enc], lambda c: ["delta.safetensors", "'sparse'"]),
    "delta-metadata-negative-shape": (lambda c, o: ["verify", c.meta_neg], lambda c: ["delta.safetensors", "[-3, 32]"]),
    "safetensors-negative-shape": (lambda c, o: ["verify", c.neg_shape], lambda c: ["delta.safetensors", repr(c.neg_tensor), "negative shape"]),
    "ledger-junk": (lambda c, o: ["revert", c.ledger_junk, "--out", o / "r"], lambda c: [str(c.ledger_junk / "unpatch_ledger.json"), "JSON"]),
    "ledger-junk-apply-on-top": (lambda c, o: ["apply", c.lora.path, "--model", c.ledger_junk, "--out", o / "m", "--force"],
                                 lambda c: ["unpatch_ledger.json", "JSON"]),
    "ledger-wrong-shape": (lambda c, o: ["revert", c.ledger_shape, "--out", o / "r"], lambda c: ["unpatch_ledger.json", "not a valid unpatch ledger"]),
    # --- special files never block
    "fifo-delta-payload": (lambda c, o: ["verify", c.fifo_payload], lambda c: [str(c.fifo_payload / "delta.safetensors"), "FIFO"]),
    "fifo-lora-payload": (lambda c, o: ["verify", c.fifo_lora], lambda c: [str(c.fifo_lora / "adapter_model.safetensors"), "FIFO"]),
    "fifo-manifest": (lambda c, o: ["verify", c.fifo_manifest], lambda c: [str(c.fifo_manifest / "unpatch.json"), "FIFO"]),
    "fifo-base-weights": (lambda c, o: ["apply", c.delta.path, "--model", c.fifo_base, "--out", o / "m"],
                          lambda c: [str(c.fifo_base / "model.safetensors"), "FIFO"]),
    "fifo-base-weights-verify": (lambda c, o: ["verify", c.delta.path, "--model", c.fifo_base], lambda c: ["model.safetensors", "FIFO"]),
    "fifo-base-weights-in-memory": (lambda c, o: ["apply", c.delta.path, "--model", c.fifo_base], lambda c: ["model.safetensors", "FIFO"]),
    "fifo-recipe-copy": (lambda c, o: ["inspect", c.fifo_recipe_copy], lambda c: ["recipe.yaml", "FIFO"]),
    # --- nothing from outside the patch leaves the machine or is copied in
    "push-readme-symlink": (lambda c, o: ["push", c.link_readme, "--repo", "me/x"], lambda c: [str(c.link_readme / "README.md"), "symlink"]),
    "push-audit-symlink": (lambda c, o: ["push", c.link_audit, "--repo", "me/x"], lambda c: ["audit.json", "symlink"]),
    "push-plot-symlink": (lambda c, o: ["push", c.link_plot, "--repo", "me/x"], lambda c: ["plot.png", "symlink"]),
    "push-foreign-audit": (lambda c, o: ["push", c.foreign_audit, "--repo", "me/x"], lambda c: [str(c.foreign_audit / "audit.json"), "not the audit of this patch"]),
    "push-stray-sweep": (lambda c, o: ["push", c.stray_sweep, "--repo", "me/x"], lambda c: ["sweep.json", "not the sweep recorded"]),
    "card-sweep-symlink": (lambda c, o: ["card", c.link_sweep], lambda c: ["sweep.json", "symlink"]),
    "card-folder-symlink": (lambda c, o: ["card", c.link_dir], lambda c: [str(c.link_dir / "extra"), "symlink"]),
    # --- pickle only where the command has and was given --allow-pickle; the hint only there
    "base-pickle-apply": (lambda c, o: ["apply", c.lora.path, "--model", c.pickle_base], lambda c: ["pytorch_model.bin", "--allow-pickle"]),
    "base-pickle-eval": (lambda c, o: ["eval", "--patch", c.lora.path, "--model", c.pickle_base, "--metrics", "perplexity"],
                         lambda c: ["pytorch_model.bin", "--allow-pickle"]),
    "patch-pickle-stack": (lambda c, o: ["stack", c.pickled, "--out", o / "s"], lambda c: ["adapter_model.bin", "pickled"]),
    "patch-pickle-push": (lambda c, o: ["push", c.pickled, "--repo", "me/x"], lambda c: ["adapter_model.bin", "pickled"]),
    "patch-pickle-card": (lambda c, o: ["card", c.pickled], lambda c: ["adapter_model.bin", "pickled"]),
    "patch-pickle-inspect": (lambda c, o: ["inspect", c.pickled], lambda c: ["adapter_model.bin", "pickled"]),
    # --- usage errors: exit 2 with the option or command named, never `internal error`
    "usage-unknown-command": (lambda c, o: ["aply", c.delta.path], lambda c: ["'aply'"]),
    "usage-unknown-option": (lambda c, o: ["apply", c.delta.path, "--scael", "1"], lambda c: ["--scael"]),
    "usage-missing-argument": (lambda c, o: ["apply"], lambda c: ["patches"]),
    "usage-missing-value": (lambda c, o: ["apply", c.delta.path, "--scale"], lambda c: ["--scale"]),
    "usage-missing-repo": (lambda c, o: ["push", c.delta.path], lambda c: ["--repo"]),
    # --- messages that used to blame the wrong thing
    "bf16-apply-names-dtype": (lambda c, o: ["apply", c.delta.path, "--model", c.base, "--dtype", "bfloat16"], lambda c: ["bfloat16", "float32", "--dtype"]),
}
NO_HINT = {"patch-pickle-stack", "patch-pickle-inspect", "patch-pickle-push", "patch-pickle-card"}  # commands without --allow-pickle must not suggest it


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(c, tmp_path, cli, case):
    argv, needles = CASES[case]
    before = snapshot(c.root)
    code, out, err = cli(*argv(c, tmp_path))
    assert_cli_error(code, out, err, needles(c))
    assert "internal error" not in err
    if case in NO_HINT:
        assert "--allow-pickle" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder
    assert snapshot(c.root) == before  # no input touched
    assert leftovers(c.root) == []


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60


def test_two_fingerprints_differ_in_a_mismatch(c, tmp_path, cli):
    """The message shows the patch's fingerprint and the model's, and they are not the same text."""
    code, _, err = cli("verify", c.one_hash, "--model", c.base)
    assert code == 2
    fps = [w.strip(",") for w in err.split() if len(w.strip(",")) == 16 and all(ch in "0123456789abcdef" for ch in w.strip(","))]
    assert len(fps) == 2 and fps[0] != fps[1], err


def test_version_help_and_completion(cli, monkeypatch):
    from unpatch import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"unpatch {__version__}"
    code, out, _ = cli("-h")
    assert code == 0 and "apply" in out and "--version" in out
    code, out, _ = cli("apply", "-h")
    assert code == 0 and "--scale" in out
    import typer.completion

    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")  # typer detects the shell from the process tree
    assert "--install-completion" in cli("--help")[1]
    code, out, err = cli("--show-completion")
    assert code == 0 and "unpatch" in out, err


def test_eval_option_given_in_the_recipe_wins_over_the_data_section(c, tmp_path):
    """eval.options.forget_nll.limit: 1 used to be silently replaced by data.forget's settings."""
    from unpatch.build_eval import build_plan
    from unpatch.recipe import load_recipe

    r = tmp_path / "r.yaml"
    shutil.copy(c.root / "forget.txt", tmp_path / "forget.txt")
    r.write_text(c.recipe.read_text().replace("forget: forget.txt", "forget: {source: forget.txt, limit: 2}")
                 + "eval: {metrics: [forget_nll], options: {forget_nll: {limit: 1}}}\n")
    _, options = build_plan(load_recipe(r))
    assert options["forget_nll"]["limit"] == 1
    r.write_text(r.read_text().replace("options: {forget_nll: {limit: 1}}", "options: {}"))
    _, options = build_plan(load_recipe(r))
    assert options["forget_nll"]["limit"] == 2  # without an option, the data section's limit applies


def test_push_uploads_a_fresh_card_not_the_file(c, tmp_path, monkeypatch):
    """README.md on disk is not hashed, so push renders it afresh; an inside link is fine."""
    from unpatch import hub
    from unpatch.patch.card import render_card
    from unpatch.patch.store import load_patch, read_extras

    shutil.copytree(c.lora.path, tmp_path / "p")
    (tmp_path / "p" / "README.md").write_text("forged card with a secret")
    p = load_patch(tmp_path / "p")
    (tmp_path / "p" / "audit.json").write_text(json.dumps({"format": "unpatch-audit", "patch": {"id": p.patch_id}}))
    (tmp_path / "p" / "plot.png").symlink_to("audit.json")  # inside, but not a PNG
    (tmp_path / "first").mkdir()
    with pytest.raises(Exception, match="plot.png: not a PNG"):
        hub.stage(p, hub.files_to_push(p), tmp_path / "first")
    (tmp_path / "p" / "plot.png").unlink()
    (tmp_path / "stage").mkdir()
    files = hub.files_to_push(p)
    hub.stage(p, files, tmp_path / "stage")
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "secret" not in card and card == render_card(p, read_extras(tmp_path / "p"))
    assert sorted(os.listdir(tmp_path / "stage")) == sorted(set(files) | {"README.md"})


def test_console_script_usage_error_and_version(c, tmp_path):
    """The installed `unpatch` script itself (typer's bundled click raises its own exception types)."""
    import subprocess

    exe = Path(sys.executable).parent / "unpatch"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    jobs = {"abc": [str(exe), "apply", str(c.delta.path), "--scale", "abc"], "version": [str(exe), "--version"]}
    procs = {k: subprocess.Popen(v, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k, v in jobs.items()}
    res = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}
    code, out, err = res["abc"]
    assert_cli_error(code, out, err, ["'--scale'"])
    code, out, err = res["version"]
    assert code == 0 and out.startswith("unpatch ") and err == ""


def test_links_inside_a_hub_cache_snapshot_are_the_patch_s_own(tmp_path):
    """A pulled patch is a snapshot of symlinks into the repo's blobs: those count as its own
    files; a link anywhere else is refused by name."""
    from unpatch.checks import own_file
    from unpatch.errors import UnpatchError

    snap = tmp_path / "models--me--p" / "snapshots" / "abc"
    blobs = tmp_path / "models--me--p" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "h1").write_text("card")
    (snap / "README.md").symlink_to("../../blobs/h1")
    (tmp_path / "elsewhere").write_text("secret")
    (snap / "audit.json").symlink_to(tmp_path / "elsewhere")
    assert own_file(snap, "README.md") == snap / "README.md"
    assert own_file(snap, "missing.png") is None
    with pytest.raises(UnpatchError, match="audit.json: is a symlink"):
        own_file(snap, "audit.json")
