"""The shape of the model layer, read from its source with ``ast`` (docs/architecture.md): imports go one
way, ``egma_model`` does not reach into the benchmark, and no import cycle exists, counting the imports inside
functions as well as those at module level."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package):
    """{dotted module name: source path} for every .py file under ``package``."""
    found = {}
    base = os.path.join(ROOT, package)
    for folder, _, files in os.walk(base):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(folder, name)
    return found


def _imported_names(module, path):
    """Every module name an import statement in the file names (anywhere in it, functions included), made
    absolute; ``from X import y`` also names ``X.y`` (it may be a submodule)."""
    tree = ast.parse(open(path).read(), filename=path)
    is_package = path.endswith("__init__.py")
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _graph(package):
    modules = _modules(package)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported_names(module, path):
            # The innermost module of the house that the name points into.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != package:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_model_layer_does_not_import_the_benchmark():
    for module, path in _modules("egma_model").items():
        bad = [n for n in _imported_names(module, path) if n and n.startswith("egma_kernels.bench")]
        assert not bad, f"{module} imports {bad[0]}: use egma_kernels.cli_support"


def test_the_model_layer_does_not_import_the_tests():
    """The fake dataset trees live in the package (egma_model/datasets/<family>.py); none of it reaches into
    tests/ for them."""
    helpers = {name[:-3] for name in os.listdir(os.path.join(ROOT, "tests")) if name.endswith(".py")}
    for module, path in _modules("egma_model").items():
        bad = [n for n in _imported_names(module, path) if n and (n.split(".")[0] in helpers | {"tests"})]
        assert not bad, f"{module} imports {bad[0]} from tests/"


def test_the_cli_plumbing_imports_neither_package():
    path = os.path.join(ROOT, "egma_kernels", "cli_support.py")
    names = _imported_names("egma_kernels.cli_support", path)
    assert not [n for n in names if n and n.startswith(("egma_kernels", "egma_model"))]


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_model_layer():
    """Module-level and function-level imports alike; the old names kept for one release are reached through
    importlib at attribute access, not by an import statement."""
    cycle = _cycle(_graph("egma_model"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_recipes_are_data():
    graph = _graph("egma_model")
    assert graph["egma_model.recipes"] == set()
    assert "egma_model.paper_table" not in graph["egma_model.evaluate"]


@pytest.mark.parametrize("old, name", [("egma_model.recipes", "CheckpointSelector"),
                                       ("egma_model.recipes", "load_prompt_classes"),
                                       ("egma_model.evaluate", "main"), ("egma_model.evaluate", "build_parser"),
                                       ("egma_model.prepared", "build_cache"), ("egma_model.train", "main"),
                                       ("egma_model.train", "build_parser"), ("egma_model.train", "apply_recipe"),
                                       ("egma_model.gaze", "read_reflacx"), ("egma_model.gaze", "read_egd_cxr"),
                                       ("egma_model.gaze", "read_mimic_eye_egd"), ("egma_model.prepare", "prepare_rsna"),
                                       ("egma_model.data", "split_sentences_egma")])
def test_old_import_paths_still_work(old, name):
    import importlib

    assert callable(getattr(importlib.import_module(old), name))


def test_no_function_in_the_model_layer_is_over_80_lines():
    long = []
    for module, path in _modules("egma_model").items():
        for node in ast.walk(ast.parse(open(path).read(), filename=path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "; ".join(long)
