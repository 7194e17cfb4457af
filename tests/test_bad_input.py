"""Every bad input gives a one-line UnpatchError naming the culprit, and through the CLI exit
code 2 with a single `error:` line on stderr and no traceback. Failed writes leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_delta_patch, make_lora_patch, state_equal, tiny_model
from safetensors.torch import load_file

from unpatch.cli import main
from unpatch.errors import UnpatchError
from unpatch.fingerprint import combine, tensor_sha256
from unpatch.patch import merged as merge
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch, save_patch

ARCH = "gpt2"  # Conv1D layers: the least forgiving of the three tiny archs
UNPATCH = Path(sys.executable).parent / "unpatch"


class World:
    """Inputs shared by the tests, built once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.model = tiny_model(ARCH)
        self.other_model = tiny_model(ARCH, seed=1)
        self.base, self.other = root / "base", root / "other"
        self.model.save_pretrained(self.base)
        self.other_model.save_pretrained(self.other)
        self.delta = save_patch(make_delta_patch(self.model, ARCH, name="good-delta"), root / "delta")
        self.lora = save_patch(make_lora_patch(self.model, ARCH, name="good-lora"), root / "lora")
        other_params = dict(self.other_model.named_parameters())
        self.other_fp = combine({n: tensor_sha256(other_params[n].data) for n in self.delta.manifest.base.tensors})
        self.merged = root / "merged"
        merge.apply_to_folder(str(self.base), [(load_patch(self.delta.path), 1.0)], self.merged)
        self.existing = root / "existing"
        self.existing.mkdir()
        (self.existing / "keep.txt").write_text("mine")

        payload = (root / "delta" / "delta.safetensors").read_bytes()
        self.truncated = self._copy("delta", "truncated", "delta.safetensors", payload[: len(payload) // 2])
        lora_payload = (root / "lora" / "adapter_model.safetensors").read_bytes()
        self.truncated_lora = self._copy("lora", "truncated-lora", "adapter_model.safetensors", lora_payload[:-7])
        self.garbage = self._copy("delta", "garbage", "delta.safetensors", b"this is not a safetensors file, just junk " * 20)
        self.json_list = self._copy("delta", "json-list", "delta.safetensors", struct.pack("<Q", 8) + b"[1,2,3] ")
        edited = bytearray(payload)
        edited[-1] ^= 0x01  # still a valid safetensors file, one mantissa bit different
        self.edited = self._copy("delta", "edited", "delta.safetensors", bytes(edited))
        manifest = json.loads((root / "delta" / "unpatch.json").read_text())
        self.v2 = self._copy("delta", "v2", "unpatch.json", json.dumps(dict(manifest, format_version=2)).encode())

        self.pickled = root / "pickled"
        shutil.copytree(root / "lora", self.pickled)
        (self.pickled / "adapter_model.safetensors").unlink()
        torch.save({k: self.lora.tensors[k] for k in self.lora.tensors}, self.pickled / "adapter_model.bin")
        self.pt_file = root / "weights.pt"
        torch.save({"x": torch.zeros(2)}, self.pt_file)

        nan = make_delta_patch(self.model, ARCH, name="nan")
        self.nan_tensor = next(k for k, enc in nan.encodings.items() if enc == "dense")
        nan.tensors[self.nan_tensor][1, 2] = float("nan")
        self.nan = save_patch(nan, root / "nan").path
        inf = make_lora_patch(self.model, ARCH, name="inf")
        self.inf_tensor = next(k for k in inf.tensors if "lora_B" in k)
        inf.tensors[self.inf_tensor][0, 0] = float("-inf")
        self.inf = save_patch(inf, root / "inf").path

        oob = make_delta_patch(self.model, ARCH, name="oob")
        self.oob_tensor = next(k for k, enc in oob.encodings.items() if enc == "rows")
        oob.tensors[f"{self.oob_tensor}::rows"] = torch.tensor([0, 3, 1000])  # the base has 32 rows
        self.oob = save_patch(oob, root / "oob").path
        self.oob_patch = oob  # in memory its row-sparse tensor comes after the dense ones

    def _copy(self, src: str, dst: str, file: str, content: bytes) -> Path:
        shutil.copytree(self.root / src, self.root / dst)
        (self.root / dst / file).write_bytes(content)
        return self.root / dst


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"))


def assert_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert excinfo.type is UnpatchError
    assert "\n" not in msg and msg.strip() == msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------ library level


def test_unknown_model(w, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from unpatch.model import checkpoint_folder, resolve_model

    missing = tmp_path / "no-such-folder"
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(missing), [(w.delta, 1.0)], tmp_path / "out")
    assert_error(e, str(missing), "not a local folder")
    with pytest.raises(UnpatchError) as e:
        resolve_model("no-such-model")
    assert_error(e, "'no-such-model'", "alias")
    with pytest.raises(UnpatchError) as e:
        resolve_model(str(tmp_path / "gone.gguf"))
    assert_error(e, "gone.gguf", "no such .gguf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnpatchError) as e:
        checkpoint_folder(resolve_model("nobody-xyz/no-such-model"))
    assert_error(e, "nobody-xyz/no-such-model")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_folder_without_config_is_not_a_model(w, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(tmp_path / "m"), [(w.delta, 1.0)], tmp_path / "out")
    assert_error(e, "config.json")


@pytest.mark.parametrize("which", ["delta", "lora"])
def test_patch_for_a_different_base(w, tmp_path, which):
    p = load_patch(getattr(w, which).path)
    params = dict(w.other_model.named_parameters())
    other_fp = combine({n: tensor_sha256(params[n].data) for n in p.manifest.base.tensors})
    mine = p.manifest.base.fingerprint[:16]
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(w.other), [(p, 1.0)], tmp_path / "out")
    assert_error(e, mine, other_fp[:16], str(p.path), "--force")
    assert list(tmp_path.iterdir()) == []
    m = tiny_model(ARCH, seed=1)
    with pytest.raises(UnpatchError) as e:
        Applied(m).apply(p, 1.0)
    assert_error(e, mine, other_fp[:16])
    assert state_equal(m, w.other_model)  # refused before touching anything

    # --force applies it and says so
    ledger = merge.apply_to_folder(str(w.other), [(p, 1.0)], tmp_path / "forced", force=True)
    assert ledger["applied"][0]["forced"] is True
    assert json.loads((tmp_path / "forced" / merge.LEDGER).read_text())["applied"][0]["forced"] is True
    got = load_file(tmp_path / "forced" / "model.safetensors")
    assert any(not torch.equal(got[n], params[n].data) for n in p.updates())
    a = Applied(m)
    assert a.apply(p, 1.0, force=True).forced is True
    assert not state_equal(m, w.other_model)
    a.revert()
    assert state_equal(m, w.other_model)


def test_patch_for_a_different_architecture(w, tmp_path):
    llama = tiny_model("llama")
    p = make_delta_patch(llama, "llama", name="llama-delta")
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(w.base), [(p, 1.0)], tmp_path / "out")
    assert_error(e, "llama-delta", "model.layers.", "does not have")


@pytest.mark.parametrize("which", ["truncated", "truncated_lora"])
def test_truncated_payload(w, which):
    folder = getattr(w, which)
    with pytest.raises(UnpatchError) as e:
        load_patch(folder)
    assert_error(e, str(folder), ".safetensors", "truncated")


@pytest.mark.parametrize("cut", [0, 5, 30])
def test_truncated_to_almost_nothing(w, tmp_path, cut):
    shutil.copytree(w.delta.path, tmp_path / "p")
    f = tmp_path / "p" / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(UnpatchError) as e:
        load_patch(tmp_path / "p")
    assert_error(e, str(f), "not a valid safetensors file")


def test_corrupt_safetensors(w):
    with pytest.raises(UnpatchError) as e:
        load_patch(w.garbage)
    assert_error(e, str(w.garbage / "delta.safetensors"), "not a valid safetensors file")



def test_safetensors_header_that_is_not_an_object(w):
    with pytest.raises(UnpatchError) as e:
        load_patch(w.json_list)
    assert_error(e, str(w.json_list / "delta.safetensors"), "not a valid safetensors file")


def test_corrupt_model_checkpoint(w, tmp_path):
    shutil.copytree(w.base, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(tmp_path / "m"), [(w.delta, 1.0)], tmp_path / "out")
    assert_error(e, "model.safetensors", "not a valid safetensors file")
    assert not (tmp_path / "out").exists()


def test_payload_edited_after_saving(w):
    with pytest.raises(UnpatchError) as e:
        load_patch(w.edited)
    assert_error(e, str(w.edited / "delta.safetensors"), "differs from the hash")


def test_lora_config_edited_after_saving(w, tmp_path):
    shutil.copytree(w.lora.path, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=800)))
    with pytest.raises(UnpatchError) as e:
        load_patch(tmp_path / "p")
    assert_error(e, "adapter_config.json", "differs from the hash")


def test_unknown_format_version(w):
    with pytest.raises(UnpatchError) as e:
        load_patch(w.v2)
    assert_error(e, str(w.v2 / "unpatch.json"), "format version 2", "upgrade")


def test_bad_manifest(w, tmp_path):
    shutil.copytree(w.delta.path, tmp_path / "p")
    m = tmp_path / "p" / "unpatch.json"
    raw = json.loads(m.read_text())
    m.write_text(json.dumps(dict(raw, kind="bitfield")))
    with pytest.raises(UnpatchError) as e:
        load_patch(tmp_path / "p")
    assert_error(e, str(m), "kind")
    m.write_text("{not json")
    with pytest.raises(UnpatchError) as e:
        load_patch(tmp_path / "p")
    assert_error(e, str(m), "not valid JSON")
    m.unlink()
    with pytest.raises(UnpatchError) as e:
        load_patch(tmp_path / "p")
    assert_error(e, str(tmp_path / "p"), "unpatch.json")


def test_pickled_patch_refused_unless_allowed(w, tmp_path):
    with pytest.raises(UnpatchError) as e:
        load_patch(w.pickled)
    assert_error(e, str(w.pickled / "adapter_model.bin"), "pickled", "--allow-pickle")
    with pytest.raises(UnpatchError) as e:
        load_patch(w.pt_file)
    assert_error(e, str(w.pt_file), "pickled")
    p = load_patch(w.pickled, allow_pickle=True)
    assert p.kind == "lora" and p.updates().keys() == w.lora.updates().keys()
    m1, m2 = tiny_model(ARCH), tiny_model(ARCH)
    Applied(m1).apply(p, 0.5)
    Applied(m2).apply(load_patch(w.lora.path), 0.5)
    assert state_equal(m1, m2) and not state_equal(m1, w.model)


def test_model_with_only_pickled_weights(w, tmp_path):
    shutil.copytree(w.base, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(tmp_path / "m"), [(w.delta, 1.0)], tmp_path / "out")
    assert_error(e, "pytorch_model.bin", "pickled")


@pytest.mark.parametrize("which", ["nan", "inf"])
def test_nan_or_inf_in_a_patch(w, which):
    folder, tensor = getattr(w, which), getattr(w, f"{which}_tensor")
    with pytest.raises(UnpatchError) as e:
        load_patch(folder)
    assert_error(e, str(folder), repr(tensor), "NaN or Inf")


def test_output_exists(w, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(w.base), [(w.delta, 1.0)], out)
    assert_error(e, str(out), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(UnpatchError) as e:
        save_patch(w.delta, out)
    assert_error(e, str(out), "already exists")
    with pytest.raises(UnpatchError) as e:
        merge.revert_folder(w.merged, out=out)
    assert_error(e, str(out), "already exists")
    merge.apply_to_folder(str(w.base), [(w.delta, 1.0)], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors", merge.LEDGER, "README.md"])  # + its card
    assert leftovers(tmp_path) == []


def _failing_write(path, specs, tensors, metadata=None):
    """write_streaming that writes part of the first file and then fails, like a full disk."""
    _, first = next(iter(tensors))
    Path(path).write_bytes(b"partial" + np.asarray(first).tobytes()[:64])  # numpy (a delta streams without torch) or torch
    raise OSError(28, "No space left on device")


def test_failed_apply_leaves_nothing(w, tmp_path, monkeypatch):
    # refused before writing
    with pytest.raises(UnpatchError):
        merge.apply_to_folder(str(w.other), [(w.delta, 1.0)], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # failing half-way through writing
    monkeypatch.setattr(merge, "write_streaming", _failing_write)
    with pytest.raises(UnpatchError, match="no space left"):  # ENOSPC is one line naming the output (issue 16)
        merge.apply_to_folder(str(w.base), [(w.delta, 1.0)], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # ... and with --overwrite, the old output survives untouched
    old = tmp_path / "old"
    shutil.copytree(w.merged, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(UnpatchError, match="no space left"):  # ENOSPC is one line naming the output (issue 16)
        merge.apply_to_folder(str(w.base), [(w.delta, 0.5)], old, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    # a failed revert as well
    with pytest.raises(UnpatchError, match="no space left"):  # ENOSPC is one line naming the output (issue 16)
        merge.revert_folder(old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_failed_apply_inside_the_write_leaves_nothing(w, tmp_path):
    # an out-of-range row index fails while the output is being written
    with pytest.raises((UnpatchError, RuntimeError)):
        merge.apply_to_folder(str(w.base), [(load_patch(w.oob), 1.0)], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []



def test_row_index_out_of_range_is_refused(w, tmp_path):
    with pytest.raises(UnpatchError) as e:
        merge.apply_to_folder(str(w.base), [(load_patch(w.oob), 1.0)], tmp_path / "out")
    assert_error(e, repr(w.oob_tensor))



def test_failed_in_memory_apply_leaves_model_unchanged(w):
    m = tiny_model(ARCH)
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises, the model must be as before
        Applied(m).apply(w.oob_patch, 1.0)
    assert state_equal(m, w.model)


def test_revert_folder_without_ledger(w, tmp_path):
    with pytest.raises(UnpatchError) as e:
        merge.revert_folder(w.base, out=tmp_path / "out")
    assert_error(e, str(w.base), merge.LEDGER)
    assert list(tmp_path.iterdir()) == []


def test_revert_patch_not_applied(w, tmp_path):
    with pytest.raises(UnpatchError) as e:
        merge.revert_folder(w.merged, patch="nope", out=tmp_path / "out")
    assert_error(e, "'nope'", "not in", "good-delta")
    assert list(tmp_path.iterdir()) == []
    assert json.loads((w.merged / merge.LEDGER).read_text())["applied"][0]["name"] == "good-delta"
    m = tiny_model(ARCH)
    a = Applied(m)
    a.apply(load_patch(w.delta.path), 1.0)
    with pytest.raises(UnpatchError) as e:
        a.revert("nope")
    assert_error(e, "'nope'", "not applied", "good-delta")
    assert len(a.entries) == 1 and not state_equal(m, w.model)  # nothing was taken off


# ------------------------------------------------------------------ through the CLI

# id -> (argv builder (world, out_dir) -> list, needles builder (world) -> list[, xfail reason: a known src bug])
CASES = {
    "unknown-model-path": (lambda w, o: ["apply", w.delta.path, "--model", o / "nowhere", "--out", o / "out"],
                           lambda w: ["nowhere", "not a local folder"]),
    "unknown-model-name": (lambda w, o: ["apply", w.delta.path, "--model", "no-such-model"], lambda w: ["'no-such-model'"]),
    "unknown-hub-model": (lambda w, o: ["verify", w.delta.path, "--model", "nobody-xyz/no-such-model"],
                          lambda w: ["nobody-xyz/no-such-model"]),
    "different-base": (lambda w, o: ["apply", w.delta.path, "--model", w.other, "--out", o / "out"],
                       lambda w: [w.delta.manifest.base.fingerprint[:16], w.other_fp[:16], "--force"]),
    "verify-different-base": (lambda w, o: ["verify", w.delta.path, "--model", w.other],
                              lambda w: [w.delta.manifest.base.fingerprint[:16], w.other_fp[:16]]),
    "truncated": (lambda w, o: ["verify", w.truncated], lambda w: [str(w.truncated), "truncated"]),
    "truncated-lora": (lambda w, o: ["apply", w.truncated_lora, "--model", w.base, "--out", o / "out"],
                       lambda w: [str(w.truncated_lora), "truncated"]),
    "corrupt": (lambda w, o: ["inspect", w.garbage], lambda w: [str(w.garbage), "not a valid safetensors file"]),
    "corrupt-json-list": (lambda w, o: ["inspect", w.json_list], lambda w: [str(w.json_list)]),
    "edited": (lambda w, o: ["apply", w.edited, "--model", w.base, "--out", o / "out"], lambda w: [str(w.edited), "hash"]),
    "format-version": (lambda w, o: ["verify", w.v2], lambda w: [str(w.v2), "version 2"]),
    "pickled": (lambda w, o: ["apply", w.pickled, "--model", w.base, "--out", o / "out"], lambda w: ["adapter_model.bin", "--allow-pickle"]),
    "pt-file": (lambda w, o: ["inspect", w.pt_file], lambda w: [str(w.pt_file), "pickled"]),
    "nan": (lambda w, o: ["verify", w.nan], lambda w: [str(w.nan), w.nan_tensor, "NaN"]),
    "inf": (lambda w, o: ["stack", w.delta.path, w.inf, "--out", o / "out"], lambda w: [str(w.inf), w.inf_tensor, "NaN or Inf"]),
    "output-exists": (lambda w, o: ["apply", w.delta.path, "--model", w.base, "--out", w.existing],
                      lambda w: [str(w.existing), "already exists", "--overwrite"]),
    "revert-no-ledger": (lambda w, o: ["revert", w.base, "--out", o / "out"], lambda w: [str(w.base), merge.LEDGER]),
    "revert-not-applied": (lambda w, o: ["revert", w.merged, "--patch", "nope", "--out", o / "out"],
                           lambda w: ["'nope'", "good-delta"]),
    "scale-count": (lambda w, o: ["apply", w.delta.path, w.delta.path, "--scale", "1", "--scale", "2", "--scale", "3",
                                  "--model", w.base, "--out", o / "out"], lambda w: ["--scale", "3 values for 2 patches"]),
    "convert-to": (lambda w, o: ["convert", w.delta.path, "--to", "gguf", "--out", o / "out"], lambda w: ["'gguf'"]),
    "row-out-of-range": (lambda w, o: ["apply", w.oob, "--model", w.base, "--out", o / "out"], lambda w: [w.oob_tensor]),
}
SUBPROCESS = ["truncated", "revert-not-applied"]  # each costs ~2.5 s of torch import; the rest run in process


def _params(ids):
    return [pytest.param(*CASES[i][:2], id=i, marks=[pytest.mark.xfail(strict=True, reason=r) for r in CASES[i][2:]]) for i in ids]


def assert_cli_error(code: int, out: str, err: str, needles) -> None:
    assert "Traceback" not in out + err
    assert code == 2, (code, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"


@pytest.fixture
def cli(capsys, monkeypatch):
    """The real entry point, in process: argv in, (exit code, stdout, stderr) out."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["unpatch", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run


@pytest.mark.parametrize("argv,needles", _params(CASES))
def test_cli_bad_input(w, tmp_path, cli, argv, needles):
    code, out, err = cli(*argv(w, tmp_path))
    assert_cli_error(code, out, err, needles(w))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder
    assert [p.name for p in w.existing.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def subprocess_results(w, tmp_path_factory):
    """The console script itself, for a few cases, run concurrently to keep the suite fast."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = {}
    for i in SUBPROCESS:
        o = tmp_path_factory.mktemp(f"sp-{i}")
        argv = [str(UNPATCH), *map(str, CASES[i][0](w, o))]
        procs[i] = (o, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = {}
    for i, (o, p) in procs.items():
        out, err = p.communicate(timeout=120)
        results[i] = (o, p.returncode, out, err)
    return results


@pytest.mark.parametrize("case", SUBPROCESS)
def test_console_script_bad_input(w, subprocess_results, case):
    o, code, out, err = subprocess_results[case]
    assert_cli_error(code, out, err, CASES[case][1](w))
    assert list(o.iterdir()) == []


def test_cli_force_and_overwrite_and_allow_pickle(w, tmp_path, cli):
    code, out, err = cli("apply", w.delta.path, "--model", w.other, "--out", tmp_path / "forced", "--force")
    assert code == 0, err
    assert json.loads((tmp_path / "forced" / merge.LEDGER).read_text())["applied"][0]["forced"] is True
    shutil.copytree(w.existing, tmp_path / "existing")
    code, out, err = cli("apply", w.delta.path, "--model", w.base, "--out", tmp_path / "existing", "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "existing" / "keep.txt").exists() and (tmp_path / "existing" / merge.LEDGER).exists()
    code, out, err = cli("apply", w.pickled, "--allow-pickle", "--scale", "0.5", "--model", w.base, "--out", tmp_path / "pk")
    assert code == 0, err
    merge.apply_to_folder(str(w.base), [(load_patch(w.lora.path), 0.5)], tmp_path / "st")
    assert (tmp_path / "pk" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    assert leftovers(tmp_path) == []
