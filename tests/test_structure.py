"""The code's shape, read from its syntax trees: who imports whom, and who
reaches into whose private names.

- No import cycle among the project's modules, counting the imports inside
  functions (a cycle hidden by a function-local import is a cycle still).
- The layers: the sans-IO stack (``pyslirp.stack``) imports nothing of the
  host side, the front end or pyslirp's top-level modules (but
  ``pyslirp._compat`` and ``pyslirp.settings``, which import nothing), and
  nothing that does I/O, reads a clock or draws random numbers (STYLE.md);
  the host side (``pyslirp.nat``) nothing of the front end (``forwarder``).
- No module imports another's private name (``from x import _y``).
- Product code reads ``._name`` only on ``self``, ``cls`` or ``super()``: what
  one part needs of another is public, named API.
- Tests do not reach private attributes of product objects either: they use
  public API or explicit test hooks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("pyslirp", "forwarder")
# What the sans-IO stack must not import (STYLE.md "Our shape"), with the
# C modules and close relatives that would do the same.
FORBIDDEN_IN_STACK = frozenset(
    {
        "socket",
        "_socket",
        "select",
        "selectors",
        "os",
        "time",
        "threading",
        "_thread",
        "random",
        "asyncio",
        "subprocess",
    }
)
# Underscored names of the standard library that are its documented API, not
# anyone's private field: os._exit, and namedtuple's methods.
DOCUMENTED_UNDERSCORE = frozenset({"_exit", "_replace", "_asdict", "_fields", "_make"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_files() -> dict[str, Path]:
    files = {}
    for top in PRODUCT:
        for path in sorted((REPO / top).rglob("*.py")):
            files[module_name(path)] = path
    return files


MODULES = product_files()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve_base(importer: str, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = importer if is_package(importer) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def project_module(name: str) -> str | None:
    """The longest project module that ``name`` is or lies in, if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(importer: str) -> list[tuple[str, ast.AST, list[str]]]:
    """(module named, node, names imported from it) for every import
    statement anywhere in a module, functions and ``if TYPE_CHECKING`` included."""
    found = []
    for node in ast.walk(TREES[importer]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node, []))
        elif isinstance(node, ast.ImportFrom):
            found.append((resolve_base(importer, node), node, [a.name for a in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports. ``from pkg import
    name`` where ``pkg.name`` is a module imports that module (and pkg). A
    module's own enclosing packages are left out: importing a sibling through
    them is how packages work, not a cycle."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for importer in MODULES:
        for base, _node, names in imports_of(importer):
            targets = {project_module(base)}
            targets.update(f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES)
            for target in targets:
                if target is None or target == importer:
                    continue
                if importer.startswith(target + "."):  # an enclosing package
                    continue
                graph[importer].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
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
    return components


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_self_like(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    )


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_accesses(tree: ast.AST):
    """Every ``expr._name`` whose expr is not self, cls or super()."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and is_private(node.attr)
            and node.attr not in DOCUMENTED_UNDERSCORE
            and not is_self_like(node.value)
        ):
            yield node


def self_attributes(tree: ast.AST) -> set[str]:
    """The private names a module's classes give themselves: ``self._x``
    assigned anywhere, and private methods."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and is_private(node.attr)
        ):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_private(
                    item.name
                ):
                    names.add(item.name)
    return names


# ------------------------------------------------------------ the tests
def test_the_walk_sees_the_project():
    assert {"pyslirp.stack.interface", "pyslirp.nat.loop", "forwarder.cli"} <= set(MODULES)
    graph = import_graph()
    assert "pyslirp.stack.interface" in graph["pyslirp.nat.loop"]
    # A function-local import counts (the libslirp backend's pcap writer).
    assert "pyslirp.pcap" in graph["pyslirp.libslirp"]
    # So does one under ``if TYPE_CHECKING`` (the loop's typed service fields).
    assert "pyslirp.nat.tcp" in graph["pyslirp.nat.loop"]
    # ``from package import module`` imports the module.
    assert "pyslirp.stack.icmpv4" in graph["pyslirp.nat.tcp"]


def test_find_cycles_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_layers():
    bad = []
    for importer in MODULES:
        path = MODULES[importer]
        for base, node, names in imports_of(importer):
            targets = {base} | {f"{base}.{n}" for n in names}
            if in_package(importer, "pyslirp.stack"):
                if base.split(".")[0] in FORBIDDEN_IN_STACK:
                    bad.append(f"{where(path, node)}: the sans-IO stack imports {base}")
                for target in targets:
                    module = project_module(target)
                    if module is None or in_package(module, "pyslirp.stack"):
                        continue
                    if module not in ("pyslirp._compat", "pyslirp.settings"):
                        bad.append(f"{where(path, node)}: the stack imports {module}")
            if in_package(importer, "pyslirp.nat") and any(
                in_package(t, "forwarder") for t in targets
            ):
                bad.append(f"{where(path, node)}: the host side imports the front end ({base})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_private_name_imported_from_another_module():
    bad = []
    for importer, path in MODULES.items():
        for base, node, names in imports_of(importer):
            if project_module(base) is None:
                continue
            for name in names:
                if is_private(name) and f"{base}.{name}" not in MODULES:
                    bad.append(f"{where(path, node)}: from {base} import {name}")
    assert not bad, "\n".join(bad)


def test_product_code_reads_private_names_only_on_itself():
    bad = []
    for name, tree in TREES.items():
        for node in private_accesses(tree):
            bad.append(f"{where(MODULES[name], node)}: {ast.unparse(node)}")
    assert not bad, f"{len(bad)} private accesses:\n" + "\n".join(bad)


def test_tests_use_no_private_attribute_of_product_objects():
    product = set()
    for tree in TREES.values():
        product |= self_attributes(tree)
    test_trees = {
        path: ast.parse(path.read_text(), str(path)) for path in sorted(REPO.glob("tests/*.py"))
    }
    own = set()  # what the tests' helper classes define on themselves
    for tree in test_trees.values():
        own |= self_attributes(tree)
    reachable = product - own
    bad = []
    for path, tree in test_trees.items():
        for node in private_accesses(tree):
            if node.attr in reachable:
                bad.append(f"{where(path, node)}: {ast.unparse(node)}")
    assert not bad, f"{len(bad)} private accesses in tests:\n" + "\n".join(bad)


def test_the_libslirp_backend_loads_nothing_of_the_python_stack():
    code = (
        "import sys, pyslirp.libslirp, pyslirp.backend, pyslirp.config, pyslirp.tap\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if m.startswith(('pyslirp.nat', 'pyslirp.stack')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
