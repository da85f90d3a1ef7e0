"""The config loader: YAML + dotted overrides onto typed dataclasses, strict about keys and types."""

from dataclasses import dataclass, field

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpg import DpgError, Recipe
from dpg.attribute import AttributeConfig
from dpg.check import CheckConfig
from dpg.config import describe, load_config, to_yaml
from dpg.models import byte_tokenizer
from dpg.safety import check_settings
from dpg.config import TrainConfig
from dpg.train import grpo_config


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
    chk = load_config(CheckConfig, None, ["recipe.lr=1e-3"])
    assert chk.recipe == Recipe(lr=1e-3, steps=3)  # steps from CheckConfig's factory, not Recipe's 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("inner.speed=1", "unknown config key 'inner.speed'"),
        ("colour=red", "unknown config key 'colour'"),
        ("count=2.5", "count must be an integer"),
        ("count=true", "count must be an integer"),
        ("flag=1", "flag must be true or false"),
        ("inner.rate=fast", "inner.rate must be a number"),
        ("inner.rate=.nan", "inner.rate must be a finite number"),
        ("inner.rate=-1e400", "inner.rate must be a finite number"),
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
    assert ("recipe.lr", "5e-06", "learning rate") in rows


def test_command_line_strings_stay_text():
    cfg = load_config(Outer, None, ["inner.name=Say: {x}", "items=[a, 'b c']", "maybe=null"])
    assert cfg.inner.name == "Say: {x}" and cfg.items == ["a", "b c"] and cfg.maybe is None
    overrides = ["prompts.template=Rephrase: {prompt}", "prompts.file=null", "metric.pattern=67"]
    t = load_config(TrainConfig, None, overrides)
    assert t.prompts.template == "Rephrase: {prompt}" and t.prompts.file is None and t.metric.pattern == "67"


# ---- fuzz: any overrides or YAML load, or raise DpgError; what loads saves and loads back ----

CLASSES = [TrainConfig, AttributeConfig, CheckConfig]
KEYS = sorted({key for cls in CLASSES for key, _, _ in describe(cls)})
NAMES = sorted({part for key in KEYS for part in key.split(".")})
YAMLISH = ["null", "~", "true", "no", "1", "-1", "0", "1e-4", "1e400", ".nan", "-.inf", "0x1f", "[1, 2]", "[a, b",
           "{a: 1}", "{a: [", "{[1]: 2}", "!!python/object/apply:os.system [ls]", "2020-01-01", "'q'", "a: b", "- x",
           "&a x", "*a", "%", "@", "`", "{prompt}", "qr:hi", "=", ".", "", " "]  # fmt: skip
COMMON = ["0", "1", "2", "8", "-1", "1e-3", "0.5", "true", "false", "null", "[]", "{}", "[1, 2]", "ascii", "sgd",
          "cosine", "lm_loss", "tiny-llama"]  # fmt: skip
VALUE = st.one_of(
    st.sampled_from(COMMON), st.sampled_from(COMMON), st.sampled_from(YAMLISH), st.text(max_size=12),
    st.integers(-2, 300).map(str), st.floats().map(str),
)  # fmt: skip
ODD_KEY = st.sampled_from(NAMES) | st.sampled_from(KEYS).map(lambda k: k + ".x") | st.text(max_size=8)
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS), ODD_KEY)  # mostly real keys
PAIR = st.tuples(KEY, VALUE).map("=".join)
OVERRIDE = st.one_of(PAIR, PAIR, PAIR, st.text(max_size=12))
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(YAMLISH)
NODE = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES) | SCALAR, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
TOKENIZER = byte_tokenizer()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_saves_and_loads_back(cls, cfg, folder):
    """dpg train saves its config as YAML (config.yaml); loading that must give the same config."""
    path = folder / "saved.yaml"
    path.write_text(to_yaml(cfg))  # as dpg train writes config.yaml
    assert load_config(cls, path) == cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(cls=st.sampled_from(CLASSES), overrides=st.lists(OVERRIDE, max_size=3))
def test_fuzz_overrides_load_or_raise_dpg_error(folder, cls, overrides):
    try:
        cfg = load_config(cls, None, overrides)
    except DpgError:
        return
    assert_saves_and_loads_back(cls, cfg, folder)
    if cls is TrainConfig:  # dpg train's first checks and TRL's settings: accepted, or a DpgError
        try:
            check_settings(cfg)
            grpo_config(cfg, torch.device("cpu"), TOKENIZER)
        except DpgError:
            pass


@FUZZ
@given(cls=st.sampled_from(CLASSES), doc=st.dictionaries(st.sampled_from(NAMES) | SCALAR, NODE, max_size=5))
def test_fuzz_yaml_files_load_or_raise_dpg_error(folder, cls, doc):
    path = folder / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        cfg = load_config(cls, path)
    except DpgError:
        return
    assert_saves_and_loads_back(cls, cfg, folder)


@pytest.mark.parametrize("text", ["a\x85b", "x\u2028y\u2029", "Grüße, ½"])
def test_saved_config_keeps_characters_yaml_reads_as_line_breaks(tmp_path, text):
    """U+0085 and U+2028/9 written raw would load back as line breaks (found by the fuzz test)."""
    cfg = load_config(TrainConfig, None, [f"output_dir={text}"])
    assert cfg.output_dir == text
    assert_saves_and_loads_back(TrainConfig, cfg, tmp_path)
