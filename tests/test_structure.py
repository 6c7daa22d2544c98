"""The package's shape: imports run downward, no two parts import each other, modules stay short.

Read with Python's ast (nothing is imported), so the test also sees imports inside functions.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mag_explore"
MAX_LINES = 400

#: The engine and what it stands on: folders, and a few root modules. None of it may import the apps or the shapes world.
CORE = {"data", "models", "families", "text", "schedule", "validation",  # base
        "attention", "sampling", "layouts", "methods", "editing", "plots", "slides"}
#: Above the core: what users run, the course, the evaluation, and the tiny builds the tests and notebooks use.
APPS = {"cli", "demo", "__main__", "course", "widgets", "evaluate", "testing"}
#: The synthetic world: may import the core, never the reverse.
WORLD = {"shapes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """Every mag_explore module that ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from x import y` imports the module x.y when there is one, else the names of x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "mag_explore" or t.startswith("mag_explore.")}
    return found - {name}


def part(module: str) -> str:
    """The top-level part a module belongs to: mag_explore.methods.mag -> "methods"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mag_explore"


GRAPH = {part(m): set() for m in MODULES}
for _name, _path in MODULES.items():
    GRAPH[part(_name)] |= {part(t) for t in imported_modules(_name, _path)} - {part(_name)}


def test_every_part_has_a_layer():
    unknown = set(GRAPH) - CORE - APPS - WORLD - {"mag_explore"}
    assert not unknown, f"put {sorted(unknown)} in CORE, APPS or WORLD of this test"


def test_the_parser_sees_imports():  # a guard on the test itself
    assert "mag_explore.sampling" in imported_modules("mag_explore.methods.mag", MODULES["mag_explore.methods.mag"])
    assert "mag_explore.text.tokens" in imported_modules("mag_explore.layouts.layout",
                                                         MODULES["mag_explore.layouts.layout"])
    assert {"layouts", "methods", "sampling"} <= GRAPH["course"]


@pytest.mark.parametrize("core", sorted(CORE & set(GRAPH)))
def test_core_never_imports_the_apps_or_the_shapes_world(core):
    wrong = GRAPH[core] & (APPS | WORLD | {"mag_explore"})
    assert not wrong, f"{core} imports {sorted(wrong)}"


def test_the_shapes_world_imports_no_app():
    assert not GRAPH["shapes"] & APPS, f"shapes imports {sorted(GRAPH['shapes'] & APPS)}"


def cycles(graph: dict[str, set[str]]) -> set[frozenset]:
    """Strongly connected components of more than one part (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle():  # the checker can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_two_parts_import_each_other():
    graph = {k: v - {"mag_explore"} for k, v in GRAPH.items() if k != "mag_explore"}  # the facade imports all
    found = cycles(graph)
    assert found == set(), f"import cycles: {[sorted(c) for c in found]}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES})"


def test_the_root_holds_few_modules():
    """The package's layers are its folders; the root keeps the engine's entry points only."""
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(root) <= 10, f"the package root holds {len(root)} modules ({root}): move some into a folder"


def test_apps_do_not_lean_on_the_course_helpers():
    assert "course" not in GRAPH["demo"] and "course" not in GRAPH["cli"]
