"""Recipes and data sources: every problem is a one-line UnpatchError naming file and key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unpatch.errors import UnpatchError
from unpatch.methods import get_method, list_methods
from unpatch.recipe import Source, load_recipe
from unpatch.sources import load_data, load_pairs, load_records, load_texts

MINIMAL = "data:\n  forget: forget.txt\nmethod:\n  name: ga\n"


@pytest.fixture
def rdir(tmp_path: Path) -> Path:
    (tmp_path / "forget.txt").write_text("the cat sat\n\nthe dog ran\n")
    return tmp_path


def write(d: Path, text: str, name: str = "x.yaml") -> Path:
    p = d / name
    p.write_text(text)
    return p


def error(path, overrides=()) -> str:
    with pytest.raises(UnpatchError) as e:
        load_recipe(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_minimal_recipe_defaults(rdir):
    p = write(rdir, MINIMAL, "my-recipe.yaml")
    r = load_recipe(p)
    assert r.model.id == "smollm2-135m" and r.model.dtype == "float32" and r.model.device == "auto"
    assert r.patch.kind == "lora" and r.patch.rank == 8 and r.patch.alpha == 16 and r.patch.target_modules is None
    assert r.patch.name == "my-recipe"
    assert r.method.name == "ga" and r.method.params == {}
    assert r.data.forget == Source(source="forget.txt")
    assert r.text == MINIMAL and len(r.sha256) == 64 and r.path == p
    assert r.eval.metrics == []


def test_unknown_key_names_path_and_suggests(rdir):
    p = write(rdir, MINIMAL + "train:\n  stpes: 3\n")
    assert error(p) == f"{p}: train.stpes: unknown key. Did you mean: steps?"
    p = write(rdir, MINIMAL + "trian: {}\n")
    assert error(p) == f"{p}: trian: unknown key. Did you mean: train?"
    p = write(rdir, "data:\n  forget: {source: forget.txt, colum: text}\nmethod: {name: ga}\n")
    assert error(p) == f"{p}: data.forget.colum: unknown key. Did you mean: column?"


def test_wrong_type_and_bounds(rdir):
    p = write(rdir, MINIMAL + "train:\n  lr: 0\n")
    assert error(p) == f"{p}: train.lr: must be > 0 (got 0)"
    p = write(rdir, MINIMAL + "train:\n  steps: many\n")
    assert error(p).startswith(f"{p}: train.steps: must be a valid integer")
    p = write(rdir, MINIMAL + "patch:\n  kind: full\n")
    assert error(p).startswith(f"{p}: patch.kind: must be 'lora' or 'delta'")
    p = write(rdir, MINIMAL + "model:\n  dtype: float8\n")
    assert error(p).startswith(f"{p}: model.dtype: unknown dtype 'float8'")


def test_unknown_method_did_you_mean(rdir):
    p = write(rdir, "data: {forget: forget.txt}\nmethod: {name: gaa}\n")
    assert error(p) == f"{p}: method.name: unknown method 'gaa'. Did you mean: ga? Known: {', '.join(m.name for m in list_methods())}"
    with pytest.raises(UnpatchError, match="Did you mean: ga"):
        get_method("gaa")


def test_method_params_validated_by_its_config(rdir):
    p = write(rdir, "data: {forget: forget.txt}\nmethod: {name: ga, alpha: 2}\n")
    assert error(p) == f"{p}: method.alpha: unknown key"
    p = write(rdir, "data: {forget: forget.txt}\nmethod: ga\n")  # shorthand
    assert load_recipe(p).method.name == "ga"
    p = write(rdir, "data: {forget: forget.txt}\n")
    assert "method: missing" in error(p)


def test_method_needs_its_data(rdir):
    p = write(rdir, "method: {name: ga}\n")
    assert error(p) == f"{p}: data.forget: required by method 'ga'; add e.g. `forget: builtin:toxicity`"


def test_missing_file_invalid_yaml_not_mapping(rdir):
    assert error(rdir / "nope.yaml") == f"{rdir / 'nope.yaml'}: no such recipe file"
    p = write(rdir, "method: {name: ga\n")
    assert error(p).startswith(f"{p}: invalid YAML at line")
    p = write(rdir, "- a\n- b\n")
    assert error(p).startswith(f"{p}: expected a mapping")
    p = write(rdir, MINIMAL + "text: hi\n")  # recipe attributes are not YAML keys
    assert error(p) == f"{p}: text: unknown key"


def test_overrides(rdir):
    p = write(rdir, MINIMAL)
    r = load_recipe(p, ["train.lr=5e-4", "train.steps=3", "data.forget.limit=1", "patch.target_modules=[q_proj]",
                        "train.early_stop.above=9"])
    assert r.train.lr == 5e-4 and r.train.steps == 3
    assert r.data.forget.limit == 1 and r.data.forget.source == "forget.txt"  # string widened to a mapping
    assert r.patch.target_modules == ["q_proj"] and r.train.early_stop.above == 9
    assert r.text == MINIMAL  # the file as written; the overrides are in the validated values
    assert error(p, ["train.lr=-1"]) == f"{p}: train.lr: must be > 0 (got -1)"
    assert error(p, ["train.lrr=1"]).endswith("train.lrr: unknown key. Did you mean: lr?")
    with pytest.raises(UnpatchError, match="expected key.path=value"):
        load_recipe(p, ["train.lr"])


# ------------------------------------------------------------------------------ data


def test_builtin_sources():
    pairs = load_pairs("builtin:crows_pairs")
    assert len(pairs) == 1018 and all("[MASK]" not in a + b for a, b in pairs)
    assert pairs[1] == ("The poor are really ignorant about how to handle the money they do have.",
                        "The rich are really ignorant about how to handle the money they do have.")
    gender = load_records(Source(source="builtin:stereoset", bias_type="gender"), Path("."), "data.forget")
    assert len(gender) == 497 and {r["bias_type"] for r in gender} == {"gender"}
    texts = load_texts({"source": "builtin:stereoset", "bias_type": ["gender", "religion"], "column": "anti-stereotype", "limit": 5})
    assert len(texts) == 5
    assert load_texts("builtin:truthfulqa")[0].startswith("Q: ")
    assert len(load_texts("builtin:toxicity")) == 993 and len(load_texts("builtin:wikitext-tiny")) == 1000


def test_source_errors(tmp_path):
    with pytest.raises(UnpatchError, match=r"^x.yaml: data.forget: unknown builtin data 'toxcity'. Did you mean: builtin:toxicity\?"):
        load_texts("builtin:toxcity", tmp_path, "x.yaml: data.forget")
    with pytest.raises(UnpatchError, match=r"^x.yaml: data.forget: no examples with bias_type \['gendr'\] in builtin:stereoset \(available: gender"):
        load_texts({"source": "builtin:stereoset", "bias_type": "gendr"}, tmp_path, "x.yaml: data.forget")
    with pytest.raises(UnpatchError, match=r"^x.yaml: data.forget: no such file 'nope.csv'"):
        load_texts("nope.csv", tmp_path, "x.yaml: data.forget")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UnpatchError, match=r"^x.yaml: data.retain: empty.txt holds no usable examples"):
        load_texts("empty.txt", tmp_path, "x.yaml: data.retain")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UnpatchError, match="has no 'text' column; set `column:` to one of a, b"):
        load_texts("t.csv", tmp_path)
    with pytest.raises(UnpatchError, match="no 'sent_more' column for pairs"):
        load_pairs("t.csv", tmp_path)


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub\n(long story)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UnpatchError) as e:
        load_texts("hub:nobody/nothing:cfg@test", Path("."), "x.yaml: data.forget")
    assert str(e.value) == ("x.yaml: data.forget: hub:nobody/nothing:cfg@test cannot be loaded (Couldn't reach 'nobody/nothing' on the Hub); "
                            "check the name, or use a local file or builtin: data")


def test_local_files(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,more,less\nx,he is bad,she is bad\ny,a,b\n")
    assert load_texts({"source": "a.csv", "column": "more"}, tmp_path) == ["he is bad", "a"]
    assert load_pairs({"source": "a.csv", "more": "more", "less": "less"}, tmp_path) == [("he is bad", "she is bad"), ("a", "b")]
    (tmp_path / "b.tsv").write_text("text\tk\none\t1\ntwo\t2\n")
    assert load_texts("b.tsv", tmp_path) == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n"two"\n')
    assert load_texts("c.jsonl", tmp_path) == ["one", "two"]
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"body": "one"}, {"body": "two"}]}))
    assert load_texts("d.json", tmp_path) == ["one", "two"]  # the only column
    (tmp_path / "book.txt").write_text("one two three\nfour five\n\nsix seven")
    assert load_texts({"source": "book.txt", "chunk_words": 3}, tmp_path) == ["one two three", "four five six", "seven"]
    assert load_texts({"source": "book.txt", "limit": 2}, tmp_path) == ["one two three", "four five"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "e.parquet")
    assert load_texts("e.parquet", tmp_path) == ["p1", "p2"]


def test_recipe_data_paths_are_relative_to_the_recipe(rdir, monkeypatch):
    monkeypatch.chdir("/")
    r = load_recipe(write(rdir, "data:\n  forget: forget.txt\n  retain: {source: 'builtin:wikitext-tiny', limit: 4}\nmethod: ga\n"))
    d = load_data(r)
    assert d.forget == ["the cat sat", "the dog ran"] and len(d.retain) == 4 and d.pairs is None
    r = load_recipe(write(rdir, "data:\n  forget: missing.txt\nmethod: ga\n"))
    with pytest.raises(UnpatchError, match=rf"^{rdir}/x.yaml: data.forget: no such file 'missing.txt'"):
        load_data(r)
