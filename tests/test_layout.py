"""The shape of the package, read from its source with `ast` (nothing is imported): each
piece has one room, commands do not import each other, and no import goes round in a circle."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {"dpg.attribute", "dpg.check", "dpg.demo", "dpg.evaluate", "dpg.sample", "dpg.train"}
DISPATCHER = "dpg.cli"  # the one module that runs commands: it imports each, and they import none of it


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The dpg modules `name` imports anywhere in its file, function bodies included (a lazy
    import is still a dependency). `from pkg import sub` counts as `pkg.sub` when sub is a module."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs or {node.module}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a path [a, b, ..., a], or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    # The reader sees top-level, lazy and `from pkg import module` imports.
    assert "dpg.train" in GRAPH["dpg.cli"]  # lazy, inside a function
    assert "dpg.metagrad.optim" in GRAPH["dpg.metagrad.engine"]  # from dpg.metagrad import optim
    assert "dpg.errors" in GRAPH["dpg.config"]


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": set(), "c": {"c2"}, "c2": {"c"}}) == ["c", "c2", "c"]


def test_no_import_circle_in_dpg():
    assert find_cycle(GRAPH) is None, f"import circle: {' -> '.join(find_cycle(GRAPH))}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_command(name):
    if name == DISPATCHER:
        return
    assert not GRAPH[name] & COMMANDS, f"{name} imports the command(s) {sorted(GRAPH[name] & COMMANDS)}"


def test_report_is_a_leaf():
    assert not {m for m in GRAPH["dpg.report"] if m != "dpg.errors"}


def test_shared_pieces_live_in_their_rooms():
    defined = {
        name: {n.name for n in ast.parse(path.read_text()).body if hasattr(n, "name")} for name, path in MODULES.items()
    }
    assert {"resolve_device", "resolve_dtype"} <= defined["dpg.runtime"]
    assert {"PromptConfig", "load_prompts", "as_chat"} <= defined["dpg.data"]
    assert {"TrainConfig", "GRPOSettings", "RewardConfig", "EvaluateSettings", "LoraSettings"} <= defined["dpg.config"]
    for name in MODULES.keys() - {"dpg.runtime", "dpg.data", "dpg.config"}:
        assert not defined[name] & {"resolve_device", "resolve_dtype", "load_prompts", "as_chat", "TrainConfig"}, name


def long_functions(limit: int = 60) -> list[str]:
    """Every function of src/ longer than `limit` lines (its def line to its last line)."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{name}.{node.name} ({length} lines)")
    return found


def test_no_function_is_over_60_lines():
    assert not long_functions(), f"split these: {long_functions()}"
    assert long_functions(limit=30)  # the reader measures: some functions are over 30 lines
