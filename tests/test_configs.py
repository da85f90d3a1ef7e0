"""Every shipped config loads, names its command in its header, and the demo file is the
built-in default."""

from pathlib import Path

import pytest

from dpg.config import load_config
from dpg.demo import demo_config
from dpg.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_header_names_the_command(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# dpg ") and path.name in header, header
    load_config(TrainConfig, path)


def test_demo_yaml_is_the_builtin_default():
    assert load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml") == demo_config()
