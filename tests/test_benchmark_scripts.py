"""Every benchmark script's imports from dpg name things that exist: a script nobody ran
since the engine moved on fails here, not on the GPU machine where its time is dear."""

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def dpg_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) for each `from dpg... import name` in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dpg":
            found += [(node.module, a.name, node.lineno) for a in node.names]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
    missing = []
    for module, name, line in dpg_imports(path):
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:  # `from pkg import submodule`
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"line {line}: {module}.{name}")
    assert not missing, f"{path.name} imports what dpg no longer has: {missing}"


def test_the_check_finds_a_missing_name(tmp_path):
    script = tmp_path / "old.py"
    script.write_text("def main():\n    from dpg.metagrad.target import prepare_target, tangent_scores\n")
    module = "dpg.metagrad.target"
    assert dpg_imports(script) == [(module, "prepare_target", 2), (module, "tangent_scores", 2)]
    with pytest.raises(AssertionError, match="prepare_target"):
        test_benchmark_imports_resolve(script)
