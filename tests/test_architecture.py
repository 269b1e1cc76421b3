"""The architecture docs/architecture.md promises holds in the code.

* imports run down docs/architecture.md's module map, never back up (a module may import only
  modules listed above it), type-only imports included: there are none left to hide a circle
  behind ``if TYPE_CHECKING``, and no module reaches another through an import circle;
* every module of the package is on the map;
* no function in ``compressor/`` is longer than 60 lines (the loop reads in one screen), and no
  class longer than 250;
* nothing is stored on a model behind its back (``object.__setattr__``) or carried as a hidden
  attribute read with ``getattr(..., "heads")``.
"""

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compressor"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def _module_map() -> list[str]:
    """Module names in the order of docs/architecture.md's module map table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("Module map"):]
    order = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        order += re.findall(r"`(\w+)`", cell)
    return order


def _modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere: at the top, inside functions, or under
    ``if TYPE_CHECKING`` (a type-only import is a dependency all the same)."""
    siblings = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("compressor."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "compressor":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("compressor.")}
    return found & siblings


def _sources() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_every_module_is_on_the_map():
    assert set(_module_map()) == _modules()


def test_imports_only_run_down_the_map():
    order = _module_map()
    for name in order:
        for dep in _imports(PACKAGE / f"{name}.py") & set(order):
            assert order.index(dep) < order.index(name), f"{name} imports {dep}, which is below it in the map"


def test_no_import_is_only_for_type_checking():
    hidden = [f"{p.name}:{node.lineno}" for p in _sources() for node in ast.walk(ast.parse(p.read_text()))
              if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    assert not hidden, f"imports under `if TYPE_CHECKING` hide a dependency: {hidden}"


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [name, dep] if dep in path else [name, dep]
            if dep not in state and (found := visit(dep, path + [name])):
                return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [])):
            return found
    return None


def test_no_module_imports_itself_through_a_circle():
    graph = {p.stem: _imports(p) - {p.stem} for p in _sources() if p.stem != "__init__"}
    circle = _circle(graph)
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_the_circle_check_finds_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) is not None
    assert _circle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}")
    assert not too_long


def test_no_class_is_longer_than_250_lines():
    too_long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_CLASS_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    assert not too_long


def _calls(name: str, constant: str | None = None) -> list[str]:
    """Where ``name(...)`` is called in the package (with the string ``constant`` among its arguments)."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name and (
                    constant is None or any(isinstance(a, ast.Constant) and a.value == constant for a in node.args)):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_nothing_is_stored_on_a_model_behind_its_back():
    assert not _calls("object.__setattr__")


def test_no_value_travels_as_a_hidden_attribute():
    assert not _calls("getattr", "heads")


def test_only_the_layer_registry_names_a_layer_kind():
    from compressor.layers import layer_kinds

    kinds = set(layer_kinds())
    named = [f"{p.name}:{node.lineno} {node.value!r}" for p in _sources() if p.name != "layers.py"
             for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Constant) and node.value in kinds]
    assert not named, named
