"""The architecture the README promises holds in the code.

* imports run down the README's module map, never back up (a module may import only
  modules listed above it);
* every module of the package is on the map;
* no function in ``compressor/`` is longer than 60 lines (the loop reads in one screen).
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compressor"
MAX_FUNCTION_LINES = 60


def _module_map() -> list[str]:
    """Module names in the order of the README's module map table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Module map"):]
    order = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        order += re.findall(r"`(\w+)`", cell)
    return order


def _runtime_imports(path: Path) -> set[str]:
    """Sibling modules imported at run time (imports under ``if TYPE_CHECKING`` excluded)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skipped:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_every_module_is_on_the_map():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert set(_module_map()) == modules


def test_imports_only_run_down_the_map():
    order = _module_map()
    for name in order:
        for dep in _runtime_imports(PACKAGE / f"{name}.py") & set(order):
            assert order.index(dep) < order.index(name), f"{name} imports {dep}, which is below it in the map"


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}")
    assert not too_long
