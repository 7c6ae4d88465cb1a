"""Recipe validation: every error names the key path; empty files and YAML syntax errors are one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from mavis_align.cli import main
from mavis_align.schema import ListOf, Shape, check, read_yaml_mapping, shape_of
from mavis_align.study import load_study
from mavis_align.train.iterate import Recipe, load_recipe


@dataclass
class Inner:
    n: int = 1
    rate: float = 0.5
    tags: list[str] | None = None


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    inner: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


SHAPE = shape_of(Outer, inner=shape_of(Inner), rounds=ListOf(shape_of(Inner)))


@pytest.mark.parametrize("raw, message", [
    ({"nme": "y"}, r"^nme: unknown key; known: flag, inner, name, rounds$"),
    ({"name": 3}, r"^name: expected a string, got int 3$"),
    ({"flag": "yes"}, r"^flag: expected true or false, got str 'yes'$"),
    ({"inner": {"n": 1.5}}, r"^inner.n: expected an integer, got float 1.5$"),
    ({"inner": {"n": True}}, r"^inner.n: expected an integer, got bool True$"),
    ({"inner": {"rate": float("nan")}}, r"^inner.rate: expected a finite number"),
    ({"inner": {"rate": "1e-3"}}, r"^inner.rate: expected a number, got str '1e-3' \(YAML reads 1e-3 as a string"),
    ({"inner": {"tags": "a"}}, r"^inner.tags: expected a list or null, got str 'a'$"),
    ({"inner": {"tags": ["a", 2]}}, r"^inner.tags: expected a list or null"),
    ({"inner": [1]}, r"^inner: expected a mapping of Inner settings, got list \[1\]$"),
    ({"rounds": [{"n": 1}, {"m": 2}]}, r"^rounds\[1\].m: unknown key"),
    ({"rounds": {"n": 1}}, r"^rounds: expected a list"),
])
def test_check_names_the_key_path(raw, message):
    with pytest.raises(ValueError, match=message):
        check(raw, SHAPE)


def test_check_accepts_valid_data_ints_for_floats_and_null_where_optional():
    check({"name": "a", "flag": True, "inner": {"n": 2, "rate": 1, "tags": None}, "rounds": [{}, {"tags": ["t"]}]}, SHAPE)
    check({"k": "anything"}, Shape({"k": Any}))


def test_read_yaml_mapping_one_line_errors(tmp_path):
    empty = tmp_path / "e.yaml"
    empty.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="is empty"):
        read_yaml_mapping(empty, "recipe")
    broken = tmp_path / "b.yaml"
    broken.write_text("a: 1\nb: [2,\n")
    with pytest.raises(ValueError, match=r"YAML syntax error at line \d+, column \d+") as err:
        read_yaml_mapping(broken, "recipe")
    assert "\n" not in str(err.value)
    listed = tmp_path / "l.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping of settings, got a list"):
        read_yaml_mapping(listed, "recipe")


def test_recipe_and_study_errors_carry_nested_paths(tmp_path):
    with pytest.raises(ValueError, match=r"^tree.k_root: expected an integer"):
        Recipe(tree={"k_root": "four"})
    with pytest.raises(ValueError, match=r"^iterations\[0\].train.lrr: unknown key"):
        Recipe(iterations=[{"beta": 1.0, "train": {"lrr": 2}}])
    r = tmp_path / "r.yaml"
    r.write_text("value_head: {pool: mean, width: 3}\n")
    with pytest.raises(ValueError, match=r"recipe .*r.yaml: value_head.width: unknown key; known: hidden, pool"):
        load_recipe(r)
    s = tmp_path / "s.yaml"
    s.write_text("mavis:\n  train_prompts: lots\n")
    with pytest.raises(ValueError, match=r"study recipe .*s.yaml: mavis.train_prompts: expected an integer, got str 'lots'"):
        load_study(s)
    s.write_text("baselines: {rl: {stepz: 3}}\n")
    with pytest.raises(ValueError, match=r"baselines.rl.stepz: unknown key"):
        load_study(s)


def test_packaged_recipes_pass_their_schema():
    from importlib import resources

    folder = resources.files("mavis_align") / "recipes"
    for name in ("reproduce-default", "reproduce-paper"):
        load_study(name)
    for name in ("demo", "demo-iter1"):
        load_recipe(str(folder / f"{name}.yaml"))


@pytest.mark.parametrize("text", ["", "mavis: [\n", "mavis: {tree: {nosuch: 1}}\n", "mavis: {train_prompts: lots}\n"])
def test_reproduce_cli_recipe_errors_are_one_line_exit_2(tmp_path, capsys, text):
    f = tmp_path / "study.yaml"
    f.write_text(text)
    assert main(["reproduce", "--recipe", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mavis-align reproduce: error: study recipe") and "\n" not in err
    assert not (tmp_path / "out").exists()
