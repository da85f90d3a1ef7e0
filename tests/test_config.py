"""The config loader: YAML + dotted overrides onto typed dataclasses, strict about keys and types."""

from dataclasses import dataclass, field

import pytest

from dpg import DpgError, Recipe
from dpg.attribute import AttributeConfig
from dpg.check import CheckConfig
from dpg.config import describe, load_config


@dataclass
class Inner:
    rate: float = 0.5  # a number
    name: str = "x"  # a string


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(rate=2.0))  # a section with its own default
    count: int = 1  # an integer
    flag: bool = False  # a switch
    maybe: int | None = None  # optional
    items: list[str] = field(default_factory=list)  # a list


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("count: 3\ninner:\n  name: yaml\nitems: [a, b]\n")
    cfg = load_config(Outer, path, ["inner.rate=1e-4", "flag=true", "maybe=7"])
    assert cfg == Outer(inner=Inner(rate=1e-4, name="yaml"), count=3, flag=True, maybe=7, items=["a", "b"])


def test_partial_section_keeps_the_parents_defaults():
    cfg = load_config(Outer, None, ["inner.name=z"])
    assert cfg.inner == Inner(rate=2.0, name="z")  # rate from Outer's factory, not Inner's 0.5
    att = load_config(AttributeConfig, None, ["recipe.steps=3"])
    assert att.recipe == Recipe(lr=1e-3, steps=3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("inner.speed=1", "unknown config key 'inner.speed'"),
        ("colour=red", "unknown config key 'colour'"),
        ("count=2.5", "count must be an integer"),
        ("count=true", "count must be an integer"),
        ("flag=1", "flag must be true or false"),
        ("inner.rate=fast", "inner.rate must be a number"),
        ("items=a", "items must be a list"),
        ("inner=3", "inner must be a mapping"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(DpgError, match=message):
        load_config(Outer, None, [override])


def test_numbers_where_strings_are_expected_become_strings():
    assert load_config(Outer, None, ["inner.name=67"]).inner.name == "67"


def test_bad_files(tmp_path):
    with pytest.raises(DpgError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(DpgError, match="must be a mapping"):
        load_config(Outer, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(DpgError, match="not valid YAML"):
        load_config(Outer, broken)


def test_recipe_validation_runs_through_the_loader():
    with pytest.raises(DpgError, match="recipe.optimizer"):
        load_config(AttributeConfig, None, ["recipe.optimizer=lion"])


@pytest.mark.parametrize("cls", [AttributeConfig, CheckConfig])
def test_every_key_is_documented(cls):
    rows = describe(cls)
    assert len(rows) > 20
    undocumented = [key for key, _, comment in rows if not comment]
    assert not undocumented
    assert ("recipe.lr", "0.001", "learning rate") in rows


def test_command_line_strings_stay_text():
    cfg = load_config(Outer, None, ["inner.name=Say: {x}", "items=[a, 'b c']", "maybe=null"])
    assert cfg.inner.name == "Say: {x}" and cfg.items == ["a", "b c"] and cfg.maybe is None
    from dpg.train import TrainConfig

    t = load_config(TrainConfig, None, ["prompts.template=Rephrase: {prompt}", "prompts.file=null", "metric.pattern=67"])
    assert t.prompts.template == "Rephrase: {prompt}" and t.prompts.file is None and t.metric.pattern == "67"
