"""Functions a reader can hold: no function or method longer than a screen (read with ast, nothing imported)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mag_explore"
MAX_FUNCTION_LINES = 60


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (lines)`` of every function in ``path`` longer than ``limit`` lines, decorators and docstring included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > limit:
                found.append(f"{node.name} ({lines} lines)")
    return found


def test_the_checker_sees_a_long_function(tmp_path):  # the test can fail
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"class C:\n    def f(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n")
    assert long_functions(tmp_path / "m.py") == [f"f ({MAX_FUNCTION_LINES + 1} lines)"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_fit_a_screen(path):
    assert not long_functions(path), f"{path.relative_to(PACKAGE.parent)}: {long_functions(path)} (at most {MAX_FUNCTION_LINES})"
