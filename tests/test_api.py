"""The Python API: the README's notebook snippet runs as written (on a tiny model instead of
SmolLM2), `import unpatch` stays cheap, `build` takes a path, a dict or a Recipe alike, and the
API names are plain functions that no module of the library shadows (unpatch.apply, ...)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import FORGET

import unpatch
from unpatch.recipe import as_recipe

README = Path(__file__).parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_readme_snippet_runs(tmp_path, models_dir, monkeypatch, capsys):
    code = readme_snippet().replace('"smollm2-135m"', repr(str(models_dir / "llama")))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "True"  # the merged folder reverted bit for bit, fingerprint verified
    assert any(line.startswith("recommended scale:") for line in out)
    assert [line.split()[0] for line in out if line.split()[0] in ("base", "notebook-ga@0.5", "notebook-ga@1")] == \
        ["base", "notebook-ga@0.5", "notebook-ga@1"]
    assert (tmp_path / "patches/notebook-ga/unpatch.json").exists() and (tmp_path / "merged/notebook-base").is_dir()


def test_import_is_cheap_and_names_resolve():
    code = ("import sys, unpatch; assert 'torch' not in sys.modules, 'import unpatch loaded torch'; "
            "import unpatch.builder, unpatch.evals.runner, unpatch.evals.sweep, unpatch.patch.apply; "
            "assert all(getattr(unpatch, n) is getattr(unpatch.api, n) for n in ('apply', 'build', 'evaluate', 'sweep')); "
            "print(sorted(unpatch.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("build", "load_patch", "apply", "Applied", "revert", "evaluate", "sweep", "push", "pull"):
        assert f"'{name}'" in r.stdout


def test_build_takes_a_path_a_dict_or_a_recipe(tmp_path, models_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "forget.txt").write_text("\n".join(FORGET) + "\n")
    raw = {"model": {"id": str(models_dir / "llama"), "device": "cpu"}, "data": {"forget": "forget.txt"},
           "method": {"name": "ga"}, "patch": {"kind": "lora", "rank": 4, "name": "r"},
           "train": {"steps": 3, "lr": 0.05, "batch_size": 4, "max_length": 16}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    built = [unpatch.build(tmp_path / "r.yaml", out=tmp_path / "a", run_eval=False), unpatch.build(raw, out=tmp_path / "b", run_eval=False),
             unpatch.build(as_recipe(tmp_path / "r.yaml"), out=tmp_path / "c", run_eval=False)]
    assert [p.manifest.base.fingerprint for p in built[1:]] == [built[0].manifest.base.fingerprint] * 2
    payload = "adapter_model.safetensors"
    assert (tmp_path / "a" / payload).read_bytes() == (tmp_path / "b" / payload).read_bytes() == (tmp_path / "c" / payload).read_bytes()
    assert yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())["train"]["steps"] == 3  # the dict is recorded
    try:
        unpatch.build({**raw, "train": {"stepz": 3}}, out=tmp_path / "d")
    except unpatch.api.UnpatchError as e:
        assert "train.stepz" in str(e) and len(str(e).splitlines()) == 1
    else:
        raise AssertionError("a bad dict key must be refused")
    assert not (tmp_path / "d").exists()
