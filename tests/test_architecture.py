"""Checkable rules of the code's structure (issue 17).

The import graph is read from the source with `ast`, nothing is imported. Both module-level and
function-level imports count as edges: a function-level import is still a dependency of the module
(it runs on the first call, and the two modules can no longer be understood, moved or tested one
without the other); deferring an import only hides a cycle from the interpreter, not from a reader.
`if TYPE_CHECKING:` imports count too, for the same reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlora", "server", "clients")
# Modules that run in the client process (the ClientApp and what only it uses); the server side
# (`server/`) must take nothing from them: what both sides need lives in a shared module.
CLIENT_SIDE = ("clients", "fedlora.learning.client_round", "fedlora.privacy.secure_client")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(name: str, known: dict[str, Path]) -> str | None:
    """The project module `name` denotes (the longest known prefix), or None for a third party."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (module- and function-level, see the docstring).

    `from package import name` counts as an edge to `package.name` when that is a module, else to
    `package` (its `__init__`).
    """
    known = _modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                    for alias in node.names
                ]
            for name in names:
                target = _targets(name, known)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as ``[a, b, ..., a]``."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & members):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"no cycle through {start} in {component}")


def test_find_cycles_reports_a_planted_cycle():
    # Prepare: a -> b -> c -> a, plus an acyclic tail d -> a
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    # Execute
    cycles = find_cycles(graph)

    # Assert
    assert cycles == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_counts_function_level_relative_and_type_checking_imports(tmp_path,
                                                                             monkeypatch):
    # Prepare: a package whose module imports a sibling only inside a function, relatively
    package = tmp_path / "fedlora"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("def f():\n    from . import two\n    return two\n")
    (package / "two.py").write_text("from fedlora.one import f\n")
    (package / "three.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from fedlora import two\n")
    monkeypatch.setattr(__name__ + ".ROOT", tmp_path)
    monkeypatch.setattr(__name__ + ".PACKAGES", ("fedlora",))

    # Execute
    graph = import_graph()

    # Assert
    assert graph["fedlora.one"] == {"fedlora.two"}
    assert graph["fedlora.two"] == {"fedlora.one"}
    assert graph["fedlora.three"] == {"fedlora.two"}
    assert find_cycles(graph) == [["fedlora.one", "fedlora.two", "fedlora.one"]]


@pytest.fixture(scope="module")
def project_graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(project_graph):
    graph = project_graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles; break each by moving what both sides use into a module " \
        "both import:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("server_module", sorted(m for m in _modules() if m.startswith("server")))
def test_server_never_imports_client_side_modules(server_module, project_graph):
    graph = project_graph
    client_side = sorted(
        target for target in graph[server_module]
        if any(target == c or target.startswith(c + ".") for c in CLIENT_SIDE)
    )
    assert not client_side, (
        f"{server_module} imports client-side modules {client_side}: move what both sides use "
        "into a shared module (e.g. the wire helpers) and import it from there"
    )


# --------------------------------------------------------------------- house rules: size, docs

MAX_LINES = 500
SIZED_PACKAGES = (*PACKAGES, "benchmarks")


def long_files(root: Path, packages: tuple[str, ...], limit: int = MAX_LINES) -> list[str]:
    """``path (N lines)`` for every ``.py`` file under ``root/<package>`` over ``limit`` lines."""
    out = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > limit:
                out.append(f"{path.relative_to(root)} ({lines} lines)")
    return out


def _public(name: str) -> bool:
    return not name.startswith("_")


def missing_docstrings(path: Path, root: Path) -> list[str]:
    """``path:line kind name`` for each public function, method or class of a module without
    a docstring. Public: its name and every enclosing class's name lack a leading underscore
    (dunder methods are covered by their class); functions nested in functions are not API."""
    out: list[str] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and _public(node.name):
                if ast.get_docstring(node) is None:
                    out.append(f"{path.relative_to(root)}:{node.lineno} class {prefix}{node.name}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and _public(node.name) and ast.get_docstring(node) is None:
                kind = "method" if prefix else "function"
                out.append(f"{path.relative_to(root)}:{node.lineno} {kind} {prefix}{node.name}")

    visit(ast.parse(path.read_text(), filename=str(path)).body, "")
    return out


def test_long_files_lists_each_file_over_the_limit(tmp_path):
    # Prepare: one file at the limit, one just over it
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text("x = 1\n" * 500)
    (tmp_path / "pkg" / "big.py").write_text("x = 1\n" * 501)

    # Execute
    offenders = long_files(tmp_path, ("pkg",))

    # Assert
    assert offenders == ["pkg/big.py (501 lines)"]


def test_missing_docstrings_finds_public_functions_methods_and_classes_only(tmp_path):
    # Prepare: documented and undocumented names, public and private, nested and dunder
    path = tmp_path / "mod.py"
    path.write_text(
        'def documented():\n    """Yes."""\n'
        "def bare():\n    def inner():\n        pass\n"
        "def _private():\n    pass\n"
        'class Public:\n    """Yes."""\n'
        "    def __init__(self):\n        pass\n"
        "    def method(self):\n        pass\n"
        "    @property\n    def view(self):\n        return 1\n"
        "class Bare:\n    pass\n"
        "class _Hidden:\n    def method(self):\n        pass\n"
    )

    # Execute
    offenders = missing_docstrings(path, tmp_path)

    # Assert
    assert offenders == ["mod.py:3 function bare", "mod.py:12 method Public.method",
                         "mod.py:15 method Public.view", "mod.py:17 class Bare"]


def test_no_source_file_is_over_500_lines():
    offenders = long_files(ROOT, SIZED_PACKAGES)
    assert not offenders, (
        f"files over {MAX_LINES} lines (house rule, issue 17); split each along a seam into "
        "cohesive modules and re-export what callers import:\n" + "\n".join(offenders))


def test_every_public_function_method_and_class_has_a_docstring():
    offenders = [line for package in PACKAGES
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for line in missing_docstrings(path, ROOT)]
    assert not offenders, (
        f"{len(offenders)} public functions, methods or classes without a docstring (house "
        "rule, issue 17); give each one a useful line (what it does, the arguments worth "
        "naming, what it returns or raises):\n" + "\n".join(offenders))


# issue 17: the server and client apps read as short stages, not one long method
SIZE_LIMITED = ("server", "clients")
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 500


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of each function or method in ``path`` longer than ``limit``
    lines, from its ``def`` line to its last line (docstring and nested functions included)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}."
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((name[:-1], lines))
            visit(child, name)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def _size_limited_files() -> list[Path]:
    return [path for package in SIZE_LIMITED for path in sorted((ROOT / package).rglob("*.py"))]


def test_long_functions_finds_a_planted_long_method_and_nested_function(tmp_path):
    # Prepare: a 61-line method, a 60-line function, and a long function nested in a short one
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    source = (f"class C:\n    def long(self):\n{body.replace('    ', '        ')}"
              f"        return x0\n\n"
              f"def exact():\n{body}\n"
              f"def outer():\n    def inner():\n{body.replace('    ', '        ')}"
              f"        return x0\n    return inner\n")
    path = tmp_path / "m.py"
    path.write_text(source)

    # Execute
    found = long_functions(path)

    # Assert: 2 + 59 = 61 lines each; exact() is 1 + 59 = 60, at the limit
    assert found == [("C.long", 61), ("outer", 63), ("outer.inner", 61)]


def test_every_function_in_server_and_clients_is_at_most_60_lines():
    too_long = [f"{path.relative_to(ROOT)}: {name} ({lines} lines)"
                for path in _size_limited_files() for name, lines in long_functions(path)]
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines; split each into named "
                          "stages (see server/round/):\n" + "\n".join(too_long))


def test_every_file_in_server_and_clients_is_at_most_500_lines():
    too_long = [f"{path.relative_to(ROOT)}: {n} lines" for path in _size_limited_files()
                if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES]
    assert not too_long, (f"files over {MAX_FILE_LINES} lines; move a concern into its own "
                          "module:\n" + "\n".join(too_long))


def undocumented(path: Path) -> list[str]:
    """Public functions, classes and methods of public classes in ``path`` (module level and
    class level; not nested functions) that have no docstring."""
    missing: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if child.name.startswith("_"):
                continue
            if ast.get_docstring(child) is None:
                missing.append(prefix + child.name)
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return missing


def test_undocumented_finds_public_functions_and_methods_without_docstrings(tmp_path):
    # Prepare
    path = tmp_path / "m.py"
    path.write_text('def bare():\n    pass\n\ndef told():\n    """Doc."""\n\n'
                    'def _private():\n    pass\n\nclass K:\n    """Doc."""\n\n'
                    '    def method(self):\n        def nested():\n            pass\n\n'
                    '    def _helper(self):\n        pass\n')

    # Execute / Assert
    assert undocumented(path) == ["bare", "K.method"]


def test_every_public_function_in_server_and_clients_has_a_docstring():
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in _size_limited_files()
               for name in undocumented(path)]
    assert not missing, "public functions without a docstring:\n" + "\n".join(missing)
